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
//! Three manifest-sized requests, no blob. The snapshotter caches the answer.

use futures::future::BoxFuture;
use stoker_format::Digest;
use stoker_format::artifact::{ARTIFACT_TYPE, INDEX_MEDIA_TYPE};
use stoker_registry::{Reference, RegistryClient, RegistryError};

use stoker_snapshotter::{ImageResolver, SnapshotterError, StokerArtifact};

/// Finds Stoker artifacts through a [`RegistryClient`].
#[derive(Clone)]
pub struct RegistryResolver {
    client: RegistryClient,
}

impl RegistryResolver {
    pub fn new(client: RegistryClient) -> RegistryResolver {
        RegistryResolver { client }
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

        let referrers = self
            .client
            .find_referrers(&image, &subject, ARTIFACT_TYPE)
            .await
            .map_err(registry_failed)?;
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

        let layer_digests = self
            .client
            .fetch_manifest_at(&image)
            .await
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
        Box::pin(self.lookup(image_ref, manifest_digest))
    }
}
