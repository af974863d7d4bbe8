//! The `stoker.dev/prefetch: "true"` Deployment annotation: the controller
//! creates a default ImagePrefetch of the same name, owned by the Deployment
//! (so it is garbage-collected with it), and deletes it again when the
//! annotation goes away.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use stoker_crds::{ImagePrefetch, ImagePrefetchSpec, PREFETCH_ANNOTATION};

use crate::Error;
use crate::error::http_status;
use crate::reconcile::Context;

/// Label on default ImagePrefetch objects: the Deployment they were made for.
pub const DEFAULT_FOR_LABEL: &str = "stoker.dev/default-for";

/// True if the Deployment asks for a default ImagePrefetch.
pub fn wants_default(deployment: &Deployment) -> bool {
    deployment
        .annotations()
        .get(PREFETCH_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// The default ImagePrefetch of a Deployment.
pub fn default_prefetch(deployment: &Deployment) -> ImagePrefetch {
    let name = deployment.name_any();
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.clone(),
        uid: deployment.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    ImagePrefetch {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: deployment.namespace(),
            labels: Some([(DEFAULT_FOR_LABEL.to_string(), name.clone())].into()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: ImagePrefetchSpec::for_deployment(&name),
        status: None,
    }
}

fn owned_by(prefetch: &ImagePrefetch, deployment: &Deployment) -> bool {
    let uid = deployment.metadata.uid.as_deref();
    prefetch
        .owner_references()
        .iter()
        .any(|o| o.kind == "Deployment" && Some(o.uid.as_str()) == uid)
        && prefetch.labels().contains_key(DEFAULT_FOR_LABEL)
}

/// Creates or deletes the default ImagePrefetch of one Deployment. Idempotent.
pub async fn reconcile(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("deployment");
    let namespace = deployment.namespace().unwrap_or_default();
    let name = deployment.name_any();
    let key = ObjectRef::<ImagePrefetch>::new(&name).within(&namespace);
    let existing = ctx.prefetches.get(&key);
    let api: Api<ImagePrefetch> = Api::namespaced(ctx.client.clone(), &namespace);
    if wants_default(&deployment) {
        if existing.is_some() {
            return Ok(Action::await_change());
        }
        match api
            .create(&PostParams::default(), &default_prefetch(&deployment))
            .await
        {
            Ok(_) => {
                tracing::info!(deployment = %name, namespace = %namespace, "created default ImagePrefetch");
                ctx.publish(
                    &deployment.object_ref(&()),
                    EventType::Normal,
                    "CreatedImagePrefetch",
                    format!(
                        "created ImagePrefetch {name} for the {PREFETCH_ANNOTATION} annotation"
                    ),
                )
                .await;
            }
            // Already there (created by us earlier, or by someone): fine.
            Err(e) if http_status(&e) == Some(409) => {}
            Err(e) => {
                return Err(Error::kube(format!(
                    "create ImagePrefetch {namespace}/{name}"
                ))(e));
            }
        }
    } else if let Some(prefetch) = existing.filter(|p| owned_by(p, &deployment)) {
        match api
            .delete(&prefetch.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(deployment = %name, namespace = %namespace, "deleted default ImagePrefetch")
            }
            Err(e) if http_status(&e) == Some(404) => {}
            Err(e) => {
                return Err(Error::kube(format!(
                    "delete ImagePrefetch {namespace}/{name}"
                ))(e));
            }
        }
    }
    Ok(Action::await_change())
}
