//! [`RegistryResolver`]: the [`ImageResolver`] that asks the image's registry whether
//! an image has a Stoker artifact.
//!
//! Lookup, for image manifest `M` in repository `R`:
//! 1. the referrers of `M` with artifact type `application/vnd.stoker.image.v1`, from
//!    the OCI referrers API or, on registries without it, the `sha256-<hex>` fallback
//!    tag (stoker-registry does both); the newest one wins;
//! 2. the artifact manifest: its `subject` must be `M`, and its index layer gives the
//!    index digest;
//! 3. the image manifest `M` itself, for the layer digests containerd will unpack.
//!
//! Three manifest-sized requests, no blob; the first and the last go out together.
//! The snapshotter caches the answer.
//!
//! [`KnownImages`] is what the node learned about images a short while ago, shared
//! by the resolver, the lazy mounts and the prefetch executor: a prefetch plan
//! pushed ahead of an image's pods finds the image's artifact and loads its index,
//! and the pull that follows takes both from here instead of asking the registry
//! again (see [`KnownImages`] for how long each is trusted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use stoker_format::artifact::{ARTIFACT_TYPE, INDEX_MEDIA_TYPE};
use stoker_format::{Digest, Index};
use stoker_registry::{Reference, RegistryClient, RegistryError};

use stoker_snapshotter::{ImageResolver, SnapshotterError, StokerArtifact};

/// How long an artifact found for a prefetch plan answers the resolver. A plan
/// comes shortly before the image's pods; an artifact pushed again for the same
/// image (a new conversion) is noticed by lookups after this.
pub const ARTIFACTS_TRUSTED_FOR: Duration = Duration::from_secs(10 * 60);
/// Artifacts remembered at most (the oldest go first).
const ARTIFACTS_KEPT: usize = 64;
/// Verified indexes kept in memory at most, besides the mounted ones (which
/// their mounts hold). Indexes of large images take megabytes each.
const INDEXES_KEPT: usize = 8;

/// Recently found Stoker artifacts and verified indexes of this node's images.
///
/// - An artifact (image manifest digest in a repository → index digest and
///   layer digests) is trusted for a limited time ([`ARTIFACTS_TRUSTED_FOR`]):
///   the registry may get a new artifact for the same image, and the node must
///   then move to it. It answers for its own repository only: the same manifest
///   in another repository may have no artifact there, nor its chunk blobs.
/// - An index is kept by its digest, which names its content: a kept index is
///   the one any artifact naming that digest means, for as long as it is kept.
///   Only indexes verified against their digest are remembered.
pub struct KnownImages {
    artifacts_trusted_for: Duration,
    state: Mutex<KnownState>,
}

#[derive(Default)]
struct KnownState {
    /// By `registry/repository@manifest digest`, with when it was found.
    artifacts: HashMap<String, (Instant, StokerArtifact)>,
    /// Most recently used last.
    indexes: Vec<(Digest, Arc<Index>)>,
}

impl Default for KnownImages {
    fn default() -> Self {
        KnownImages::new(ARTIFACTS_TRUSTED_FOR)
    }
}

impl KnownImages {
    /// Trusts artifacts for `artifacts_trusted_for` after they were found.
    pub fn new(artifacts_trusted_for: Duration) -> KnownImages {
        KnownImages {
            artifacts_trusted_for,
            state: Mutex::new(KnownState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KnownState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that the image manifest `manifest_digest` in the repository of
    /// `image_ref` has `artifact`, found in the registry just now.
    pub fn remember_artifact(
        &self,
        image_ref: &str,
        manifest_digest: &str,
        artifact: StokerArtifact,
    ) {
        let Some(key) = artifact_key(image_ref, manifest_digest) else {
            return;
        };
        let trusted_for = self.artifacts_trusted_for;
        let mut state = self.lock();
        state
            .artifacts
            .retain(|_, (found, _)| found.elapsed() < trusted_for);
        if state.artifacts.len() >= ARTIFACTS_KEPT
            && let Some(oldest) = state
                .artifacts
                .iter()
                .min_by_key(|(_, (found, _))| *found)
                .map(|(digest, _)| digest.clone())
        {
            state.artifacts.remove(&oldest);
        }
        state.artifacts.insert(key, (Instant::now(), artifact));
    }

    /// The artifact of the image manifest `manifest_digest` in the repository of
    /// `image_ref`, if it was found recently enough.
    pub fn artifact(&self, image_ref: &str, manifest_digest: &str) -> Option<StokerArtifact> {
        let key = artifact_key(image_ref, manifest_digest)?;
        let mut state = self.lock();
        let (found, artifact) = state.artifacts.get(&key)?;
        if found.elapsed() < self.artifacts_trusted_for {
            return Some(artifact.clone());
        }
        state.artifacts.remove(&key);
        None
    }

    /// Keeps `index`, which was verified against `digest` when it was loaded.
    pub fn remember_index(&self, digest: Digest, index: Arc<Index>) {
        let mut state = self.lock();
        state.indexes.retain(|(d, _)| *d != digest);
        state.indexes.push((digest, index));
        if state.indexes.len() > INDEXES_KEPT {
            state.indexes.remove(0);
        }
    }

    /// The verified index `digest`, if kept.
    pub fn index(&self, digest: &Digest) -> Option<Arc<Index>> {
        let mut state = self.lock();
        let at = state.indexes.iter().position(|(d, _)| d == digest)?;
        let entry = state.indexes.remove(at);
        let index = Arc::clone(&entry.1);
        state.indexes.push(entry);
        Some(index)
    }
}

/// `registry/repository@manifest digest`; `None` when `image_ref` is not an
/// image reference.
fn artifact_key(image_ref: &str, manifest_digest: &str) -> Option<String> {
    let reference = stoker_registry::parse_reference(image_ref).ok()?;
    Some(format!(
        "{}/{}@{manifest_digest}",
        reference.registry(),
        reference.repository()
    ))
}

/// Finds Stoker artifacts through a [`RegistryClient`].
#[derive(Clone)]
pub struct RegistryResolver {
    client: RegistryClient,
    known: Arc<KnownImages>,
}

impl RegistryResolver {
    pub fn new(client: RegistryClient) -> RegistryResolver {
        RegistryResolver {
            client,
            known: Arc::new(KnownImages::default()),
        }
    }

    /// Answers from `known` (artifacts the prefetch executor found) before asking
    /// the registry.
    pub fn with_known_images(mut self, known: Arc<KnownImages>) -> RegistryResolver {
        self.known = known;
        self
    }

    async fn lookup(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<StokerArtifact>, SnapshotterError> {
        let failed = |message: String| SnapshotterError::Remote {
            image: image_ref.to_string(),
            message,
        };
        let registry_failed = |e: RegistryError| failed(e.to_string());
        let reference = stoker_registry::parse_reference(image_ref).map_err(registry_failed)?;
        let subject = Digest::parse(manifest_digest)
            .map_err(|e| failed(format!("manifest digest {manifest_digest:?}: {e}")))?;
        let at = |digest: &str| {
            Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                digest.to_string(),
            )
        };
        let image = at(manifest_digest);

        // The image manifest (for its layers) is asked for along with the
        // referrers: one round trip less when there is an artifact.
        let (referrers, image_manifest) = futures::join!(
            self.client.find_referrers(&image, &subject, ARTIFACT_TYPE),
            self.client.fetch_manifest_at(&image)
        );
        let referrers = referrers.map_err(registry_failed)?;
        let Some(newest) = referrers.last() else {
            return Ok(None);
        };
        let artifact_digest = newest.digest().to_string();
        let artifact = self
            .client
            .fetch_manifest_at(&at(&artifact_digest))
            .await
            .and_then(|fetched| fetched.image_manifest())
            .map_err(registry_failed)?;
        let names_subject = artifact
            .subject()
            .as_ref()
            .is_some_and(|s| s.digest().to_string() == manifest_digest);
        if !names_subject {
            return Err(failed(format!(
                "artifact {artifact_digest} does not name {manifest_digest} as its subject"
            )));
        }
        let index_digest = artifact
            .layers()
            .iter()
            .find(|layer| layer.media_type().to_string() == INDEX_MEDIA_TYPE)
            .map(|layer| layer.digest().to_string())
            .ok_or_else(|| failed(format!("artifact {artifact_digest} has no index layer")))?;

        let layer_digests = image_manifest
            .and_then(|fetched| fetched.image_manifest())
            .map_err(registry_failed)?
            .layers()
            .iter()
            .map(|layer| layer.digest().to_string())
            .collect();
        Ok(Some(StokerArtifact {
            index_digest,
            layer_digests,
        }))
    }
}

impl ImageResolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        image_ref: &'a str,
        manifest_digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StokerArtifact>, SnapshotterError>> {
        Box::pin(async move {
            if let Some(known) = self.known.artifact(image_ref, manifest_digest) {
                tracing::debug!(
                    image = image_ref,
                    manifest = manifest_digest,
                    index = %known.index_digest,
                    "Stoker artifact known from a prefetch plan"
                );
                return Ok(Some(known));
            }
            let started = Instant::now();
            let found = self.lookup(image_ref, manifest_digest).await;
            tracing::debug!(
                image = image_ref,
                manifest = manifest_digest,
                found = matches!(found, Ok(Some(_))),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "Stoker artifact looked up in the registry"
            );
            found
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_format::{ChunkTable, Chunking, Meta, Tree};

    fn artifact(index: &str) -> StokerArtifact {
        StokerArtifact {
            index_digest: index.to_string(),
            layer_digests: vec!["sha256:l1".into(), "sha256:l2".into()],
        }
    }

    /// An index of an empty tree whose root has mode `mode` (so each is distinct).
    fn index(mode: u32) -> (Digest, Arc<Index>) {
        let tree = Tree::new(Meta {
            permissions: mode,
            ..Meta::default()
        });
        let encoded = tree
            .encode(&ChunkTable::default(), Chunking::Fixed { size: 1 << 16 })
            .expect("encode");
        let index = Index::decode_verified(&encoded.compressed, &encoded.digest).expect("decode");
        (encoded.digest, Arc::new(index))
    }

    const IMAGE: &str = "registry.test/team/app:v1";

    #[test]
    fn an_artifact_answers_while_it_is_trusted_in_its_own_repository() {
        let known = KnownImages::new(Duration::from_secs(600));
        assert_eq!(known.artifact(IMAGE, "sha256:m"), None);
        known.remember_artifact(IMAGE, "sha256:m", artifact("sha256:i1"));
        assert_eq!(
            known.artifact(IMAGE, "sha256:m"),
            Some(artifact("sha256:i1"))
        );
        // Another tag or a digest reference of the same repository: the same.
        let by_digest = format!("registry.test/team/app@sha256:{}", "a".repeat(64));
        assert_eq!(
            known.artifact(&by_digest, "sha256:m"),
            Some(artifact("sha256:i1"))
        );
        assert_eq!(
            known.artifact("registry.test/team/app:v2", "sha256:m"),
            Some(artifact("sha256:i1"))
        );
        // A newer finding replaces it.
        known.remember_artifact(IMAGE, "sha256:m", artifact("sha256:i2"));
        assert_eq!(
            known.artifact(IMAGE, "sha256:m"),
            Some(artifact("sha256:i2"))
        );
        assert_eq!(known.artifact(IMAGE, "sha256:other"), None);
        // The same manifest elsewhere may have no artifact (nor its chunks) there.
        assert_eq!(
            known.artifact("registry.test/team/copy:v1", "sha256:m"),
            None
        );
        assert_eq!(known.artifact("mirror.test/team/app:v1", "sha256:m"), None);
        assert_eq!(known.artifact("not a reference", "sha256:m"), None);
    }

    #[test]
    fn an_artifact_past_its_time_is_not_served() {
        // Trusted for no time at all: the registry is always asked again, so an
        // image whose artifact was replaced moves to the new one.
        let known = KnownImages::new(Duration::ZERO);
        known.remember_artifact(IMAGE, "sha256:m", artifact("sha256:i1"));
        assert_eq!(known.artifact(IMAGE, "sha256:m"), None);
        assert!(known.lock().artifacts.is_empty(), "forgotten once expired");
    }

    #[test]
    fn artifacts_kept_are_bounded() {
        let known = KnownImages::default();
        for i in 0..ARTIFACTS_KEPT + 10 {
            known.remember_artifact(IMAGE, &format!("sha256:m{i}"), artifact("sha256:i"));
        }
        assert_eq!(known.lock().artifacts.len(), ARTIFACTS_KEPT);
        let newest = format!("sha256:m{}", ARTIFACTS_KEPT + 9);
        assert!(known.artifact(IMAGE, &newest).is_some());
        assert!(
            known.artifact(IMAGE, "sha256:m0").is_none(),
            "oldest dropped"
        );
    }

    #[test]
    fn indexes_kept_are_bounded_and_the_least_recently_used_goes_first() {
        let known = KnownImages::default();
        let indexes: Vec<_> = (0..=INDEXES_KEPT as u32)
            .map(|i| index(0o700 + i))
            .collect();
        for (digest, index) in &indexes[..INDEXES_KEPT] {
            known.remember_index(*digest, Arc::clone(index));
        }
        // The first one is used again, so the second is the oldest now.
        assert!(known.index(&indexes[0].0).is_some());
        let (digest, index) = &indexes[INDEXES_KEPT];
        known.remember_index(*digest, Arc::clone(index));
        assert!(known.index(&indexes[1].0).is_none(), "oldest dropped");
        for (digest, _) in indexes.iter().filter(|(d, _)| *d != indexes[1].0) {
            let kept = known.index(digest).expect("kept");
            assert_eq!(known.lock().indexes.len(), INDEXES_KEPT);
            assert!(Arc::ptr_eq(
                &kept,
                &indexes.iter().find(|(d, _)| d == digest).unwrap().1
            ));
        }
    }
}
