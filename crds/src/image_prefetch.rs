//! The `ImagePrefetch` custom resource (`stoker.dev/v1alpha1`).
//!
//! The spec says which workload to serve, which nodes to warm and how; the
//! status is where the controller records what it learned (per image: the
//! merged startup plan in the compact plan encoding, base64) and how warming
//! goes (node counts, conditions). The status is bounded: see
//! [`MAX_STATUS_PLAN_BYTES`] and [`MAX_LEARN_FROM_STARTS`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most pod starts one ImagePrefetch learns from (the `learnFromStarts` maximum);
/// it bounds [`ImageStatus::learned_from`].
pub const MAX_LEARN_FROM_STARTS: u32 = 20;
/// Most images one ImagePrefetch tracks; further images are ignored with a
/// `Degraded` condition.
pub const MAX_IMAGES: usize = 16;
/// Budget for all base64 plans of one status together. With the rest of the
/// status (bounded lists, short strings) it keeps the object under 64 KiB.
pub const MAX_STATUS_PLAN_BYTES: usize = 40 << 10;

/// What to prefetch for which workload, onto which nodes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "stoker.dev",
    version = "v1alpha1",
    kind = "ImagePrefetch",
    namespaced,
    status = "ImagePrefetchStatus",
    shortname = "ipf",
    category = "stoker",
    doc = "Learns the startup working set of a workload's images from its running pods and \
           warms nodes that can run the workload before its pods are scheduled there.",
    printcolumn = r#"{"name":"Workload","type":"string","jsonPath":".status.workload"}"#,
    printcolumn = r#"{"name":"Images","type":"integer","jsonPath":".status.imageCount"}"#,
    printcolumn = r#"{"name":"Hot","type":"string","jsonPath":".status.hotSize"}"#,
    printcolumn = r#"{"name":"Warm","type":"string","jsonPath":".status.warmNodes","description":"warm nodes / candidate nodes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrefetchSpec {
    /// The workload whose images are learned and prefetched.
    pub workload: WorkloadSelector,
    /// Which nodes to warm, on top of the workload's own scheduling constraints.
    #[serde(default)]
    pub nodes: NodeTargeting,
    /// How much to learn, how much to prefetch, and whether to gate scheduling.
    #[serde(default)]
    pub policy: PrefetchPolicy,
}

/// The workload an ImagePrefetch serves: Deployments in its namespace, by name
/// or by label selector, and/or explicit images.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Name of a Deployment in the ImagePrefetch's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Deployments in the ImagePrefetch's namespace whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Images to warm in addition to the Deployments' containers (or, with no
    /// Deployment, instead of them: then `nodes.nodeSelector` alone picks nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub images: Vec<String>,
}

/// Node targeting. By default the candidate nodes are those the workload's pods
/// can be scheduled on: its nodeSelector, required node affinity and tolerations.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTargeting {
    /// Labels a node must also carry to be warmed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// Learning and warming policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefetchPolicy {
    /// Largest hot set to prefetch per image, as a Kubernetes quantity ("2Gi").
    #[serde(default = "default_max_hot_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub max_hot_size: String,
    /// How long after a container starts its reads count as startup, in seconds.
    /// The window closes earlier when the pod becomes Ready.
    #[serde(default = "default_startup_window_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub startup_window_seconds: u32,
    /// How many pod starts to learn from before the plan is final. Learning
    /// starts again when the workload's image changes.
    #[serde(default = "default_learn_from_starts")]
    #[schemars(range(min = 1, max = 20))]
    pub learn_from_starts: u32,
    /// Keep new nodes tainted (startup taint) until their plans are on disk.
    #[serde(default = "default_true")]
    pub gate_scheduling: bool,
    /// Longest a node stays gated waiting for its plans, in seconds.
    #[serde(default = "default_warm_timeout_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub warm_timeout_seconds: u32,
    /// After the plan, fetch the rest of each image in the background.
    #[serde(default)]
    pub background_fetch_rest: bool,
}

fn default_max_hot_size() -> String {
    "2Gi".into()
}
fn default_startup_window_seconds() -> u32 {
    60
}
fn default_learn_from_starts() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_warm_timeout_seconds() -> u32 {
    600
}

impl Default for PrefetchPolicy {
    fn default() -> Self {
        PrefetchPolicy {
            max_hot_size: default_max_hot_size(),
            startup_window_seconds: default_startup_window_seconds(),
            learn_from_starts: default_learn_from_starts(),
            gate_scheduling: true,
            warm_timeout_seconds: default_warm_timeout_seconds(),
            background_fetch_rest: false,
        }
    }
}

/// The lifecycle phase shown by `kubectl get imageprefetch`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Nothing learned yet and no pod has started.
    #[default]
    Pending,
    /// Collecting startup traces from pod starts.
    Learning,
    /// Pushing plans to candidate nodes that are not warm yet.
    Warming,
    /// Every candidate node is warm.
    Ready,
    /// Something needs attention; see the conditions.
    Degraded,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What the controller learned and how warming goes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrefetchStatus {
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: Phase,
    /// `Ready`, `Learning`, `Warming` and `Degraded`, each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The workload, for printing: `deployment/NAME`, `selector/K=V,…` or `images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Number of images tracked.
    #[serde(default)]
    pub image_count: u32,
    /// Total hot bytes of all plans, for printing ("1.5Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_size: Option<String>,
    /// Warm nodes / candidate nodes, for printing ("3/10").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_nodes: Option<String>,
    /// Per image: what was learned and the plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub images: Vec<ImageStatus>,
    /// Candidate nodes by warm state.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// The last replica change of the workload the controller saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_event: Option<ScaleEvent>,
}

/// One image's learned startup working set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The image reference as the pods name it.
    pub image: String,
    /// The Stoker index the plan applies to ("sha256:…"), once learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// Pod starts merged into the plan.
    #[serde(default)]
    pub pods_learned: u32,
    /// UIDs of the pods learned from (at most `learnFromStarts`), so that a
    /// start is merged once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub learned_from: Vec<String>,
    /// Chunks and uncompressed bytes in the plan.
    #[serde(default)]
    pub hot_chunks: u64,
    #[serde(default)]
    pub hot_bytes: u64,
    /// The prefetch plan: base64 of stoker-format's compact plan encoding
    /// (run-length encoded chunk positions, zstd), bound to `indexDigest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// True when the plan was cut to fit the status size budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan_truncated: bool,
    /// When the plan last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

/// Candidate nodes by warm state. `total` counts candidates; a node is in at
/// most one of warm, warming and failed.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    pub total: u32,
    pub warm: u32,
    pub warming: u32,
    pub failed: u32,
}

/// A replica change of the workload.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    pub time: Time,
    pub from_replicas: i32,
    pub to_replicas: i32,
}

impl ImagePrefetchSpec {
    /// The default spec for a Deployment annotated `stoker.dev/prefetch: "true"`.
    pub fn for_deployment(name: &str) -> Self {
        ImagePrefetchSpec {
            workload: WorkloadSelector {
                deployment: Some(name.to_string()),
                ..WorkloadSelector::default()
            },
            ..ImagePrefetchSpec::default()
        }
    }
}
