//! The artifact that carries a converted image: writing it (manifest last) and
//! finding it again from the image it refers to.
//!
//! Trust chain: image manifest digest → artifact whose `subject` is that digest
//! → index blob whose digest the artifact lists → chunk digests in the index.

use std::collections::HashMap;
use std::time::Duration;

use oci_spec::image::{DescriptorBuilder, ImageManifest, ImageManifestBuilder, MediaType};
use stoker_format::artifact::*;
use stoker_format::{ChunkTable, Digest, EncodedIndex, Index, IndexSummary};

use crate::ConvertError;
use crate::pack::PackStats;
use crate::source::{ImageStore, Manifest};

/// What one conversion produced, for the summary `stoker convert` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    pub source_manifest: String,
    pub platform: Option<String>,
    pub artifact: String,
    pub index_digest: String,
    /// Compressed index size, and in memory once decoded.
    pub index_bytes: u64,
    pub index_raw_bytes: u64,
    pub summary: IndexSummary,
    pub packing: PackStats,
    pub blobs: Vec<(String, u64)>,
    pub seconds: f64,
    /// With a layout plan: the hot blob (blob 0), holding the plan's chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_blob: Option<HotBlobReport>,
    /// With a layout plan: the plan re-bound to this conversion's index.
    #[serde(skip)]
    pub layout_plan: Option<stoker_format::Plan>,
}

/// The hot blob of a trace-ordered conversion.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HotBlobReport {
    pub digest: String,
    pub size: u64,
    /// The plan's chunks, all in this blob, back to back in plan order.
    pub chunks: u64,
    /// Their uncompressed size.
    pub uncompressed_bytes: u64,
}

impl ConvertReport {
    /// Uncompressed image bytes per second.
    pub fn throughput_mb_s(&self) -> f64 {
        self.packing.bytes_seen as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

fn descriptor(
    media_type: &str,
    digest: &Digest,
    size: u64,
) -> Result<oci_spec::image::Descriptor, ConvertError> {
    let digest: oci_spec::image::Digest = digest
        .to_string()
        .parse()
        .map_err(|e| ConvertError::Internal(format!("digest: {e}")))?;
    DescriptorBuilder::default()
        .media_type(MediaType::Other(media_type.to_string()))
        .digest(digest)
        .size(size)
        .build()
        .map_err(|e| ConvertError::Internal(format!("descriptor: {e}")))
}

/// Pushes the index, the empty config and then the artifact manifest.
pub(crate) async fn publish(
    store: &ImageStore,
    source: &Manifest,
    platform: Option<String>,
    index: EncodedIndex,
    table: &ChunkTable,
    packing: PackStats,
    elapsed: Duration,
) -> Result<ConvertReport, ConvertError> {
    let decoded = Index::decode_verified(&index.compressed, &index.digest)?;
    store.put_blob(&index.compressed).await?;
    store.put_blob(b"{}").await?;

    let mut layers = vec![descriptor(
        INDEX_MEDIA_TYPE,
        &index.digest,
        index.compressed.len() as u64,
    )?];
    for blob in &table.blobs {
        layers.push(descriptor(BLOB_MEDIA_TYPE, &blob.digest, blob.size)?);
    }
    let summary = decoded.summary();
    let mut annotations = HashMap::from([(
        ANNOTATION_FORMAT_VERSION.to_string(),
        stoker_format::layout::VERSION.to_string(),
    )]);
    if let Some(platform) = &platform {
        annotations.insert(ANNOTATION_PLATFORM.to_string(), platform.clone());
    }
    let config = descriptor(
        EMPTY_CONFIG_MEDIA_TYPE,
        &Digest::parse(EMPTY_CONFIG_DIGEST)?,
        2,
    )?;
    let subject = descriptor(
        &source.media_type,
        &source.digest,
        source.bytes.len() as u64,
    )?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::Other(ARTIFACT_TYPE.to_string()))
        .config(config)
        .layers(layers)
        .subject(subject)
        .annotations(annotations)
        .build()
        .map_err(|e| ConvertError::Internal(format!("artifact manifest: {e}")))?;
    let bytes = serde_json::to_vec(&manifest).map_err(|e| ConvertError::Internal(e.to_string()))?;
    let artifact = store
        .put_referrer(
            &bytes,
            "application/vnd.oci.image.manifest.v1+json",
            &source.digest,
        )
        .await?;

    Ok(ConvertReport {
        source_manifest: source.digest.to_string(),
        platform,
        artifact: artifact.to_string(),
        index_digest: index.digest.to_string(),
        index_bytes: index.compressed.len() as u64,
        index_raw_bytes: index.raw_len as u64,
        summary,
        packing,
        blobs: table
            .blobs
            .iter()
            .map(|b| (b.digest.to_string(), b.size))
            .collect(),
        seconds: elapsed.as_secs_f64(),
        hot_blob: None,
        layout_plan: None,
    })
}

/// Publishes an index that was built directly rather than converted from the
/// image's layers, as the Stoker artifact of the image manifest `selector` names in
/// `store` (a tag or digest of a single-platform image): pushes every data blob the
/// index lists (`blobs`: their bytes, in any order), the index, and last the artifact
/// manifest, exactly as [`convert`](crate::convert) does. The agent then finds it
/// like any converted image.
///
/// For tests and benchmarks that need images no tar layer could produce quickly
/// (a million files, a sparse file of 10 GB). A blob the index lists but `blobs`
/// lacks is an error, and so is an index that does not decode.
pub async fn publish_prebuilt(
    store: &ImageStore,
    selector: &str,
    index: EncodedIndex,
    blobs: &[Vec<u8>],
) -> Result<ConvertReport, ConvertError> {
    let started = std::time::Instant::now();
    let manifest = store.manifest(selector).await?;
    let decoded = Index::decode_verified(&index.compressed, &index.digest)?;
    let given: std::collections::HashMap<Digest, &Vec<u8>> = blobs
        .iter()
        .map(|bytes| (Digest::of(bytes), bytes))
        .collect();
    let mut table = ChunkTable::default();
    for i in 0..decoded.blob_count() {
        let Some((digest, size)) = decoded.blob(i) else {
            continue;
        };
        let bytes = given.get(&digest).ok_or_else(|| {
            ConvertError::Source(format!(
                "the index lists blob {digest} ({size} bytes) but it was not given"
            ))
        })?;
        store.put_blob(bytes).await?;
        table.add_blob(stoker_format::BlobInfo { digest, size });
    }
    drop(decoded);
    publish(
        store,
        &manifest,
        None,
        index,
        &table,
        PackStats::default(),
        started.elapsed(),
    )
    .await
}

/// A Stoker artifact, as found from its image.
#[derive(Clone, Debug)]
pub struct FoundArtifact {
    /// The image manifest the artifact's subject names.
    pub image_manifest: Digest,
    pub platform: Option<String>,
    pub artifact: Digest,
    pub index_digest: Digest,
    pub index_size: u64,
    pub blobs: Vec<(Digest, u64)>,
}

/// Finds the Stoker artifact for `selector` (a tag or digest; for a
/// multi-platform image, `platform` or the first platform that has one).
pub async fn find_artifact(
    store: &ImageStore,
    selector: &str,
    platform: Option<&str>,
) -> Result<FoundArtifact, ConvertError> {
    let wanted: Vec<String> = platform.map(|p| vec![p.to_string()]).unwrap_or_default();
    for (platform, manifest) in store.platform_manifests(selector, &wanted).await? {
        let Some(artifact) = store.referrers(&manifest.digest).await?.pop() else {
            continue;
        };
        return read_artifact(store, &manifest.digest, platform, &artifact).await;
    }
    Err(ConvertError::NoArtifact(store.describe(selector)))
}

/// Reads an artifact manifest and checks that it belongs to `image_manifest`.
pub async fn read_artifact(
    store: &ImageStore,
    image_manifest: &Digest,
    platform: Option<String>,
    artifact: &Digest,
) -> Result<FoundArtifact, ConvertError> {
    let fetched = store.manifest(&artifact.to_string()).await?;
    let manifest: ImageManifest = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| ConvertError::Source(format!("artifact manifest {artifact}: {e}")))?;
    let subject = manifest
        .subject()
        .as_ref()
        .map(|s| s.digest().to_string())
        .unwrap_or_default();
    if subject != image_manifest.to_string() {
        return Err(ConvertError::Source(format!(
            "artifact {artifact} names subject {subject:?}, not image {image_manifest}"
        )));
    }
    if manifest
        .artifact_type()
        .as_ref()
        .map(|t| t.to_string())
        .as_deref()
        != Some(ARTIFACT_TYPE)
    {
        return Err(ConvertError::Source(format!(
            "artifact {artifact} is not a Stoker artifact"
        )));
    }
    let mut index = None;
    let mut blobs = Vec::new();
    for layer in manifest.layers() {
        let digest = Digest::parse(layer.digest().as_ref())?;
        match layer.media_type().to_string().as_str() {
            INDEX_MEDIA_TYPE => index = Some((digest, layer.size())),
            BLOB_MEDIA_TYPE => blobs.push((digest, layer.size())),
            _ => {}
        }
    }
    let (index_digest, index_size) = index
        .ok_or_else(|| ConvertError::Source(format!("artifact {artifact} has no index layer")))?;
    Ok(FoundArtifact {
        image_manifest: *image_manifest,
        platform,
        artifact: *artifact,
        index_digest,
        index_size,
        blobs,
    })
}

/// Fetches and verifies the index of an artifact.
pub async fn load_index(store: &ImageStore, found: &FoundArtifact) -> Result<Index, ConvertError> {
    let bytes = store.blob(&found.index_digest).await?;
    Ok(Index::decode_verified(&bytes, &found.index_digest)?)
}
