//! Failover, end to end: two controller replicas, each the real run loop
//! ([`run_with_agents`]: leader election, watches, both reconcilers, the
//! warmer, the gate writer) with its own identity, its own tokio runtime (its
//! "process") and its own connections to the agents, against one shared
//! stateful API server ([`common::fake_api`]) where they really race: the
//! Lease is created and taken over with resourceVersion preconditions, and a
//! stale write gets 409.
//!
//! The cluster: one GPU node, one annotated Deployment and its ImagePrefetch
//! with a learned plan. The leader pushes the plan to the node's agent, which
//! stalls mid-prefetch, so the leader is in the middle of warming when:
//! - it is killed (its runtime dropped where it stands, nothing released):
//!   the standby takes the Lease once it expires and finishes the work, with
//!   in-process agents, and with a real agent (`common::agent_node`: the
//!   agent API over mutual TLS, found through its Pod, fetching from a real
//!   registry behind a fault proxy that stalls the chunks);
//! - or its requests stop reaching the API server: it must step down before
//!   its Lease expires, so that none of its writes, held in the network,
//!   lands after the standby leads.
//!
//! The take-over times are printed (`--nocapture`), never asserted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent_node::{AgentNode, Pki, registry_image};
use common::fake_api::{FakeApi, RecordedRequest, resource_of};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use stoker_controller::agents::{AgentApi, AgentTlsFiles};
use stoker_controller::fake_agents::FakeAgents;
use stoker_controller::leader::LeaseConfig;
use stoker_controller::learning::encode_for_status;
use stoker_controller::run::{Config, run_with_agents};
use stoker_controller::warmer::WarmerConfig;
use stoker_crds::{ImagePrefetch, ImagePrefetchStatus, ImageStatus, Phase};
use stoker_format::{Digest, Plan};
use stoker_testkit::fault_proxy::{Fault, FaultProxy, Scope};
use stoker_testkit::wait_until;

const LEASE_NAMESPACE: &str = "stoker-system";
const LEASE_NAME: &str = "stoker-controller";
const NODE: &str = "node-a";
const LEASE_SECONDS: u64 = 3;
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

/// How a replica's run loop ended.
struct Exit {
    at: Instant,
    result: Result<(), String>,
}

/// One controller replica: a thread running its own tokio runtime, as a
/// process. When `run` returns the runtime is dropped, as the binary exits.
/// How a replica reaches the node agents.
enum AgentLink {
    /// In-process fake agents, one set per replica (its own connections),
    /// whose pushes stall until the test lets them finish.
    Fake,
    /// The real agent API over mutual TLS, found through the agent Pod.
    Grpc { port: u16, tls: AgentTlsFiles },
}

struct Replica {
    identity: String,
    /// With [`AgentLink::Fake`].
    agents: Option<Arc<FakeAgents>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    exit: Arc<Mutex<Option<Exit>>>,
}

impl Replica {
    fn start(api: &FakeApi, identity: &str, link: &AgentLink) -> Replica {
        let agents = matches!(link, AgentLink::Fake).then(|| {
            let agents = Arc::new(FakeAgents::new());
            agents.set_stalled(NODE, true);
            agents
        });
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let exit = Arc::new(Mutex::new(None));
        let mut lease = LeaseConfig::new(LEASE_NAMESPACE, LEASE_NAME, identity);
        lease.lease_duration = Duration::from_secs(LEASE_SECONDS);
        lease.renew_every = Duration::from_millis(500);
        let config = Config {
            agent_namespace: LEASE_NAMESPACE.into(),
            agent_selector: "app.kubernetes.io/name=stoker-agent".into(),
            agent_port: match link {
                AgentLink::Fake => 0,
                AgentLink::Grpc { port, .. } => *port,
            },
            agent_tls: match link {
                AgentLink::Fake => None,
                AgentLink::Grpc { tls, .. } => Some(tls.clone()),
            },
            metrics_addr: "127.0.0.1:0".parse().expect("address"),
            lease: Some(lease),
            warmer: WarmerConfig {
                retry_base: Duration::from_millis(50),
                ..WarmerConfig::default()
            },
            concurrency: 4,
        };
        let thread = {
            let (api, identity, exit) = (api.clone(), identity.to_string(), exit.clone());
            let agents = agents.clone().map(|a| a as Arc<dyn AgentApi>);
            std::thread::Builder::new()
                .name(identity.clone())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async move {
                        let client = api.client(&identity);
                        tokio::select! {
                            result = run_with_agents(client, config, agents) => {
                                *lock(&exit) = Some(Exit {
                                    at: Instant::now(),
                                    result: result.map_err(|e| e.to_string()),
                                });
                            }
                            _ = killed => {}
                        }
                    });
                    // Every task of this "process" is dropped here.
                    drop(runtime);
                })
                .expect("thread")
        };
        Replica {
            identity: identity.into(),
            agents,
            kill: Some(kill),
            thread: Some(thread),
            exit,
        }
    }

    /// The SIGKILL equivalent: every task is dropped where it stands; no
    /// request is made on the way out (the Lease is not released). Returns
    /// once nothing of the replica runs any more.
    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// The replica's fake agents ([`AgentLink::Fake`]).
    fn fake_agents(&self) -> &FakeAgents {
        self.agents.as_deref().expect("fake agents")
    }

    fn exited(&self) -> bool {
        lock(&self.exit).is_some()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cluster: a GPU node, an annotated Deployment running `image`, and
/// its ImagePrefetch with a plan of `chunks` learned from three starts (so
/// nothing is left to learn).
fn seed(api: &FakeApi, image: &str, index_digest: Digest, chunks: Vec<u32>) {
    api.create(&common::node(NODE, "gpu", false));
    let mut deployment = common::deployment("app", 1, true);
    if let Some(pod) = deployment.spec.template.spec.as_mut() {
        pod.containers[0].image = Some(image.into());
    }
    let deployment = api.create(&deployment);
    let prefetch = api.create(&common::prefetch_for(&deployment));
    let plan = encode_for_status(
        &Plan {
            index_digest,
            chunks,
        },
        40 << 10,
    )
    .expect("plan");
    let status = ImagePrefetchStatus {
        images: vec![ImageStatus {
            image: image.into(),
            index_digest: Some(index_digest.to_string()),
            pods_learned: prefetch.spec.policy.learn_from_starts,
            hot_chunks: plan.chunks as u64,
            hot_bytes: (plan.chunks as u64) << 20,
            plan: Some(plan.base64),
            ..ImageStatus::default()
        }],
        ..ImagePrefetchStatus::default()
    };
    api.patch_status::<ImagePrefetch>(Some(common::NAMESPACE), "app", &status);
}

/// The cluster of the fake-agent tests: a made-up image and plan.
fn seed_fake(api: &FakeApi) -> String {
    let digest = Digest::of(b"index of registry.example/app:1");
    seed(api, common::IMAGE, digest, (0..64).collect());
    digest.to_string()
}

/// When the plan reached the node's agent through `standby`'s connections.
/// The seeded status has learned all its starts, so the push tells the agent
/// to stop tracing the image (`learning_complete`).
fn plan_pushed_by(standby: &Replica, digest: &str) -> Instant {
    let pushes = standby.fake_agents().pushes();
    pushes
        .iter()
        .find(|p| {
            p.node == NODE && p.index_digest == digest && p.plan_len > 0 && p.learning_complete
        })
        .map(|p| p.at)
        .unwrap_or_else(|| {
            panic!("the plan never reached the agent through the standby: {pushes:?}")
        })
}

fn lease(api: &FakeApi) -> Option<Lease> {
    api.get::<Lease>(Some(LEASE_NAMESPACE), LEASE_NAME)
}

fn holder(api: &FakeApi) -> Option<String> {
    lease(api)?.spec?.holder_identity
}

fn prefetch_status(api: &FakeApi) -> ImagePrefetchStatus {
    api.get::<ImagePrefetch>(Some(common::NAMESPACE), "app")
        .and_then(|p| p.status)
        .unwrap_or_default()
}

fn is_lease_write(r: &RecordedRequest) -> bool {
    r.is_resource(&resource_of::<Lease>()) && r.is_write()
}

fn is_status_write(r: &RecordedRequest) -> bool {
    r.is_resource(&resource_of::<ImagePrefetch>())
        && r.is_write()
        && r.subresource.as_deref() == Some("status")
}

/// Starts two replicas at once and waits until one leads and is in the
/// middle of warming: its push reached the node's agent (`pushed`) and
/// stalled there, the ImagePrefetch is written as warming. Returns (leader,
/// standby).
fn start_pair(
    api: &FakeApi,
    link: &AgentLink,
    pushed: impl Fn(&Replica) -> bool,
) -> (Replica, Replica) {
    let one = Replica::start(api, "replica-1", link);
    let two = Replica::start(api, "replica-2", link);
    assert!(
        wait_until(DEADLINE, POLL, || {
            holder(api).is_some_and(|h| pushed(if h == one.identity { &one } else { &two }))
                && prefetch_status(api).nodes.warming == 1
        }),
        "no replica became leader and started warming; requests: {:?}",
        api.requests()
            .iter()
            .map(|r| (&r.client, &r.method, &r.resource, r.status))
            .collect::<Vec<_>>()
    );
    let (leader, standby) = if holder(api).as_deref() == Some(one.identity.as_str()) {
        (one, two)
    } else {
        (two, one)
    };
    let requests = api.requests();
    let lease_writes: Vec<&RecordedRequest> =
        requests.iter().filter(|r| is_lease_write(r)).collect();
    assert!(
        lease_writes
            .iter()
            .filter(|r| r.succeeded())
            .all(|r| r.client == leader.identity),
        "only the leader wrote the Lease"
    );
    let lost_races = lease_writes
        .iter()
        .filter(|r| r.client == standby.identity && r.status == 409)
        .count();
    println!(
        "start: {} leads; the standby lost {lost_races} racing Lease write(s) with 409",
        leader.identity
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.client == standby.identity)
            .all(|r| r.is_resource(&resource_of::<Lease>())),
        "the standby touched nothing but the Lease"
    );
    if let Some(agents) = &standby.agents {
        assert_eq!(agents.push_count(), 0, "the standby pushed nothing");
    }
    (leader, standby)
}

/// What the standby's take-over looked like, from the API server's record.
struct TakeOver {
    /// The leader's last Lease write and when that lease expired.
    last_renew: RecordedRequest,
    expiry: Timestamp,
    /// The standby's first successful Lease write.
    acquired: RecordedRequest,
}

fn take_over(api: &FakeApi, leader: &Replica, standby: &Replica) -> TakeOver {
    let requests = api.requests();
    let last_renew = requests
        .iter()
        .rfind(|r| r.client == leader.identity && is_lease_write(r) && r.succeeded())
        .cloned()
        .expect("the leader wrote the Lease");
    let renewed: Lease =
        serde_json::from_value(last_renew.stored.clone().expect("stored")).expect("a Lease");
    let spec = renewed.spec.expect("spec");
    let expiry = spec.renew_time.expect("renewTime").0
        + SignedDuration::from_secs(spec.lease_duration_seconds.expect("duration").into());
    let acquired = requests
        .iter()
        .find(|r| r.client == standby.identity && is_lease_write(r) && r.succeeded())
        .cloned()
        .expect("the standby took the Lease");
    TakeOver {
        last_renew,
        expiry,
        acquired,
    }
}

/// Checks what must hold once the standby finished the leader's work, and
/// prints the take-over times.
/// `plan_at_agent`: when the plan reached the node's agent through the
/// standby, if the test can tell.
fn check_standby_finished(
    scenario: &str,
    api: &FakeApi,
    leader: &Replica,
    standby: &Replica,
    plan_at_agent: Option<Instant>,
) {
    let t = take_over(api, leader, standby);
    assert!(
        t.acquired.wall >= t.expiry,
        "the standby took the Lease at {} before it expired at {}",
        t.acquired.wall,
        t.expiry
    );
    let lease = lease(api).and_then(|l| l.spec).expect("lease");
    assert_eq!(
        lease.holder_identity.as_deref(),
        Some(standby.identity.as_str())
    );
    assert_eq!(lease.lease_transitions, Some(1), "one transition");

    let requests = api.requests();
    // The standby acted only once it led.
    for r in requests.iter().filter(|r| r.client == standby.identity) {
        assert!(
            r.seq >= t.acquired.seq || r.is_resource(&resource_of::<Lease>()),
            "the standby made {} {} before it led",
            r.method,
            r.resource
        );
    }
    // The old leader never wrote after the standby took over.
    let late: Vec<&RecordedRequest> = requests
        .iter()
        .filter(|r| r.client == leader.identity && r.seq > t.acquired.seq && r.is_write())
        .collect();
    assert!(
        late.is_empty(),
        "the old leader wrote after the new one led: {:?}",
        late.iter()
            .map(|r| (&r.method, &r.resource, &r.subresource, r.status))
            .collect::<Vec<_>>()
    );

    // The work was finished by the standby: the last status write (warm,
    // Ready) is its.
    let status = prefetch_status(api);
    assert_eq!((status.nodes.warm, status.nodes.total), (1, 1));
    assert_eq!(status.phase, Phase::Ready);
    let last_status_write = requests
        .iter()
        .rfind(|r| is_status_write(r) && r.succeeded() && r.client != common::fake_api::TEST_CLIENT)
        .expect("a status write");
    assert_eq!(last_status_write.client, standby.identity);

    // Take-over times, measured from the lease's expiry (renewTime +
    // leaseDurationSeconds as written by the old leader).
    let expiry_instant =
        t.last_renew.at + Duration::from_secs(LEASE_SECONDS) - wall_gap(&t.last_renew, t.expiry);
    let since_expiry = |at: Instant| at.saturating_duration_since(expiry_instant);
    let first_status = requests
        .iter()
        .find(|r| r.client == standby.identity && is_status_write(r) && r.succeeded())
        .expect("the standby wrote status");
    let first_write = requests
        .iter()
        .find(|r| {
            r.client == standby.identity
                && r.is_write()
                && r.succeeded()
                && !r.is_resource(&resource_of::<Lease>())
        })
        .expect("the standby wrote");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let plan_at_agent = plan_at_agent.map_or("-".to_string(), |at| {
        format!("{:.0} ms", ms(since_expiry(at)))
    });
    println!(
        "take-over ({scenario}; {LEASE_SECONDS} s lease, 500 ms retry period, 500 ms reconcile debounce), \
         from the lease's expiry: Lease taken {:.0} ms, plan at the agent {plan_at_agent}, \
         first object write ({} {} {}) {:.0} ms",
        ms(since_expiry(t.acquired.at)),
        first_write.method,
        first_write.resource,
        first_write.subresource.as_deref().unwrap_or_default(),
        ms(since_expiry(first_write.at)),
    );
    println!(
        "RECOVERY | controller {scenario}: expiry to the standby's status write | {:.0}",
        ms(since_expiry(first_status.at))
    );
}

/// How much earlier than the server recorded `write` its own timestamp
/// `expiry - lease` was (the client stamps renewTime before sending).
fn wall_gap(write: &RecordedRequest, expiry: Timestamp) -> Duration {
    let renew_time = expiry - SignedDuration::from_secs(LEASE_SECONDS as i64);
    let gap = write.wall.duration_since(renew_time);
    Duration::try_from(gap).unwrap_or(Duration::ZERO)
}

#[test]
fn the_standby_finishes_the_work_of_a_leader_killed_mid_warming() {
    let api = FakeApi::new();
    let digest = seed_fake(&api);
    let (mut leader, standby) =
        start_pair(&api, &AgentLink::Fake, |r| r.fake_agents().push_count() > 0);

    // The standby's agent connections work; the leader's push stays stalled.
    standby.fake_agents().set_stalled(NODE, false);
    let kill_started = Instant::now();
    leader.kill();
    let killed_at = api.next_seq();

    assert!(
        wait_until(DEADLINE, POLL, || {
            let status = prefetch_status(&api);
            status.nodes.warm == 1 && status.phase == Phase::Ready
        }),
        "the standby did not finish warming; lease holder {:?}, status {:?}",
        holder(&api),
        prefetch_status(&api)
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.client != leader.identity || r.seq < killed_at),
        "a killed replica makes no request"
    );
    assert!(!leader.exited(), "killed, not exited");
    let t = take_over(&api, &leader, &standby);
    println!(
        "kill to the standby holding the Lease: {:?} (the rest of the {LEASE_SECONDS} s lease, then the retry)",
        t.acquired.at.saturating_duration_since(kill_started)
    );
    let pushed = plan_pushed_by(&standby, &digest);
    check_standby_finished("killed mid-warming", &api, &leader, &standby, Some(pushed));
}

#[test]
fn a_leader_cut_off_from_the_api_server_steps_down_before_its_lease_expires() {
    let api = FakeApi::new();
    let digest = seed_fake(&api);
    let (leader, standby) =
        start_pair(&api, &AgentLink::Fake, |r| r.fake_agents().push_count() > 0);

    // The leader's requests stop reaching the API server (held in the
    // network); its watches still deliver, so it keeps working: the workload
    // scales up, the leader reconciles and tries to write status.
    standby.fake_agents().set_stalled(NODE, false);
    api.set_held(&leader.identity, true);
    let mut deployment: Deployment = api.get(Some(common::NAMESPACE), "app").expect("deployment");
    deployment.spec.replicas = Some(2);
    api.replace(&deployment);

    assert!(
        wait_until(DEADLINE, POLL, || {
            let status = prefetch_status(&api);
            status.nodes.warm == 1 && status.phase == Phase::Ready
        }),
        "the standby did not finish warming; lease holder {:?}, status {:?}",
        holder(&api),
        prefetch_status(&api)
    );
    let held: Vec<String> = api
        .held_requests()
        .iter()
        .map(|(_, method, path)| format!("{method} {path}"))
        .collect();
    println!("held while cut off: {held:?}");
    // The network heals: whatever the old leader still has in flight arrives.
    api.set_held(&leader.identity, false);
    assert!(
        wait_until(DEADLINE, POLL, || leader.exited()),
        "the cut-off leader never stepped down"
    );
    let exit = lock(&leader.exit).take().expect("exit");
    let error = exit.result.expect_err("leadership lost is an error exit");
    assert!(error.contains("lost leadership"), "{error}");
    let pushed = plan_pushed_by(&standby, &digest);
    check_standby_finished(
        "cut off from the API server",
        &api,
        &leader,
        &standby,
        Some(pushed),
    );
    let t = take_over(&api, &leader, &standby);
    assert!(
        exit.at < t.acquired.at,
        "the old leader stepped down only {:?} after the new one took over",
        exit.at.saturating_duration_since(t.acquired.at)
    );
}

/// The agent DaemonSet's pod on [`NODE`], ready, at 127.0.0.1.
fn agent_pod() -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "stoker-agent-node-a", "namespace": LEASE_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "stoker-agent"}
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "agent"}]},
        "status": {
            "phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
    .expect("pod")
}

#[test]
fn the_standby_finishes_a_prefetch_on_a_real_agent_after_the_leader_is_killed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The node: a real agent API (mutual TLS) whose prefetches fetch from a
    // real registry through a fault proxy, on a runtime of its own.
    let node_runtime = tokio::runtime::Runtime::new().expect("runtime");
    let Some(image) = node_runtime.block_on(registry_image()) else {
        return;
    };
    let pki = Pki::generate();
    let (proxy, node, reference, index) = node_runtime.block_on(async {
        let proxy = FaultProxy::start(&image.registry.host())
            .await
            .expect("proxy");
        // Short attempts, so a stalled fetch is retried soon after the stall ends.
        let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
            plain_http: true,
            docker_config: None,
            request_timeout: Duration::from_millis(500),
            read_deadline: DEADLINE,
            ..stoker_registry::RegistryConfig::default()
        })
        .expect("registry client");
        let node = AgentNode::start(&pki, client).await;
        let reference = format!("{}/ml/app:v1", proxy.host());
        let index = node
            .images
            .load_index(&reference, &image.index_digest)
            .await
            .expect("index");
        (proxy, node, reference, index)
    });
    // Chunks stall in the registry's answers: the leader's prefetch starts
    // on the agent and cannot finish.
    proxy.set_fault_with(Fault::StallBody { after_bytes: 0 }, Scope::Blobs, None);

    let api = FakeApi::new();
    seed(
        &api,
        &reference,
        image.index_digest,
        (0..index.chunk_count()).collect(),
    );
    let pod = api.create(&agent_pod());
    // Created without status, as by the API server; the kubelet reports it.
    api.patch_status::<Pod>(
        Some(LEASE_NAMESPACE),
        "stoker-agent-node-a",
        &agent_pod().status,
    );
    assert!(pod.status.is_none());
    let link = AgentLink::Grpc {
        port: node.port,
        tls: pki.client_files(),
    };
    let index_path = format!("/v2/ml/app/blobs/{}", image.index_digest);
    let chunk_gets = || proxy.count(|r| r.is_blob_get() && r.path != index_path);
    let (mut leader, standby) = start_pair(&api, &link, |_| chunk_gets() > 0);
    leader.kill();
    let killed_at = api.next_seq();
    proxy.clear_faults();

    assert!(
        wait_until(DEADLINE, POLL, || {
            let status = prefetch_status(&api);
            status.nodes.warm == 1 && status.phase == Phase::Ready
        }),
        "the standby did not finish warming; lease holder {:?}, status {:?}",
        holder(&api),
        prefetch_status(&api)
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.client != leader.identity || r.seq < killed_at),
        "a killed replica makes no request"
    );
    for location in index.chunks() {
        assert!(
            node.cache.contains(&location.digest),
            "chunk {} is not on the node",
            location.digest
        );
    }
    check_standby_finished(
        "killed mid-prefetch, real agent",
        &api,
        &leader,
        &standby,
        None,
    );
    drop((leader, standby));
    node_runtime.block_on(node.stop());
    drop(proxy);
}
