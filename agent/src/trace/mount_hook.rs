//! [`TracingMounter`]: opens a startup window each time the snapshotter mounts an
//! image for a new container start.
//!
//! It wraps the [`RegistryLazyMounter`] the snapshotter uses: after the inner
//! mount, it starts a recording ([`Traces::record`]) and the mount's access trace
//! (`MountHandle::start_access_trace`). When the snapshotter prepares a container's
//! snapshot on the image, the open window is given to that container
//! ([`Traces::claim_for_container`]), so that `ContainerReady` closes it; a later
//! container on the same (shared) mount gets a window of its own. Mounts made while the agent restores its
//! state (before [`TracingMounter::start_recording`]) are not traced: they serve
//! containers that started long ago. The recording ends when its window closes,
//! on `ContainerReady` for the container that claimed it, or when the image is
//! unmounted (the mount's sender goes away). Images the controller has learned
//! enough starts of ([`Traces::stop_learning`]) are not traced; instead, the
//! files their plan reads are read into the page cache ahead of the start
//! ([`RegistryLazyMounter::warm_page_cache`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use stoker_format::Digest;
use stoker_snapshotter::{LazyImage, LazyMounter, SnapshotterError};
use tracing::{debug, warn};

use super::{TraceSubject, Traces};
use crate::AgentError;
use crate::lazy_mount::RegistryLazyMounter;

pub struct TracingMounter {
    inner: Arc<RegistryLazyMounter>,
    traces: Arc<Traces>,
    recording: AtomicBool,
}

impl TracingMounter {
    /// Wraps `inner`; records nothing until [`start_recording`](Self::start_recording).
    pub fn new(inner: Arc<RegistryLazyMounter>, traces: Arc<Traces>) -> TracingMounter {
        TracingMounter {
            inner,
            traces,
            recording: AtomicBool::new(false),
        }
    }

    /// From now on every new mount opens a startup window.
    pub fn start_recording(&self) {
        self.recording.store(true, Ordering::Release);
    }

    /// Opens a startup window on the mounted image `image`, if it is mounted, for
    /// `container_id` (empty: not known yet).
    fn record(&self, image: &LazyImage, container_id: &str) -> Result<(), AgentError> {
        let Some(mounted) = self.inner.mounted(&image.index_digest) else {
            return Ok(());
        };
        let index_digest = Digest::parse(&image.index_digest).map_err(|e| AgentError::Remote {
            image: image.image_ref.clone(),
            message: format!("index digest: {e}"),
        })?;
        if let Some(plan) = self.traces.learned_plan(&index_digest) {
            // Untraced, every file whose bytes are local can pass through; what
            // the start will read goes into the page cache ahead of it.
            debug!(image = %image.image_ref, "no startup trace: the controller has learned this image");
            self.inner
                .warm_page_cache(Arc::clone(&mounted.index), index_digest, plan);
            return Ok(());
        }
        let started = self.traces.record(TraceSubject {
            image_ref: image.image_ref.clone(),
            index_digest,
            index: mounted.index,
            container_id: container_id.to_string(),
        })?;
        mounted.handle.start_access_trace(started.events);
        Ok(())
    }
}

impl LazyMounter for TracingMounter {
    fn can_resume(&self, mountpoint: &Path) -> bool {
        self.inner.can_resume(mountpoint)
    }

    fn mount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        Box::pin(async move {
            self.inner.mount(image, mountpoint).await?;
            if self.recording.load(Ordering::Acquire) {
                // A trace is an optimisation: failing to record never fails the mount.
                if let Err(e) = self.record(image, "") {
                    warn!(image = %image.image_ref, error = %e, "cannot record a startup trace");
                }
            }
            Ok(())
        })
    }

    fn unmount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        self.inner.unmount(image, mountpoint)
    }

    fn container_prepared(&self, image: &LazyImage, container_key: &str) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let Ok(digest) = Digest::parse(&image.index_digest) else {
            return;
        };
        if self.traces.claim_for_container(&digest, container_key)
            // Another container's window is still open: the mount's one access trace
            // feeds it, and this container's first reads are in it.
            || self.traces.is_recording(&digest)
        {
            return;
        }
        // A later container on a shared mount: a window of its own.
        if let Err(e) = self.record(image, container_key) {
            warn!(image = %image.image_ref, container = container_key, error = %e, "cannot record a startup trace");
        }
    }
}
