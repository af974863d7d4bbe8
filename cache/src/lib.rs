//! # stoker-cache
//!
//! The node-wide on-disk chunk cache, shared by every image mounted on the node.
//! Its place in Stoker's data path:
//!
//! registry → fetch → verify → **cache** → filesystem → snapshotter → container
//!
//! `stoker-fetch` puts every chunk it has fetched and verified here; the lazy
//! filesystem reads warm chunks straight from here without touching the fetcher.
//!
//! ## Layout
//!
//! ```text
//! <dir>/chunks/<hex[0..2]>/<hex>   uncompressed chunk bytes, named by their sha256
//! <dir>/tmp/                       files being written; emptied at open
//! ```
//!
//! Chunks are **content-addressed** by the digest of their uncompressed bytes,
//! so a chunk present for one image serves every image that has it.
//!
//! ## Guarantees
//!
//! * **Verified in**: [`ChunkCache::insert`] hashes the bytes and refuses a mismatch;
//!   [`ChunkCache::insert_verified`] takes a [`VerifiedChunk`], whose constructor did
//!   the hashing, so the fetcher hashes each chunk once.
//! * **Verified out, once per process**: the first time this process opens a chunk file
//!   it did not write itself, it hashes the whole file; a file that fails (torn write
//!   after a power loss, bit rot, tampering) is deleted, counted in `corrupt_dropped`,
//!   and reported as a miss so the caller fetches it again. Later reads in the same
//!   process are not re-hashed, and neither are files this process wrote from
//!   verified bytes: re-hashing would add about 0.5 ms per MiB, and a disk read after
//!   the page cache is dropped, to the warm path, which is the path that has to stay
//!   close to native disk speed (a node warmed by a prefetch plan opens every chunk it
//!   wrote). The trade-off is that a file modified *behind the cache's back* after
//!   it was written or first checked is not noticed until the next restart.
//! * **Crash-safe**: a chunk is written to a temporary file in `<dir>/tmp/` and
//!   renamed into place, so a chunk file either has its full final name or does not
//!   exist; leftovers in `tmp/` are removed at open. **fsync policy: none.** Neither the
//!   file nor the directory is fsynced. After a power loss a renamed file may be empty
//!   or partly written, but the first-open check above catches exactly that, so an
//!   fsync per chunk (milliseconds each on the cold path) buys nothing but latency.
//! * **Capacity-bounded LRU that never evicts a chunk being read**: [`ChunkCache::get`]
//!   returns a [`CachedChunk`] guard that pins the entry until it is dropped.
//!   Eviction runs after every insert and when a guard is dropped while the cache
//!   is over capacity. If every evictable byte is pinned, the insert still
//!   **succeeds** and usage exceeds the bound by at most the pinned bytes (plus
//!   the chunk just inserted) until the pins are released; the next unpin evicts.
//!   A chunk larger than the whole capacity is refused ([`CacheError::TooLarge`]).
//! * **Survives restarts**: [`ChunkCache::open`] rebuilds the index from the directory.
//!   The LRU order is rebuilt from each file's `max(atime, mtime)`. The cache sets a
//!   file's atime explicitly the first time a process reads it, so the order
//!   remembers at least "first used in each agent run" even on `noatime`/`relatime` mounts;
//!   with `strictatime` it is exact.
//! * **Disk full** (`ENOSPC`, `EDQUOT`) on insert is reported as [`CacheError::DiskFull`]
//!   and leaves no partial file, so the caller can keep serving from memory.
//!
//! ## Concurrency
//!
//! Many FUSE threads read at once. One mutex guards the in-memory index only;
//! it is never held across file I/O (opening, hashing, writing, renaming and
//! unlinking all happen outside it).
//!
//! One process should own a cache directory. Sharing one is safe (content is
//! verified on first open and files are only ever replaced by rename), but each
//! process accounts capacity on its own.

mod cache;
mod index;

use std::io;
use std::path::PathBuf;

pub use cache::{CacheUsage, CachedChunk, ChunkCache, VerifiedChunk};
pub use stoker_format::Digest;

/// Everything that can go wrong in the chunk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The bytes offered for a digest hash to something else; nothing was stored.
    #[error("chunk bytes do not match their digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// The cache file system is full (or over quota). Nothing partial was left behind;
    /// the caller should keep serving the chunk from memory and report it.
    #[error("cache disk is full while writing {path}")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The chunk alone is larger than the whole cache.
    #[error("chunk {digest} is {len} bytes, larger than the whole cache ({capacity} bytes)")]
    TooLarge {
        digest: Digest,
        len: u64,
        capacity: u64,
    },

    /// Any other file-system error, with the operation and path that failed.
    #[error("cache {op} failed for {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    /// Builds the error for a failed file operation, recognising a full disk.
    fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                CacheError::DiskFull { path, source }
            }
            _ => CacheError::Io { op, path, source },
        }
    }
}
