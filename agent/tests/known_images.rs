//! What a prefetch plan leaves for the pull that follows it (`KnownImages`), with
//! a real registry (docker-registry): the artifact the plan's index was found by
//! answers the snapshotter's resolver exactly as a lookup in the registry would,
//! and only while it is the image's newest artifact, the one a lookup picks.

mod common;

use std::sync::Arc;

use stoker_agent::prefetch::NodeImages;
use stoker_agent::resolver::{KnownImages, RegistryResolver};
use stoker_cache::ChunkCache;
use stoker_fetch::FetchConfig;
use stoker_format::{Chunking, Digest};
use stoker_snapshotter::ImageResolver;
use stoker_testkit::registry::TestRegistry;

/// Converts `reference` again with other chunking: a second, newer artifact
/// with another index. Returns its index digest.
fn convert_again(rt: &tokio::runtime::Runtime, reference: &str) -> Digest {
    let reports = rt
        .block_on(async {
            let (store, selector) =
                stoker_convert::ImageStore::registry(common::plain_http_client(), reference)?;
            let options = stoker_convert::ConvertOptions {
                chunking: Chunking::Fixed { size: 1 << 16 },
                ..stoker_convert::ConvertOptions::default()
            };
            stoker_convert::convert(&store, &selector, &options).await
        })
        .expect("second conversion");
    Digest::parse(&reports[0].index_digest).expect("index digest")
}

#[test]
fn a_plan_leaves_the_artifact_it_found_for_the_pull_only_while_it_is_the_newest() {
    let test = "a_plan_leaves_the_artifact_it_found_for_the_pull_only_while_it_is_the_newest";
    if !common::registry_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = TestRegistry::start().expect("registry");
    let rt = common::runtime();
    let (reference, _) = common::push(
        &registry,
        dir.path(),
        &common::three_layer_image("known"),
        "test/known",
    );
    let first = common::convert(&rt, &reference);
    let old_index = Digest::parse(&first[0].index_digest).expect("index digest");
    let new_index = convert_again(&rt, &reference);
    assert_ne!(old_index, new_index);
    let manifest = rt
        .block_on(async {
            let (store, selector) =
                stoker_convert::ImageStore::registry(common::plain_http_client(), &reference)?;
            stoker_convert::find_artifact(&store, &selector, None).await
        })
        .expect("the image's artifact")
        .image_manifest
        .to_string();

    let known = Arc::new(KnownImages::default());
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
    let images = NodeImages::new(common::plain_http_client(), cache, FetchConfig::default())
        .with_known_images(Arc::clone(&known));

    // A plan for the older artifact's index: the index is kept, but a lookup
    // would pick the newer artifact, so the plan's artifact must not answer it.
    rt.block_on(images.load_index(&reference, &old_index))
        .expect("the older index");
    assert!(known.index(&old_index).is_some());
    assert_eq!(known.artifact(&reference, &manifest), None);

    // A plan for the newest artifact's index: the pull takes its artifact.
    rt.block_on(images.load_index(&reference, &new_index))
        .expect("the newer index");
    let remembered = known
        .artifact(&reference, &manifest)
        .expect("the newest artifact is kept");

    // It is what the registry says, and the resolver answers with it without
    // asking the registry.
    let looked_up = rt
        .block_on(RegistryResolver::new(common::plain_http_client()).resolve(&reference, &manifest))
        .expect("lookup")
        .expect("the image has an artifact");
    assert_eq!(remembered, looked_up);
    assert_eq!(looked_up.index_digest, new_index.to_string());
    registry.clear_requests();
    let answered = rt
        .block_on(
            RegistryResolver::new(common::plain_http_client())
                .with_known_images(Arc::clone(&known))
                .resolve(&reference, &manifest),
        )
        .expect("answer");
    assert_eq!(answered, Some(looked_up));
    assert!(registry.requests().is_empty(), "{:?}", registry.requests());
}
