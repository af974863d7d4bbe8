//! The read path through a real mount: single-flight under concurrency, EIO
//! instead of wrong bytes, recovery, a cache smaller than the image, EROFS for
//! every modification, and the access trace.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use stoker_format::{NodeKind, Tree};
use stoker_lazyfs::MountOptions;
use stoker_testkit::tree::TreeSnapshot;

const CHUNK: usize = 256 << 10;

/// One large multi-chunk file plus a few small ones.
fn large_file_image(chunks: usize) -> TestImage {
    let mut b = ImageBuilder::new();
    let data = b.dir(Tree::ROOT, b"data", meta(0o755, 0, 0));
    b.file(
        data,
        b"large",
        &pattern(10, chunks * CHUNK + 777),
        CHUNK,
        meta(0o644, 0, 0),
    );
    for i in 0..20u64 {
        let name = format!("small-{i}");
        b.file(
            data,
            name.as_bytes(),
            &pattern(100 + i, 5000 + i as usize * 911),
            4096,
            meta(0o644, 0, 0),
        );
    }
    b.add(
        Tree::ROOT,
        b"link",
        NodeKind::Symlink(b"data/large".to_vec()),
        meta(0o777, 0, 0),
    );
    b.finish()
}

fn read_all(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn eight_concurrent_readers_fetch_each_chunk_once() {
    if !fuse_available("eight_concurrent_readers_fetch_each_chunk_once") {
        return;
    }
    let image = large_file_image(64);
    let mounted = Arc::new(mount_image(
        &image,
        1 << 30,
        MountOptions::default(),
        |_| {},
    ));
    let expected = Arc::new(image.content(b"data/large"));

    let readers: Vec<_> = (0..8)
        .map(|r| {
            let mounted = Arc::clone(&mounted);
            let expected = Arc::clone(&expected);
            std::thread::spawn(move || {
                // Different read sizes and starting points, so readers overlap unevenly.
                let file = File::open(mounted.path("data/large")).unwrap();
                let step = [4096, 65536, 131072, 1 << 20][r % 4];
                let start = (r * 3 * CHUNK) % expected.len();
                let mut buf = vec![0u8; step];
                // From `start` to the end, then from 0 back up to `start`.
                for (from, to) in [(start, expected.len()), (0, start)] {
                    let mut offset = from;
                    while offset < to {
                        let want = step.min(to - offset);
                        let n = file.read_at(&mut buf[..want], offset as u64).unwrap();
                        assert_eq!(n, want, "reader {r} short read at {offset}");
                        assert!(
                            buf[..n] == expected[offset..offset + n],
                            "reader {r}: wrong bytes at {offset}"
                        );
                        offset += n;
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().expect("reader thread");
    }

    let id = image.index.resolve(b"data/large").unwrap();
    for piece in image.index.file_chunks(id) {
        let loc = image.index.chunk(piece.chunk).unwrap();
        assert_eq!(
            mounted.source.times_fetched(&loc.compressed_range()),
            1,
            "chunk at file offset {} fetched more than once",
            piece.file_offset
        );
    }
    let counters = mounted.handle.counters();
    assert_eq!(counters.read_errors, 0);
    assert!(
        counters.readahead_chunks > 0,
        "read-ahead asked for chunks: {counters:?}"
    );
}

#[test]
fn tampered_chunks_give_eio_never_wrong_bytes_and_the_failure_is_counted() {
    if !fuse_available("tampered_chunks_give_eio_never_wrong_bytes_and_the_failure_is_counted") {
        return;
    }
    let image = large_file_image(8);
    let id = image.index.resolve(b"data/large").unwrap();
    let pieces: Vec<_> = image.index.file_chunks(id).collect();
    // Tamper with chunks 2 and 5 of the large file.
    let bad: Vec<_> = [2, 5]
        .iter()
        .map(|i| {
            image
                .index
                .chunk(pieces[*i].chunk)
                .unwrap()
                .compressed_range()
        })
        .collect();
    let options = MountOptions {
        readahead_bytes: 0,
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |_| {});
    *mounted.source.tamper.lock().unwrap() = bad;
    let expected = image.content(b"data/large");

    let file = File::open(mounted.path("data/large")).unwrap();
    let mut failures = 0;
    for (i, piece) in pieces.iter().enumerate() {
        // Read each chunk twice: the second attempt must not see bad bytes either.
        for _ in 0..2 {
            let mut buf = vec![0u8; CHUNK];
            match file.read_at(&mut buf, piece.file_offset) {
                Ok(n) => {
                    let start = piece.file_offset as usize;
                    assert!(
                        buf[..n] == expected[start..start + n],
                        "wrong bytes from chunk {i}"
                    );
                    assert!(i != 2 && i != 5, "tampered chunk {i} was served");
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "chunk {i}: {e}");
                    failures += 1;
                }
            }
        }
    }
    // Both reads of both tampered chunks fail. A read of a good neighbour may fail
    // too: the kernel can fold the next chunk's pages into the same FUSE read, and
    // a FUSE read cannot be answered short in the middle of a file.
    assert!(failures >= 4, "{failures} failed reads");
    assert!(mounted.fetcher.stats().verification_failures >= 2);
    assert!(mounted.handle.counters().read_errors >= 4);
    let tampered = image.index.chunk(pieces[2].chunk).unwrap();
    assert!(
        !mounted.cache().contains(&tampered.digest),
        "a bad chunk was cached"
    );

    // Once the source is honest again every read succeeds.
    mounted.source.tamper.lock().unwrap().clear();
    assert!(read_all(&mounted.path("data/large")).unwrap() == expected);
}

#[test]
fn a_registry_that_is_down_gives_eio_and_the_read_works_once_it_is_back() {
    if !fuse_available("a_registry_that_is_down_gives_eio_and_the_read_works_once_it_is_back") {
        return;
    }
    let image = large_file_image(2);
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    mounted.source.down.store(true, Ordering::SeqCst);
    // Metadata needs no registry.
    let listed = std::fs::read_dir(mounted.path("data")).unwrap().count();
    assert_eq!(listed, 21);
    let err = read_all(&mounted.path("data/small-3")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));

    // The fetcher remembers a failed chunk for a moment (so the kernel's
    // immediate retry fails fast); the read works again once that has passed.
    mounted.source.down.store(false, Ordering::SeqCst);
    let expected = image.content(b"data/small-3");
    let recovered = stoker_testkit::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(50),
        || match read_all(&mounted.path("data/small-3")) {
            Ok(content) => {
                assert_eq!(content, expected, "right bytes once the registry is back");
                true
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "only EIO meanwhile");
                false
            }
        },
    );
    assert!(recovered, "the read works again once the registry is back");
}

#[test]
fn a_cache_smaller_than_the_image_still_returns_correct_bytes() {
    if !fuse_available("a_cache_smaller_than_the_image_still_returns_correct_bytes") {
        return;
    }
    let image = large_file_image(40); // 10 MiB in the large file alone
    let capacity = 3 << 20;
    let mounted = mount_image(&image, capacity, MountOptions::default(), |_| {});
    let expected = snapshot_of_index(&image.index, &|d| image.chunk_bytes[d].clone());
    // Walk and read everything twice: the second pass must refetch evicted chunks.
    for _ in 0..2 {
        let seen = TreeSnapshot::capture(mounted.mountpoint.path()).unwrap();
        expected.assert_same(&seen, 10);
    }
    let usage = mounted.cache().usage();
    assert!(usage.evictions > 0, "the cache had to evict: {usage:?}");
    drop(mounted.handle);
    let usage = mounted.fetcher.cache().usage();
    assert!(
        usage.bytes <= capacity,
        "cache over its bound after unmount: {usage:?}"
    );
}

#[test]
fn every_modification_is_refused_with_erofs() {
    if !fuse_available("every_modification_is_refused_with_erofs") {
        return;
    }
    let image = large_file_image(1);
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    let erofs = |result: std::io::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    };
    let small = mounted.path("data/small-1");
    erofs(
        OpenOptions::new().write(true).open(&small).map(drop),
        "open for writing",
    );
    erofs(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&small)
            .map(drop),
        "open read-write",
    );
    erofs(
        OpenOptions::new().append(true).open(&small).map(drop),
        "open for append",
    );
    erofs(File::create(mounted.path("data/new")).map(drop), "create");
    erofs(File::create(&small).map(drop), "truncate by create");
    erofs(std::fs::remove_file(&small), "unlink");
    erofs(std::fs::create_dir(mounted.path("newdir")), "mkdir");
    erofs(std::fs::remove_dir(mounted.path("data")), "rmdir");
    erofs(
        std::fs::rename(&small, mounted.path("data/renamed")),
        "rename",
    );
    erofs(
        std::fs::hard_link(&small, mounted.path("data/hard")),
        "link",
    );
    erofs(
        std::os::unix::fs::symlink("x", mounted.path("sym")),
        "symlink",
    );
    use std::os::unix::fs::PermissionsExt;
    erofs(
        std::fs::set_permissions(&small, std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(xattr::set(&small, "user.x", b"1"), "setxattr");
    erofs(xattr::remove(&small, "user.x"), "removexattr");
    let mut file = File::open(&small).unwrap();
    assert!(
        file.write_all(b"x").is_err(),
        "write on a read-only descriptor"
    );
    // And nothing changed.
    assert_eq!(read_all(&small).unwrap(), image.content(b"data/small-1"));
}

#[test]
fn the_access_trace_reports_each_chunks_first_read_once_in_order() {
    if !fuse_available("the_access_trace_reports_each_chunks_first_read_once_in_order") {
        return;
    }
    let image = large_file_image(6);
    let (events, received) = std::sync::mpsc::sync_channel(1000);
    let options = MountOptions {
        access_trace: Some(events),
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |_| {});
    let large = read_all(&mounted.path("data/large")).unwrap();
    assert_eq!(large, image.content(b"data/large"));
    let again = read_all(&mounted.path("data/large")).unwrap();
    assert_eq!(again.len(), large.len());
    let _ = read_all(&mounted.path("data/small-0")).unwrap();

    let id = image.index.resolve(b"data/large").unwrap();
    let small = image.index.resolve(b"data/small-0").unwrap();
    let events: Vec<(u32, u32, u64)> = received
        .try_iter()
        .map(|e| (e.chunk, e.inode, e.file_offset))
        .collect();
    // The kernel may send a file's reads in parallel, so within a file the order of
    // first accesses is not fixed; across the two files it is.
    let in_order = |file: u32| -> Vec<(u32, u32, u64)> {
        image
            .index
            .file_chunks(file)
            .map(|p| (p.chunk, file, p.file_offset))
            .collect()
    };
    let want_large = in_order(id);
    let want_small = in_order(small);
    assert_eq!(
        events.len(),
        want_large.len() + want_small.len(),
        "{events:?}"
    );
    let (large_events, small_events) = events.split_at(want_large.len());
    let mut large_events = large_events.to_vec();
    large_events.sort();
    assert_eq!(
        large_events, want_large,
        "each chunk of the large file once"
    );
    let mut small_events = small_events.to_vec();
    small_events.sort();
    assert_eq!(small_events, want_small);
    let counters = mounted.handle.counters();
    assert_eq!(
        counters.passthrough_opens, 0,
        "no passthrough while tracing"
    );
    assert_eq!(counters.trace_dropped, 0);

    // After the trace stops, nothing more is reported.
    mounted.handle.stop_access_trace();
    let _ = read_all(&mounted.path("data/small-1")).unwrap();
    assert_eq!(received.try_iter().count(), 0);
}

#[test]
fn unmount_of_a_busy_mount_detaches_it_and_open_files_keep_working() {
    if !fuse_available("unmount_of_a_busy_mount_detaches_it_and_open_files_keep_working") {
        return;
    }
    let image = large_file_image(2);
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    let mountpoint = mounted.mountpoint.path().to_path_buf();
    assert!(is_mounted(&mountpoint));
    let file = File::open(mounted.path("data/large")).unwrap();
    let common::Mounted {
        handle,
        mountpoint: _dir,
        cache_dir: _cache,
        ..
    } = mounted;
    handle.unmount().expect("unmount");
    assert!(!is_mounted(&mountpoint), "detached from the tree");
    let mut buf = vec![0u8; 1000];
    let n = file.read_at(&mut buf, 5).unwrap();
    assert_eq!(&buf[..n], &image.content(b"data/large")[5..1005]);
    drop(file);

    // A second mount at the same place, unmounted by path as `stoker unmount` does.
    let again = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    let path = again.mountpoint.path().to_path_buf();
    stoker_lazyfs::unmount(&path).expect("unmount by path");
    assert!(!is_mounted(&path));
    let err = stoker_lazyfs::unmount(&path).unwrap_err();
    assert!(err.to_string().contains("cannot unmount"), "{err}");
}

/// Twenty single-chunk files of about 3 KiB each in directory `dir`, stored back
/// to back in the blob in name order (as the converter writes a layer's files).
fn package_files(b: &mut ImageBuilder, dir: &[u8], seed: u64) {
    let dir = b.dir(Tree::ROOT, dir, meta(0o755, 0, 0));
    for i in 0..20u64 {
        let name = format!("m{i:02}.py");
        let content = pattern(seed + i, 3000 + i as usize * 17);
        b.file(dir, name.as_bytes(), &content, 1 << 20, meta(0o644, 0, 0));
    }
}

#[test]
fn a_miss_also_fetches_the_chunks_that_follow_it_in_the_blob_in_the_same_request() {
    let name = "a_miss_also_fetches_the_chunks_that_follow_it_in_the_blob_in_the_same_request";
    if !fuse_available(name) {
        return;
    }
    let mut b = ImageBuilder::new();
    package_files(&mut b, b"pkg_a", 1000);
    package_files(&mut b, b"pkg_b", 2000);
    let image = b.finish();
    let options = MountOptions {
        readahead_bytes: 0,
        miss_readahead_bytes: 40 << 10,
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |_| {});
    let source = &mounted.source;
    let chunk_of = |path: &str| {
        let id = image.index.resolve(path.as_bytes()).unwrap();
        let piece = image.index.file_chunks(id).next().unwrap();
        image.index.chunk(piece.chunk).unwrap()
    };
    let requests = || source.request_count.load(Ordering::SeqCst);

    // The first read of the package is one request that also brings the files
    // after it, as far as the 40 KiB budget goes; reading those costs nothing.
    assert_eq!(
        read_all(&mounted.path("pkg_a/m00.py")).unwrap(),
        image.content(b"pkg_a/m00.py")
    );
    assert_eq!(requests(), 1);
    let first = source.requests.lock().unwrap()[0].clone();
    let along: Vec<String> = (1..20)
        .map(|i| format!("pkg_a/m{i:02}.py"))
        .take_while(|p| first.end >= chunk_of(p).compressed_range().end)
        .collect();
    assert!(
        along.len() >= 5,
        "a 40 KiB budget covers several 3 KiB files: {along:?}"
    );
    for path in &along {
        assert_eq!(
            read_all(&mounted.path(path)).unwrap(),
            image.content(path.as_bytes())
        );
    }
    assert_eq!(requests(), 1, "the files that rode along are cached");
    let stats = mounted.fetcher.stats();
    assert!(stats.bytes_fetched <= (40 << 10) + 4096, "{stats:?}");

    // A chunk that rides along and fails verification is neither served nor
    // allowed to fail the read it rode with; read on its own, it gives EIO.
    let bad = chunk_of("pkg_b/m03.py").compressed_range();
    source.tamper.lock().unwrap().push(bad.clone());
    for i in 0..3 {
        let path = format!("pkg_b/m{i:02}.py");
        assert_eq!(
            read_all(&mounted.path(&path)).unwrap(),
            image.content(path.as_bytes()),
            "{path}"
        );
    }
    let err = read_all(&mounted.path("pkg_b/m03.py")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    source.tamper.lock().unwrap().clear();
    assert_eq!(
        read_all(&mounted.path("pkg_b/m03.py")).unwrap(),
        image.content(b"pkg_b/m03.py"),
        "right bytes once the source is sound again"
    );
}
