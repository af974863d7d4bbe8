//! The read path: file bytes `offset..offset+size` → the chunks covering them →
//! verified chunk data (open-chunk table, then the cache, then the fetcher) →
//! one reply buffer, holes zero-filled, short at end of file.
//!
//! Warm reads never leave the FUSE thread: a chunk already open in the small
//! open-chunk table, or present in the cache, is read with `pread`. Only missing
//! chunks go to the [`Fetcher`], all of a read's missing chunks in one call (which
//! coalesces and fetches them in parallel) on the tokio runtime.
//!
//! Read-ahead: each open file remembers how far ahead chunks have been asked for.
//! When a read comes within half a window of that mark, the chunks up to one
//! window past the read are asked for in one batch, in the background, never
//! delaying the reader's own fetch (see [`Reader::read_ahead`] for the priority).
//! Chunks already cached get read-ahead of their own, further ahead and from the
//! local disk: opened into the open-chunk table and read into the page cache by
//! the kernel (see [`Reader::warm_up_cached`]).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use stoker_cache::ChunkCache;
use stoker_fetch::{ChunkData, FetchError, Fetcher, Priority};
use stoker_format::{ChunkLocation, Digest, FileChunk, Index, InodeId};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::Shared;
use crate::metrics::Metrics;
use crate::trace::Offered;

/// Why a read failed. Every kind is answered with EIO.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("reading cached chunk {chunk}: {source}")]
    Chunk {
        chunk: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {chunk} holds {got} bytes where the index expects {expected}")]
    ShortChunk {
        chunk: u32,
        got: usize,
        expected: usize,
    },
    #[error("the index names chunk {0}, which it does not contain")]
    UnknownChunk(u32),
    #[error("chunk {chunk} overlaps the previous piece of the file")]
    Overlap { chunk: u32 },
}

/// How far ahead of a streaming reader cached chunks are read from the local
/// disk: well past the kernel's own read-ahead on the mount, so the chunk files
/// are in memory before the kernel asks for their bytes. Costs nothing but
/// page cache, unlike read-ahead from the registry.
const LOCAL_READAHEAD_BYTES: u64 = 16 << 20;

/// Per-open-file read state.
#[derive(Debug, Default)]
pub(crate) struct ReadState {
    /// File offset up to which chunks have been asked for ahead of the reader.
    readahead_until: AtomicU64,
    /// Where the last read ended.
    last_end: AtomicU64,
    /// File offset up to which cached chunks have been read ahead from disk.
    warmed_until: AtomicU64,
}

/// Chunks recently read or read ahead, kept open (and pinned in the cache) so a
/// sequential reader does not reopen the chunk file for every request. Small and
/// process-bounded: at most 64 file descriptors, at most a quarter of the cache.
struct OpenChunks {
    capacity: usize,
    /// Most recently used last.
    entries: Mutex<Vec<(u32, ChunkData)>>,
}

impl OpenChunks {
    fn get(&self, chunk: u32) -> Option<ChunkData> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let i = entries.iter().rposition(|(c, _)| *c == chunk)?;
        let entry = entries.remove(i);
        let data = entry.1.clone();
        entries.push(entry);
        Some(data)
    }

    fn put(&self, chunk: u32, data: ChunkData) {
        if self.capacity == 0 || !matches!(data, ChunkData::Cached(_)) {
            // In-memory chunks are not kept: memory stays bounded by the readers.
            return;
        }
        let evicted = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = entries.iter().position(|(c, _)| *c == chunk) {
                let entry = entries.remove(i);
                entries.push(entry);
                return;
            }
            entries.push((chunk, data));
            (entries.len() > self.capacity).then(|| entries.remove(0))
        };
        // Dropped outside the lock: unpinning may evict from the cache (file I/O).
        drop(evicted);
    }
}

pub(crate) struct Reader {
    index: Arc<Index>,
    shared: Arc<Shared>,
    fetcher: Fetcher,
    runtime: Handle,
    readahead_bytes: u64,
    /// Compressed bytes of the chunks following a miss in its blob that ride
    /// along with the miss's request (see [`Reader::following_in_blob`]).
    miss_readahead_bytes: u64,
    /// How far past a read cached chunks are read ahead from the local disk
    /// (see [`Reader::warm_up_cached`]).
    local_readahead_bytes: u64,
    /// Shared with read-ahead tasks, which open the chunks they warm up.
    open_chunks: Arc<OpenChunks>,
}

thread_local! {
    /// Each FUSE thread's reply buffer, reused across reads.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Reader {
    pub(crate) fn new(
        index: Arc<Index>,
        shared: Arc<Shared>,
        fetcher: Fetcher,
        runtime: Handle,
        readahead_bytes: u64,
        miss_readahead_bytes: u64,
    ) -> Self {
        let max_chunk = u64::from(index.chunking().max_chunk_len().max(1));
        let capacity = (fetcher.cache().capacity() / 4 / max_chunk).clamp(0, 64) as usize;
        // Never more chunks ahead than half the open-chunk table holds, so
        // chunks opened ahead are not closed again before they are read.
        let local_readahead_bytes = LOCAL_READAHEAD_BYTES
            .min(capacity as u64 / 2 * max_chunk)
            .max(readahead_bytes);
        Reader {
            index,
            shared,
            fetcher,
            runtime,
            readahead_bytes,
            miss_readahead_bytes,
            local_readahead_bytes,
            open_chunks: Arc::new(OpenChunks {
                capacity,
                entries: Mutex::new(Vec::with_capacity(capacity + 1)),
            }),
        }
    }

    pub(crate) fn cache(&self) -> &ChunkCache {
        self.fetcher.cache()
    }

    /// Reads `size` bytes at `offset` of regular file `id` (of `file_size` bytes)
    /// and passes them to `reply`. Fewer bytes at end of file; none past it.
    pub(crate) fn read<R>(
        &self,
        id: InodeId,
        file_size: u64,
        offset: u64,
        size: u32,
        state: &ReadState,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ReadError> {
        let (trace, metrics) = (&self.shared.trace, &self.shared.metrics);
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        if offset >= end {
            return Ok(reply(&[]));
        }
        let pieces: Vec<FileChunk> = self.index.chunks_covering(id, offset..end).collect();
        for piece in &pieces {
            if trace.offer(piece.chunk, id, piece.file_offset) == Offered::Dropped {
                metrics.trace_dropped();
            }
        }
        let data = self.chunk_data(&pieces, id, offset..end, state, metrics)?;

        BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let len = (end - offset) as usize;
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            // Every byte of `out` is written below, in order (pieces are sorted
            // and disjoint, the index checks that), so the buffer is not zeroed
            // first: holes are zero-filled as they are met.
            let out = &mut buffer[..len];
            let mut cursor = offset;
            for (piece, chunk) in pieces.iter().zip(&data) {
                // The part of this piece inside offset..end.
                let piece_end = piece.file_offset + u64::from(piece.len);
                let from = offset.max(piece.file_offset);
                let to = end.min(piece_end);
                if from < cursor || to < from {
                    return Err(ReadError::Overlap { chunk: piece.chunk });
                }
                out[(cursor - offset) as usize..(from - offset) as usize].fill(0);
                let dest = &mut out[(from - offset) as usize..(to - offset) as usize];
                let got = chunk
                    .read_at(from - piece.file_offset, dest)
                    .map_err(|source| ReadError::Chunk {
                        chunk: piece.chunk,
                        source,
                    })?;
                if got != dest.len() {
                    return Err(ReadError::ShortChunk {
                        chunk: piece.chunk,
                        got,
                        expected: dest.len(),
                    });
                }
                cursor = to;
            }
            out[(cursor - offset) as usize..].fill(0);
            metrics.read_done(len);
            Ok(reply(out))
        })
    }

    /// The data of every piece, in order: from the open-chunk table or the cache
    /// when present, the rest from the fetcher in one on-demand call. Starts
    /// read-ahead before blocking on the fetch.
    fn chunk_data(
        &self,
        pieces: &[FileChunk],
        id: InodeId,
        read: Range<u64>,
        state: &ReadState,
        metrics: &Metrics,
    ) -> Result<Vec<ChunkData>, ReadError> {
        let mut data: Vec<Option<ChunkData>> = Vec::with_capacity(pieces.len());
        let mut missing: Vec<ChunkLocation> = Vec::new();
        let mut last_missing = None;
        for piece in pieces {
            let loc = self
                .index
                .chunk(piece.chunk)
                .ok_or(ReadError::UnknownChunk(piece.chunk))?;
            let found = self.open_chunks.get(piece.chunk).or_else(|| {
                let cached = ChunkData::Cached(Arc::new(self.cache().get(&loc.digest)?));
                self.open_chunks.put(piece.chunk, cached.clone());
                Some(cached)
            });
            if found.is_none() {
                missing.push(loc);
                last_missing = last_missing.max(Some(piece.chunk));
            }
            data.push(found);
        }
        self.read_ahead(id, read, state, metrics);
        if missing.is_empty() {
            return Ok(data.into_iter().flatten().collect());
        }

        let along = last_missing.map_or_else(Vec::new, |chunk| self.following_in_blob(chunk));
        if !along.is_empty() {
            metrics.readahead(along.len());
        }
        let fetched = self.runtime.block_on(self.fetcher.fetch_chunks_along(
            &missing,
            &along,
            Priority::OnDemand,
        ))?;
        let mut fetched = fetched.into_iter();
        pieces
            .iter()
            .zip(data)
            .map(|(piece, found)| match found {
                Some(chunk) => Ok(chunk),
                None => {
                    let chunk = fetched.next().ok_or(ReadError::UnknownChunk(piece.chunk))?;
                    self.open_chunks.put(piece.chunk, chunk.clone());
                    Ok(chunk)
                }
            })
            .collect()
    }

    /// The chunks stored right after chunk `after` in its blob, back to back,
    /// up to [`Reader::miss_readahead_bytes`] of compressed bytes, stopping at
    /// the first one already cached (so that they stay one ranged read). The
    /// converter numbers chunks in the order it writes them, so these are
    /// chunks `after + 1`, `after + 2`, ... as long as each starts where the
    /// previous one ends in the same blob.
    fn following_in_blob(&self, after: u32) -> Vec<ChunkLocation> {
        let budget = self.miss_readahead_bytes;
        let mut following = Vec::new();
        let (Some(mut previous), true) = (self.index.chunk(after), budget > 0) else {
            return following;
        };
        let cache = self.cache();
        let mut bytes = 0u64;
        for next in after.saturating_add(1)..self.index.chunk_count() {
            let Some(loc) = self.index.chunk(next) else {
                break;
            };
            bytes += u64::from(loc.compressed_len);
            if loc.blob != previous.blob
                || loc.compressed_offset != previous.compressed_range().end
                || bytes > budget
                || cache.contains(&loc.digest)
            {
                break;
            }
            following.push(loc);
            previous = loc;
        }
        following
    }

    /// Asks for the chunks up to one window past this read if the reader has come
    /// within half a window of what was asked for before.
    ///
    /// A reader streaming through the file (this read starts near where the last
    /// one ended, or inside the window already asked for) gets its read-ahead at
    /// on-demand priority, in a request of its own running alongside the reader's:
    /// it will need those chunks next, and at prefetch priority they would wait
    /// for the reader's own fetch, leaving one request in flight at a time. Other
    /// read-ahead (a reader jumping around) is fetched at prefetch priority.
    fn read_ahead(&self, id: InodeId, read: Range<u64>, state: &ReadState, metrics: &Metrics) {
        let window = self.readahead_bytes;
        let last_end = state.last_end.swap(read.end, Ordering::Relaxed);
        if window == 0 {
            return;
        }
        let asked = state.readahead_until.load(Ordering::Relaxed);
        if read.end.saturating_add(window / 2) <= asked {
            return;
        }
        let streaming = read.start == 0
            || (read.start >= last_end.saturating_sub(window) && read.start <= asked.max(last_end));
        let until = read.end.saturating_add(window);
        let from = asked.max(read.end);
        if state
            .readahead_until
            .compare_exchange(asked, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // a concurrent read of the same file is doing it
        }
        self.warm_up_cached(id, read.end, state);
        let cache = self.cache();
        let wanted: Vec<ChunkLocation> = self
            .index
            .chunks_covering(id, from..until)
            // A chunk starting before `from` is part of this read (fetched on
            // demand) or was in the previous batch.
            .filter(|piece| piece.file_offset >= from)
            .filter_map(|piece| self.index.chunk(piece.chunk))
            .filter(|loc| !cache.contains(&loc.digest))
            .collect();
        if wanted.is_empty() {
            return;
        }
        metrics.readahead(wanted.len());
        let fetcher = self.fetcher.clone();
        self.runtime.spawn(async move {
            let outcome = if streaming {
                fetcher
                    .fetch_chunks(&wanted, Priority::OnDemand)
                    .await
                    .map(drop)
            } else {
                fetcher.prefetch(&wanted).await
            };
            if let Err(e) = outcome {
                debug!(error = %e, "read-ahead fetch failed; the reader will fetch on demand");
            }
        });
    }

    /// Read-ahead from the local cache: the cached chunks of file `id` starting
    /// in the [local window](Reader::local_readahead_bytes) past `read_end` (and
    /// not handled by an earlier call) are opened into the open-chunk table, on
    /// a blocking thread (the first open in this process verifies the file),
    /// and the kernel is asked to read them into the page cache now
    /// (`POSIX_FADV_WILLNEED`; nearly free for pages already there). A reader
    /// streaming a file from a cache on disk then finds its chunks in memory
    /// instead of waiting on the disk for one chunk at a time.
    fn warm_up_cached(&self, id: InodeId, read_end: u64, state: &ReadState) {
        let until = read_end.saturating_add(self.local_readahead_bytes);
        let done = state.warmed_until.load(Ordering::Relaxed);
        // Far behind the mark: the reader went back; start again from here.
        let from = if done > until {
            read_end
        } else {
            done.max(read_end)
        };
        if from >= until
            || state
                .warmed_until
                .compare_exchange(done, until, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let cache = self.cache();
        let chunks: Vec<(u32, Digest)> = self
            .index
            .chunks_covering(id, from..until)
            .filter(|piece| piece.file_offset >= from)
            .filter_map(|piece| Some((piece.chunk, self.index.chunk(piece.chunk)?.digest)))
            .filter(|(_, digest)| cache.contains(digest))
            .collect();
        if chunks.is_empty() {
            return;
        }
        let cache = cache.clone();
        let open_chunks = Arc::clone(&self.open_chunks);
        self.runtime.spawn_blocking(move || {
            for (chunk, digest) in chunks {
                let data = match open_chunks.get(chunk) {
                    Some(data) => data,
                    None => {
                        let Some(cached) = cache.get(&digest) else {
                            continue;
                        };
                        let data = ChunkData::Cached(Arc::new(cached));
                        open_chunks.put(chunk, data.clone());
                        data
                    }
                };
                if let ChunkData::Cached(cached) = &data {
                    let len = i64::try_from(cached.len()).unwrap_or(i64::MAX);
                    let advice = PosixFadviseAdvice::POSIX_FADV_WILLNEED;
                    if let Err(e) = posix_fadvise(cached.file(), 0, len, advice) {
                        debug!(%digest, error = %e, "cannot ask the kernel to read a cached chunk ahead");
                    }
                }
            }
        });
    }
}

/// Logs a failed read once per call with the file's path.
pub(crate) fn log_read_error(index: &Index, id: InodeId, offset: u64, error: &ReadError) {
    warn!(
        path = %String::from_utf8_lossy(&index.path_of(id)),
        offset,
        error = %error,
        "read failed; answering EIO"
    );
}
