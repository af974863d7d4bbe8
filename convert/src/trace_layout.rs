//! Trace-ordered layout (`stoker convert --plan`): finding the chunks a prefetch
//! plan names, and binding the plan to the index the conversion produced.
//!
//! A plan names chunks by their position in one index. To lay an image out by a
//! plan, the converter finds that index among the image's Stoker artifacts (so a
//! plan of another image is refused before any work), turns the positions into
//! chunk digests (the *hot list*), converts with the hot list (see [`crate::pack`]),
//! and finally maps the digests to their positions in the new index: the same
//! plan, re-bound, which is what nodes must warm from.

use std::collections::{HashMap, HashSet};

use stoker_format::{Digest, Index, Plan};

use crate::ConvertError;
use crate::artifact::{load_index, read_artifact};
use crate::source::{ImageStore, Manifest};

/// The platform manifest a plan belongs to and the chunks it names.
pub(crate) struct PlanTarget {
    pub platform: Option<String>,
    pub manifest: Manifest,
    /// Distinct chunk digests of the plan, in plan order.
    pub hot: Vec<Digest>,
}

/// Finds the platform manifest of `selector` whose Stoker artifact has the plan's
/// index, checks the plan against that index and the conversion's chunking, and
/// returns the plan's chunk digests in plan order.
pub(crate) async fn resolve(
    store: &ImageStore,
    selector: &str,
    platforms: &[String],
    chunking: stoker_format::Chunking,
    plan: &Plan,
) -> Result<PlanTarget, ConvertError> {
    if plan.chunks.is_empty() {
        return Err(ConvertError::Plan("the plan is empty".into()));
    }
    let mut indexes_seen = Vec::new();
    for (platform, manifest) in store.platform_manifests(selector, platforms).await? {
        for artifact in store.referrers(&manifest.digest).await? {
            let found = read_artifact(store, &manifest.digest, platform.clone(), &artifact).await?;
            if found.index_digest != plan.index_digest {
                indexes_seen.push(found.index_digest.to_string());
                continue;
            }
            let index = load_index(store, &found).await?;
            plan.check_against(&index, &found.index_digest)?;
            if index.chunking() != chunking {
                return Err(ConvertError::Plan(format!(
                    "the plan's index {} was cut with {:?}, this conversion uses {chunking:?}: \
                     convert with the same --chunking and --chunk-size",
                    plan.index_digest,
                    index.chunking()
                )));
            }
            return Ok(PlanTarget {
                platform,
                manifest,
                hot: hot_list(&index, plan)?,
            });
        }
    }
    Err(ConvertError::Plan(format!(
        "the plan is bound to index {}, which is not the index of any Stoker artifact of {} \
         (its artifacts have {}): the plan was made for another image, or the image was \
         converted again since",
        plan.index_digest,
        store.describe(selector),
        if indexes_seen.is_empty() {
            "none: convert the image without --plan first".to_string()
        } else {
            indexes_seen.join(", ")
        }
    )))
}

/// The plan's chunk digests in plan order, each once.
fn hot_list(index: &Index, plan: &Plan) -> Result<Vec<Digest>, ConvertError> {
    let mut seen = HashSet::new();
    let mut hot = Vec::with_capacity(plan.chunks.len());
    for &position in &plan.chunks {
        let chunk = index.chunk(position).ok_or_else(|| {
            ConvertError::Plan(format!(
                "the plan names chunk {position}, the index has {}",
                index.chunk_count()
            ))
        })?;
        if seen.insert(chunk.digest) {
            hot.push(chunk.digest);
        }
    }
    Ok(hot)
}

/// The plan for `index` (whose digest is `index_digest`) that names the chunks of
/// `hot` in the same order.
pub fn rebind(hot: &[Digest], index: &Index, index_digest: Digest) -> Result<Plan, ConvertError> {
    let position: HashMap<Digest, u32> = index
        .chunks()
        .enumerate()
        .map(|(i, chunk)| (chunk.digest, i as u32))
        .collect();
    let chunks = hot
        .iter()
        .map(|digest| {
            position.get(digest).copied().ok_or_else(|| {
                ConvertError::Internal(format!("hot chunk {digest} is not in the new index"))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Plan {
        index_digest,
        chunks,
    })
}
