//! A scripted Kubernetes API server for reconcile tests: a kube `Client` over
//! `tower-test`, and helpers that take the next request, check it exactly, and
//! answer it. [`fake_api`] is the stateful alternative: an in-process API
//! server that stores objects, for tests that run the whole controller.

#![allow(dead_code)]

pub mod agent_node;
pub mod fake_api;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, Node, NodeSpec, PodSpec, PodTemplateSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource};
use stoker_controller::fake_agents::FakeAgents;
use stoker_controller::metrics::Metrics;
use stoker_controller::reconcile::Context;
use stoker_controller::warmer::{Warmer, WarmerConfig};
use stoker_crds::ImagePrefetch;
use tower_test::mock::{self, Handle, SendResponse};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// One request the controller made.
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: serde_json::Value,
    respond: SendResponse<Response<Body>>,
}

impl Seen {
    pub fn reply(self, status: StatusCode, body: serde_json::Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response");
        self.respond.send_response(response);
    }

    /// Answers with the request's own body (what the API server does for a
    /// successful create of a simple object).
    pub fn echo(self, status: StatusCode) {
        let body = self.body.clone();
        self.reply(status, body);
    }

    /// Answers with a Kubernetes Status error.
    pub fn fail(self, code: u16, reason: &str) {
        let status = StatusCode::from_u16(code).expect("status code");
        self.reply(
            status,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{reason} (scripted)"), "reason": reason, "code": code
            }),
        );
    }
}

/// Takes the next request, with a deadline so a missing request fails the
/// test instead of hanging it.
pub async fn next(handle: &mut ApiHandle) -> Seen {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(20), handle.next_request())
        .await
        .expect("the controller made no further request within 20 s")
        .expect("the client was dropped");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.expect("request body");
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Seen {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
        respond,
    }
}

/// Takes the next request and checks its method and path.
pub async fn expect(handle: &mut ApiHandle, method: Method, path: &str) -> Seen {
    let seen = next(handle).await;
    assert_eq!(
        (&seen.method, seen.path.as_str()),
        (&method, path),
        "unexpected request; body: {}",
        seen.body
    );
    seen
}

/// Asserts that no request is pending right now.
pub async fn assert_idle(handle: &mut ApiHandle) {
    let pending = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
    if let Ok(Some((request, _))) = pending {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

pub fn query(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A kube client whose requests the test answers.
pub fn mock_client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Everything a reconcile test needs.
pub struct Harness {
    pub ctx: Arc<Context>,
    pub api: ApiHandle,
    pub agents: Arc<FakeAgents>,
    pub warmer: Arc<Warmer>,
    pub prefetches: Writer<ImagePrefetch>,
    pub deployments: Writer<Deployment>,
}

impl Harness {
    pub fn new() -> Self {
        let (client, api) = mock_client();
        let agents = Arc::new(FakeAgents::new());
        let warmer = Warmer::new(
            agents.clone(),
            WarmerConfig {
                retry_base: Duration::from_millis(10),
                max_attempts: 2,
                ..WarmerConfig::default()
            },
        );
        let (prefetch_store, prefetches): (Store<ImagePrefetch>, _) = reflector::store();
        let (deployment_store, deployments): (Store<Deployment>, _) = reflector::store();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "stoker-controller".into(),
                instance: Some("test".into()),
            },
        );
        let ctx = Context::new(
            client,
            prefetch_store,
            deployment_store,
            warmer.clone(),
            agents.clone(),
            Metrics::new().expect("metrics"),
            recorder,
        );
        Harness {
            ctx,
            api,
            agents,
            warmer,
            prefetches,
            deployments,
        }
    }

    pub fn add_prefetch(&mut self, prefetch: &ImagePrefetch) {
        self.prefetches
            .apply_watcher_event(&watcher::Event::Apply(prefetch.clone()));
    }

    pub fn add_deployment(&mut self, deployment: &Deployment) {
        self.deployments
            .apply_watcher_event(&watcher::Event::Apply(deployment.clone()));
    }
}

pub const NAMESPACE: &str = "ml";
pub const IMAGE: &str = "registry.example/app:1";

/// Deployment `name` in [`NAMESPACE`] running [`IMAGE`] on GPU nodes.
pub fn deployment(name: &str, replicas: i32, annotated: bool) -> Deployment {
    let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            uid: Some(format!("uid-{name}")),
            annotations: annotated
                .then(|| BTreeMap::from([("stoker.dev/prefetch".to_string(), "true".to_string())])),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some(BTreeMap::from([("pool".to_string(), "gpu".to_string())])),
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some(IMAGE.into()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// A node of a pool, optionally carrying the startup taint.
pub fn node(name: &str, pool: &str, gated: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("pool".to_string(), pool.to_string())])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: gated.then(|| {
                vec![Taint {
                    key: stoker_crds::warm_gate::STARTUP_TAINT_KEY.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The default ImagePrefetch of `deployment`, with the finalizer already set.
pub fn prefetch_for(deployment: &Deployment) -> ImagePrefetch {
    let mut prefetch = stoker_controller::default_prefetch::default_prefetch(deployment);
    prefetch.metadata.uid = Some("uid-prefetch".into());
    prefetch.metadata.generation = Some(1);
    prefetch.metadata.resource_version = Some("1".into());
    prefetch.meta_mut().finalizers = Some(vec![stoker_crds::FINALIZER.into()]);
    prefetch
}

/// Polls `condition` until it holds, failing after a deadline.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
