//! `stoker-agent`: the Stoker node agent binary.
//!
//! Serves containerd's snapshots API on `snapshotter_socket` (default
//! `/run/stoker/snapshotter.sock`) with state under `state_dir` (default
//! `/var/lib/stoker`). Runs with no arguments; `--config FILE` and `STOKER_*`
//! environment variables change the settings (see agent/README.md).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stoker_agent::lazy_mount::RegistryLazyMounter;
use stoker_agent::resolver::RegistryResolver;
use stoker_agent::snapshotter::SnapshotterOptions;
use stoker_agent::{Config, Snapshotter, server};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "stoker-agent",
    version,
    about = "Stoker node agent: containerd remote snapshotter"
)]
struct Args {
    /// YAML configuration file; every setting is optional.
    #[arg(long, env = "STOKER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STOKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = Config::load(args.config.as_deref()).context("loading the configuration")?;
    if args.print_config {
        print!("{}", serde_yaml::to_string(&config)?);
        return Ok(());
    }

    stoker_registry::install_crypto_provider();
    // Before the first fetcher creates its instruments on the global meter.
    if let Some(addr) = config.metrics_addr {
        let exporter = stoker_telemetry::install().context("installing the metrics exporter")?;
        let (bound, _task) = exporter
            .serve(addr)
            .await
            .context("serving the metrics endpoint")?;
        tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    }
    let registry = registry_client(&config)?;
    let cache_dir = config.cache_dir();
    let cache = stoker_cache::ChunkCache::open(&cache_dir, config.cache.max_bytes)
        .with_context(|| format!("opening the chunk cache {}", cache_dir.display()))?;
    let mounter = Arc::new(RegistryLazyMounter::new(
        registry.clone(),
        cache,
        stoker_fetch::FetchConfig::default(),
        stoker_lazyfs::MountOptions::default(),
    ));
    let snapshotter = Snapshotter::open(
        &config.snapshotter_root(),
        Arc::new(RegistryResolver::new(registry)),
        mounter,
        SnapshotterOptions {
            negative_cache_ttl: config.negative_cache_ttl(),
            resolve_timeout: std::time::Duration::from_secs(config.timeouts.resolve_secs),
        },
    )
    .await
    .context("opening the snapshotter")?;
    let listener = server::bind_unix_socket(&config.snapshotter_socket)
        .context("binding the snapshotter socket")?;
    tracing::info!(
        socket = %config.snapshotter_socket.display(),
        root = %config.snapshotter_root().display(),
        "serving containerd snapshots API"
    );

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    server::serve_snapshotter(listener, Arc::new(snapshotter), shutdown).await?;
    Ok(())
}

/// The registry client for the node: HTTPS, plain HTTP for the configured insecure
/// registries (and, after HTTPS fails, for loopback ones), credentials from the
/// configured docker config file or the default one.
fn registry_client(config: &Config) -> anyhow::Result<stoker_registry::RegistryClient> {
    let request_timeout = std::time::Duration::from_secs(config.timeouts.request_secs);
    let registry_config = stoker_registry::RegistryConfig {
        insecure_hosts: config.registry.insecure.clone(),
        docker_config: config
            .registry
            .docker_config
            .clone()
            .or_else(stoker_registry::default_docker_config_path),
        request_timeout,
        read_deadline: request_timeout * 2,
        ..Default::default()
    };
    stoker_registry::RegistryClient::new(registry_config).context("building the registry client")
}
