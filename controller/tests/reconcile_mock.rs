//! Reconciles against a scripted API server (kube `Client` over `tower-test`):
//! each test asserts the exact requests the controller makes and answers them.

mod common;

use std::sync::Arc;

use common::*;
use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use stoker_api::agent::{GetTraceResponse, TraceEntry, TraceSummary};
use stoker_controller::{default_prefetch, learning, reconcile};
use stoker_crds::{FINALIZER, ImagePrefetch, ImagePrefetchStatus, Phase};
use stoker_format::Digest;

const PREFETCHES: &str = "/apis/stoker.dev/v1alpha1/namespaces/ml/imageprefetches";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

#[tokio::test]
async fn an_annotated_deployment_gets_a_default_prefetch_and_an_event() {
    let mut h = Harness::new();
    let web = Arc::new(deployment("web", 2, true));
    let task = tokio::spawn(default_prefetch::reconcile(web.clone(), h.ctx.clone()));

    let create = expect(&mut h.api, Method::POST, PREFETCHES).await;
    let body = &create.body;
    assert_eq!(body["apiVersion"], "stoker.dev/v1alpha1");
    assert_eq!(body["kind"], "ImagePrefetch");
    assert_eq!(body["metadata"]["name"], "web");
    assert_eq!(body["metadata"]["labels"]["stoker.dev/default-for"], "web");
    assert_eq!(
        body["metadata"]["ownerReferences"],
        serde_json::json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-web", "controller": true}])
    );
    assert_eq!(
        body["spec"]["workload"],
        serde_json::json!({"deployment": "web"})
    );
    create.echo(StatusCode::CREATED);

    let event = expect(&mut h.api, Method::POST, EVENTS).await;
    assert_eq!(event.body["reason"], "CreatedImagePrefetch");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["regarding"]["kind"], "Deployment");
    assert_eq!(event.body["regarding"]["name"], "web");
    assert_eq!(event.body["reportingController"], "stoker-controller");
    event.echo(StatusCode::CREATED);

    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_idle(&mut h.api).await;
}

#[tokio::test]
async fn an_existing_default_prefetch_is_left_alone_and_removed_with_the_annotation() {
    let mut h = Harness::new();
    let annotated = deployment("web", 2, true);
    // Created concurrently by another replica: 409 is success, no Event.
    let task = tokio::spawn(default_prefetch::reconcile(
        Arc::new(annotated.clone()),
        h.ctx.clone(),
    ));
    expect(&mut h.api, Method::POST, PREFETCHES)
        .await
        .fail(409, "AlreadyExists");
    task.await.unwrap().unwrap();
    assert_idle(&mut h.api).await;

    // In the store: nothing to do.
    h.add_prefetch(&prefetch_for(&annotated));
    default_prefetch::reconcile(Arc::new(annotated.clone()), h.ctx.clone())
        .await
        .unwrap();
    assert_idle(&mut h.api).await;

    // The annotation is gone: the default (owned, labelled) one is deleted.
    let plain = Arc::new(deployment("web", 2, false));
    let task = tokio::spawn(default_prefetch::reconcile(plain, h.ctx.clone()));
    let delete = expect(&mut h.api, Method::DELETE, &format!("{PREFETCHES}/web")).await;
    delete.reply(
        StatusCode::OK,
        serde_json::to_value(prefetch_for(&annotated)).unwrap(),
    );
    task.await.unwrap().unwrap();
    assert_idle(&mut h.api).await;
}

#[tokio::test]
async fn the_first_reconcile_adds_the_finalizer_with_a_guarded_json_patch() {
    let mut h = Harness::new();
    let web = deployment("web", 2, true);
    let mut fresh = prefetch_for(&web);
    fresh.metadata.finalizers = None;
    let task = tokio::spawn(reconcile::reconcile(Arc::new(fresh.clone()), h.ctx.clone()));

    let patch = expect(&mut h.api, Method::PATCH, &format!("{PREFETCHES}/web")).await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_eq!(
        patch.body,
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ])
    );
    fresh.metadata.finalizers = Some(vec![FINALIZER.into()]);
    patch.reply(StatusCode::OK, serde_json::to_value(&fresh).unwrap());
    // The finalizer helper waits for the object to come back with it.
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

fn trace_on_node(container_id: &str, chunks: &[u32]) -> GetTraceResponse {
    GetTraceResponse {
        summary: Some(TraceSummary {
            trace_id: format!("trace-{container_id}"),
            image_ref: IMAGE.into(),
            index_digest: Digest::of(b"index").to_string(),
            container_id: container_id.into(),
            started_at_unix_ms: 1,
            entries: chunks.len() as u64,
            complete: true,
            truncated: false,
        }),
        entries: chunks
            .iter()
            .enumerate()
            .map(|(i, &chunk)| TraceEntry {
                chunk_index: chunk,
                chunk_digest: String::new(),
                path: "/app/model.bin".into(),
                file_offset: i as u64 * (1 << 20),
                micros_since_start: i as u64 * 100,
                chunk_length: 1 << 20,
            })
            .collect(),
    }
}

fn running_pod(name: &str, node: &str, container_id: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                     "labels": {"app": "web"}, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": IMAGE}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "app", "image": IMAGE, "imageID": "", "ready": true, "restartCount": 0,
            "containerID": format!("containerd://{container_id}"),
            "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}
        }]}
    }))
    .unwrap()
}

/// Answers the GET of the `default` ServiceAccount: one without pull secrets.
async fn answer_default_service_account(api: &mut common::ApiHandle) {
    expect(
        api,
        Method::GET,
        "/api/v1/namespaces/ml/serviceaccounts/default",
    )
    .await
    .reply(
        StatusCode::OK,
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": {"name": "default", "namespace": "ml"}}),
    );
}

#[tokio::test]
async fn learning_from_a_pod_start_patches_status_pushes_the_plan_and_publishes_events() {
    let mut h = Harness::new();
    let web = deployment("web", 2, true);
    h.add_deployment(&web);
    let prefetch = prefetch_for(&web);
    h.add_prefetch(&prefetch);
    for name in ["gpu-1", "gpu-2"] {
        h.warmer.node_applied(&node(name, "gpu", false));
    }
    h.warmer.node_applied(&node("cpu-1", "cpu", false));
    h.agents
        .add_trace("gpu-1", trace_on_node("c1", &[7, 8, 9, 42]));

    let task = tokio::spawn(reconcile::reconcile(
        Arc::new(prefetch.clone()),
        h.ctx.clone(),
    ));

    // The workload's pods, by the Deployment's selector.
    let list = expect(&mut h.api, Method::GET, "/api/v1/namespaces/ml/pods").await;
    assert_eq!(list.query, query(&[("labelSelector", "app%3Dweb")]));
    list.reply(
        StatusCode::OK,
        serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                           "items": [running_pod("web-1", "gpu-1", "c1")]}),
    );
    // The pods' pull secrets: the template names none, its ServiceAccount none.
    answer_default_service_account(&mut h.api).await;

    // The status, by server-side apply on the status subresource.
    let patch = expect(
        &mut h.api,
        Method::PATCH,
        &format!("{PREFETCHES}/web/status"),
    )
    .await;
    assert_eq!(
        patch.query,
        query(&[("fieldManager", "stoker-controller"), ("force", "true")])
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(patch.body["apiVersion"], "stoker.dev/v1alpha1");
    assert_eq!(patch.body["kind"], "ImagePrefetch");
    let status: ImagePrefetchStatus = serde_json::from_value(patch.body["status"].clone()).unwrap();
    assert_eq!(status.phase, Phase::Warming);
    assert_eq!(status.workload.as_deref(), Some("deployment/web"));
    assert_eq!(status.image_count, 1);
    assert_eq!(status.hot_size.as_deref(), Some("4.0Mi"));
    assert_eq!(
        status.nodes.total, 2,
        "the two gpu nodes are candidates, the cpu node is not"
    );
    let image = &status.images[0];
    assert_eq!(image.image, IMAGE);
    assert_eq!(
        image.index_digest.as_deref(),
        Some(Digest::of(b"index").to_string().as_str())
    );
    assert_eq!(
        (image.pods_learned, image.hot_chunks, image.hot_bytes),
        (1, 4, 4 << 20)
    );
    assert_eq!(image.learned_from, ["uid-web-1"]);
    let plan = learning::decode_from_status(image.plan.as_deref().unwrap()).unwrap();
    assert_eq!(plan.chunks, [7, 8, 9, 42]);
    let learning_condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Learning")
        .unwrap();
    assert_eq!(
        (
            learning_condition.status.as_str(),
            learning_condition.reason.as_str()
        ),
        ("True", "CollectingTraces")
    );
    let mut patched = prefetch.clone();
    patched.status = Some(status.clone());
    patch.reply(StatusCode::OK, serde_json::to_value(&patched).unwrap());

    // Events: the plan on the ImagePrefetch and on the Deployment, then the phase.
    for (kind, reason) in [
        ("ImagePrefetch", "PlanLearned"),
        ("Deployment", "PlanLearned"),
        ("ImagePrefetch", "Warming"),
    ] {
        let event = expect(&mut h.api, Method::POST, EVENTS).await;
        assert_eq!(
            (
                event.body["regarding"]["kind"].as_str(),
                event.body["reason"].as_str()
            ),
            (Some(kind), Some(reason))
        );
        event.echo(StatusCode::CREATED);
    }
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(60)));

    // The plan went to both candidate agents, and both report warm.
    eventually("pushes to both gpu nodes", || h.agents.push_count() == 2).await;
    let mut pushed: Vec<String> = h.agents.pushes().iter().map(|p| p.node.clone()).collect();
    pushed.sort();
    assert_eq!(pushed, ["gpu-1", "gpu-2"]);
    let key = ObjectRef::from_obj(&prefetch);
    eventually("both nodes warm", || h.warmer.counts(&key).warm == 2).await;

    // The next reconcile records Ready and says so on both objects; learning
    // goes on (1 of 3 starts) without asking agents about a learned pod again.
    patched.metadata.resource_version = Some("2".into());
    let task = tokio::spawn(reconcile::reconcile(
        Arc::new(patched.clone()),
        h.ctx.clone(),
    ));
    let list = expect(&mut h.api, Method::GET, "/api/v1/namespaces/ml/pods").await;
    list.reply(
        StatusCode::OK,
        serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                           "items": [running_pod("web-1", "gpu-1", "c1")]}),
    );
    answer_default_service_account(&mut h.api).await;
    let patch = expect(
        &mut h.api,
        Method::PATCH,
        &format!("{PREFETCHES}/web/status"),
    )
    .await;
    let status: ImagePrefetchStatus = serde_json::from_value(patch.body["status"].clone()).unwrap();
    assert_eq!(
        (status.phase, status.warm_nodes.as_deref()),
        (Phase::Ready, Some("2/2"))
    );
    assert_eq!(status.images[0].pods_learned, 1);
    patched.status = Some(status);
    patch.reply(StatusCode::OK, serde_json::to_value(&patched).unwrap());
    for kind in ["ImagePrefetch", "Deployment"] {
        let event = expect(&mut h.api, Method::POST, EVENTS).await;
        assert_eq!(
            (
                event.body["regarding"]["kind"].as_str(),
                event.body["reason"].as_str()
            ),
            (Some(kind), Some("Ready"))
        );
        event.echo(StatusCode::CREATED);
    }
    task.await.unwrap().unwrap();
    assert_idle(&mut h.api).await;
}

#[tokio::test]
async fn a_status_conflict_is_retried_with_backoff() {
    let mut h = Harness::new();
    let web = deployment("web", 1, true);
    h.add_deployment(&web);
    let mut prefetch = prefetch_for(&web);
    // Learning is complete: no pod listing; the pull secrets, then the status.
    prefetch.spec.policy.learn_from_starts = 1;
    prefetch.status = Some(ImagePrefetchStatus {
        images: vec![stoker_crds::ImageStatus {
            image: IMAGE.into(),
            pods_learned: 1,
            ..Default::default()
        }],
        ..Default::default()
    });
    let prefetch = Arc::new(prefetch);
    let task = tokio::spawn(reconcile::reconcile(prefetch.clone(), h.ctx.clone()));
    answer_default_service_account(&mut h.api).await;
    expect(
        &mut h.api,
        Method::PATCH,
        &format!("{PREFETCHES}/web/status"),
    )
    .await
    .fail(409, "Conflict");
    let error = task.await.unwrap().unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert_eq!(error.metric_label(), "kube_conflict");
    // 1 s, then 2 s: exponential backoff per object.
    let first = reconcile::error_policy(prefetch.clone(), &error, h.ctx.clone());
    let second = reconcile::error_policy(prefetch.clone(), &error, h.ctx.clone());
    assert_eq!(first, Action::requeue(std::time::Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(std::time::Duration::from_secs(2)));
    let text = h.ctx.metrics.encode();
    assert!(text.contains(r#"stoker_controller_reconcile_errors_total{controller="imageprefetch",error="kube_conflict"} 2"#), "{text}");
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_with_backoff_forbidden_is_not() {
    let mut h = Harness::new();
    let web = deployment("web", 1, true);
    h.add_deployment(&web);
    let mut prefetch = prefetch_for(&web);
    prefetch.spec.policy.learn_from_starts = 1;
    prefetch.status = Some(ImagePrefetchStatus {
        images: vec![stoker_crds::ImageStatus {
            image: IMAGE.into(),
            pods_learned: 1,
            ..Default::default()
        }],
        ..Default::default()
    });
    let prefetch = Arc::new(prefetch);
    let mut delays = Vec::new();
    for (code, reason, label, transient) in [
        (429, "TooManyRequests", "kube_throttled", true),
        (503, "ServiceUnavailable", "kube_server_error", true),
        (500, "InternalError", "kube_server_error", true),
        (403, "Forbidden", "kube_client_error", false),
    ] {
        let task = tokio::spawn(reconcile::reconcile(prefetch.clone(), h.ctx.clone()));
        answer_default_service_account(&mut h.api).await;
        expect(
            &mut h.api,
            Method::PATCH,
            &format!("{PREFETCHES}/web/status"),
        )
        .await
        .fail(code, reason);
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(
            (error.is_transient(), error.metric_label()),
            (transient, label),
            "{code}: {error}"
        );
        delays.push(reconcile::error_policy(
            prefetch.clone(),
            &error,
            h.ctx.clone(),
        ));
    }
    // 1 s, 2 s, 4 s for the transient ones (per object); 5 minutes for 403.
    assert_eq!(
        delays,
        [1, 2, 4, 300].map(|s| Action::requeue(std::time::Duration::from_secs(s)))
    );
    let text = h.ctx.metrics.encode();
    assert!(text.contains(r#"stoker_controller_reconcile_errors_total{controller="imageprefetch",error="kube_throttled"} 1"#), "{text}");
    assert!(text.contains(r#"stoker_controller_reconcile_errors_total{controller="imageprefetch",error="kube_server_error"} 2"#), "{text}");
}

#[tokio::test]
async fn deletion_cancels_running_prefetches_and_removes_the_finalizer() {
    let mut h = Harness::new();
    let web = deployment("web", 1, true);
    h.add_deployment(&web);
    let mut prefetch = prefetch_for(&web);
    prefetch.spec.policy.learn_from_starts = 1;
    let plan = stoker_format::Plan {
        index_digest: Digest::of(b"index"),
        chunks: vec![1, 2, 3],
    };
    prefetch.status = Some(ImagePrefetchStatus {
        images: vec![stoker_crds::ImageStatus {
            image: IMAGE.into(),
            index_digest: Some(Digest::of(b"index").to_string()),
            pods_learned: 1,
            plan: Some(learning::encode_for_status(&plan, 10_000).unwrap().base64),
            ..Default::default()
        }],
        phase: Phase::Warming,
        ..Default::default()
    });
    h.agents.set_stalled("gpu-1", true);
    h.warmer.node_applied(&node("gpu-1", "gpu", false));
    let key = ObjectRef::from_obj(&prefetch);
    // Register the target without a reconcile against the API.
    h.warmer.set_target(
        &key,
        stoker_controller::warmer::Target {
            placements: vec![stoker_controller::candidates::PodScheduling::from_pod_spec(
                web.spec.template.spec.as_ref().unwrap(),
            )],
            plans: vec![stoker_controller::warmer::PlanPush {
                image: IMAGE.into(),
                index_digest: Digest::of(b"index").to_string(),
                plan: plan.encode().unwrap().into(),
                background_rest: false,
                learning_complete: false,
            }],
            gate: true,
            warm_timeout_seconds: 600,
            ..Default::default()
        },
    );
    eventually("the stalled push started", || h.agents.push_count() == 1).await;

    prefetch.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let task = tokio::spawn(reconcile::reconcile(
        Arc::new(prefetch.clone()),
        h.ctx.clone(),
    ));
    let patch = expect(&mut h.api, Method::PATCH, &format!("{PREFETCHES}/web")).await;
    assert_eq!(
        patch.body,
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ])
    );
    let mut finalized = prefetch.clone();
    finalized.metadata.finalizers = None;
    patch.reply(StatusCode::OK, serde_json::to_value(&finalized).unwrap());
    task.await.unwrap().unwrap();
    assert_eq!(
        h.agents.cancels(),
        [("gpu-1".to_string(), Digest::of(b"index").to_string())]
    );
    assert!(!h.warmer.has_target(&key));
    assert_idle(&mut h.api).await;
}

#[tokio::test]
async fn gated_nodes_get_their_warm_target_written_once() {
    let mut h = Harness::new();
    let web = deployment("web", 1, true);
    let prefetch: ImagePrefetch = prefetch_for(&web);
    let key = ObjectRef::from_obj(&prefetch);
    h.warmer.node_applied(&node("gpu-new", "gpu", true));
    h.warmer.node_applied(&node("cpu-new", "cpu", true));
    h.warmer.node_applied(&node("gpu-old", "gpu", false));
    h.warmer.set_target(
        &key,
        stoker_controller::warmer::Target {
            placements: vec![stoker_controller::candidates::PodScheduling::from_pod_spec(
                web.spec.template.spec.as_ref().unwrap(),
            )],
            plans: vec![stoker_controller::warmer::PlanPush {
                image: IMAGE.into(),
                index_digest: "sha256:aa".into(),
                plan: vec![1, 2, 3].into(),
                background_rest: false,
                learning_complete: false,
            }],
            gate: true,
            warm_timeout_seconds: 300,
            ..Default::default()
        },
    );
    // Nothing is written before every ImagePrefetch was reconciled once.
    assert!(
        stoker_controller::gate::write_dirty_gates(&h.ctx.client, &h.warmer)
            .await
            .is_empty()
    );
    h.warmer.set_synced();

    let client = h.ctx.client.clone();
    let warmer = h.warmer.clone();
    let task =
        tokio::spawn(
            async move { stoker_controller::gate::write_dirty_gates(&client, &warmer).await },
        );
    let mut written = Vec::new();
    for _ in 0..2 {
        let seen = next(&mut h.api).await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(
            seen.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        let node = seen
            .path
            .strip_prefix("/api/v1/nodes/")
            .unwrap()
            .to_string();
        let value = seen.body["metadata"]["annotations"]["stoker.dev/warm-target"]
            .as_str()
            .unwrap()
            .to_string();
        written.push((node, value));
        seen.reply(
            StatusCode::OK,
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "x"}}),
        );
    }
    written.sort();
    assert_eq!(
        written,
        [
            // A gated node no plan applies to is released at once (empty list).
            (
                "cpu-new".to_string(),
                r#"{"indexDigests":[],"timeoutSeconds":600}"#.to_string()
            ),
            (
                "gpu-new".to_string(),
                r#"{"indexDigests":["sha256:aa"],"timeoutSeconds":300}"#.to_string()
            ),
        ]
    );
    assert_eq!(task.await.unwrap().len(), 2);
    // Once the node carries it (seen through the watch), nothing more is written.
    let mut annotated = node("gpu-new", "gpu", true);
    annotated.metadata.annotations = Some(
        [(
            "stoker.dev/warm-target".to_string(),
            r#"{"indexDigests":["sha256:aa"],"timeoutSeconds":300}"#.to_string(),
        )]
        .into(),
    );
    h.warmer.node_applied(&annotated);
    assert!(
        stoker_controller::gate::write_dirty_gates(&h.ctx.client, &h.warmer)
            .await
            .is_empty()
    );
    assert_idle(&mut h.api).await;
}
