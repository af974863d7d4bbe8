//! `stoker-agent`: the Stoker node agent binary.
//!
//! Serves containerd's snapshots API on `snapshotter_socket` (default
//! `/run/stoker/snapshotter.sock`) with state under `state_dir` (default
//! `/var/lib/stoker`), and the agent API on `api_socket` (default
//! `/run/stoker/agent.sock`) and, when `api.listen` is set, on TCP with mutual TLS.
//! With `node_name` (`STOKER_NODE_NAME`) set and a Kubernetes API client at hand
//! (in-cluster, or a kubeconfig), it also runs the warm gate on its own Node in
//! the background (`stoker_agent::node_gate`).
//! Runs with no arguments; `--config FILE` and `STOKER_*` environment variables
//! change the settings (see agent/README.md).
//!
//! The process started is a small supervisor (`stoker_agent::supervisor`) that runs
//! the agent itself as a worker child process and keeps the lazy mounts' FUSE
//! connections open while that worker restarts; `--supervise false`
//! (`STOKER_SUPERVISE=false`) runs the agent in this process alone.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stoker_agent::api_server::{self, AgentService};
use stoker_agent::credentials::PushedCredentials;
use stoker_agent::fd_keeper::KeeperClient;
use stoker_agent::lazy_mount::RegistryLazyMounter;
use stoker_agent::node_gate;
use stoker_agent::prefetch::{NodeImages, PrefetchOptions, Prefetches};
use stoker_agent::resolver::{KnownImages, RegistryResolver};
use stoker_agent::supervisor;
use stoker_agent::tls::ReloadingTls;
use stoker_agent::trace::{Traces, TracingMounter};
use stoker_agent::{Config, server};
use stoker_snapshotter::{Snapshotter, SnapshotterOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

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
    /// Run the agent as a worker under a supervisor that keeps lazy mounts alive
    /// across worker restarts (running containers keep reading).
    #[arg(long, env = "STOKER_SUPERVISE", default_value_t = true, action = clap::ArgAction::Set)]
    supervise: bool,
}

fn main() -> anyhow::Result<()> {
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
    let keeper_socket =
        supervisor::worker_keeper_socket().context("starting as the supervisor's worker")?;
    if keeper_socket.is_none() && args.supervise {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the supervisor's runtime")?;
        let program = std::env::current_exe().context("finding the agent's own binary")?;
        let code = runtime
            .block_on(supervisor::supervise(
                program.into_os_string(),
                std::env::args_os().skip(1).collect(),
            ))
            .context("supervising the agent worker")?;
        std::process::exit(code);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?
        .block_on(run_agent(config, keeper_socket))
}

/// The agent itself: the snapshotter, the lazy mounts, the agent API and the warm
/// gate, until SIGTERM or SIGINT. `keeper_socket` connects it to its supervisor.
async fn run_agent(config: Config, keeper_socket: Option<OwnedFd>) -> anyhow::Result<()> {
    stoker_registry::install_crypto_provider();
    stoker_agent::containerd_check::log_containerd_config(&config.snapshotter_socket);
    // Before the first fetcher creates its instruments on the global meter.
    if let Some(addr) = config.metrics_addr {
        let exporter = stoker_telemetry::install().context("installing the metrics exporter")?;
        let (bound, _task) = exporter
            .serve(addr)
            .await
            .context("serving the metrics endpoint")?;
        tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    }
    // Pull-secret credentials from the controller (SetCredentials), in memory only.
    let pushed_credentials = Arc::new(PushedCredentials::new());
    let registry = registry_client(&config, Arc::clone(&pushed_credentials))?;
    let cache_dir = config.cache_dir();
    let cache = stoker_cache::ChunkCache::open(&cache_dir, config.cache.max_bytes)
        .with_context(|| format!("opening the chunk cache {}", cache_dir.display()))?;
    let fetch_config = stoker_fetch::FetchConfig {
        max_prefetch_in_flight: config.prefetch.concurrency as usize,
        ..stoker_fetch::FetchConfig::default()
    };
    // One set of assembled backing files (and of those verified by this
    // process) for the mounts and the prefetches.
    let assembly = config.assembly();
    // What a prefetch plan found (the image's artifact, its verified index)
    // serves the pull of the image that follows it.
    let known_images = Arc::new(KnownImages::default());
    // Indexes are kept on disk, so a restart re-mounts without the registry.
    let mut lazy_mounter = RegistryLazyMounter::new(
        registry.clone(),
        cache.clone(),
        fetch_config.clone(),
        stoker_lazyfs::MountOptions {
            readahead_bytes: config.reads.readahead_bytes,
            miss_readahead_bytes: config.reads.miss_readahead_bytes,
            ..stoker_lazyfs::MountOptions::default()
        },
    )
    .with_index_dir(config.state_dir.join("indexes"))
    .with_known_images(Arc::clone(&known_images))
    .with_assembly(assembly.clone())
    .with_open_state_dir(config.open_state_dir());
    if let Some(socket) = keeper_socket {
        match KeeperClient::connect(socket) {
            Ok((keeper, kept)) => {
                tracing::info!(
                    kept_mounts = kept.mounts.len(),
                    kept_credentials = kept.credentials.len(),
                    "connected to the supervisor's fd keeper"
                );
                // The previous worker's pushed credentials, before new ones arrive.
                if let Err(e) = pushed_credentials.set(&kept.credentials) {
                    tracing::warn!(error = %e, "restoring pushed credentials kept by the supervisor");
                }
                let keeper = Arc::new(keeper);
                pushed_credentials.keep_in(Arc::clone(&keeper));
                lazy_mounter = lazy_mounter.with_fd_keeper(keeper, kept.mounts);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the supervisor's fd keeper; mounts will not survive a restart")
            }
        }
    }
    let lazy_mounter = Arc::new(lazy_mounter);
    let traces = Arc::new(
        Traces::open(&config.trace_dir(), config.trace_options())
            .context("opening the trace directory")?,
    );
    let mounter = Arc::new(TracingMounter::new(
        Arc::clone(&lazy_mounter),
        Arc::clone(&traces),
    ));
    let snapshotter = Snapshotter::open(
        &config.snapshotter_root(),
        Arc::new(
            RegistryResolver::new(registry.clone()).with_known_images(Arc::clone(&known_images)),
        ),
        Arc::clone(&mounter) as _,
        SnapshotterOptions {
            negative_cache_ttl: config.negative_cache_ttl(),
            resolve_timeout: std::time::Duration::from_secs(config.timeouts.resolve_secs),
        },
    )
    .await
    .context("opening the snapshotter")?;
    // Kept mounts of images no longer on record end now, and so do the
    // assembled files of images not mounted again.
    lazy_mounter.release_unresumed();
    if let Some(assembly) = &assembly {
        assembly.remove_all_but(|digest| lazy_mounter.mounted(&digest.to_string()).is_some());
    }
    // Mounts restored above serve containers started long ago: trace new ones only.
    mounter.start_recording();
    let snapshotter = Arc::new(snapshotter);
    let listener = server::bind_unix_socket(&config.snapshotter_socket)
        .context("binding the snapshotter socket")?;
    tracing::info!(
        socket = %config.snapshotter_socket.display(),
        root = %config.snapshotter_root().display(),
        "serving containerd snapshots API"
    );

    // The agent API: prefetch plans warm the mounts' own fetchers when mounted.
    let images = NodeImages::new(registry, cache, fetch_config)
        .with_known_images(known_images)
        .with_mounts(move |digest| {
            let mounted = lazy_mounter.mounted(&digest.to_string())?;
            Some((mounted.index, mounted.fetcher))
        });
    let prefetches = Prefetches::new(
        Arc::new(images),
        PrefetchOptions {
            background_rest: config.prefetch.background_rest,
            assembly,
            complete_files_max_bytes: config.prefetch.complete_files_max_bytes,
            ..PrefetchOptions::default()
        },
    );
    let done_plans = prefetches.done_plans();
    let api = AgentService::new(
        Arc::clone(&traces),
        prefetches,
        Some(Arc::clone(&snapshotter)),
    )
    .with_credentials(pushed_credentials);
    let api_listener =
        server::bind_unix_socket(&config.api_socket).context("binding the agent API socket")?;
    tracing::info!(socket = %config.api_socket.display(), "serving the agent API");
    let api_tcp = match config.api.listen {
        Some(addr) => {
            let tls = ReloadingTls::new(config.api_tls_files())
                .context("loading the agent API's TLS certificates")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} for the agent API"))?;
            tracing::info!(%addr, "serving the agent API on TCP with mutual TLS");
            Some((listener, Arc::new(tls)))
        }
        None => None,
    };

    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    // In the background: an unreachable API server never delays serving.
    let _gate = node_gate::spawn(
        config.node_name.as_deref(),
        done_plans,
        config.gate_options(),
        shutdown.clone(),
    )
    .await;
    let mut api_servers = vec![tokio::spawn(api_server::serve_unix(
        api_listener,
        api.clone(),
        shutdown.clone().cancelled_owned(),
    ))];
    if let Some((listener, tls)) = api_tcp {
        api_servers.push(tokio::spawn(api_server::serve_tcp_mtls(
            listener,
            tls,
            api,
            shutdown.clone().cancelled_owned(),
        )));
    }
    let served =
        server::serve_snapshotter(listener, snapshotter, shutdown.clone().cancelled_owned()).await;
    shutdown.cancel();
    for api_server in api_servers {
        match api_server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "agent API server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "agent API server task failed"),
        }
    }
    // Traces being recorded are written out instead of lost.
    traces.finish_all().await;
    served?;
    Ok(())
}

/// The registry client for the node: HTTPS, plain HTTP for the configured insecure
/// registries (and, after HTTPS fails, for loopback ones), credentials pushed by the
/// controller (per image, first) or from the configured docker config file or the
/// default one.
fn registry_client(
    config: &Config,
    pushed_credentials: Arc<PushedCredentials>,
) -> anyhow::Result<stoker_registry::RegistryClient> {
    let request_timeout = std::time::Duration::from_secs(config.timeouts.request_secs);
    let registry_config = stoker_registry::RegistryConfig {
        insecure_hosts: config.registry.insecure.clone(),
        mirrors: config.registry.mirrors.clone(),
        connect_timeout: Some(std::time::Duration::from_secs(config.timeouts.connect_secs)),
        docker_config: config
            .registry
            .docker_config
            .clone()
            .or_else(stoker_registry::default_docker_config_path),
        credential_source: Some(pushed_credentials),
        request_timeout,
        read_deadline: request_timeout * 2,
        ..Default::default()
    };
    stoker_registry::RegistryClient::new(registry_config).context("building the registry client")
}
