//! Pull-secret credentials end to end, without Kubernetes: the controller's warmer
//! sends them with its gRPC client over mutual TLS to a real agent API service whose
//! registry client takes them from the agent's `PushedCredentials`, and the agent
//! then warms a converted image from a private registry (a real docker-registry
//! behind the fault proxy's token service). Without them the same push fails.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent_node::{Pki, registry_image};
use stoker_agent::api_server::{AgentService, serve_tcp_mtls};
use stoker_agent::credentials::PushedCredentials;
use stoker_agent::prefetch::{NodeImages, PrefetchOptions, Prefetches};
use stoker_agent::tls::{ReloadingTls, TlsFiles};
use stoker_agent::trace::{TraceOptions, Traces};
use stoker_api::agent::RegistryCredential;
use stoker_cache::ChunkCache;
use stoker_controller::agents::{AgentDirectory, GrpcAgents};
use stoker_controller::candidates::PodScheduling;
use stoker_controller::warmer::{PlanPush, PushState, Target, Warmer, WarmerConfig};
use stoker_fetch::FetchConfig;
use stoker_format::Plan;
use stoker_testkit::fault_proxy::{FaultProxy, ProxyAuth};

const NODE: &str = "node-a";
const USER: &str = "ml-puller";
const PASSWORD: &str = "ml-pull-secret-pw";

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_is_warmed_with_credentials_sent_over_mutual_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(image) = registry_image().await else {
        return;
    };
    // The plan: every chunk of the image (the index read directly, without auth).
    let scratch = tempfile::tempdir().unwrap();
    let index = NodeImages::new(
        image.client.clone(),
        ChunkCache::open(scratch.path(), 1 << 30).unwrap(),
        FetchConfig::default(),
    )
    .load_index(&image.reference, &image.index_digest)
    .await
    .expect("index");
    let plan = Plan {
        index_digest: image.index_digest,
        chunks: (0..index.chunk_count()).collect(),
    };

    // The registry as the node sees it: private.
    let proxy = FaultProxy::start(&image.registry.host()).await.unwrap();
    proxy.require_auth(ProxyAuth {
        basic: Some((USER.into(), PASSWORD.into())),
        identity_token: None,
        token_max_uses: None,
    });
    let private_reference = image
        .reference
        .replacen(&image.registry.host(), &proxy.host(), 1);

    // The node's agent: its registry client asks the pushed credentials first.
    let pki = Pki::generate();
    let pushed = Arc::new(PushedCredentials::new());
    let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        credential_source: Some(pushed.clone()),
        ..stoker_registry::RegistryConfig::default()
    })
    .unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let trace_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).unwrap();
    let images = Arc::new(NodeImages::new(
        client,
        cache.clone(),
        FetchConfig::default(),
    ));
    let service = AgentService::new(
        Arc::new(Traces::open(trace_dir.path(), TraceOptions::default()).unwrap()),
        Prefetches::new(images, PrefetchOptions::default()),
        None,
    )
    .with_credentials(pushed.clone());
    let tls = Arc::new(
        ReloadingTls::new(TlsFiles {
            cert: pki.path("server.crt"),
            key: pki.path("server.key"),
            client_ca: pki.path("ca.crt"),
        })
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_tcp_mtls(listener, tls, service, async {
        let _ = stopped.await;
    }));

    // The controller side: its gRPC client with its client certificate.
    let directory = Arc::new(AgentDirectory::new());
    directory.insert(NODE, IpAddr::V4(Ipv4Addr::LOCALHOST));
    let agents = Arc::new(GrpcAgents::new(
        directory,
        port,
        Some(pki.client_files().load().unwrap()),
    ));
    let warmer = Warmer::new(
        agents,
        WarmerConfig {
            max_attempts: 1,
            ..WarmerConfig::default()
        },
    );
    warmer.node_applied(
        &serde_json::from_value(serde_json::json!({"metadata": {"name": NODE}})).unwrap(),
    );
    let push = PlanPush {
        image: private_reference.clone(),
        index_digest: image.index_digest.to_string(),
        plan: plan.encode().unwrap().into(),
        background_rest: false,
        learning_complete: false,
    };
    let target = |credentials: Vec<RegistryCredential>| Target {
        placements: vec![PodScheduling::default()],
        plans: vec![push.clone()],
        credentials,
        ..Target::default()
    };
    let key = kube::runtime::reflector::ObjectRef::new("app").within("ml");

    // No pull secret: the agent cannot read the image.
    warmer.set_target(&key, target(Vec::new()));
    eventually("the push to fail", || {
        matches!(
            warmer.push_state(NODE, push.revision()),
            Some(PushState::Failed { .. })
        )
    })
    .await;
    let Some(PushState::Failed { message, .. }) = warmer.push_state(NODE, push.revision()) else {
        unreachable!("waited for Failed");
    };
    assert!(
        message.to_lowercase().contains("unauthorized") || message.contains("401"),
        "refused by the registry: {message}"
    );
    assert!(pushed.is_empty());

    // With the workload's pull secret: sent over mutual TLS, then the plan warms.
    warmer.set_target(
        &key,
        target(vec![RegistryCredential {
            registry: proxy.host(),
            username: USER.into(),
            password: PASSWORD.into(),
            ..RegistryCredential::default()
        }]),
    );
    warmer.retry_failed(&key);
    eventually("the node to be warm", || {
        warmer.push_state(NODE, push.revision()) == Some(PushState::Warm)
    })
    .await;
    assert_eq!(pushed.len(), 1, "the agent holds the credential");
    for location in index.chunks() {
        assert!(
            cache.contains(&location.digest),
            "chunk {} is not on the node",
            location.digest
        );
    }
    assert!(
        proxy
            .requests()
            .iter()
            .any(|r| r.is_blob_get() && r.authorization && r.status == 206),
        "chunks were read with the pushed credentials"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
