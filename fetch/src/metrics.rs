//! Fetch metrics: OpenTelemetry instruments on the global meter `"stoker"` (the
//! binaries export them to Prometheus), mirrored in plain atomics
//! ([`FetchStats`]) that tests and `stoker mount -v` can read directly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};

use crate::Priority;

/// A snapshot of the fetcher's counters since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Ranged reads sent to the source (retries included).
    pub requests: u64,
    /// Compressed bytes received from the source.
    pub bytes_fetched: u64,
    /// Chunks fetched from the source that passed verification.
    pub chunks_fetched: u64,
    /// Wanted chunks found in the cache.
    pub cache_hits: u64,
    /// Wanted chunks not in the cache.
    pub cache_misses: u64,
    /// Times a request for a chunk joined a fetch already under way (single-flight).
    pub flight_joins: u64,
    /// Chunks from the source that failed decompression or their digest check
    /// (each failed attempt counts; a chunk that fails twice counts twice).
    pub verification_failures: u64,
    /// Verified chunks that could not be cached because the cache disk was full.
    pub disk_full_events: u64,
    /// Ranged reads under way right now.
    pub in_flight: u64,
}

#[derive(Default)]
struct Atomics {
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    chunks_fetched: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    flight_joins: AtomicU64,
    verification_failures: AtomicU64,
    disk_full_events: AtomicU64,
    in_flight: AtomicU64,
}

pub(crate) struct Metrics {
    stats: Atomics,
    requests: Counter<u64>,
    bytes_fetched: Counter<u64>,
    chunks_fetched: Counter<u64>,
    cache_hits: Counter<u64>,
    cache_misses: Counter<u64>,
    verification_failures: Counter<u64>,
    disk_full_events: Counter<u64>,
    in_flight: UpDownCounter<i64>,
    fetch_duration: Histogram<f64>,
}

/// Latency buckets in seconds: loopback reads land in the first ones, a
/// struggling registry with retries in the last.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Builds the instruments on the current global meter provider, so the binary
    /// must install its provider before building a `Fetcher`.
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("stoker");
        Metrics {
            stats: Atomics::default(),
            requests: meter
                .u64_counter("stoker.fetch.requests")
                .with_description("Ranged blob reads sent to the registry")
                .build(),
            bytes_fetched: meter
                .u64_counter("stoker.fetch.bytes")
                .with_unit("By")
                .with_description("Compressed bytes received from the registry")
                .build(),
            chunks_fetched: meter
                .u64_counter("stoker.fetch.chunks")
                .with_description("Chunks fetched from the registry and verified")
                .build(),
            cache_hits: meter
                .u64_counter("stoker.fetch.cache_hits")
                .with_description("Wanted chunks found in the chunk cache")
                .build(),
            cache_misses: meter
                .u64_counter("stoker.fetch.cache_misses")
                .with_description("Wanted chunks not in the chunk cache")
                .build(),
            verification_failures: meter
                .u64_counter("stoker.fetch.verification_failures")
                .with_description("Chunks that failed decompression or their sha256 check")
                .build(),
            disk_full_events: meter
                .u64_counter("stoker.cache.disk_full")
                .with_description("Verified chunks not cached because the cache disk was full")
                .build(),
            in_flight: meter
                .i64_up_down_counter("stoker.fetch.in_flight")
                .with_description("Ranged blob reads under way")
                .build(),
            fetch_duration: meter
                .f64_histogram("stoker.fetch.duration")
                .with_unit("s")
                .with_description("Time to complete one ranged blob read")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
        }
    }

    pub fn snapshot(&self) -> FetchStats {
        let s = &self.stats;
        FetchStats {
            requests: s.requests.load(Ordering::Relaxed),
            bytes_fetched: s.bytes_fetched.load(Ordering::Relaxed),
            chunks_fetched: s.chunks_fetched.load(Ordering::Relaxed),
            cache_hits: s.cache_hits.load(Ordering::Relaxed),
            cache_misses: s.cache_misses.load(Ordering::Relaxed),
            flight_joins: s.flight_joins.load(Ordering::Relaxed),
            verification_failures: s.verification_failures.load(Ordering::Relaxed),
            disk_full_events: s.disk_full_events.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
        }
    }

    pub fn cache_lookups(&self, hits: u64, misses: u64) {
        self.stats.cache_hits.fetch_add(hits, Ordering::Relaxed);
        self.stats.cache_misses.fetch_add(misses, Ordering::Relaxed);
        self.cache_hits.add(hits, &[]);
        self.cache_misses.add(misses, &[]);
    }

    pub fn flight_joins(&self, joins: u64) {
        self.stats.flight_joins.fetch_add(joins, Ordering::Relaxed);
    }

    /// Marks a ranged read as started; the guard marks it finished.
    pub fn request_started(&self) -> InFlight<'_> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight.add(1, &[]);
        InFlight(self)
    }

    pub fn request_finished(&self, priority: Priority, elapsed: Duration, bytes: Option<u64>) {
        let attributes = [
            KeyValue::new("priority", priority.as_str()),
            KeyValue::new("outcome", if bytes.is_some() { "ok" } else { "error" }),
        ];
        self.requests.add(1, &attributes);
        self.fetch_duration
            .record(elapsed.as_secs_f64(), &attributes);
        if let Some(bytes) = bytes {
            self.stats.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
            self.bytes_fetched.add(bytes, &attributes[..1]);
        }
    }

    pub fn chunk_fetched(&self) {
        self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        self.chunks_fetched.add(1, &[]);
    }

    pub fn verification_failed(&self) {
        self.stats
            .verification_failures
            .fetch_add(1, Ordering::Relaxed);
        self.verification_failures.add(1, &[]);
    }

    pub fn disk_full(&self) {
        self.stats.disk_full_events.fetch_add(1, Ordering::Relaxed);
        self.disk_full_events.add(1, &[]);
    }
}

/// A ranged read under way; dropping it decrements the in-flight gauge.
pub(crate) struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.in_flight.add(-1, &[]);
    }
}
