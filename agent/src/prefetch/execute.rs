//! Warming the cache from one plan: batches in plan order through
//! [`Fetcher::prefetch`], progress after each batch, cancellation, and a final
//! check that every chunk of the plan is on local disk.
//!
//! Each batch holds about one coalesced request's worth of chunks
//! ([`FetchConfig::max_coalesce_bytes`](stoker_fetch::FetchConfig) compressed),
//! and as many batches run at once as the fetcher allows prefetch requests, so
//! the fetcher's prefetch limit is the executor's concurrency. The fetcher makes
//! prefetch requests wait while containers' on-demand reads are waiting.
//!
//! The fetcher verifies every chunk before it caches it, so a chunk the cache
//! holds is verified. A chunk that fails (registry error, verification failure)
//! fails the plan: nothing unverified is cached, the chunks verified so far stay.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, stream};
use stoker_fetch::{ChunkLocation, Fetcher, Priority};
use stoker_format::{Digest, Index, Plan};
use tracing::info;

use super::passthrough::{PassthroughPrep, prepare_passthrough};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a prefetch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchState {
    /// Waiting for a free slot, or for the index.
    Queued,
    Running,
    /// Every chunk of the plan is verified and on local disk.
    Done,
    Failed,
    Cancelled,
}

impl PrefetchState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PrefetchState::Done | PrefetchState::Failed | PrefetchState::Cancelled
        )
    }
}

/// Progress of one prefetch. Bytes are uncompressed chunk bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub index_digest: Digest,
    pub state: PrefetchState,
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Why it failed, when `state` is `Failed`.
    pub error: Option<String>,
}

impl Progress {
    pub fn queued(index_digest: Digest) -> Progress {
        Progress {
            index_digest,
            state: PrefetchState::Queued,
            chunks_done: 0,
            chunks_total: 0,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        }
    }
}

/// How a run ended (also published as the last progress).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed(String),
    Cancelled,
}

/// Warms the cache with `plan`'s chunks (checked against `index` first),
/// publishing progress on `progress` until the final state. With `prepare`,
/// the plan's files are then made ready for passthrough
/// ([`prepare_passthrough`]) before the plan is reported done.
pub async fn execute_plan(
    fetcher: &Fetcher,
    index: &Arc<Index>,
    index_digest: &Digest,
    plan: &Plan,
    prepare: Option<&PassthroughPrep>,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Outcome {
    if let Err(e) = plan.check_against(index, index_digest) {
        return finish(progress, Outcome::Failed(e.to_string()));
    }
    let chunks = distinct(plan.chunks.iter().filter_map(|&c| index.chunk(c)));
    let outcome = warm(fetcher, chunks, progress, cancel).await;
    if outcome != Outcome::Done {
        return outcome;
    }
    if let Some(prepare) = prepare {
        let report = prepare_passthrough(fetcher, index, plan, prepare, cancel).await;
        info!(index = %index_digest, ?report, "plan's files prepared for passthrough");
    }
    finish(progress, Outcome::Done)
}

/// Warms the chunks of `index` that are neither in `plan` nor cached, in index
/// order, as long as they fit in the cache's free space (never evicting). Used
/// after a plan, in the background, with its own progress.
pub async fn execute_rest(
    fetcher: &Fetcher,
    index: &Index,
    plan: &Plan,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Outcome {
    let cache = fetcher.cache();
    let usage = cache.usage();
    let mut room = cache.capacity().saturating_sub(usage.bytes);
    let planned: HashSet<u32> = plan.chunks.iter().copied().collect();
    let mut rest = Vec::new();
    for position in 0..index.chunk_count() {
        if planned.contains(&position) {
            continue;
        }
        let Some(location) = index.chunk(position) else {
            continue;
        };
        if cache.contains(&location.digest) {
            continue;
        }
        let len = u64::from(location.uncompressed_len);
        if len > room {
            break;
        }
        room -= len;
        rest.push(location);
    }
    match warm(fetcher, distinct(rest.into_iter()), progress, cancel).await {
        Outcome::Done => finish(progress, Outcome::Done),
        other => other,
    }
}

/// Fetches `chunks` in batches; publishes progress and any failure, but not
/// `Done` (the caller does).
pub(super) async fn warm(
    fetcher: &Fetcher,
    chunks: Vec<ChunkLocation>,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Outcome {
    let cache = fetcher.cache();
    let bytes_total: u64 = chunks.iter().map(|c| u64::from(c.uncompressed_len)).sum();
    progress.send_modify(|p| {
        p.state = PrefetchState::Running;
        p.chunks_total = chunks.len() as u64;
        p.bytes_total = bytes_total;
        p.chunks_done = 0;
        p.bytes_done = 0;
    });
    if bytes_total > cache.capacity() {
        return finish(
            progress,
            Outcome::Failed(format!(
                "the plan needs {bytes_total} bytes of cache; the cache holds at most {}",
                cache.capacity()
            )),
        );
    }
    let batch_bytes = fetcher.config().max_coalesce_bytes.max(1);
    let in_flight = fetcher.config().max_prefetch_in_flight.max(1);
    let batches = batches(&chunks, batch_bytes);
    let mut results = stream::iter(batches)
        .map(|batch| async move { warm_batch(fetcher, batch).await })
        .buffered(in_flight);
    loop {
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return finish(progress, Outcome::Cancelled),
            next = results.next() => next,
        };
        match next {
            None => break,
            Some(Ok(batch)) => progress.send_modify(|p| {
                p.chunks_done += batch.len() as u64;
                p.bytes_done += batch
                    .iter()
                    .map(|c| u64::from(c.uncompressed_len))
                    .sum::<u64>();
            }),
            Some(Err(reason)) => return finish(progress, Outcome::Failed(reason)),
        }
    }
    // Later batches may have pushed earlier chunks out of a nearly full cache.
    if let Some(gone) = chunks.iter().find(|c| !cache.contains(&c.digest)) {
        return finish(
            progress,
            Outcome::Failed(format!(
                "chunk {} was evicted from the cache before the plan finished (cache too small for the plan and the images in use)",
                gone.digest
            )),
        );
    }
    // The caller publishes `Done` once it has finished with the chunks.
    Outcome::Done
}

/// Fetches one batch and makes sure each of its chunks is cached: a chunk
/// someone else was fetching is waited for.
async fn warm_batch(
    fetcher: &Fetcher,
    batch: Vec<ChunkLocation>,
) -> Result<Vec<ChunkLocation>, String> {
    fetcher
        .prefetch(&batch)
        .await
        .map_err(|e| with_causes(&e))?;
    let cache = fetcher.cache();
    let missing: Vec<ChunkLocation> = batch
        .iter()
        .filter(|c| !cache.contains(&c.digest))
        .copied()
        .collect();
    if !missing.is_empty() {
        fetcher
            .fetch_chunks(&missing, Priority::Prefetch)
            .await
            .map_err(|e| with_causes(&e))?;
        if let Some(lost) = missing.iter().find(|c| !cache.contains(&c.digest)) {
            return Err(format!(
                "chunk {} was verified but the cache did not keep it (cache disk full?)",
                lost.digest
            ));
        }
    }
    Ok(batch)
}

/// `error: cause: cause…`, so the progress says why, not only what failed.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn finish(progress: &watch::Sender<Progress>, outcome: Outcome) -> Outcome {
    progress.send_modify(|p| {
        let (state, error) = match &outcome {
            Outcome::Done => (PrefetchState::Done, None),
            Outcome::Failed(reason) => (PrefetchState::Failed, Some(reason.clone())),
            Outcome::Cancelled => (PrefetchState::Cancelled, None),
        };
        p.state = state;
        p.error = error;
    });
    outcome
}

/// Consecutive runs of `chunks` of at most `max_compressed` compressed bytes
/// (at least one chunk each).
fn batches(chunks: &[ChunkLocation], max_compressed: u64) -> Vec<Vec<ChunkLocation>> {
    let mut out: Vec<Vec<ChunkLocation>> = Vec::new();
    let mut bytes = 0u64;
    for chunk in chunks {
        let len = u64::from(chunk.compressed_len);
        match out.last_mut() {
            Some(batch) if bytes + len <= max_compressed => {
                batch.push(*chunk);
                bytes += len;
            }
            _ => {
                out.push(vec![*chunk]);
                bytes = len;
            }
        }
    }
    out
}

fn distinct(chunks: impl Iterator<Item = ChunkLocation>) -> Vec<ChunkLocation> {
    let mut seen = HashSet::new();
    chunks.filter(|c| seen.insert(c.digest)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, compressed_len: u32) -> ChunkLocation {
        ChunkLocation {
            digest: Digest::of(&[n]),
            blob: Digest::of(b"blob"),
            compressed_offset: 0,
            compressed_len,
            uncompressed_len: compressed_len * 2,
        }
    }

    #[test]
    fn batches_keep_plan_order_and_stay_under_the_size() {
        let chunks: Vec<_> = (0..7).map(|n| chunk(n, 40)).collect();
        let got: Vec<Vec<u8>> = batches(&chunks, 100)
            .iter()
            .map(|b| {
                b.iter()
                    .map(|c| chunks.iter().position(|x| x == c).unwrap() as u8)
                    .collect()
            })
            .collect();
        assert_eq!(got, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]);
        // A chunk larger than the batch size gets a batch of its own.
        assert_eq!(batches(&[chunk(1, 500), chunk(2, 1)], 100).len(), 2);
    }

    #[test]
    fn repeated_chunks_count_once() {
        let chunks = vec![chunk(1, 10), chunk(2, 10), chunk(1, 10)];
        assert_eq!(distinct(chunks.into_iter()).len(), 2);
    }
}
