//! `stoker mount` and `stoker unmount`: one image, lazily, in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use stoker_cache::ChunkCache;
use stoker_convert::ImageStore;
use stoker_fetch::{FetchConfig, Fetcher, RegistrySource};
use stoker_lazyfs::MountOptions;
use tokio::signal::unix::{SignalKind, signal};

use crate::image_args::RegistryArgs;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The image: host[:port]/repo:tag or …@sha256:… (it must have been converted).
    pub image: String,
    /// An existing empty directory.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The chunk cache, shared with other mounts and the agent.
    #[arg(long, default_value = "/var/lib/stoker/cache")]
    pub cache_dir: PathBuf,
    /// Cache capacity in bytes; least recently used chunks go first.
    #[arg(long, default_value_t = 10 << 30)]
    pub cache_size: u64,
    /// Deadline for one chunk read from the registry, retries included; then EIO.
    #[arg(long, default_value_t = 60)]
    pub read_deadline_secs: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9102).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Do not use FUSE passthrough for cached files.
    #[arg(long)]
    pub no_passthrough: bool,
    /// Print counters every second.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    pub mountpoint: PathBuf,
}

pub async fn mount(args: MountArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let exporter = stoker_telemetry::install()?;
            let (bound, task) = exporter.serve(addr).await?;
            eprintln!("metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let (store, selector) = args.registry.open(&args.image)?;
    let ImageStore::Registry { client, repository } = &store else {
        bail!(
            "stoker mount reads images from a registry; {} is a local layout",
            args.image
        );
    };
    let mut config = client.config().clone();
    config.read_deadline = Duration::from_secs(args.read_deadline_secs);
    let client = stoker_registry::RegistryClient::new(config)?;
    let found =
        stoker_convert::find_artifact(&store, &selector, args.registry.single_platform()?).await?;
    let index = stoker_convert::load_index(&store, &found)
        .await
        .with_context(|| format!("loading index {}", found.index_digest))?;
    let cache = ChunkCache::open(&args.cache_dir, args.cache_size)
        .with_context(|| format!("opening the chunk cache in {}", args.cache_dir.display()))?;
    let source = RegistrySource::new(client, repository.clone());
    let fetcher = Fetcher::new(Arc::new(source), cache, FetchConfig::default());
    let options = MountOptions {
        passthrough: !args.no_passthrough,
        ..MountOptions::default()
    };
    let inodes = index.inode_count();
    let handle = stoker_lazyfs::mount(Arc::new(index), fetcher.clone(), &args.mountpoint, options)
        .with_context(|| format!("mounting at {}", args.mountpoint.display()))?;
    eprintln!(
        "mounted {} ({} inodes, index {}) at {} in {} ms; Ctrl-C unmounts",
        args.image,
        inodes,
        found.index_digest,
        args.mountpoint.display(),
        started.elapsed().as_millis()
    );

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = ticker.tick(), if args.verbose => {
                let fs = handle.counters();
                let fetch = fetcher.stats();
                eprintln!(
                    "reads {} ({} bytes, {} errors), passthrough opens {}, fetched {} chunks ({} bytes) in {} requests, cache hits {} misses {}",
                    fs.reads, fs.read_bytes, fs.read_errors, fs.passthrough_opens,
                    fetch.chunks_fetched, fetch.bytes_fetched, fetch.requests, fetch.cache_hits, fetch.cache_misses
                );
            }
        }
    }
    handle.unmount().context("unmounting")?;
    if let Some(task) = metrics {
        task.abort();
    }
    eprintln!("unmounted {}", args.mountpoint.display());
    Ok(())
}

pub fn unmount(args: UnmountArgs) -> anyhow::Result<()> {
    stoker_lazyfs::unmount(&args.mountpoint)
        .with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
    Ok(())
}
