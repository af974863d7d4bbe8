//! The local end-to-end scenario (issue 7, `make e2e-local`): learn on node 1, warm
//! node 2, start on node 2 — with real parts and no Kubernetes.
//!
//! - a docker-registry on loopback holding a small runnable image and its Stoker
//!   artifact (`stoker convert`);
//! - two "nodes", each a containerd 1.6 with its own `stoker-agent` process as proxy
//!   snapshotter (separate state, chunk cache, sockets), the agent API on TCP with
//!   mutual TLS (node 1 on 127.0.0.1, node 2 on 127.0.0.2, same port);
//! - the controller's side: its gRPC client (`GrpcAgents`, certificates generated
//!   here), its learning code (`learning::trace_from_agent`, `fold_trace`, which
//!   merges with `Plan::merge`, and the status encoding) and its `Warmer`.
//!
//! 1. Learn: the image is pulled through CRI on node 1 and a container runs; the
//!    controller collects the startup trace from agent 1 and merges it into a plan.
//! 2. Warm: the plan goes through the controller's status encoding, and its warmer
//!    pushes it to agent 2 (`Prefetch`) until the node is warm; the agent reports
//!    `Done` with every chunk and byte of the plan.
//! 3. Start: the same container runs on node 2, prints the right output, and the
//!    registry's log shows no request for a chunk blob from pull to exit.
//!
//! Needs root, /dev/fuse, containerd, runc, docker-registry and skopeo, and the
//! `stoker-agent` binary built in the same profile (`make e2e-local` builds it;
//! `cargo test --workspace` does too).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stoker_api::agent::{PrefetchProgress, PrefetchRequest, PrefetchState};
use stoker_controller::agents::{AgentApi, AgentDirectory, AgentTlsFiles, GrpcAgents};
use stoker_controller::candidates::PodScheduling;
use stoker_controller::learning;
use stoker_controller::warmer::{PlanPush, PushState, Target, TargetKey, Warmer, WarmerConfig};
use stoker_testkit::containerd::{
    AgentProcess, CRI_NAMESPACE, TestContainerd, host_binary_entries, workspace_binary,
};
use stoker_testkit::image::{Entry, Generator, ImageBuilder, WrittenImage, push_layout};
use stoker_testkit::registry::{LoggedRequest, TestRegistry};

const SERVER_NAME: &str = "stoker-agent.stoker-system.svc";
const DEADLINE: Duration = Duration::from_secs(120);
/// Node 1's startup window: it opens when the image is mounted (at pull) and must
/// cover the container's run; its trace is collected once it closes.
const LEARN_WINDOW_SECS: u64 = 20;
const STARTUP: &str = "cat /app/lib.bin > /dev/null && cat /app/greeting.txt";
const GREETING: &str = "hello from a warm node\n";

fn can_run(test: &str) -> bool {
    if !stoker_testkit::require_root(test) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: {test}: /dev/fuse is absent");
        return false;
    }
    [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "skopeo",
        "ldd",
    ]
    .iter()
    .all(|tool| stoker_testkit::require_tool(test, tool))
}

/// A shell and `cat` from the host, a file the startup reads (several chunks), the
/// line it prints, and a large file it never reads.
fn app_image() -> ImageBuilder {
    let system = host_binary_entries(&["/bin/sh", "/bin/cat"]).expect("host binaries");
    ImageBuilder::new().layer(system).layer(vec![
        Entry::dir("app"),
        Entry::generated_file("app/lib.bin", Generator::random(3 << 20, 1)),
        Entry::file("app/greeting.txt", GREETING),
        Entry::generated_file("app/unused.bin", Generator::random(8 << 20, 2)),
    ])
}

/// A CA, one serving certificate for every agent (named [`SERVER_NAME`], as the
/// manifests issue it) and the controller's client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec![SERVER_NAME.into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["stoker-controller".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, pem) in [
            ("ca.crt", ca.pem()),
            ("server.crt", server_cert),
            ("server.key", server_key),
            ("client.crt", client_cert),
            ("client.key", client_key),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write PEM");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One node: containerd with its own agent. containerd is declared first so that it
/// stops (and its container mounts go) before the agent.
struct Node {
    name: &'static str,
    containerd: TestContainerd,
    agent: AgentProcess,
}

impl Node {
    fn start(
        name: &'static str,
        dir: &Path,
        ip: Ipv4Addr,
        port: u16,
        pki: &Pki,
        registry: &TestRegistry,
        extra_env: &[(&str, String)],
    ) -> Node {
        let binary = workspace_binary("stoker-agent", "stoker-agent").expect("stoker-agent binary");
        let mut env = vec![
            ("STOKER_GRPC_LISTEN", format!("{ip}:{port}")),
            (
                "STOKER_GRPC_TLS_CERT",
                pki.path("server.crt").display().to_string(),
            ),
            (
                "STOKER_GRPC_TLS_KEY",
                pki.path("server.key").display().to_string(),
            ),
            (
                "STOKER_GRPC_TLS_CLIENT_CA",
                pki.path("ca.crt").display().to_string(),
            ),
            ("STOKER_INSECURE_REGISTRIES", registry.host()),
        ];
        env.extend(extra_env.iter().cloned());
        let agent = AgentProcess::start(&binary, &dir.join(name), &env).expect("stoker-agent");
        let containerd = TestContainerd::start(&agent.snapshotter_socket()).expect("containerd");
        containerd
            .allow_plain_http(&registry.host())
            .expect("hosts.toml");
        Node {
            name,
            containerd,
            agent,
        }
    }

    /// Pulls `image` through CRI and runs `sh -c STARTUP` in a container; its stdout.
    fn pull_and_run(&self, rt: &tokio::runtime::Runtime, image: &str, id: &str) -> String {
        rt.block_on(self.containerd.cri_pull_image(image))
            .unwrap_or_else(|e| panic!("{}: CRI pull: {e}\n{}", self.name, self.logs()));
        self.containerd
            .run(CRI_NAMESPACE, image, id, &["sh", "-c", STARTUP])
            .unwrap_or_else(|e| panic!("{}: run {id}: {e}\n{}", self.name, self.logs()))
    }

    fn logs(&self) -> String {
        format!(
            "agent log:\n{}\ncontainerd log:\n{}",
            self.agent.log_tail(6000),
            self.containerd.log_tail(3000)
        )
    }
}

/// Blob GETs of the image's chunk blobs (`stoker convert`'s data blobs).
fn chunk_blob_gets<'a>(requests: &'a [LoggedRequest], blobs: &[String]) -> Vec<&'a LoggedRequest> {
    requests
        .iter()
        .filter(|r| r.is_blob_get() && blobs.iter().any(|b| r.path.ends_with(b.as_str())))
        .collect()
}

/// Blob GETs of the original image's layers.
fn layer_gets<'a>(requests: &'a [LoggedRequest], image: &WrittenImage) -> Vec<&'a LoggedRequest> {
    requests
        .iter()
        .filter(|r| {
            r.is_blob_get()
                && image
                    .layers
                    .iter()
                    .any(|l| r.path.ends_with(&l.blob.digest))
        })
        .collect()
}

#[test]
fn a_plan_learned_on_one_node_warms_another_over_mutual_tls() {
    let test = "a_plan_learned_on_one_node_warms_another_over_mutual_tls";
    if !can_run(test) {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::Builder::new()
        .prefix("stoker-e2e-")
        .tempdir()
        .expect("tempdir");

    // The image and its Stoker artifact in a registry.
    let registry = TestRegistry::start().expect("docker-registry");
    let layout = dir.path().join("layout");
    let written = app_image().write_layout(&layout, "v1").expect("layout");
    push_layout(&layout, "v1", &registry.host(), "e2e/app:v1").expect("push");
    let image = format!("{}/e2e/app:v1", registry.host());
    let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..Default::default()
    })
    .expect("registry client");
    let report = rt
        .block_on(async {
            let (store, selector) = stoker_convert::ImageStore::registry(client, &image)?;
            stoker_convert::convert(
                &store,
                &selector,
                &stoker_convert::ConvertOptions::default(),
            )
            .await
        })
        .expect("stoker convert")
        .remove(0);
    let chunk_blobs: Vec<String> = report.blobs.iter().map(|(d, _)| d.clone()).collect();
    assert!(!chunk_blobs.is_empty(), "{report:?}");

    // Two nodes, and the controller's client for them.
    let pki = Pki::generate();
    let port = stoker_testkit::free_port().expect("free port");
    let (ip1, ip2) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    let window = [("STOKER_TRACE_WINDOW_SECS", LEARN_WINDOW_SECS.to_string())];
    let node1 = Node::start("node-1", dir.path(), ip1, port, &pki, &registry, &window);
    let node2 = Node::start("node-2", dir.path(), ip2, port, &pki, &registry, &[]);
    let directory = Arc::new(AgentDirectory::new());
    directory.insert(node1.name, IpAddr::V4(ip1));
    directory.insert(node2.name, IpAddr::V4(ip2));
    let tls = AgentTlsFiles {
        ca: pki.path("ca.crt"),
        cert: pki.path("client.crt"),
        key: pki.path("client.key"),
        server_name: SERVER_NAME.into(),
    }
    .load()
    .expect("client TLS");
    let agents = Arc::new(GrpcAgents::new(directory, port, Some(tls)));

    // 1. Learn on node 1: a container starts lazily and leaves its startup trace.
    let out = node1.pull_and_run(&rt, &image, "learn-1");
    assert_eq!(out, GREETING);
    // The controller reports the pod Ready, which closes its container's window (the
    // snapshotter gave the mount's window to the container when it prepared the
    // container's snapshot, keyed by the container ID).
    let closed_early = rt
        .block_on(async { agents.container_ready(node1.name, "learn-1").await })
        .unwrap_or_else(|e| panic!("ContainerReady on node 1: {e}\n{}", node1.logs()));
    assert!(
        closed_early,
        "ContainerReady found no startup window of learn-1\n{}",
        node1.logs()
    );
    let trace_id = rt.block_on(async {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let traces = agents
                .list_traces(node1.name)
                .await
                .unwrap_or_else(|e| panic!("ListTraces on node 1: {e}\n{}", node1.logs()));
            let ours = traces
                .iter()
                .find(|t| t.index_digest == report.index_digest);
            if let Some(trace) = ours.filter(|t| t.complete) {
                break trace.trace_id.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no complete trace of {} on node 1: {traces:?}\n{}",
                report.index_digest,
                node1.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let response = rt
        .block_on(async { agents.get_trace(node1.name, &trace_id).await })
        .expect("GetTrace");
    let trace = learning::trace_from_agent(&response).expect("trace");
    let read = |file: &str| trace.files.iter().any(|f| f.ends_with(file));
    assert!(
        read("app/lib.bin") && read("app/greeting.txt") && read("bin/sh"),
        "the trace has what the container read: {:?}",
        trace.files
    );
    assert!(!read("app/unused.bin"), "{:?}", trace.files);
    let learned = learning::fold_trace(None, &trace, 1 << 30).expect("merge into a plan");
    assert_eq!(learned.plan.index_digest.to_string(), report.index_digest);
    assert!(!learned.plan.chunks.is_empty());

    // 2. Warm node 2: the plan as the controller keeps it (ImagePrefetch status),
    // pushed by the controller's warmer through its gRPC client, until Warm.
    let status_plan = learning::encode_for_status(&learned.plan, 40 << 10).expect("status plan");
    assert!(!status_plan.truncated);
    let plan = learning::decode_from_status(&status_plan.base64).expect("plan from status");
    assert_eq!(plan, learned.plan);
    let push = PlanPush {
        image: image.clone(),
        index_digest: report.index_digest.clone(),
        plan: plan.encode().expect("encode plan").into(),
        background_rest: false,
        learning_complete: false,
    };
    registry.clear_requests();
    rt.block_on(async {
        let warmer = Warmer::new(agents.clone(), WarmerConfig::default());
        let node = serde_json::from_value(serde_json::json!({"metadata": {"name": node2.name}}))
            .expect("Node object");
        warmer.node_applied(&node);
        let key = TargetKey::new("app").within("e2e");
        warmer.set_target(
            &key,
            Target {
                placements: vec![PodScheduling::default()],
                plans: vec![push.clone()],
                gate: true,
                warm_timeout_seconds: 600,
                ..Target::default()
            },
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            match warmer.push_state(node2.name, push.revision()) {
                Some(PushState::Warm) => break,
                Some(PushState::Failed { message, .. }) => {
                    panic!(
                        "pushing the plan to node 2 failed: {message}\n{}",
                        node2.logs()
                    )
                }
                state => assert!(
                    Instant::now() < deadline,
                    "node 2 not warm: {state:?}\n{}",
                    node2.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let counts = warmer.counts(&key);
        assert_eq!((counts.total, counts.warm, counts.failed), (1, 1, 0));
    });
    // The agent's progress for the same plan: Done at once, every chunk and byte.
    let last = rt.block_on(async {
        let mut progress = agents
            .prefetch(
                node2.name,
                PrefetchRequest {
                    image_ref: image.clone(),
                    index_digest: report.index_digest.clone(),
                    plan: push.plan.to_vec(),
                    background_rest: false,
                    learning_complete: false,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("Prefetch on node 2: {e}\n{}", node2.logs()));
        let mut last: Option<PrefetchProgress> = None;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, progress.next()).await {
            last = Some(message.expect("progress message"));
        }
        last.expect("prefetch progress")
    });
    assert_eq!(
        last.state,
        PrefetchState::Done as i32,
        "{last:?}\n{}",
        node2.logs()
    );
    assert_eq!(last.chunks_done, learned.plan.chunks.len() as u64);
    assert_eq!(last.bytes_done, learned.hot_bytes);
    let warm_requests = registry.requests();
    assert!(!chunk_blob_gets(&warm_requests, &chunk_blobs).is_empty());
    assert!(layer_gets(&warm_requests, &written).is_empty());

    // 3. Start on node 2: the right output, and not one chunk from the registry.
    registry.clear_requests();
    let out = node2.pull_and_run(&rt, &image, "start-2");
    assert_eq!(out, GREETING);
    let start_requests = registry.requests();
    // The pull takes the artifact and the verified index its plan found: the
    // registry serves containerd's manifest and config, nothing of Stoker's.
    assert!(
        !start_requests
            .iter()
            .any(|r| r.is_blob_get() && r.path.ends_with(&report.index_digest)),
        "node 2 fetched the Stoker index again: {start_requests:?}"
    );
    let fetched = chunk_blob_gets(&start_requests, &chunk_blobs);
    assert!(
        fetched.is_empty(),
        "node 2 fetched chunks outside the plan while starting: {fetched:?}\n{}",
        node2.logs()
    );
    assert!(layer_gets(&start_requests, &written).is_empty());
}
