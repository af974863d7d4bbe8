//! The fetcher against a real registry (Debian's docker-registry on loopback),
//! through the production `RegistrySource`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::make_blob;
use stoker_cache::ChunkCache;
use stoker_fetch::{FetchConfig, FetchError, Fetcher, Priority, RegistrySource};
use stoker_registry::{RegistryClient, RegistryConfig, RetryPolicy, parse_reference};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::require_tool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_come_from_a_real_registry_coalesced_verified_and_survive_an_outage() {
    if !require_tool("fetch from a real registry", "docker-registry") {
        return;
    }
    stoker_registry::install_crypto_provider();
    let mut registry = TestRegistry::start().unwrap();
    let client = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        request_timeout: Duration::from_secs(2),
        read_deadline: Duration::from_secs(3),
        retry: RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
        ..RegistryConfig::default()
    })
    .unwrap();
    let repo = parse_reference(&format!("{}/stoker/fetch-test", registry.host())).unwrap();
    let blob = make_blob(42, 10, 64 * 1024, 0);
    let (pushed, _) = client.push_blob(&repo, blob.bytes.clone()).await.unwrap();
    assert_eq!(pushed, blob.digest);

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).unwrap();
    let source = RegistrySource::new(client, repo);
    // Without the failure memo (tested in fetch.rs), so the read right after the
    // registry is back goes to it.
    let config = FetchConfig {
        failure_memo: std::time::Duration::ZERO,
        ..FetchConfig::default()
    };
    let fetcher = Fetcher::new(Arc::new(source), cache, config);
    registry.clear_requests();

    // A read of 8 adjacent chunks: one ranged GET, exact bytes.
    let chunks = fetcher
        .fetch_chunks(&blob.locs[..8], Priority::OnDemand)
        .await
        .unwrap();
    for (chunk, expected) in chunks.iter().zip(&blob.chunks) {
        assert_eq!(&chunk.to_bytes().unwrap()[..], &expected[..]);
    }
    let wanted_bytes = blob.locs[8].compressed_offset;
    let (logged, seen) = registry.wait_for_requests(Duration::from_secs(10), |requests| {
        requests.iter().any(|r| r.is_blob_get())
    });
    assert!(seen, "the registry logged the blob read: {logged:?}");
    let gets: Vec<_> = logged.iter().filter(|r| r.is_blob_get()).collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].status, 206);
    assert_eq!(gets[0].response_bytes, wanted_bytes);

    // Registry down: a clear, transient error, nothing cached.
    registry.stop();
    let err = fetcher.get_chunk(&blob.locs[8]).await.unwrap_err();
    assert!(matches!(err, FetchError::Source { .. }), "{err}");
    assert!(err.is_transient(), "{err}");
    assert!(!fetcher.cache().contains(&blob.locs[8].digest));

    // Back up: the same read succeeds; earlier chunks are still served from the cache.
    registry.restart().unwrap();
    let data = fetcher.get_chunk(&blob.locs[8]).await.unwrap();
    assert_eq!(&data.to_bytes().unwrap()[..], &blob.chunks[8][..]);
    let stats = fetcher.stats();
    fetcher.get_chunk(&blob.locs[0]).await.unwrap();
    assert_eq!(
        fetcher.stats().requests,
        stats.requests,
        "cache hit, no request"
    );
}
