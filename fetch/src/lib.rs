//! # stoker-fetch
//!
//! Gets chunks from the registry into the node's chunk cache, verified. Its
//! place in Stoker's data path:
//!
//! registry → **fetch → verify** → cache → filesystem → snapshotter → container
//!
//! The lazy filesystem asks a [`Fetcher`] for the chunks a read needs (described
//! by [`ChunkLocation`]s from the image index). For each chunk the fetcher:
//!
//! 1. answers from the [`ChunkCache`](stoker_cache::ChunkCache) if it can;
//! 2. otherwise joins a fetch of that chunk already under way (**single-flight**:
//!    concurrent requests for one chunk digest make one registry request), or
//!    starts one, **coalescing** chunks of the same blob that are wanted together
//!    into one ranged request (up to [`FetchConfig::max_coalesce_bytes`],
//!    bridging gaps up to [`FetchConfig::max_gap_bytes`]);
//! 3. **verifies** every chunk: zstd-decompresses it to exactly its
//!    `uncompressed_len` (never allocating more) and checks its sha256. A chunk that
//!    fails is logged with blob, offset and digest, counted, and fetched once more on
//!    its own; if it fails again the caller gets [`FetchError::Verification`]
//!    (the filesystem answers EIO). Bad bytes are never cached or returned;
//! 4. caches the verified chunk and returns it. If the cache disk is full the chunk
//!    is still returned from memory; the first occurrence is logged and every one
//!    is counted.
//!
//! **Priorities**: [`Priority::OnDemand`] reads (a container is waiting) go first.
//! Prefetch work holds at most [`FetchConfig::max_prefetch_in_flight`] requests and
//! starts no new request while any on-demand fetch is waiting for the registry.
//! All requests together are bounded by [`FetchConfig::max_in_flight`].
//!
//! Retries of failed reads (network errors, 429, 5xx) and the per-read deadline
//! belong to the [`BlobSource`] (the registry client); the fetcher's only retry
//! is the one re-fetch of a chunk that failed verification. A chunk whose fetch
//! failed at the source is answered with the same error, without a request, to
//! on-demand reads for [`FetchConfig::failure_memo`] (1 s) after: the kernel
//! retries a failed page read at once, and would otherwise wait out a second
//! deadline before the reader gets its EIO.
//!
//! Fetch work runs in tokio tasks, so a caller that gives up (an interrupted read)
//! does not cancel a fetch others are waiting for. The fetcher must be used from
//! inside a tokio runtime.
//!
//! Metrics go to the global OpenTelemetry meter `"stoker"` (see [`FetchStats`] for
//! the list); [`Fetcher::stats`] gives the same numbers as plain counters.

mod coalesce;
mod decode;
mod fetcher;
mod metrics;
mod registry_source;
mod source;

pub use fetcher::{ChunkData, FetchConfig, Fetcher, Priority};
pub use metrics::FetchStats;
pub use registry_source::RegistrySource;
pub use source::{BlobSource, FetchSourceError};
pub use stoker_format::{ChunkLocation, Digest};

/// Everything that can go wrong fetching a chunk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The blob source could not deliver the bytes (after its own retries).
    #[error("reading bytes {start}..{end} of blob {blob} failed", start = .range.start, end = .range.end)]
    Source {
        blob: Digest,
        range: std::ops::Range<u64>,
        #[source]
        source: FetchSourceError,
    },

    /// The chunk failed verification twice. Nothing was cached or returned.
    #[error(
        "chunk {digest} (blob {blob}, offset {compressed_offset}) failed verification twice: {reason}"
    )]
    Verification {
        digest: Digest,
        blob: Digest,
        compressed_offset: u64,
        reason: String,
    },

    /// The chunk's location cannot be right (e.g. larger than the format allows).
    #[error("chunk {digest} has an impossible location: {reason}")]
    BadLocation { digest: Digest, reason: String },

    /// The fetch task stopped without an answer (runtime shutting down, or a bug).
    #[error("chunk fetch abandoned: {reason}")]
    Abandoned { reason: String },
}

impl FetchError {
    /// True if the same fetch may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Source { source, .. } => source.is_transient(),
            FetchError::Abandoned { .. } => true,
            FetchError::Verification { .. } | FetchError::BadLocation { .. } => false,
        }
    }
}
