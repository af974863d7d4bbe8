//! Where images come from and artifacts go: a registry repository or an OCI
//! layout directory. Also the conversion driver, which streams every layer of
//! each selected platform through the merge and the packer.

use std::io::{BufRead, Read};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use oci_client::Reference;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use stoker_format::{ChunkTable, Digest, Index, NodeId, NodeKind, Tree};
use stoker_registry::RegistryClient;
use tokio::sync::mpsc;
use tokio_util::bytes::Bytes;

use crate::artifact::{self, ConvertReport};
use crate::layer::{Compression, DigestingReader, layer_error, parse_entry};
use crate::layout::OciLayout;
use crate::merge::{Applied, LayerMerger};
use crate::pack::{BlobSink, BlobUpload, PackerHandle, StagedBlob};
use crate::{ConvertError, ConvertOptions};

const MEDIA_INDEX: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// An image repository: in a registry, or an OCI layout on disk.
#[derive(Clone)]
pub enum ImageStore {
    Registry {
        client: RegistryClient,
        /// The repository (`host[:port]/name`); its tag or digest is not used.
        repository: Reference,
    },
    Layout(OciLayout),
}

/// A manifest's bytes, as fetched.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// One layer to convert.
#[derive(Clone, Debug)]
struct LayerSource {
    digest: Digest,
    size: u64,
    media_type: String,
    diff_id: Option<Digest>,
}

impl ImageStore {
    /// Parses `host[:port]/name[:tag|@digest]` into a store and the tag or digest.
    pub fn registry(
        client: RegistryClient,
        reference: &str,
    ) -> Result<(ImageStore, String), ConvertError> {
        let parsed = stoker_registry::parse_reference(reference)?;
        let selector = parsed
            .digest()
            .map(str::to_string)
            .or_else(|| parsed.tag().map(str::to_string))
            .unwrap_or_else(|| "latest".into());
        Ok((
            ImageStore::Registry {
                client,
                repository: parsed,
            },
            selector,
        ))
    }

    /// A human-readable name for messages.
    pub fn describe(&self, selector: &str) -> String {
        match self {
            ImageStore::Registry { repository, .. } => {
                format!("{}", at_selector(repository, selector))
            }
            ImageStore::Layout(layout) => format!("oci:{}:{selector}", layout.dir.display()),
        }
    }

    /// Fetches a manifest by tag or digest.
    pub async fn manifest(&self, selector: &str) -> Result<Manifest, ConvertError> {
        match self {
            ImageStore::Registry { client, repository } => {
                let fetched = client
                    .fetch_manifest_at(&at_selector(repository, selector))
                    .await?;
                Ok(Manifest {
                    bytes: fetched.bytes.to_vec(),
                    media_type: fetched.media_type,
                    digest: fetched.digest,
                })
            }
            ImageStore::Layout(layout) => {
                let (media_type, digest) = if selector.starts_with("sha256:") {
                    (String::new(), Digest::parse(selector)?)
                } else {
                    layout.resolve((!selector.is_empty()).then_some(selector))?
                };
                let bytes = layout.read_blob(&digest)?;
                let media_type = if media_type.is_empty() {
                    sniff_media_type(&bytes)
                } else {
                    media_type
                };
                Ok(Manifest {
                    bytes,
                    media_type,
                    digest,
                })
            }
        }
    }

    /// Reads a whole blob into memory, verified (configs, indexes).
    pub async fn blob(&self, digest: &Digest) -> Result<Vec<u8>, ConvertError> {
        match self {
            ImageStore::Registry { client, repository } => {
                let mut stream = client.blob_stream(repository, digest);
                let mut bytes = Vec::new();
                while let Some(piece) = stream.next().await {
                    bytes.extend_from_slice(&piece?);
                }
                Ok(bytes)
            }
            ImageStore::Layout(layout) => layout.read_blob(digest),
        }
    }

    /// A blocking reader over a blob, for the layer reader's thread, filled
    /// ahead by a task (registry) or a thread (layout) so that fetching overlaps
    /// decompression. The blob's digest is checked on the way: if it does not
    /// match, reading its end fails.
    fn open_blob(
        &self,
        digest: &Digest,
        runtime: &tokio::runtime::Handle,
    ) -> Result<BlobReader, ConvertError> {
        let (pieces, reader) = BlobReader::channel();
        match self {
            ImageStore::Registry { client, repository } => {
                // The registry client checks the digest at the end of the stream.
                let mut stream = client.blob_stream(repository, digest);
                runtime.spawn(async move {
                    while let Some(piece) = stream.next().await {
                        let failed = piece.is_err();
                        let piece = piece.map_err(std::io::Error::other);
                        if pieces.send(piece).await.is_err() || failed {
                            return;
                        }
                    }
                    let _ = pieces.send(Ok(Bytes::new())).await;
                });
            }
            ImageStore::Layout(layout) => {
                let path = layout.blob_path(digest);
                let file = std::fs::File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
                let expected = *digest;
                std::thread::Builder::new()
                    .name("stoker-read".into())
                    .spawn(move || read_file_ahead(file, &path, &expected, &pieces))
                    .map_err(|e| ConvertError::Internal(format!("cannot start a reader: {e}")))?;
            }
        }
        Ok(reader)
    }

    /// Stores a staged blob in a layout (the registry store streams its blobs
    /// instead, see [`start_upload`]).
    fn put_staged(&self, blob: StagedBlob) -> Result<(), ConvertError> {
        match self {
            ImageStore::Registry { .. } => Err(ConvertError::Internal(
                "registry blobs are streamed, not staged".into(),
            )),
            ImageStore::Layout(layout) => {
                layout.put_blob_file(&blob.digest, &blob.path)?;
                let _ = std::fs::remove_file(&blob.path);
                Ok(())
            }
        }
    }

    pub(crate) async fn put_blob(&self, bytes: &[u8]) -> Result<Digest, ConvertError> {
        match self {
            ImageStore::Registry { client, repository } => {
                Ok(client.push_blob(repository, bytes.to_vec().into()).await?.0)
            }
            ImageStore::Layout(layout) => layout.put_blob(bytes),
        }
    }

    /// Pushes an artifact manifest that refers to `subject`, making it findable
    /// through the referrers API or its tag fallback.
    pub(crate) async fn put_referrer(
        &self,
        manifest: &[u8],
        media_type: &str,
        subject: &Digest,
    ) -> Result<Digest, ConvertError> {
        match self {
            ImageStore::Registry { client, repository } => Ok(client
                .attach_referrer(repository, manifest.to_vec().into(), subject)
                .await?),
            ImageStore::Layout(layout) => {
                layout.add_manifest(manifest, media_type, stoker_format::artifact::ARTIFACT_TYPE)
            }
        }
    }

    /// Digests of the Stoker artifacts whose subject is `subject`.
    pub async fn referrers(&self, subject: &Digest) -> Result<Vec<Digest>, ConvertError> {
        let artifact_type = stoker_format::artifact::ARTIFACT_TYPE;
        match self {
            ImageStore::Registry { client, repository } => Ok(client
                .find_referrers(repository, subject, artifact_type)
                .await?
                .into_iter()
                .filter_map(|d| Digest::parse(d.digest().as_ref()).ok())
                .collect()),
            ImageStore::Layout(layout) => layout.referrers(subject, artifact_type),
        }
    }

    /// The image manifests `selector` stands for: itself, or the platforms of an
    /// image index (those in `platforms`, or all when it is empty).
    pub async fn platform_manifests(
        &self,
        selector: &str,
        platforms: &[String],
    ) -> Result<Vec<(Option<String>, Manifest)>, ConvertError> {
        let top = self.manifest(selector).await?;
        if !MEDIA_INDEX.contains(&top.media_type.as_str()) {
            return Ok(vec![(None, top)]);
        }
        let index: ImageIndex = serde_json::from_slice(&top.bytes)
            .map_err(|e| ConvertError::Source(format!("image index {}: {e}", top.digest)))?;
        let mut out = Vec::new();
        for entry in index.manifests() {
            let Some(platform) = entry.platform() else {
                continue;
            };
            let mut name = format!("{}/{}", platform.os(), platform.architecture());
            if let Some(variant) = platform.variant() {
                name = format!("{name}/{variant}");
            }
            if !platforms.is_empty() && !platforms.iter().any(|p| p == &name) {
                continue;
            }
            let digest = Digest::parse(entry.digest().as_ref())?;
            out.push((Some(name), self.manifest(&digest.to_string()).await?));
        }
        if out.is_empty() {
            return Err(ConvertError::Source(format!(
                "image index {} has no platform matching {platforms:?}",
                top.digest
            )));
        }
        Ok(out)
    }
}

/// `repository` at a tag or digest.
fn at_selector(repository: &Reference, selector: &str) -> Reference {
    let (registry, name) = (
        repository.registry().to_string(),
        repository.repository().to_string(),
    );
    if selector.starts_with("sha256:") {
        Reference::with_digest(registry, name, selector.to_string())
    } else {
        Reference::with_tag(registry, name, selector.to_string())
    }
}

/// Read-ahead depth of a blob reader, in pieces (network reads, or
/// [`LAYOUT_READ_BYTES`] from a file).
const READ_AHEAD_PIECES: usize = 256;

/// A layout blob is read ahead in pieces of this size.
const LAYOUT_READ_BYTES: usize = 1 << 20;

/// The layer reader's end of a blob read ahead by a task or a thread. The
/// producer sends the blob in pieces, then an empty piece once the whole blob
/// was read and its digest matched; an error ends the blob early.
pub struct BlobReader {
    pieces: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    ended: bool,
}

impl BlobReader {
    fn channel() -> (mpsc::Sender<std::io::Result<Bytes>>, BlobReader) {
        let (sender, pieces) = mpsc::channel(READ_AHEAD_PIECES);
        (
            sender,
            BlobReader {
                pieces,
                current: Bytes::new(),
                ended: false,
            },
        )
    }
}

impl std::io::BufRead for BlobReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.current.is_empty() && !self.ended {
            match self.pieces.blocking_recv() {
                Some(Ok(piece)) if piece.is_empty() => self.ended = true,
                Some(Ok(piece)) => self.current = piece,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob reader stopped before the end of the blob",
                    ));
                }
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        let _ = self.current.split_to(amount.min(self.current.len()));
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Reads a layout blob into `pieces`, hashing it; ends with an empty piece if
/// its digest is `expected`, with an error otherwise.
fn read_file_ahead(
    mut file: std::fs::File,
    path: &std::path::Path,
    expected: &Digest,
    pieces: &mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut hasher = stoker_format::Hasher::new();
    loop {
        let mut piece = vec![0u8; LAYOUT_READ_BYTES];
        let n = match read_full(&mut file, &mut piece) {
            Ok(n) => n,
            Err(e) => {
                let _ = pieces.blocking_send(Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                )));
                return;
            }
        };
        if n == 0 {
            break;
        }
        piece.truncate(n);
        hasher.update(&piece);
        if pieces.blocking_send(Ok(piece.into())).is_err() {
            return;
        }
    }
    let actual = hasher.finish();
    let end = if actual == *expected {
        Ok(Bytes::new())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: digest mismatch: expected {expected}, got {actual}",
                path.display()
            ),
        ))
    };
    let _ = pieces.blocking_send(end);
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Starts a streamed blob upload to `repository`: a task pushes the pieces the
/// packer sends as one chunked upload, and is abandoned (never committed) if
/// the packer stops before the blob is complete.
fn start_upload(
    client: &RegistryClient,
    repository: &Reference,
    runtime: &tokio::runtime::Handle,
) -> BlobUpload {
    let (pieces, receiver) = mpsc::channel::<Option<Bytes>>(4);
    let (done_sender, done) = tokio::sync::oneshot::channel();
    let (client, repository) = (client.clone(), repository.clone());
    runtime.spawn(async move {
        let stream = futures::stream::unfold(Some(receiver), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Some(Some(piece)) => Some((Ok(piece), Some(receiver))),
                Some(None) => None,
                None => Some((
                    Err(std::io::Error::other(
                        "conversion stopped before the blob was complete",
                    )),
                    None,
                )),
            }
        });
        let result = client
            .push_blob_stream(&repository, stream)
            .await
            .map_err(ConvertError::from);
        let _ = done_sender.send(result);
    });
    BlobUpload { pieces, done }
}

fn sniff_media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value["mediaType"].as_str() {
        Some(m) => m.to_string(),
        None if value["manifests"].is_array() => MEDIA_INDEX[0].to_string(),
        None => "application/vnd.oci.image.manifest.v1+json".to_string(),
    }
}

/// Converts the image `selector` names in `store` (every selected platform) and
/// stores one artifact per platform manifest in the same place.
pub async fn convert(
    store: &ImageStore,
    selector: &str,
    options: &ConvertOptions,
) -> Result<Vec<ConvertReport>, ConvertError> {
    options.chunking.validate()?;
    if let Some(plan) = &options.layout_plan {
        let target = crate::trace_layout::resolve(
            store,
            selector,
            &options.platforms,
            options.chunking,
            plan,
        )
        .await?;
        let report =
            convert_manifest(store, target.platform, target.manifest, options, target.hot).await?;
        return Ok(vec![report]);
    }
    let mut reports = Vec::new();
    for (platform, manifest) in store
        .platform_manifests(selector, &options.platforms)
        .await?
    {
        reports.push(convert_manifest(store, platform, manifest, options, Vec::new()).await?);
    }
    Ok(reports)
}

async fn convert_manifest(
    store: &ImageStore,
    platform: Option<String>,
    manifest: Manifest,
    options: &ConvertOptions,
    hot: Vec<Digest>,
) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let parsed: ImageManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| ConvertError::Source(format!("image manifest {}: {e}", manifest.digest)))?;
    let config_digest = Digest::parse(parsed.config().digest().as_ref())?;
    let config: ImageConfiguration = serde_json::from_slice(&store.blob(&config_digest).await?)
        .map_err(|e| ConvertError::Source(format!("image config {config_digest}: {e}")))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != parsed.layers().len() {
        return Err(ConvertError::Source(format!(
            "image {} has {} layers but its config lists {} diff_ids",
            manifest.digest,
            parsed.layers().len(),
            diff_ids.len()
        )));
    }
    let layers: Vec<LayerSource> = parsed
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            Ok(LayerSource {
                digest: Digest::parse(layer.digest().as_ref())?,
                size: layer.size(),
                media_type: layer.media_type().to_string(),
                diff_id: Digest::parse(diff_id).ok(),
            })
        })
        .collect::<Result<_, ConvertError>>()?;

    let staging = tempfile::Builder::new()
        .prefix("stoker-convert-")
        .tempdir_in(
            options
                .staging_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir),
        )
        .map_err(|e| ConvertError::Internal(format!("staging dir: {e}")))?;

    let runtime = tokio::runtime::Handle::current();
    // Registry blobs are streamed while they are written; layout blobs are
    // staged files moved into the layout once complete.
    let sink = match store {
        ImageStore::Registry { client, repository } => {
            let (client, repository, runtime) =
                (client.clone(), repository.clone(), runtime.clone());
            BlobSink::Streamed(Box::new(move || {
                start_upload(&client, &repository, &runtime)
            }))
        }
        ImageStore::Layout(_) => {
            let store = store.clone();
            BlobSink::Staged(Box::new(move |blob| store.put_staged(blob)))
        }
    };
    let reader_store = store.clone();
    let options_for_reader = options.clone();
    let staging_path = staging.path().to_path_buf();
    let progress = Arc::new(progress_bar(
        options.progress,
        layers.iter().map(|l| l.size).sum(),
    ));
    let progress_for_reader = progress.clone();
    let hot_for_packer = hot.clone();
    let (index, table, stats) = tokio::task::spawn_blocking(move || {
        let packer = PackerHandle::start(
            &staging_path,
            options_for_reader.zstd_level,
            ChunkTable::default(),
            hot_for_packer,
            sink,
        )?;
        let mut tree = Tree::default();
        let read = layers.iter().try_for_each(|layer| {
            let reader = reader_store.open_blob(&layer.digest, &runtime)?;
            let reader = progress_for_reader.wrap_read(reader);
            read_layer(layer, reader, &mut tree, &packer, &options_for_reader)
        });
        if let Err(e) = read {
            return Err(packer.abort(e));
        }
        let packed = packer.finish()?;
        for (node, piece) in packed.pieces {
            if let Some(NodeKind::File { pieces, .. }) = tree.node_mut(node).map(|n| &mut n.kind) {
                pieces.push(piece);
            }
        }
        let index = tree.encode(&packed.table, options_for_reader.chunking)?;
        Ok::<_, ConvertError>((index, packed.table, packed.stats))
    })
    .await
    .map_err(|e| ConvertError::Internal(format!("layer reader: {e}")))??;
    progress.finish_and_clear();

    let layout_plan = if hot.is_empty() {
        None
    } else {
        let new_index = Index::decode(&index.compressed)?;
        Some(crate::trace_layout::rebind(&hot, &new_index, index.digest)?)
    };
    let mut report = artifact::publish(
        store,
        &manifest,
        platform,
        index,
        &table,
        stats,
        started.elapsed(),
    )
    .await?;
    if let Some(plan) = layout_plan {
        report.hot_blob = table.blobs.first().map(|blob| artifact::HotBlobReport {
            digest: blob.digest.to_string(),
            size: blob.size,
            chunks: plan.chunks.len() as u64,
            uncompressed_bytes: table
                .chunks
                .iter()
                .filter(|c| c.blob == 0)
                .map(|c| c.uncompressed_len as u64)
                .sum(),
        });
        report.layout_plan = Some(plan);
    }
    Ok(report)
}

/// Streams one layer: decompression, tar parsing, merge, chunking, and the
/// diff_id check. `reader` checks the blob's own digest (see
/// [`ImageStore::open_blob`]), so it is not hashed again here.
fn read_layer(
    layer: &LayerSource,
    mut reader: impl BufRead,
    tree: &mut Tree,
    packer: &PackerHandle,
    options: &ConvertOptions,
) -> Result<(), ConvertError> {
    let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
        layer_error(
            &layer.digest,
            None,
            format!("unsupported layer media type {:?}", layer.media_type),
        )
    })?;
    let diff_id = read_tar_layer(
        tree,
        &layer.digest,
        &mut reader,
        compression,
        options,
        |node, offset, data| {
            packer
                .chunk(node, offset, data)
                .map_err(|e| std::io::Error::other(e.to_string()))
        },
    )?;
    // Whatever follows the compressed stream, up to the end, where the digest is checked.
    std::io::copy(&mut reader, &mut std::io::sink())
        .map_err(|e| layer_error(&layer.digest, None, e))?;
    if let Some(expected) = layer.diff_id
        && expected != diff_id
    {
        return Err(ConvertError::DigestMismatch {
            what: format!("layer {} uncompressed (diff_id)", layer.digest),
            expected,
            actual: diff_id,
        });
    }
    packer.end_layer()
}

/// What [`read_layer_into`] measured while reading a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerDigests {
    /// SHA-256 of the blob as read: the layer digest in the manifest.
    pub compressed: Digest,
    /// SHA-256 of the uncompressed tar stream: the layer's diff_id.
    pub diff_id: Digest,
}

/// Reads one layer blob into `tree`: undoes `compression`, parses the tar stream,
/// applies the options' policy and OCI layer semantics, and passes every regular
/// file's contents to `sink` as `(node, offset, chunk)`, cut by `options.chunking`.
/// `layer` names the layer in errors. The caller compares the returned digests
/// with the ones it expects.
pub fn read_layer_into(
    tree: &mut Tree,
    layer: &Digest,
    reader: impl Read,
    compression: Compression,
    options: &ConvertOptions,
    sink: impl FnMut(NodeId, u64, Vec<u8>) -> std::io::Result<()>,
) -> Result<LayerDigests, ConvertError> {
    let mut compressed = std::io::BufReader::new(DigestingReader::new(reader));
    let diff_id = read_tar_layer(tree, layer, &mut compressed, compression, options, sink)?;
    std::io::copy(&mut compressed, &mut std::io::sink())
        .map_err(|e| layer_error(layer, None, e))?;
    let (compressed, _) = compressed
        .into_inner()
        .finish()
        .map_err(|e| layer_error(layer, None, e))?;
    Ok(LayerDigests {
        compressed,
        diff_id,
    })
}

/// The body of [`read_layer_into`]: decompression, tar, merge and chunking,
/// over a blob reader it does not hash. Returns the diff_id.
fn read_tar_layer(
    tree: &mut Tree,
    layer: &Digest,
    compressed: impl BufRead,
    compression: Compression,
    options: &ConvertOptions,
    mut sink: impl FnMut(NodeId, u64, Vec<u8>) -> std::io::Result<()>,
) -> Result<Digest, ConvertError> {
    let err = |entry: Option<&[Vec<u8>]>, reason: &dyn std::fmt::Display| {
        layer_error(layer, entry, reason)
    };
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(compressed)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| err(None, &format!("zstd: {e}")))?,
        ),
        Compression::None => Box::new(compressed),
    };
    let mut tar_stream = DigestingReader::new(decoded);
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        let mut merger = LayerMerger::new(tree);
        let mut last_path: Option<Vec<Vec<u8>>> = None;
        let entries = archive.entries().map_err(|e| err(None, &e))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| err(last_path.as_deref(), &format!("after this entry: {e}")))?;
            let parsed = parse_entry(&mut entry).map_err(|reason| {
                let raw = entry.path_bytes().into_owned();
                ConvertError::Layer {
                    layer: *layer,
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                    reason,
                }
            })?;
            let path = parsed.path.clone();
            check_policy(&parsed, options).map_err(|reason| err(Some(&path), &reason))?;
            match merger
                .apply(parsed)
                .map_err(|reason| err(Some(&path), &reason))?
            {
                Applied::File(node) => options
                    .chunking
                    .split(&mut entry, |offset, data| sink(node, offset, data))
                    .map_err(|e| err(Some(&path), &format!("reading file data: {e}")))?,
                Applied::Other => {}
            }
            last_path = Some(path);
        }
        merger.finish();
    }
    if !tar_stream.ends_with_zero_block() {
        return Err(err(
            None,
            &"tar stream is truncated (no end-of-archive marker)",
        ));
    }
    let (diff_id, _) = tar_stream
        .finish()
        .map_err(|e| err(None, &format!("after the archive: {e}")))?;
    Ok(diff_id)
}

fn check_policy(entry: &crate::layer::LayerEntry, options: &ConvertOptions) -> Result<(), String> {
    use crate::layer::EntryKind;
    if options.deny_setuid && entry.permissions & 0o6000 != 0 {
        return Err("setuid/setgid file refused by policy (--deny-setuid)".into());
    }
    if options.deny_devices
        && matches!(
            entry.kind,
            EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. }
        )
    {
        return Err("device file refused by policy (--deny-devices)".into());
    }
    Ok(())
}

/// A progress bar over compressed layer bytes, hidden unless asked for and on a terminal.
fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} converting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}
