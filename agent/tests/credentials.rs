//! No registry credential or token reaches the agent's logs or its `/metrics`
//! (issue 8, security): the real `stoker-agent` binary, at debug log level, warms
//! an image through its API from a registry that demands bearer tokens (basic
//! credentials from a docker config), with a token expiring midway, and then
//! its whole log and metrics output are searched for the secrets.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{AgentChild, get_metrics};
use stoker_api::agent::PrefetchRequest as Wire;
use stoker_api::agent::agent_client::AgentClient;
use stoker_format::Plan;
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::fault_proxy::{FaultProxy, ProxyAuth};
use stoker_testkit::image::{StandardImageSizes, push_layout, standard_test_image_with};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

const USER: &str = "agent-puller";
const PASSWORD: &str = "agent-pw-7e3f1a-never-logged";
const REPO: &str = "agent/credentials";

/// Standard base64 (the docker config's `auth` field is `base64(user:password)`).
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn unix_client(socket: &Path) -> AgentClient<tonic::transport::Channel> {
    AgentClient::new(
        stoker_testkit::containerd::unix_channel(socket)
            .await
            .expect("connect to the agent API"),
    )
}

async fn prefetch(
    client: &mut AgentClient<tonic::transport::Channel>,
    image_ref: &str,
    plan: &Plan,
) -> stoker_api::agent::PrefetchProgress {
    let mut stream = client
        .prefetch(Wire {
            image_ref: image_ref.to_string(),
            index_digest: plan.index_digest.to_string(),
            plan: plan.encode().expect("plan"),
            background_rest: false,
            learning_complete: false,
        })
        .await
        .expect("prefetch call")
        .into_inner();
    let mut last = None;
    while let Some(message) = stream.message().await.expect("progress") {
        last = Some(message);
    }
    last.expect("at least one progress message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_credentials_and_tokens_never_reach_the_agent_logs_or_metrics() {
    let test = "registry_credentials_and_tokens_never_reach_the_agent_logs_or_metrics";
    if !common::registry_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().expect("work dir");
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .expect("layout");
    push_layout(&layout, "v1", &registry.host(), &format!("{REPO}:v1")).expect("push");
    let direct = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })
    .expect("client");
    let (store, selector) =
        stoker_convert::ImageStore::registry(direct, &format!("{}/{REPO}:v1", registry.host()))
            .expect("reference");
    let reports = stoker_convert::convert(
        &store,
        &selector,
        &stoker_convert::ConvertOptions::default(),
    )
    .await
    .expect("convert");
    let index_digest = stoker_format::Digest::parse(&reports[0].index_digest).expect("digest");
    let found = stoker_convert::find_artifact(&store, &selector, None)
        .await
        .expect("artifact");
    let index = stoker_convert::load_index(&store, &found)
        .await
        .expect("index");

    // The registry, as the agent sees it: bearer tokens from a token service that
    // takes basic credentials; each token is good for 5 requests.
    let proxy = FaultProxy::start(&registry.host()).await.expect("proxy");
    proxy.require_auth(ProxyAuth {
        basic: Some((USER.into(), PASSWORD.into())),
        identity_token: None,
        token_max_uses: Some(5),
    });
    let basic = base64(format!("{USER}:{PASSWORD}").as_bytes());
    let docker_config = work.path().join("docker-config.json");
    std::fs::write(
        &docker_config,
        format!(r#"{{"auths":{{"{}":{{"auth":"{basic}"}}}}}}"#, proxy.host()),
    )
    .expect("docker config");

    let state = work.path().join("state");
    let api_socket = work.path().join("agent.sock");
    let log_path = work.path().join("agent.log");
    let metrics_addr = format!(
        "127.0.0.1:{}",
        stoker_testkit::free_port().expect("free port")
    );
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_stoker-agent"))
        .env("STOKER_STATE_DIR", &state)
        .env("STOKER_SNAPSHOTTER_SOCKET", work.path().join("snap.sock"))
        .env("STOKER_API_SOCKET", &api_socket)
        .env("STOKER_DOCKER_CONFIG", &docker_config)
        .env("STOKER_METRICS_LISTEN", &metrics_addr)
        .env("STOKER_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start stoker-agent");
    let _agent = AgentChild(child);
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            std::os::unix::net::UnixStream::connect(&api_socket).is_ok()
        }),
        "the agent API did not come up; log:\n{}",
        log_text()
    );

    // Warm half the image, expire every token, warm the rest.
    let image_ref = format!("{}/{REPO}:v1", proxy.host());
    let all: Vec<u32> = (0..index.chunk_count()).collect();
    let (first, second) = all.split_at(all.len() / 2);
    let mut client = unix_client(&api_socket).await;
    for (i, chunks) in [first, second].into_iter().enumerate() {
        if i == 1 {
            proxy.expire_tokens();
        }
        let plan = Plan {
            index_digest,
            chunks: chunks.to_vec(),
        };
        let done = prefetch(&mut client, &image_ref, &plan).await;
        assert_eq!(
            done.state,
            stoker_api::agent::PrefetchState::Done as i32,
            "prefetch {i}: {done:?}; log:\n{}",
            log_text()
        );
    }
    // The credentials were used: authorised blob reads, refused expired tokens,
    // several tokens issued.
    let requests = proxy.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.is_blob_get() && r.authorization && r.status == 206),
        "no authorised ranged read: {requests:?}"
    );
    assert!(requests.iter().any(|r| r.status == 401));
    assert!(
        proxy.tokens_issued() >= 2,
        "tokens issued: {}",
        proxy.tokens_issued()
    );

    let metrics = get_metrics(&metrics_addr);
    assert!(
        metrics.contains("stoker_fetch"),
        "the metrics endpoint served the fetch metrics:\n{metrics}"
    );
    let logged = log_text();
    assert!(!logged.is_empty());
    for (what, secret) in [
        ("password", PASSWORD),
        ("basic credentials (base64)", basic.as_str()),
        ("bearer token", "faultproxy-token-"),
    ] {
        assert!(!logged.contains(secret), "the {what} is in the agent's log");
        assert!(!metrics.contains(secret), "the {what} is in /metrics");
    }
    eprintln!(
        "searched {} bytes of agent log (trace level) and {} bytes of /metrics; {} tokens issued",
        logged.len(),
        metrics.len(),
        proxy.tokens_issued()
    );
}
