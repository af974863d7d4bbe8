//! Startup traces and prefetch plans, end to end: traces recorded from real FUSE
//! mounts read by real processes, merged into a plan, the plan executed on a
//! second "node" (its own cache and registry counters), and the executor's
//! behaviour under cancellation, concurrent reads and a registry that fails.
//!
//! Chunks come from an in-memory blob source that logs, holds, fails or tampers
//! with requests on command; one test uses a real registry (docker-registry) with
//! an image converted by stoker-convert.

use std::collections::{BTreeSet, HashSet};
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use stoker_agent::assembly::Assembly;
use stoker_agent::prefetch::{
    NodeImages, PrefetchOptions, PrefetchRequest, PrefetchState, Prefetches, Progress,
};
use stoker_agent::trace::{TraceOptions, TraceSubject, Traces};
use stoker_cache::ChunkCache;
use stoker_fetch::{BlobSource, FetchConfig, FetchSourceError, Fetcher};
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, FilePiece, Index, Meta, Node, NodeKind,
    Plan, Tree,
};
use stoker_lazyfs::{ChunkAccess, MountHandle, MountOptions};
use tempfile::TempDir;
use tokio::sync::watch;

const IMAGE_REF: &str = "registry.test:5000/team/app:1.0";
const CHUNK: usize = 64 << 10;
/// Every wait on a condition gives up after this long (a hang, not a timing check).
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Test image: files cut into chunks, one blob, an index.

struct TestImage {
    index: Arc<Index>,
    digest: Digest,
    blob_digest: Digest,
    blob: Bytes,
    files: Vec<(String, Vec<u8>)>,
}

impl TestImage {
    /// Files at the root, `CHUNK`-sized chunks, one zstd frame per chunk.
    fn build(files: &[(&str, usize)]) -> TestImage {
        let meta = |permissions| Meta {
            permissions,
            mtime_sec: 1_700_000_000,
            ..Meta::default()
        };
        let mut tree = Tree::new(meta(0o755));
        let mut table = ChunkTable::default();
        table.add_blob(BlobInfo {
            digest: Digest::default(),
            size: 0,
        });
        let mut blob = Vec::new();
        let mut contents = Vec::new();
        for (seed, (name, size)) in files.iter().enumerate() {
            let content = pattern(seed as u64 + 1, *size);
            let mut pieces = Vec::new();
            for (i, part) in content.chunks(CHUNK).enumerate() {
                let digest = Digest::of(part);
                let chunk = match table.find(&digest) {
                    Some(id) => id,
                    None => {
                        let compressed = zstd::bulk::compress(part, 3).expect("zstd");
                        let id = table.insert(ChunkRecord {
                            digest,
                            blob: 0,
                            compressed_offset: blob.len() as u64,
                            compressed_len: compressed.len() as u32,
                            uncompressed_len: part.len() as u32,
                        });
                        blob.extend_from_slice(&compressed);
                        id
                    }
                };
                pieces.push(FilePiece {
                    offset: (i * CHUNK) as u64,
                    chunk,
                });
            }
            let node = tree.add(Node {
                kind: NodeKind::File {
                    size: content.len() as u64,
                    pieces,
                },
                meta: meta(0o644),
            });
            tree.link(Tree::ROOT, name.as_bytes(), node);
            contents.push((name.to_string(), content));
        }
        let blob = Bytes::from(blob);
        let blob_digest = Digest::of(&blob);
        table.blobs[0] = BlobInfo {
            digest: blob_digest,
            size: blob.len() as u64,
        };
        let encoded = tree
            .encode(&table, Chunking::Fixed { size: CHUNK as u32 })
            .expect("encode index");
        let index = Index::decode_verified(&encoded.compressed, &encoded.digest).expect("decode");
        TestImage {
            index: Arc::new(index),
            digest: encoded.digest,
            blob_digest,
            blob,
            files: contents,
        }
    }

    /// Index positions of the chunks of file `name`, in file order.
    fn chunks_of(&self, name: &str) -> Vec<u32> {
        let id = self.index.resolve(name.as_bytes()).expect("file in image");
        self.index.file_chunks(id).map(|c| c.chunk).collect()
    }

    fn content(&self, name: &str) -> &[u8] {
        &self.files.iter().find(|(n, _)| n == name).expect("file").1
    }

    fn bytes_of(&self, chunks: &[u32]) -> u64 {
        chunks
            .iter()
            .map(|&c| u64::from(self.index.chunk(c).expect("chunk").uncompressed_len))
            .sum()
    }

    fn plan(&self, chunks: Vec<u32>) -> Plan {
        Plan {
            index_digest: self.digest,
            chunks,
        }
    }
}

/// Deterministic, incompressible bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A blob source that logs every request and can hold, fail or tamper with them.

struct FakeSource {
    blob_digest: Digest,
    blob: Bytes,
    /// Requested ranges, in arrival order.
    log: Mutex<Vec<Range<u64>>>,
    /// Requests answered (successfully or not).
    answered: AtomicUsize,
    gate: watch::Sender<Gate>,
    /// Requests from this arrival number on fail (0-based); `usize::MAX`: never.
    fail_from: AtomicUsize,
    /// Blob offsets whose byte is flipped in every response covering them.
    tamper: Mutex<Vec<u64>>,
}

#[derive(Default)]
struct Gate {
    /// Hold every request...
    closed: bool,
    /// ...except those starting at these offsets.
    released: HashSet<u64>,
}

impl FakeSource {
    fn new(image: &TestImage) -> Arc<FakeSource> {
        Arc::new(FakeSource {
            blob_digest: image.blob_digest,
            blob: image.blob.clone(),
            log: Mutex::new(Vec::new()),
            answered: AtomicUsize::new(0),
            gate: watch::Sender::new(Gate::default()),
            fail_from: AtomicUsize::new(usize::MAX),
            tamper: Mutex::new(Vec::new()),
        })
    }

    fn requests(&self) -> Vec<Range<u64>> {
        self.log.lock().unwrap().clone()
    }

    fn close_gate(&self) {
        self.gate.send_modify(|g| g.closed = true);
    }

    fn open_gate(&self) {
        self.gate.send_modify(|g| g.closed = false);
    }

    fn release(&self, start: u64) {
        self.gate.send_modify(|g| {
            g.released.insert(start);
        });
    }
}

impl BlobSource for FakeSource {
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        Box::pin(async move {
            let arrival = {
                let mut log = self.log.lock().unwrap();
                log.push(range.clone());
                log.len() - 1
            };
            let mut gate = self.gate.subscribe();
            let _ = gate
                .wait_for(|g| !g.closed || g.released.contains(&range.start))
                .await;
            self.answered.fetch_add(1, Ordering::SeqCst);
            if arrival >= self.fail_from.load(Ordering::SeqCst) {
                return Err(FetchSourceError::new("registry answered 500", false));
            }
            if *blob != self.blob_digest || range.end > self.blob.len() as u64 {
                return Err(FetchSourceError::new("no such blob range", false));
            }
            let mut body = self.blob[range.start as usize..range.end as usize].to_vec();
            for &offset in self.tamper.lock().unwrap().iter() {
                if range.contains(&offset) {
                    body[(offset - range.start) as usize] ^= 0x40;
                }
            }
            Ok(Bytes::from(body))
        })
    }
}

// ---------------------------------------------------------------------------
// A node: its own cache directory, blob source, fetcher and prefetch executor.

struct TestNode {
    source: Arc<FakeSource>,
    fetcher: Fetcher,
    prefetches: Arc<Prefetches>,
    _cache_dir: TempDir,
}

impl TestNode {
    fn new(image: &TestImage, cache_bytes: u64, config: FetchConfig) -> TestNode {
        TestNode::with_options(image, cache_bytes, config, |_| PrefetchOptions::default())
    }

    /// A node whose executor options `options` makes from the cache directory.
    fn with_options(
        image: &TestImage,
        cache_bytes: u64,
        config: FetchConfig,
        options: impl FnOnce(&Path) -> PrefetchOptions,
    ) -> TestNode {
        let cache_dir = tempfile::tempdir().expect("cache dir");
        let cache = ChunkCache::open(cache_dir.path(), cache_bytes).expect("cache");
        let source = FakeSource::new(image);
        let fetcher = Fetcher::new(
            Arc::clone(&source) as Arc<dyn BlobSource>,
            cache.clone(),
            config.clone(),
        );
        let images = Arc::new(NodeImages::offline(cache, config));
        images
            .add_fetcher(IMAGE_REF, fetcher.clone())
            .expect("fetcher");
        images.add_index(image.digest, Arc::clone(&image.index));
        let prefetches = Prefetches::new(images, options(cache_dir.path()));
        TestNode {
            source,
            fetcher,
            prefetches,
            _cache_dir: cache_dir,
        }
    }

    fn cache(&self) -> &ChunkCache {
        self.fetcher.cache()
    }

    fn cached(&self, image: &TestImage, chunks: &[u32]) -> Vec<bool> {
        chunks
            .iter()
            .map(|&c| self.cache().contains(&image.index.chunk(c).unwrap().digest))
            .collect()
    }

    fn prefetch(&self, image: &TestImage, plan: Plan) -> watch::Receiver<Progress> {
        self.prefetches
            .start(PrefetchRequest {
                image_ref: IMAGE_REF.into(),
                index_digest: image.digest,
                plan,
                background_rest: false,
                prepare_passthrough: false,
            })
            .expect("prefetch accepted")
    }
}

/// Fetcher settings that make each chunk its own request (no coalescing).
fn one_chunk_per_request(prefetch_in_flight: usize) -> FetchConfig {
    FetchConfig {
        max_coalesce_bytes: 1,
        max_gap_bytes: 0,
        max_prefetch_in_flight: prefetch_in_flight,
        ..FetchConfig::default()
    }
}

async fn final_state(progress: &mut watch::Receiver<Progress>) -> Progress {
    tokio::time::timeout(DEADLINE, progress.wait_for(|p| p.state.is_final()))
        .await
        .expect("prefetch reached a final state within the deadline")
        .expect("progress channel open")
        .clone()
}

/// Polls `condition` until it holds; panics after [`DEADLINE`].
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn fuse_available(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: {test}: /dev/fuse is absent");
        return false;
    }
    stoker_testkit::require_root(test)
}

fn mount(
    image: &TestImage,
    fetcher: &Fetcher,
    access_trace: Option<std::sync::mpsc::SyncSender<ChunkAccess>>,
) -> (MountHandle, TempDir) {
    let dir = tempfile::tempdir().expect("mount point");
    let options = MountOptions {
        access_trace,
        ..MountOptions::default()
    };
    let handle = stoker_lazyfs::mount(
        Arc::clone(&image.index),
        fetcher.clone(),
        dir.path(),
        options,
    )
    .expect("mount");
    (handle, dir)
}

/// Reads `files` of the mount in order, each with its own `cat` process, and
/// checks the bytes.
fn run_workload(image: &TestImage, mountpoint: &Path, files: &[&str]) {
    for name in files {
        let output = Command::new("cat")
            .arg(mountpoint.join(name))
            .output()
            .expect("run cat");
        assert!(
            output.status.success(),
            "cat {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.stdout == image.content(name),
            "wrong bytes from {name}"
        );
    }
}

fn workload_image() -> TestImage {
    TestImage::build(&[
        ("a", 5 * CHUNK + 100),
        ("b", 3 * CHUNK),
        ("c", 2 * CHUNK + 7),
        ("d", CHUNK / 2),
        ("e", 4 * CHUNK),
    ])
}

/// Records one trace: a fresh mount (empty page cache), the workload, the trace.
async fn record_trace(
    traces: &Traces,
    image: &TestImage,
    fetcher: &Fetcher,
    files: &[&str],
    container: &str,
) -> stoker_format::Trace {
    let started = traces
        .record(TraceSubject {
            image_ref: IMAGE_REF.into(),
            index_digest: image.digest,
            index: Arc::clone(&image.index),
            container_id: String::new(),
        })
        .expect("record");
    assert!(traces.claim_for_container(&image.digest, container));
    let (handle, dir) = mount(image, fetcher, Some(started.events));
    let path = dir.path().to_path_buf();
    let workload: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    let image_files = image.files.clone();
    tokio::task::spawn_blocking(move || {
        let names: Vec<&str> = workload.iter().map(String::as_str).collect();
        for name in names {
            let output = Command::new("cat")
                .arg(path.join(name))
                .output()
                .expect("run cat");
            assert!(output.status.success());
            let expected = &image_files.iter().find(|(n, _)| n == name).unwrap().1;
            assert!(&output.stdout == expected, "wrong bytes from {name}");
        }
    })
    .await
    .expect("workload");
    assert!(
        traces.close_for_container(container).await,
        "the container's window was open"
    );
    assert!(
        !traces.close_for_container(container).await,
        "and is closed now"
    );
    assert_eq!(handle.counters().trace_dropped, 0);
    handle.unmount().expect("unmount");
    drop(dir);
    let summary = traces
        .list(None)
        .into_iter()
        .find(|s| s.container_id == container)
        .expect("trace listed");
    assert!(summary.complete);
    traces.get(&summary.id).expect("read").expect("kept").1
}

// ---------------------------------------------------------------------------
// Traces

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_of_a_real_mount_matches_the_reads_of_the_process() {
    if !fuse_available("a_trace_of_a_real_mount_matches_the_reads_of_the_process") {
        return;
    }
    let image = workload_image();
    let node = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let state = tempfile::tempdir().unwrap();
    let traces = Traces::open(state.path(), TraceOptions::default()).unwrap();

    let trace = record_trace(&traces, &image, &node.fetcher, &["c", "a", "d"], "ctr-1").await;

    assert_eq!(trace.index_digest, image.digest.to_string());
    assert_eq!(trace.image, IMAGE_REF);
    assert_eq!(trace.container, "ctr-1");
    assert!(!trace.truncated);
    // Files in the order the process read them; chunks of a file in any order (the
    // kernel may send a file's reads in parallel), each exactly once.
    let mut cursor = 0;
    for name in ["c", "a", "d"] {
        let id = image.index.resolve(name.as_bytes()).unwrap();
        let want: BTreeSet<(u32, u64, u32)> = image
            .index
            .file_chunks(id)
            .map(|c| (c.chunk, c.file_offset, c.len))
            .collect();
        let got: Vec<(u32, u64, u32)> = trace.entries[cursor..cursor + want.len()]
            .iter()
            .map(|e| {
                assert_eq!(trace.files[e.file as usize], format!("/{name}"));
                (e.chunk, e.file_offset, e.len)
            })
            .collect();
        assert_eq!(
            got.iter().copied().collect::<BTreeSet<_>>(),
            want,
            "chunks of {name}"
        );
        assert_eq!(got.len(), want.len(), "each chunk of {name} once");
        cursor += want.len();
    }
    assert_eq!(
        cursor,
        trace.entries.len(),
        "nothing but the reads: {:?}",
        trace.entries
    );
    assert_eq!(trace.files.len(), 3, "unread files b and e are absent");
    assert!(
        trace
            .entries
            .windows(2)
            .all(|w| w[0].micros <= w[1].micros || w[0].file == w[1].file)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closes_on_time_on_readiness_or_at_the_entry_cap() {
    let image = workload_image();
    let state = tempfile::tempdir().unwrap();
    let options = TraceOptions {
        max_entries: 4,
        window: Duration::from_millis(50),
        ..TraceOptions::default()
    };
    let traces = Traces::open(state.path(), options).unwrap();
    let subject = |container: &str| TraceSubject {
        image_ref: IMAGE_REF.into(),
        index_digest: image.digest,
        index: Arc::clone(&image.index),
        container_id: container.into(),
    };
    let access = |chunk: u32| ChunkAccess {
        chunk,
        inode: image.index.resolve(b"a").unwrap(),
        file_offset: 0,
        at: std::time::Instant::now(),
    };

    // The window closes by itself; the mount's sender then finds nobody listening.
    let timed = traces.record(subject("timed")).unwrap();
    timed.events.send(access(0)).unwrap();
    let summary = traces.wait(&timed.id).await.expect("complete");
    assert_eq!((summary.entries, summary.truncated), (1, false));
    assert!(timed.events.try_send(access(1)).is_err(), "recording ended");

    // The entry cap ends the trace early and marks it truncated; repeats are not entries.
    let traces_long = Traces::open(
        state.path(),
        TraceOptions {
            max_entries: 4,
            window: Duration::from_secs(3600),
            ..TraceOptions::default()
        },
    )
    .unwrap();
    let capped = traces_long.record(subject("capped")).unwrap();
    for chunk in [0, 0, 1, 2, 1, 3, 4, 5] {
        let _ = capped.events.send(access(chunk));
    }
    let summary = traces_long.wait(&capped.id).await.expect("complete");
    assert_eq!((summary.entries, summary.truncated), (4, true));
    let (_, trace) = traces_long.get(&capped.id).unwrap().unwrap();
    assert_eq!(
        trace.entries.iter().map(|e| e.chunk).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );

    // Readiness closes the window at once, and only that container's.
    let ready = traces_long.record(subject("")).unwrap();
    let other = traces_long.record(subject("other")).unwrap();
    assert!(traces_long.claim_for_container(&image.digest, "web-1"));
    assert!(
        !traces_long.claim_for_container(&image.digest, "web-2"),
        "nothing left to claim"
    );
    ready.events.send(access(7)).unwrap();
    assert!(matches!(
        traces_long.get(&ready.id),
        Err(stoker_agent::AgentError::FailedPrecondition(_))
    ));
    assert!(traces_long.close_for_container("web-1").await);
    let listed = traces_long.list(Some(&image.digest.to_string()));
    let find = |id: &str| listed.iter().find(|s| s.id == id).unwrap().clone();
    assert!(find(&ready.id).complete);
    assert_eq!(find(&ready.id).container_id, "web-1");
    assert_eq!(find(&ready.id).entries, 1);
    assert!(
        !find(&other.id).complete,
        "another container's window stays open"
    );
    traces_long.finish_all().await;
    assert!(traces_long.list(None).iter().all(|s| s.complete));

    // Kept on disk: a new agent finds them; bad ids are refused.
    let reopened = Traces::open(state.path(), TraceOptions::default()).unwrap();
    assert_eq!(reopened.list(None).len(), 4);
    assert!(reopened.get("../../etc/passwd").is_err());
    assert!(reopened.get("0000000000000-none-0").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_traces_make_room_collected_ones_first() {
    let image = workload_image();
    let state = tempfile::tempdir().unwrap();
    let traces = Traces::open(
        state.path(),
        TraceOptions {
            max_kept: 2,
            ..TraceOptions::default()
        },
    )
    .unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let started = traces
            .record(TraceSubject {
                image_ref: IMAGE_REF.into(),
                index_digest: image.digest,
                index: Arc::clone(&image.index),
                container_id: format!("c{n}"),
            })
            .unwrap();
        traces.finish(&started.id).await.expect("written");
        ids.push(started.id);
        if n == 0 {
            // Collect the first one... then the second is the oldest uncollected.
            traces.get(&ids[0]).unwrap().unwrap();
        }
    }
    let kept: Vec<String> = traces.list(None).into_iter().map(|s| s.id).collect();
    assert_eq!(kept, vec![ids[1].clone(), ids[2].clone()]);
    let files = std::fs::read_dir(state.path()).unwrap().count();
    assert_eq!(files, 4, "two traces, two summaries");
}

// ---------------------------------------------------------------------------
// Plans from real traces, executed on a second node

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_traces_make_a_plan_that_warms_a_second_node() {
    if !fuse_available("three_traces_make_a_plan_that_warms_a_second_node") {
        return;
    }
    let image = workload_image();
    let node1 = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let state = tempfile::tempdir().unwrap();
    let traces = Traces::open(state.path(), TraceOptions::default()).unwrap();
    // "a" is read by all three starts, "b" by two, "c" and "d" by one, "e" by none.
    let recorded = vec![
        record_trace(&traces, &image, &node1.fetcher, &["a", "b"], "start-1").await,
        record_trace(&traces, &image, &node1.fetcher, &["c", "a"], "start-2").await,
        record_trace(&traces, &image, &node1.fetcher, &["a", "d", "b"], "start-3").await,
    ];

    let plan = Plan::merge(&recorded, None).expect("merge");
    let (a, b) = (image.chunks_of("a"), image.chunks_of("b"));
    let (c, d) = (image.chunks_of("c"), image.chunks_of("d"));
    let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
    assert_eq!(
        set(&plan.chunks[..a.len()]),
        set(&a),
        "in three traces: first"
    );
    assert_eq!(
        set(&plan.chunks[a.len()..a.len() + b.len()]),
        set(&b),
        "in two: next"
    );
    let ones = [c.clone(), d.clone()].concat();
    assert_eq!(
        set(&plan.chunks[a.len() + b.len()..]),
        set(&ones),
        "in one: last"
    );
    assert!(!plan.chunks.iter().any(|x| image.chunks_of("e").contains(x)));
    // The budget cuts the plan before the first chunk that does not fit.
    let budget = image.bytes_of(&a) + image.bytes_of(&b[..1]);
    let capped = Plan::merge(&recorded, Some(budget + 10)).expect("merge");
    assert_eq!(capped.chunks, plan.chunks[..a.len() + 1].to_vec());
    let encoded = plan.encode().unwrap();
    assert_eq!(Plan::decode(&encoded).unwrap(), plan);

    // Node 2: empty cache, its own registry counters. Execute the plan.
    let node2 = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let mut progress = node2.prefetch(&image, plan.clone());
    let done = final_state(&mut progress).await;
    assert_eq!(done.state, PrefetchState::Done, "{done:?}");
    assert_eq!(done.chunks_done, plan.chunks.len() as u64);
    assert_eq!(done.bytes_done, image.bytes_of(&plan.chunks));
    assert_eq!(done.bytes_total, done.bytes_done);
    assert!(
        node2.cached(&image, &plan.chunks).iter().all(|&c| c),
        "every plan chunk on disk"
    );
    assert!(
        node2
            .cached(&image, &image.chunks_of("e"))
            .iter()
            .all(|&c| !c)
    );
    let fetched_by_plan = node2.source.requests().len();

    // The same starts on node 2 fetch nothing.
    let (handle, dir) = mount(&image, &node2.fetcher, None);
    let mountpoint = dir.path().to_path_buf();
    let image = Arc::new(image);
    let for_reader = Arc::clone(&image);
    let reader_dir = mountpoint.clone();
    tokio::task::spawn_blocking(move || {
        run_workload(&for_reader, &reader_dir, &["a", "b", "c", "d"]);
    })
    .await
    .unwrap();
    assert_eq!(
        node2.source.requests().len(),
        fetched_by_plan,
        "no fetch after the plan"
    );

    // A read outside the plan fetches exactly that file's chunks.
    let for_reader = Arc::clone(&image);
    tokio::task::spawn_blocking(move || run_workload(&for_reader, &mountpoint, &["e"]))
        .await
        .unwrap();
    let e_ranges: Vec<Range<u64>> = image
        .chunks_of("e")
        .iter()
        .map(|&c| image.index.chunk(c).unwrap().compressed_range())
        .collect();
    for request in &node2.source.requests()[fetched_by_plan..] {
        assert!(
            e_ranges
                .iter()
                .any(|r| r.start >= request.start && r.end <= request.end)
                && e_ranges.first().unwrap().start <= request.start
                && request.end <= e_ranges.last().unwrap().end,
            "request {request:?} is not for file e"
        );
    }
    handle.unmount().unwrap();
    drop(dir);

    // Node 3 with the capped plan: a start fetches only what it reads outside the plan.
    let image = Arc::try_unwrap(image).ok().expect("sole owner");
    let node3 = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let mut progress = node3.prefetch(&image, capped.clone());
    assert_eq!(final_state(&mut progress).await.state, PrefetchState::Done);
    let before = node3.source.requests().len();
    let (handle, dir) = mount(&image, &node3.fetcher, None);
    let path = dir.path().to_path_buf();
    let image = Arc::new(image);
    let for_reader = Arc::clone(&image);
    tokio::task::spawn_blocking(move || run_workload(&for_reader, &path, &["a", "b"]))
        .await
        .unwrap();
    let allowed: Vec<Range<u64>> = b[1..]
        .iter()
        .map(|&c| image.index.chunk(c).unwrap().compressed_range())
        .collect();
    let after: Vec<Range<u64>> = node3.source.requests()[before..].to_vec();
    assert!(
        !after.is_empty(),
        "b's unplanned chunks are fetched on demand"
    );
    // Each request is for chunks of b outside the plan; past them it may carry
    // only the blob-order read-ahead of a miss (the unplanned chunks that follow,
    // never a planned one: they are cached, and the read-ahead stops there).
    let read_ahead = MountOptions::default().miss_readahead_bytes;
    for request in &after {
        assert!(
            allowed.iter().any(|r| r.start == request.start),
            "request {request:?} does not start at an unplanned chunk of b"
        );
        let covered: u64 = allowed
            .iter()
            .filter(|r| r.start >= request.start && r.end <= request.end)
            .map(|r| r.end - r.start)
            .sum();
        assert!(
            request.end - request.start - covered <= read_ahead,
            "request {request:?} fetched more than b's unplanned chunks and the read-ahead"
        );
        let planned = capped.chunks.iter().any(|&c| {
            let r = image.index.chunk(c).unwrap().compressed_range();
            r.start >= request.start && r.end <= request.end
        });
        assert!(!planned, "request {request:?} fetched a planned chunk");
    }
    handle.unmount().unwrap();
}

// ---------------------------------------------------------------------------
// The executor

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_can_be_cancelled_and_what_was_verified_stays() {
    let image = TestImage::build(&[("big", 40 * CHUNK)]);
    let node = TestNode::new(&image, 1 << 30, one_chunk_per_request(2));
    node.source.close_gate();
    let plan = image.plan(image.chunks_of("big"));
    let mut progress = node.prefetch(&image, plan.clone());
    // Let the first request through, then cancel while two are held.
    let first = image.index.chunk(plan.chunks[0]).unwrap().compressed_offset;
    node.source.release(first);
    eventually("the first chunk to be cached", || {
        node.cached(&image, &plan.chunks[..1])[0]
    })
    .await;
    eventually("two more requests held", || {
        node.source.requests().len() >= 3
    })
    .await;
    assert_eq!(node.prefetches.in_progress().len(), 1);
    assert!(node.prefetches.cancel(&image.digest));
    let last = final_state(&mut progress).await;
    assert_eq!(last.state, PrefetchState::Cancelled);
    assert!(node.prefetches.in_progress().is_empty());
    let mut done_plans = node.prefetches.done_plans();
    assert!(
        !done_plans.borrow().contains(&image.digest),
        "a cancelled plan is not done (the warm gate waits on this set)"
    );
    assert!(
        !node.prefetches.cancel(&image.digest),
        "nothing left to cancel"
    );

    // Requests already sent finish and cache their verified chunks; nothing else is asked for.
    node.source.open_gate();
    let sent = node.source.requests().len();
    eventually("the held requests to be answered", || {
        node.source.answered.load(Ordering::SeqCst) >= sent
    })
    .await;
    let cached = node
        .cached(&image, &plan.chunks)
        .iter()
        .filter(|&&c| c)
        .count();
    assert!(
        cached < plan.chunks.len(),
        "the plan stopped: {cached} cached"
    );
    assert_eq!(
        node.source.requests().len(),
        sent,
        "no request after the cancellation"
    );

    // A new request for the same plan starts over and finishes.
    let mut again = node.prefetch(&image, plan.clone());
    assert_eq!(final_state(&mut again).await.state, PrefetchState::Done);
    assert!(node.cached(&image, &plan.chunks).iter().all(|&c| c));
    tokio::time::timeout(
        Duration::from_secs(20),
        done_plans.wait_for(|done| done.contains(&image.digest)),
    )
    .await
    .expect("the finished plan is listed as done")
    .expect("executor alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_ahead_of_a_running_prefetch() {
    let image = TestImage::build(&[("model", 24 * CHUNK), ("app", CHUNK)]);
    let node = TestNode::new(&image, 1 << 30, one_chunk_per_request(2));
    node.source.close_gate();
    let plan = image.plan(image.chunks_of("model"));
    let mut progress = node.prefetch(&image, plan.clone());
    eventually("the prefetch to fill its two request slots", || {
        node.source.requests().len() == 2
    })
    .await;

    // A container reads the last chunk of the plan, and one outside it.
    let wanted: Vec<_> = [*plan.chunks.last().unwrap(), image.chunks_of("app")[0]]
        .iter()
        .map(|&c| image.index.chunk(c).unwrap())
        .collect();
    let reader = {
        let fetcher = node.fetcher.clone();
        let wanted = wanted.clone();
        tokio::spawn(async move {
            fetcher
                .fetch_chunks(&wanted, stoker_fetch::Priority::OnDemand)
                .await
                .map(|chunks| chunks.len())
        })
    };
    // Its requests (one per chunk here) reach the registry while the prefetch holds
    // every slot and has 22 chunks still queued.
    eventually("the read's requests", || node.source.requests().len() == 4).await;
    let mut read_requests: Vec<Range<u64>> = node.source.requests()[2..].to_vec();
    read_requests.sort_by_key(|r| r.start);
    let mut wanted_ranges: Vec<Range<u64>> = wanted.iter().map(|c| c.compressed_range()).collect();
    wanted_ranges.sort_by_key(|r| r.start);
    assert_eq!(read_requests, wanted_ranges);
    for request in &read_requests {
        node.source.release(request.start);
    }
    let got = tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.unwrap(),
        2,
        "the read is served while the prefetch waits"
    );
    assert!(!progress.borrow().state.is_final());
    assert_eq!(
        progress.borrow().chunks_done,
        0,
        "no prefetch request finished before the read"
    );

    node.source.open_gate();
    let done = final_state(&mut progress).await;
    assert_eq!(done.state, PrefetchState::Done);
    assert!(node.cached(&image, &plan.chunks).iter().all(|&c| c));
    // The chunk the read fetched was not fetched again for the plan.
    let last = wanted[0].compressed_range();
    let times = node
        .source
        .requests()
        .iter()
        .filter(|r| r.start <= last.start && last.end <= r.end)
        .count();
    assert_eq!(times, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_failing_midway_fails_the_prefetch_and_caches_nothing_unverified() {
    let image = TestImage::build(&[("weights", 12 * CHUNK)]);
    let plan = image.plan(image.chunks_of("weights"));

    // The registry answers four requests, then fails.
    let node = TestNode::new(&image, 1 << 30, one_chunk_per_request(1));
    node.source.fail_from.store(4, Ordering::SeqCst);
    let mut progress = node.prefetch(&image, plan.clone());
    let failed = final_state(&mut progress).await;
    assert_eq!(failed.state, PrefetchState::Failed);
    let error = failed.error.unwrap();
    assert!(error.contains("registry answered 500"), "{error}");
    assert_eq!(failed.chunks_done, 4);
    assert_eq!(failed.chunks_total, 12);
    let cached = node.cached(&image, &plan.chunks);
    assert_eq!(cached, [vec![true; 4], vec![false; 8]].concat());

    // The registry sends corrupt bytes for the third chunk (and its retry).
    let node = TestNode::new(&image, 1 << 30, one_chunk_per_request(1));
    let bad = image.index.chunk(plan.chunks[2]).unwrap();
    node.source
        .tamper
        .lock()
        .unwrap()
        .push(bad.compressed_offset + 5);
    let mut progress = node.prefetch(&image, plan.clone());
    let failed = final_state(&mut progress).await;
    assert_eq!(failed.state, PrefetchState::Failed);
    assert!(
        failed.error.as_deref().unwrap().contains("verification"),
        "{failed:?}"
    );
    assert!(
        !node.cache().contains(&bad.digest),
        "a chunk that failed verification was cached"
    );
    assert_eq!(failed.chunks_done, 2);
    assert!(node.fetcher.stats().verification_failures >= 2);
    // Everything the cache holds is right.
    for (i, &chunk) in plan.chunks.iter().enumerate() {
        let location = image.index.chunk(chunk).unwrap();
        if let Some(cached) = node.cache().get(&location.digest) {
            let start = i * CHUNK;
            assert_eq!(
                cached.read_all().unwrap(),
                image.content("weights")[start..start + CHUNK]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_are_refused_with_a_reason() {
    let image = TestImage::build(&[("f", 8 * CHUNK)]);
    let node = TestNode::new(&image, (4 * CHUNK) as u64, FetchConfig::default());
    let other = Plan {
        index_digest: Digest::of(b"another index"),
        chunks: vec![0],
    };
    let refused = node.prefetches.start(PrefetchRequest {
        image_ref: IMAGE_REF.into(),
        index_digest: image.digest,
        plan: other,
        background_rest: false,
        prepare_passthrough: false,
    });
    assert!(matches!(
        refused,
        Err(stoker_agent::AgentError::InvalidArgument(_))
    ));

    let mut beyond = node.prefetch(&image, image.plan(vec![0, 999]));
    let failed = final_state(&mut beyond).await;
    assert_eq!(failed.state, PrefetchState::Failed);
    assert!(failed.error.unwrap().contains("chunk 999"));

    // Larger than the cache: refused before anything is fetched.
    let mut too_big = node.prefetch(&image, image.plan(image.chunks_of("f")));
    let failed = final_state(&mut too_big).await;
    assert_eq!(failed.state, PrefetchState::Failed);
    assert!(failed.error.unwrap().contains("cache holds at most"));
    assert!(node.source.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_the_image_follows_the_plan_when_asked() {
    let image = TestImage::build(&[("hot", 3 * CHUNK), ("cold", 6 * CHUNK)]);
    let node = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let plan = image.plan(image.chunks_of("hot"));
    let mut progress = node
        .prefetches
        .start(PrefetchRequest {
            image_ref: IMAGE_REF.into(),
            index_digest: image.digest,
            plan,
            background_rest: true,
            prepare_passthrough: false,
        })
        .unwrap();
    let done = final_state(&mut progress).await;
    assert_eq!((done.state, done.chunks_done), (PrefetchState::Done, 3));
    eventually("the background fetch to finish", || {
        node.prefetches.in_progress().is_empty()
    })
    .await;
    eventually("every chunk of the image cached", || {
        node.cached(&image, &image.chunks_of("cold"))
            .iter()
            .all(|&c| c)
    })
    .await;
}

// ---------------------------------------------------------------------------
// The gRPC API on its unix socket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_api_streams_progress_and_serves_traces() {
    use std::os::unix::fs::PermissionsExt;
    use stoker_api::agent::agent_client::AgentClient;
    use stoker_api::agent::{
        ContainerReadyRequest, GetTraceRequest, ListTracesRequest, PrefetchRequest as Wire,
        StatusRequest,
    };

    let image = TestImage::build(&[("x", 6 * CHUNK), ("y", 2 * CHUNK)]);
    let node = TestNode::new(&image, 1 << 30, FetchConfig::default());
    let state = tempfile::tempdir().unwrap();
    let traces =
        Arc::new(Traces::open(&state.path().join("traces"), TraceOptions::default()).unwrap());
    let service = stoker_agent::api_server::AgentService::new(
        Arc::clone(&traces),
        Arc::clone(&node.prefetches),
        None,
    );
    let socket = state.path().join("run/agent.sock");
    let listener = stoker_agent::server::bind_unix_socket(&socket).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(stoker_agent::api_server::serve_unix(
        listener,
        service,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = unix_channel(&socket).await;
    let mut client = AgentClient::new(channel);

    // A trace recorded for container "ctr", closed by ContainerReady.
    let started = traces
        .record(TraceSubject {
            image_ref: IMAGE_REF.into(),
            index_digest: image.digest,
            index: Arc::clone(&image.index),
            container_id: "ctr".into(),
        })
        .unwrap();
    let y = image.index.resolve(b"y").unwrap();
    for (i, chunk) in image.chunks_of("y").into_iter().enumerate() {
        started
            .events
            .send(ChunkAccess {
                chunk,
                inode: y,
                file_offset: (i * CHUNK) as u64,
                at: std::time::Instant::now(),
            })
            .unwrap();
    }
    let ready = client
        .container_ready(ContainerReadyRequest {
            container_id: "ctr".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.trace_closed);
    let listed = client
        .list_traces(ListTracesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .traces;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].complete && listed[0].entries == 2);
    assert_eq!(listed[0].container_id, "ctr");
    let trace = client
        .get_trace(GetTraceRequest {
            trace_id: listed[0].trace_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let entries: Vec<_> = trace
        .entries
        .iter()
        .map(|e| {
            (
                e.chunk_index,
                e.path.as_str(),
                e.file_offset,
                e.chunk_length,
                e.chunk_digest.clone(),
            )
        })
        .collect();
    let want: Vec<_> = image
        .chunks_of("y")
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let loc = image.index.chunk(c).unwrap();
            (
                c,
                "/y",
                (i * CHUNK) as u64,
                loc.uncompressed_len,
                loc.digest.to_string(),
            )
        })
        .collect();
    assert_eq!(entries, want);
    let missing = client
        .get_trace(GetTraceRequest {
            trace_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Prefetch through the API: progress until DONE.
    let plan = image.plan(image.chunks_of("x"));
    let request = |learning_complete| Wire {
        image_ref: IMAGE_REF.into(),
        index_digest: image.digest.to_string(),
        plan: plan.encode().unwrap(),
        background_rest: false,
        learning_complete,
    };
    let mut stream = client.prefetch(request(false)).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        messages.push(message);
    }
    let last = messages.last().unwrap();
    assert_eq!(last.state, stoker_api::agent::PrefetchState::Done as i32);
    assert_eq!((last.chunks_done, last.chunks_total), (6, 6));
    assert_eq!(last.bytes_done, image.bytes_of(&plan.chunks));
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].chunks_done <= w[1].chunks_done)
    );

    assert!(
        traces.learned_plan(&image.digest).is_none(),
        "still learning: the image's starts are traced"
    );
    // The controller has learned the image: its starts are no longer traced,
    // and the agent keeps the plan to read its files into the page cache.
    let mut stream = client.prefetch(request(true)).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(
        traces.learned_plan(&image.digest).as_deref(),
        Some(&plan.chunks[..])
    );

    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.cache_used_bytes >= image.bytes_of(&plan.chunks));
    assert_eq!(status.cache_limit_bytes, 1 << 30);
    assert!(status.prefetches.is_empty());

    let bad = client
        .prefetch(Wire {
            image_ref: IMAGE_REF.into(),
            index_digest: image.digest.to_string(),
            plan: b"not a plan".to_vec(),
            background_rest: false,
            learning_complete: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://agent.local")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the unix socket")
}

// ---------------------------------------------------------------------------
// A real registry: the index is loaded from the image's artifact

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_warms_an_empty_cache_from_a_real_registry() {
    for tool in ["docker-registry", "skopeo"] {
        if !stoker_testkit::require_tool("a_plan_warms_an_empty_cache_from_a_real_registry", tool) {
            return;
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    use stoker_testkit::image::{StandardImageSizes, push_layout, standard_test_image_with};
    let registry = stoker_testkit::registry::TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .unwrap();
    push_layout(&layout, "v1", &registry.host(), "agent/prefetch:v1").unwrap();
    let reference = format!("{}/agent/prefetch:v1", registry.host());
    let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..stoker_registry::RegistryConfig::default()
    })
    .unwrap();
    let (store, selector) =
        stoker_convert::ImageStore::registry(client.clone(), &reference).unwrap();
    let reports = stoker_convert::convert(
        &store,
        &selector,
        &stoker_convert::ConvertOptions::default(),
    )
    .await
    .expect("convert");
    let index_digest = Digest::parse(&reports[0].index_digest).unwrap();

    // The plan: every chunk of the image, from a node that does not have the index.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).unwrap();
    let images = Arc::new(NodeImages::new(
        client,
        cache.clone(),
        FetchConfig::default(),
    ));
    let prefetches = Prefetches::new(Arc::clone(&images), PrefetchOptions::default());
    assert!(images.index(&index_digest).is_none());
    let index = images
        .load_index(&reference, &index_digest)
        .await
        .expect("index from the registry");
    let plan = Plan {
        index_digest,
        chunks: (0..index.chunk_count()).collect(),
    };
    registry.clear_requests();
    let request = PrefetchRequest {
        image_ref: reference.clone(),
        index_digest,
        plan: plan.clone(),
        background_rest: false,
        prepare_passthrough: false,
    };
    let mut progress = prefetches.start(request.clone()).unwrap();
    let done = final_state(&mut progress).await;
    assert_eq!(done.state, PrefetchState::Done, "{done:?}");
    assert_eq!(done.chunks_total, u64::from(index.chunk_count()));
    for location in index.chunks() {
        assert!(
            cache.contains(&location.digest),
            "chunk {} not cached",
            location.digest
        );
    }
    let (logged, held) = registry.wait_for_requests(DEADLINE, |requests| {
        requests.iter().any(|r| r.is_blob_get())
    });
    assert!(held, "the chunks came from the registry: {logged:?}");

    // A second run of the same plan finds everything on disk: no request.
    let fetcher = images.fetcher_for(&reference).unwrap();
    let requests_before = fetcher.stats().requests;
    let mut again = prefetches.start(request).unwrap();
    assert_eq!(final_state(&mut again).await.state, PrefetchState::Done);
    assert_eq!(fetcher.stats().requests, requests_before);

    // An index that the image does not have is a clear error.
    let wrong = images
        .load_index(&reference, &Digest::of(b"no such index"))
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("no Stoker artifact with index"),
        "{wrong}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_of_a_learned_image_completes_and_assembles_its_files_so_their_first_open_passes_through()
 {
    let test = "a_plan_of_a_learned_image_completes_and_assembles_its_files_so_their_first_open_passes_through";
    if !fuse_available(test) {
        return;
    }
    let image = workload_image();
    let (a, b, d, e) = (
        image.chunks_of("a"),
        image.chunks_of("b"),
        image.chunks_of("d"),
        image.chunks_of("e"),
    );
    // Earlier starts read the head of `a`, all of `b`, `d` and the head of `e`.
    let mut planned = vec![a[0], a[1]];
    planned.extend(&b);
    planned.extend(&d);
    planned.push(e[0]);
    let plan = image.plan(planned.clone());
    // Room to complete `a` (the first in plan order), not also `e`.
    let a_rest = image.bytes_of(&a[2..]);
    let mut assembly = None;
    let node = TestNode::with_options(&image, 1 << 30, one_chunk_per_request(4), |cache_dir| {
        assembly = Assembly::new(cache_dir.join("assembled"), 1 << 30);
        PrefetchOptions {
            assembly: assembly.clone(),
            complete_files_max_bytes: a_rest,
            ..PrefetchOptions::default()
        }
    });
    let assembly = assembly.expect("assembly on");
    let mut progress = node
        .prefetches
        .start(PrefetchRequest {
            image_ref: IMAGE_REF.into(),
            index_digest: image.digest,
            plan,
            background_rest: false,
            prepare_passthrough: true,
        })
        .expect("prefetch accepted");
    let done = final_state(&mut progress).await;
    assert_eq!(done.state, PrefetchState::Done, "{done:?}");
    // `a` was completed beyond the plan; `e` was not (over the byte bound).
    assert!(
        node.cached(&image, &a).iter().all(|c| *c),
        "all of a cached"
    );
    assert_eq!(node.cached(&image, &e[1..]), vec![false; e.len() - 1]);

    // The image's mount, with the node's assembled files: `a` and `b` pass
    // through from their first open, `e` is read through the filesystem.
    let dir = tempfile::tempdir().expect("mount point");
    let handle = stoker_lazyfs::mount(
        Arc::clone(&image.index),
        node.fetcher.clone(),
        dir.path(),
        MountOptions {
            assembly: Some(assembly.options_for(&image.digest)),
            ..MountOptions::default()
        },
    )
    .expect("mount");
    if !handle.passthrough_enabled() {
        eprintln!("SKIPPED: {test}: the kernel does not offer FUSE passthrough");
        return;
    }
    for name in ["a", "b"] {
        let before = handle.counters();
        run_workload(&image, dir.path(), &[name]);
        let after = handle.counters();
        assert_eq!(
            after.passthrough_opens,
            before.passthrough_opens + 1,
            "{name}: its first open passes through"
        );
        assert_eq!(after.reads, before.reads, "{name}: no FUSE read");
    }
    let before = handle.counters();
    run_workload(&image, dir.path(), &["e"]);
    let after = handle.counters();
    assert_eq!(
        after.passthrough_opens, before.passthrough_opens,
        "e: not whole"
    );
    assert!(
        after.reads > before.reads,
        "e is read through the filesystem"
    );
    handle.unmount().expect("unmount");
}
