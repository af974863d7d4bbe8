//! Bounded memory of the real agent at scale (issue 8): an image of 1,000,000 files
//! and a 10 GB sparse file, pulled through CRI into a containerd whose snapshotter is
//! the real `stoker-agent` binary, is mounted by the agent and walked in full through
//! its lazy FUSE mount (every entry listed and stat'ed, a sample of files read, the
//! sparse file read at a few offsets). The agent's worker process, which serves the
//! mount, must stay within its decoded index plus [`AGENT_OVERHEAD_BOUND`] of resident
//! memory: the bound docs/RELIABILITY.md documents ("Bounded resources").
//!
//! No tar layer could hold a million files and 10 GB quickly, so the image's Stoker
//! index is built directly (1,000 directories × 1,000 small files sharing one chunk)
//! and published with `stoker_convert::publish_prebuilt` as the artifact of a tiny
//! real OCI image: the agent finds it through the referrers API exactly as it finds
//! a converted image's.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use common::{
    AgentProcess, DEADLINE, POLL, UnmountOnDrop, pattern, plain_http_client, push, runtime,
};
use stoker_format::{
    BlobInfo, ChunkId, ChunkRecord, ChunkTable, Chunking, Digest, EncodedIndex, FilePiece, Meta,
    Node, NodeId, NodeKind, Tree,
};
use stoker_testkit::containerd::TestContainerd;
use stoker_testkit::image::{Entry, ImageBuilder};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

/// What the agent's worker may hold in resident memory beyond the decoded index of
/// the image it serves: the process itself (tokio runtimes, the gRPC servers, the
/// redb snapshot store, metrics, the chunk cache's table, mapped code) and the mount
/// (FUSE threads and buffers, the fetcher, open files). The same allowance as a
/// mount alone gets in `lazyfs/tests/scale.rs`; this test measured 42–48 MiB over the
/// index (debug build), peak included. Documented in docs/RELIABILITY.md, "Bounded resources".
const AGENT_OVERHEAD_BOUND: u64 = 64 << 20;

const DIRS: usize = 1_000;
const FILES_PER_DIR: usize = 1_000;
const SPARSE_SIZE: u64 = 10_000_000_000;
/// The content of every small file.
const SMALL: &[u8] = b"one of a million small files, all sharing this one chunk\n";

fn meta(permissions: u32) -> Meta {
    Meta {
        permissions,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    }
}

/// The data at the sparse file's non-hole offsets.
fn sparse_data() -> [(u64, Vec<u8>); 3] {
    [
        (0, pattern(2, 4096)),
        (SPARSE_SIZE / 2, pattern(3, 4096)),
        (SPARSE_SIZE - 4096, pattern(4, 4096)),
    ]
}

/// The index of the scale image and its one data blob (one zstd frame per chunk).
fn scale_index() -> (EncodedIndex, Vec<u8>) {
    let mut blob = Vec::new();
    let mut table = ChunkTable::default();
    let mut chunk = |bytes: &[u8]| -> ChunkId {
        let compressed = zstd::bulk::compress(bytes, 3).expect("zstd");
        let id = table.insert(ChunkRecord {
            digest: Digest::of(bytes),
            blob: 0,
            compressed_offset: blob.len() as u64,
            compressed_len: compressed.len() as u32,
            uncompressed_len: bytes.len() as u32,
        });
        blob.extend_from_slice(&compressed);
        id
    };
    let small = chunk(SMALL);
    let sparse_pieces: Vec<FilePiece> = sparse_data()
        .iter()
        .map(|(offset, bytes)| FilePiece {
            offset: *offset,
            chunk: chunk(bytes),
        })
        .collect();

    let mut tree = Tree::new(meta(0o755));
    let add = |tree: &mut Tree, dir: NodeId, name: &str, kind: NodeKind, permissions| {
        let node = tree.add(Node {
            kind,
            meta: meta(permissions),
        });
        tree.link(dir, name.as_bytes(), node);
        node
    };
    for d in 0..DIRS {
        let dir = add(
            &mut tree,
            Tree::ROOT,
            &format!("d{d:04}"),
            NodeKind::Dir(BTreeMap::new()),
            0o755,
        );
        for f in 0..FILES_PER_DIR {
            let kind = NodeKind::File {
                size: SMALL.len() as u64,
                pieces: vec![FilePiece {
                    offset: 0,
                    chunk: small,
                }],
            };
            add(&mut tree, dir, &format!("f{f:04}"), kind, 0o644);
        }
    }
    let kind = NodeKind::File {
        size: SPARSE_SIZE,
        pieces: sparse_pieces,
    };
    add(&mut tree, Tree::ROOT, "sparse.bin", kind, 0o644);

    table.add_blob(BlobInfo {
        digest: Digest::of(&blob),
        size: blob.len() as u64,
    });
    let index = tree
        .encode(&table, Chunking::Fixed { size: 1 << 20 })
        .expect("encode the index");
    (index, blob)
}

/// Resident memory of `pid` from /proc/PID/status: `VmRSS`, `VmHWM` (its peak),
/// `RssAnon` and `RssFile`, in bytes.
#[derive(Clone, Copy, Debug)]
struct Resident {
    rss: u64,
    peak: u64,
    anon: u64,
    file: u64,
}

fn resident(pid: u32) -> Resident {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb << 10)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    Resident {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl std::fmt::Display for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} (anon {}, file {}), peak {}",
            mib(self.rss),
            mib(self.anon),
            mib(self.file),
            mib(self.peak)
        )
    }
}

/// The largest resident mappings of `pid` (from /proc/PID/smaps), for a failure
/// message: what the memory is.
fn largest_mappings(pid: u32, count: usize) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut mappings: Vec<(u64, String)> = Vec::new();
    let mut header = String::new();
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Rss:") {
            let kb = kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
            mappings.push((kb << 10, header.clone()));
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            header = line.to_string();
        }
    }
    mappings.sort_by_key(|(rss, _)| std::cmp::Reverse(*rss));
    mappings
        .iter()
        .take(count)
        .map(|(rss, header)| format!("  {:>10} {header}", mib(*rss)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Mount points of type `fuse.stoker` at or below `dir`, from /proc/self/mountinfo.
fn lazy_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mountpoint = fields.split(' ').nth(4)?;
            let fstype = rest.split(' ').next()?;
            (fstype == "fuse.stoker" && mountpoint.starts_with(&prefix))
                .then(|| PathBuf::from(mountpoint))
        })
        .collect()
}

/// Lists and stats every entry depth first, reads a sample of the small files and
/// the sparse file at its data and in a hole; returns the number of entries.
fn walk_and_read(root: &Path) -> usize {
    let mut entries = 0usize;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let listing = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"));
        for entry in listing {
            let path = entry.expect("directory entry").path();
            let metadata =
                std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {path:?}: {e}"));
            entries += 1;
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    for d in (0..DIRS).step_by(97) {
        let path = root.join(format!("d{d:04}/f{:04}", (d * 7) % FILES_PER_DIR));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        assert_eq!(bytes, SMALL, "{path:?}");
    }
    let sparse = root.join("sparse.bin");
    assert_eq!(std::fs::metadata(&sparse).expect("stat").len(), SPARSE_SIZE);
    let mut file = std::fs::File::open(&sparse).expect("open the sparse file");
    let mut buffer = vec![0u8; 4096];
    let hole = (SPARSE_SIZE / 4, vec![0u8; 4096]);
    for (offset, expected) in sparse_data().into_iter().chain([hole]) {
        file.seek(SeekFrom::Start(offset)).expect("seek");
        file.read_exact(&mut buffer).expect("read the sparse file");
        assert!(buffer == expected, "wrong bytes at offset {offset}");
    }
    entries
}

#[test]
fn the_agent_serves_a_million_files_and_a_10_gb_sparse_file_in_bounded_memory() {
    let test = "the_agent_serves_a_million_files_and_a_10_gb_sparse_file_in_bounded_memory";
    if !common::lazy_containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let rt = runtime();

    // A tiny real image, and the prebuilt index published as its Stoker artifact.
    let subject = ImageBuilder::new().layer(vec![Entry::file(
        "README",
        "the layers of this image are never read: its Stoker artifact has the files\n",
    )]);
    let (image, _) = push(&registry, dir.path(), &subject, "test/scale");
    let (index, blob) = scale_index();
    let report = rt
        .block_on(async {
            let (store, selector) =
                stoker_convert::ImageStore::registry(plain_http_client(), &image)?;
            stoker_convert::publish_prebuilt(&store, &selector, index, &[blob]).await
        })
        .expect("publish the prebuilt index");
    let index_bytes = report.index_raw_bytes;
    eprintln!(
        "index: {} inodes, {} decoded ({} compressed)",
        report.summary.inodes,
        mib(index_bytes),
        mib(report.index_bytes)
    );

    // The real agent, and containerd with it as the `stoker` proxy snapshotter.
    let state = dir.path().join("agent");
    let agent = AgentProcess::start(&state, &dir.path().join("agent.sock"));
    let worker = agent.worker_pid().expect("the agent's worker process");
    let idle = resident(worker);
    let containerd = TestContainerd::start(&agent.socket).expect("containerd");
    containerd
        .allow_plain_http(&registry.host())
        .expect("hosts.toml");

    let pull_started = std::time::Instant::now();
    rt.block_on(containerd.cri_pull_image(&image))
        .unwrap_or_else(|e| panic!("CRI pull: {e}\nagent log:\n{}", agent.log_text()));
    assert!(
        wait_until(DEADLINE, POLL, || lazy_mounts_under(&state).len() == 1),
        "the agent did not mount the image lazily: {:?}\nagent log:\n{}",
        lazy_mounts_under(&state),
        agent.log_text()
    );
    assert_eq!(
        agent.worker_pid(),
        Some(worker),
        "the worker that mounted is the one measured"
    );
    let mounted = resident(worker);
    let mountpoint = lazy_mounts_under(&state).remove(0);
    let pulled_in = pull_started.elapsed();

    let walk_started = std::time::Instant::now();
    let entries = walk_and_read(&mountpoint);
    let walked_in = walk_started.elapsed();
    let walked = resident(worker);
    assert_eq!(entries, DIRS + DIRS * FILES_PER_DIR + 1, "entries walked");

    let bound = index_bytes + AGENT_OVERHEAD_BOUND;
    eprintln!(
        "agent worker {worker}: idle {idle}\n  index mounted: {mounted}\n  \
         after walking {entries} entries: {walked}\n  \
         bound: the {} index + {} = {}\n\
         CRI pull to lazy mount {:.1} s, walk {:.1} s",
        mib(index_bytes),
        mib(AGENT_OVERHEAD_BOUND),
        mib(bound),
        pulled_in.as_secs_f64(),
        walked_in.as_secs_f64()
    );
    assert!(
        walked.rss <= bound,
        "the agent worker holds {} resident after walking {entries} entries; bound {} \
         (the {} index + {}); its largest mappings:\n{}",
        mib(walked.rss),
        mib(bound),
        mib(index_bytes),
        mib(AGENT_OVERHEAD_BOUND),
        largest_mappings(worker, 12)
    );
    // VmHWM: the bound held all along, also while the index was being decoded.
    assert!(
        walked.peak <= bound,
        "the agent worker's resident memory peaked at {}; bound {}; its largest mappings \
         now:\n{}",
        mib(walked.peak),
        mib(bound),
        largest_mappings(worker, 12)
    );
    drop(containerd);
    drop(agent);
}
