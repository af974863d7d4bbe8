//! Assembled backing files: a local file holding all the bytes of a regular file
//! of several chunks (or with holes), written from its cached chunks, so that
//! the file can be passed through to the kernel ([`crate::passthrough`]). A file
//! that is exactly one chunk needs none: its chunk file serves.
//!
//! Cost: the file's bytes are on disk twice (chunk cache + assembled copy, the
//! copies bounded by [`AssemblyOptions::max_bytes`], least recently used evicted
//! first), one read and one write of the file to assemble it, and one read to
//! verify it the first time this process uses it (as the chunk cache does).
//! A mount assembles on a background thread ([`Assembler`]), so the open that
//! finds the chunks cached is served normally and later opens pass through. A
//! node that warms an image ahead of its containers assembles the files it
//! expects them to open with [`assemble_files`], so that their first open passes
//! through too. Files with the same content share one assembled file, across
//! images too.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sha2::{Digest as _, Sha256};
use stoker_cache::ChunkCache;
use stoker_format::{Digest, FileKind, Index, InodeId};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

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

    pub(crate) fn contains(&self, path: &Path) -> bool {
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
pub(crate) fn whole_chunk(index: &Index, id: InodeId) -> Option<u32> {
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
pub(crate) fn content_key(index: &Index, id: InodeId) -> Option<(Digest, u64)> {
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
pub(crate) struct AssembledFile {
    pub(crate) file: File,
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
    pub(crate) fn backing_file(
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
