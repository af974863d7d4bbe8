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
//!   file *assembled* from its cached chunks, if [`AssemblyOptions`] are given.
//!   Cost: the file's bytes are on disk twice (chunk cache + assembled copy, the
//!   copies bounded by [`AssemblyOptions::max_bytes`], least recently used evicted
//!   first), one read and one write of the file to assemble it, and one read to
//!   verify it the first time this process uses it (as the chunk cache does).
//!   Assembly runs on a background thread, so the open that finds the chunks
//!   cached is served normally and later opens pass through. A node that warms
//!   an image ahead of its containers assembles the files it expects them to
//!   open with [`assemble_files`], so that their first open passes through too.
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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use fuser::BackingId;
use sha2::{Digest as _, Sha256};
use stoker_cache::{CachedChunk, ChunkCache};
use stoker_format::{Digest, FileKind, Index, InodeId};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::open_state::{OpenRecord, OpenStateFile};
use crate::trace::{AccessTrace, Offered};

/// Where and how much to assemble per-file backing files for passthrough.
#[derive(Clone, Debug)]
pub struct AssemblyOptions {
    /// A directory on the same (non-stacked) file system as the chunk cache,
    /// e.g. `<cache dir>/files`. Created if needed; owned by this mount (and by
    /// [`assemble_files`] for the same image before it is mounted).
    pub dir: PathBuf,
    /// Upper bound on the bytes of assembled files kept there.
    pub max_bytes: u64,
    /// Assembled files this process wrote or verified; share one between the
    /// mounts and [`assemble_files`] of a process.
    pub verified: VerifiedAssemblies,
}

/// The assembled files (by path) this process wrote or verified. A file in it
/// is used as a backing file at its first open, without being hashed again: the
/// chunk cache's rule, a check on the first use in each process, applied to
/// assembled files.
#[derive(Clone, Debug, Default)]
pub struct VerifiedAssemblies(Arc<Mutex<HashSet<PathBuf>>>);

impl VerifiedAssemblies {
    fn lock(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn contains(&self, path: &Path) -> bool {
        self.lock().contains(path)
    }

    fn insert(&self, path: PathBuf) {
        self.lock().insert(path);
    }

    fn remove(&self, path: &Path) {
        self.lock().remove(path);
    }
}

/// What [`assemble_files`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssemblyReport {
    /// Files assembled now.
    pub assembled: u64,
    /// Files already assembled and verified by this process.
    pub present: u64,
    /// Bytes of the files assembled now.
    pub bytes: u64,
    /// Files left out: a chunk not cached, over the byte bound, or an error
    /// (logged).
    pub skipped: u64,
}

/// Assembles the backing files of the regular files `ids` of `index` whose
/// chunks are all in `cache`, into `options.dir`, so that a later mount of the
/// image with the same options passes them through from their first open.
/// Files that are one whole chunk need none (their chunk file is the backing
/// file) and are skipped silently; so are empty files and directories. Stops
/// adding files once `options.max_bytes` would be exceeded. Blocking (disk I/O).
pub fn assemble_files(
    index: &Index,
    cache: &ChunkCache,
    options: &AssemblyOptions,
    ids: impl IntoIterator<Item = InodeId>,
) -> io::Result<AssemblyReport> {
    fs::create_dir_all(&options.dir)?;
    let mut report = AssemblyReport::default();
    let mut bytes = 0u64;
    let mut seen = HashSet::new();
    for id in ids {
        if !needs_assembly(index, id) {
            continue;
        }
        let Some((key, size)) = content_key(index, id) else {
            continue;
        };
        if !seen.insert(key) {
            continue;
        }
        let path = options.dir.join(key.hex());
        if options.verified.contains(&path) && path.is_file() {
            report.present += 1;
            bytes += size;
            continue;
        }
        if !all_chunks_cached(index, cache, id) || bytes + size > options.max_bytes {
            report.skipped += 1;
            continue;
        }
        match assemble_file(&options.dir, index, cache, id, &path) {
            Ok(()) => {
                options.verified.insert(path);
                report.assembled += 1;
                report.bytes += size;
                bytes += size;
            }
            Err(problem) => {
                warn!(path = %String::from_utf8_lossy(&index.path_of(id)), %problem, "cannot assemble a passthrough backing file");
                report.skipped += 1;
            }
        }
    }
    Ok(report)
}

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

/// True if regular file `id` needs an assembled backing file to pass through:
/// it is not empty and not exactly one chunk (whose chunk file serves).
pub fn needs_assembly(index: &Index, id: InodeId) -> bool {
    index
        .inode(id)
        .is_some_and(|i| i.kind == FileKind::File && i.size > 0)
        && whole_chunk(index, id).is_none()
}

/// True if every chunk of file `id` is in `cache` (no I/O).
fn all_chunks_cached(index: &Index, cache: &ChunkCache, id: InodeId) -> bool {
    index
        .file_chunks(id)
        .filter_map(|piece| index.chunk(piece.chunk))
        .all(|loc| cache.contains(&loc.digest))
}

/// The chunk of regular file `id` if the file is exactly that one chunk: a
/// non-empty file with one piece at offset 0 covering its whole size.
fn whole_chunk(index: &Index, id: InodeId) -> Option<u32> {
    let inode = index
        .inode(id)
        .filter(|i| i.kind == FileKind::File && i.size > 0)?;
    let mut pieces = index.file_chunks(id);
    let first = pieces.next()?;
    (pieces.next().is_none() && first.file_offset == 0 && u64::from(first.len) == inode.size)
        .then_some(first.chunk)
}

// ---------------------------------------------------------------------------
// Assembled per-file backing files.

/// The identity of a file's content: sha256 over its size and its (offset, chunk
/// digest) pieces. Files with the same content share one assembled file, across
/// images too.
fn content_key(index: &Index, id: InodeId) -> Option<(Digest, u64)> {
    let inode = index.inode(id)?;
    let mut hasher = Sha256::new();
    hasher.update(inode.size.to_le_bytes());
    for piece in index.file_chunks(id) {
        let loc = index.chunk(piece.chunk)?;
        hasher.update(piece.file_offset.to_le_bytes());
        hasher.update(loc.digest.0);
    }
    Some((Digest(hasher.finalize().into()), inode.size))
}

struct Entry {
    len: u64,
    last_used: u64,
    in_use: u32,
    verified: bool,
}

struct Files {
    entries: HashMap<Digest, Entry>,
    bytes: u64,
    tick: u64,
    /// Keys queued for (or being) assembled or verified.
    pending: std::collections::HashSet<Digest>,
}

struct AssemblerShared {
    dir: PathBuf,
    max_bytes: u64,
    verified: VerifiedAssemblies,
    files: Mutex<Files>,
    metrics: Arc<Metrics>,
}

/// An assembled file in use as a backing file; not evicted while it lives.
struct AssembledFile {
    file: File,
    key: Digest,
    shared: Arc<AssemblerShared>,
}

impl Drop for AssembledFile {
    fn drop(&mut self) {
        let mut files = self.shared.lock();
        if let Some(entry) = files.entries.get_mut(&self.key) {
            entry.in_use = entry.in_use.saturating_sub(1);
        }
        let victims = self.shared.evict(&mut files);
        drop(files);
        self.shared.delete(&victims);
    }
}

/// A job for the assembly thread.
struct Job {
    key: Digest,
    id: InodeId,
    /// Already on disk, only needs its first-use verification.
    verify_only: bool,
}

/// Builds and keeps assembled backing files (see the module docs).
pub(crate) struct Assembler {
    shared: Arc<AssemblerShared>,
    jobs: SyncSender<Job>,
}

/// Jobs waiting for the assembly thread; further candidates are skipped until
/// there is room (they are offered again at their next open).
const JOB_QUEUE: usize = 256;

impl Assembler {
    /// Opens (creating) the directory, forgets temporary leftovers, indexes the
    /// files already there (each is verified on first use) and starts the
    /// assembly thread, which ends when the assembler is dropped.
    pub(crate) fn start(
        options: &AssemblyOptions,
        index: Arc<Index>,
        cache: ChunkCache,
        metrics: Arc<Metrics>,
    ) -> io::Result<Assembler> {
        fs::create_dir_all(&options.dir)?;
        let mut entries = HashMap::new();
        let mut bytes = 0;
        for item in fs::read_dir(&options.dir)? {
            let item = item?;
            let path = item.path();
            let key = item
                .file_name()
                .to_str()
                .and_then(|name| Digest::parse(name).ok());
            let meta = item.metadata()?;
            match key {
                Some(key) if meta.is_file() => {
                    bytes += meta.len();
                    entries.insert(
                        key,
                        Entry {
                            len: meta.len(),
                            last_used: 0,
                            in_use: 0,
                            verified: options.verified.contains(&path),
                        },
                    );
                }
                _ if meta.is_file() => {
                    // A temporary file from an interrupted assembly.
                    let _ = fs::remove_file(&path);
                }
                _ => {
                    warn!(path = %path.display(), "ignoring unexpected entry in the assembly directory")
                }
            }
        }
        let shared = Arc::new(AssemblerShared {
            dir: options.dir.clone(),
            max_bytes: options.max_bytes,
            verified: options.verified.clone(),
            files: Mutex::new(Files {
                entries,
                bytes,
                tick: 0,
                pending: Default::default(),
            }),
            metrics,
        });
        {
            let mut files = shared.lock();
            let victims = shared.evict(&mut files);
            drop(files);
            shared.delete(&victims);
        }
        let (jobs, queue) = std::sync::mpsc::sync_channel(JOB_QUEUE);
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("stoker-assemble".into())
            .spawn(move || worker.run(queue, &index, &cache))?;
        info!(dir = %options.dir.display(), files = shared.lock().entries.len(), "passthrough assembly directory ready");
        Ok(Assembler { shared, jobs })
    }

    /// The verified assembled file for `id`, or `None` after queueing whatever
    /// would make one available for a later open.
    fn backing_file(
        &self,
        index: &Index,
        cache: &ChunkCache,
        id: InodeId,
    ) -> Option<AssembledFile> {
        let (key, size) = content_key(index, id)?;
        if size > self.shared.max_bytes {
            return None;
        }
        let shared = &self.shared;
        let mut files = shared.lock();
        files.tick += 1;
        let tick = files.tick;
        let job = match files.entries.get_mut(&key) {
            Some(entry) if entry.verified => match File::open(shared.path(&key)) {
                Ok(file) => {
                    entry.in_use += 1;
                    entry.last_used = tick;
                    return Some(AssembledFile {
                        file,
                        key,
                        shared: Arc::clone(shared),
                    });
                }
                Err(e) => {
                    // Deleted behind our back: forget it; a later open assembles it again.
                    warn!(key = %key, error = %e, "assembled file unusable; forgetting it");
                    let len = entry.len;
                    files.entries.remove(&key);
                    files.bytes = files.bytes.saturating_sub(len);
                    return None;
                }
            },
            Some(_) => Job {
                key,
                id,
                verify_only: true,
            },
            None => {
                let path = shared.path(&key);
                if shared.verified.contains(&path)
                    && let Ok(file) = File::open(&path)
                {
                    // Assembled by `assemble_files` after this mount started.
                    files.bytes += size;
                    files.entries.insert(
                        key,
                        Entry {
                            len: size,
                            last_used: tick,
                            in_use: 1,
                            verified: true,
                        },
                    );
                    return Some(AssembledFile {
                        file,
                        key,
                        shared: Arc::clone(shared),
                    });
                }
                if !all_chunks_cached(index, cache, id) {
                    return None;
                }
                Job {
                    key,
                    id,
                    verify_only: false,
                }
            }
        };
        if files.pending.insert(key) {
            match self.jobs.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    files.pending.remove(&job.key);
                }
            }
        }
        None
    }
}

impl AssemblerShared {
    fn lock(&self) -> MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, key: &Digest) -> PathBuf {
        self.dir.join(key.hex())
    }

    fn run(&self, queue: Receiver<Job>, index: &Index, cache: &ChunkCache) {
        for job in queue {
            let path = self.path(&job.key);
            let outcome = if job.verify_only {
                verify_assembled(&path, index, job.id)
            } else {
                assemble_file(&self.dir, index, cache, job.id, &path)
            };
            match outcome {
                Ok(()) => self.verified.insert(path),
                Err(_) => self.verified.remove(&path),
            }
            let mut files = self.lock();
            files.pending.remove(&job.key);
            match outcome {
                Ok(()) => {
                    if !job.verify_only {
                        let len = index.inode(job.id).map_or(0, |i| i.size);
                        files.bytes += len;
                        let last_used = files.tick;
                        files.entries.insert(
                            job.key,
                            Entry {
                                len,
                                last_used,
                                in_use: 0,
                                verified: true,
                            },
                        );
                        self.metrics.file_assembled();
                        debug!(path = %String::from_utf8_lossy(&index.path_of(job.id)), bytes = len, "assembled passthrough backing file");
                    } else if let Some(entry) = files.entries.get_mut(&job.key) {
                        entry.verified = true;
                    }
                }
                Err(problem) => {
                    warn!(key = %job.key, %problem, "passthrough backing file not usable; dropping it");
                    if let Some(entry) = files.entries.get(&job.key)
                        && entry.in_use == 0
                    {
                        files.bytes -= entry.len;
                        files.entries.remove(&job.key);
                        let _ = fs::remove_file(self.path(&job.key));
                    }
                }
            }
            let victims = self.evict(&mut files);
            drop(files);
            self.delete(&victims);
        }
    }

    /// Picks least recently used files not in use until the total fits.
    fn evict(&self, files: &mut Files) -> Vec<Digest> {
        let mut victims = Vec::new();
        while files.bytes > self.max_bytes {
            let Some((key, len)) = files
                .entries
                .iter()
                .filter(|(_, e)| e.in_use == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, e)| (*k, e.len))
            else {
                break;
            };
            files.entries.remove(&key);
            files.bytes -= len;
            victims.push(key);
        }
        victims
    }

    fn delete(&self, victims: &[Digest]) {
        for key in victims {
            self.verified.remove(&self.path(key));
            if let Err(e) = fs::remove_file(self.path(key))
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(key = %key, error = %e, "cannot delete assembled file");
            }
        }
    }
}

/// Threads that open files and queue their reads for [`warm_page_cache`]: an
/// open after the page cache was dropped waits on the disk for the file's inode,
/// and the disk serves several at once.
const WARMING_THREADS: usize = 8;

/// Asks the kernel to read into the page cache, in the order of `chunks` (chunk
/// positions in `index`, e.g. a prefetch plan), the local files a start of the
/// image will read those chunks from: the ranges of an assembled backing file
/// (in `assembly`, written or verified by this process) for a multi-chunk file,
/// the chunk file otherwise. For a start on a warmed node, so that its opens and
/// reads find the files' inodes and bytes in memory instead of waiting on the
/// disk one file at a time. The reads are asked for (`POSIX_FADV_WILLNEED`)
/// from [`WARMING_THREADS`] threads taking files in plan order; returns once
/// they are all queued, with the bytes asked for. Files that are gone are skipped.
pub fn warm_page_cache(
    index: &Index,
    cache: &ChunkCache,
    assembly: Option<&AssemblyOptions>,
    chunks: &[u32],
) -> u64 {
    let files = files_to_warm(index, cache, assembly, chunks);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..WARMING_THREADS.min(files.len()) {
            scope.spawn(|| {
                while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    bytes.fetch_add(file.warm(), Ordering::Relaxed);
                }
            });
        }
    });
    bytes.into_inner()
}

/// A local file a start will read, and the ranges it will read of it.
struct FileToWarm {
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
}

impl FileToWarm {
    /// Opens the file and asks the kernel to read its ranges; the bytes asked for.
    fn warm(&self) -> u64 {
        let Ok(file) = File::open(&self.path) else {
            return 0;
        };
        let mut bytes = 0;
        for &(offset, len) in &self.ranges {
            let (Ok(offset_arg), Ok(len_arg)) = (i64::try_from(offset), i64::try_from(len)) else {
                continue;
            };
            let advised = nix::fcntl::posix_fadvise(
                &file,
                offset_arg,
                len_arg,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
            if advised.is_ok() {
                bytes += len;
            }
        }
        bytes
    }
}

/// The files [`warm_page_cache`] reads, in the order `chunks` first needs them.
fn files_to_warm(
    index: &Index,
    cache: &ChunkCache,
    assembly: Option<&AssemblyOptions>,
    chunks: &[u32],
) -> Vec<FileToWarm> {
    // Which files use each wanted chunk, and where.
    let wanted: HashSet<u32> = chunks.iter().copied().collect();
    let mut users: HashMap<u32, Vec<(InodeId, u64, u32)>> = HashMap::new();
    for id in 0..index.inode_count() {
        if !index.inode(id).is_some_and(|i| i.kind == FileKind::File) {
            continue;
        }
        for piece in index.file_chunks(id) {
            if wanted.contains(&piece.chunk) {
                users
                    .entry(piece.chunk)
                    .or_default()
                    .push((id, piece.file_offset, piece.len));
            }
        }
    }
    let mut files: Vec<FileToWarm> = Vec::new();
    // Where each assembled file is in `files` (None: not assembled here).
    let mut assembled: HashMap<InodeId, Option<usize>> = HashMap::new();
    let mut chunk_files = HashSet::new();
    for &chunk in chunks {
        let Some(loc) = index.chunk(chunk) else {
            continue;
        };
        for &(id, offset, len) in users.get(&chunk).into_iter().flatten() {
            let backing = assembly
                .filter(|_| needs_assembly(index, id))
                .and_then(|a| {
                    *assembled.entry(id).or_insert_with(|| {
                        let (key, _) = content_key(index, id)?;
                        let path = a.dir.join(key.hex());
                        if !a.verified.contains(&path) {
                            return None;
                        }
                        files.push(FileToWarm {
                            path,
                            ranges: Vec::new(),
                        });
                        Some(files.len() - 1)
                    })
                });
            match backing {
                Some(at) => files[at].ranges.push((offset, u64::from(len))),
                None if chunk_files.insert(loc.digest) => files.push(FileToWarm {
                    path: cache.chunk_path(&loc.digest),
                    ranges: vec![(0, u64::from(loc.uncompressed_len))],
                }),
                None => {}
            }
        }
    }
    files
}

/// Writes regular file `id` of `index` from its cached chunks into a temporary
/// file in `dir`, then renames it to `path`. Holes are left as holes (they read
/// as zeros).
fn assemble_file(
    dir: &Path,
    index: &Index,
    cache: &ChunkCache,
    id: InodeId,
    path: &Path,
) -> Result<(), String> {
    static TEMP_SERIAL: AtomicU64 = AtomicU64::new(0);
    let size = index.inode(id).map_or(0, |i| i.size);
    let serial = TEMP_SERIAL.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!("tmp.{}.{serial}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| format!("create {}: {e}", temp.display()))?;
        file.set_len(size)
            .map_err(|e| format!("size {}: {e}", temp.display()))?;
        let mut buffer = Vec::new();
        for piece in index.file_chunks(id) {
            let loc = index
                .chunk(piece.chunk)
                .ok_or_else(|| format!("unknown chunk {}", piece.chunk))?;
            // `get` verifies the chunk file on its first use in this process.
            let chunk = cache
                .get(&loc.digest)
                .ok_or_else(|| format!("chunk {} left the cache", loc.digest))?;
            buffer.resize(piece.len as usize, 0);
            let got = chunk
                .read_at(0, &mut buffer)
                .map_err(|e| format!("read chunk {}: {e}", loc.digest))?;
            if got != buffer.len() {
                return Err(format!("chunk {} is short", loc.digest));
            }
            file.write_all_at(&buffer, piece.file_offset)
                .map_err(|e| format!("write {}: {e}", temp.display()))?;
        }
        file.flush().map_err(|e| e.to_string())?;
        fs::rename(&temp, path).map_err(|e| format!("rename {}: {e}", temp.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Checks an assembled file against the index: its size, every piece's sha256,
/// and zeros in the holes.
fn verify_assembled(path: &Path, index: &Index, id: InodeId) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let size = index.inode(id).map_or(0, |i| i.size);
    let actual = file.metadata().map_err(|e| e.to_string())?.len();
    if actual != size {
        return Err(format!(
            "{} is {actual} bytes, the file is {size}",
            path.display()
        ));
    }
    let mut buffer = Vec::new();
    let mut position = 0u64;
    let check_zeros = |from: u64, to: u64, buffer: &mut Vec<u8>| -> Result<(), String> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(1 << 20) as usize;
            buffer.resize(n, 0);
            file.read_exact_at(buffer, at).map_err(|e| e.to_string())?;
            if buffer.iter().any(|b| *b != 0) {
                return Err(format!("hole at {at} is not zero"));
            }
            at += n as u64;
        }
        Ok(())
    };
    for piece in index.file_chunks(id) {
        check_zeros(position, piece.file_offset, &mut buffer)?;
        let loc = index
            .chunk(piece.chunk)
            .ok_or_else(|| format!("unknown chunk {}", piece.chunk))?;
        buffer.resize(piece.len as usize, 0);
        file.read_exact_at(&mut buffer, piece.file_offset)
            .map_err(|e| e.to_string())?;
        if Digest::of(&buffer) != loc.digest {
            return Err(format!(
                "bytes at {} do not hash to chunk {}",
                piece.file_offset, loc.digest
            ));
        }
        position = piece.file_offset + u64::from(piece.len);
    }
    check_zeros(position, size, &mut buffer)
}
