//! [`ImageBuilder`]: layers of [`Entry`]s → blobs, config, manifest and `index.json` in an
//! OCI image-layout directory. Output is deterministic: the same builder always gives the
//! same digests.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::entry::Entry;
use super::tar_writer::append_entry;
use crate::TestkitError;

pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Annotation that names a tag in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd` (with frame checksum, like the zstd CLI)
    Zstd,
}

impl Compression {
    /// The OCI layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Compresses `data` in memory.
    pub fn compress(self, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut compressor = Compressor::new(self, Vec::new())?;
        compressor.write_all(data)?;
        compressor.finish()
    }
}

/// What a layer is made of.
#[derive(Debug, Clone)]
pub enum LayerContent {
    /// Entries written as a tar stream, then compressed.
    Entries(Vec<Entry>),
    /// A ready tar stream (possibly malformed), compressed as the layer says.
    RawTar(Vec<u8>),
    /// A ready blob stored as is (possibly malformed), with the diff_id to put in the
    /// config (`sha256:…`).
    RawBlob { blob: Vec<u8>, diff_id: String },
}

/// One layer of an image.
#[derive(Debug, Clone)]
pub struct Layer {
    pub content: LayerContent,
    pub compression: Compression,
    /// Store this blob with one byte flipped, under the digest of the correct bytes,
    /// so the blob does not match the digest the manifest gives. Such a layout can be
    /// read directly but cannot be pushed (skopeo and the registry verify digests).
    pub corrupt_after_digest: bool,
    /// Put this diff_id in the config instead of the real one.
    pub diff_id_override: Option<String>,
}

impl Layer {
    /// A layer of entries with this compression.
    pub fn entries(entries: Vec<Entry>, compression: Compression) -> Self {
        Layer {
            content: LayerContent::Entries(entries),
            compression,
            corrupt_after_digest: false,
            diff_id_override: None,
        }
    }
}

/// The platform an image is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn linux(architecture: &str) -> Self {
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut value = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(variant) = &self.variant {
            value["variant"] = json!(variant);
        }
        value
    }
}

/// A blob written to a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDescriptor {
    pub media_type: String,
    /// `sha256:…`
    pub digest: String,
    pub size: u64,
}

impl BlobDescriptor {
    fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// A layer blob written to a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    pub blob: BlobDescriptor,
    /// `sha256:…` of the uncompressed tar, as put in the config.
    pub diff_id: String,
}

/// What [`ImageBuilder::write_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    pub manifest: BlobDescriptor,
    pub config: BlobDescriptor,
    pub layers: Vec<WrittenLayer>,
    pub platform: Platform,
}

/// Builds an OCI image from layers of entries.
///
/// ```no_run
/// use stoker_testkit::image::{Entry, ImageBuilder};
/// let image = ImageBuilder::new()
///     .layer(vec![Entry::dir("etc"), Entry::file("etc/hello", "hi\n")])
///     .layer(vec![Entry::whiteout("etc/hello")]);
/// image.write_layout(std::path::Path::new("/tmp/layout"), "v1").unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    pub layers: Vec<Layer>,
    pub platform: Platform,
    /// Compression of layers added after it is set (default gzip).
    pub compression: Compression,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder::new()
    }
}

impl ImageBuilder {
    /// An image with no layers for linux/amd64, gzip layers.
    pub fn new() -> Self {
        ImageBuilder {
            layers: Vec::new(),
            platform: Platform::linux("amd64"),
            compression: Compression::Gzip,
        }
    }

    /// Sets the compression of the layers added from now on.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Sets the platform written to the config (and to an image index).
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Adds a layer of entries, applied over the previous layers.
    pub fn layer(mut self, entries: Vec<Entry>) -> Self {
        self.layers.push(Layer::entries(entries, self.compression));
        self
    }

    /// Adds a layer given in full (raw or tampered layers).
    pub fn raw_layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Writes the image into the OCI layout at `dir` (created if needed; other images
    /// already in it are kept and share blobs) and tags it `tag` in `index.json`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<WrittenImage, TestkitError> {
        init_layout(dir)?;
        let image = self.write_blobs(dir)?;
        set_tag(dir, tag, &image.manifest)?;
        Ok(image)
    }

    /// Writes layers, config and manifest blobs; returns their descriptors.
    pub(crate) fn write_blobs(&self, dir: &Path) -> Result<WrittenImage, TestkitError> {
        let mut layers = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            layers.push(
                write_layer(dir, layer)
                    .map_err(|e| TestkitError::io(format!("writing layer {index}"), e))?,
            );
        }
        let config = json!({
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let config = write_json_blob(dir, MEDIA_TYPE_CONFIG, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.to_json(),
            "layers": layers.iter().map(|l| l.blob.to_json()).collect::<Vec<_>>(),
        });
        let manifest = write_json_blob(dir, MEDIA_TYPE_MANIFEST, &manifest)?;
        Ok(WrittenImage {
            manifest,
            config,
            layers,
            platform: self.platform.clone(),
        })
    }
}

/// What [`write_multi_platform_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenIndex {
    pub index: BlobDescriptor,
    pub images: Vec<WrittenImage>,
}

/// Writes each image (each with its own [`Platform`]) and an OCI image index listing them,
/// tagged `tag` in the layout at `dir`.
pub fn write_multi_platform_layout(
    dir: &Path,
    tag: &str,
    images: &[ImageBuilder],
) -> Result<WrittenIndex, TestkitError> {
    init_layout(dir)?;
    let mut written = Vec::new();
    for image in images {
        written.push(image.write_blobs(dir)?);
    }
    let manifests: Vec<Value> = written
        .iter()
        .map(|image| {
            let mut descriptor = image.manifest.to_json();
            descriptor["platform"] = image.platform.to_json();
            descriptor
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    let index = write_json_blob(dir, MEDIA_TYPE_INDEX, &index)?;
    set_tag(dir, tag, &index)?;
    Ok(WrittenIndex {
        index,
        images: written,
    })
}

/// Path of a blob in a layout: `DIR/blobs/sha256/HEX`.
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    dir.join("blobs").join(algorithm).join(hex)
}

fn init_layout(dir: &Path) -> Result<(), TestkitError> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs)
        .map_err(|e| TestkitError::io(format!("creating {}", blobs.display()), e))?;
    let layout_file = dir.join("oci-layout");
    fs::write(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| TestkitError::io(format!("writing {}", layout_file.display()), e))
}

/// Points `tag` in `DIR/index.json` at `target`, replacing an older entry with that tag.
fn set_tag(dir: &Path, tag: &str, target: &BlobDescriptor) -> Result<(), TestkitError> {
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(bytes) => {
            let index: Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestkitError::InvalidImage(format!("{} is not JSON: {e}", index_path.display()))
            })?;
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(TestkitError::io(
                format!("reading {}", index_path.display()),
                e,
            ));
        }
    };
    manifests.retain(|m| m["annotations"][ANNOTATION_REF_NAME] != json!(tag));
    let mut descriptor = target.to_json();
    descriptor["annotations"] = json!({ ANNOTATION_REF_NAME: tag });
    manifests.push(descriptor);
    let index =
        json!({ "schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": manifests });
    let bytes = serde_json::to_vec(&index)
        .map_err(|e| TestkitError::InvalidImage(format!("encoding index.json: {e}")))?;
    fs::write(&index_path, bytes)
        .map_err(|e| TestkitError::io(format!("writing {}", index_path.display()), e))
}

fn write_json_blob(
    dir: &Path,
    media_type: &str,
    value: &Value,
) -> Result<BlobDescriptor, TestkitError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| TestkitError::InvalidImage(format!("encoding {media_type}: {e}")))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let path = blob_path(dir, &digest);
    fs::write(&path, &bytes)
        .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))?;
    Ok(BlobDescriptor {
        media_type: media_type.to_string(),
        digest,
        size: bytes.len() as u64,
    })
}

/// Streams a layer into `DIR/blobs/sha256/`, hashing the uncompressed and compressed bytes.
fn write_layer(dir: &Path, layer: &Layer) -> io::Result<WrittenLayer> {
    let blobs = dir.join("blobs").join("sha256");
    let file = tempfile::NamedTempFile::new_in(&blobs)?;
    let blob_writer = HashingWriter::new(io::BufWriter::new(file));
    let (blob_writer, diff_id) = match &layer.content {
        LayerContent::RawBlob { blob, diff_id } => {
            let mut writer = blob_writer;
            writer.write_all(blob)?;
            (writer, diff_id.clone())
        }
        LayerContent::RawTar(tar) => {
            let mut tar_writer =
                HashingWriter::new(Compressor::new(layer.compression, blob_writer)?);
            tar_writer.write_all(tar)?;
            let (compressor, tar_digest, _) = tar_writer.finish();
            (compressor.finish()?, tar_digest)
        }
        LayerContent::Entries(entries) => {
            let tar_writer = HashingWriter::new(Compressor::new(layer.compression, blob_writer)?);
            let mut builder = tar::Builder::new(tar_writer);
            for entry in entries {
                append_entry(&mut builder, entry).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("entry {}: {e}", entry.path.escape_ascii()),
                    )
                })?;
            }
            let (compressor, tar_digest, _) = builder.into_inner()?.finish();
            (compressor.finish()?, tar_digest)
        }
    };
    let (buffered, digest, size) = blob_writer.finish();
    let file = buffered.into_inner().map_err(|e| e.into_error())?;
    let path = blob_path(dir, &digest);
    file.persist(&path).map_err(|e| e.error)?;
    if layer.corrupt_after_digest {
        flip_middle_byte(&path)?;
    }
    Ok(WrittenLayer {
        blob: BlobDescriptor {
            media_type: layer.compression.media_type().to_string(),
            digest,
            size,
        },
        diff_id: layer.diff_id_override.clone().unwrap_or(diff_id),
    })
}

fn flip_middle_byte(path: &Path) -> io::Result<()> {
    let mut bytes = fs::read(path)?;
    if bytes.is_empty() {
        bytes.push(0);
    } else {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xFF;
    }
    fs::write(path, bytes)
}

/// Counts and hashes what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Returns the inner writer, the `sha256:…` digest and the byte count.
    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that compresses (or not) into `W`.
enum Compressor<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    fn new(compression: Compression, inner: W) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Compressor::None(inner),
            Compression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                inner,
                flate2::Compression::fast(),
            )),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(inner, 3)?;
                encoder.include_checksum(true)?;
                Compressor::Zstd(encoder)
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(inner) => Ok(inner),
            Compressor::Gzip(encoder) => encoder.finish(),
            Compressor::Zstd(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(inner) => inner.write(buf),
            Compressor::Gzip(encoder) => encoder.write(buf),
            Compressor::Zstd(encoder) => encoder.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(inner) => inner.flush(),
            Compressor::Gzip(encoder) => encoder.flush(),
            Compressor::Zstd(encoder) => encoder.flush(),
        }
    }
}
