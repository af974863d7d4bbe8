//! [`Fetcher`]: cache lookups, single-flight, coalesced ranged reads,
//! verification and priorities. See the [crate docs](crate) for the behaviour.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use stoker_cache::{CacheError, CachedChunk, ChunkCache, VerifiedChunk};
use stoker_format::layout::MAX_CHUNK_LEN;
use stoker_format::{ChunkLocation, Digest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::coalesce::{RangeRequest, coalesce};
use crate::decode::decode_chunk;
use crate::metrics::{FetchStats, Metrics};
use crate::{BlobSource, FetchError};

/// Tuning knobs. The defaults suit a registry on a LAN or in the same cloud region.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Largest ranged request built by joining adjacent chunks (a single chunk
    /// larger than this is still fetched, alone).
    pub max_coalesce_bytes: u64,
    /// Unwanted bytes between two wanted chunks of a blob that may be downloaded
    /// anyway to keep them in one request.
    pub max_gap_bytes: u64,
    /// Ranged requests under way at once, all priorities together.
    pub max_in_flight: usize,
    /// Ranged requests under way at once for prefetch. Keep it below
    /// `max_in_flight` so on-demand reads always find a free slot.
    pub max_prefetch_in_flight: usize,
    /// How long an on-demand read of a chunk whose fetch just failed at the source
    /// gets the same error at once instead of asking the source again. The kernel
    /// retries a failed page read immediately; without this the reader would wait
    /// a second whole source deadline. Zero turns it off.
    pub failure_memo: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_coalesce_bytes: 4 << 20,
            max_gap_bytes: 64 << 10,
            max_in_flight: 32,
            max_prefetch_in_flight: 10,
            failure_memo: Duration::from_secs(1),
        }
    }
}

/// Who is waiting for a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A reader is blocked on it: goes first.
    OnDemand,
    /// Speculative (prefetch plans): bounded, and yields to on-demand fetches.
    Prefetch,
}

impl Priority {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Priority::OnDemand => "on_demand",
            Priority::Prefetch => "prefetch",
        }
    }
}

/// A verified chunk, either open in the cache or in memory (just fetched, or
/// fetched while the cache disk was full). Cheap to clone.
#[derive(Clone, Debug)]
pub enum ChunkData {
    Cached(Arc<CachedChunk>),
    Fetched(Bytes),
}

impl ChunkData {
    /// Uncompressed length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            ChunkData::Cached(chunk) => chunk.len(),
            ChunkData::Fetched(bytes) => bytes.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies from `offset` into `buf`; returns the bytes copied (fewer only at
    /// the end of the chunk, 0 at or past it).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChunkData::Cached(chunk) => chunk.read_at(offset, buf),
            ChunkData::Fetched(bytes) => {
                let Some(rest) = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)) else {
                    return Ok(0);
                };
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            }
        }
    }

    /// The whole chunk in memory (reads the cache file for a cached chunk).
    pub fn to_bytes(&self) -> io::Result<Bytes> {
        match self {
            ChunkData::Cached(chunk) => chunk.read_all().map(Bytes::from),
            ChunkData::Fetched(bytes) => Ok(bytes.clone()),
        }
    }
}

/// Fetches chunks from a [`BlobSource`] into a [`ChunkCache`]. Cheap to clone;
/// clones share the cache, the single-flight table and the limits.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

type FlightResult = Result<Bytes, FetchError>;
type FlightSender = watch::Sender<Option<FlightResult>>;
type FlightReceiver = watch::Receiver<Option<FlightResult>>;

/// Rounds of "look in the cache, then join or start fetches" before a fetch is
/// started regardless (a chunk can be evicted between being found and opened).
const MAX_ROUNDS: usize = 3;

struct Inner {
    source: Arc<dyn BlobSource>,
    cache: ChunkCache,
    config: FetchConfig,
    /// Single-flight table: one entry per chunk digest being fetched.
    flights: Mutex<HashMap<Digest, FlightSender>>,
    request_slots: Semaphore,
    prefetch_slots: Arc<Semaphore>,
    /// Number of on-demand fetch calls waiting for the source.
    on_demand_active: watch::Sender<usize>,
    metrics: Metrics,
    /// A full cache disk has been logged and not yet recovered.
    disk_full_reported: AtomicBool,
    /// Chunks whose last fetch failed at the source: when, and the error
    /// (see [`FetchConfig::failure_memo`]).
    recent_failures: Mutex<HashMap<Digest, (Instant, FetchError)>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("config", &self.inner.config)
            .field("cache", &self.inner.cache)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// Builds a fetcher. OpenTelemetry instruments are created here on the global
    /// meter provider, so install the provider first.
    pub fn new(source: Arc<dyn BlobSource>, cache: ChunkCache, config: FetchConfig) -> Self {
        let request_slots = Semaphore::new(config.max_in_flight.max(1));
        let prefetch_slots = Arc::new(Semaphore::new(config.max_prefetch_in_flight.max(1)));
        Fetcher {
            inner: Arc::new(Inner {
                source,
                cache,
                config,
                flights: Mutex::new(HashMap::new()),
                request_slots,
                prefetch_slots,
                on_demand_active: watch::Sender::new(0),
                metrics: Metrics::new(),
                disk_full_reported: AtomicBool::new(false),
                recent_failures: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> FetchStats {
        self.inner.metrics.snapshot()
    }

    /// One chunk, on demand.
    pub async fn get_chunk(&self, loc: &ChunkLocation) -> Result<ChunkData, FetchError> {
        let mut chunks = self
            .fetch_chunks(std::slice::from_ref(loc), Priority::OnDemand)
            .await?;
        chunks.pop().ok_or_else(|| FetchError::Abandoned {
            reason: format!("no result for chunk {}", loc.digest),
        })
    }

    /// The chunks of `wanted`, in the same order (a digest may repeat), fetching the
    /// missing ones in as few requests as possible. Fails with the first error met;
    /// fetches already started keep going and cache what they get.
    pub async fn fetch_chunks(
        &self,
        wanted: &[ChunkLocation],
        priority: Priority,
    ) -> Result<Vec<ChunkData>, FetchError> {
        self.fetch_chunks_along(wanted, &[], priority).await
    }

    /// [`Fetcher::fetch_chunks`], with `along`: chunks the caller expects to be
    /// asked for soon (typically the ones that follow `wanted` in its blob). Those
    /// not cached or already being fetched join `wanted`'s first requests, so
    /// they arrive in the same ranged reads, and are verified and cached like any
    /// other; but the call does not wait for them, does not return them, and
    /// does not fail because of them.
    pub async fn fetch_chunks_along(
        &self,
        wanted: &[ChunkLocation],
        along: &[ChunkLocation],
        priority: Priority,
    ) -> Result<Vec<ChunkData>, FetchError> {
        let inner = &self.inner;
        check_locations(wanted)?;
        check_locations(along)?;
        let (hits, mut missing) = inner.lookup_cache(distinct(wanted)).await;
        inner
            .metrics
            .cache_lookups(hits.len() as u64, missing.len() as u64);
        let mut found: HashMap<Digest, ChunkData> = hits.into_iter().collect();
        if priority == Priority::OnDemand
            && let Some(error) = inner.recent_failure(&missing)
        {
            return Err(error);
        }

        let _on_demand =
            (priority == Priority::OnDemand && !missing.is_empty()).then(|| OnDemand::enter(inner));
        let wanted_digests: HashSet<Digest> = wanted.iter().map(|loc| loc.digest).collect();
        let mut along: Vec<ChunkLocation> = distinct(along)
            .into_iter()
            .filter(|loc| !wanted_digests.contains(&loc.digest))
            .collect();
        for round in 1..=MAX_ROUNDS {
            if missing.is_empty() {
                break;
            }
            // `along` rides with the first round only; `start` rechecks the cache
            // in that round, so cached ones are not fetched again.
            let locs = missing.into_iter().chain(along.drain(..)).collect();
            let mut started = inner.start(locs, priority, round < MAX_ROUNDS, true).await;
            started
                .waits
                .retain(|(loc, _)| wanted_digests.contains(&loc.digest));
            started
                .cached
                .retain(|loc| wanted_digests.contains(&loc.digest));
            for (loc, flight) in started.waits {
                let bytes = wait_for_flight(&loc, flight).await?;
                found.insert(loc.digest, ChunkData::Fetched(bytes));
            }
            let (hits, still_missing) = inner.lookup_cache(started.cached).await;
            found.extend(hits);
            missing = still_missing;
        }

        wanted
            .iter()
            .map(|loc| {
                found
                    .get(&loc.digest)
                    .cloned()
                    .ok_or_else(|| FetchError::Abandoned {
                        reason: format!(
                            "chunk {} kept being evicted before it was read",
                            loc.digest
                        ),
                    })
            })
            .collect()
    }

    /// Makes sure `wanted` is in the cache, at prefetch priority, without holding
    /// the chunks in memory longer than it takes to cache them. Chunks already
    /// cached or being fetched by someone else are skipped. Returns once every
    /// fetch it started has finished, with the first error met (the other
    /// chunks are still fetched).
    pub async fn prefetch(&self, wanted: &[ChunkLocation]) -> Result<(), FetchError> {
        let inner = &self.inner;
        check_locations(wanted)?;
        let missing: Vec<ChunkLocation> = distinct(wanted)
            .into_iter()
            .filter(|loc| !inner.cache.contains(&loc.digest))
            .collect();
        let started = inner.start(missing, Priority::Prefetch, true, false).await;
        let mut first_error = None;
        for task in started.tasks {
            let outcome = task.await.unwrap_or_else(|e| {
                Err(FetchError::Abandoned {
                    reason: format!("prefetch task failed: {e}"),
                })
            });
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// What [`Inner::start`] set going.
#[derive(Default)]
struct Started {
    /// Every chunk claimed or joined, with the flight to wait on (if data is wanted).
    waits: Vec<(ChunkLocation, FlightReceiver)>,
    /// Chunks that turned out to be cached after all.
    cached: Vec<ChunkLocation>,
    /// The request tasks this call spawned.
    tasks: Vec<JoinHandle<Result<(), FetchError>>>,
}

/// The outcome of claiming chunks in the single-flight table.
#[derive(Default)]
struct Claim {
    /// Chunks this caller must fetch (its flights are in the table now).
    leaders: Vec<ChunkLocation>,
    waits: Vec<(ChunkLocation, FlightReceiver)>,
    cached: Vec<ChunkLocation>,
}

impl Inner {
    /// The error of a chunk of `locs` whose fetch failed at the source less than
    /// [`FetchConfig::failure_memo`] ago, if any. Forgets older failures.
    fn recent_failure(&self, locs: &[ChunkLocation]) -> Option<FetchError> {
        let mut failures = self
            .recent_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if failures.is_empty() {
            return None;
        }
        let memo = self.config.failure_memo;
        failures.retain(|_, (when, _)| when.elapsed() < memo);
        locs.iter()
            .find_map(|loc| failures.get(&loc.digest))
            .map(|(_, error)| error.clone())
    }

    /// Remembers or forgets a chunk's failure, after its flight ended.
    fn note_outcome(&self, digest: &Digest, outcome: &FlightResult) {
        let mut failures = self
            .recent_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Err(error @ FetchError::Source { .. }) if !self.config.failure_memo.is_zero() => {
                failures.insert(*digest, (Instant::now(), error.clone()));
            }
            _ if failures.is_empty() => {}
            _ => {
                failures.remove(digest);
            }
        }
    }

    fn lock_flights(&self) -> MutexGuard<'_, HashMap<Digest, FlightSender>> {
        // The table is updated in single statements, so a poisoned lock still holds
        // a consistent table.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the cached chunks among `locs` (file I/O, so on a blocking thread).
    /// A failed lookup counts as all misses.
    async fn lookup_cache(
        &self,
        locs: Vec<ChunkLocation>,
    ) -> (Vec<(Digest, ChunkData)>, Vec<ChunkLocation>) {
        if locs.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let cache = self.cache.clone();
        let fallback = locs.clone();
        let lookup = tokio::task::spawn_blocking(move || {
            let mut hits = Vec::new();
            let mut misses = Vec::new();
            for loc in locs {
                match cache.get(&loc.digest) {
                    Some(chunk) => hits.push((loc.digest, ChunkData::Cached(Arc::new(chunk)))),
                    None => misses.push(loc),
                }
            }
            (hits, misses)
        });
        lookup.await.unwrap_or_else(|e| {
            warn!(error = %e, "cache lookup task failed; treating chunks as misses");
            (Vec::new(), fallback)
        })
    }

    /// Joins or starts fetches for `locs`. On-demand work is claimed and started
    /// at once. Prefetch work goes group by group: take a prefetch slot, wait
    /// until no on-demand fetch is waiting, then claim and start the group. Flights
    /// are always claimed and spawned with no `.await` in between, so a caller
    /// that gives up never leaves a flight without a task behind it.
    async fn start(
        self: &Arc<Self>,
        locs: Vec<ChunkLocation>,
        priority: Priority,
        recheck_cache: bool,
        want_data: bool,
    ) -> Started {
        let mut started = Started::default();
        match priority {
            Priority::OnDemand => {
                let claim = self.claim(&locs, recheck_cache, want_data);
                self.spawn_claimed(claim, priority, None, &mut started);
            }
            Priority::Prefetch => {
                let groups = coalesce(
                    locs,
                    self.config.max_coalesce_bytes,
                    self.config.max_gap_bytes,
                );
                for group in groups {
                    let slot = Arc::clone(&self.prefetch_slots).acquire_owned().await.ok();
                    self.wait_until_no_on_demand().await;
                    let claim = self.claim(&group.chunks, recheck_cache, want_data);
                    self.spawn_claimed(claim, priority, slot.map(Arc::new), &mut started);
                }
            }
        }
        started
    }

    fn spawn_claimed(
        self: &Arc<Self>,
        claim: Claim,
        priority: Priority,
        prefetch_slot: Option<Arc<OwnedSemaphorePermit>>,
        started: &mut Started,
    ) {
        started.waits.extend(claim.waits);
        started.cached.extend(claim.cached);
        let requests = coalesce(
            claim.leaders,
            self.config.max_coalesce_bytes,
            self.config.max_gap_bytes,
        );
        for request in requests {
            let completion = Completion::new(Arc::clone(self), &request.chunks);
            let inner = Arc::clone(self);
            let slot = prefetch_slot.clone();
            started.tasks.push(tokio::spawn(async move {
                let _slot = slot;
                inner.run_request(request, priority, completion).await
            }));
        }
    }

    /// Puts each chunk of `locs` in exactly one bucket: joined (someone is fetching
    /// it), cached (found by a last look, if `recheck_cache`), or led (this caller
    /// fetches it). Leaders insert into the cache before they leave the table, so
    /// the recheck closes the gap between a cache miss and this claim.
    fn claim(&self, locs: &[ChunkLocation], recheck_cache: bool, want_data: bool) -> Claim {
        let mut claim = Claim::default();
        let mut joins = 0;
        let mut flights = self.lock_flights();
        for loc in locs {
            if let Some(flight) = flights.get(&loc.digest) {
                joins += 1;
                if want_data {
                    claim.waits.push((*loc, flight.subscribe()));
                }
            } else if recheck_cache && self.cache.contains(&loc.digest) {
                claim.cached.push(*loc);
            } else {
                let (sender, receiver) = watch::channel(None);
                flights.insert(loc.digest, sender);
                claim.leaders.push(*loc);
                if want_data {
                    claim.waits.push((*loc, receiver));
                }
            }
        }
        drop(flights);
        self.metrics.flight_joins(joins);
        claim
    }

    async fn wait_until_no_on_demand(&self) {
        let mut active = self.on_demand_active.subscribe();
        // The sender lives in `self`, so this only ends when the count is 0.
        let _ = active.wait_for(|count| *count == 0).await;
    }

    /// One coalesced request: read, split, verify, cache, answer; then re-fetch
    /// each chunk that failed verification once, on its own.
    async fn run_request(
        self: Arc<Self>,
        request: RangeRequest,
        priority: Priority,
        mut completion: Completion,
    ) -> Result<(), FetchError> {
        let body = match self
            .read_range(&request.blob, request.range.clone(), priority)
            .await
        {
            Ok(body) => body,
            Err(e) => {
                completion.fail_all(&e);
                return Err(e);
            }
        };
        let mut bad = Vec::new();
        for (loc, outcome) in self.verify_and_store(split_body(&request, body)).await {
            match outcome {
                Ok(bytes) => completion.complete(&loc.digest, Ok(bytes)),
                Err(reason) => {
                    self.report_bad_chunk(&loc, &reason, 1);
                    bad.push(loc);
                }
            }
        }
        let mut first_error = None;
        for loc in bad {
            let outcome = self.refetch(&loc, priority).await;
            if let Err(e) = &outcome {
                first_error.get_or_insert_with(|| e.clone());
            }
            completion.complete(&loc.digest, outcome);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The single retry of a chunk that failed verification.
    async fn refetch(self: &Arc<Self>, loc: &ChunkLocation, priority: Priority) -> FlightResult {
        let range = loc.compressed_range();
        let body = self.read_range(&loc.blob, range.clone(), priority).await?;
        let request = RangeRequest {
            blob: loc.blob,
            range,
            chunks: vec![*loc],
        };
        let reason = match self
            .verify_and_store(split_body(&request, body))
            .await
            .pop()
        {
            Some((_, Ok(bytes))) => return Ok(bytes),
            Some((_, Err(reason))) => reason,
            None => "no result from verification".to_string(),
        };
        self.report_bad_chunk(loc, &reason, 2);
        Err(FetchError::Verification {
            digest: loc.digest,
            blob: loc.blob,
            compressed_offset: loc.compressed_offset,
            reason,
        })
    }

    async fn read_range(
        &self,
        blob: &Digest,
        range: Range<u64>,
        priority: Priority,
    ) -> Result<Bytes, FetchError> {
        let _slot = self
            .request_slots
            .acquire()
            .await
            .map_err(|_| FetchError::Abandoned {
                reason: "fetcher is shutting down".to_string(),
            })?;
        let _in_flight = self.metrics.request_started();
        let started = Instant::now();
        let result = self.source.read_range(blob, range.clone()).await;
        let received = result.as_ref().ok().map(|body| body.len() as u64);
        self.metrics
            .request_finished(priority, started.elapsed(), received);
        result.map_err(|source| {
            warn!(%blob, start = range.start, end = range.end, error = %source, "blob read failed");
            FetchError::Source {
                blob: *blob,
                range,
                source,
            }
        })
    }

    /// Decompresses, verifies and caches chunks on a blocking thread (CPU and
    /// file I/O). Each outcome is the verified bytes or why they were refused.
    async fn verify_and_store(
        self: &Arc<Self>,
        pieces: Vec<(ChunkLocation, Result<Bytes, String>)>,
    ) -> Vec<(ChunkLocation, Result<Bytes, String>)> {
        let locs: Vec<ChunkLocation> = pieces.iter().map(|(loc, _)| *loc).collect();
        let inner = Arc::clone(self);
        let work = tokio::task::spawn_blocking(move || {
            pieces
                .into_iter()
                .map(|(loc, piece)| {
                    let outcome = piece.and_then(|compressed| {
                        let chunk = decode_chunk(&loc, &compressed)?;
                        inner.metrics.chunk_fetched();
                        inner.store(&chunk);
                        Ok(chunk.into_bytes())
                    });
                    (loc, outcome)
                })
                .collect()
        });
        work.await.unwrap_or_else(|e| {
            let reason = format!("verification task failed: {e}");
            locs.into_iter()
                .map(|loc| (loc, Err(reason.clone())))
                .collect()
        })
    }

    /// Caches a verified chunk. Failure to cache never fails the fetch.
    fn store(&self, chunk: &VerifiedChunk) {
        match self.cache.insert_verified(chunk) {
            Ok(()) => {
                if self.disk_full_reported.load(Ordering::Relaxed)
                    && self.disk_full_reported.swap(false, Ordering::Relaxed)
                {
                    info!("chunk cache disk has room again; caching resumed");
                }
            }
            Err(CacheError::DiskFull { path, source }) => {
                self.metrics.disk_full();
                if !self.disk_full_reported.swap(true, Ordering::Relaxed) {
                    warn!(
                        path = %path.display(),
                        error = %source,
                        "chunk cache disk is full: serving chunks from memory without caching them"
                    );
                }
            }
            Err(e @ CacheError::TooLarge { .. }) => debug!(error = %e, "chunk not cached"),
            Err(e) => {
                warn!(digest = %chunk.digest(), error = %e, "could not cache chunk; serving it from memory")
            }
        }
    }

    fn report_bad_chunk(&self, loc: &ChunkLocation, reason: &str, attempt: u32) {
        self.metrics.verification_failed();
        warn!(
            blob = %loc.blob,
            offset = loc.compressed_offset,
            digest = %loc.digest,
            attempt,
            reason,
            "chunk from registry failed verification"
        );
    }
}

/// Cuts a response body into the compressed chunks of `request`. A body of the
/// wrong length makes every chunk bad (offsets cannot be trusted).
fn split_body(request: &RangeRequest, body: Bytes) -> Vec<(ChunkLocation, Result<Bytes, String>)> {
    let expected = request.len();
    request
        .chunks
        .iter()
        .map(|loc| {
            let start = (loc.compressed_offset - request.range.start) as usize;
            let end = start + loc.compressed_len as usize;
            let piece = if body.len() as u64 != expected {
                Err(format!(
                    "registry returned {} bytes for a {expected}-byte range",
                    body.len()
                ))
            } else if end > body.len() {
                Err(format!(
                    "chunk bytes {start}..{end} lie outside the response"
                ))
            } else {
                Ok(body.slice(start..end))
            };
            (*loc, piece)
        })
        .collect()
}

/// Answers the flights a request task leads. Whatever happens to the task
/// (error, panic, runtime shutdown), every flight gets an answer and leaves the
/// table, so no waiter hangs and the next caller can try again.
struct Completion {
    inner: Arc<Inner>,
    pending: HashSet<Digest>,
}

impl Completion {
    fn new(inner: Arc<Inner>, chunks: &[ChunkLocation]) -> Self {
        let pending = chunks.iter().map(|c| c.digest).collect();
        Completion { inner, pending }
    }

    fn complete(&mut self, digest: &Digest, outcome: FlightResult) {
        if !self.pending.remove(digest) {
            return;
        }
        self.inner.note_outcome(digest, &outcome);
        let flight = self.inner.lock_flights().remove(digest);
        if let Some(flight) = flight {
            flight.send_replace(Some(outcome));
        }
    }

    fn fail_all(&mut self, error: &FetchError) {
        let pending: Vec<Digest> = self.pending.iter().copied().collect();
        for digest in pending {
            self.complete(&digest, Err(error.clone()));
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.fail_all(&FetchError::Abandoned {
                reason: "fetch task stopped before it finished".to_string(),
            });
        }
    }
}

/// Marks an on-demand fetch as waiting for the source while it lives.
struct OnDemand<'a>(&'a Inner);

impl<'a> OnDemand<'a> {
    fn enter(inner: &'a Inner) -> Self {
        inner.on_demand_active.send_modify(|count| *count += 1);
        OnDemand(inner)
    }
}

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        self.0
            .on_demand_active
            .send_modify(|count| *count = count.saturating_sub(1));
    }
}

async fn wait_for_flight(loc: &ChunkLocation, mut flight: FlightReceiver) -> FlightResult {
    let outcome = match flight.wait_for(Option::is_some).await {
        Ok(value) => value.clone(),
        Err(_) => None,
    };
    outcome.unwrap_or_else(|| {
        Err(FetchError::Abandoned {
            reason: format!("fetch of chunk {} ended without a result", loc.digest),
        })
    })
}

/// Rejects locations no valid index can contain, before anything is allocated.
fn check_locations(wanted: &[ChunkLocation]) -> Result<(), FetchError> {
    for loc in wanted {
        let problem = if loc.compressed_len == 0 || loc.uncompressed_len == 0 {
            Some("zero length".to_string())
        } else if loc.uncompressed_len > MAX_CHUNK_LEN {
            Some(format!(
                "{} bytes uncompressed, the format allows at most {MAX_CHUNK_LEN}",
                loc.uncompressed_len
            ))
        } else if loc
            .compressed_offset
            .checked_add(u64::from(loc.compressed_len))
            .is_none()
        {
            Some("offset overflows".to_string())
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(FetchError::BadLocation {
                digest: loc.digest,
                reason,
            });
        }
    }
    Ok(())
}

/// `wanted` without repeated digests, in first-seen order.
fn distinct(wanted: &[ChunkLocation]) -> Vec<ChunkLocation> {
    let mut seen = HashSet::new();
    wanted
        .iter()
        .filter(|loc| seen.insert(loc.digest))
        .copied()
        .collect()
}
