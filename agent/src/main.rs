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
use stoker_agent::snapshotter::{NoArtifacts, NoLazyMounts, SnapshotterOptions};
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

    // Lazy loading is wired in when the lazy filesystem lands; until then every image
    // is unpacked as containerd's overlayfs snapshotter would.
    let snapshotter = Snapshotter::open(
        &config.snapshotter_root(),
        Arc::new(NoArtifacts),
        Arc::new(NoLazyMounts),
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
