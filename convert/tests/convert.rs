//! The converter against a real registry (Debian's docker-registry) with images
//! the test builds itself, checked against an independent extraction (umoci).

mod common;

use std::collections::HashSet;

use common::*;
use stoker_convert::{ConvertOptions, ImageStore, convert, find_artifact, load_index};
use stoker_format::{Chunking, Digest, Index};
use stoker_testkit::image::{self, StandardImageSizes, large_file_versions, malicious_layers};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::tree::TreeSnapshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_image_converts_to_exactly_what_umoci_unpacks() {
    if !have_registry_tools("standard_image_converts_to_exactly_what_umoci_unpacks")
        || !stoker_testkit::require_tool(
            "standard_image_converts_to_exactly_what_umoci_unpacks",
            "umoci",
        )
    {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    image::standard_test_image_with(StandardImageSizes::FULL)
        .write_layout(&layout, "v1")
        .expect("layout");
    let reference = push(&layout, "v1", &registry, "test/standard");

    let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();
    let reports = convert(&store, &selector, &ConvertOptions::default())
        .await
        .expect("convert");
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert!(
        report.summary.regular_files > 10_000,
        "{:?}",
        report.summary
    );
    assert!(
        report.packing.zero_bytes >= 90 << 20,
        "the sparse file is stored as holes"
    );

    let found = find_artifact(&store, &selector, None)
        .await
        .expect("artifact");
    assert_eq!(found.artifact.to_string(), report.artifact);
    let index = load_index(&store, &found).await.expect("index");
    let blobs = all_blobs(&store, &index).await;
    let converted = snapshot_of_index(&index, &blobs);

    let rootfs =
        image::unpack_reference(&layout, "v1", &work.path().join("bundle")).expect("umoci");
    let reference_tree = TreeSnapshot::capture(&rootfs).expect("capture");
    reference_tree.assert_same(&converted, 40);

    // Reproducible: the same input gives the same artifact, and no second referrer.
    let again = convert(&store, &selector, &ConvertOptions::default())
        .await
        .expect("convert again");
    assert_eq!(again[0].artifact, report.artifact);
    assert_eq!(again[0].index_digest, report.index_digest);
    let subject = Digest::parse(&report.source_manifest).unwrap();
    assert_eq!(store.referrers(&subject).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_reuse_chunks_fixed_and_cdc() {
    if !have_registry_tools("new_versions_reuse_chunks_fixed_and_cdc") {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let file_size = 48 << 20;
    let versions = large_file_versions(file_size);
    versions.base.write_layout(&layout, "base").unwrap();
    versions
        .changed_in_place
        .write_layout(&layout, "changed")
        .unwrap();
    versions.inserted.write_layout(&layout, "inserted").unwrap();
    for tag in ["base", "changed", "inserted"] {
        push(&layout, tag, &registry, "test/model");
    }

    let large_file_chunks = |index: &Index| -> Vec<Digest> {
        let id = index
            .resolve(stoker_testkit::image::LargeFileVersions::PATH.as_bytes())
            .unwrap();
        index
            .file_chunks(id)
            .map(|c| index.chunk(c.chunk).unwrap().digest)
            .collect()
    };
    let chunks_of = |tag: &str, chunking: Chunking| {
        let reference = format!("{}/test/model:{tag}", registry.host());
        async move {
            let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();
            let options = ConvertOptions {
                chunking,
                ..ConvertOptions::default()
            };
            convert(&store, &selector, &options).await.expect("convert");
            let found = find_artifact(&store, &selector, None).await.unwrap();
            large_file_chunks(&load_index(&store, &found).await.unwrap())
        }
    };
    let shared = |a: &[Digest], b: &[Digest]| {
        let a: HashSet<_> = a.iter().collect();
        b.iter().filter(|d| a.contains(d)).count()
    };

    // Fixed 1 MiB chunks: a 4 KiB change in place touches one chunk.
    let fixed = Chunking::Fixed { size: 1 << 20 };
    let base = chunks_of("base", fixed).await;
    let changed = chunks_of("changed", fixed).await;
    assert_eq!(base.len(), 48);
    assert_eq!(changed.len(), 48);
    assert_eq!(
        shared(&base, &changed),
        47,
        "exactly the changed chunk is new"
    );

    // A 1-byte insertion shifts every later fixed chunk, but CDC resynchronises.
    let inserted_fixed = chunks_of("inserted", fixed).await;
    let first_third = (versions.insert_offset >> 20) as usize;
    assert_eq!(
        shared(&base, &inserted_fixed),
        first_third,
        "fixed chunks after the insertion all change"
    );

    let cdc = Chunking::Cdc { avg_size: 1 << 20 };
    let (base_cdc, inserted_cdc) = (
        chunks_of("base", cdc).await,
        chunks_of("inserted", cdc).await,
    );
    let new_chunks = inserted_cdc.len() - shared(&base_cdc, &inserted_cdc);
    assert!(
        new_chunks <= 2,
        "CDC: {new_chunks} new chunks of {} after a 1-byte insertion",
        inserted_cdc.len()
    );
    assert!(
        base_cdc.len() > 20,
        "CDC cut the file into {} chunks",
        base_cdc.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_layers_are_rejected_with_layer_entry_and_reason() {
    if !have_registry_tools("bad_layers_are_rejected_with_layer_entry_and_reason") {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    for bad in malicious_layers() {
        let layout = work.path().join(bad.name);
        let written = bad.image.write_layout(&layout, "bad").unwrap();
        let (store, selector) = if bad.pushable {
            let reference = push(
                &layout,
                "bad",
                &registry,
                &format!("test/{}", bad.name.replace('_', "-")),
            );
            ImageStore::registry(plain_client(), &reference).unwrap()
        } else {
            let layout = stoker_convert::layout::OciLayout::open(&layout).unwrap();
            (ImageStore::Layout(layout), "bad".to_string())
        };
        let err = convert(&store, &selector, &ConvertOptions::default())
            .await
            .expect_err(bad.name)
            .to_string();
        let layer_digest = &written.layers[bad.bad_layer].blob.digest;
        assert!(
            err.contains(layer_digest.as_str()),
            "{}: error does not name layer {layer_digest}: {err}",
            bad.name
        );
        if let Some(entry) = bad.bad_entry {
            let entry = String::from_utf8_lossy(entry);
            assert!(
                err.contains(entry.trim_start_matches('/')),
                "{}: error does not name entry {entry}: {err}",
                bad.name
            );
        }
        assert!(
            matches!(
                find_artifact(&store, &selector, None).await,
                Err(stoker_convert::ConvertError::NoArtifact(_))
            ),
            "{}: a failed conversion left an artifact",
            bad.name
        );
        eprintln!("{}: {err}", bad.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_platform_of_an_index_is_converted() {
    if !have_registry_tools("every_platform_of_an_index_is_converted") {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let written =
        image::write_multi_platform_layout(&layout, "multi", &image::multi_platform_images())
            .unwrap();
    let reference = push(&layout, "multi", &registry, "test/multi");
    let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();

    let reports = convert(&store, &selector, &ConvertOptions::default())
        .await
        .unwrap();
    assert_eq!(reports.len(), written.images.len());
    for (report, image) in reports.iter().zip(&written.images) {
        assert_eq!(report.source_manifest, image.manifest.digest);
    }
    let arm = find_artifact(&store, &selector, Some("linux/arm64"))
        .await
        .unwrap();
    assert_eq!(arm.platform.as_deref(), Some("linux/arm64"));

    let only = ConvertOptions {
        platforms: vec!["linux/amd64".into()],
        ..ConvertOptions::default()
    };
    let reports = convert(&store, &selector, &only).await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].platform.as_deref(), Some("linux/amd64"));
}

/// Blobs the registry has committed (its filesystem storage), by digest.
fn committed_blobs(registry: &TestRegistry) -> HashSet<String> {
    let root = registry
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256");
    let mut found = HashSet::new();
    for prefix in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for blob in std::fs::read_dir(prefix.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if blob.path().join("data").is_file() {
                found.insert(blob.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_conversion_commits_no_partial_blob() {
    if !have_registry_tools("a_failed_conversion_commits_no_partial_blob") {
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    // Layer 1 streams several upload pieces of file data before its bad entry.
    image::ImageBuilder::new()
        .layer(vec![
            image::Entry::dir("etc"),
            image::Entry::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ])
        .layer(vec![
            image::Entry::generated_file("big", image::Generator::random(24 << 20, 5)),
            image::Entry::file("../escaped", "evil"),
        ])
        .write_layout(&layout, "bad")
        .expect("layout");
    let reference = push(&layout, "bad", &registry, "test/partial");
    let before = committed_blobs(&registry);

    let (store, selector) = ImageStore::registry(plain_client(), &reference).unwrap();
    let err = convert(&store, &selector, &ConvertOptions::default())
        .await
        .expect_err("a layer with ../ must fail")
        .to_string();
    assert!(err.contains("../escaped"), "{err}");

    // Only layer 0's data blob was completed; layer 1's upload was abandoned.
    let added: Vec<String> = committed_blobs(&registry)
        .difference(&before)
        .cloned()
        .collect();
    assert_eq!(
        added.len(),
        1,
        "blobs committed by the failed conversion: {added:?}"
    );
    assert!(matches!(
        find_artifact(&store, &selector, None).await,
        Err(stoker_convert::ConvertError::NoArtifact(_))
    ));
}
