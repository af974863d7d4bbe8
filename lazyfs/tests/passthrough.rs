//! FUSE passthrough: fully cached files are read by the kernel from a local
//! backing file, without a FUSE read; everything else still works normally.

mod common;

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use common::*;
use stoker_format::Tree;
use stoker_lazyfs::{
    AssemblyOptions, AssemblyReport, MountOptions, VerifiedAssemblies, assemble_files,
    warm_page_cache,
};

fn image() -> TestImage {
    let mut b = ImageBuilder::new();
    let root = Tree::ROOT;
    b.file(
        root,
        b"one",
        &pattern(1, 100_000),
        1 << 20,
        meta(0o644, 0, 0),
    );
    b.file(
        root,
        b"multi",
        &pattern(2, 5 * 65536 + 99),
        65536,
        meta(0o644, 0, 0),
    );
    b.sparse_file(
        root,
        b"holes",
        1 << 20,
        &[(4096, pattern(3, 8192)), (500_000, pattern(4, 30_000))],
        meta(0o644, 0, 0),
    );
    b.file(
        root,
        b"cold",
        &pattern(5, 50_000),
        1 << 20,
        meta(0o644, 0, 0),
    );
    b.finish()
}

/// Reads file `name` (`path` in the image) whole and checks its bytes, that its
/// open passed through and that no read reached the filesystem.
fn read_through_passthrough(mounted: &Mounted, image: &TestImage, path: &[u8], name: &str) {
    let before = mounted.handle.counters();
    assert!(
        read_all(&mounted.path(name)) == image.content(path),
        "{name} via passthrough"
    );
    let after = mounted.handle.counters();
    assert_eq!(
        after.passthrough_opens,
        before.passthrough_opens + 1,
        "{name}: passed through"
    );
    assert_eq!(after.reads, before.reads, "{name}: no FUSE read");
}

fn read_all(path: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    File::open(path).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn fully_cached_files_are_read_through_passthrough_without_fuse_reads() {
    if !fuse_available("fully_cached_files_are_read_through_passthrough_without_fuse_reads") {
        return;
    }
    let image = image();
    let assembly_dir = tempfile::tempdir().unwrap();
    let options = MountOptions {
        assembly: Some(AssemblyOptions {
            dir: assembly_dir.path().join("files"),
            max_bytes: 64 << 20,
            verified: Default::default(),
        }),
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |cache| {
        for path in [&b"one"[..], b"multi", b"holes"] {
            image.warm(cache, path);
        }
    });
    if !mounted.handle.passthrough_enabled() {
        eprintln!(
            "SKIPPED: fully_cached_files_are_read_through_passthrough_without_fuse_reads: the kernel does not offer FUSE passthrough"
        );
        return;
    }
    let counters = || mounted.handle.counters();

    // A single-chunk file passes through its chunk file at once.
    let before = counters();
    assert_eq!(read_all(&mounted.path("one")), image.content(b"one"));
    let after = counters();
    assert_eq!(after.passthrough_opens, before.passthrough_opens + 1);
    assert_eq!(
        after.reads, before.reads,
        "no FUSE read for a passthrough file"
    );

    // Multi-chunk and sparse files: the first open is served normally and has a
    // backing file assembled in the background; later opens pass through.
    for (path, name) in [(&b"multi"[..], "multi"), (b"holes", "holes")] {
        let before = counters();
        assert!(read_all(&mounted.path(name)) == image.content(path));
        assert_eq!(counters().passthrough_opens, before.passthrough_opens);
        // The kernel releases an open after close returns: a new open before
        // that would join the normal one (the kernel's rule, see the module
        // docs), so wait for it as well as for the assembly.
        let ready =
            stoker_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
                let now = counters();
                now.assembled_files > before.assembled_files && now.releases == now.opens
            });
        assert!(ready, "{name} was assembled and its open released");
        read_through_passthrough(&mounted, &image, path, name);
    }
    let files: Vec<_> = std::fs::read_dir(assembly_dir.path().join("files"))
        .unwrap()
        .collect();
    assert_eq!(
        files.len(),
        2,
        "one assembled file each for multi and holes"
    );
}

#[test]
fn passthrough_never_mixes_with_normal_opens_of_the_same_file() {
    if !fuse_available("passthrough_never_mixes_with_normal_opens_of_the_same_file") {
        return;
    }
    let image = image();
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    if !mounted.handle.passthrough_enabled() {
        eprintln!(
            "SKIPPED: passthrough_never_mixes_with_normal_opens_of_the_same_file: the kernel does not offer FUSE passthrough"
        );
        return;
    }
    let expected = image.content(b"cold");
    // Not cached: a normal open, which fetches the chunk while reading.
    let mut first = File::open(mounted.path("cold")).unwrap();
    let mut content = Vec::new();
    first.read_to_end(&mut content).unwrap();
    assert!(content == expected);
    assert_eq!(mounted.handle.counters().passthrough_opens, 0);
    // Now fully cached, but the file is still open normally: a second open must
    // not pass through (the kernel would refuse the mix with EIO).
    let second = read_all(&mounted.path("cold"));
    assert!(second == expected);
    assert_eq!(mounted.handle.counters().passthrough_opens, 0);
    drop(first);
    // All normal opens are released; the next open passes through. The release
    // reaches the filesystem asynchronously, so poll for it.
    let passed =
        stoker_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
            assert!(read_all(&mounted.path("cold")) == expected);
            mounted.handle.counters().passthrough_opens > 0
        });
    assert!(
        passed,
        "the file passes through once nobody has it open normally"
    );
    // Two passthrough opens at once share one backing file.
    let a = File::open(mounted.path("cold")).unwrap();
    let b = read_all(&mounted.path("cold"));
    assert!(b == expected);
    drop(a);
}

#[test]
fn with_passthrough_off_every_read_goes_through_the_filesystem() {
    if !fuse_available("with_passthrough_off_every_read_goes_through_the_filesystem") {
        return;
    }
    let image = image();
    let options = MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |cache| image.warm(cache, b"one"));
    assert!(!mounted.handle.passthrough_enabled());
    let before = mounted.handle.counters();
    assert_eq!(read_all(&mounted.path("one")), image.content(b"one"));
    let after = mounted.handle.counters();
    assert_eq!(after.passthrough_opens, 0);
    assert!(after.reads > before.reads);
    assert_eq!(
        mounted
            .source
            .request_count
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "served from the cache"
    );
}

#[test]
fn while_tracing_only_whole_chunk_files_pass_through_and_their_open_is_traced() {
    let name = "while_tracing_only_whole_chunk_files_pass_through_and_their_open_is_traced";
    if !fuse_available(name) {
        return;
    }
    let image = image();
    let (events, received) = std::sync::mpsc::sync_channel(1000);
    let options = MountOptions {
        access_trace: Some(events),
        ..MountOptions::default()
    };
    let mounted = mount_image(&image, 1 << 30, options, |cache| {
        for path in [&b"one"[..], b"multi"] {
            image.warm(cache, path);
        }
    });
    if !mounted.handle.passthrough_enabled() {
        eprintln!("SKIPPED: {name}: the kernel does not offer FUSE passthrough");
        return;
    }
    let counters = || mounted.handle.counters();

    // A cached file that is one whole chunk: passed through, and its chunk is in
    // the trace although no read reaches the filesystem.
    let before = counters();
    assert_eq!(read_all(&mounted.path("one")), image.content(b"one"));
    let after = counters();
    assert_eq!(after.passthrough_opens, before.passthrough_opens + 1);
    assert_eq!(after.reads, before.reads, "no FUSE read for 'one'");
    let one = image.index.resolve(b"one").unwrap();
    let one_chunk = image.index.file_chunks(one).next().unwrap().chunk;
    let events: Vec<(u32, u32, u64)> = received
        .try_iter()
        .map(|e| (e.chunk, e.inode, e.file_offset))
        .collect();
    assert_eq!(events, vec![(one_chunk, one, 0)]);

    // A cached file of several chunks is read through the filesystem, so that
    // the trace sees exactly the chunks a read touches.
    let before = counters();
    let multi = image.index.resolve(b"multi").unwrap();
    let mut file = File::open(mounted.path("multi")).unwrap();
    let mut head = vec![0u8; 1000];
    file.read_exact(&mut head).unwrap();
    assert_eq!(head, image.content(b"multi")[..1000]);
    drop(file);
    assert_eq!(counters().passthrough_opens, before.passthrough_opens);
    let seen: Vec<u32> = received.try_iter().map(|e| e.chunk).collect();
    let first_chunk = image.index.file_chunks(multi).next().unwrap().chunk;
    assert!(seen.contains(&first_chunk), "{seen:?}");
    assert!(
        seen.len() < image.index.file_chunks(multi).count(),
        "not every chunk of 'multi' for a 1000-byte read: {seen:?}"
    );

    // Once the trace stops, every fully cached file may pass through.
    mounted.handle.stop_access_trace();
    let before = counters();
    assert_eq!(read_all(&mounted.path("one")), image.content(b"one"));
    assert_eq!(counters().passthrough_opens, before.passthrough_opens + 1);
}

#[test]
fn files_assembled_before_the_mount_pass_through_at_their_first_open() {
    if !fuse_available("files_assembled_before_the_mount_pass_through_at_their_first_open") {
        return;
    }
    let image = image();
    let assembly_dir = tempfile::tempdir().unwrap();
    let assembly = AssemblyOptions {
        dir: assembly_dir.path().join("files"),
        max_bytes: 64 << 20,
        verified: VerifiedAssemblies::default(),
    };
    let options = MountOptions {
        assembly: Some(assembly.clone()),
        ..MountOptions::default()
    };
    let ids: Vec<_> = [&b"one"[..], b"multi", b"holes", b"cold"]
        .iter()
        .map(|path| image.index.resolve(path).unwrap())
        .collect();
    let mut report = AssemblyReport::default();
    let mounted = mount_image(&image, 1 << 30, options, |cache| {
        for path in [&b"one"[..], b"multi", b"holes"] {
            image.warm(cache, path);
        }
        // What a node warmed from a plan does before the image's containers start.
        report = assemble_files(&image.index, cache, &assembly, ids.iter().copied()).unwrap();
    });
    // "one" and "cold" are single chunks: their chunk file is their backing file.
    assert_eq!(
        (report.assembled, report.present, report.skipped),
        (2, 0, 0),
        "{report:?}"
    );
    if !mounted.handle.passthrough_enabled() {
        eprintln!(
            "SKIPPED: files_assembled_before_the_mount_pass_through_at_their_first_open: the kernel does not offer FUSE passthrough"
        );
        return;
    }
    for (path, name) in [(&b"multi"[..], "multi"), (b"holes", "holes")] {
        // Its first open passes through, and it is not assembled again.
        let before = mounted.handle.counters();
        read_through_passthrough(&mounted, &image, path, name);
        assert_eq!(
            mounted.handle.counters().assembled_files,
            before.assembled_files,
            "{name}: not assembled again"
        );
    }
    // Assembling again finds the files in place.
    let again = assemble_files(
        &image.index,
        mounted.cache(),
        &assembly,
        ids.iter().copied(),
    )
    .unwrap();
    assert_eq!((again.assembled, again.present), (0, 2), "{again:?}");
}

#[test]
fn warming_the_page_cache_reads_the_assembled_and_chunk_files_a_start_will_use() {
    let test = "warming_the_page_cache_reads_the_assembled_and_chunk_files_a_start_will_use";
    if !stoker_testkit::require_tool(test, "fincore") {
        return;
    }
    let image = image();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = stoker_cache::ChunkCache::open(cache_dir.path(), 1 << 30).unwrap();
    for path in [&b"one"[..], b"multi", b"cold"] {
        image.warm(&cache, path);
    }
    let assembly = AssemblyOptions {
        dir: cache_dir.path().join("assembled"),
        max_bytes: 64 << 20,
        verified: VerifiedAssemblies::default(),
    };
    let ids: Vec<_> = [&b"one"[..], b"multi", b"cold"]
        .iter()
        .map(|path| image.index.resolve(path).unwrap())
        .collect();
    let report = assemble_files(&image.index, &cache, &assembly, ids.iter().copied()).unwrap();
    assert_eq!(report.assembled, 1, "multi: {report:?}");
    let assembled_multi = std::fs::read_dir(&assembly.dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .next()
        .unwrap();
    let chunk_file = |path: &[u8]| {
        let id = image.index.resolve(path).unwrap();
        let chunk = image.index.file_chunks(id).next().unwrap().chunk;
        cache.chunk_path(&image.index.chunk(chunk).unwrap().digest)
    };
    let (one, cold) = (chunk_file(b"one"), chunk_file(b"cold"));
    let files = [&assembled_multi, &one, &cold];
    for path in files {
        evict_from_page_cache(path);
        assert_eq!(
            resident_bytes(path),
            0,
            "{} left the page cache",
            path.display()
        );
    }

    // A start that will read `one` and `multi`, not `cold`.
    let planned: Vec<u32> = [&b"multi"[..], b"one"]
        .iter()
        .flat_map(|path| {
            let id = image.index.resolve(path).unwrap();
            image
                .index
                .file_chunks(id)
                .map(|piece| piece.chunk)
                .collect::<Vec<_>>()
        })
        .collect();
    let bytes = warm_page_cache(&image.index, &cache, Some(&assembly), &planned);
    assert_eq!(
        bytes,
        (5 * 65536 + 99) + 100_000,
        "multi's range and one's chunk"
    );
    for path in [&assembled_multi, &one] {
        let resident =
            stoker_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
                resident_bytes(path) > 0
            });
        assert!(resident, "{} read into the page cache", path.display());
    }
    assert_eq!(resident_bytes(&cold), 0, "cold is not part of the start");
}

/// Writes `path` back and drops its pages from the page cache.
fn evict_from_page_cache(path: &std::path::Path) {
    let file = File::open(path).unwrap();
    file.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// Bytes of `path` in the page cache, from util-linux's `fincore`.
fn resident_bytes(path: &std::path::Path) -> u64 {
    let output = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "fincore: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}
