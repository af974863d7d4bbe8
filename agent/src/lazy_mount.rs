//! [`RegistryLazyMounter`]: the [`LazyMounter`] that serves an image's Stoker index
//! as a FUSE filesystem, fetching chunks from the image's registry on demand.
//!
//! For each image it mounts:
//! 1. the index (named by the digest the resolver found) is taken from the node's
//!    [`KnownImages`] when a prefetch plan (or an earlier mount) loaded and
//!    verified it already; otherwise the index blob is read from the node's index
//!    directory, or else from the image's repository, and verified against that
//!    digest before it is decoded; a fetched index is kept in the index directory
//!    (written to a temporary file, then renamed), so that an agent restart
//!    re-mounts its images without asking the registry;
//! 2. a [`Fetcher`] reads the image's chunk blobs from the same repository with
//!    ranged GETs into the node's one [`ChunkCache`], shared by every image;
//! 3. [`stoker_lazyfs::mount`] serves the index at the mountpoint.
//!
//! With an [fd keeper](crate::fd_keeper) (the agent runs under its
//! [supervisor](crate::supervisor)), every mount's `/dev/fuse` descriptor is handed
//! to the keeper, and a mount the keeper held across a restart of the agent is
//! resumed ([`stoker_lazyfs::resume`]) instead of mounted again, so the containers
//! using it never see an error. With an open-state directory
//! ([`RegistryLazyMounter::with_open_state_dir`], on a tmpfs), each mount keeps
//! there how its open files were opened (`<dir>/<mountpoint's name>`, see
//! [`stoker_lazyfs::MountOptions::open_state`]), so that a resumed mount opens
//! files still open in their mode and keeps using passthrough.
//!
//! The mounted images are kept by mountpoint; [`RegistryLazyMounter::mounted`] gives
//! their index, fetcher and mount handle to the trace recorder and the prefetch
//! executor, so that they trace the same mount and warm the same fetcher.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::BoxFuture;
use stoker_cache::ChunkCache;
use stoker_convert::ImageStore;
use stoker_fetch::{FetchConfig, Fetcher, RegistrySource};
use stoker_format::{Digest, Index};
use stoker_lazyfs::{MountHandle, MountOptions};
use stoker_registry::RegistryClient;
use stoker_snapshotter::{LazyImage, LazyMounter, SnapshotterError};

use crate::assembly::Assembly;
use crate::fd_keeper::KeeperClient;
use crate::resolver::KnownImages;

/// One image mounted by a [`RegistryLazyMounter`]. Cheap to clone.
#[derive(Clone)]
pub struct MountedLazyImage {
    pub image: LazyImage,
    /// The image's decoded, verified index.
    pub index: Arc<Index>,
    /// The fetcher the mount reads through: prefetching with it warms the same
    /// cache and joins the same in-flight fetches.
    pub fetcher: Fetcher,
    /// The mount, for access traces ([`MountHandle::start_access_trace`]) and
    /// counters.
    pub handle: Arc<MountHandle>,
}

impl std::fmt::Debug for MountedLazyImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedLazyImage")
            .field("image", &self.image)
            .field("mountpoint", &self.handle.mountpoint())
            .finish_non_exhaustive()
    }
}

/// Mounts images' lazy filesystems from their registries over one node-wide chunk
/// cache.
pub struct RegistryLazyMounter {
    client: RegistryClient,
    cache: ChunkCache,
    fetch_config: FetchConfig,
    mount_options: MountOptions,
    /// Verified index blobs by digest (`<dir>/<hex>`); `None`: always fetched.
    index_dir: Option<PathBuf>,
    /// Verified indexes in memory, shared with the prefetch executor.
    known: Arc<KnownImages>,
    mounted: Mutex<HashMap<PathBuf, MountedLazyImage>>,
    /// Where mounts' FUSE descriptors are kept across agent restarts.
    keeper: Option<Arc<KeeperClient>>,
    /// Mounts still alive from before a restart, not resumed yet, by mountpoint.
    resumable: Mutex<HashMap<PathBuf, OwnedFd>>,
    /// Where each mount keeps its open-state file; `None`: nowhere, and a
    /// resumed mount does not use passthrough.
    open_state_dir: Option<PathBuf>,
    /// Per-file backing files for passthrough; `None`: only single-chunk files
    /// pass through.
    assembly: Option<Assembly>,
}

impl RegistryLazyMounter {
    /// A mounter reading registries through `client` into `cache`.
    pub fn new(
        client: RegistryClient,
        cache: ChunkCache,
        fetch_config: FetchConfig,
        mount_options: MountOptions,
    ) -> RegistryLazyMounter {
        RegistryLazyMounter {
            client,
            cache,
            fetch_config,
            mount_options,
            index_dir: None,
            known: Arc::new(KnownImages::default()),
            mounted: Mutex::new(HashMap::new()),
            keeper: None,
            resumable: Mutex::new(HashMap::new()),
            open_state_dir: None,
            assembly: None,
        }
    }

    /// Starts reading into the page cache, on a thread of its own, the local
    /// files a start of the image `index_digest` will read the chunks of `plan`
    /// from (in plan order; see [`stoker_lazyfs::warm_page_cache`]), so that
    /// the start's reads find them in memory.
    pub fn warm_page_cache(&self, index: Arc<Index>, index_digest: Digest, plan: Arc<[u32]>) {
        let cache = self.cache.clone();
        let assembly = self.assembly.as_ref().map(|a| a.options_for(&index_digest));
        let spawned = std::thread::Builder::new()
            .name("stoker-warm-pages".into())
            .spawn(move || {
                let bytes =
                    stoker_lazyfs::warm_page_cache(&index, &cache, assembly.as_ref(), &plan);
                tracing::debug!(index = %index_digest, bytes, "plan's files asked into the page cache");
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start reading the plan's files into the page cache");
        }
    }

    /// Lets mounts pass multi-chunk files through from backing files assembled
    /// in `assembly` (see [`crate::assembly`]).
    pub fn with_assembly(mut self, assembly: Option<Assembly>) -> RegistryLazyMounter {
        self.assembly = assembly;
        self
    }

    /// Keeps each mount's open-state file in `dir` (a tmpfs: the agent's runtime
    /// directory), so that a mount resumed after a restart keeps using passthrough.
    pub fn with_open_state_dir(mut self, dir: PathBuf) -> RegistryLazyMounter {
        self.open_state_dir = Some(dir);
        self
    }

    /// The open-state file of the mount at `mountpoint`. Mountpoints are one
    /// directory per image index, so their names are unique.
    fn open_state_file(&self, mountpoint: &Path) -> Option<PathBuf> {
        let name = mountpoint.file_name()?;
        Some(self.open_state_dir.as_ref()?.join(name))
    }

    /// Hands every mount's FUSE descriptor to `keeper`, and resumes the mounts in
    /// `kept` (mountpoint and descriptor, from before a restart) when the
    /// snapshotter mounts their images again.
    pub fn with_fd_keeper(
        mut self,
        keeper: Arc<KeeperClient>,
        kept: Vec<(PathBuf, OwnedFd)>,
    ) -> RegistryLazyMounter {
        self.keeper = Some(keeper);
        self.resumable = Mutex::new(kept.into_iter().collect());
        self
    }

    /// Lets go of the kept mounts that were not resumed (their images are no longer
    /// on record): the keeper closes them, so the kernel ends their connections,
    /// and the snapshotter detaches them when it finds them dead.
    pub fn release_unresumed(&self) {
        let unresumed: Vec<PathBuf> = lock(&self.resumable)
            .drain()
            .map(|(path, _)| path)
            .collect();
        for mountpoint in unresumed {
            tracing::warn!(mountpoint = %mountpoint.display(), "a mount kept across the restart has no image on record; releasing it");
            self.forget_kept(&mountpoint);
            if let Some(path) = self.open_state_file(&mountpoint) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn keep(&self, mountpoint: &Path, handle: &MountHandle) {
        if let Some(keeper) = &self.keeper
            && let Err(e) = keeper.keep(mountpoint, handle.fuse_device())
        {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot hand the mount to the fd keeper; it will not survive an agent restart");
        }
    }

    fn forget_kept(&self, mountpoint: &Path) {
        if let Some(keeper) = &self.keeper
            && let Err(e) = keeper.forget(mountpoint)
        {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "telling the fd keeper a mount is gone");
        }
    }

    /// Takes indexes from `known` when they are there (a prefetch plan loaded
    /// them), and keeps the ones it loads there.
    pub fn with_known_images(mut self, known: Arc<KnownImages>) -> RegistryLazyMounter {
        self.known = known;
        self
    }

    /// Keeps verified index blobs in `dir` and reads them from there first.
    pub fn with_index_dir(mut self, dir: PathBuf) -> RegistryLazyMounter {
        self.index_dir = Some(dir);
        self
    }

    /// The index `digest`, verified and decoded, and where it came from: from
    /// memory when it was loaded (and verified) already, else from the index
    /// directory when it holds a good copy, else from the registry (then kept
    /// on disk). Kept in memory either way.
    async fn index(
        &self,
        image_ref: &str,
        digest: &Digest,
    ) -> Result<(Arc<Index>, &'static str), String> {
        if let Some(index) = self.known.index(digest) {
            return Ok((index, "memory"));
        }
        let (store, _) =
            ImageStore::registry(self.client.clone(), image_ref).map_err(|e| e.to_string())?;
        let (index, from) = self.load_index(&store, digest).await?;
        let index = Arc::new(index);
        self.known.remember_index(*digest, Arc::clone(&index));
        Ok((index, from))
    }

    /// The index blob `digest`, verified and decoded: from the index directory
    /// when it holds a good copy, else from the registry (then kept).
    async fn load_index(
        &self,
        store: &ImageStore,
        digest: &Digest,
    ) -> Result<(Index, &'static str), String> {
        let kept = self.index_dir.as_ref().map(|dir| dir.join(digest.hex()));
        if let Some(path) = &kept {
            match std::fs::read(path) {
                Ok(bytes) => match Index::decode_verified(&bytes, digest) {
                    Ok(index) => return Ok((index, "disk")),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "kept index fails its check; fetching it again");
                        let _ = std::fs::remove_file(path);
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "reading kept index; fetching it again")
                }
            }
        }
        let bytes = store
            .blob(digest)
            .await
            .map_err(|e| format!("reading index {digest}: {e}"))?;
        let index =
            Index::decode_verified(&bytes, digest).map_err(|e| format!("index {digest}: {e}"))?;
        if let Some(path) = &kept
            && let Err(e) = keep_file(path, &bytes)
        {
            tracing::warn!(path = %path.display(), error = %e, "keeping the index on disk");
        }
        Ok((index, "registry"))
    }

    /// The node's chunk cache.
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The mounted image whose index digest is `index_digest`, if any.
    pub fn mounted(&self, index_digest: &str) -> Option<MountedLazyImage> {
        self.lock()
            .values()
            .find(|m| m.image.index_digest == index_digest)
            .cloned()
    }

    /// Every mounted image.
    pub fn all_mounted(&self) -> Vec<MountedLazyImage> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, MountedLazyImage>> {
        lock(&self.mounted)
    }

    async fn mount_image(
        &self,
        image: &LazyImage,
        mountpoint: &Path,
    ) -> Result<MountedLazyImage, SnapshotterError> {
        let failed = |message: String| SnapshotterError::Remote {
            image: image.image_ref.clone(),
            message,
        };
        let index_digest = Digest::parse(&image.index_digest)
            .map_err(|e| failed(format!("index digest {:?}: {e}", image.index_digest)))?;
        let started = Instant::now();
        let (index, index_from) = self
            .index(&image.image_ref, &index_digest)
            .await
            .map_err(failed)?;
        let index_ready = started.elapsed();
        let repository = stoker_registry::parse_reference(&image.image_ref)
            .map_err(|e| failed(e.to_string()))?;
        let fetcher = Fetcher::new(
            Arc::new(RegistrySource::new(self.client.clone(), repository)),
            self.cache.clone(),
            self.fetch_config.clone(),
        );

        // mount(2) and starting the session threads block; the lazy filesystem uses
        // this runtime (found from the blocking thread) for its fetches.
        let kept = lock(&self.resumable).remove(mountpoint);
        let resuming = kept.is_some();
        let (mount_index, mount_fetcher) = (Arc::clone(&index), fetcher.clone());
        let options = MountOptions {
            open_state: self.open_state_file(mountpoint),
            assembly: self.assembly.as_ref().map(|a| a.options_for(&index_digest)),
            ..self.mount_options.clone()
        };
        let target = mountpoint.to_path_buf();
        let handle = tokio::task::spawn_blocking(move || match kept {
            Some(fuse_device) => {
                stoker_lazyfs::resume(mount_index, mount_fetcher, &target, fuse_device, options)
            }
            None => stoker_lazyfs::mount(mount_index, mount_fetcher, &target, options),
        })
        .await
        .map_err(|e| failed(format!("mount task failed: {e}")))?;
        let handle = match handle {
            Ok(handle) => handle,
            Err(e) if resuming => {
                // Nobody can serve the old connection now: let it end, so that the
                // snapshotter finds the mount dead, detaches it and mounts afresh.
                self.forget_kept(mountpoint);
                return Err(failed(format!(
                    "resuming the mount kept across the restart: {}",
                    error_chain(&e)
                )));
            }
            Err(e) => return Err(failed(error_chain(&e))),
        };
        if !resuming {
            self.keep(mountpoint, &handle);
        }
        tracing::info!(
            image = %image.image_ref,
            index = %image.index_digest,
            inodes = index.inode_count(),
            mountpoint = %mountpoint.display(),
            resumed = resuming,
            index_from,
            index_ms = index_ready.as_secs_f64() * 1e3,
            mount_ms = (started.elapsed() - index_ready).as_secs_f64() * 1e3,
            "lazy filesystem mounted"
        );
        Ok(MountedLazyImage {
            image: image.clone(),
            index,
            fetcher,
            handle: Arc::new(handle),
        })
    }
}

impl LazyMounter for RegistryLazyMounter {
    fn can_resume(&self, mountpoint: &Path) -> bool {
        lock(&self.resumable).contains_key(mountpoint)
    }

    fn mount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        Box::pin(async move {
            let mounted = self.mount_image(image, mountpoint).await?;
            let replaced = self.lock().insert(mountpoint.to_path_buf(), mounted);
            if let Some(old) = replaced {
                // The snapshotter detached a dead mount here before asking again.
                tracing::warn!(mountpoint = %mountpoint.display(), image = %old.image.image_ref, "replacing a lazy mount record");
            }
            Ok(())
        })
    }

    fn unmount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        Box::pin(async move {
            let Some(mounted) = self.lock().remove(mountpoint) else {
                return Ok(());
            };
            self.forget_kept(mountpoint);
            let target = mountpoint.to_path_buf();
            let assembled = self
                .assembly
                .clone()
                .zip(Digest::parse(&image.index_digest).ok());
            tokio::task::spawn_blocking(move || {
                let unmounted = match Arc::try_unwrap(mounted.handle) {
                    Ok(handle) => handle.unmount(),
                    // Someone (a trace under way) still holds the handle: unmount by
                    // path now; the session ends when the last holder drops it.
                    Err(_shared) => stoker_lazyfs::unmount(&target),
                };
                // Open files keep their backing files; the directory goes now.
                if let Some((assembly, digest)) = assembled {
                    assembly.remove(&digest);
                }
                unmounted
            })
            .await
            .map_err(|e| SnapshotterError::Remote {
                image: image.image_ref.clone(),
                message: format!("unmount task failed: {e}"),
            })?
            .map_err(|e| SnapshotterError::Remote {
                image: image.image_ref.clone(),
                message: error_chain(&e),
            })
        })
    }
}

/// Locks `mutex`. Each critical section here is one map operation, so a poisoned
/// map is whole and usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Writes `bytes` to `path` through a temporary file in the same directory, then
/// renames it, so that `path` is either absent or complete.
fn keep_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.partial", std::process::id()));
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}
