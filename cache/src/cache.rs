//! [`ChunkCache`]: the files on disk, and the guards that read them.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use stoker_format::{Digest, Hasher};
use tracing::{debug, info, warn};

use crate::CacheError;
use crate::index::{Index, Reservation};

/// Read size used when hashing a chunk file.
const HASH_BUFFER_BYTES: usize = 256 * 1024;

/// Chunk bytes whose sha256 has been checked against their digest.
///
/// The only way to build one is [`VerifiedChunk::new`], which hashes, so holding
/// one proves the check was done.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    digest: Digest,
    bytes: Bytes,
}

impl VerifiedChunk {
    /// Hashes `bytes` and accepts them only if they match `expected`.
    pub fn new(expected: Digest, bytes: Bytes) -> Result<Self, CacheError> {
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(CacheError::DigestMismatch { expected, actual });
        }
        Ok(VerifiedChunk {
            digest: expected,
            bytes,
        })
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// A snapshot of the cache's size and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes of chunk files in the index (includes chunks being installed).
    pub bytes: u64,
    pub chunks: u64,
    pub capacity: u64,
    /// `get` calls that returned a chunk.
    pub hits: u64,
    /// `get` calls that returned nothing (absent, vanished or corrupt).
    pub misses: u64,
    /// Chunks removed to stay under capacity.
    pub evictions: u64,
    /// Chunk files that failed their check on first open and were deleted.
    pub corrupt_dropped: u64,
}

/// The node-wide chunk cache. Cheap to clone; all clones share one index.
/// See the [crate docs](crate) for its guarantees.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

struct Inner {
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    /// Signalled when files marked as being deleted are gone.
    deletion_done: Condvar,
    temp_counter: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    corrupt_dropped: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("chunks_dir", &self.inner.chunks_dir)
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, bounded to `capacity_bytes`.
    ///
    /// Removes leftovers in `<dir>/tmp/`, rebuilds the index from `<dir>/chunks/`
    /// (LRU order from each file's `max(atime, mtime)`), and evicts down to the
    /// capacity if the directory holds more. Chunk files are not hashed here;
    /// each is checked the first time it is read.
    pub fn open(dir: impl AsRef<Path>, capacity_bytes: u64) -> Result<Self, CacheError> {
        let dir = dir.as_ref();
        let chunks_dir = dir.join("chunks");
        let tmp_dir = dir.join("tmp");
        fs::create_dir_all(&chunks_dir)
            .map_err(|e| CacheError::io("create directory", &chunks_dir, e))?;
        fs::create_dir_all(&tmp_dir)
            .map_err(|e| CacheError::io("create directory", &tmp_dir, e))?;
        let removed_temps = clean_tmp_dir(&tmp_dir)?;
        for prefix in 0..=255u8 {
            let sub = chunks_dir.join(hex_byte(prefix));
            fs::create_dir_all(&sub).map_err(|e| CacheError::io("create directory", &sub, e))?;
        }

        let found = scan_chunks(&chunks_dir)?;
        let mut index = Index::default();
        for file in &found {
            index.add_existing(file.digest, file.len);
        }
        let cache = ChunkCache {
            inner: Arc::new(Inner {
                chunks_dir,
                tmp_dir,
                capacity: capacity_bytes,
                index: Mutex::new(index),
                deletion_done: Condvar::new(),
                temp_counter: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                corrupt_dropped: AtomicU64::new(0),
            }),
        };
        let victims = cache.inner.lock().evict_to(capacity_bytes, None);
        cache.inner.delete_evicted(&victims);
        let usage = cache.usage();
        info!(
            dir = %dir.display(),
            chunks = usage.chunks,
            bytes = usage.bytes,
            capacity = capacity_bytes,
            evicted = victims.len(),
            removed_temps,
            "chunk cache opened"
        );
        Ok(cache)
    }

    /// Hashes `bytes`, refuses them if they do not match `expected`, and stores them.
    pub fn insert(&self, expected: &Digest, bytes: &[u8]) -> Result<(), CacheError> {
        let chunk = VerifiedChunk::new(*expected, Bytes::copy_from_slice(bytes))?;
        self.insert_verified(&chunk)
    }

    /// Stores an already verified chunk. Returns `Ok` if the chunk is now cached
    /// (or already was). On error nothing partial is left on disk.
    pub fn insert_verified(&self, chunk: &VerifiedChunk) -> Result<(), CacheError> {
        let inner = &self.inner;
        let digest = *chunk.digest();
        let len = chunk.bytes().len() as u64;
        if len > inner.capacity {
            return Err(CacheError::TooLarge {
                digest,
                len,
                capacity: inner.capacity,
            });
        }
        if inner.lock().contains(&digest) {
            return Ok(());
        }

        let temp = inner.write_temp(&digest, chunk.bytes())?;
        let generation = {
            let mut index = inner.lock();
            loop {
                match index.reserve(digest, len) {
                    Reservation::Reserved { generation } => break generation,
                    Reservation::AlreadyPresent => {
                        drop(index);
                        remove_quietly(&temp);
                        return Ok(());
                    }
                    Reservation::DeletionPending => {
                        index = inner
                            .deletion_done
                            .wait(index)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        };

        let path = inner.chunk_path(&digest);
        if let Err(e) = fs::rename(&temp, &path) {
            inner.lock().finish_install(&digest, generation, false);
            remove_quietly(&temp);
            return Err(CacheError::io("rename into place", &path, e));
        }
        let victims = {
            let mut index = inner.lock();
            index.finish_install(&digest, generation, true);
            index.evict_to(inner.capacity, Some(&digest))
        };
        inner.delete_evicted(&victims);
        Ok(())
    }

    /// Opens a cached chunk for reading and pins it until the guard is dropped.
    ///
    /// The first open in this process of a file it did not write hashes the file;
    /// a corrupt file is deleted and reported as a miss (`None`), as is any file
    /// that cannot be opened or read.
    pub fn get(&self, digest: &Digest) -> Option<CachedChunk> {
        let inner = &self.inner;
        let Some(pinned) = inner.lock().pin(digest) else {
            inner.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = inner.chunk_path(digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    debug!(%digest, path = %path.display(), "cached chunk vanished from disk");
                    inner.lock().forget_vanished(digest, pinned.generation);
                } else {
                    warn!(%digest, path = %path.display(), error = %e, "cannot open cached chunk; dropping it");
                    inner.delete_entry(digest, pinned.generation);
                }
                inner.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        // From here on the guard owns the pin, whatever happens.
        let chunk = CachedChunk {
            file,
            len: pinned.len,
            digest: *digest,
            path,
            generation: pinned.generation,
            cache: Arc::clone(inner),
        };
        if !pinned.verified {
            if let Err(problem) = verify_file(&chunk.file, digest, pinned.len) {
                warn!(
                    %digest,
                    path = %chunk.path.display(),
                    %problem,
                    "cached chunk failed verification; deleted, will be fetched again"
                );
                inner.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                inner.misses.fetch_add(1, Ordering::Relaxed);
                inner.delete_entry(digest, pinned.generation);
                return None;
            }
            inner.lock().mark_verified(digest, pinned.generation);
            // Remember the use across restarts (see crate docs on LRU order).
            let _ = chunk
                .file
                .set_times(FileTimes::new().set_accessed(SystemTime::now()));
        }
        inner.hits.fetch_add(1, Ordering::Relaxed);
        Some(chunk)
    }

    /// True if the chunk is cached (no I/O, no verification, no hit/miss counted).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner.lock().contains(digest)
    }

    /// Removes a chunk. Returns whether it was present. Open guards keep reading
    /// the (now unlinked) file until they are dropped.
    pub fn remove(&self, digest: &Digest) -> bool {
        let removed = self.inner.lock().start_delete(digest, None);
        if removed {
            self.inner.unlink_and_finish(&[*digest]);
        }
        removed
    }

    pub fn usage(&self) -> CacheUsage {
        let inner = &self.inner;
        let (bytes, chunks) = {
            let index = inner.lock();
            (index.bytes(), index.chunks())
        };
        CacheUsage {
            bytes,
            chunks,
            capacity: inner.capacity,
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            evictions: inner.evictions.load(Ordering::Relaxed),
            corrupt_dropped: inner.corrupt_dropped.load(Ordering::Relaxed),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Where a chunk's file lives, whether or not it is cached. To use the file
    /// (e.g. as a FUSE passthrough backing file) hold a [`CachedChunk`] from
    /// [`ChunkCache::get`], which pins it, and use [`CachedChunk::path`] or
    /// [`CachedChunk::file`].
    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        self.inner.chunk_path(digest)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // The index is plain bookkeeping, consistent after every method call,
        // so a panic elsewhere while holding the lock leaves nothing half-done.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
    }

    /// Writes `bytes` to a new file in `tmp/` and returns its path.
    /// On any error the partial file is removed.
    fn write_temp(&self, digest: &Digest, bytes: &[u8]) -> Result<PathBuf, CacheError> {
        let serial = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .tmp_dir
            .join(format!("{}.{}.{serial}", digest.hex(), std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|mut file| file.write_all(bytes));
        if let Err(e) = written {
            remove_quietly(&temp);
            return Err(CacheError::io("write", temp, e));
        }
        Ok(temp)
    }

    /// Takes one exact entry out of the index and deletes its file.
    fn delete_entry(&self, digest: &Digest, generation: u64) {
        if self.lock().start_delete(digest, Some(generation)) {
            self.unlink_and_finish(&[*digest]);
        }
    }

    fn delete_evicted(&self, victims: &[Digest]) {
        if victims.is_empty() {
            return;
        }
        self.evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        debug!(count = victims.len(), "evicting chunks");
        self.unlink_and_finish(victims);
    }

    /// Unlinks files already marked as being deleted, then clears the marks.
    fn unlink_and_finish(&self, digests: &[Digest]) {
        for digest in digests {
            let path = self.chunk_path(digest);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    warn!(path = %path.display(), error = %e, "cannot delete cached chunk");
                }
                _ => {}
            }
        }
        let mut index = self.lock();
        for digest in digests {
            index.finish_delete(digest);
        }
        drop(index);
        self.deletion_done.notify_all();
    }
}

/// A pinned, open chunk file. While it lives the chunk is never evicted.
pub struct CachedChunk {
    file: File,
    len: u64,
    digest: Digest,
    path: PathBuf,
    generation: u64,
    cache: Arc<Inner>,
}

impl std::fmt::Debug for CachedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedChunk")
            .field("digest", &self.digest)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl CachedChunk {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Length of the uncompressed chunk in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads from `offset` into `buf` and returns how many bytes were read: the
    /// whole buffer, or less only at the end of the chunk (0 at or past the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let want = buf.len().min((self.len - offset) as usize);
        read_exact_at(&self.file, &mut buf[..want], offset)?;
        Ok(want)
    }

    /// Reads the whole chunk.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; self.len as usize];
        read_exact_at(&self.file, &mut data, 0)?;
        Ok(data)
    }

    /// The open file, for callers that hand it to the kernel (FUSE passthrough).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's path; it stays valid while this guard lives (unless the chunk is
    /// explicitly [removed](ChunkCache::remove)).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CachedChunk {
    fn drop(&mut self) {
        let victims = {
            let mut index = self.cache.lock();
            index.unpin(&self.digest, self.generation);
            index.evict_to(self.cache.capacity, None)
        };
        self.cache.delete_evicted(&victims);
    }
}

/// Fills `buf` from `offset`, failing if the file ends first.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cached chunk file is shorter than its index entry",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Checks that the open file is exactly `len` bytes hashing to `digest`.
fn verify_file(file: &File, digest: &Digest, len: u64) -> Result<(), String> {
    let actual_len = file.metadata().map_err(|e| e.to_string())?.len();
    if actual_len != len {
        return Err(format!("file is {actual_len} bytes, index says {len}"));
    }
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; HASH_BUFFER_BYTES.min(len as usize)];
    let mut offset = 0u64;
    while offset < len {
        let n = buf.len().min((len - offset) as usize);
        read_exact_at(file, &mut buf[..n], offset).map_err(|e| e.to_string())?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    let actual = hasher.finish();
    if actual != *digest {
        return Err(format!("content hashes to {actual}"));
    }
    Ok(())
}

/// Removes everything in `tmp/`: writes that a crash interrupted. Returns the count.
fn clean_tmp_dir(tmp_dir: &Path) -> Result<usize, CacheError> {
    let entries = fs::read_dir(tmp_dir).map_err(|e| CacheError::io("list", tmp_dir, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| CacheError::io("list", tmp_dir, e))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| CacheError::io("remove leftover", &path, e))?;
        removed += 1;
    }
    Ok(removed)
}

/// A chunk file found on disk at open.
struct FoundChunk {
    digest: Digest,
    len: u64,
    last_used: SystemTime,
}

/// Lists `chunks/<xx>/<hex>` files, oldest use first. Files whose names are not
/// a digest in the right sub-directory are left alone and logged.
fn scan_chunks(chunks_dir: &Path) -> Result<Vec<FoundChunk>, CacheError> {
    let mut found = Vec::new();
    for prefix in 0..=255u8 {
        let sub = chunks_dir.join(hex_byte(prefix));
        let entries = fs::read_dir(&sub).map_err(|e| CacheError::io("list", &sub, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| CacheError::io("list", &sub, e))?;
            let path = entry.path();
            let digest = entry
                .file_name()
                .to_str()
                .filter(|name| name.len() == 64 && name.starts_with(&hex_byte(prefix)))
                .and_then(|name| Digest::parse(name).ok());
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io("stat", &path, e)),
            };
            let Some(digest) = digest.filter(|_| meta.is_file()) else {
                warn!(path = %path.display(), "ignoring unexpected file in chunk cache");
                continue;
            };
            let accessed = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push(FoundChunk {
                digest,
                len: meta.len(),
                last_used: accessed.max(modified),
            });
        }
    }
    found.sort_by_key(|f| (f.last_used, f.digest));
    Ok(found)
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!(path = %path.display(), error = %e, "cannot remove temporary file");
        }
        _ => {}
    }
}

fn hex_byte(byte: u8) -> String {
    format!("{byte:02x}")
}
