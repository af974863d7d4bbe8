//! The remote-snapshot hook: how the snapshotter learns that an image has a Stoker
//! artifact, and how it gets the image's lazy filesystem mounted.
//!
//! Two small traits are injected into [`Snapshotter`](crate::Snapshotter):
//! - [`ImageResolver`]: "does this image (ref + manifest digest) have a Stoker
//!   artifact?" — the real one looks up the registry's referrers, then the fallback tag;
//! - [`LazyMounter`]: "mount this image's lazy filesystem here" / "unmount it".
//!
//! The snapshotter owns everything else: reading containerd's labels, caching the
//! resolver's answers, recording remote snapshots, choosing mountpoints
//! (`<root>/mounts/<index digest>`), mounting once per image on the node, unmounting
//! after the last snapshot of the image is removed, and re-mounting after a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::SnapshotterError;

/// containerd sets this on every layer it unpacks: the chain ID the committed layer
/// will be named by.
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// The image reference (CRI, and any client using containerd's
/// `snapshotters.AppendInfoHandlerWrapper`).
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the image manifest.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The digest of the layer being prepared.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// Comma-separated digests of this layer and the layers above it (containerd passes
/// `children[i:]`, truncated to fit the 4 KiB label limit).
pub const IMAGE_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";
/// Set by Stoker on the snapshots it records as remote: the Stoker index digest.
pub const STOKER_INDEX_LABEL: &str = "stoker.dev/index-digest";

/// What the resolver knows about an image that has a Stoker artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StokerArtifact {
    /// Digest of the Stoker index (`sha256:<hex>`): the image's whole merged tree.
    pub index_digest: String,
    /// The image's layer digests, bottom to top, as in its manifest. The snapshotter
    /// knows a layer is the top one when it is the last of these.
    pub layer_digests: Vec<String>,
}

/// An image to mount lazily: the registry location and the index to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyImage {
    pub image_ref: String,
    pub manifest_digest: String,
    pub index_digest: String,
}

/// Finds out whether an image has a Stoker artifact.
pub trait ImageResolver: Send + Sync {
    /// `Ok(Some(_))` when the image `image_ref` with manifest `manifest_digest` has a
    /// Stoker artifact, `Ok(None)` when it has none (containerd then unpacks it
    /// normally). An `Err` is logged and treated as "none" for this layer, and not
    /// cached.
    fn resolve<'a>(
        &'a self,
        image_ref: &'a str,
        manifest_digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StokerArtifact>, SnapshotterError>>;
}

/// Mounts and unmounts the lazy filesystem of an image.
pub trait LazyMounter: Send + Sync {
    /// Mounts `image` at `mountpoint`, an existing empty directory that is not a mount
    /// point. Must return once the filesystem answers (containerd mounts an overlay
    /// over it right after).
    fn mount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>>;

    /// Unmounts what [`mount`](Self::mount) mounted at `mountpoint` and releases its
    /// resources. Called when no snapshot uses the image any more. If the mountpoint is
    /// still mounted afterwards the snapshotter detaches it.
    fn unmount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>>;

    /// True when a mount at `mountpoint` survived a restart of the agent and
    /// [`mount`](Self::mount) will resume serving it rather than mount anew. The
    /// snapshotter must not probe such a mount first: nobody answers it until it
    /// is resumed. Default: false.
    fn can_resume(&self, _mountpoint: &Path) -> bool {
        false
    }

    /// A container's writable snapshot was prepared on `image`. `container_id` is the
    /// last element of the active snapshot's key, which containerd sets to
    /// `<namespace>/<n>/<container ID>`. Default: nothing.
    fn container_prepared(&self, _image: &LazyImage, _container_id: &str) {}
}

/// A resolver for nodes without lazy loading: no image has an artifact, every image
/// is unpacked as usual.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoArtifacts;

impl ImageResolver for NoArtifacts {
    fn resolve<'a>(
        &'a self,
        _image_ref: &'a str,
        _manifest_digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StokerArtifact>, SnapshotterError>> {
        Box::pin(async { Ok(None) })
    }
}

/// A mounter that cannot mount: pairs with [`NoArtifacts`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLazyMounts;

impl LazyMounter for NoLazyMounts {
    fn mount<'a>(
        &'a self,
        image: &'a LazyImage,
        _mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        Box::pin(async move {
            Err(SnapshotterError::Remote {
                image: image.image_ref.clone(),
                message: "this agent has no lazy filesystem to mount images with".into(),
            })
        })
    }

    fn unmount<'a>(
        &'a self,
        _image: &'a LazyImage,
        _mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The CRI labels of a layer being unpacked, when all of them are present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    pub image_ref: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    /// The chain ID the committed layer is named by (`containerd.io/snapshot.ref`).
    pub target: String,
}

impl LayerLabels {
    /// Reads the labels containerd passes when unpacking a layer for a remote-aware
    /// client; `None` if any is missing (e.g. `ctr pull`).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<LayerLabels> {
        let get = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
        Some(LayerLabels {
            image_ref: get(IMAGE_REF_LABEL)?,
            manifest_digest: get(MANIFEST_DIGEST_LABEL)?,
            layer_digest: get(LAYER_DIGEST_LABEL)?,
            target: get(SNAPSHOT_REF_LABEL)?,
        })
    }
}

/// Caches [`ImageResolver`] answers by manifest digest. A found artifact is kept for
/// the life of the process (manifests are immutable); "no artifact" is kept for
/// `negative_ttl`, so an artifact pushed later is noticed; errors are not kept.
pub struct ResolverCache {
    entries: Mutex<HashMap<String, (Instant, Option<StokerArtifact>)>>,
    negative_ttl: Duration,
}

impl ResolverCache {
    pub fn new(negative_ttl: Duration) -> ResolverCache {
        ResolverCache {
            entries: Mutex::new(HashMap::new()),
            negative_ttl,
        }
    }

    /// The cached answer for `manifest_digest`, or the resolver's.
    pub async fn resolve(
        &self,
        resolver: &dyn ImageResolver,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<StokerArtifact>, SnapshotterError> {
        if let Some(answer) = self.cached(manifest_digest) {
            return Ok(answer);
        }
        let answer = resolver.resolve(image_ref, manifest_digest).await?;
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                manifest_digest.to_string(),
                (Instant::now(), answer.clone()),
            );
        }
        Ok(answer)
    }

    fn cached(&self, manifest_digest: &str) -> Option<Option<StokerArtifact>> {
        let entries = self.entries.lock().ok()?;
        let (at, answer) = entries.get(manifest_digest)?;
        if answer.is_none() && at.elapsed() > self.negative_ttl {
            return None;
        }
        Some(answer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl ImageResolver for Counting {
        fn resolve<'a>(
            &'a self,
            image_ref: &'a str,
            _manifest_digest: &'a str,
        ) -> BoxFuture<'a, Result<Option<StokerArtifact>, SnapshotterError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let found = image_ref.contains("lazy");
            Box::pin(async move {
                Ok(found.then(|| StokerArtifact {
                    index_digest: "sha256:1".into(),
                    layer_digests: vec!["sha256:a".into()],
                }))
            })
        }
    }

    #[tokio::test]
    async fn caches_answers_and_expires_negative_ones() {
        let resolver = Counting(AtomicUsize::new(0));
        let cache = ResolverCache::new(Duration::ZERO);
        for _ in 0..3 {
            let found = cache
                .resolve(&resolver, "r/lazy:1", "sha256:m1")
                .await
                .expect("resolve");
            assert!(found.is_some());
        }
        assert_eq!(resolver.0.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            let found = cache
                .resolve(&resolver, "r/plain:1", "sha256:m2")
                .await
                .expect("resolve");
            assert!(found.is_none());
        }
        // A zero TTL means "no artifact" is asked again every time.
        assert_eq!(resolver.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn reads_cri_labels() {
        let mut labels = BTreeMap::new();
        labels.insert(IMAGE_REF_LABEL.to_string(), "r/app:1".to_string());
        labels.insert(MANIFEST_DIGEST_LABEL.to_string(), "sha256:m".to_string());
        labels.insert(LAYER_DIGEST_LABEL.to_string(), "sha256:l".to_string());
        assert_eq!(LayerLabels::from_labels(&labels), None);
        labels.insert(SNAPSHOT_REF_LABEL.to_string(), "sha256:c".to_string());
        let layer = LayerLabels::from_labels(&labels).expect("complete");
        assert_eq!(layer.target, "sha256:c");
        assert_eq!(layer.layer_digest, "sha256:l");
    }
}
