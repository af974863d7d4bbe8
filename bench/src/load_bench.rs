//! Section `load` (issue 8): 64 readers ("containers") reading different files of
//! one image at once, while 8 images are mounted at once, each with readers of its
//! own. Every byte read is checked; any error or wrong byte fails the run. Reports
//! cold and warm (every chunk in the node cache) read latency percentiles.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use stoker_cache::ChunkCache;
use stoker_convert::{ConvertOptions, ImageStore};
use stoker_fetch::{BlobSource, FetchConfig, Fetcher, RegistrySource};
use stoker_lazyfs::{MountHandle, MountOptions};
use stoker_registry::{RegistryClient, RegistryConfig, parse_reference};
use stoker_testkit::image::{Entry, ImageBuilder, push_layout};
use stoker_testkit::registry::TestRegistry;

use crate::images::incompressible;
use crate::report::Section;

const IMAGES: usize = 8;
const READERS_ON_FIRST_IMAGE: usize = 64;
const READERS_ON_OTHERS: usize = 4;
const READ_SIZE: usize = 4096;

struct Reader {
    path: PathBuf,
    expected: Arc<Vec<u8>>,
}

/// Reads every `READ_SIZE` block of each reader's file, in a scattered order, all
/// readers at once; returns every read's latency. Fails on any error or wrong byte.
fn read_all_at_once(readers: &[Reader]) -> anyhow::Result<Vec<Duration>> {
    let start = Arc::new(Barrier::new(readers.len()));
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = readers
            .iter()
            .map(|reader| {
                let start = Arc::clone(&start);
                scope.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let file = File::open(&reader.path)
                        .with_context(|| format!("opening {}", reader.path.display()))?;
                    let blocks = reader.expected.len() / READ_SIZE;
                    let mut buffer = vec![0u8; READ_SIZE];
                    let mut latencies = Vec::with_capacity(blocks);
                    start.wait();
                    // A stride coprime with the block count visits every block once.
                    for i in 0..blocks {
                        let block = (i * 7919) % blocks;
                        let offset = block * READ_SIZE;
                        let started = Instant::now();
                        file.read_exact_at(&mut buffer, offset as u64)
                            .with_context(|| {
                                format!("reading {} at {offset}", reader.path.display())
                            })?;
                        latencies.push(started.elapsed());
                        if buffer[..] != reader.expected[offset..offset + READ_SIZE] {
                            bail!("wrong bytes in {} at {offset}", reader.path.display());
                        }
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader panicked")))
            })
            .collect()
    });
    let mut all = Vec::new();
    for result in results {
        all.extend(result?);
    }
    Ok(all)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn drop_page_cache() -> anyhow::Result<()> {
    let synced = std::process::Command::new("sync").status()?;
    if !synced.success() {
        bail!("sync failed: {synced}");
    }
    std::fs::write("/proc/sys/vm/drop_caches", "1").context("dropping the page cache")
}

/// Runs the section on a blocking thread (it mounts and reads files).
pub async fn run(quick: bool) -> anyhow::Result<Section> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || measure(&handle, quick)).await?
}

fn measure(runtime: &tokio::runtime::Handle, quick: bool) -> anyhow::Result<Section> {
    let file_len: usize = if quick { 1 << 20 } else { 8 << 20 };
    let work = tempfile::Builder::new()
        .prefix("stoker-load-bench-")
        .tempdir_in("/var/tmp")?;
    let registry = TestRegistry::start().context("starting docker-registry")?;
    let client = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })?;
    let cache = ChunkCache::open(work.path().join("cache"), 64 << 30)?;

    eprintln!("bench load: converting {IMAGES} images");
    let mut mounts: Vec<MountHandle> = Vec::new();
    let mut readers = Vec::new();
    for image in 0..IMAGES {
        let files = if image == 0 {
            READERS_ON_FIRST_IMAGE
        } else {
            READERS_ON_OTHERS
        };
        let expected: Vec<Arc<Vec<u8>>> = (0..files)
            .map(|f| Arc::new(incompressible((image * 1000 + f) as u64, file_len)))
            .collect();
        let mut entries = vec![Entry::dir("data")];
        for (f, bytes) in expected.iter().enumerate() {
            entries.push(Entry::file(format!("data/f{f}"), bytes.to_vec()));
        }
        let layout = work.path().join(format!("layout{image}"));
        ImageBuilder::new()
            .layer(entries)
            .write_layout(&layout, "v1")?;
        let reference = format!("{}/load/img{image}:v1", registry.host());
        push_layout(
            &layout,
            "v1",
            &registry.host(),
            &format!("load/img{image}:v1"),
        )?;
        let (store, selector) = ImageStore::registry(client.clone(), &reference)?;
        runtime.block_on(stoker_convert::convert(
            &store,
            &selector,
            &ConvertOptions::default(),
        ))?;
        let found = runtime.block_on(stoker_convert::find_artifact(&store, &selector, None))?;
        let index = Arc::new(runtime.block_on(stoker_convert::load_index(&store, &found))?);
        let source: Arc<dyn BlobSource> = Arc::new(RegistrySource::new(
            client.clone(),
            parse_reference(&reference)?,
        ));
        let fetcher = Fetcher::new(source, cache.clone(), FetchConfig::default());
        let mountpoint = work.path().join(format!("mnt{image}"));
        std::fs::create_dir_all(&mountpoint)?;
        let options = MountOptions {
            passthrough: false,
            ..MountOptions::default()
        };
        mounts.push(stoker_lazyfs::mount(index, fetcher, &mountpoint, options)?);
        for (f, bytes) in expected.into_iter().enumerate() {
            readers.push(Reader {
                path: mountpoint.join(format!("data/f{f}")),
                expected: bytes,
            });
        }
    }

    let mut section = Section::new(
        "Load: many readers, many images",
        &format!(
            "{IMAGES} converted images mounted at once from Debian's docker-registry on \
             loopback, sharing one chunk cache. {READERS_ON_FIRST_IMAGE} readers (threads \
             standing in for containers) read {READERS_ON_FIRST_IMAGE} different {} MiB files \
             of the first image, and {READERS_ON_OTHERS} more per other image, all at once: \
             every {READ_SIZE}-byte block once, in a scattered order, each checked against \
             the original bytes. Cold: empty cache. Warm: every chunk in the node cache, \
             page cache dropped, fresh opens, so every read goes through FUSE.",
            file_len >> 20
        ),
        &[
            "run",
            "readers",
            "reads",
            "errors",
            "p50",
            "p99",
            "max",
            "throughput",
        ],
    );
    let blob_gets = || {
        registry
            .requests()
            .iter()
            .filter(|r| r.is_blob_get())
            .count()
    };
    let mut warm_run_fetches = 0;
    for (name, warm) in [("cold (registry)", false), ("warm (node cache)", true)] {
        if warm {
            drop_page_cache()?;
        }
        let gets_before = blob_gets();
        let started = Instant::now();
        let mut latencies = read_all_at_once(&readers)?;
        let secs = started.elapsed().as_secs_f64();
        latencies.sort();
        let bytes = latencies.len() * READ_SIZE;
        section.row(vec![
            name.into(),
            readers.len().to_string(),
            latencies.len().to_string(),
            "0".into(),
            format!("{:.0} µs", percentile(&latencies, 0.50).as_secs_f64() * 1e6),
            format!("{:.0} µs", percentile(&latencies, 0.99).as_secs_f64() * 1e6),
            format!("{:.1} ms", percentile(&latencies, 1.0).as_secs_f64() * 1e3),
            format!("{:.0} MiB/s", bytes as f64 / secs / (1 << 20) as f64),
        ]);
        if warm {
            warm_run_fetches = blob_gets().saturating_sub(gets_before);
        }
    }
    for mount in mounts {
        mount.unmount()?;
    }
    section.note(
        "Every read was checked; a single error or wrong byte fails the benchmark, so \
         `errors` is always 0 in a written report.",
    );
    section.note(format!(
        "Registry blob requests during the warm run: {warm_run_fetches}."
    ));
    section.note(
        "Latencies include the kernel's FUSE round trip; a read whose page the kernel's \
         read-ahead already brought in is served from the page cache.",
    );
    Ok(section)
}
