//! Section `fuse`: the lazy filesystem (issue 3), every number a ratio against
//! the same files read from a local extracted directory.
//!
//! Builds an image of N small files (30,000, or 3,000 with `--quick`; 0.5–8 KiB, in
//! directories of 100) and one large file (512 MiB, or 64 MiB; 1 MiB chunks), writes it extracted to
//! a local directory, pushes its index and data blob to a real `docker-registry`
//! on loopback, and measures:
//!
//! - fetching and decoding the index, mounting, and the first byte of a file (cold);
//! - cold sequential read of the large file (empty cache, registry on loopback,
//!   page cache dropped on both sides);
//! - warm reads (every chunk in the local cache) through FUSE and through
//!   passthrough, of the large file and of every small file;
//! - `find` + `stat` of every entry.
//!
//! ## Fair comparisons
//!
//! Every warm and metadata ratio compares the two sides in the same cache state,
//! measured one right after the other (so a busy moment of the shared machine
//! hits both):
//!
//! - **from disk**: the page cache dropped on both sides; native reads its
//!   extracted files from the disk, the mount reads its chunk files from the
//!   same disk;
//! - **in memory**: both read before, so native's file and the mount's file are
//!   in the page cache (the mount keeps its pages across opens:
//!   `FOPEN_KEEP_CACHE`), or, with passthrough, the backing file is;
//! - **walks**: the first walk of a fresh mount against native with the kernel's
//!   dentries and inodes dropped (both sides build them from metadata in
//!   memory: the index, ext4's blocks in the buffer cache); the second walk
//!   against native's second walk.
//!
//! An earlier version compared a fresh mount, whose page cache and dentries were
//! empty, against native files already in the page cache and dcache: the mount
//! had to copy every byte through this process while native copied it once from
//! memory, which no FUSE file system can match, and the ratio said nothing about
//! Stoker. Those two comparisons remain as rows without a goal (the first read of
//! a fresh mount with its chunk files in memory; a fresh mount's walk against
//! native in the kernel's caches), so the cost of the FUSE round trip stays visible.
//!
//! ## Robust numbers on a shared machine
//!
//! Every comparison is a series of pairs: a Stoker sample and a native sample
//! taken back to back, the side that goes first alternating from pair to pair
//! (so a busy moment, or a drift of the machine's state, hits both sides
//! alike). A row reports the median of each side and the median of the pairs'
//! ratios, so one noisy pair does not decide a ratio. Cold rows take 3 pairs
//! (each on a fresh mount and a fresh cache), warm reads 9 from disk and 15
//! from memory (over 3 mounts), walks 5 (each on a fresh mount); `--quick`
//! takes one round of each.
//!
//! Needs root (mounts, `/proc/sys/vm/drop_caches`) and `docker-registry`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stoker_cache::ChunkCache;
use stoker_fetch::{BlobSource, FetchConfig, Fetcher, RegistrySource};
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, FilePiece, Index, Meta, Node, NodeKind,
    Tree,
};
use stoker_lazyfs::{AssemblyOptions, MountHandle, MountOptions};
use stoker_registry::{RegistryClient, RegistryConfig, parse_reference};

use crate::images::incompressible;
use crate::report::Section;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Pairs of reads from memory per mount (a 512 MiB file in well under 100 ms).
const MEMORY_REPEATS: usize = 5;

/// Pairs of reads of the large file from disk per mount.
const DISK_REPEATS: usize = 3;

struct Args {
    files: usize,
    large_mib: usize,
    /// Cold rounds (fresh cache each) and warm mounts.
    rounds: usize,
    /// Walks, each on a fresh mount.
    walks: usize,
}

impl Args {
    fn new(quick: bool) -> Args {
        if quick {
            Args {
                files: 3_000,
                large_mib: 64,
                rounds: 1,
                walks: 1,
            }
        } else {
            Args {
                files: 30_000,
                large_mib: 512,
                rounds: 3,
                walks: 5,
            }
        }
    }
}

struct Image {
    index_blob: Bytes,
    index_digest: Digest,
    data_blob: Bytes,
    small_files: Vec<PathBuf>,
    large_file: PathBuf,
}

/// Builds the image and writes the same tree extracted under `native`.
fn build_image(args: &Args, native: &Path) -> Result<Image, Error> {
    let meta = |permissions| Meta {
        permissions,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    let mut tree = Tree::default();
    let mut table = ChunkTable::default();
    table.add_blob(BlobInfo {
        digest: Digest::default(),
        size: 0,
    });
    let mut blob = Vec::new();
    let mut add_chunk = |table: &mut ChunkTable, bytes: &[u8]| -> Result<u32, Error> {
        let compressed = zstd::bulk::compress(bytes, 1)?;
        let id = table.insert(ChunkRecord {
            digest: Digest::of(bytes),
            blob: 0,
            compressed_offset: blob.len() as u64,
            compressed_len: compressed.len() as u32,
            uncompressed_len: bytes.len() as u32,
        });
        if id as usize + 1 == table.chunks.len() {
            blob.extend_from_slice(&compressed);
        }
        Ok(id)
    };

    let mut small_files = Vec::new();
    let mut dir = 0;
    for i in 0..args.files {
        if i % 100 == 0 {
            let name = format!("d{:04}", i / 100);
            std::fs::create_dir_all(native.join("files").join(&name))?;
            dir = tree.add(Node {
                kind: NodeKind::Dir(BTreeMap::new()),
                meta: meta(0o755),
            });
            let files = match tree.lookup(Tree::ROOT, b"files") {
                Some(files) => files,
                None => {
                    let files = tree.add(Node {
                        kind: NodeKind::Dir(BTreeMap::new()),
                        meta: meta(0o755),
                    });
                    tree.link(Tree::ROOT, b"files", files);
                    files
                }
            };
            tree.link(files, name.as_bytes(), dir);
        }
        let content = incompressible(i as u64, 512 + (i * 7919) % 7680);
        let chunk = add_chunk(&mut table, &content)?;
        let name = format!("f{i:05}.py");
        let node = tree.add(Node {
            kind: NodeKind::File {
                size: content.len() as u64,
                pieces: vec![FilePiece { offset: 0, chunk }],
            },
            meta: meta(0o644),
        });
        tree.link(dir, name.as_bytes(), node);
        let relative = PathBuf::from(format!("files/d{:04}/{name}", i / 100));
        std::fs::write(native.join(&relative), &content)?;
        small_files.push(relative);
    }

    let mut large = Vec::with_capacity(args.large_mib << 20);
    let mut pieces = Vec::new();
    for i in 0..args.large_mib {
        let part = incompressible(1_000_000 + i as u64, 1 << 20);
        pieces.push(FilePiece {
            offset: (i as u64) << 20,
            chunk: add_chunk(&mut table, &part)?,
        });
        large.extend_from_slice(&part);
    }
    let node = tree.add(Node {
        kind: NodeKind::File {
            size: large.len() as u64,
            pieces,
        },
        meta: meta(0o644),
    });
    tree.link(Tree::ROOT, b"large.bin", node);
    std::fs::write(native.join("large.bin"), &large)?;

    let data_blob = Bytes::from(blob);
    table.blobs[0] = BlobInfo {
        digest: Digest::of(&data_blob),
        size: data_blob.len() as u64,
    };
    let encoded = tree.encode(&table, Chunking::Fixed { size: 1 << 20 })?;
    Ok(Image {
        index_blob: Bytes::from(encoded.compressed),
        index_digest: encoded.digest,
        data_blob,
        small_files,
        large_file: PathBuf::from("large.bin"),
    })
}

/// Empties the page cache (`drop_caches` 1): file data, every file system.
fn drop_page_cache() -> Result<(), Error> {
    drop_caches("1")
}

/// Drops the kernel's dentries and inodes (`drop_caches` 2), not file data.
fn drop_dentries_and_inodes() -> Result<(), Error> {
    drop_caches("2")
}

fn drop_caches(what: &str) -> Result<(), Error> {
    let synced = std::process::Command::new("sync").status()?;
    if !synced.success() {
        return Err(format!("sync failed: {synced}").into());
    }
    std::fs::write("/proc/sys/vm/drop_caches", what)?;
    Ok(())
}

/// Reads a file sequentially with 1 MiB reads; returns (bytes, seconds).
fn read_file(path: &Path) -> Result<(u64, f64), Error> {
    let started = Instant::now();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

fn read_files(root: &Path, files: &[PathBuf]) -> Result<f64, Error> {
    let started = Instant::now();
    let mut buf = Vec::new();
    for file in files {
        buf.clear();
        File::open(root.join(file))?.read_to_end(&mut buf)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `find` + `stat`: every entry listed and stat'ed. Returns (entries, seconds).
fn walk(root: &Path) -> Result<(usize, f64), Error> {
    let started = Instant::now();
    let mut pending = vec![root.to_path_buf()];
    let mut entries = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            entries += 1;
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok((entries, started.elapsed().as_secs_f64()))
}

/// Paired samples of one comparison, in seconds (see the module docs).
#[derive(Default)]
struct Pairs {
    stoker: Vec<f64>,
    native: Vec<f64>,
}

impl Pairs {
    /// Takes one pair: `native` first in even pairs, `stoker` first in odd ones.
    fn measure(
        &mut self,
        stoker: impl FnOnce() -> Result<f64, Error>,
        native: impl FnOnce() -> Result<f64, Error>,
    ) -> Result<(), Error> {
        let (s, n) = if self.stoker.len().is_multiple_of(2) {
            let n = native()?;
            (stoker()?, n)
        } else {
            let s = stoker()?;
            (s, native()?)
        };
        self.push(s, n);
        Ok(())
    }

    fn push(&mut self, stoker: f64, native: f64) {
        self.stoker.push(stoker);
        self.native.push(native);
    }

    /// Median of Stoker's time over native's, pair by pair.
    fn time_ratio(&self) -> f64 {
        let ratios: Vec<f64> = self
            .stoker
            .iter()
            .zip(&self.native)
            .map(|(s, n)| s / n)
            .collect();
        median(&ratios)
    }
}

/// The median (the mean of the middle two for an even count); NaN if empty.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

struct Report {
    section: Section,
}

impl Report {
    /// Throughput of reading `bytes`: each side's median, and the median of
    /// the pairs' throughput ratios (native time over Stoker time).
    fn throughput(&mut self, what: &str, bytes: u64, pairs: &Pairs, goal: &str) {
        let mbps = |secs: f64| bytes as f64 / secs / (1 << 20) as f64;
        self.section.row(vec![
            what.into(),
            format!("{:.0} MiB/s", mbps(median(&pairs.stoker))),
            format!("{:.0} MiB/s", mbps(median(&pairs.native))),
            format!("{:.2}", 1.0 / pairs.time_ratio()),
            goal.into(),
        ]);
    }

    fn time(&mut self, what: &str, pairs: &Pairs, goal: &str) {
        self.section.row(vec![
            what.into(),
            format!("{:.1} ms", median(&pairs.stoker) * 1e3),
            format!("{:.1} ms", median(&pairs.native) * 1e3),
            format!("{:.2}×", pairs.time_ratio()),
            goal.into(),
        ]);
    }

    fn absolute(&mut self, what: &str, samples: &[f64], goal: &str) {
        self.section.row(vec![
            what.into(),
            format!("{:.1} ms", median(samples) * 1e3),
            String::new(),
            String::new(),
            goal.into(),
        ]);
    }
}

fn mount(
    index: &Arc<Index>,
    fetcher: &Fetcher,
    at: &Path,
    options: MountOptions,
) -> Result<MountHandle, Error> {
    Ok(stoker_lazyfs::mount(
        Arc::clone(index),
        fetcher.clone(),
        at,
        options,
    )?)
}

/// Runs the section on a blocking thread (it mounts, reads files and drives its own
/// runtime for the registry and the fetcher).
pub async fn run(quick: bool) -> anyhow::Result<Section> {
    tokio::task::spawn_blocking(move || measure(&Args::new(quick)))
        .await?
        .map_err(|e| anyhow::anyhow!(e))
}

fn measure(args: &Args) -> Result<Section, Error> {
    let work = tempfile::Builder::new()
        .prefix("stoker-lazyfs-bench-")
        .tempdir_in("/var/tmp")?;
    let native = work.path().join("native");
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir_all(&mountpoint)?;

    eprintln!(
        "building the image ({} small files, {} MiB large file)...",
        args.files, args.large_mib
    );
    let image = build_image(args, &native)?;
    eprintln!(
        "index {} KiB, data blob {} MiB",
        image.index_blob.len() >> 10,
        image.data_blob.len() >> 20
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _context = runtime.enter();
    let registry = stoker_testkit::registry::TestRegistry::start()?;
    let client = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })?;
    let repo = parse_reference(&format!("{}/bench/lazyfs", registry.host()))?;
    runtime.block_on(client.push_blob(&repo, image.data_blob.clone()))?;
    runtime.block_on(client.push_blob(&repo, image.index_blob.clone()))?;
    let data_digest = Digest::of(&image.data_blob);
    let source: Arc<dyn BlobSource> = Arc::new(RegistrySource::new(client.clone(), repo.clone()));
    let mut report = Report {
        section: Section::new(
            "Lazy filesystem (FUSE)",
            &format!(
                "Each row is a series of pairs, a Stoker sample and a native sample taken back \
                 to back with the side going first alternating; it shows each side's median and \
                 the median of the pairs' ratios ({} pairs for cold rows, each on a fresh mount \
                 with a fresh chunk cache and dropped page caches; {} from disk and {} in memory \
                 for warm reads, over {} mounts; {} walks, each on a fresh mount). An image of {} \
                 small files (0.5–8 KiB) and one {} MiB file in 1 MiB chunks, served by Debian's \
                 docker-registry on loopback; \"native\" is the same tree extracted on the local \
                 disk (ext4). Warm: every chunk in the node's chunk cache, and both sides in the \
                 same page-cache state: \"from disk\" with the page cache dropped on both sides, \
                 \"in memory\" with both files read before. First walk: a fresh mount against \
                 native with the kernel's dentries and inodes dropped; second walk: both cached. \
                 Rows without a goal compare states that do not match (a fresh mount against \
                 native in memory) and show what the FUSE round trip costs.",
                args.rounds,
                args.rounds * DISK_REPEATS,
                args.rounds * MEMORY_REPEATS,
                args.rounds,
                args.walks,
                args.files,
                args.large_mib
            ),
            &["measurement", "stoker", "native", "ratio", "goal"],
        ),
    };

    // 0. What one registry round trip costs here, for reading the cold numbers.
    let probes = 100u64;
    let mut probe_times = Vec::new();
    for i in 0..probes {
        let started = Instant::now();
        runtime.block_on(client.read_range(&repo, &data_digest, i * 5000..i * 5000 + 4096))?;
        probe_times.push(started.elapsed().as_secs_f64());
    }
    report.absolute(
        "one 4 KiB ranged read from the registry (loopback), median",
        &probe_times,
        "",
    );

    let no_passthrough = || MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    let rounds = args.rounds.max(1);
    let large_bytes = (args.large_mib as u64) << 20;
    let native_large = native.join(&image.large_file);
    let mounted_large = mountpoint.join(&image.large_file);

    // 1. Index fetched, decoded and mounted; first byte of a file (cold cache,
    // dropped page cache). 2. Cold sequential read and cold read of every small
    // file, registry on loopback. Fresh chunk cache each round.
    let first_file = &image.small_files[image.small_files.len() / 2];
    let (mut t_index, mut t_mount) = (Vec::new(), Vec::new());
    let (mut first_byte, mut cold, mut cold_small) =
        (Pairs::default(), Pairs::default(), Pairs::default());
    let mut index = None;
    for round in 0..rounds {
        let cache = ChunkCache::open(work.path().join(format!("cold-cache-{round}")), 64 << 30)?;
        let fetcher = Fetcher::new(Arc::clone(&source), cache, FetchConfig::default());
        drop_page_cache()?;
        let started = Instant::now();
        let mut byte = [0u8; 1];
        File::open(native.join(first_file))?.read_exact(&mut byte)?;
        let native_first = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let index_bytes = runtime.block_on(client.read_range(
            &repo,
            &image.index_digest,
            0..image.index_blob.len() as u64,
        ))?;
        let decoded = Arc::new(Index::decode_verified(&index_bytes, &image.index_digest)?);
        t_index.push(started.elapsed().as_secs_f64());
        let handle = mount(&decoded, &fetcher, &mountpoint, no_passthrough())?;
        t_mount.push(started.elapsed().as_secs_f64());
        File::open(mountpoint.join(first_file))?.read_exact(&mut byte)?;
        first_byte.push(started.elapsed().as_secs_f64(), native_first);

        cold.measure(
            || {
                drop_page_cache()?;
                seconds(read_file(&mounted_large)?)
            },
            || {
                drop_page_cache()?;
                seconds(read_file(&native_large)?)
            },
        )?;
        cold_small.measure(
            || read_files(&mountpoint, &image.small_files),
            || {
                drop_page_cache()?;
                read_files(&native, &image.small_files)
            },
        )?;
        handle.unmount()?;
        index = Some(decoded);
    }
    let index = index.ok_or("no rounds")?;
    report.absolute(
        &format!(
            "index fetched + verified + decoded ({} files, {} KiB)",
            index.inode_count(),
            image.index_blob.len() >> 10
        ),
        &t_index,
        "",
    );
    report.absolute("… and mounted", &t_mount, "< 200 ms for 30,000 files");
    report.time("… and first byte of a file (cold)", &first_byte, "");
    report.throughput(
        "cold sequential read (registry on loopback)",
        large_bytes,
        &cold,
        "",
    );
    report.time("cold read of every small file", &cold_small, "");

    // 3. Warm through FUSE (no passthrough): every chunk in the local chunk cache.
    // Both sides in the same page-cache state: from disk (page caches dropped),
    // and in memory (the file read once before: the mount keeps its page cache
    // across opens, as the native file system does). The first read of a fresh
    // mount with the chunk files in memory has no native counterpart (nothing
    // native is "in memory in another file"); it is paired with native in
    // memory, without a goal.
    let cache_dir = work.path().join("cache");
    let cache = ChunkCache::open(&cache_dir, 64 << 30)?;
    let fetcher = Fetcher::new(Arc::clone(&source), cache.clone(), FetchConfig::default());
    // Written by this process, so the cache takes them as checked, as a node's
    // agent does for the chunks it fetched.
    runtime.block_on(fetcher.prefetch(&index.chunks().collect::<Vec<_>>()))?;
    let mut fuse = Warm::default();
    for _ in 0..rounds {
        let handle = mount(&index, &fetcher, &mountpoint, no_passthrough())?;
        fuse.measure_large_file(&mounted_large, &native_large)?;
        fuse.small_disk.measure(
            || {
                drop_page_cache()?;
                read_files(&mountpoint, &image.small_files)
            },
            || {
                drop_page_cache()?;
                read_files(&native, &image.small_files)
            },
        )?;
        let _ = read_files(&native, &image.small_files)?;
        let _ = read_files(&mountpoint, &image.small_files)?;
        for _ in 0..MEMORY_REPEATS {
            fuse.small_memory.measure(
                || read_files(&mountpoint, &image.small_files),
                || read_files(&native, &image.small_files),
            )?;
        }
        handle.unmount()?;

        read_chunk_files(&cache, &index)?;
        let _ = read_file(&native_large)?;
        let handle = mount(&index, &fetcher, &mountpoint, no_passthrough())?;
        let before = handle.counters();
        fuse.large_first.measure(
            || seconds(read_file(&mounted_large)?),
            || seconds(read_file(&native_large)?),
        )?;
        fuse.small_first.measure(
            || read_files(&mountpoint, &image.small_files),
            || read_files(&native, &image.small_files),
        )?;
        let after = handle.counters();
        eprintln!(
            "fresh mount, first reads: {} FUSE reads, {} MiB",
            after.reads - before.reads,
            (after.read_bytes - before.read_bytes) >> 20
        );
        handle.unmount()?;
    }
    report.throughput(
        "warm sequential read through FUSE, from disk (page caches dropped)",
        large_bytes,
        &fuse.large_disk,
        "≥ 0.9",
    );
    report.throughput(
        "warm sequential read through FUSE, in memory (read before)",
        large_bytes,
        &fuse.large_memory,
        "≥ 0.9",
    );
    report.throughput(
        "… first read of a fresh mount, chunk files in memory",
        large_bytes,
        &fuse.large_first,
        "",
    );
    report.time(
        "warm read of every small file through FUSE, from disk",
        &fuse.small_disk,
        "",
    );
    report.time(
        "warm read of every small file through FUSE, in memory",
        &fuse.small_memory,
        "",
    );
    report.time(
        "… first read of a fresh mount, chunk files in memory",
        &fuse.small_first,
        "",
    );

    // 4. Warm through passthrough: the kernel reads a local backing file (the
    // large file's assembled copy, each small file's chunk file), so the page
    // cache that matters is the backing file's.
    let passthrough_options = || MountOptions {
        assembly: Some(AssemblyOptions {
            dir: cache_dir.join("files"),
            max_bytes: 4 << 30,
            verified: Default::default(),
        }),
        ..MountOptions::default()
    };
    let mut through = Warm::default();
    let mut fuse_reads = 0;
    for _ in 0..rounds {
        let handle = mount(&index, &fetcher, &mountpoint, passthrough_options())?;
        if !handle.passthrough_enabled() {
            eprintln!("the kernel does not offer FUSE passthrough: not measured");
            break;
        }
        // The first open of the large file queues its assembly (or, on a later
        // mount, the check of the copy already there); open it until it passes through.
        let deadline = Instant::now() + Duration::from_secs(300);
        while handle.counters().passthrough_opens == 0 && Instant::now() < deadline {
            drop(File::open(&mounted_large)?);
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = handle.counters();
        through.measure_large_file(&mounted_large, &native_large)?;
        let _ = read_files(&native, &image.small_files)?;
        let _ = read_files(&mountpoint, &image.small_files)?;
        for _ in 0..MEMORY_REPEATS {
            through.small_memory.measure(
                || read_files(&mountpoint, &image.small_files),
                || read_files(&native, &image.small_files),
            )?;
        }
        fuse_reads += handle.counters().reads - before.reads;
        handle.unmount()?;
    }
    if !through.large_memory.stoker.is_empty() {
        eprintln!("FUSE reads during the passthrough runs: {fuse_reads}");
        report.throughput(
            "warm sequential read through passthrough, from disk (page caches dropped)",
            large_bytes,
            &through.large_disk,
            "≥ 0.97",
        );
        report.throughput(
            "warm sequential read through passthrough, in memory (read before)",
            large_bytes,
            &through.large_memory,
            "≥ 0.97",
        );
        report.time(
            "warm read of every small file through passthrough, in memory",
            &through.small_memory,
            "",
        );
    }

    // 5. find + stat of every entry. First walk: a fresh mount against the native
    // tree, with the kernel's dentries and inodes dropped after mounting (both
    // sides then build them from metadata in memory: the index, the ext4 blocks
    // in the buffer cache). Second walk: both in the kernel's caches. Also the old
    // comparison, a fresh mount against native already cached, without a goal.
    let (mut first_walk, mut second_walk, mut fresh_against_cached) =
        (Pairs::default(), Pairs::default(), Pairs::default());
    let mut entries = 0;
    for _ in 0..args.walks.max(1) {
        let handle = mount(&index, &fetcher, &mountpoint, no_passthrough())?;
        drop_dentries_and_inodes()?;
        first_walk.measure(
            || {
                let (n, secs) = walk(&mountpoint)?;
                entries = n;
                Ok(secs)
            },
            || Ok(walk(&native)?.1),
        )?;
        let counters = handle.counters();
        eprintln!(
            "first walk: {} lookups, {} getattrs, {} readdirs, {} operations",
            counters.lookups, counters.getattrs, counters.readdirs, counters.operations
        );
        second_walk.measure(|| Ok(walk(&mountpoint)?.1), || Ok(walk(&native)?.1))?;
        let second = handle.counters();
        eprintln!(
            "second walk: {} operations",
            second.operations - counters.operations
        );
        eprintln!(
            "walks: first {:.1} ms against native {:.1} ms, second {:.1} ms against {:.1} ms",
            first_walk.stoker.last().copied().unwrap_or(f64::NAN) * 1e3,
            first_walk.native.last().copied().unwrap_or(f64::NAN) * 1e3,
            second_walk.stoker.last().copied().unwrap_or(f64::NAN) * 1e3,
            second_walk.native.last().copied().unwrap_or(f64::NAN) * 1e3,
        );
        if let (Some(fresh), Some(cached)) = (first_walk.stoker.last(), second_walk.native.last()) {
            fresh_against_cached.push(*fresh, *cached);
        }
        handle.unmount()?;
    }
    report.time(
        &format!("find + stat of {entries} entries, first walk"),
        &first_walk,
        "≤ 1.5×",
    );
    report.time(
        &format!("find + stat of {entries} entries, second walk"),
        &second_walk,
        "≤ 1.5×",
    );
    report.time(
        "… first walk of a fresh mount against native in the kernel's caches",
        &fresh_against_cached,
        "",
    );

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    report.section.note(format!(
        "Warm reads in memory through FUSE stop at the kernel: on this kernel ({}) a FUSE \
         file's page cache holds single 4 KiB pages, where ext4 keeps the same file in large \
         folios (about 17 pages per folio for a 64 MiB file), so copying it out costs the \
         kernel more per byte; no request reaches Stoker. Checked with /proc/kpageflags, also \
         against a minimal FUSE server whose INIT reply varied max_write (128 KiB to 16 MiB), \
         max_pages (256, the kernel's fs.fuse.max_pages_limit) and the writeback-cache, \
         auto-inval and explicit-inval flags: single pages every time, so no setting of ours \
         changes it. The kernel patch \"fuse: enable large folios\" (2025) lifts this where \
         it is applied. Passthrough reads the backing file's own page cache, as native does.",
        kernel.trim()
    ));
    report.section.note(
        "From disk, the mount keeps the disk busy ahead of a streaming reader: it opens the \
         next 16 MiB of cached chunks and asks the kernel to read them \
         (POSIX_FADV_WILLNEED), and the kernel asks for 1 MiB reads ahead of the reader. What \
         is left is CPU on this 2-core machine: each byte is read into the chunk file's page \
         cache (in 4 KiB pages: a 1 MiB file is read in one window, too small for large \
         folios), copied to Stoker, copied into the mount's page cache and copied to the \
         reader, where native reads into large folios and copies once. A profile of the \
         first read of a fresh mount shows both cores busy: the copy out of the chunk file \
         (15% of samples), FUSE's per-page copy of the reply (pinning each 4 KiB page of \
         the buffer: about 25%), the reader's copy (12%), and the page allocation for both \
         page caches. The kernel read-ahead size did not change it (1, 2, 4 and 8 MiB \
         measured alike, on a busy machine).",
    );
    report.section.note(
        "Passthrough: each small file is backed by its chunk file, the large file by a copy \
         assembled from its chunks (MountOptions::assembly). Walks make no request to Stoker \
         once listed: names and attributes are cached for a year, listings come with \
         attributes (readdirplus) and are cached without opendir. The kernel asks for \
         readdirplus replies as large as the caller's getdents buffer (32 KiB from glibc, \
         about 200 entries here), so the first walk of 300 directories of 100 entries is 605 \
         requests (one with the entries, one empty at the end of each listing) and no \
         lookup; the rest of it is the kernel making an inode and a dentry for each entry.",
    );
    Ok(report.section)
}

/// The seconds of a `read_file` measurement.
fn seconds((_, secs): (u64, f64)) -> Result<f64, Error> {
    Ok(secs)
}

/// The warm comparisons, through FUSE or through passthrough.
#[derive(Default)]
struct Warm {
    large_disk: Pairs,
    large_memory: Pairs,
    large_first: Pairs,
    small_disk: Pairs,
    small_memory: Pairs,
    small_first: Pairs,
}

impl Warm {
    /// The large file, warm: from disk (both page caches dropped before each
    /// pair), then in memory (the mount's from its last read, native's read now).
    fn measure_large_file(&mut self, mounted: &Path, native: &Path) -> Result<(), Error> {
        for _ in 0..DISK_REPEATS {
            self.large_disk.measure(
                || {
                    drop_page_cache()?;
                    seconds(read_file(mounted)?)
                },
                || {
                    drop_page_cache()?;
                    seconds(read_file(native)?)
                },
            )?;
        }
        let _ = read_file(native)?;
        for _ in 0..MEMORY_REPEATS {
            self.large_memory.measure(
                || seconds(read_file(mounted)?),
                || seconds(read_file(native)?),
            )?;
        }
        Ok(())
    }
}

/// Reads every cached chunk file once, so its pages are in the page cache.
fn read_chunk_files(cache: &ChunkCache, index: &Index) -> Result<(), Error> {
    for chunk in index.chunks() {
        if let Some(c) = cache.get(&chunk.digest) {
            let _ = c.read_all()?;
        }
    }
    Ok(())
}
