//! Images built by the testkit unpack (with umoci) to exactly the tree the builder expects,
//! and push to the test registry with skopeo.

use stoker_testkit::image::{
    Compression, LargeFileVersions, MEDIA_TYPE_INDEX, StandardImageSizes, blob_path,
    large_file_versions, multi_platform_images, paths, standard_test_image_with, unpack_reference,
    write_multi_platform_layout,
};
use stoker_testkit::tree::{FileKind, TreeSnapshot};
use stoker_testkit::{require_root, require_tool};

/// The special cases of the standard image are really in `tree` (so that a comparison
/// cannot pass because both sides lost them).
fn assert_standard_cases(tree: &TreeSnapshot, sizes: StandardImageSizes) {
    let kind = |path: &[u8]| tree.get(path).map(|e| e.kind);
    assert_eq!(kind(b"dev/null"), Some(FileKind::CharDevice));
    assert_eq!(tree.get("dev/null").and_then(|e| e.rdev), Some((1, 3)));
    assert_eq!(
        tree.get("dev/big_numbers").and_then(|e| e.rdev),
        Some((300, 70_000))
    );
    assert_eq!(kind(b"dev/loop0"), Some(FileKind::BlockDevice));
    assert_eq!(kind(b"dev/fifo"), Some(FileKind::Fifo));
    assert_eq!(kind(b"etc/hello.link"), Some(FileKind::Symlink));
    assert_eq!(tree.get("tmp").map(|e| e.mode), Some(0o1777));
    assert_eq!(
        tree.get(paths::CAPABILITY_FILE).map(|e| e.mode),
        Some(0o4755)
    );
    assert!(
        tree.get(paths::CAPABILITY_FILE)
            .is_some_and(|e| e.xattrs.contains_key(b"security.capability".as_slice()))
    );
    assert!(
        tree.get(paths::HARDLINKED_FILE)
            .is_some_and(|e| e.xattrs.contains_key(b"user.comment".as_slice()))
    );
    for link in [
        "etc/hello.hardlink",
        "etc/hello.hardlink2",
        paths::HARDLINKED_FILE,
    ] {
        assert_eq!(
            tree.get(link).and_then(|e| e.hardlink_group.clone()),
            Some(b"etc/hello.hardlink".to_vec()),
            "{link}"
        );
    }
    for gone in [
        "etc/remove_me.txt",
        "gone_dir",
        "gone_dir/a",
        "opaque_dir/old1",
    ] {
        assert!(tree.get(gone).is_none(), "{gone} should be whited out");
    }
    assert_eq!(kind(b"opaque_dir/new1"), Some(FileKind::File));
    assert_eq!(kind(b"file_to_dir"), Some(FileKind::Dir));
    assert_eq!(kind(b"file_to_dir/inside"), Some(FileKind::File));
    assert_eq!(kind(b"dir_to_file"), Some(FileKind::File));
    assert_eq!(kind(paths::NON_UTF8_FILE), Some(FileKind::File));
    assert_eq!(
        tree.get(paths::SPARSE_FILE).map(|e| e.size),
        Some(sizes.sparse_file)
    );
    assert_eq!(
        tree.get(paths::RANDOM_FILE).map(|e| e.size),
        Some(sizes.random_file)
    );
    let small_files = tree
        .entries
        .iter()
        .filter(|(path, e)| path.starts_with(b"many/") && e.kind == FileKind::File)
        .count();
    assert_eq!(small_files, sizes.small_files);
}

#[test]
fn expected_tree_of_standard_image_has_every_case() {
    let sizes = StandardImageSizes::SMALL;
    let expected = standard_test_image_with(sizes)
        .expected_tree()
        .expect("expected tree");
    assert_standard_cases(&expected, sizes);
}

#[test]
fn umoci_unpack_of_standard_image_matches_expected_tree() {
    let test = "umoci_unpack_of_standard_image_matches_expected_tree";
    if !require_tool(test, "umoci") || !require_tool(test, "skopeo") || !require_root(test) {
        return;
    }
    let sizes = StandardImageSizes::SMALL;
    let image = standard_test_image_with(sizes);
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("layout");
    image.write_layout(&layout, "v1").expect("layout written");
    let rootfs =
        unpack_reference(&layout, "v1", &work.path().join("bundle")).expect("umoci unpack");

    let actual = TreeSnapshot::capture(&rootfs).expect("capture");
    assert_standard_cases(&actual, sizes);
    image
        .expected_tree()
        .expect("expected tree")
        .assert_same(&actual, 50);
}

#[test]
fn layouts_are_deterministic() {
    let work = tempfile::tempdir().expect("tempdir");
    let image = standard_test_image_with(StandardImageSizes::SMALL);
    let first = image
        .write_layout(&work.path().join("a"), "v1")
        .expect("first");
    let second = image
        .write_layout(&work.path().join("b"), "v1")
        .expect("second");
    assert_eq!(first, second);
    let index_a = std::fs::read(work.path().join("a/index.json")).expect("index a");
    let index_b = std::fs::read(work.path().join("b/index.json")).expect("index b");
    assert_eq!(index_a, index_b);
}

#[test]
fn every_compression_unpacks_to_the_expected_tree() {
    let test = "every_compression_unpacks_to_the_expected_tree";
    if !require_tool(test, "umoci") || !require_tool(test, "skopeo") || !require_root(test) {
        return;
    }
    let sizes = StandardImageSizes {
        sparse_file: 300_000,
        random_file: 200_000,
        small_files: 20,
    };
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let mut image = standard_test_image_with(sizes);
        for layer in &mut image.layers {
            layer.compression = compression;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let layout = work.path().join("layout");
        let written = image.write_layout(&layout, "v1").expect("layout written");
        assert!(
            written
                .layers
                .iter()
                .all(|l| l.blob.media_type == compression.media_type())
        );
        let rootfs = unpack_reference(&layout, "v1", &work.path().join("bundle"))
            .unwrap_or_else(|e| panic!("{compression:?}: umoci unpack: {e}"));
        let actual = TreeSnapshot::capture(&rootfs).expect("capture");
        image
            .expected_tree()
            .expect("expected tree")
            .assert_same(&actual, 50);
    }
}

#[test]
fn large_file_versions_differ_only_in_the_large_file() {
    let versions = large_file_versions(2 * 1024 * 1024);
    let path = LargeFileVersions::PATH.as_bytes();
    let base = versions.base.expected_tree().expect("base");
    for (name, other, size) in [
        (
            "changed_in_place",
            &versions.changed_in_place,
            versions.file_size,
        ),
        ("inserted", &versions.inserted, versions.file_size + 1),
    ] {
        let other = other.expected_tree().expect(name);
        let diff = base.diff(&other);
        assert!(!diff.is_empty(), "{name}");
        assert!(
            diff.iter()
                .all(|line| line.starts_with(LargeFileVersions::PATH)),
            "{name}: {diff:?}"
        );
        assert_eq!(other.get(path).map(|e| e.size), Some(size), "{name}");
    }
}

#[test]
fn multi_platform_layout_has_an_index_with_both_platforms() {
    let work = tempfile::tempdir().expect("tempdir");
    let written = write_multi_platform_layout(work.path(), "multi", &multi_platform_images())
        .expect("layout written");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(work.path(), &written.index.digest)).expect("index blob"),
    )
    .expect("index JSON");
    let architectures: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(architectures, ["amd64", "arm64"]);
    assert_eq!(written.index.media_type, MEDIA_TYPE_INDEX);
}
