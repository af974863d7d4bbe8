//! `stoker-controller`: the Kubernetes controller binary. See the library
//! crate (`stoker_controller`) for what it does; this only parses flags, sets
//! up logging and the TLS crypto provider, and runs it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use stoker_controller::agents::AgentTlsFiles;
use stoker_controller::leader::LeaseConfig;
use stoker_controller::run::{Config, run};
use stoker_controller::warmer::WarmerConfig;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Learns startup plans into ImagePrefetch objects and warms nodes before pods land"
)]
struct Args {
    /// Namespace of the agent DaemonSet's pods.
    #[arg(long, env = "STOKER_AGENT_NAMESPACE", default_value = "stoker-system")]
    agent_namespace: String,
    /// Label selector of the agent pods.
    #[arg(
        long,
        env = "STOKER_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=stoker-agent"
    )]
    agent_selector: String,
    /// The agents' gRPC port (mutual TLS).
    #[arg(long, env = "STOKER_AGENT_PORT", default_value_t = 7443)]
    agent_port: u16,
    /// CA certificate (PEM) that signed the agents' serving certificates.
    #[arg(
        long,
        env = "STOKER_AGENT_CA",
        default_value = "/etc/stoker/tls/ca.crt"
    )]
    agent_ca: PathBuf,
    /// The controller's client certificate (PEM).
    #[arg(
        long,
        env = "STOKER_AGENT_CLIENT_CERT",
        default_value = "/etc/stoker/tls/tls.crt"
    )]
    agent_client_cert: PathBuf,
    /// The controller's client key (PEM).
    #[arg(
        long,
        env = "STOKER_AGENT_CLIENT_KEY",
        default_value = "/etc/stoker/tls/tls.key"
    )]
    agent_client_key: PathBuf,
    /// DNS name in the agents' serving certificate.
    #[arg(
        long,
        env = "STOKER_AGENT_SERVER_NAME",
        default_value = "stoker-agent.stoker-system.svc"
    )]
    agent_server_name: String,
    /// Talk to agents without TLS (development only; real agents refuse it).
    #[arg(long)]
    agent_insecure: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "STOKER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "stoker-system")]
    lease_namespace: String,
    #[arg(long, default_value = "stoker-controller")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Prefetch streams open at once, over all agents.
    #[arg(long, default_value_t = 2048)]
    max_streams: usize,
    /// ImagePrefetch reconciles at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Log as JSON lines.
    #[arg(long, env = "STOKER_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    // kube's and tonic's rustls need a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("stoker-controller-{}", std::process::id()));
    let config = Config {
        agent_namespace: args.agent_namespace,
        agent_selector: args.agent_selector,
        agent_port: args.agent_port,
        agent_tls: (!args.agent_insecure).then_some(AgentTlsFiles {
            ca: args.agent_ca,
            cert: args.agent_client_cert,
            key: args.agent_client_key,
            server_name: args.agent_server_name,
        }),
        metrics_addr: args.metrics_addr,
        lease: (!args.no_leader_election)
            .then(|| LeaseConfig::new(&args.lease_namespace, &args.lease_name, &identity)),
        warmer: WarmerConfig {
            max_streams: args.max_streams,
            ..WarmerConfig::default()
        },
        concurrency: args.concurrency,
    };
    let client = kube::Client::try_default().await?;
    run(client, config).await?;
    Ok(())
}
