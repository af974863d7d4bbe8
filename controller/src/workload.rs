//! Resolving an ImagePrefetch's workload: which Deployments it serves, their
//! images, where their pods may run, and how many replicas they want. Pure
//! logic over the Deployments of the ImagePrefetch's namespace.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use stoker_crds::image_prefetch::MAX_IMAGES;
use stoker_crds::{ImagePrefetch, WorkloadSelector};

use crate::candidates::PodScheduling;
use crate::status::Problem;

/// What an ImagePrefetch serves, as resolved now.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub deployments: Vec<Arc<Deployment>>,
    /// Images in order of first appearance, at most [`MAX_IMAGES`].
    pub images: Vec<String>,
    pub placements: Vec<PodScheduling>,
    /// Desired replicas, summed over the Deployments.
    pub replicas: i32,
    /// For `kubectl get`: `deployment/web`, `selector/app=web`, `images`.
    pub description: String,
    pub problems: Vec<Problem>,
}

/// True if `deployment` is selected by `selector` (by name or labels).
pub fn selects(selector: &WorkloadSelector, deployment: &Deployment) -> bool {
    if selector
        .deployment
        .as_deref()
        .is_some_and(|name| deployment.metadata.name.as_deref() == Some(name))
    {
        return true;
    }
    selector.selector.as_ref().is_some_and(|s| {
        Selector::try_from(s.clone()).is_ok_and(|s| {
            s.matches(
                deployment
                    .metadata
                    .labels
                    .as_ref()
                    .unwrap_or(&Default::default()),
            )
        })
    })
}

/// Resolves the workload of `prefetch` among `deployments` (those of its
/// namespace).
pub fn resolve(prefetch: &ImagePrefetch, deployments: &[Arc<Deployment>]) -> Workload {
    let spec = &prefetch.spec.workload;
    let mut workload = Workload::default();
    if let Some(s) = &spec.selector
        && let Err(e) = Selector::try_from(s.clone())
    {
        workload.problems.push(Problem {
            reason: "InvalidSelector",
            message: format!("spec.workload.selector: {e}"),
        });
    }
    let mut selected: Vec<Arc<Deployment>> = deployments
        .iter()
        .filter(|d| selects(spec, d))
        .cloned()
        .collect();
    selected.sort_by_key(|d| d.name_any());
    if let Some(name) = &spec.deployment
        && !selected.iter().any(|d| d.name_any() == *name)
    {
        workload.problems.push(Problem {
            reason: "DeploymentNotFound",
            message: format!(
                "Deployment {}/{name} not found",
                prefetch.namespace().unwrap_or_default()
            ),
        });
    }
    let mut images: Vec<String> = Vec::new();
    for deployment in &selected {
        let spec = &deployment.spec;
        workload.replicas += spec.replicas.unwrap_or(1);
        if let Some(pod) = spec.template.spec.as_ref() {
            workload.placements.push(PodScheduling::from_pod_spec(pod));
            let containers = pod
                .init_containers
                .iter()
                .flatten()
                .chain(pod.containers.iter());
            images.extend(containers.filter_map(|c| c.image.clone()));
        }
    }
    images.extend(spec.images.iter().cloned());
    if selected.is_empty() && !spec.images.is_empty() {
        // Explicit images only: any node (narrowed by spec.nodes.nodeSelector).
        workload.placements.push(PodScheduling::default());
    }
    let mut unique = Vec::new();
    for image in images {
        if !unique.contains(&image) {
            unique.push(image);
        }
    }
    if unique.len() > MAX_IMAGES {
        workload.problems.push(Problem {
            reason: "TooManyImages",
            message: format!(
                "{} images; only the first {MAX_IMAGES} are learned and warmed",
                unique.len()
            ),
        });
        unique.truncate(MAX_IMAGES);
    }
    workload.images = unique;
    workload.description = match (&spec.deployment, &spec.selector) {
        (Some(name), _) => format!("deployment/{name}"),
        (None, Some(s)) => match Selector::try_from(s.clone()) {
            Ok(s) => format!("selector/{s}"),
            Err(_) => "selector/invalid".into(),
        },
        (None, None) => "images".into(),
    };
    if selected.is_empty() && spec.images.is_empty() && workload.problems.is_empty() {
        workload.problems.push(Problem {
            reason: "NoWorkload",
            message: "no Deployment matches and no images are listed".into(),
        });
    }
    workload.deployments = selected;
    workload
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use std::collections::BTreeMap;
    use stoker_crds::ImagePrefetchSpec;

    fn deployment(
        name: &str,
        labels: &[(&str, &str)],
        images: &[&str],
        replicas: i32,
    ) -> Arc<Deployment> {
        Arc::new(Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ml".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: DeploymentSpec {
                replicas: Some(replicas),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        node_selector: Some(BTreeMap::from([(
                            "gpu".to_string(),
                            "yes".to_string(),
                        )])),
                        containers: images
                            .iter()
                            .enumerate()
                            .map(|(i, image)| Container {
                                name: format!("c{i}"),
                                image: Some(image.to_string()),
                                ..Container::default()
                            })
                            .collect(),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            },
            status: None,
        })
    }

    fn prefetch(workload: WorkloadSelector) -> ImagePrefetch {
        let mut p = ImagePrefetch::new(
            "p",
            ImagePrefetchSpec {
                workload,
                ..ImagePrefetchSpec::default()
            },
        );
        p.metadata.namespace = Some("ml".into());
        p
    }

    #[test]
    fn by_name() {
        let all = [
            deployment("web", &[], &["app:1", "sidecar:1"], 3),
            deployment("other", &[], &["x:1"], 1),
        ];
        let w = resolve(
            &prefetch(WorkloadSelector {
                deployment: Some("web".into()),
                ..Default::default()
            }),
            &all,
        );
        assert_eq!(w.images, ["app:1", "sidecar:1"]);
        assert_eq!(w.replicas, 3);
        assert_eq!(w.description, "deployment/web");
        assert_eq!(w.placements.len(), 1);
        assert_eq!(
            w.placements[0].node_selector.get("gpu").map(String::as_str),
            Some("yes")
        );
        assert!(w.problems.is_empty());
    }

    #[test]
    fn by_selector_with_extra_images_deduplicated() {
        let all = [
            deployment("a", &[("team", "ml")], &["app:1"], 2),
            deployment("b", &[("team", "ml")], &["app:1", "tool:2"], 1),
            deployment("c", &[("team", "web")], &["web:1"], 5),
        ];
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([("team".to_string(), "ml".to_string())])),
            ..LabelSelector::default()
        };
        let w = resolve(
            &prefetch(WorkloadSelector {
                selector: Some(selector),
                images: vec!["extra:1".into(), "app:1".into()],
                ..Default::default()
            }),
            &all,
        );
        assert_eq!(w.images, ["app:1", "tool:2", "extra:1"]);
        assert_eq!(w.replicas, 3);
        assert_eq!(w.description, "selector/team=ml");
        assert_eq!(w.placements.len(), 2);
    }

    #[test]
    fn missing_deployments_and_explicit_images() {
        let w = resolve(
            &prefetch(WorkloadSelector {
                deployment: Some("gone".into()),
                ..Default::default()
            }),
            &[],
        );
        assert_eq!(w.problems[0].reason, "DeploymentNotFound");
        let w = resolve(
            &prefetch(WorkloadSelector {
                images: vec!["a:1".into()],
                ..Default::default()
            }),
            &[],
        );
        assert_eq!(
            (w.images.len(), w.placements.len(), w.description.as_str()),
            (1, 1, "images")
        );
        assert!(w.problems.is_empty());
        let w = resolve(&prefetch(WorkloadSelector::default()), &[]);
        assert_eq!(w.problems[0].reason, "NoWorkload");
    }

    #[test]
    fn images_are_capped() {
        let images: Vec<String> = (0..20).map(|i| format!("img:{i}")).collect();
        let w = resolve(
            &prefetch(WorkloadSelector {
                images,
                ..Default::default()
            }),
            &[],
        );
        assert_eq!(w.images.len(), MAX_IMAGES);
        assert_eq!(w.problems[0].reason, "TooManyImages");
    }
}
