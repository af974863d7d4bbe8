//! Filesystem metrics: FUSE operation counts and latency on the global
//! OpenTelemetry meter `"stoker"` (the binaries export it to Prometheus), mirrored
//! in plain atomics ([`FsCounters`]) that tests and `stoker mount -v` read directly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// The FUSE operations the filesystem answers, for per-operation metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Release,
    Opendir,
    Readdir,
    Readdirplus,
    Releasedir,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    /// Any operation that would modify the image; always refused with EROFS.
    Modify,
}

impl Op {
    const ALL: [Op; 15] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readlink,
        Op::Open,
        Op::Read,
        Op::Release,
        Op::Opendir,
        Op::Readdir,
        Op::Readdirplus,
        Op::Releasedir,
        Op::Statfs,
        Op::Getxattr,
        Op::Listxattr,
        Op::Access,
        Op::Modify,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readlink => "readlink",
            Op::Open => "open",
            Op::Read => "read",
            Op::Release => "release",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Releasedir => "releasedir",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
            Op::Modify => "modify",
        }
    }
}

/// A snapshot of one mount's counters since it was mounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsCounters {
    pub lookups: u64,
    pub getattrs: u64,
    pub readdirs: u64,
    /// `open` calls answered (passthrough ones included).
    pub opens: u64,
    /// Opens answered with a kernel passthrough backing file: reads of that
    /// open never reach the filesystem.
    pub passthrough_opens: u64,
    /// `read` calls that reached the filesystem.
    pub reads: u64,
    /// Bytes returned by `read`.
    pub read_bytes: u64,
    /// Reads answered with EIO (fetch or verification failure, deadline, disk error).
    pub read_errors: u64,
    /// Chunks asked for ahead of the reader (read-ahead within a file).
    pub readahead_chunks: u64,
    /// Operations refused with EROFS.
    pub refused_writes: u64,
    /// Per-file backing files assembled for passthrough of multi-chunk files.
    pub assembled_files: u64,
    /// Releases of opens whose accounting is done: the file's open mode
    /// ([passthrough](crate::MountOptions::passthrough) or not) reflects them.
    pub releases: u64,
    /// First-access events that could not be delivered because the trace channel was full.
    pub trace_dropped: u64,
    /// Every FUSE operation answered, any kind.
    pub operations: u64,
}

#[derive(Default)]
struct Atomics {
    lookups: AtomicU64,
    getattrs: AtomicU64,
    readdirs: AtomicU64,
    opens: AtomicU64,
    passthrough_opens: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    read_errors: AtomicU64,
    readahead_chunks: AtomicU64,
    refused_writes: AtomicU64,
    assembled_files: AtomicU64,
    releases: AtomicU64,
    trace_dropped: AtomicU64,
    operations: AtomicU64,
}

/// Latency buckets in seconds: cached metadata answers land in the first ones,
/// reads waiting on the registry in the last.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(crate) struct Metrics {
    stats: Atomics,
    operations: Counter<u64>,
    latency: Histogram<f64>,
    read_bytes: Counter<u64>,
    read_errors: Counter<u64>,
    passthrough_opens: Counter<u64>,
    /// `op=<name>` attributes, built once, indexed like [`Op::ALL`].
    op_attributes: Vec<[KeyValue; 1]>,
}

impl Metrics {
    /// Builds the instruments on the current global meter provider.
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("stoker");
        Metrics {
            stats: Atomics::default(),
            operations: meter
                .u64_counter("stoker.fuse.operations")
                .with_description("FUSE operations answered, by operation")
                .build(),
            latency: meter
                .f64_histogram("stoker.fuse.operation.duration")
                .with_unit("s")
                .with_description("Time to answer one FUSE operation, by operation")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            read_bytes: meter
                .u64_counter("stoker.fuse.read.bytes")
                .with_unit("By")
                .with_description("Bytes returned by FUSE reads")
                .build(),
            read_errors: meter
                .u64_counter("stoker.fuse.read.errors")
                .with_description("FUSE reads answered with EIO")
                .build(),
            passthrough_opens: meter
                .u64_counter("stoker.fuse.passthrough.opens")
                .with_description("Opens served by kernel passthrough to a local backing file")
                .build(),
            op_attributes: Op::ALL
                .iter()
                .map(|op| [KeyValue::new("op", op.as_str())])
                .collect(),
        }
    }

    /// Counts one operation and starts timing it; the guard records the latency
    /// when dropped. Counting first means a caller that has its answer also sees
    /// the count.
    pub(crate) fn op(&self, op: Op) -> OpTimer<'_> {
        self.count(op);
        OpTimer {
            metrics: self,
            op,
            started: Instant::now(),
        }
    }

    pub(crate) fn snapshot(&self) -> FsCounters {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FsCounters {
            lookups: load(&s.lookups),
            getattrs: load(&s.getattrs),
            readdirs: load(&s.readdirs),
            opens: load(&s.opens),
            passthrough_opens: load(&s.passthrough_opens),
            reads: load(&s.reads),
            read_bytes: load(&s.read_bytes),
            read_errors: load(&s.read_errors),
            readahead_chunks: load(&s.readahead_chunks),
            refused_writes: load(&s.refused_writes),
            assembled_files: load(&s.assembled_files),
            releases: load(&s.releases),
            trace_dropped: load(&s.trace_dropped),
            operations: load(&s.operations),
        }
    }

    pub(crate) fn read_done(&self, bytes: usize) {
        self.stats
            .read_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.read_bytes.add(bytes as u64, &[]);
    }

    pub(crate) fn read_failed(&self) {
        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        self.read_errors.add(1, &[]);
    }

    pub(crate) fn passthrough_opened(&self) {
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        self.passthrough_opens.add(1, &[]);
    }

    pub(crate) fn readahead(&self, chunks: usize) {
        self.stats
            .readahead_chunks
            .fetch_add(chunks as u64, Ordering::Relaxed);
    }

    pub(crate) fn release_done(&self) {
        self.stats.releases.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn file_assembled(&self) {
        self.stats.assembled_files.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn trace_dropped(&self) {
        self.stats.trace_dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, op: Op) {
        let s = &self.stats;
        s.operations.fetch_add(1, Ordering::Relaxed);
        let counter = match op {
            Op::Lookup => &s.lookups,
            Op::Getattr => &s.getattrs,
            Op::Readdir | Op::Readdirplus => &s.readdirs,
            Op::Open => &s.opens,
            Op::Read => &s.reads,
            Op::Modify => &s.refused_writes,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn attributes(&self, op: Op) -> &[KeyValue] {
        let i = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
        self.op_attributes.get(i).map_or(&[], |a| a.as_slice())
    }
}

/// One operation being answered; records its latency on drop.
pub(crate) struct OpTimer<'a> {
    metrics: &'a Metrics,
    op: Op,
    started: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        let attributes = m.attributes(self.op);
        m.operations.add(1, attributes);
        m.latency
            .record(self.started.elapsed().as_secs_f64(), attributes);
    }
}
