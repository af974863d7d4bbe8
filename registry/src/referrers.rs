//! Referrers: finding the artifacts that point at a manifest through their `subject`, and
//! attaching one.
//!
//! Registries with the OCI referrers API (`GET /v2/<name>/referrers/<digest>`) index
//! referrers themselves. For the others (distribution 2.8, Debian's `docker-registry`),
//! the OCI "referrers tag schema" applies: an image index tagged `sha256-<hex>` of the
//! subject lists the referrers, and whoever pushes a referrer updates it.

use std::collections::HashMap;

use bytes::Bytes;
use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use stoker_format::Digest;

use crate::client::{Access, Budget, status_error};
use crate::manifest::{OCI_INDEX, OCI_MANIFEST, parse_image_index};
use crate::{RegistryClient, RegistryError, Target};

/// How often the fallback tag is re-read and rewritten when a concurrent writer keeps
/// replacing it.
const FALLBACK_UPDATE_ROUNDS: u32 = 5;

/// The tag of the referrers tag schema: `sha256:<hex>` → `sha256-<hex>`.
pub fn referrers_fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

impl RegistryClient {
    /// The referrers of `subject` in `repo` with the given `artifact_type`: from the
    /// referrers API, or, where the registry lacks it (404), from the fallback tag. No
    /// referrers is an empty list; any other failure is an error (a 429 or 5xx is never
    /// mistaken for "no referrers").
    pub async fn find_referrers(
        &self,
        repo: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        self.with_mirrors(repo, |at| async move {
            self.find_referrers_direct(&at, subject, artifact_type)
                .await
        })
        .await
    }

    /// [`find_referrers`](Self::find_referrers) from one registry or mirror.
    async fn find_referrers_direct(
        &self,
        repo: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let index = match self
            .referrers_api(repo, subject, Some(artifact_type))
            .await?
        {
            Some(index) => index,
            None => match self.fallback_index(repo, subject).await? {
                Some(index) => index,
                None => return Ok(Vec::new()),
            },
        };
        // Registries may ignore the filter (and say so in OCI-Filters-Applied); the
        // fallback index is never filtered.
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                d.artifact_type()
                    .as_ref()
                    .is_some_and(|t| t.to_string() == artifact_type)
            })
            .cloned()
            .collect())
    }

    /// Pushes `manifest_bytes`, an image manifest whose `subject` is `subject`, and makes
    /// it findable: on registries without the referrers API, adds its descriptor (with
    /// `artifactType` and annotations) to the fallback tag's index, once. Returns the
    /// manifest's digest.
    ///
    /// The fallback index is updated by read-modify-write, then read back; if a concurrent
    /// writer replaced it without our entry, the update is redone (up to 5 times).
    pub async fn attach_referrer(
        &self,
        repo: &Reference,
        manifest_bytes: Bytes,
        subject: &Digest,
    ) -> Result<Digest, RegistryError> {
        let descriptor = referrer_descriptor(&manifest_bytes, subject)?;
        let digest = Digest::of(&manifest_bytes);
        let by_digest = Reference::with_digest(
            repo.registry().to_string(),
            repo.repository().to_string(),
            digest.to_string(),
        );
        self.push_manifest_at(&by_digest, manifest_bytes, descriptor.media_type().as_ref())
            .await?;
        if self.referrers_api(repo, subject, None).await?.is_some() {
            tracing::debug!(%digest, %subject, "registry indexes referrers itself");
            return Ok(digest);
        }
        let tag = referrers_fallback_tag(subject);
        let tagged = Reference::with_tag(
            repo.registry().to_string(),
            repo.repository().to_string(),
            tag.clone(),
        );
        for round in 1..=FALLBACK_UPDATE_ROUNDS {
            let mut index = match self.fallback_index(repo, subject).await? {
                Some(index) => index,
                None => empty_index(),
            };
            if index_lists(&index, &digest) {
                return Ok(digest);
            }
            let mut manifests = index.manifests().clone();
            manifests.push(descriptor.clone());
            index.set_manifests(manifests);
            let bytes = serde_json::to_vec(&index).map_err(|e| RegistryError::InvalidManifest {
                manifest: tagged.whole(),
                reason: e.to_string(),
            })?;
            self.push_manifest_at(&tagged, Bytes::from(bytes), OCI_INDEX)
                .await?;
            match self.fallback_index(repo, subject).await? {
                Some(written) if index_lists(&written, &digest) => {
                    tracing::debug!(%digest, %subject, %tag, "referrer added to the fallback tag");
                    return Ok(digest);
                }
                _ => {
                    tracing::debug!(round, %tag, "fallback tag was replaced concurrently; updating again")
                }
            }
        }
        Err(RegistryError::BadResponse {
            target: Self::target(repo, format!("manifest {tag}")),
            reason: format!(
                "the referrers tag kept changing under us; {digest} is not listed after {FALLBACK_UPDATE_ROUNDS} updates"
            ),
        })
    }

    /// `GET /v2/<name>/referrers/<digest>`: the index, or `None` when the registry has no
    /// referrers API (404).
    async fn referrers_api(
        &self,
        repo: &Reference,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let target = Self::target(repo, format!("referrers of {subject}"));
        let path = format!("/v2/{}/referrers/{subject}", repo.repository());
        let attempts = Budget::Attempts(self.inner.config.retry.max_attempts.max(1));
        self.retrying(&target, attempts, || {
            self.referrers_api_once(repo, &path, artifact_type, &target)
        })
        .await
        .map_err(|gave_up| gave_up.error)
    }

    async fn referrers_api_once(
        &self,
        repo: &Reference,
        path: &str,
        artifact_type: Option<&str>,
        target: &Target,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let response = self
            .send(repo, Access::Pull, target, |http, base| {
                let request = http.get(format!("{base}{path}")).header(ACCEPT, OCI_INDEX);
                match artifact_type {
                    Some(artifact_type) => request.query(&[("artifactType", artifact_type)]),
                    None => request,
                }
            })
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => {
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| RegistryError::transport(target, e))?;
                parse_image_index(&body).map(Some)
            }
            _ => Err(status_error(target, response).await),
        }
    }

    /// The index under the fallback tag, or `None` if the tag does not exist.
    async fn fallback_index(
        &self,
        repo: &Reference,
        subject: &Digest,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let tagged = Reference::with_tag(
            repo.registry().to_string(),
            repo.repository().to_string(),
            referrers_fallback_tag(subject),
        );
        match self.fetch_manifest_at(&tagged).await {
            Ok(manifest) => manifest.image_index().map(Some),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }
}

fn index_lists(index: &ImageIndex, digest: &Digest) -> bool {
    let digest = digest.to_string();
    index
        .manifests()
        .iter()
        .any(|d| d.digest().to_string() == digest)
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_schema_version(2);
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(Vec::new());
    index
}

/// The descriptor a referrers index lists for `manifest_bytes`, after checking that the
/// manifest's `subject` is `subject`.
fn referrer_descriptor(
    manifest_bytes: &[u8],
    subject: &Digest,
) -> Result<Descriptor, RegistryError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Artifact {
        media_type: Option<String>,
        artifact_type: Option<String>,
        config: Option<DescriptorRef>,
        subject: Option<DescriptorRef>,
        annotations: Option<HashMap<String, String>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct DescriptorRef {
        media_type: Option<String>,
        digest: String,
    }
    let digest = Digest::of(manifest_bytes);
    let invalid = |reason: String| RegistryError::InvalidManifest {
        manifest: digest.to_string(),
        reason,
    };
    let artifact: Artifact =
        serde_json::from_slice(manifest_bytes).map_err(|e| invalid(e.to_string()))?;
    let media_type = artifact
        .media_type
        .unwrap_or_else(|| OCI_MANIFEST.to_string());
    if media_type != OCI_MANIFEST && media_type != OCI_INDEX {
        return Err(invalid(format!(
            "a referrer must be an OCI manifest or index, not {media_type}"
        )));
    }
    match &artifact.subject {
        Some(s) if Digest::parse(&s.digest).ok() == Some(*subject) => {}
        Some(s) => {
            return Err(invalid(format!(
                "its subject is {}, not {subject}",
                s.digest
            )));
        }
        None => return Err(invalid("it has no subject".into())),
    }
    // The artifact type is the manifest's artifactType, else its config's media type.
    let artifact_type = artifact
        .artifact_type
        .or_else(|| artifact.config.and_then(|c| c.media_type))
        .ok_or_else(|| invalid("it has neither artifactType nor a config media type".into()))?;
    let oci_digest = digest
        .to_string()
        .parse::<oci_spec::image::Digest>()
        .map_err(|e| invalid(e.to_string()))?;
    let mut descriptor = Descriptor::new(
        MediaType::from(media_type.as_str()),
        manifest_bytes.len() as u64,
        oci_digest,
    );
    descriptor.set_artifact_type(Some(MediaType::from(artifact_type.as_str())));
    descriptor.set_annotations(artifact.annotations.filter(|a| !a.is_empty()));
    Ok(descriptor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(subject: &Digest) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.stoker.index.v1",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::of(b"{}").to_string(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": 10},
            "annotations": {"org.example": "yes"},
        }))
        .unwrap()
    }

    #[test]
    fn descriptor_of_a_referrer() {
        let subject = Digest::of(b"image");
        let bytes = artifact(&subject);
        let descriptor = referrer_descriptor(&bytes, &subject).unwrap();
        assert_eq!(descriptor.size(), bytes.len() as u64);
        assert_eq!(
            descriptor.digest().to_string(),
            Digest::of(&bytes).to_string()
        );
        assert_eq!(
            descriptor.artifact_type().as_ref().unwrap().to_string(),
            "application/vnd.stoker.index.v1"
        );
        assert_eq!(
            descriptor.annotations().as_ref().unwrap()["org.example"],
            "yes"
        );
    }

    #[test]
    fn a_referrer_must_point_at_the_subject() {
        let bytes = artifact(&Digest::of(b"image"));
        let error = referrer_descriptor(&bytes, &Digest::of(b"other")).unwrap_err();
        assert!(error.to_string().contains("subject"), "{error}");
        assert!(referrer_descriptor(b"{}", &Digest::of(b"x")).is_err());
    }

    #[test]
    fn fallback_tag() {
        let d = Digest::of(b"x");
        assert_eq!(referrers_fallback_tag(&d), format!("sha256-{}", d.hex()));
    }
}
