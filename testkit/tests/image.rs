//! Images built by the testkit unpack (with umoci) to exactly the tree the builder expects,
//! and push to the test registry with skopeo.

use stoker_testkit::image::{
    StandardImageSizes, paths, standard_test_image_with, unpack_reference,
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
