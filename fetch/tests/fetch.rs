//! Fetcher behaviour against an in-memory blob source that counts, delays,
//! corrupts and fails requests on command, with a real on-disk cache.

use std::collections::HashMap;
use std::ops::Range;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, join_all};
use stoker_cache::ChunkCache;
use stoker_fetch::{
    BlobSource, ChunkData, ChunkLocation, Digest, FetchConfig, FetchError, FetchSourceError,
    Fetcher, Priority,
};
use tokio::sync::Semaphore;

mod common;

use common::{TestBlob, make_blob};

// ---------------------------------------------------------------------------
// The fake source

#[derive(Default)]
struct FakeSource {
    blobs: Mutex<HashMap<Digest, Bytes>>,
    log: Mutex<Vec<(Digest, Range<u64>)>>,
    /// Flip the byte at this blob offset in the next `n` responses covering it.
    flip: Mutex<Option<(Digest, u64, usize)>>,
    fail: Mutex<Option<FetchSourceError>>,
    /// Requests for a gated blob wait until its gate is opened.
    gates: Mutex<HashMap<Digest, Arc<Semaphore>>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl FakeSource {
    fn add(&self, blob: &TestBlob) {
        self.blobs
            .lock()
            .unwrap()
            .insert(blob.digest, blob.bytes.clone());
    }

    fn requests(&self) -> Vec<(Digest, Range<u64>)> {
        self.log.lock().unwrap().clone()
    }

    fn requests_for(&self, blob: &Digest) -> usize {
        self.requests().iter().filter(|(b, _)| b == blob).count()
    }

    fn flip(&self, blob: &Digest, offset: u64, times: usize) {
        *self.flip.lock().unwrap() = Some((*blob, offset, times));
    }

    fn close_gate(&self, blob: &Digest) {
        self.gates
            .lock()
            .unwrap()
            .insert(*blob, Arc::new(Semaphore::new(0)));
    }

    fn open_gate(&self, blob: &Digest) {
        if let Some(gate) = self.gates.lock().unwrap().get(blob) {
            gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    async fn serve(&self, blob: &Digest, range: Range<u64>) -> Result<Bytes, FetchSourceError> {
        self.log.lock().unwrap().push((*blob, range.clone()));
        let gate = self.gates.lock().unwrap().get(blob).cloned();
        if let Some(gate) = gate {
            let _pass = gate.acquire().await;
        }
        // Give other tasks a chance to run while this request is "on the wire".
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        if let Some(error) = self.fail.lock().unwrap().clone() {
            return Err(error);
        }
        let data = self
            .blobs
            .lock()
            .unwrap()
            .get(blob)
            .cloned()
            .ok_or_else(|| FetchSourceError::new("blob unknown", false))?;
        let (start, end) = (range.start as usize, range.end as usize);
        if end > data.len() {
            return Err(FetchSourceError::new("range not satisfiable", false));
        }
        let mut body = data.slice(start..end).to_vec();
        let mut flip = self.flip.lock().unwrap();
        if let Some((flip_blob, offset, times)) = flip.as_mut()
            && *flip_blob == *blob
            && *times > 0
            && range.contains(offset)
        {
            body[(*offset - range.start) as usize] ^= 0x55;
            *times -= 1;
        }
        Ok(Bytes::from(body))
    }
}

/// Shares one `FakeSource` between the test and the fetcher.
struct SharedSource(Arc<FakeSource>);

impl BlobSource for SharedSource {
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        Box::pin(async move {
            let source = &self.0;
            let now = source.active.fetch_add(1, Ordering::SeqCst) + 1;
            source.max_active.fetch_max(now, Ordering::SeqCst);
            let result = source.serve(blob, range).await;
            source.active.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    source: Arc<FakeSource>,
    fetcher: Fetcher,
}

fn fixture(config: FetchConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    fixture_with_cache(dir, cache, config)
}

fn fixture_with_cache(dir: tempfile::TempDir, cache: ChunkCache, config: FetchConfig) -> Fixture {
    let source = Arc::new(FakeSource::default());
    let fetcher = Fetcher::new(Arc::new(SharedSource(Arc::clone(&source))), cache, config);
    Fixture {
        _dir: dir,
        source,
        fetcher,
    }
}

fn bytes_of(data: &ChunkData) -> Vec<u8> {
    data.to_bytes().unwrap().to_vec()
}

/// Polls `condition` until it holds, failing the test after a generous deadline.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_miss_is_fetched_verified_cached_and_then_hit() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(1, 3, 10_000, 0);
    f.source.add(&blob);

    let first = f.fetcher.get_chunk(&blob.locs[1]).await.unwrap();
    assert!(matches!(first, ChunkData::Fetched(_)));
    assert_eq!(bytes_of(&first), blob.chunks[1]);
    assert!(f.fetcher.cache().contains(&blob.locs[1].digest));

    let second = f.fetcher.get_chunk(&blob.locs[1]).await.unwrap();
    assert!(matches!(second, ChunkData::Cached(_)));
    assert_eq!(bytes_of(&second), blob.chunks[1]);
    let mut buf = [0u8; 10];
    assert_eq!(second.read_at(9_995, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], &blob.chunks[1][9_995..]);

    let stats = f.fetcher.stats();
    assert_eq!(stats.requests, 1);
    assert_eq!((stats.cache_hits, stats.cache_misses), (1, 1));
    assert_eq!(stats.chunks_fetched, 1);
    assert_eq!(stats.bytes_fetched, u64::from(blob.locs[1].compressed_len));
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test]
async fn a_chunk_cached_for_one_image_serves_another() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(2, 1, 5_000, 0);
    f.source.add(&blob);
    f.fetcher.get_chunk(&blob.locs[0]).await.unwrap();

    // The same chunk in another image's blob (which the source does not even have).
    let elsewhere = ChunkLocation {
        blob: Digest::of(b"another image's blob"),
        compressed_offset: 12_345,
        ..blob.locs[0]
    };
    let data = f.fetcher.get_chunk(&elsewhere).await.unwrap();
    assert_eq!(bytes_of(&data), blob.chunks[0]);
    assert_eq!(f.source.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_readers_fetch_each_chunk_once() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(3, 10, 20_000, 0);
    f.source.add(&blob);
    f.source.close_gate(&blob.digest);

    let readers: Vec<_> = (0..8usize)
        .map(|reader| {
            let fetcher = f.fetcher.clone();
            let locs = blob.locs.clone();
            tokio::spawn(async move {
                // Each reader asks for every chunk separately, starting at a different one.
                let reads = (0..locs.len()).map(|i| {
                    let loc = locs[(i + reader) % locs.len()];
                    let fetcher = fetcher.clone();
                    async move { (loc, fetcher.get_chunk(&loc).await) }
                });
                join_all(reads).await
            })
        })
        .collect();

    // All 80 requests are waiting: 10 lead a fetch, 70 joined one.
    eventually("all readers joined a flight", || {
        f.fetcher.stats().flight_joins == 70
    })
    .await;
    f.source.open_gate(&blob.digest);

    for reader in readers {
        for (loc, result) in reader.await.unwrap() {
            let index = blob.locs.iter().position(|l| *l == loc).unwrap();
            assert_eq!(bytes_of(&result.unwrap()), blob.chunks[index]);
        }
    }
    let requests = f.source.requests();
    assert_eq!(requests.len(), 10, "one request per chunk: {requests:?}");
    for loc in &blob.locs {
        let times = requests
            .iter()
            .filter(|(_, range)| *range == loc.compressed_range())
            .count();
        assert_eq!(times, 1);
    }
    assert_eq!(f.fetcher.stats().chunks_fetched, 10);
}

#[tokio::test]
async fn a_large_read_of_adjacent_chunks_is_one_request() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(4, 10, 30_000, 0);
    f.source.add(&blob);

    // In file order, with one chunk repeated (a file may contain a chunk twice).
    let mut wanted = blob.locs.clone();
    wanted.push(blob.locs[0]);
    let chunks = f
        .fetcher
        .fetch_chunks(&wanted, Priority::OnDemand)
        .await
        .unwrap();
    assert_eq!(chunks.len(), 11);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(bytes_of(chunk), blob.chunks[i % 10]);
    }
    assert_eq!(
        f.source.requests(),
        vec![(blob.digest, 0..blob.bytes.len() as u64)]
    );
}

#[tokio::test]
async fn coalescing_respects_the_size_limit_and_gap_threshold() {
    let blob = make_blob(5, 10, 30_000, 100);
    let chunk_span = blob.locs[1].compressed_offset; // one chunk plus one gap

    // Gaps of 100 bytes are bridged; the size limit allows about three chunks.
    let f = fixture(FetchConfig {
        max_coalesce_bytes: 3 * chunk_span,
        max_gap_bytes: 100,
        ..FetchConfig::default()
    });
    f.source.add(&blob);
    f.fetcher
        .fetch_chunks(&blob.locs, Priority::OnDemand)
        .await
        .unwrap();
    let requests = f.source.requests();
    assert!(requests.len() >= 4 && requests.len() <= 5, "{requests:?}");
    for (_, range) in &requests {
        assert!(range.end - range.start <= 3 * chunk_span);
    }
    let covered: u64 = requests.iter().map(|(_, r)| r.end - r.start).sum();
    assert!(covered <= blob.bytes.len() as u64);

    // Gaps larger than the threshold are not bridged.
    let f = fixture(FetchConfig {
        max_gap_bytes: 99,
        ..FetchConfig::default()
    });
    f.source.add(&blob);
    f.fetcher
        .fetch_chunks(&blob.locs[..3], Priority::OnDemand)
        .await
        .unwrap();
    assert_eq!(f.source.requests().len(), 3);
}

#[tokio::test]
async fn a_source_that_keeps_flipping_bytes_gets_a_verification_error() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(6, 10, 20_000, 0);
    f.source.add(&blob);
    let bad = blob.locs[3];
    f.source
        .flip(&blob.digest, bad.compressed_offset + 10, usize::MAX);

    let err = f
        .fetcher
        .fetch_chunks(&blob.locs, Priority::OnDemand)
        .await
        .unwrap_err();
    match &err {
        FetchError::Verification {
            digest,
            blob: b,
            compressed_offset,
            ..
        } => {
            assert_eq!(*digest, bad.digest);
            assert_eq!(*b, blob.digest);
            assert_eq!(*compressed_offset, bad.compressed_offset);
        }
        other => panic!("expected a verification error, got {other}"),
    }
    assert!(!err.is_transient());
    let stats = f.fetcher.stats();
    assert_eq!(stats.verification_failures, 2, "first try and the retry");
    assert_eq!(stats.requests, 2, "one coalesced read, one retry");
    assert!(
        !f.fetcher.cache().contains(&bad.digest),
        "bad bytes never cached"
    );
    // The good chunks of the same response were served and cached.
    for (i, loc) in blob.locs.iter().enumerate() {
        if i != 3 {
            assert!(f.fetcher.cache().contains(&loc.digest));
        }
    }

    // Asked again, it fails again: never wrong bytes.
    let again = f.fetcher.get_chunk(&bad).await.unwrap_err();
    assert!(matches!(again, FetchError::Verification { .. }), "{again}");
    assert_eq!(f.fetcher.stats().verification_failures, 4);
}

#[tokio::test]
async fn a_single_flipped_response_is_retried_and_the_right_bytes_served() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(7, 4, 20_000, 0);
    f.source.add(&blob);
    let target = blob.locs[2];
    f.source.flip(&blob.digest, target.compressed_offset + 3, 1);

    let data = f.fetcher.get_chunk(&target).await.unwrap();
    assert_eq!(bytes_of(&data), blob.chunks[2]);
    let stats = f.fetcher.stats();
    assert_eq!(stats.verification_failures, 1);
    assert_eq!(stats.requests, 2);
    assert!(f.fetcher.cache().contains(&target.digest));
}

#[tokio::test]
async fn a_read_right_after_a_source_failure_gets_the_error_without_a_request() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(8, 2, 10_000, 0);
    f.source.add(&blob);
    *f.source.fail.lock().unwrap() = Some(FetchSourceError::new("registry down", true));
    let err = f.fetcher.get_chunk(&blob.locs[0]).await.unwrap_err();
    assert!(matches!(err, FetchError::Source { .. }), "{err}");
    assert_eq!(f.source.requests().len(), 1);

    // The kernel's immediate retry of the page: same error, no second wait.
    *f.source.fail.lock().unwrap() = None;
    let again = f.fetcher.get_chunk(&blob.locs[0]).await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(f.source.requests().len(), 1, "no request for the retry");
    // Other chunks are not affected.
    let other = f.fetcher.get_chunk(&blob.locs[1]).await.unwrap();
    assert_eq!(bytes_of(&other), blob.chunks[1]);
}

#[tokio::test]
async fn a_remembered_source_failure_expires_and_the_chunk_is_fetched() {
    let f = fixture(FetchConfig {
        failure_memo: Duration::from_millis(50),
        ..FetchConfig::default()
    });
    let blob = make_blob(8, 1, 10_000, 0);
    f.source.add(&blob);
    *f.source.fail.lock().unwrap() = Some(FetchSourceError::new("registry down", true));
    f.fetcher.get_chunk(&blob.locs[0]).await.unwrap_err();
    *f.source.fail.lock().unwrap() = None;
    let started = Instant::now();
    loop {
        match f.fetcher.get_chunk(&blob.locs[0]).await {
            Ok(data) => {
                assert_eq!(bytes_of(&data), blob.chunks[0]);
                break;
            }
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "still failing: {e}"
                );
                tokio::task::yield_now().await;
            }
        }
    }
    assert_eq!(f.source.requests().len(), 2, "one request after the memo");
}

#[tokio::test]
async fn a_source_error_is_reported_and_the_next_read_recovers() {
    // Without the failure memo, the very next read asks the source again.
    let f = fixture(FetchConfig {
        failure_memo: Duration::ZERO,
        ..FetchConfig::default()
    });
    let blob = make_blob(8, 2, 10_000, 0);
    f.source.add(&blob);
    *f.source.fail.lock().unwrap() = Some(FetchSourceError::new("registry down", true));

    let err = f.fetcher.get_chunk(&blob.locs[0]).await.unwrap_err();
    assert!(matches!(err, FetchError::Source { .. }), "{err}");
    assert!(err.is_transient());
    assert!(!f.fetcher.cache().contains(&blob.locs[0].digest));
    assert_eq!(f.fetcher.stats().verification_failures, 0);

    *f.source.fail.lock().unwrap() = None;
    let data = f.fetcher.get_chunk(&blob.locs[0]).await.unwrap();
    assert_eq!(bytes_of(&data), blob.chunks[0]);
    assert_eq!(f.source.requests().len(), 2);
}

#[tokio::test]
async fn a_corrupted_cache_file_is_dropped_and_fetched_again() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(9, 1, 10_000, 0);
    f.source.add(&blob);
    let loc = blob.locs[0];
    f.fetcher.get_chunk(&loc).await.unwrap();

    let path = f.fetcher.cache().chunk_path(&loc.digest);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[100] ^= 1;
    std::fs::write(&path, on_disk).unwrap();

    // The next process (a fresh cache on the same directory) checks the file: the
    // process that wrote it trusts it.
    let Fixture { _dir: dir, .. } = f;
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let f = fixture_with_cache(dir, cache, FetchConfig::default());
    f.source.add(&blob);
    let data = f.fetcher.get_chunk(&loc).await.unwrap();
    assert_eq!(bytes_of(&data), blob.chunks[0]);
    assert_eq!(f.source.requests().len(), 1, "fetched again");
    assert_eq!(f.fetcher.cache().usage().corrupt_dropped, 1);
    // And the re-cached file is good.
    let cached = f.fetcher.get_chunk(&loc).await.unwrap();
    assert!(matches!(cached, ChunkData::Cached(_)));
    assert_eq!(bytes_of(&cached), blob.chunks[0]);
}

#[tokio::test]
async fn impossible_locations_are_refused_before_any_request() {
    let f = fixture(FetchConfig::default());
    let blob = make_blob(10, 1, 1_000, 0);
    f.source.add(&blob);
    let huge = ChunkLocation {
        uncompressed_len: u32::MAX,
        ..blob.locs[0]
    };
    let err = f.fetcher.get_chunk(&huge).await.unwrap_err();
    assert!(matches!(err, FetchError::BadLocation { .. }), "{err}");
    let overflow = ChunkLocation {
        compressed_offset: u64::MAX,
        ..blob.locs[0]
    };
    assert!(f.fetcher.get_chunk(&overflow).await.is_err());
    assert!(f.source.requests().is_empty());

    // A length that disagrees with the data is a verification failure, not a crash.
    let wrong_len = ChunkLocation {
        uncompressed_len: 999,
        ..blob.locs[0]
    };
    let err = f.fetcher.get_chunk(&wrong_len).await.unwrap_err();
    assert!(matches!(err, FetchError::Verification { .. }), "{err}");
}

#[tokio::test]
async fn prefetch_yields_to_on_demand_reads() {
    let f = fixture(FetchConfig::default());
    let on_demand_a = make_blob(11, 1, 10_000, 0);
    let on_demand_b = make_blob(12, 1, 10_000, 0);
    let planned = make_blob(13, 4, 10_000, 0);
    for blob in [&on_demand_a, &on_demand_b, &planned] {
        f.source.add(blob);
    }
    f.source.close_gate(&on_demand_a.digest);
    f.source.close_gate(&on_demand_b.digest);

    let read_a = tokio::spawn({
        let fetcher = f.fetcher.clone();
        let loc = on_demand_a.locs[0];
        async move { fetcher.get_chunk(&loc).await }
    });
    eventually("read A reaches the registry", || {
        f.source.requests_for(&on_demand_a.digest) == 1
    })
    .await;

    // The prefetch is asked for before read B, but must not go ahead of it.
    let prefetch = tokio::spawn({
        let fetcher = f.fetcher.clone();
        let locs = planned.locs.clone();
        async move { fetcher.prefetch(&locs).await }
    });
    let read_b = tokio::spawn({
        let fetcher = f.fetcher.clone();
        let loc = on_demand_b.locs[0];
        async move { fetcher.get_chunk(&loc).await }
    });
    eventually("read B reaches the registry", || {
        f.source.requests_for(&on_demand_b.digest) == 1
    })
    .await;
    assert_eq!(f.source.requests_for(&planned.digest), 0);

    f.source.open_gate(&on_demand_a.digest);
    read_a.await.unwrap().unwrap();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        f.source.requests_for(&planned.digest),
        0,
        "prefetch waits while read B is still waiting"
    );

    f.source.open_gate(&on_demand_b.digest);
    read_b.await.unwrap().unwrap();
    prefetch.await.unwrap().unwrap();
    let order: Vec<Digest> = f.source.requests().iter().map(|(b, _)| *b).collect();
    assert_eq!(
        order,
        vec![on_demand_a.digest, on_demand_b.digest, planned.digest],
        "prefetch went last, as one coalesced request"
    );
    for loc in &planned.locs {
        assert!(f.fetcher.cache().contains(&loc.digest));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_and_overall_requests_stay_within_their_bounds() {
    let blob = make_blob(14, 30, 8_000, 0);
    let every_other: Vec<ChunkLocation> = blob.locs.iter().step_by(2).copied().collect();

    let f = fixture(FetchConfig {
        max_gap_bytes: 0,
        max_prefetch_in_flight: 3,
        ..FetchConfig::default()
    });
    f.source.add(&blob);
    f.fetcher.prefetch(&every_other).await.unwrap();
    assert_eq!(f.source.requests().len(), 15);
    assert!(f.source.max_active.load(Ordering::SeqCst) <= 3);
    for loc in &every_other {
        assert!(f.fetcher.cache().contains(&loc.digest));
    }
    // A second prefetch of the same plan finds everything cached.
    f.fetcher.prefetch(&every_other).await.unwrap();
    assert_eq!(f.source.requests().len(), 15);

    let f = fixture(FetchConfig {
        max_gap_bytes: 0,
        max_in_flight: 2,
        ..FetchConfig::default()
    });
    f.source.add(&blob);
    f.fetcher
        .fetch_chunks(&every_other, Priority::OnDemand)
        .await
        .unwrap();
    assert_eq!(f.source.requests().len(), 15);
    assert!(f.source.max_active.load(Ordering::SeqCst) <= 2);
}

/// A small tmpfs for the cache, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(TinyFs { dir }),
            other => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs to fill the cache disk (need root): {other:?}"
                );
                None
            }
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_cache_disk_still_serves_verified_chunks() {
    let Some(tiny) = TinyFs::mount("64k") else {
        return;
    };
    let cache = ChunkCache::open(tiny.dir.path(), 1 << 30).unwrap();
    let f = fixture_with_cache(tempfile::tempdir().unwrap(), cache, FetchConfig::default());
    let blob = make_blob(15, 10, 16_384, 0);
    f.source.add(&blob);

    let chunks = f
        .fetcher
        .fetch_chunks(&blob.locs, Priority::OnDemand)
        .await
        .unwrap();
    for (chunk, expected) in chunks.iter().zip(&blob.chunks) {
        assert_eq!(&bytes_of(chunk), expected);
    }
    let stats = f.fetcher.stats();
    assert!(stats.disk_full_events > 0, "{stats:?}");
    assert_eq!(stats.chunks_fetched, 10);
    let cached = blob
        .locs
        .iter()
        .filter(|l| f.fetcher.cache().contains(&l.digest))
        .count() as u64;
    assert_eq!(cached + stats.disk_full_events, 10);
    drop(f);
}
