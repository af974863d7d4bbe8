//! The containerd snapshotter: overlayfs snapshots for ordinary layers, lazily mounted
//! Stoker images for images that have an artifact.
//!
//! Where it sits in the data path: registry → fetch → verify → cache → lazy
//! filesystem (`stoker-lazyfs`) → **snapshotter** → container. containerd asks this
//! crate for a layer's snapshot; for an image with a Stoker artifact it answers with
//! the image's lazy mount instead of unpacking the layer. The crate knows nothing of
//! registries or FUSE: the node agent (`stoker-agent`) plugs those in through two small
//! traits, [`ImageResolver`] and [`LazyMounter`] (see [`remote`]), and serves
//! [`service::SnapshotsService`] on containerd's proxy-plugin socket.
//!
//! [`Snapshotter`] implements the semantics of every call of containerd's snapshots API;
//! [`service`] exposes it over gRPC. Layout under the snapshotter's root directory:
//!
//! ```text
//! metadata.redb           snapshot records (see store.rs)
//! snapshots/<id>/fs       a snapshot's own files (overlay upperdir, or bind source)
//! snapshots/<id>/work     overlay workdir (active snapshots only)
//! mounts/<index digest>/  the lazy mount of one Stoker image, shared by its snapshots
//! ```
//!
//! # Remote snapshots
//!
//! When containerd unpacks a layer for CRI it calls Prepare with the CRI labels and
//! `containerd.io/snapshot.ref` = the layer's chain ID (see [`remote`]). If the
//! [`ImageResolver`] says the image has a Stoker artifact, the snapshotter records a
//! committed, content-less snapshot named by that chain ID and answers `AlreadyExists`;
//! containerd then finds it (List with a `snapshot.ref` filter), skips downloading and
//! unpacking the layer, and moves on to the next. When the layer is the image's top
//! layer, the image's lazy filesystem is mounted (once per image on the node) and that
//! snapshot stands for the whole merged tree: a container's snapshot on top of it is an
//! overlay with `lowerdir=<lazy mountpoint>`. Removing the last top-layer snapshot of
//! an image unmounts it. On start, the lazy mounts of recorded images are re-created.
//!
//! Limitation: lower layers of a Stoker image have no content of their own. An image
//! without an artifact that shares base layers (same chain IDs) with a Stoker image
//! already pulled in the same containerd namespace cannot be unpacked on top of them;
//! Prepare then fails with `FailedPrecondition` naming the layer.

mod error;
pub mod filter;
pub mod mounts;
pub mod remote;
pub mod service;
pub mod store;
pub mod usage;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stoker_api::Mount;
use tokio::sync::Mutex;

pub use error::SnapshotterError;
use filter::Filter;
pub use remote::{
    ImageResolver, LayerLabels, LazyImage, LazyMounter, NoArtifacts, NoLazyMounts, StokerArtifact,
};
use remote::{ResolverCache, STOKER_INDEX_LABEL};
use store::{NewSnapshot, SnapshotStore};
pub use store::{RemoteLayer, SnapshotKind, SnapshotRecord};
pub use usage::DiskUsage;

/// Tunables of the snapshotter.
#[derive(Debug, Clone)]
pub struct SnapshotterOptions {
    /// How long "this image has no Stoker artifact" is remembered.
    pub negative_cache_ttl: Duration,
    /// How long one artifact lookup may take; past it the layer is unpacked normally.
    pub resolve_timeout: Duration,
}

impl Default for SnapshotterOptions {
    fn default() -> Self {
        SnapshotterOptions {
            negative_cache_ttl: Duration::from_secs(60),
            resolve_timeout: Duration::from_secs(10),
        }
    }
}

/// An image whose lazy filesystem the snapshotter has mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedImage {
    pub image: LazyImage,
    pub mountpoint: PathBuf,
    /// Snapshots (top layers and the snapshots on top of them) using the mount.
    pub users: u32,
}

/// containerd's snapshotter, backed by directories, overlayfs and lazy mounts.
pub struct Snapshotter {
    root: PathBuf,
    store: SnapshotStore,
    resolver: Arc<dyn ImageResolver>,
    mounter: Arc<dyn LazyMounter>,
    resolver_cache: ResolverCache,
    resolve_timeout: Duration,
    index_off: bool,
    /// Serialises changes to records, directories and mounts.
    lock: Mutex<()>,
}

impl Snapshotter {
    /// Opens the snapshotter rooted at `root` (created if missing), and re-mounts the
    /// lazy filesystems of the images it has remote snapshots for.
    pub async fn open(
        root: &Path,
        resolver: Arc<dyn ImageResolver>,
        mounter: Arc<dyn LazyMounter>,
        options: SnapshotterOptions,
    ) -> Result<Snapshotter, SnapshotterError> {
        for dir in [
            root.to_path_buf(),
            root.join("snapshots"),
            root.join("mounts"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| SnapshotterError::io(format!("creating {}", dir.display()), e))?;
        }
        let store = SnapshotStore::open(&root.join("metadata.redb"))?;
        let snapshotter = Snapshotter {
            root: root.to_path_buf(),
            store,
            resolver,
            mounter,
            resolver_cache: ResolverCache::new(options.negative_cache_ttl),
            resolve_timeout: options.resolve_timeout,
            index_off: mounts::overlay_index_off(),
            lock: Mutex::new(()),
        };
        snapshotter.restore_lazy_mounts().await;
        Ok(snapshotter)
    }

    /// The directory this snapshotter keeps everything in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates an active (writable) snapshot `key` on `parent` and returns its mounts.
    ///
    /// With the CRI labels of an image that has a Stoker artifact, records the layer as
    /// a remote snapshot instead and fails with [`SnapshotterError::AlreadyExists`], which
    /// tells containerd to skip unpacking it.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        if let Some(layer) = LayerLabels::from_labels(&labels)
            && let Some(artifact) = self.artifact_for(&layer).await
        {
            self.record_remote_layer(parent, labels, &layer, &artifact)
                .await?;
            return Err(SnapshotterError::AlreadyExists(layer.target));
        }
        self.create(SnapshotKind::Active, key, parent, labels).await
    }

    /// Creates a read-only view `key` of `parent` and returns its mounts.
    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        self.create(SnapshotKind::View, key, parent, labels).await
    }

    /// The mounts of the active snapshot or view `key`.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotterError> {
        let _guard = self.lock.lock().await;
        let record = self.store.require(key)?;
        if record.kind == SnapshotKind::Committed {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        self.mounts_of(&record).await
    }

    /// Commits the active snapshot `key` as `name`, measuring its disk usage.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotterError> {
        let record = self.store.require(key)?;
        let fs = self.fs_dir(record.id);
        let usage = if record.kind == SnapshotKind::Active && record.remote.is_none() {
            run_blocking(move || usage::disk_usage(&fs)).await?
        } else {
            DiskUsage::default()
        };
        let _guard = self.lock.lock().await;
        self.store
            .commit(key, name, labels, (usage.size, usage.inodes))?;
        Ok(())
    }

    /// Removes `key` and its directory; unmounts its image if it was the image's last
    /// remote top layer. Fails with `FailedPrecondition` while it has children.
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotterError> {
        let _guard = self.lock.lock().await;
        let record = self.store.remove(key)?;
        match &record.remote {
            Some(remote) if remote.top => {
                let still_used = self.store.list()?.iter().any(|other| {
                    other
                        .remote
                        .as_ref()
                        .is_some_and(|r| r.top && r.index_digest == remote.index_digest)
                });
                if !still_used {
                    self.unmount_image(&lazy_image(remote)).await;
                }
            }
            Some(_) => {}
            None => {
                let dir = self.snapshot_dir(record.id);
                if let Err(e) = run_blocking(move || remove_tree(&dir)).await {
                    // The record is gone; Cleanup removes the directory later.
                    tracing::warn!(key, error = %e, "removing snapshot directory");
                }
            }
        }
        tracing::debug!(key, id = record.id, "removed snapshot");
        Ok(())
    }

    /// The record of `key`.
    pub async fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotterError> {
        self.store.require(key)
    }

    /// Updates the labels of `name`, as containerd's storage does: with no field
    /// paths, or the path `labels`, all labels are replaced by `labels`; `labels.KEY`
    /// sets (or, when absent from `labels`, deletes) one label. Other fields are
    /// immutable.
    pub async fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        field_paths: &[String],
    ) -> Result<SnapshotRecord, SnapshotterError> {
        let _guard = self.lock.lock().await;
        let record = self.store.require(name)?;
        let mut updated = record.labels.clone();
        if field_paths.is_empty() {
            updated = labels.clone();
        }
        for path in field_paths {
            if path == "labels" {
                updated = labels.clone();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match labels.get(key) {
                    Some(value) if !value.is_empty() => {
                        updated.insert(key.to_string(), value.clone());
                    }
                    _ => {
                        updated.remove(key);
                    }
                }
            } else {
                return Err(SnapshotterError::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {name:?}: only labels are mutable"
                )));
            }
        }
        self.store.set_labels(name, updated)
    }

    /// Disk usage of `key`: measured now for active snapshots, at commit time for
    /// committed ones; zero for views and remote layers (their data is in the cache).
    pub async fn usage(&self, key: &str) -> Result<DiskUsage, SnapshotterError> {
        let record = self.store.require(key)?;
        match record.kind {
            SnapshotKind::Active => {
                let fs = self.fs_dir(record.id);
                run_blocking(move || usage::disk_usage(&fs)).await
            }
            SnapshotKind::Committed => Ok(DiskUsage {
                size: record.size,
                inodes: record.inodes,
            }),
            SnapshotKind::View => Ok(DiskUsage::default()),
        }
    }

    /// Every record matching any of `filters` (all records when there are none).
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotterError> {
        let filters = filters
            .iter()
            .map(|text| Filter::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|record| filter::matches_any(&filters, record))
            .collect())
    }

    /// Removes snapshot directories no record refers to, and lazy mounts no remote
    /// top layer refers to.
    pub async fn cleanup(&self) -> Result<(), SnapshotterError> {
        let _guard = self.lock.lock().await;
        let records = self.store.list()?;
        let ids: HashSet<String> = records.iter().map(|r| r.id.to_string()).collect();
        let images: HashSet<String> = records
            .iter()
            .filter_map(|r| r.remote.as_ref().filter(|remote| remote.top))
            .map(|remote| mount_dir_name(&remote.index_digest))
            .collect();

        for name in dir_names(&self.root.join("snapshots"))? {
            if !ids.contains(&name) {
                let dir = self.root.join("snapshots").join(&name);
                tracing::info!(dir = %dir.display(), "cleanup: removing unreferenced snapshot directory");
                run_blocking(move || remove_tree(&dir)).await?;
            }
        }
        for name in dir_names(&self.root.join("mounts"))? {
            if !images.contains(&name) {
                let mountpoint = self.root.join("mounts").join(&name);
                tracing::info!(mountpoint = %mountpoint.display(), "cleanup: removing unreferenced lazy mount");
                release_mountpoint(&mountpoint)?;
            }
        }
        Ok(())
    }

    /// The images currently mounted lazily, with how many snapshots use each.
    pub async fn mounted_images(&self) -> Result<Vec<MountedImage>, SnapshotterError> {
        let records = self.store.list()?;
        let mut images: Vec<MountedImage> = Vec::new();
        for record in &records {
            let Some(remote) = record.remote.as_ref().filter(|r| r.top) else {
                continue;
            };
            if images
                .iter()
                .any(|m| m.image.index_digest == remote.index_digest)
            {
                continue;
            }
            let mountpoint = self.mountpoint(&remote.index_digest);
            if !mounts::is_mountpoint(&mountpoint) {
                continue;
            }
            let tops: Vec<&SnapshotRecord> = records
                .iter()
                .filter(|r| {
                    r.remote
                        .as_ref()
                        .is_some_and(|x| x.top && x.index_digest == remote.index_digest)
                })
                .collect();
            let users = tops.len()
                + records
                    .iter()
                    .filter(|r| tops.iter().any(|top| top.name == r.parent))
                    .count();
            images.push(MountedImage {
                image: lazy_image(remote),
                mountpoint,
                users: u32::try_from(users).unwrap_or(u32::MAX),
            });
        }
        Ok(images)
    }

    /// The Stoker artifact of the layer's image, or `None` to unpack normally.
    async fn artifact_for(&self, layer: &LayerLabels) -> Option<StokerArtifact> {
        let lookup = self.resolver_cache.resolve(
            self.resolver.as_ref(),
            &layer.image_ref,
            &layer.manifest_digest,
        );
        let answer = match tokio::time::timeout(self.resolve_timeout, lookup).await {
            Ok(answer) => answer,
            Err(_) => Err(SnapshotterError::Remote {
                image: layer.image_ref.clone(),
                message: format!(
                    "artifact lookup took longer than {:?}",
                    self.resolve_timeout
                ),
            }),
        };
        match answer {
            Ok(Some(artifact)) if artifact.layer_digests.contains(&layer.layer_digest) => {
                Some(artifact)
            }
            Ok(Some(artifact)) => {
                tracing::warn!(
                    image = %layer.image_ref,
                    layer = %layer.layer_digest,
                    index = %artifact.index_digest,
                    "the Stoker artifact does not list this layer; unpacking normally"
                );
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(image = %layer.image_ref, error = %e, "looking up the Stoker artifact failed; unpacking normally");
                None
            }
        }
    }

    /// Records the layer as a committed remote snapshot named by its chain ID (unless
    /// it exists already) and, for the top layer, mounts the image.
    async fn record_remote_layer(
        &self,
        parent: &str,
        mut labels: BTreeMap<String, String>,
        layer: &LayerLabels,
        artifact: &StokerArtifact,
    ) -> Result<(), SnapshotterError> {
        let _guard = self.lock.lock().await;
        if self.store.get(&layer.target)?.is_some() {
            return Ok(());
        }
        let top = artifact.layer_digests.last() == Some(&layer.layer_digest);
        let remote = RemoteLayer {
            image_ref: layer.image_ref.clone(),
            manifest_digest: layer.manifest_digest.clone(),
            layer_digest: layer.layer_digest.clone(),
            index_digest: artifact.index_digest.clone(),
            top,
        };
        if top {
            self.ensure_mounted(&lazy_image(&remote)).await?;
        }
        labels.insert(STOKER_INDEX_LABEL.into(), artifact.index_digest.clone());
        let record = self.store.create(NewSnapshot {
            name: layer.target.clone(),
            parent: parent.to_string(),
            kind: SnapshotKind::Committed,
            labels,
            remote: Some(remote),
        })?;
        tracing::info!(
            image = %layer.image_ref,
            layer = %layer.layer_digest,
            chain_id = %record.name,
            top,
            "recorded remote layer; containerd skips unpacking it"
        );
        Ok(())
    }

    /// Creates an ordinary active snapshot or view with its directories.
    async fn create(
        &self,
        kind: SnapshotKind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        let _guard = self.lock.lock().await;
        let record = self.store.create(NewSnapshot {
            name: key.to_string(),
            parent: parent.to_string(),
            kind,
            labels,
            remote: None,
        })?;
        match self.make_dirs_and_mounts(&record).await {
            Ok((mounts, lazy)) => {
                if kind == SnapshotKind::Active
                    && let Some(image) = lazy
                {
                    // containerd names it `<namespace>/<n>/<container ID>`.
                    let container_id = key.rsplit_once('/').map_or(key, |(_, id)| id);
                    self.mounter.container_prepared(&image, container_id);
                }
                Ok(mounts)
            }
            Err(error) => {
                // Undo: a failed Prepare must leave nothing behind.
                if let Err(e) = self.store.remove(key) {
                    tracing::warn!(key, error = %e, "rolling back a failed prepare");
                }
                let _ = remove_tree(&self.snapshot_dir(record.id));
                Err(error)
            }
        }
    }

    /// Creates the snapshot's directories and returns its mounts and the lazy image
    /// below it, if any.
    async fn make_dirs_and_mounts(
        &self,
        record: &SnapshotRecord,
    ) -> Result<(Vec<Mount>, Option<LazyImage>), SnapshotterError> {
        let fs = self.fs_dir(record.id);
        create_dir(&fs)?;
        if record.kind == SnapshotKind::Active {
            create_dir(&self.work_dir(record.id))?;
        }
        let (lowers, lazy) = self.lower_dirs(record)?;
        let mounts = self.mounts_over(record, &lowers, lazy.as_ref()).await?;
        // Like containerd: the new upper directory takes the owner of the layer below.
        if let Some(lower) = lowers.first() {
            chown_like(&fs, lower)?;
        }
        Ok((mounts, lazy))
    }

    /// The mounts of an active snapshot or view, mounting its lazy image if needed.
    async fn mounts_of(&self, record: &SnapshotRecord) -> Result<Vec<Mount>, SnapshotterError> {
        let (lowers, lazy) = self.lower_dirs(record)?;
        self.mounts_over(record, &lowers, lazy.as_ref()).await
    }

    /// The mounts of `record` over `lowers`, after mounting `lazy` if it is not.
    async fn mounts_over(
        &self,
        record: &SnapshotRecord,
        lowers: &[PathBuf],
        lazy: Option<&LazyImage>,
    ) -> Result<Vec<Mount>, SnapshotterError> {
        if let Some(image) = lazy {
            self.ensure_mounted(image).await?;
        }
        Ok(mounts::rootfs_mounts(
            record.kind,
            &self.fs_dir(record.id),
            &self.work_dir(record.id),
            lowers,
            self.index_off,
        ))
    }

    /// The lower directories of `record`, nearest first, and the lazy image among them.
    /// A remote top layer stands for its whole image, so the walk stops there.
    fn lower_dirs(
        &self,
        record: &SnapshotRecord,
    ) -> Result<(Vec<PathBuf>, Option<LazyImage>), SnapshotterError> {
        let mut lowers = Vec::new();
        for ancestor in self.store.ancestors(record)? {
            match &ancestor.remote {
                None => lowers.push(self.fs_dir(ancestor.id)),
                Some(remote) if remote.top => {
                    lowers.push(self.mountpoint(&remote.index_digest));
                    return Ok((lowers, Some(lazy_image(remote))));
                }
                Some(remote) => {
                    return Err(SnapshotterError::FailedPrecondition(format!(
                        "snapshot {:?} is layer {} of the lazily loaded image {} and has no \
                         content of its own; only the image's top layer can be built on",
                        ancestor.name, remote.layer_digest, remote.image_ref
                    )));
                }
            }
        }
        Ok((lowers, None))
    }

    /// Mounts `image` at its mountpoint unless a live mount is already there. A mount
    /// kept across an agent restart is resumed; a dead one (e.g. a FUSE mount whose
    /// process died) is detached first.
    async fn ensure_mounted(&self, image: &LazyImage) -> Result<(), SnapshotterError> {
        let mountpoint = self.mountpoint(&image.index_digest);
        if mounts::is_mountpoint(&mountpoint) {
            if self.mounter.can_resume(&mountpoint) {
                match self.mounter.mount(image, &mountpoint).await {
                    Ok(()) => {
                        tracing::info!(image = %image.image_ref, index = %image.index_digest, mountpoint = %mountpoint.display(), "resumed lazy image kept across the restart");
                        return Ok(());
                    }
                    // Not probed: the connection may still be held open, unanswered.
                    Err(e) => {
                        tracing::error!(image = %image.image_ref, error = %e, "cannot resume a lazy mount kept across the restart; mounting it afresh")
                    }
                }
            } else if mounts::answers_statfs(&mountpoint) {
                return Ok(());
            }
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a dead lazy mount");
            mounts::detach_mount(&mountpoint)?;
        }
        create_dir(&mountpoint)?;
        self.mounter.mount(image, &mountpoint).await?;
        tracing::info!(image = %image.image_ref, index = %image.index_digest, mountpoint = %mountpoint.display(), "mounted lazy image");
        Ok(())
    }

    async fn unmount_image(&self, image: &LazyImage) {
        let mountpoint = self.mountpoint(&image.index_digest);
        if let Err(e) = self.mounter.unmount(image, &mountpoint).await {
            tracing::warn!(image = %image.image_ref, error = %e, "unmounting lazy image");
        }
        match release_mountpoint(&mountpoint) {
            Ok(()) => {
                tracing::info!(image = %image.image_ref, mountpoint = %mountpoint.display(), "unmounted lazy image")
            }
            Err(e) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "releasing lazy mountpoint")
            }
        }
    }

    /// Re-creates the lazy mounts of every image with a remote top layer on record.
    async fn restore_lazy_mounts(&self) {
        let records = match self.store.list() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "listing snapshots to restore lazy mounts");
                return;
            }
        };
        let mut done = HashSet::new();
        for remote in records.iter().filter_map(|r| r.remote.as_ref()) {
            if !remote.top || !done.insert(remote.index_digest.clone()) {
                continue;
            }
            if let Err(e) = self.ensure_mounted(&lazy_image(remote)).await {
                // Prepare/Mounts retry when a container needs the image.
                tracing::error!(image = %remote.image_ref, error = %e, "restoring lazy mount");
            }
        }
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Where the lazy filesystem of the index `index_digest` is mounted.
    pub fn mountpoint(&self, index_digest: &str) -> PathBuf {
        self.root.join("mounts").join(mount_dir_name(index_digest))
    }
}

fn lazy_image(remote: &RemoteLayer) -> LazyImage {
    LazyImage {
        image_ref: remote.image_ref.clone(),
        manifest_digest: remote.manifest_digest.clone(),
        index_digest: remote.index_digest.clone(),
    }
}

/// `sha256:abc…` → `sha256-abc…`; anything unusual is replaced so the name is one
/// plain path component.
fn mount_dir_name(index_digest: &str) -> String {
    index_digest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Unmounts whatever is still mounted at `mountpoint` (lazily) and removes the
/// directory.
fn release_mountpoint(mountpoint: &Path) -> Result<(), SnapshotterError> {
    if mounts::is_mountpoint(mountpoint) {
        mounts::detach_mount(mountpoint)?;
    }
    match std::fs::remove_dir(mountpoint) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotterError::io(
            format!("removing {}", mountpoint.display()),
            e,
        )),
    }
}

fn create_dir(dir: &Path) -> Result<(), SnapshotterError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SnapshotterError::io(format!("creating {}", dir.display()), e))
}

fn remove_tree(dir: &Path) -> Result<(), SnapshotterError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotterError::io(
            format!("removing {}", dir.display()),
            e,
        )),
    }
}

fn chown_like(dir: &Path, reference: &Path) -> Result<(), SnapshotterError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(reference)
        .map_err(|e| SnapshotterError::io(format!("stat {}", reference.display()), e))?;
    std::os::unix::fs::lchown(dir, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| SnapshotterError::io(format!("chown {}", dir.display()), e))
}

fn dir_names(dir: &Path) -> Result<Vec<String>, SnapshotterError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| SnapshotterError::io(format!("reading {}", dir.display()), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| SnapshotterError::io(format!("reading {}", dir.display()), e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Runs filesystem work off the async threads.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SnapshotterError> + Send + 'static,
) -> Result<T, SnapshotterError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        SnapshotterError::io(
            "waiting for a filesystem task",
            std::io::Error::other(e.to_string()),
        )
    })?
}
