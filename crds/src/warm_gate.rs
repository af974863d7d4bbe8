//! The node warm-gate contract between the controller and the agent.
//!
//! New nodes may register with the startup taint [`STARTUP_TAINT_KEY`]
//! (`NoSchedule`). The controller decides which plans a node must hold before
//! it takes pods and writes them to the node's [`WARM_TARGET_ANNOTATION`]
//! ([`WarmTarget`], JSON). The node's agent executes the plans, and once every
//! listed plan is verified on disk (or the target's timeout passed, or the list
//! is empty) it removes the taint and sets the node condition
//! [`WARM_CONDITION`].
//!
//! Nodes labelled [`CONDITION_GATE_LABEL`]` = `[`CONDITION_GATE_VALUE`] are gated
//! on the condition alone, without the Stoker taint: for clusters where another
//! component (such as the Node Readiness Controller) holds pods off a node until
//! a condition is True. They get a warm target, and their agent sets
//! [`WARM_CONDITION`] the same way; it has no taint to remove.

use serde::{Deserialize, Serialize};

/// The startup taint. Cluster Autoscaler treats keys with the prefix
/// `startup-taint.cluster-autoscaler.kubernetes.io/` as startup taints;
/// Karpenter lists it in `startupTaints`.
pub const STARTUP_TAINT_KEY: &str = "startup-taint.cluster-autoscaler.kubernetes.io/stoker-warming";
/// The startup taint's effect.
pub const STARTUP_TAINT_EFFECT: &str = "NoSchedule";
/// Node condition type the agent sets once the node is warm (or gave up).
pub const WARM_CONDITION: &str = "StokerWarm";
/// Node annotation: the plans the node must hold before its taint is lifted.
pub const WARM_TARGET_ANNOTATION: &str = "stoker.dev/warm-target";

/// Node label that gates a node on [`WARM_CONDITION`] alone (see the module docs).
pub const CONDITION_GATE_LABEL: &str = "stoker.dev/warm-gate";
/// The value of [`CONDITION_GATE_LABEL`] that turns the condition gate on.
pub const CONDITION_GATE_VALUE: &str = "condition";

/// True if `labels` ask for the condition-only gate.
pub fn has_condition_gate_label(
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    labels
        .and_then(|l| l.get(CONDITION_GATE_LABEL))
        .is_some_and(|v| v == CONDITION_GATE_VALUE)
}

/// The value of [`WARM_TARGET_ANNOTATION`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmTarget {
    /// Index digests ("sha256:…") of the plans to hold, sorted, no duplicates.
    /// Empty: nothing to warm, lift the taint now.
    pub index_digests: Vec<String>,
    /// Lift the taint after this many seconds even if plans are not done.
    pub timeout_seconds: u32,
}

/// A warm-target annotation that is not valid JSON of the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("node annotation {WARM_TARGET_ANNOTATION} is malformed: {0}")]
pub struct BadWarmTarget(#[from] serde_json::Error);

impl WarmTarget {
    pub fn new(mut index_digests: Vec<String>, timeout_seconds: u32) -> Self {
        index_digests.sort();
        index_digests.dedup();
        WarmTarget {
            index_digests,
            timeout_seconds,
        }
    }

    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        // A struct of strings and an integer always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_annotation(value: &str) -> Result<Self, BadWarmTarget> {
        Ok(serde_json::from_str(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_target_round_trips_sorted_and_deduplicated() {
        let target = WarmTarget::new(
            vec!["sha256:b".into(), "sha256:a".into(), "sha256:b".into()],
            60,
        );
        assert_eq!(target.index_digests, vec!["sha256:a", "sha256:b"]);
        let value = target.to_annotation();
        assert_eq!(
            value,
            r#"{"indexDigests":["sha256:a","sha256:b"],"timeoutSeconds":60}"#
        );
        assert_eq!(WarmTarget::from_annotation(&value).unwrap(), target);
        let err = WarmTarget::from_annotation("nope").unwrap_err();
        assert!(err.to_string().contains(WARM_TARGET_ANNOTATION));
    }
}
