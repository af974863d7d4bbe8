//! FUSE passthrough: opening a file with a local backing file so the kernel reads
//! it directly, without a round trip to this process per read.
//!
//! ## What is passed through
//!
//! Only files whose bytes are all local and verified:
//!
//! - a file that is exactly one chunk (one piece at offset 0 covering the whole
//!   size) uses the chunk's cache file itself: no extra disk, no copy;
//! - any other regular file (several chunks, or holes) uses a per-file backing
//!   file assembled from its cached chunks ([`crate::assembly`]), if
//!   [`AssemblyOptions`](crate::AssemblyOptions) are given.
//!
//! While an access trace is being recorded, only files that are exactly one
//! chunk are passed through: any read of such a file touches that one chunk, so
//! the open reports it to the trace and the trace stays
//! exact at chunk granularity. Other files are read through the filesystem then,
//! so that each chunk they touch is seen (a file already open through
//! passthrough when the trace starts stays so until it is closed). Empty files
//! are never passed through.
//!
//! ## Kernel rules this follows
//!
//! The kernel (6.9+) puts an inode either in "cached I/O" or in "passthrough"
//! mode while it is open: a passthrough open is refused while a normal open of the
//! same inode exists, a normal open is refused while a passthrough one exists, and
//! every passthrough open of an inode must use the same backing file. Either kind
//! of refusal would surface as EIO in the application, so [`Passthrough`] tracks
//! open modes per inode and only ever mixes nothing. The mount asks for a maximum
//! stacking depth of 1, so the mount can still be a lower layer of overlayfs;
//! backing files must then live on a non-stacked file system (the cache directory
//! on ext4/xfs, not on overlayfs). If the kernel refuses a backing file for any
//! reason, passthrough is switched off for the mount and opens fall back to
//! normal reads.
//!
//! Backing ids are kept as the kernel's raw numbers and closed here when an
//! inode's last open is released, never when the process exits: a process that
//! dies leaves them registered on the connection, and a process resuming the
//! mount ([`crate::resume`]) takes over the opens and backing ids recorded in the
//! mount's open-state file ([`crate::open_state`]), so that it answers each inode
//! still open in the mode the kernel holds it in.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use fuser::BackingId;
use stoker_cache::{CachedChunk, ChunkCache};
use stoker_format::{FileKind, Index, InodeId};
use tracing::warn;

use crate::assembly::{AssembledFile, Assembler, whole_chunk};
use crate::metrics::Metrics;
use crate::open_state::{OpenRecord, OpenStateFile};
use crate::trace::{AccessTrace, Offered};

/// How an open was answered.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpenMode {
    Cached,
    /// With this backing id, registered on the mount's connection and kept
    /// registered by [`Passthrough`] while the inode has opens.
    Passthrough(u32),
}

/// Open modes per inode (see the module docs for the kernel's rules).
enum InodeIo {
    Cached {
        opens: u32,
    },
    Passthrough {
        opens: u32,
        /// The kernel's backing id, closed when the last open is released.
        backing: u32,
        /// Keeps the backing file pinned (chunk) or in use (assembled file).
        /// `None` when an earlier process of a resumed mount registered it: the
        /// kernel holds that file open itself.
        _source: Option<BackingSource>,
    },
}

impl InodeIo {
    fn opens(&mut self) -> &mut u32 {
        match self {
            InodeIo::Cached { opens } | InodeIo::Passthrough { opens, .. } => opens,
        }
    }

    fn mode(&self) -> OpenMode {
        match self {
            InodeIo::Cached { .. } => OpenMode::Cached,
            InodeIo::Passthrough { backing, .. } => OpenMode::Passthrough(*backing),
        }
    }

    fn record(&self) -> OpenRecord {
        match *self {
            InodeIo::Cached { opens } => OpenRecord {
                cached: opens,
                ..OpenRecord::default()
            },
            InodeIo::Passthrough { opens, backing, .. } => OpenRecord {
                passthrough: opens,
                backing,
                ..OpenRecord::default()
            },
        }
    }
}

enum BackingSource {
    Chunk(CachedChunk),
    Assembled(AssembledFile),
}

impl BackingSource {
    fn file(&self) -> &File {
        match self {
            BackingSource::Chunk(chunk) => chunk.file(),
            BackingSource::Assembled(file) => &file.file,
        }
    }
}

/// The open modes of the inodes with opens, and the file they are kept in.
struct Modes {
    inodes: HashMap<InodeId, InodeIo>,
    state: Option<OpenStateFile>,
}

impl Modes {
    /// Writes the opens of `id` to the open-state file, if there is one. False if
    /// that failed (see [`crate::open_state`]).
    fn save(&mut self, id: InodeId) -> bool {
        let record = self
            .inodes
            .get(&id)
            .map(InodeIo::record)
            .unwrap_or_default();
        self.state
            .as_mut()
            .is_none_or(|state| state.write(id, record))
    }
}

pub(crate) struct Passthrough {
    /// Asked for by the mount options and granted by the kernel, and no backing
    /// file refused or open-state write failed since.
    enabled: AtomicBool,
    modes: Mutex<Modes>,
    assembler: Option<Assembler>,
    /// The mount's FUSE connection, on which backing files are registered.
    device: OnceLock<OwnedFd>,
}

impl Passthrough {
    /// Open modes kept in `state` if given, starting from the `restored` opens an
    /// earlier process of the mount answered (see [`crate::open_state`]).
    pub(crate) fn new(
        assembler: Option<Assembler>,
        state: Option<OpenStateFile>,
        restored: Vec<(InodeId, OpenRecord)>,
    ) -> Self {
        let inodes = restored
            .into_iter()
            .map(|(id, record)| {
                let io = if record.passthrough > 0 {
                    InodeIo::Passthrough {
                        opens: record.passthrough,
                        backing: record.backing,
                        _source: None,
                    }
                } else {
                    InodeIo::Cached {
                        opens: record.cached,
                    }
                };
                (id, io)
            })
            .collect();
        Passthrough {
            enabled: AtomicBool::new(false),
            modes: Mutex::new(Modes { inodes, state }),
            assembler,
            device: OnceLock::new(),
        }
    }

    /// Gives the mount's `/dev/fuse` descriptor, once mounted.
    pub(crate) fn set_device(&self, device: OwnedFd) {
        let _ = self.device.set(device);
    }

    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Modes> {
        self.modes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides how to open regular file `id`, and records it before the caller
    /// replies. While `trace` is recording, see [`traced_chunk_source`].
    pub(crate) fn open(
        &self,
        index: &Index,
        cache: &ChunkCache,
        id: InodeId,
        trace: &AccessTrace,
        metrics: &Metrics,
    ) -> OpenMode {
        if let Some(mode) = self.join(&mut self.lock(), id) {
            return mode;
        }
        // Look for a backing file outside the lock: it may hash a file.
        let source = if !self.is_enabled() {
            None
        } else if trace.is_active() {
            traced_chunk_source(index, cache, id, trace, metrics)
        } else {
            self.backing_source(index, cache, id)
        };
        let mut modes = self.lock();
        if let Some(mode) = self.join(&mut modes, id) {
            return mode; // another open of this inode won the race
        }
        let io = match source.and_then(|source| Some((self.register(&source)?, source))) {
            Some((backing, source)) => InodeIo::Passthrough {
                opens: 1,
                backing,
                _source: Some(source),
            },
            None => InodeIo::Cached { opens: 1 },
        };
        let mode = io.mode();
        modes.inodes.insert(id, io);
        self.save(&mut modes, id);
        mode
    }

    /// Counts one more open of `id` if it has opens already, in their mode.
    fn join(&self, modes: &mut Modes, id: InodeId) -> Option<OpenMode> {
        let io = modes.inodes.get_mut(&id)?;
        let opens = io.opens();
        *opens = opens.saturating_add(1);
        let mode = io.mode();
        self.save(modes, id);
        Some(mode)
    }

    /// Writes the opens of `id` to the open-state file; if that fails, new files
    /// are no longer passed through (see [`crate::open_state`]).
    fn save(&self, modes: &mut Modes, id: InodeId) {
        if !modes.save(id) {
            self.enabled.store(false, Ordering::Relaxed);
        }
    }

    /// Registers `source` as a backing file on the connection. On a refusal,
    /// passthrough is switched off for the mount.
    fn register(&self, source: &BackingSource) -> Option<u32> {
        let registered = match self.device.get() {
            Some(device) => BackingId::create_raw(device, source.file()),
            None => Err(io::Error::other("the mount has no FUSE connection yet")),
        };
        match registered {
            Ok(backing) => Some(backing),
            Err(e) => {
                if self.enabled.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "the kernel refused a passthrough backing file; passthrough is off for this mount");
                }
                None
            }
        }
    }

    /// Called on release of an open of `id`, after the reply (see
    /// [`crate::open_state`] for why after).
    pub(crate) fn release(&self, id: InodeId) {
        let ended = {
            let mut modes = self.lock();
            let Some(io) = modes.inodes.get_mut(&id) else {
                return;
            };
            let opens = io.opens();
            *opens = opens.saturating_sub(1);
            let ended = if *opens == 0 {
                modes.inodes.remove(&id)
            } else {
                None
            };
            self.save(&mut modes, id);
            ended
        };
        // Closing the backing id (an ioctl) and unpinning happen outside the lock.
        if let Some(InodeIo::Passthrough { backing, .. }) = ended
            && let Some(device) = self.device.get()
            && let Err(e) = close_backing(device, backing)
        {
            warn!(backing, error = %e, "cannot close a passthrough backing id");
        }
    }

    /// The mount has ended: its open-state file goes.
    pub(crate) fn end(&self) {
        if let Some(state) = self.lock().state.as_mut() {
            state.remove();
        }
    }

    /// A verified local file holding exactly the bytes of file `id`, if there is one.
    fn backing_source(
        &self,
        index: &Index,
        cache: &ChunkCache,
        id: InodeId,
    ) -> Option<BackingSource> {
        if let Some(chunk) = whole_chunk(index, id) {
            let loc = index.chunk(chunk)?;
            return cache.get(&loc.digest).map(BackingSource::Chunk);
        }
        index
            .inode(id)
            .filter(|i| i.kind == FileKind::File && i.size > 0)?;
        let assembler = self.assembler.as_ref()?;
        assembler
            .backing_file(index, cache, id)
            .map(BackingSource::Assembled)
    }
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)` in the kernel's
/// generic ioctl encoding.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// Ends the registration of `backing` on the FUSE connection `device`. Files
/// opened with it keep their backing file until they are closed.
fn close_backing(device: &OwnedFd, backing: u32) -> io::Result<()> {
    // SAFETY: `device` is an open /dev/fuse descriptor, and the ioctl reads one
    // u32 through the pointer, which points at a live local for the call.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE as _,
            &backing as *const u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The backing source while a trace is recorded: only for a file that is exactly
/// one cached chunk, and only once the trace holds that chunk. No read of a
/// passed-through file reaches the filesystem, so the open reports the one chunk
/// any read of it would touch. `None` (the file is read through the filesystem,
/// which traces each chunk read) for any other file, or when the trace has no
/// room for the event.
fn traced_chunk_source(
    index: &Index,
    cache: &ChunkCache,
    id: InodeId,
    trace: &AccessTrace,
    metrics: &Metrics,
) -> Option<BackingSource> {
    let chunk = whole_chunk(index, id)?;
    let cached = cache.get(&index.chunk(chunk)?.digest)?;
    if trace.offer(chunk, id, 0) == Offered::Dropped {
        metrics.trace_dropped();
        return None;
    }
    Some(BackingSource::Chunk(cached))
}
