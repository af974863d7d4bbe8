//! Trace-ordered layout (`stoker convert --plan`) against a real registry: the
//! laid-out image has the same tree and bytes, the plan's chunks are back to back
//! in plan order at the front of the hot blob, warming from the re-bound plan
//! takes far fewer ranged requests, and a plan of another image is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stoker_cache::ChunkCache;
use stoker_convert::{ConvertError, ConvertOptions, ConvertReport, ImageStore, convert};
use stoker_fetch::{FetchConfig, Fetcher, RegistrySource};
use stoker_format::{Chunking, Digest, Index, Plan};
use stoker_testkit::image::{self, Entry, Generator, StandardImageSizes};
use stoker_testkit::registry::TestRegistry;

/// Small chunks, so that a modest image has hundreds of them.
const CHUNKING: Chunking = Chunking::Fixed { size: 64 << 10 };

fn options(plan: Option<Plan>) -> ConvertOptions {
    ConvertOptions {
        chunking: CHUNKING,
        layout_plan: plan,
        ..ConvertOptions::default()
    }
}

/// The standard image (every layer case) plus a layer of large random files, one
/// of which repeats `data/random.bin` of the first layer (deduplicated chunks).
fn test_image(seed: u64) -> image::ImageBuilder {
    image::standard_test_image_with(StandardImageSizes::SMALL).layer(vec![
        Entry::dir("models"),
        Entry::generated_file("models/a.bin", Generator::random(8 << 20, seed)),
        Entry::generated_file("models/b.bin", Generator::random(8 << 20, seed + 1)),
        Entry::generated_file("models/c.bin", Generator::random(6 << 20, seed + 2)),
        // Same generator as the standard image's data/random.bin.
        Entry::generated_file(
            "models/copy.bin",
            Generator::random(StandardImageSizes::SMALL.random_file, 2),
        ),
    ])
}

/// A registry holding the test image, converted once without a plan.
struct Fixture {
    registry: TestRegistry,
    store: ImageStore,
    selector: String,
    normal: ConvertReport,
    normal_index: Index,
    _work: tempfile::TempDir,
}

impl Fixture {
    async fn new(repo: &str, seed: u64) -> Fixture {
        let registry = TestRegistry::start().expect("registry");
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("layout");
        test_image(seed)
            .write_layout(&layout, "v1")
            .expect("layout");
        let reference = push(&layout, "v1", &registry, repo);
        let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();
        let normal = convert(&store, &selector, &options(None))
            .await
            .expect("convert")
            .remove(0);
        let normal_index = index_of(&store, &normal.index_digest).await;
        Fixture {
            registry,
            store,
            selector,
            normal,
            normal_index,
            _work: work,
        }
    }

    /// A plan of every tenth chunk of the normal index, in a scrambled order (as
    /// a trace would be: not the order of the blobs).
    fn scattered_plan(&self) -> Plan {
        let mut chunks: Vec<u32> = (0..self.normal_index.chunk_count()).step_by(10).collect();
        chunks.sort_by_key(|c| c.wrapping_mul(2_654_435_761) % 1009);
        Plan {
            index_digest: Digest::parse(&self.normal.index_digest).unwrap(),
            chunks,
        }
    }

    async fn convert_with(&self, plan: &Plan) -> ConvertReport {
        convert(&self.store, &self.selector, &options(Some(plan.clone())))
            .await
            .expect("convert with plan")
            .remove(0)
    }
}

async fn index_of(store: &ImageStore, digest: &str) -> Index {
    let digest = Digest::parse(digest).unwrap();
    Index::decode_verified(&store.blob(&digest).await.unwrap(), &digest).unwrap()
}

fn plan_digests(index: &Index, plan: &Plan) -> Vec<Digest> {
    plan.chunks
        .iter()
        .map(|&c| index.chunk(c).unwrap().digest)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laid_out_image_has_the_same_tree_and_the_plan_first_in_plan_order() {
    let test = "laid_out_image_has_the_same_tree_and_the_plan_first_in_plan_order";
    if !have_registry_tools(test) {
        return;
    }
    let fixture = Fixture::new("test/layout", 100).await;
    let plan = fixture.scattered_plan();
    assert!(plan.chunks.len() > 50, "{} chunks", plan.chunks.len());
    let report = fixture.convert_with(&plan).await;
    let index = index_of(&fixture.store, &report.index_digest).await;

    // (1) Same tree and bytes as the normal conversion; every chunk verified.
    let normal_blobs = all_blobs(&fixture.store, &fixture.normal_index).await;
    let blobs = all_blobs(&fixture.store, &index).await;
    let normal_tree = snapshot_of_index(&fixture.normal_index, &normal_blobs);
    normal_tree.assert_same(&snapshot_of_index(&index, &blobs), 40);
    assert!(normal_tree.len() > 200);
    for chunk in 0..index.chunk_count() {
        chunk_bytes(&index, &blobs, chunk);
    }
    assert_eq!(index.chunk_count(), fixture.normal_index.chunk_count());

    // The re-bound plan is for the new index and names the same chunks, in order.
    let rebound = report.layout_plan.clone().expect("re-bound plan");
    assert_eq!(rebound.index_digest.to_string(), report.index_digest);
    assert_ne!(report.index_digest, fixture.normal.index_digest);
    assert_eq!(
        plan_digests(&index, &rebound),
        plan_digests(&fixture.normal_index, &plan)
    );
    rebound
        .check_against(&index, &rebound.index_digest)
        .expect("re-bound plan fits its index");

    // (2) Blob 0 is the hot blob: the plan's chunks back to back from offset 0,
    // in plan order, and nothing else.
    let (hot_digest, hot_size) = index.blob(0).unwrap();
    let mut offset = 0u64;
    for &position in &rebound.chunks {
        let chunk = index.chunk(position).unwrap();
        assert_eq!(
            chunk.blob, hot_digest,
            "chunk {position} is in the hot blob"
        );
        assert_eq!(
            chunk.compressed_offset, offset,
            "chunk {position} follows the previous one"
        );
        offset += chunk.compressed_len as u64;
    }
    assert_eq!(
        offset, hot_size,
        "the hot blob holds only the plan's chunks"
    );
    let hot = report.hot_blob.as_ref().expect("hot blob in the report");
    assert_eq!(hot.digest, hot_digest.to_string());
    assert_eq!(hot.chunks, rebound.chunks.len() as u64);
    // The other blobs hold the other chunks (and the few bytes of files the
    // standard image deletes in its second layer, which no index entry names).
    let cold: u64 = index
        .chunks()
        .filter(|c| c.blob != hot_digest)
        .map(|c| c.compressed_len as u64)
        .sum();
    let other_blobs: u64 = (1..index.blob_count())
        .map(|i| index.blob(i).unwrap().1)
        .sum();
    assert!(
        cold <= other_blobs && other_blobs - cold < 4096,
        "{cold} bytes of chunks in {other_blobs} bytes of layer blobs"
    );

    // Nodes take the newest artifact: the laid-out one.
    let found = stoker_convert::find_artifact(&fixture.store, &fixture.selector, None)
        .await
        .unwrap();
    assert_eq!(found.index_digest.to_string(), report.index_digest);
    assert_eq!(found.blobs[0].0, hot_digest);

    // Reproducible: the same plan gives the same artifact.
    let again = fixture.convert_with(&plan).await;
    assert_eq!(again.artifact, report.artifact);
}

/// Warms an empty cache from `plan` with a fetcher over the registry; returns
/// (ranged requests the fetcher sent, blob GETs the registry logged, bytes).
async fn warm(fixture: &Fixture, index: &Index, plan: &Plan) -> (u64, usize, u64) {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
    let ImageStore::Registry { repository, .. } = &fixture.store else {
        unreachable!("the fixture uses a registry");
    };
    let source = Arc::new(RegistrySource::new(plain_client(), repository.clone()));
    let fetcher = Fetcher::new(source, cache.clone(), FetchConfig::default());
    let wanted: Vec<_> = plan
        .chunks
        .iter()
        .map(|&c| index.chunk(c).unwrap())
        .collect();
    fixture.registry.clear_requests();
    fetcher.prefetch(&wanted).await.expect("prefetch");
    for chunk in &wanted {
        assert!(
            cache.contains(&chunk.digest),
            "chunk {} cached",
            chunk.digest
        );
    }
    let stats = fetcher.stats();
    assert_eq!(stats.chunks_fetched, wanted.len() as u64);
    let (logged, complete) = fixture
        .registry
        .wait_for_requests(Duration::from_secs(10), |requests| {
            requests.iter().filter(|r| r.is_blob_get()).count() as u64 >= stats.requests
        });
    assert!(complete, "the registry logged {} requests", logged.len());
    let blob_gets = logged.iter().filter(|r| r.is_blob_get()).count();
    (stats.requests, blob_gets, stats.bytes_fetched)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_the_laid_out_image_takes_far_fewer_ranged_requests() {
    let test = "warming_the_laid_out_image_takes_far_fewer_ranged_requests";
    if !have_registry_tools(test) {
        return;
    }
    let fixture = Fixture::new("test/warm", 200).await;
    let plan = fixture.scattered_plan();
    let report = fixture.convert_with(&plan).await;
    let index = index_of(&fixture.store, &report.index_digest).await;
    let rebound = report.layout_plan.clone().expect("re-bound plan");

    let (normal_requests, normal_gets, normal_bytes) =
        warm(&fixture, &fixture.normal_index, &plan).await;
    let (laid_out_requests, laid_out_gets, laid_out_bytes) = warm(&fixture, &index, &rebound).await;
    eprintln!(
        "warming {} chunks: normal layout {normal_requests} ranged requests ({normal_bytes} bytes), \
         trace-ordered {laid_out_requests} ({laid_out_bytes} bytes)",
        plan.chunks.len()
    );
    assert_eq!(normal_gets as u64, normal_requests);
    assert_eq!(laid_out_gets as u64, laid_out_requests);

    // The hot blob is read in ranges of at most max_coalesce_bytes, back to back.
    let hot_size = index.blob(0).unwrap().1;
    let coalesce = FetchConfig::default().max_coalesce_bytes;
    assert!(
        laid_out_requests <= hot_size.div_ceil(coalesce) + 1,
        "{laid_out_requests} requests for a {hot_size}-byte hot blob"
    );
    assert_eq!(laid_out_bytes, hot_size, "exactly the hot blob is read");
    assert!(
        laid_out_requests * 10 <= normal_requests,
        "trace-ordered {laid_out_requests} vs normal {normal_requests} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_of_another_image_is_refused() {
    let test = "a_plan_of_another_image_is_refused";
    if !have_registry_tools(test) {
        return;
    }
    let fixture = Fixture::new("test/mine", 300).await;
    // Another image (other random files) in the same registry, converted.
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    test_image(400).write_layout(&layout, "v1").unwrap();
    let other_ref = push(&layout, "v1", &fixture.registry, "test/other");
    let (other_store, other_selector) = ImageStore::registry(plain_client(), &other_ref).unwrap();
    let other = convert(&other_store, &other_selector, &options(None))
        .await
        .unwrap()
        .remove(0);
    let subject = Digest::parse(&fixture.normal.source_manifest).unwrap();
    let referrers_before = fixture.store.referrers(&subject).await.unwrap();

    let foreign = Plan {
        index_digest: Digest::parse(&other.index_digest).unwrap(),
        chunks: vec![0, 5, 9],
    };
    let error = convert(&fixture.store, &fixture.selector, &options(Some(foreign)))
        .await
        .expect_err("a plan of another image");
    let message = error.to_string();
    assert!(matches!(error, ConvertError::Plan(_)), "{error:?}");
    assert!(message.contains(&other.index_digest), "{message}");
    assert!(message.contains("another image"), "{message}");
    assert!(message.contains(&fixture.normal.index_digest), "{message}");

    // A plan naming chunks its index does not have.
    let out_of_range = Plan {
        index_digest: Digest::parse(&fixture.normal.index_digest).unwrap(),
        chunks: vec![0, fixture.normal_index.chunk_count() + 7],
    };
    let error = convert(
        &fixture.store,
        &fixture.selector,
        &options(Some(out_of_range)),
    )
    .await
    .expect_err("positions outside the index");
    assert!(error.to_string().contains("names chunk"), "{error}");

    // A plan cut with another chunking cannot be laid out.
    let other_chunking = ConvertOptions {
        chunking: Chunking::Fixed { size: 1 << 20 },
        layout_plan: Some(fixture.scattered_plan()),
        ..ConvertOptions::default()
    };
    let error = convert(&fixture.store, &fixture.selector, &other_chunking)
        .await
        .expect_err("other chunking");
    assert!(error.to_string().contains("--chunk-size"), "{error}");

    // Nothing was attached to the image.
    assert_eq!(
        fixture.store.referrers(&subject).await.unwrap(),
        referrers_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_platform_the_plan_belongs_to_is_laid_out() {
    let test = "only_the_platform_the_plan_belongs_to_is_laid_out";
    if !have_registry_tools(test) {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    image::write_multi_platform_layout(&layout, "multi", &image::multi_platform_images()).unwrap();
    let reference = push(&layout, "multi", &registry, "test/multi-layout");
    let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();
    let reports = convert(&store, &selector, &options(None)).await.unwrap();
    assert!(reports.len() >= 2);
    let arm = reports
        .iter()
        .find(|r| r.platform.as_deref() == Some("linux/arm64"))
        .expect("an arm64 platform");
    let arm_index = index_of(&store, &arm.index_digest).await;
    let plan = Plan {
        index_digest: Digest::parse(&arm.index_digest).unwrap(),
        chunks: (0..arm_index.chunk_count()).rev().collect(),
    };

    let laid_out = convert(&store, &selector, &options(Some(plan.clone())))
        .await
        .expect("convert with the arm64 plan");
    assert_eq!(laid_out.len(), 1, "only the plan's platform is converted");
    assert_eq!(laid_out[0].platform.as_deref(), Some("linux/arm64"));
    assert_eq!(laid_out[0].source_manifest, arm.source_manifest);
    let index = index_of(&store, &laid_out[0].index_digest).await;
    let rebound = laid_out[0].layout_plan.clone().unwrap();
    assert_eq!(
        plan_digests(&index, &rebound),
        plan_digests(&arm_index, &plan)
    );
    // The whole image is the plan here: one blob, in reverse table order.
    assert_eq!(index.blob_count(), 1);
    let blobs = all_blobs(&store, &index).await;
    snapshot_of_index(&arm_index, &all_blobs(&store, &arm_index).await)
        .assert_same(&snapshot_of_index(&index, &blobs), 40);
    // Other platforms keep their one artifact.
    for report in reports.iter().filter(|r| r.platform != arm.platform) {
        let subject = Digest::parse(&report.source_manifest).unwrap();
        assert_eq!(store.referrers(&subject).await.unwrap().len(), 1);
    }
}
