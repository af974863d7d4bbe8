//! The contract of the stateful fake API server (`common::fake_api`) that the
//! failover tests run the controller against, checked through a kube client:
//! optimistic concurrency, status as a subresource, patches, selectors and
//! watches that resume from a resourceVersion.

mod common;

use common::fake_api::FakeApi;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use stoker_crds::{ImagePrefetch, ImagePrefetchStatus};

fn lease(name: &str, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("team".to_string(), "ml".to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            ..LeaseSpec::default()
        }),
    }
}

fn code(error: kube::Error) -> u16 {
    stoker_controller::http_status(&error).expect("an API error")
}

#[tokio::test]
async fn stale_writes_and_duplicate_creates_get_409() {
    let api = FakeApi::new();
    let leases: Api<Lease> = Api::namespaced(api.client("c"), "ns");
    let created = leases
        .create(&PostParams::default(), &lease("l", "a"))
        .await
        .unwrap();
    assert!(created.metadata.resource_version.is_some());
    assert!(created.metadata.uid.is_some());
    let again = leases
        .create(&PostParams::default(), &lease("l", "a"))
        .await;
    assert_eq!(code(again.unwrap_err()), 409);

    // Two writers read the same version; the second write is stale.
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let mut second = created.clone();
    second.spec.as_mut().unwrap().holder_identity = Some("c".into());
    leases
        .replace("l", &PostParams::default(), &first)
        .await
        .unwrap();
    let stale = leases.replace("l", &PostParams::default(), &second).await;
    assert_eq!(code(stale.unwrap_err()), 409);
    let now = leases.get("l").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(code(leases.get("missing").await.unwrap_err()), 404);

    let requests = api.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [201, 409, 200, 409, 200, 404]
    );
    assert!(requests.iter().all(|r| r.client == "c"));
}

#[tokio::test]
async fn patches_selectors_and_metadata_lists() {
    let api = FakeApi::new();
    let leases: Api<Lease> = Api::namespaced(api.client("c"), "ns");
    leases
        .create(&PostParams::default(), &lease("one", "a"))
        .await
        .unwrap();
    let mut other = lease("two", "a");
    other.metadata.labels = None;
    leases.create(&PostParams::default(), &other).await.unwrap();

    let merged = leases
        .patch(
            "two",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "ml"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.metadata.labels.unwrap()["team"], "ml");
    let selected = leases
        .list(&ListParams::default().labels("team=ml"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 2);
    let none = leases
        .list(&ListParams::default().labels("team!=ml"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
    let metadata = leases.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metadata.items.len(), 2);

    // A JSON patch whose test fails changes nothing.
    let failed = leases
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(serde_json::json!([
                    {"op": "test", "path": "/spec/holderIdentity", "value": "nobody"},
                    {"op": "replace", "path": "/spec/holderIdentity", "value": "x"}
                ]))
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(code(failed.unwrap_err()), 422);
    let one = leases.get("one").await.unwrap();
    assert_eq!(one.spec.unwrap().holder_identity.as_deref(), Some("a"));
}

#[tokio::test]
async fn status_is_a_subresource() {
    let api = FakeApi::new();
    let deployment = common::deployment("app", 1, false);
    let mut prefetch = common::prefetch_for(&deployment);
    prefetch.status = Some(ImagePrefetchStatus {
        image_count: 7,
        ..ImagePrefetchStatus::default()
    });
    let created = api.create(&prefetch);
    assert!(created.status.is_none(), "status is not created");

    let prefetches: Api<ImagePrefetch> = Api::namespaced(api.client("c"), common::NAMESPACE);
    let applied = serde_json::json!({
        "apiVersion": "stoker.dev/v1alpha1", "kind": "ImagePrefetch",
        "status": {"imageCount": 2, "phase": "Learning"},
    });
    prefetches
        .patch_status(
            "app",
            &PatchParams::apply("stoker-controller").force(),
            &Patch::Apply(&applied),
        )
        .await
        .unwrap();
    // A write of the main resource keeps the status; one of the spec moves
    // the generation.
    let mut current = prefetches.get("app").await.unwrap();
    assert_eq!(current.status.as_ref().unwrap().image_count, 2);
    current.status = None;
    current.spec.policy.learn_from_starts = 5;
    let replaced = prefetches
        .replace("app", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(replaced.status.unwrap().image_count, 2);
    assert_eq!(replaced.metadata.generation, Some(2));
}

#[tokio::test]
async fn a_watch_resumes_after_a_resource_version() {
    let api = FakeApi::new();
    let leases: Api<Lease> = Api::namespaced(api.client("c"), "ns");
    let created = leases
        .create(&PostParams::default(), &lease("l", "a"))
        .await
        .unwrap();
    let version = created.metadata.resource_version.clone().unwrap();
    // Changes made before the watch starts are replayed, then live ones arrive.
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("l", &PostParams::default(), &renewed)
        .await
        .unwrap();
    let mut events = leases
        .watch(&WatchParams::default(), &version)
        .await
        .unwrap()
        .boxed();
    leases.delete("l", &Default::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match events.try_next().await.unwrap().expect("an event") {
            WatchEvent::Modified(l) => seen.push(format!(
                "modified {}",
                l.spec.unwrap().holder_identity.unwrap()
            )),
            WatchEvent::Deleted(l) => seen.push(format!("deleted {}", l.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["modified b", "deleted l"]);
}
