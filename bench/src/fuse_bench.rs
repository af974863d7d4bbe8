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
//! - `find` + `stat` of every entry on a fresh mount.
//!
//! Each number is the best of 3 runs (1 with `--quick`), each on a fresh mount
//! (and, for the cold ones, a fresh cache): the machine is shared and noisy.
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

struct Args {
    files: usize,
    large_mib: usize,
    rounds: usize,
}

impl Args {
    fn new(quick: bool) -> Args {
        if quick {
            Args {
                files: 3_000,
                large_mib: 64,
                rounds: 1,
            }
        } else {
            Args {
                files: 30_000,
                large_mib: 512,
                rounds: 3,
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

fn drop_page_cache() -> Result<(), Error> {
    let synced = std::process::Command::new("sync").status()?;
    if !synced.success() {
        return Err(format!("sync failed: {synced}").into());
    }
    std::fs::write("/proc/sys/vm/drop_caches", "1")?;
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

struct Report {
    section: Section,
}

impl Report {
    fn throughput(&mut self, what: &str, stoker: (u64, f64), native: (u64, f64), goal: &str) {
        let mbps = |(bytes, secs): (u64, f64)| bytes as f64 / secs / (1 << 20) as f64;
        let (s, n) = (mbps(stoker), mbps(native));
        self.section.row(vec![
            what.into(),
            format!("{s:.0} MiB/s"),
            format!("{n:.0} MiB/s"),
            format!("{:.2}", s / n),
            goal.into(),
        ]);
    }

    fn time(&mut self, what: &str, stoker: f64, native: f64, goal: &str) {
        self.section.row(vec![
            what.into(),
            format!("{:.1} ms", stoker * 1e3),
            format!("{:.1} ms", native * 1e3),
            format!("{:.2}×", stoker / native),
            goal.into(),
        ]);
    }

    fn absolute(&mut self, what: &str, seconds: f64, goal: &str) {
        self.section.row(vec![
            what.into(),
            format!("{:.1} ms", seconds * 1e3),
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
                "Best of {} rounds, each on a fresh mount (cold rows: a fresh chunk cache and \
                 dropped page caches). An image of {} small files (0.5–8 KiB) and one {} MiB \
                 file in 1 MiB chunks, served by Debian's docker-registry on loopback; \
                 \"native\" is the same tree extracted on the local disk.",
                args.rounds, args.files, args.large_mib
            ),
            &["measurement", "stoker", "native", "ratio", "goal"],
        ),
    };

    // 0. What one registry round trip costs here, for reading the cold numbers.
    let probes = 100u64;
    let started = Instant::now();
    for i in 0..probes {
        runtime.block_on(client.read_range(&repo, &data_digest, i * 5000..i * 5000 + 4096))?;
    }
    report.absolute(
        "one 4 KiB ranged read from the registry (loopback), mean",
        started.elapsed().as_secs_f64() / probes as f64,
        "",
    );

    let no_passthrough = || MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    let rounds = args.rounds.max(1);
    let best = |a: (u64, f64), b: (u64, f64)| if b.1 < a.1 { b } else { a };

    // 1. Index fetched, decoded and mounted; first byte of a file (cold cache,
    // dropped page cache). 2. Cold sequential read and cold read of every small
    // file, registry on loopback. Fresh chunk cache each round.
    let first_file = &image.small_files[image.small_files.len() / 2];
    let (mut t_index, mut t_mount, mut t_first, mut t_native_first) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    let (mut cold, mut native_cold) = ((0, f64::MAX), (0, f64::MAX));
    let (mut cold_small, mut native_cold_small) = (f64::MAX, f64::MAX);
    let mut index = None;
    for round in 0..rounds {
        let cache = ChunkCache::open(work.path().join(format!("cold-cache-{round}")), 64 << 30)?;
        let fetcher = Fetcher::new(Arc::clone(&source), cache, FetchConfig::default());
        drop_page_cache()?;
        let started = Instant::now();
        let mut byte = [0u8; 1];
        File::open(native.join(first_file))?.read_exact(&mut byte)?;
        t_native_first = t_native_first.min(started.elapsed().as_secs_f64());

        let started = Instant::now();
        let index_bytes = runtime.block_on(client.read_range(
            &repo,
            &image.index_digest,
            0..image.index_blob.len() as u64,
        ))?;
        let decoded = Arc::new(Index::decode_verified(&index_bytes, &image.index_digest)?);
        t_index = t_index.min(started.elapsed().as_secs_f64());
        let handle = mount(&decoded, &fetcher, &mountpoint, no_passthrough())?;
        t_mount = t_mount.min(started.elapsed().as_secs_f64());
        File::open(mountpoint.join(first_file))?.read_exact(&mut byte)?;
        t_first = t_first.min(started.elapsed().as_secs_f64());

        drop_page_cache()?;
        cold = best(cold, read_file(&mountpoint.join(&image.large_file))?);
        drop_page_cache()?;
        native_cold = best(native_cold, read_file(&native.join(&image.large_file))?);
        cold_small = cold_small.min(read_files(&mountpoint, &image.small_files)?);
        drop_page_cache()?;
        native_cold_small = native_cold_small.min(read_files(&native, &image.small_files)?);
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
        t_index,
        "",
    );
    report.absolute("… and mounted", t_mount, "< 200 ms for 30,000 files");
    report.time(
        "… and first byte of a file (cold)",
        t_first,
        t_native_first,
        "",
    );
    report.throughput(
        "cold sequential read (registry on loopback)",
        cold,
        native_cold,
        "",
    );
    report.time(
        "cold read of every small file",
        cold_small,
        native_cold_small,
        "",
    );

    // 3. Warm: every chunk in the local cache and in the page cache, like the
    // native files; a fresh mount each round (nothing in the FUSE page cache).
    let cache_dir = work.path().join("cache");
    let cache = ChunkCache::open(&cache_dir, 64 << 30)?;
    let fetcher = Fetcher::new(Arc::clone(&source), cache.clone(), FetchConfig::default());
    runtime.block_on(fetcher.prefetch(&index.chunks().collect::<Vec<_>>()))?;
    for chunk in index.chunks() {
        if let Some(c) = cache.get(&chunk.digest) {
            let _ = c.read_all()?;
        }
    }
    let _ = read_file(&native.join(&image.large_file))?;
    let _ = read_files(&native, &image.small_files)?;
    let (mut native_hot, mut native_hot_small) = ((0, f64::MAX), f64::MAX);
    let (mut warm, mut warm_small) = ((0, f64::MAX), f64::MAX);
    for _ in 0..rounds {
        native_hot = best(native_hot, read_file(&native.join(&image.large_file))?);
        native_hot_small = native_hot_small.min(read_files(&native, &image.small_files)?);
        let handle = mount(&index, &fetcher, &mountpoint, no_passthrough())?;
        warm = best(warm, read_file(&mountpoint.join(&image.large_file))?);
        warm_small = warm_small.min(read_files(&mountpoint, &image.small_files)?);
        handle.unmount()?;
    }
    report.throughput(
        "warm sequential read through FUSE",
        warm,
        native_hot,
        "≥ 0.9",
    );
    report.time(
        "warm read of every small file through FUSE",
        warm_small,
        native_hot_small,
        "",
    );

    // 4. Warm through passthrough (large file through its assembled copy).
    let passthrough_options = || MountOptions {
        assembly: Some(AssemblyOptions {
            dir: cache_dir.join("files"),
            max_bytes: 4 << 30,
        }),
        ..MountOptions::default()
    };
    let (mut through, mut through_small) = ((0, f64::MAX), f64::MAX);
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
            drop(File::open(mountpoint.join(&image.large_file))?);
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = handle.counters();
        through = best(through, read_file(&mountpoint.join(&image.large_file))?);
        through_small = through_small.min(read_files(&mountpoint, &image.small_files)?);
        fuse_reads += handle.counters().reads - before.reads;
        handle.unmount()?;
    }
    if through.1 < f64::MAX {
        eprintln!("FUSE reads during the passthrough runs: {fuse_reads}");
        report.throughput(
            "warm sequential read through passthrough",
            through,
            native_hot,
            "≥ 0.97",
        );
        report.time(
            "warm read of every small file through passthrough",
            through_small,
            native_hot_small,
            "",
        );
    }

    // 5. find + stat of every entry: a fresh mount (nothing cached by the kernel)
    // against the native tree (its dentries cached).
    let mut fuse_walk = f64::MAX;
    let mut native_walk = f64::MAX;
    let mut entries = 0;
    for _ in 0..rounds {
        let handle = mount(&index, &fetcher, &mountpoint, no_passthrough())?;
        let (n, secs) = walk(&mountpoint)?;
        entries = n;
        fuse_walk = fuse_walk.min(secs);
        handle.unmount()?;
        native_walk = native_walk.min(walk(&native)?.1);
    }
    report.time(
        &format!("find + stat of {entries} entries"),
        fuse_walk,
        native_walk,
        "≤ 1.5×",
    );

    Ok(report.section)
}
