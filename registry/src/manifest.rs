//! Manifests: resolving a reference to manifest bytes, pushing manifests, parsing image
//! manifests and indexes, and choosing platforms from an index.

use bytes::Bytes;
use oci_client::Reference;
use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, Os, Platform};
use reqwest::header::HeaderValue;
use stoker_format::Digest;

use crate::client::Access;
use crate::{RegistryClient, RegistryError};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// A manifest as the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedManifest {
    /// The exact bytes; their sha256 is `digest`.
    pub bytes: Bytes,
    /// The `mediaType` the manifest declares (or, when it declares none, OCI manifest or
    /// index by its shape).
    pub media_type: String,
    /// The sha256 of `bytes`.
    pub digest: Digest,
}

impl FetchedManifest {
    /// True for an OCI image index or a Docker manifest list.
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_MANIFEST_LIST
    }

    /// Parses the bytes as an image manifest (OCI or Docker schema 2).
    pub fn image_manifest(&self) -> Result<ImageManifest, RegistryError> {
        parse_image_manifest(&self.bytes)
    }

    /// Parses the bytes as an image index (OCI index or Docker manifest list).
    pub fn image_index(&self) -> Result<ImageIndex, RegistryError> {
        parse_image_index(&self.bytes)
    }
}

/// Parses `host[:port]/repository[:tag][@sha256:…]`. Without a registry, Docker Hub is
/// assumed (`ubuntu` is `docker.io/library/ubuntu:latest`), as docker does.
pub fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// Parses an image manifest (OCI or Docker schema 2).
pub fn parse_image_manifest(bytes: &[u8]) -> Result<ImageManifest, RegistryError> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| invalid(bytes, e))?;
    if manifest.schema_version() != 2 {
        return Err(RegistryError::InvalidManifest {
            manifest: Digest::of(bytes).to_string(),
            reason: format!("schemaVersion {} (expected 2)", manifest.schema_version()),
        });
    }
    Ok(manifest)
}

/// Parses an image index (OCI index or Docker manifest list).
pub fn parse_image_index(bytes: &[u8]) -> Result<ImageIndex, RegistryError> {
    let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| invalid(bytes, e))?;
    if index.schema_version() != 2 {
        return Err(RegistryError::InvalidManifest {
            manifest: Digest::of(bytes).to_string(),
            reason: format!("schemaVersion {} (expected 2)", index.schema_version()),
        });
    }
    Ok(index)
}

fn invalid(bytes: &[u8], error: serde_json::Error) -> RegistryError {
    RegistryError::InvalidManifest {
        manifest: Digest::of(bytes).to_string(),
        reason: error.to_string(),
    }
}

/// The media type a manifest declares, or the one its shape implies.
fn declared_media_type(bytes: &[u8], name: &str) -> Result<String, RegistryError> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    let shape: Shape =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::InvalidManifest {
            manifest: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok(match (shape.media_type, shape.manifests) {
        (Some(media_type), _) => media_type,
        (None, Some(_)) => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    })
}

/// Parses `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`.
pub fn parse_platform(text: &str) -> Result<Platform, RegistryError> {
    let parts: Vec<&str> = text.split('/').collect();
    let bad = || RegistryError::NoMatchingPlatform {
        wanted: text.to_string(),
        available: "(not a platform: expected os/arch[/variant])".to_string(),
    };
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    let mut platform = Platform::default();
    platform.set_os(Os::from(parts[0]));
    platform.set_architecture(Arch::from(parts[1]));
    platform.set_variant(parts.get(2).map(|v| v.to_string()));
    Ok(platform)
}

/// `os/arch[/variant]`.
pub fn platform_to_string(platform: &Platform) -> String {
    match platform.variant() {
        Some(variant) => format!("{}/{}/{variant}", platform.os(), platform.architecture()),
        None => format!("{}/{}", platform.os(), platform.architecture()),
    }
}

/// Chooses the image manifests of `index` to convert or run.
///
/// With no `wanted` platforms, every image manifest except attestation manifests
/// (`unknown/unknown`). Otherwise, for each wanted platform in order, the first manifest
/// with the same OS and architecture and, when the wanted platform names a variant, the
/// same variant (`arm64` without a variant matches `v8`). A wanted platform that is absent
/// is an error naming what the index has.
pub fn select_platforms(
    index: &ImageIndex,
    wanted: &[Platform],
) -> Result<Vec<Descriptor>, RegistryError> {
    let images: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| {
            let media_type = d.media_type().to_string();
            media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
        })
        .filter(|d| {
            d.platform()
                .as_ref()
                .is_none_or(|p| p.os().to_string() != "unknown")
        })
        .collect();
    if wanted.is_empty() {
        return Ok(images.into_iter().cloned().collect());
    }
    let mut chosen: Vec<Descriptor> = Vec::new();
    for want in wanted {
        let found = images.iter().find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|have| platform_matches(want, have))
        });
        match found {
            Some(descriptor) => {
                if !chosen.iter().any(|c| c.digest() == descriptor.digest()) {
                    chosen.push((*descriptor).clone());
                }
            }
            None => {
                let available: Vec<String> = images
                    .iter()
                    .filter_map(|d| d.platform().as_ref().map(platform_to_string))
                    .collect();
                return Err(RegistryError::NoMatchingPlatform {
                    wanted: platform_to_string(want),
                    available: available.join(", "),
                });
            }
        }
    }
    Ok(chosen)
}

fn platform_matches(want: &Platform, have: &Platform) -> bool {
    if want.os() != have.os() || want.architecture() != have.architecture() {
        return false;
    }
    let normalise = |variant: Option<&str>| match (have.architecture(), variant) {
        (Arch::ARM64, None) => Some("v8".to_string()),
        (_, v) => v.map(str::to_string),
    };
    match want.variant() {
        None => true,
        Some(variant) => normalise(Some(variant)) == normalise(have.variant().as_deref()),
    }
}

impl RegistryClient {
    /// Fetches the manifest `reference` names (`host/repo:tag` or `host/repo@sha256:…`).
    /// When the reference is by digest, the bytes are checked against it.
    pub async fn fetch_manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        self.fetch_manifest_at(&parse_reference(reference)?).await
    }

    /// [`fetch_manifest`](Self::fetch_manifest) for a parsed reference.
    pub async fn fetch_manifest_at(
        &self,
        reference: &Reference,
    ) -> Result<FetchedManifest, RegistryError> {
        self.with_mirrors(reference, |at| async move {
            self.fetch_manifest_direct(&at).await
        })
        .await
    }

    /// [`fetch_manifest_at`](Self::fetch_manifest_at) from one registry or mirror.
    async fn fetch_manifest_direct(
        &self,
        reference: &Reference,
    ) -> Result<FetchedManifest, RegistryError> {
        let expected = reference_digest(reference)?;
        let name = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let target = Self::target(reference, format!("manifest {name}"));
        let (bytes, _) = self
            .oci_call(reference, Access::Pull, &target, |oci| {
                let credentials = oci_client::secrets::RegistryAuth::Anonymous;
                async move {
                    // The stored credentials (see `oci_ready`) win over this argument.
                    oci.pull_manifest_raw(reference, &credentials, ACCEPTED_MANIFESTS)
                        .await
                }
            })
            .await?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                target,
                actual: digest,
            });
        }
        let media_type = declared_media_type(&bytes, &reference.whole())?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Pushes manifest `bytes` under `reference` (a tag, or the digest of the bytes) and
    /// returns their digest.
    pub async fn push_manifest(
        &self,
        reference: &str,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.push_manifest_at(&parse_reference(reference)?, bytes, media_type)
            .await
    }

    /// [`push_manifest`](Self::push_manifest) for a parsed reference.
    pub async fn push_manifest_at(
        &self,
        reference: &Reference,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let name = reference.tag().unwrap_or_default().to_string();
        let target = Self::target(reference, format!("manifest {name}"));
        if let Some(expected) = reference_digest(reference)?
            && expected != digest
        {
            return Err(RegistryError::InvalidReference {
                reference: reference.whole(),
                reason: format!(
                    "the manifest bytes hash to {digest}, not to the reference's digest"
                ),
            });
        }
        let content_type =
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::InvalidManifest {
                manifest: digest.to_string(),
                reason: format!("media type {media_type:?} is not a valid header value"),
            })?;
        // A reference with both tag and digest would be pushed by digest only; push by
        // the tag when there is one, so the tag moves.
        let push_reference = match reference.tag() {
            Some(tag) => Reference::with_tag(
                reference.registry().to_string(),
                reference.repository().to_string(),
                tag.to_string(),
            ),
            None => reference.clone(),
        };
        let push_reference = &push_reference;
        self.oci_call(reference, Access::Push, &target, |oci| {
            let bytes = bytes.clone();
            let content_type = content_type.clone();
            async move {
                oci.push_manifest_raw(push_reference, bytes, content_type)
                    .await
            }
        })
        .await?;
        tracing::debug!(reference = %reference, %digest, media_type, "pushed manifest");
        Ok(digest)
    }
}

/// The sha256 digest a reference names, if any.
pub(crate) fn reference_digest(reference: &Reference) -> Result<Option<Digest>, RegistryError> {
    reference
        .digest()
        .map(|text| {
            Digest::parse(text).map_err(|_| RegistryError::InvalidReference {
                reference: reference.whole(),
                reason: "only sha256 digests are supported".into(),
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_with(platforms: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut platform = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": Digest::of(&[i as u8]).to_string(),
                    "size": 100,
                    "platform": platform,
                })
            })
            .collect();
        let json =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        parse_image_index(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn selects_platforms() {
        let index = index_with(&[
            ("linux", "amd64", None),
            ("linux", "arm64", Some("v8")),
            ("unknown", "unknown", None),
        ]);
        assert_eq!(select_platforms(&index, &[]).unwrap().len(), 2);

        let arm = select_platforms(&index, &[parse_platform("linux/arm64").unwrap()]).unwrap();
        assert_eq!(arm.len(), 1);
        assert_eq!(arm[0].digest().to_string(), Digest::of(&[1]).to_string());
        assert!(select_platforms(&index, &[parse_platform("linux/arm64/v8").unwrap()]).is_ok());

        let error =
            select_platforms(&index, &[parse_platform("linux/s390x").unwrap()]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("linux/s390x") && text.contains("linux/amd64"),
            "{text}"
        );
    }

    #[test]
    fn platform_strings() {
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux/amd64/v2/x").is_err());
        assert!(parse_platform("linux//v2").is_err());
        assert_eq!(
            platform_to_string(&parse_platform("linux/arm/v7").unwrap()),
            "linux/arm/v7"
        );
    }

    #[test]
    fn media_type_from_the_document() {
        assert_eq!(
            declared_media_type(br#"{"manifests": []}"#, "x").unwrap(),
            OCI_INDEX
        );
        assert_eq!(
            declared_media_type(br#"{"layers": []}"#, "x").unwrap(),
            OCI_MANIFEST
        );
        assert_eq!(
            declared_media_type(
                format!(r#"{{"mediaType": "{DOCKER_MANIFEST}"}}"#).as_bytes(),
                "x"
            )
            .unwrap(),
            DOCKER_MANIFEST
        );
        assert!(declared_media_type(b"not json", "x").is_err());
    }

    #[test]
    fn bad_manifests_are_errors() {
        assert!(parse_image_manifest(b"{}").is_err());
        assert!(parse_image_index(br#"{"schemaVersion": 1, "manifests": []}"#).is_err());
    }

    #[test]
    fn references() {
        let r = parse_reference("127.0.0.1:5000/app/x:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "app/x");
        assert!(parse_reference("Not A Reference").is_err());
        let by_digest = parse_reference(&format!("h:1/a@{}", Digest::of(b"x"))).unwrap();
        assert_eq!(
            reference_digest(&by_digest).unwrap(),
            Some(Digest::of(b"x"))
        );
    }
}
