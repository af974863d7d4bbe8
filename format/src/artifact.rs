//! Names used in the OCI artifact that carries a converted image.
//!
//! The artifact is an OCI image manifest whose `artifactType` is
//! [`ARTIFACT_TYPE`], whose `subject` is the source image manifest, whose config
//! is the OCI empty descriptor, and whose layers are the index (first) and the
//! data blobs, in the order the index's blob table lists them.

/// `artifactType` of a Stoker artifact manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.stoker.image.v1";
/// Media type of the compressed metadata index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.stoker.index.v1+zstd";
/// Media type of a data blob (concatenated zstd frames, one per chunk).
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.stoker.chunks.v1";
/// The OCI empty config.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Annotation on the artifact: the platform it was converted for (`os/arch[/variant]`).
pub const ANNOTATION_PLATFORM: &str = "dev.stoker.platform";
/// Annotation on the artifact: format version.
pub const ANNOTATION_FORMAT_VERSION: &str = "dev.stoker.format.version";
/// Annotation on the artifact: the index's summary, as JSON.
pub const ANNOTATION_SUMMARY: &str = "dev.stoker.summary";
