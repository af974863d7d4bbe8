//! Kernel caching through a real mount: once a tree has been walked and its files
//! read, walking and reading it again is answered by the kernel alone (entry and
//! attribute timeouts, readdirplus, directory listings cached without `opendir`,
//! page cache kept across opens), with the same bytes. Cached chunks are served
//! (and read ahead) from the cache, never fetched again.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use common::*;
use stoker_format::Tree;
use stoker_lazyfs::{FsCounters, MountOptions};

/// Three directories of small files and one file of several chunks.
fn image() -> TestImage {
    let mut b = ImageBuilder::new();
    for d in 0..3u64 {
        let dir = b.dir(Tree::ROOT, format!("dir-{d}").as_bytes(), meta(0o755, 0, 0));
        for f in 0..40u64 {
            b.file(
                dir,
                format!("file-{f}").as_bytes(),
                &pattern(d * 100 + f, 300 + f as usize * 97),
                4096,
                meta(0o644, 0, 0),
            );
        }
    }
    b.file(
        Tree::ROOT,
        b"large",
        &pattern(7, 5 * (256 << 10) + 123),
        256 << 10,
        meta(0o644, 0, 0),
    );
    b.finish()
}

/// Lists and stats every entry under `root`, reads every regular file and
/// checks its bytes. Returns how many entries it saw.
fn walk_and_read(root: &Path, image: &TestImage) -> usize {
    let mut pending = vec![root.to_path_buf()];
    let mut entries = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            entries += 1;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let mut bytes = Vec::new();
                File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut bytes))
                    .expect("read");
                let relative = path.strip_prefix(root).expect("under root");
                let expected = image.content(relative.as_os_str().as_encoded_bytes());
                assert!(bytes == expected, "{} has wrong bytes", path.display());
            }
        }
    }
    entries
}

/// The requests that a second pass should not make: opens and releases still
/// reach the filesystem (they decide passthrough), nothing else may.
fn lookups_listings_and_reads(c: &FsCounters) -> (u64, u64, u64, u64, u64) {
    (c.lookups, c.getattrs, c.readdirs, c.reads, c.read_bytes)
}

#[test]
fn a_second_walk_and_read_of_the_tree_is_answered_by_the_kernel() {
    if !fuse_available("a_second_walk_and_read_of_the_tree_is_answered_by_the_kernel") {
        return;
    }
    let image = image();
    let options = MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    // The large file is read from the cache (with read-ahead from the local
    // disk), the small ones from the registry.
    let mounted = mount_image(&image, 1 << 30, options, |cache| {
        image.warm(cache, b"large")
    });
    let root = mounted.mountpoint.path();

    let first = walk_and_read(root, &image);
    assert_eq!(first, 3 + 3 * 40 + 1);
    let after_first = mounted.handle.counters();
    assert!(after_first.reads > 0 && after_first.readdirs > 0);
    let large = image.index.resolve(b"large").expect("large");
    for piece in image.index.file_chunks(large) {
        let loc = image.index.chunk(piece.chunk).expect("chunk");
        assert_eq!(
            mounted.source.times_fetched(&loc.compressed_range()),
            0,
            "cached chunk at {} fetched",
            piece.file_offset
        );
    }

    // Other processes on the machine may drop the kernel's caches at any time
    // (benchmarks do); a pass right after a full pass must be free at least once
    // in a few tries.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let before = mounted.handle.counters();
        assert_eq!(walk_and_read(root, &image), first);
        let after = mounted.handle.counters();
        if lookups_listings_and_reads(&after) == lookups_listings_and_reads(&before) {
            assert_eq!(after.read_errors, 0);
            return;
        }
        seen.push((before, after));
    }
    panic!("every later pass reached the filesystem: {seen:#?}");
}

#[test]
fn an_image_without_xattrs_lets_the_kernel_answer_every_getxattr_after_the_first() {
    if !fuse_available(
        "an_image_without_xattrs_lets_the_kernel_answer_every_getxattr_after_the_first",
    ) {
        return;
    }
    let image = image();
    assert_eq!(image.index.xattr_count(), 0);
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    let root = mounted.mountpoint.path();
    let files: Vec<_> = (0..40)
        .map(|f| root.join(format!("dir-1/file-{f}")))
        .collect();
    for file in &files {
        std::fs::symlink_metadata(file).expect("stat");
    }

    // "Not supported", the way a file system without xattrs answers...
    let get = |path: &Path| xattr::get(path, "security.capability").map_err(|e| e.raw_os_error());
    assert_eq!(get(&files[0]), Err(Some(libc::EOPNOTSUPP)));
    // ...and from then on by the kernel alone.
    let before = mounted.handle.counters();
    for file in &files {
        assert_eq!(get(file), Err(Some(libc::EOPNOTSUPP)));
        assert_eq!(
            xattr::get(file, "user.anything").map_err(|e| e.raw_os_error()),
            Err(Some(libc::EOPNOTSUPP))
        );
    }
    let after = mounted.handle.counters();
    assert_eq!(
        after.operations, before.operations,
        "getxattr reached the filesystem: {before:?} -> {after:?}"
    );
    // Listing names still works (an empty list), and so do reads.
    assert_eq!(xattr::list(&files[3]).expect("listxattr").count(), 0);
    let mut bytes = Vec::new();
    File::open(&files[3])
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .expect("read");
    assert_eq!(bytes, image.content(b"dir-1/file-3"));
}
