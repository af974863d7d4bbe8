//! The warm gate on the agent's own Node: holds the workload's pods off a new
//! node until the plans the controller listed for it are on local disk.
//!
//! [`run`] watches the Node (a list and watch field-selected on
//! `metadata.name`, so the API server sends this one Node only), the set of
//! plans the prefetch executor has finished ([`Prefetches::done_plans`]) and
//! the warm timeout, and asks [`warm_gate::decide`] after each change:
//!
//! - a node without the startup taint needs nothing: the loop ends;
//! - a node whose warm target lists no plan is untainted at once;
//! - a node whose listed plans are all done is untainted, `StokerWarm=True`;
//! - when the target's timeout (or, while the controller has written no
//!   target, [`GateOptions::default_timeout`]) passes, counted from the Node's
//!   creation or the agent's start, whichever is earlier, it is untainted
//!   anyway, `StokerWarm=False` with reason `WarmTimeout`.
//!
//! Failed writes are retried with exponential backoff, and watch errors (API
//! server unreachable, 5xx) are retried by the watcher's own backoff, so the
//! gate never stops the agent from serving; [`spawn`] runs it in the
//! background and never blocks the agent's start.
//!
//! [`Prefetches::done_plans`]: crate::prefetch::Prefetches::done_plans

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use stoker_format::Digest;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::warm_gate::{self, GateDecision};

/// Settings of the gate loop.
#[derive(Clone, Debug)]
pub struct GateOptions {
    /// How long a gated node waits for the controller's warm target before it
    /// is untainted anyway.
    pub default_timeout: Duration,
    /// First delay before retrying a failed write; doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            default_timeout: Duration::from_secs(600),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// How the gate loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateEnd {
    /// The node does not carry the startup taint.
    NotGated,
    /// The taint was lifted (or was already gone) and `StokerWarm` set.
    Lifted { warm: bool, reason: &'static str },
    /// The agent is shutting down.
    Shutdown,
}

/// Starts the gate for `node_name` in the background when a node name is
/// configured and a Kubernetes client can be built (in-cluster, or a
/// kubeconfig); otherwise logs why the gate is off and returns None. Building
/// the client does not contact the API server, so an unreachable API server
/// never delays the agent's start.
pub async fn spawn(
    node_name: Option<&str>,
    done: watch::Receiver<HashSet<Digest>>,
    options: GateOptions,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<GateEnd>> {
    let Some(node_name) = node_name.filter(|n| !n.is_empty()) else {
        info!("no node name (STOKER_NODE_NAME or node_name): the warm gate is off");
        return None;
    };
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            info!(%error, "no Kubernetes API client (in-cluster or kubeconfig): the warm gate is off");
            return None;
        }
    };
    let node_name = node_name.to_string();
    Some(tokio::spawn(async move {
        run(client, &node_name, done, options, shutdown).await
    }))
}

/// Runs the gate on `node_name` until the node is ungated, or shutdown.
pub async fn run(
    client: Client,
    node_name: &str,
    mut done: watch::Receiver<HashSet<Digest>>,
    options: GateOptions,
    shutdown: CancellationToken,
) -> GateEnd {
    let agent_started = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let selected = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let mut events = watcher(nodes, selected).default_backoff().boxed();
    let mut node: Option<Node> = None;
    let mut done_open = true;
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut waiting_logged = false;
    loop {
        let mut wake_at = None;
        if let Some(current) = &node {
            let waited = waited(current, agent_started);
            let finished: HashSet<String> = done.borrow().iter().map(Digest::to_string).collect();
            match warm_gate::decide(current, &finished, waited, options.default_timeout) {
                GateDecision::NotGated => {
                    info!(
                        node = node_name,
                        "the node carries no startup taint: nothing to gate"
                    );
                    return GateEnd::NotGated;
                }
                GateDecision::Wait => {
                    if !waiting_logged {
                        info!(node = node_name, "the node is gated: waiting for its plans");
                        waiting_logged = true;
                    }
                    wake_at = Some(
                        Instant::now()
                            + warm_gate::warm_timeout(current, options.default_timeout)
                                .saturating_sub(waited),
                    );
                }
                GateDecision::Lift {
                    warm,
                    reason,
                    message,
                } => match retry_at {
                    Some(at) if Instant::now() < at => wake_at = Some(at),
                    _ => {
                        match warm_gate::lift_with_message(
                            client.clone(),
                            node_name,
                            warm,
                            reason,
                            &message,
                        )
                        .await
                        {
                            Ok(_) => {
                                info!(node = node_name, warm, reason, %message, "the node may take pods");
                                return GateEnd::Lifted { warm, reason };
                            }
                            Err(error) => {
                                failures = failures.saturating_add(1);
                                let delay = backoff(&options, failures);
                                warn!(node = node_name, %error, retry_in = ?delay, "cannot lift the startup taint");
                                let at = Instant::now() + delay;
                                retry_at = Some(at);
                                wake_at = Some(at);
                            }
                        }
                    }
                },
            }
        }
        let wake = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return GateEnd::Shutdown,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => node = Some(n),
                Some(Ok(watcher::Event::Delete(_))) => node = None,
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Some(Err(error)) => warn!(node = node_name, %error, "watching the node; retrying"),
                // The watcher retries for ever; it does not end.
                None => return GateEnd::Shutdown,
            },
            changed = done.changed(), if done_open => {
                if changed.is_err() {
                    debug!("the prefetch executor is gone");
                    done_open = false;
                }
            }
            () = wake => {}
        }
    }
}

/// How long the node has been gated: since the Node was created (so that an
/// agent restarted while its node is gated does not start the timeout over),
/// or since this agent started, whichever is longer.
fn waited(node: &Node, agent_started: Instant) -> Duration {
    let age = node
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|created| {
            Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(created.0)).ok()
        })
        .unwrap_or_default();
    age.max(agent_started.elapsed())
}

fn backoff(options: &GateOptions, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    options
        .retry_base
        .saturating_mul(factor)
        .min(options.retry_max)
}

#[cfg(test)]
mod tests {
    //! The loop against a scripted API server (a kube `Client` over
    //! `tower-test`), on tokio's paused clock: the runtime advances time only
    //! when every task waits, so "no request before the timeout" is exact and
    //! the tests never sleep.

    use super::*;
    use std::collections::BTreeMap;

    use http::{Method, Request, Response, StatusCode};
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::client::Body;
    use stoker_crds::warm_gate::{STARTUP_TAINT_KEY, WARM_TARGET_ANNOTATION};
    use tower_test::mock::{self, Handle, SendResponse};

    type ApiHandle = Handle<Request<Body>, Response<Body>>;

    const NODE: &str = "gpu-1";
    /// Longer than any wait of the loop: a request that does not come within
    /// it (in paused time) is never coming.
    const NEVER: Duration = Duration::from_secs(24 * 3600);

    fn digest(byte: u8) -> Digest {
        Digest::of(&[byte])
    }

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }
    }

    /// The node, gated or not, with a warm target listing `plans` if given.
    fn node(gated: bool, plans: Option<&[Digest]>, resource_version: &str) -> Node {
        let target = plans.map(|plans| {
            stoker_crds::warm_gate::WarmTarget::new(
                plans.iter().map(Digest::to_string).collect(),
                300,
            )
            .to_annotation()
        });
        Node {
            metadata: ObjectMeta {
                name: Some(NODE.into()),
                resource_version: Some(resource_version.into()),
                annotations: target
                    .map(|t| BTreeMap::from([(WARM_TARGET_ANNOTATION.to_string(), t)])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(if gated {
                    vec![taint("nvidia.com/gpu"), taint(STARTUP_TAINT_KEY)]
                } else {
                    vec![taint("nvidia.com/gpu")]
                }),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    struct Seen {
        method: Method,
        path: String,
        query: BTreeMap<String, String>,
        body: serde_json::Value,
        respond: SendResponse<Response<Body>>,
    }

    impl Seen {
        fn reply(self, code: u16, body: &[u8]) {
            let response = Response::builder()
                .status(StatusCode::from_u16(code).expect("code"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_vec()))
                .expect("response");
            self.respond.send_response(response);
        }

        fn json(self, code: u16, value: &serde_json::Value) {
            self.reply(code, &serde_json::to_vec(value).expect("json"));
        }

        fn fail(self, code: u16) {
            self.json(
                code,
                &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "scripted", "reason": "InternalError", "code": code}),
            );
        }
    }

    async fn next(api: &mut ApiHandle) -> Seen {
        let (request, respond) = tokio::time::timeout(NEVER, api.next_request())
            .await
            .expect("no further request from the gate")
            .expect("client dropped");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("body");
        Seen {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts
                .uri
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            body: if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON body")
            },
            respond,
        }
    }

    fn query(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SELECTOR: &str = "metadata.name%3Dgpu-1";

    /// The watcher's initial list, field-selected on the node's name.
    async fn expect_list(api: &mut ApiHandle) -> Seen {
        let seen = next(api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str(), &seen.query),
            (
                &Method::GET,
                "/api/v1/nodes",
                &query(&[("fieldSelector", SELECTOR), ("limit", "500")])
            )
        );
        seen
    }

    fn list_of(node: &Node) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "NodeList",
            "metadata": {"resourceVersion": node.metadata.resource_version}, "items": [node]})
    }

    /// The watch that follows, from `resource_version`; the test holds it
    /// open (a long poll) or answers it with events.
    async fn expect_watch(api: &mut ApiHandle, resource_version: &str) -> Seen {
        let seen = next(api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str(), &seen.query),
            (
                &Method::GET,
                "/api/v1/nodes",
                &query(&[
                    ("watch", "true"),
                    ("timeoutSeconds", "290"),
                    ("fieldSelector", SELECTOR),
                    ("allowWatchBookmarks", "true"),
                    ("resourceVersion", resource_version),
                ])
            )
        );
        seen
    }

    fn modified(node: &Node) -> Vec<u8> {
        let mut line = serde_json::to_vec(&serde_json::json!({"type": "MODIFIED", "object": node}))
            .expect("json");
        line.push(b'\n');
        line
    }

    /// The lift: StokerWarm condition, then read, then the guarded taint patch.
    async fn expect_lift(api: &mut ApiHandle, status: &str, reason: &str, node_now: &Node) {
        let seen = next(api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::PATCH, "/api/v1/nodes/gpu-1/status")
        );
        let condition = &seen.body["status"]["conditions"][0];
        assert_eq!(
            (
                &condition["type"],
                &condition["status"],
                &condition["reason"]
            ),
            (
                &serde_json::json!("StokerWarm"),
                &serde_json::json!(status),
                &serde_json::json!(reason)
            ),
            "{}",
            seen.body
        );
        seen.json(200, &serde_json::to_value(node_now).expect("node"));
        let seen = next(api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::GET, "/api/v1/nodes/gpu-1")
        );
        seen.json(200, &serde_json::to_value(node_now).expect("node"));
        let seen = next(api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::PATCH, "/api/v1/nodes/gpu-1")
        );
        assert_eq!(
            seen.body[1],
            serde_json::json!({"op": "replace", "path": "/spec/taints",
                "value": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]})
        );
        let mut untainted = node_now.clone();
        untainted.spec = node(false, None, "9").spec;
        seen.json(200, &serde_json::to_value(&untainted).expect("node"));
    }

    /// Asserts that the gate makes no request until every task waits for
    /// something other than the test (paused time: exact, not a guess).
    async fn assert_no_request(api: &mut ApiHandle, for_at_least: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(for_at_least, api.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    struct Gate {
        api: ApiHandle,
        done: watch::Sender<HashSet<Digest>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<GateEnd>,
    }

    fn start_gate() -> Gate {
        let (service, api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let done = watch::Sender::new(HashSet::new());
        let shutdown = CancellationToken::new();
        let options = GateOptions {
            default_timeout: Duration::from_secs(600),
            ..GateOptions::default()
        };
        let task = tokio::spawn({
            let done = done.subscribe();
            let shutdown = shutdown.clone();
            async move { run(client, NODE, done, options, shutdown).await }
        });
        Gate {
            api,
            done,
            shutdown,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gated_node_is_untainted_once_every_listed_plan_is_done() {
        let (a, b) = (digest(1), digest(2));
        let mut gate = start_gate();
        let gated = node(true, Some(&[a, b]), "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        let _watch = expect_watch(&mut gate.api, "1").await;
        gate.done.send_modify(|d| {
            d.insert(a);
        });
        // One plan of two: the node stays gated (the target's timeout is 300 s).
        assert_no_request(&mut gate.api, Duration::from_secs(120)).await;
        gate.done.send_modify(|d| {
            d.insert(b);
        });
        expect_lift(&mut gate.api, "True", "PlansWarm", &gated).await;
        assert_eq!(
            gate.task.await.expect("task"),
            GateEnd::Lifted {
                warm: true,
                reason: "PlansWarm"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_target_timeout_lifts_the_taint_with_warm_false() {
        let started = Instant::now();
        let mut gate = start_gate();
        let gated = node(true, Some(&[digest(1)]), "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        let _watch = expect_watch(&mut gate.api, "1").await;
        expect_lift(&mut gate.api, "False", "WarmTimeout", &gated).await;
        assert!(started.elapsed() >= Duration::from_secs(300));
        assert_eq!(
            gate.task.await.expect("task"),
            GateEnd::Lifted {
                warm: false,
                reason: "WarmTimeout"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_counts_from_the_nodes_creation_across_agent_restarts() {
        let mut gate = start_gate();
        // Gated for 20 minutes already (a previous agent died): past the 300 s.
        let mut gated = node(true, Some(&[digest(1)]), "1");
        gated.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now()
                    - k8s_openapi::jiff::SignedDuration::from_secs(1200),
            ));
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        // Decided on the listed node, before any watch.
        expect_lift(&mut gate.api, "False", "WarmTimeout", &gated).await;
        assert!(matches!(
            gate.task.await.expect("task"),
            GateEnd::Lifted { warm: false, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_with_nothing_to_warm_is_untainted_at_once() {
        let mut gate = start_gate();
        let gated = node(true, Some(&[]), "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        // Decided on the listed node: the lift comes before the watch.
        expect_lift(&mut gate.api, "True", "NothingToWarm", &gated).await;
        assert!(matches!(
            gate.task.await.expect("task"),
            GateEnd::Lifted { warm: true, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_written_later_arrives_through_the_watch() {
        let a = digest(1);
        let mut gate = start_gate();
        // Registered with the taint; the controller has not written a target yet.
        let bare = node(true, None, "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&bare));
        let watch = expect_watch(&mut gate.api, "1").await;
        gate.done.send_modify(|d| {
            d.insert(a);
        });
        assert_no_request(&mut gate.api, Duration::from_secs(300)).await;
        // The controller writes the target; its plan is already on disk.
        let targeted = node(true, Some(&[a]), "2");
        watch.reply(200, &modified(&targeted));
        let next_watch = next(&mut gate.api).await;
        let lift = if next_watch.query.get("watch").map(String::as_str) == Some("true") {
            assert_eq!(next_watch.query["resourceVersion"], "2");
            None
        } else {
            Some(next_watch)
        };
        // The watcher resumes from resourceVersion 2 while the gate lifts; the
        // two requests may come in either order.
        let status_patch = match lift {
            Some(seen) => seen,
            None => next(&mut gate.api).await,
        };
        assert_eq!(status_patch.path, "/api/v1/nodes/gpu-1/status");
        assert_eq!(
            status_patch.body["status"]["conditions"][0]["reason"],
            "PlansWarm"
        );
        status_patch.json(200, &serde_json::to_value(&targeted).expect("node"));
        let mut rest = Vec::new();
        loop {
            let seen = next(&mut gate.api).await;
            if seen.query.contains_key("watch") {
                // Hold the resumed watch open.
                rest.push(seen);
                continue;
            }
            match (&seen.method, seen.path.as_str()) {
                (&Method::GET, "/api/v1/nodes/gpu-1") => {
                    seen.json(200, &serde_json::to_value(&targeted).expect("node"))
                }
                (&Method::PATCH, "/api/v1/nodes/gpu-1") => {
                    assert_eq!(seen.body[0]["op"], "test");
                    seen.json(
                        200,
                        &serde_json::to_value(node(false, None, "3")).expect("node"),
                    );
                    break;
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        assert_eq!(
            gate.task.await.expect("task"),
            GateEnd::Lifted {
                warm: true,
                reason: "PlansWarm"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_ungated_node_ends_the_gate_without_writes() {
        let mut gate = start_gate();
        expect_list(&mut gate.api)
            .await
            .json(200, &list_of(&node(false, None, "1")));
        assert_eq!(gate.task.await.expect("task"), GateEnd::NotGated);
        assert_no_request(&mut gate.api, Duration::from_secs(60)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_api_and_failed_writes_are_retried() {
        let mut gate = start_gate();
        // The API server answers 503, then 500: the watcher backs off and lists again.
        expect_list(&mut gate.api).await.fail(503);
        expect_list(&mut gate.api).await.fail(500);
        let gated = node(true, Some(&[]), "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        // The first condition write fails with 500; it is retried after a backoff.
        let seen = next(&mut gate.api).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::PATCH, "/api/v1/nodes/gpu-1/status")
        );
        seen.fail(500);
        let mut watch = None;
        let mut seen = next(&mut gate.api).await;
        if seen.query.contains_key("watch") {
            watch = Some(seen);
            seen = next(&mut gate.api).await;
        }
        assert_eq!(seen.path, "/api/v1/nodes/gpu-1/status");
        seen.json(200, &serde_json::to_value(&gated).expect("node"));
        loop {
            let seen = next(&mut gate.api).await;
            if seen.query.contains_key("watch") {
                watch = Some(seen);
                continue;
            }
            match (&seen.method, seen.path.as_str()) {
                (&Method::GET, "/api/v1/nodes/gpu-1") => {
                    seen.json(200, &serde_json::to_value(&gated).expect("node"))
                }
                (&Method::PATCH, "/api/v1/nodes/gpu-1") => {
                    seen.json(
                        200,
                        &serde_json::to_value(node(false, None, "2")).expect("node"),
                    );
                    break;
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        drop(watch);
        assert_eq!(
            gate.task.await.expect("task"),
            GateEnd::Lifted {
                warm: true,
                reason: "NothingToWarm"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_waiting_gate() {
        let mut gate = start_gate();
        let gated = node(true, Some(&[digest(1)]), "1");
        expect_list(&mut gate.api).await.json(200, &list_of(&gated));
        let _watch = expect_watch(&mut gate.api, "1").await;
        gate.shutdown.cancel();
        assert_eq!(gate.task.await.expect("task"), GateEnd::Shutdown);
    }

    #[tokio::test]
    async fn without_a_node_name_the_gate_is_off() {
        let (_done, receiver) = watch::channel(HashSet::new());
        let gate = spawn(
            None,
            receiver,
            GateOptions::default(),
            CancellationToken::new(),
        )
        .await;
        assert!(gate.is_none());
    }
}
