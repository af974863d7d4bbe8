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
//!   the standby takes the Lease once it expires and finishes the work;
//! - or its requests stop reaching the API server: it must step down before
//!   its Lease expires, so that none of its writes, held in the network,
//!   lands after the standby leads.
//!
//! The take-over times are printed (`--nocapture`), never asserted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_api::{FakeApi, RecordedRequest, resource_of};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use stoker_controller::agents::AgentApi;
use stoker_controller::fake_agents::FakeAgents;
use stoker_controller::leader::LeaseConfig;
use stoker_controller::learning::encode_for_status;
use stoker_controller::run::{Config, run_with_agents};
use stoker_controller::warmer::WarmerConfig;
use stoker_crds::{ImagePrefetch, ImagePrefetchStatus, ImageStatus, Phase};
use stoker_format::{Digest, Plan};
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
struct Replica {
    identity: String,
    agents: Arc<FakeAgents>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    exit: Arc<Mutex<Option<Exit>>>,
}

impl Replica {
    fn start(api: &FakeApi, identity: &str) -> Replica {
        let agents = Arc::new(FakeAgents::new());
        // Every push stalls mid-prefetch until the test lets them finish.
        agents.set_stalled(NODE, true);
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let exit = Arc::new(Mutex::new(None));
        let mut lease = LeaseConfig::new(LEASE_NAMESPACE, LEASE_NAME, identity);
        lease.lease_duration = Duration::from_secs(LEASE_SECONDS);
        lease.renew_every = Duration::from_millis(500);
        let config = Config {
            agent_namespace: LEASE_NAMESPACE.into(),
            agent_selector: "app.kubernetes.io/name=stoker-agent".into(),
            agent_port: 0,
            agent_tls: None,
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
            let agents: Arc<dyn AgentApi> = agents.clone();
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
                            result = run_with_agents(client, config, Some(agents)) => {
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

/// The cluster: a GPU node, an annotated Deployment, and its ImagePrefetch
/// with a plan learned from three starts (so nothing is left to learn).
/// Returns the plan's index digest.
fn seed(api: &FakeApi) -> String {
    api.create(&common::node(NODE, "gpu", false));
    let deployment = api.create(&common::deployment("app", 1, true));
    let prefetch = api.create(&common::prefetch_for(&deployment));
    let digest = Digest::of(b"index of registry.example/app:1");
    let plan = encode_for_status(
        &Plan {
            index_digest: digest,
            chunks: (0..64).collect(),
        },
        40 << 10,
    )
    .expect("plan");
    let status = ImagePrefetchStatus {
        images: vec![ImageStatus {
            image: common::IMAGE.into(),
            index_digest: Some(digest.to_string()),
            pods_learned: prefetch.spec.policy.learn_from_starts,
            hot_chunks: plan.chunks as u64,
            hot_bytes: (plan.chunks as u64) << 20,
            plan: Some(plan.base64),
            ..ImageStatus::default()
        }],
        ..ImagePrefetchStatus::default()
    };
    api.patch_status::<ImagePrefetch>(Some(common::NAMESPACE), "app", &status);
    digest.to_string()
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
/// middle of warming: its push to the node's agent stalled, the
/// ImagePrefetch written as warming. Returns (leader, standby).
fn start_pair(api: &FakeApi) -> (Replica, Replica) {
    let one = Replica::start(api, "replica-1");
    let two = Replica::start(api, "replica-2");
    assert!(
        wait_until(DEADLINE, POLL, || {
            holder(api).is_some_and(|h| {
                let leader = if h == one.identity { &one } else { &two };
                leader.agents.push_count() > 0
            }) && prefetch_status(api).nodes.warming == 1
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
    assert!(
        standby.agents.push_count() == 0,
        "the standby pushed nothing"
    );
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
fn check_standby_finished(
    scenario: &str,
    api: &FakeApi,
    leader: &Replica,
    standby: &Replica,
    digest: &str,
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

    // The work was finished by the standby: its agent connection carried the
    // plan, and the last status write (warm, Ready) is its.
    let pushes = standby.agents.pushes();
    assert!(
        pushes
            .iter()
            .any(|p| p.node == NODE && p.index_digest == digest && p.plan_len > 0),
        "the plan reached the node's agent through the standby: {pushes:?}"
    );
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
    let push_at = pushes.first().map(|p| p.at).expect("a push");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "take-over ({scenario}; {LEASE_SECONDS} s lease, 500 ms retry period, 500 ms reconcile debounce), \
         from the lease's expiry: Lease taken {:.0} ms, plan at the agent {:.0} ms, \
         first object write ({} {} {}) {:.0} ms",
        ms(since_expiry(t.acquired.at)),
        ms(since_expiry(push_at)),
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
    let digest = seed(&api);
    let (mut leader, standby) = start_pair(&api);

    // The standby's agent connections work; the leader's push stays stalled.
    standby.agents.set_stalled(NODE, false);
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
    check_standby_finished("killed mid-warming", &api, &leader, &standby, &digest);
}

#[test]
fn a_leader_cut_off_from_the_api_server_steps_down_before_its_lease_expires() {
    let api = FakeApi::new();
    let digest = seed(&api);
    let (leader, standby) = start_pair(&api);

    // The leader's requests stop reaching the API server (held in the
    // network); its watches still deliver, so it keeps working: the workload
    // scales up, the leader reconciles and tries to write status.
    standby.agents.set_stalled(NODE, false);
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
    check_standby_finished(
        "cut off from the API server",
        &api,
        &leader,
        &standby,
        &digest,
    );
    let t = take_over(&api, &leader, &standby);
    assert!(
        exit.at < t.acquired.at,
        "the old leader stepped down only {:?} after the new one took over",
        exit.at.saturating_duration_since(t.acquired.at)
    );
}
