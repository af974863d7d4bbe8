//! Gating a new node until it is warm.
//!
//! Nodes may register with the startup taint
//! `startup-taint.cluster-autoscaler.kubernetes.io/stoker-warming=:NoSchedule`
//! (Cluster Autoscaler treats the prefix as a startup taint; Karpenter lists it
//! in `startupTaints`), so the scheduler holds the workload's pods off them. The
//! controller writes the plans each gated node must hold into the node's
//! `stoker.dev/warm-target` annotation (see `stoker_crds::warm_gate`). The
//! agent on the node runs those plans and, with this module:
//!
//! - [`decide`]s whether the node may take pods: every listed plan verified on
//!   disk, or an empty list (nothing to warm: at once), or the timeout passed;
//! - [`lift_startup_taint`]s: sets the node condition `StokerWarm` (True when
//!   warm, False with the reason when it gave up) through the status
//!   subresource, then removes the taint with a JSON patch whose `test`
//!   operation carries the taint list it read, so a concurrent edit of the
//!   taints (another controller, kubectl) makes the patch fail instead of being
//!   overwritten; the node is then read again and the patch retried.
//!
//! [`add_startup_taint`] does the reverse, for tests and tools that simulate a
//! node registering with the taint. [`crate::node_gate`] runs all this on the
//! agent's own Node.
//!
//! Every call here is listed in `stoker_controller::rbac::REQUIRED` (agent:
//! `get`, `list`, `watch` and `patch` on `nodes`, `patch` on `nodes/status`).

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use stoker_crds::warm_gate::{
    STARTUP_TAINT_EFFECT, STARTUP_TAINT_KEY, WARM_CONDITION, WARM_TARGET_ANNOTATION, WarmTarget,
};

/// Field manager of the agent's writes.
const FIELD_MANAGER: &str = "stoker-agent";
/// Attempts at the guarded taint patch when the taints keep changing under it.
const MAX_ATTEMPTS: u32 = 5;

/// What to do about the node's startup taint now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateDecision {
    /// The node does not carry the startup taint.
    NotGated,
    /// Plans are still being warmed: look again later.
    Wait,
    /// Lift the taint now.
    Lift {
        /// True when every plan is on disk (or there was nothing to warm).
        warm: bool,
        /// CamelCase reason for the `StokerWarm` condition.
        reason: &'static str,
        message: String,
    },
}

/// Decides from the node as read, the index digests whose plans are verified
/// on this node's disk, and how long the agent has waited for this node.
/// `default_timeout` applies while the controller has not written a target.
pub fn decide(
    node: &Node,
    done: &HashSet<String>,
    waited: Duration,
    default_timeout: Duration,
) -> GateDecision {
    if !has_startup_taint(node)
        && !stoker_crds::warm_gate::has_condition_gate_label(node.metadata.labels.as_ref())
    {
        return GateDecision::NotGated;
    }
    let annotation = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WARM_TARGET_ANNOTATION));
    let Some(annotation) = annotation else {
        return if waited >= default_timeout {
            GateDecision::Lift {
                warm: false,
                reason: "WarmTimeout",
                message: format!(
                    "no warm target from the controller within {}s",
                    default_timeout.as_secs()
                ),
            }
        } else {
            GateDecision::Wait
        };
    };
    let target = match WarmTarget::from_annotation(annotation) {
        Ok(target) => target,
        // Never hold pods off a node because of a bad annotation.
        Err(error) => {
            return GateDecision::Lift {
                warm: false,
                reason: "BadWarmTarget",
                message: error.to_string(),
            };
        }
    };
    let total = target.index_digests.len();
    let ready = target
        .index_digests
        .iter()
        .filter(|d| done.contains(*d))
        .count();
    if total == 0 {
        GateDecision::Lift {
            warm: true,
            reason: "NothingToWarm",
            message: "no plan applies to this node".into(),
        }
    } else if ready == total {
        GateDecision::Lift {
            warm: true,
            reason: "PlansWarm",
            message: format!("{total} plans verified on disk"),
        }
    } else if waited >= Duration::from_secs(target.timeout_seconds.into()) {
        GateDecision::Lift {
            warm: false,
            reason: "WarmTimeout",
            message: format!(
                "{ready} of {total} plans on disk after {}s",
                target.timeout_seconds
            ),
        }
    } else {
        GateDecision::Wait
    }
}

/// How long, from the start of the wait, the node may stay gated: the
/// target's timeout, or `default_timeout` while the controller has not written
/// one. A malformed target lifts at once (see [`decide`]).
pub fn warm_timeout(node: &Node, default_timeout: Duration) -> Duration {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WARM_TARGET_ANNOTATION))
        .map_or(default_timeout, |annotation| {
            WarmTarget::from_annotation(annotation).map_or(Duration::ZERO, |t| {
                Duration::from_secs(t.timeout_seconds.into())
            })
        })
}

/// True if the node carries the Stoker startup taint.
pub fn has_startup_taint(node: &Node) -> bool {
    taints(node).iter().any(is_startup_taint)
}

fn is_startup_taint(taint: &Taint) -> bool {
    taint.key == STARTUP_TAINT_KEY
}

fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

/// What [`lift_startup_taint`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifted {
    /// False if the taint was already gone.
    pub taint_removed: bool,
}

/// Sets the `StokerWarm` condition (True if `warm`) with `reason`, then
/// removes the startup taint, retrying when the taints changed concurrently.
pub async fn lift_startup_taint(
    client: Client,
    node_name: &str,
    warm: bool,
    reason: &str,
) -> Result<Lifted, kube::Error> {
    lift_with_message(client, node_name, warm, reason, "").await
}

/// [`lift_startup_taint`] with a message for the condition.
pub async fn lift_with_message(
    client: Client,
    node_name: &str,
    warm: bool,
    reason: &str,
    message: &str,
) -> Result<Lifted, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    set_warm_condition(&nodes, node_name, warm, reason, message).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let node = nodes.get(node_name).await?;
        let current = taints(&node);
        if !current.iter().any(is_startup_taint) {
            return Ok(Lifted {
                taint_removed: false,
            });
        }
        let remaining: Vec<Taint> = current
            .iter()
            .filter(|t| !is_startup_taint(t))
            .cloned()
            .collect();
        let patch = serde_json::json!([
            { "op": "test", "path": "/spec/taints", "value": current },
            { "op": "replace", "path": "/spec/taints", "value": remaining },
        ]);
        match json_patch_node(&client, node_name, &patch).await {
            Ok(()) => {
                tracing::info!(node = node_name, warm, reason, "lifted the startup taint");
                return Ok(Lifted {
                    taint_removed: true,
                });
            }
            Err(error) if attempt < MAX_ATTEMPTS && is_precondition_failure(&error) => {
                tracing::debug!(node = node_name, %error, "taints changed concurrently; reading again");
            }
            Err(error) => return Err(error),
        }
    }
}

/// Adds the startup taint (tests, and tools simulating a node registering
/// with it). A no-op if the node has it already.
pub async fn add_startup_taint(client: Client, node_name: &str) -> Result<bool, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let node = nodes.get(node_name).await?;
        if has_startup_taint(&node) {
            return Ok(false);
        }
        let taint = Taint {
            key: STARTUP_TAINT_KEY.into(),
            effect: STARTUP_TAINT_EFFECT.into(),
            ..Taint::default()
        };
        let patch = match node.spec.as_ref().and_then(|s| s.taints.as_ref()) {
            Some(current) => serde_json::json!([
                { "op": "test", "path": "/spec/taints", "value": current },
                { "op": "add", "path": "/spec/taints/-", "value": taint },
            ]),
            None => serde_json::json!([
                { "op": "test", "path": "/spec/taints", "value": null },
                { "op": "add", "path": "/spec/taints", "value": [taint] },
            ]),
        };
        match json_patch_node(&client, node_name, &patch).await {
            Ok(()) => return Ok(true),
            Err(error) if attempt < MAX_ATTEMPTS && is_precondition_failure(&error) => {}
            Err(error) => return Err(error),
        }
    }
}

/// Sets the `StokerWarm` node condition with a strategic merge patch of the
/// status subresource (conditions merge by type, so other conditions stay).
async fn set_warm_condition(
    nodes: &Api<Node>,
    node_name: &str,
    warm: bool,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let now = Timestamp::now().to_string();
    let patch = serde_json::json!({
        "status": { "conditions": [{
            "type": WARM_CONDITION,
            "status": if warm { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }]}
    });
    nodes
        .patch_status(
            node_name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
    Ok(())
}

/// Sends a JSON patch (RFC 6902) to a node. Built by hand so that the agent
/// needs no JSON-patch crate.
async fn json_patch_node(
    client: &Client,
    node_name: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let body = serde_json::to_vec(patch).map_err(kube::Error::SerdeError)?;
    let request = http::Request::builder()
        .method(http::Method::PATCH)
        .uri(format!(
            "/api/v1/nodes/{node_name}?fieldManager={FIELD_MANAGER}"
        ))
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .header(http::header::ACCEPT, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    client.request::<Node>(request).await?;
    Ok(())
}

/// A failed `test` operation answers 422 (Invalid); 409 is a conflict.
fn is_precondition_failure(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409 || status.code == 422)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use http::{Method, Request, Response, StatusCode};
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::client::Body;
    use tower_test::mock::{self, Handle};

    type ApiHandle = Handle<Request<Body>, Response<Body>>;

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }
    }

    fn node(taints: Option<Vec<Taint>>, target: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("gpu-1".into()),
                annotations: target
                    .map(|t| BTreeMap::from([(WARM_TARGET_ANNOTATION.to_string(), t.to_string())])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints,
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn gated(target: Option<&str>) -> Node {
        node(
            Some(vec![taint("nvidia.com/gpu"), taint(STARTUP_TAINT_KEY)]),
            target,
        )
    }

    const MINUTE: Duration = Duration::from_secs(60);
    const TEN_MINUTES: Duration = Duration::from_secs(600);

    fn done(digests: &[&str]) -> HashSet<String> {
        digests.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn ungated_nodes_need_nothing() {
        assert_eq!(
            decide(&node(None, None), &done(&[]), MINUTE, TEN_MINUTES),
            GateDecision::NotGated
        );
        let other = node(Some(vec![taint("nvidia.com/gpu")]), None);
        assert_eq!(
            decide(&other, &done(&[]), MINUTE, TEN_MINUTES),
            GateDecision::NotGated
        );
    }

    #[test]
    fn a_node_waits_for_every_listed_plan_until_the_timeout() {
        let target = r#"{"indexDigests":["sha256:a","sha256:b"],"timeoutSeconds":300}"#;
        let n = gated(Some(target));
        assert_eq!(
            decide(&n, &done(&["sha256:a"]), MINUTE, TEN_MINUTES),
            GateDecision::Wait
        );
        assert!(matches!(
            decide(
                &n,
                &done(&["sha256:a", "sha256:b", "sha256:x"]),
                MINUTE,
                TEN_MINUTES
            ),
            GateDecision::Lift {
                warm: true,
                reason: "PlansWarm",
                ..
            }
        ));
        let GateDecision::Lift {
            warm,
            reason,
            message,
        } = decide(
            &n,
            &done(&["sha256:a"]),
            Duration::from_secs(300),
            TEN_MINUTES,
        )
        else {
            panic!("expected a lift at the timeout");
        };
        assert_eq!(
            (warm, reason, message.as_str()),
            (false, "WarmTimeout", "1 of 2 plans on disk after 300s")
        );
    }

    #[test]
    fn a_condition_gated_node_without_the_taint_is_gated_too() {
        let target = r#"{"indexDigests":["sha256:a"],"timeoutSeconds":300}"#;
        let mut n = node(Some(vec![taint("nvidia.com/gpu")]), Some(target));
        n.metadata.labels = Some(BTreeMap::from([(
            stoker_crds::warm_gate::CONDITION_GATE_LABEL.to_string(),
            stoker_crds::warm_gate::CONDITION_GATE_VALUE.to_string(),
        )]));
        assert_eq!(
            decide(&n, &done(&[]), MINUTE, TEN_MINUTES),
            GateDecision::Wait
        );
        assert!(matches!(
            decide(&n, &done(&["sha256:a"]), MINUTE, TEN_MINUTES),
            GateDecision::Lift {
                warm: true,
                reason: "PlansWarm",
                ..
            }
        ));
        n.metadata.labels = Some(BTreeMap::from([(
            stoker_crds::warm_gate::CONDITION_GATE_LABEL.to_string(),
            "off".to_string(),
        )]));
        assert_eq!(
            decide(&n, &done(&[]), MINUTE, TEN_MINUTES),
            GateDecision::NotGated
        );
    }

    #[test]
    fn nothing_to_warm_lifts_at_once() {
        let n = gated(Some(r#"{"indexDigests":[],"timeoutSeconds":600}"#));
        assert!(matches!(
            decide(&n, &done(&[]), Duration::ZERO, TEN_MINUTES),
            GateDecision::Lift {
                warm: true,
                reason: "NothingToWarm",
                ..
            }
        ));
    }

    #[test]
    fn without_a_target_the_default_timeout_applies_and_bad_targets_never_hold_pods() {
        let n = gated(None);
        assert_eq!(
            decide(&n, &done(&[]), MINUTE, TEN_MINUTES),
            GateDecision::Wait
        );
        assert!(matches!(
            decide(&n, &done(&[]), TEN_MINUTES, TEN_MINUTES),
            GateDecision::Lift {
                warm: false,
                reason: "WarmTimeout",
                ..
            }
        ));
        assert!(matches!(
            decide(
                &gated(Some("{oops")),
                &done(&[]),
                Duration::ZERO,
                TEN_MINUTES
            ),
            GateDecision::Lift {
                warm: false,
                reason: "BadWarmTarget",
                ..
            }
        ));
    }

    fn mock_client() -> (Client, ApiHandle) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), handle)
    }

    /// Takes the next request (with a deadline), checks method and URI, and
    /// returns its JSON body and the responder.
    async fn expect(
        handle: &mut ApiHandle,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
    ) -> (
        serde_json::Value,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(20), handle.next_request())
            .await
            .expect("no request within 20 s")
            .expect("client dropped");
        assert_eq!(
            (request.method(), request.uri().to_string().as_str()),
            (&method, uri)
        );
        assert_eq!(
            request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            content_type,
            "content type of {method} {uri}"
        );
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (body, send)
    }

    fn reply(
        send: tower_test::mock::SendResponse<Response<Body>>,
        code: u16,
        body: &serde_json::Value,
    ) {
        let response = Response::builder()
            .status(StatusCode::from_u16(code).expect("code"))
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response");
        send.send_response(response);
    }

    fn status_error(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "scripted", "reason": reason, "code": code})
    }

    const NODE: &str = "/api/v1/nodes/gpu-1";
    const JSON_PATCH: Option<&str> = Some("application/json-patch+json");

    async fn expect_condition(handle: &mut ApiHandle, status: &str, reason: &str) {
        let (body, send) = expect(
            handle,
            Method::PATCH,
            "/api/v1/nodes/gpu-1/status?",
            Some("application/strategic-merge-patch+json"),
        )
        .await;
        let condition = &body["status"]["conditions"][0];
        assert_eq!(condition["type"], WARM_CONDITION);
        assert_eq!(condition["status"], status);
        assert_eq!(condition["reason"], reason);
        assert!(condition["lastTransitionTime"].is_string());
        reply(send, 200, &serde_json::to_value(gated(None)).expect("node"));
    }

    #[tokio::test]
    async fn lifting_sets_the_condition_then_removes_only_the_startup_taint() {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(lift_startup_taint(client, "gpu-1", true, "PlansWarm"));
        expect_condition(&mut api, "True", "PlansWarm").await;
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        reply(send, 200, &serde_json::to_value(gated(None)).expect("node"));
        let (patch, send) = expect(
            &mut api,
            Method::PATCH,
            &format!("{NODE}?fieldManager=stoker-agent"),
            JSON_PATCH,
        )
        .await;
        assert_eq!(
            patch,
            serde_json::json!([
                {"op": "test", "path": "/spec/taints", "value": [
                    {"key": "nvidia.com/gpu", "effect": "NoSchedule"},
                    {"key": STARTUP_TAINT_KEY, "effect": "NoSchedule"}]},
                {"op": "replace", "path": "/spec/taints", "value": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}
            ])
        );
        reply(
            send,
            200,
            &serde_json::to_value(node(Some(vec![taint("nvidia.com/gpu")]), None)).expect("node"),
        );
        assert_eq!(
            task.await.expect("task").expect("lift"),
            Lifted {
                taint_removed: true
            }
        );
    }

    #[tokio::test]
    async fn a_concurrent_taint_change_is_read_again_not_overwritten() {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(lift_startup_taint(client, "gpu-1", false, "WarmTimeout"));
        expect_condition(&mut api, "False", "WarmTimeout").await;
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        reply(send, 200, &serde_json::to_value(gated(None)).expect("node"));
        // Someone added a taint in between: the test operation fails.
        let (_, send) = expect(
            &mut api,
            Method::PATCH,
            &format!("{NODE}?fieldManager=stoker-agent"),
            JSON_PATCH,
        )
        .await;
        reply(send, 422, &status_error(422, "Invalid"));
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        let changed = node(
            Some(vec![
                taint("nvidia.com/gpu"),
                taint(STARTUP_TAINT_KEY),
                taint("new"),
            ]),
            None,
        );
        reply(send, 200, &serde_json::to_value(&changed).expect("node"));
        let (patch, send) = expect(
            &mut api,
            Method::PATCH,
            &format!("{NODE}?fieldManager=stoker-agent"),
            JSON_PATCH,
        )
        .await;
        assert_eq!(
            patch[1]["value"],
            serde_json::json!([{"key": "nvidia.com/gpu", "effect": "NoSchedule"}, {"key": "new", "effect": "NoSchedule"}])
        );
        reply(
            send,
            200,
            &serde_json::to_value(node(None, None)).expect("node"),
        );
        assert_eq!(
            task.await.expect("task").expect("lift"),
            Lifted {
                taint_removed: true
            }
        );
    }

    #[tokio::test]
    async fn an_untainted_node_only_gets_its_condition_and_errors_surface() {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(lift_startup_taint(
            client.clone(),
            "gpu-1",
            true,
            "NothingToWarm",
        ));
        expect_condition(&mut api, "True", "NothingToWarm").await;
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        reply(
            send,
            200,
            &serde_json::to_value(node(None, None)).expect("node"),
        );
        assert_eq!(
            task.await.expect("task").expect("lift"),
            Lifted {
                taint_removed: false
            }
        );

        let task = tokio::spawn(lift_startup_taint(client, "gpu-1", true, "PlansWarm"));
        let (_, send) = expect(
            &mut api,
            Method::PATCH,
            "/api/v1/nodes/gpu-1/status?",
            Some("application/strategic-merge-patch+json"),
        )
        .await;
        reply(send, 403, &status_error(403, "Forbidden"));
        let error = task.await.expect("task").expect_err("forbidden");
        assert!(
            matches!(error, kube::Error::Api(ref s) if s.code == 403),
            "{error}"
        );
    }

    #[tokio::test]
    async fn tainting_adds_the_startup_taint_guarded_by_the_current_list() {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(add_startup_taint(client.clone(), "gpu-1"));
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        reply(
            send,
            200,
            &serde_json::to_value(node(None, None)).expect("node"),
        );
        let (patch, send) = expect(
            &mut api,
            Method::PATCH,
            &format!("{NODE}?fieldManager=stoker-agent"),
            JSON_PATCH,
        )
        .await;
        assert_eq!(
            patch,
            serde_json::json!([
                {"op": "test", "path": "/spec/taints", "value": null},
                {"op": "add", "path": "/spec/taints", "value": [{"key": STARTUP_TAINT_KEY, "effect": "NoSchedule"}]}
            ])
        );
        reply(send, 200, &serde_json::to_value(gated(None)).expect("node"));
        assert!(task.await.expect("task").expect("taint"));

        // Already tainted: nothing to do.
        let task = tokio::spawn(add_startup_taint(client, "gpu-1"));
        let (_, send) = expect(&mut api, Method::GET, NODE, None).await;
        reply(send, 200, &serde_json::to_value(gated(None)).expect("node"));
        assert!(!task.await.expect("task").expect("taint"));
    }
}
