//! The gate writer: keeps the `stoker.dev/warm-target` annotation of every
//! gated node (one carrying the startup taint) equal to the plans it must hold
//! before its agent lifts the taint (see `stoker_crds::warm_gate`).
//!
//! Only gated nodes are written, and only when their target changed, so the
//! work follows new nodes and plan changes, not the cluster's size.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use stoker_crds::warm_gate::{WARM_TARGET_ANNOTATION, WarmTarget};

use crate::Error;
use crate::warmer::Warmer;

/// Writes a node's warm target (a JSON merge patch of one annotation, which
/// leaves the node's other annotations alone).
pub async fn write_warm_target(
    client: &Client,
    node: &str,
    target: &WarmTarget,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { WARM_TARGET_ANNOTATION: target.to_annotation() } }
    });
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!(
            "annotate node {node} with its warm target"
        )))?;
    Ok(())
}

/// Writes the warm targets of the gated nodes whose target may have changed,
/// one round. Returns the nodes written. Failed writes are retried next round.
pub async fn write_dirty_gates(client: &Client, warmer: &Warmer) -> Vec<String> {
    let mut written = Vec::new();
    for node in warmer.take_dirty_gates() {
        let Some((target, current)) = warmer.gate_target(&node) else {
            continue;
        };
        let value = target.to_annotation();
        if current.as_deref() == Some(value.as_str()) {
            continue;
        }
        match write_warm_target(client, &node, &target).await {
            Ok(()) => {
                tracing::info!(%node, plans = target.index_digests.len(), "wrote warm target");
                written.push(node);
            }
            Err(error) if matches!(&error, Error::Kube { source, .. } if crate::http_status(source) == Some(404)) =>
                {}
            Err(error) => {
                tracing::warn!(%node, %error, "cannot write warm target; will retry");
                warmer.mark_gate_dirty(&node);
            }
        }
    }
    written
}

/// Runs the gate writer forever.
pub async fn run(client: Client, warmer: Arc<Warmer>) {
    loop {
        let changed = warmer.gates_changed();
        let written = write_dirty_gates(&client, &warmer).await;
        if written.is_empty() && warmer.has_dirty_gates() {
            // Only failures left: back off before retrying.
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        changed.await;
    }
}
