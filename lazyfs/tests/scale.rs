//! Bounded memory at scale (issue 8): an image of 1,000,000 files and a 10 GB sparse
//! file is mounted and walked in full (every entry listed and stat'ed, a sample of
//! files and the sparse file read). The filesystem keeps nothing per inode, only per
//! open file, so the serving process's resident memory may grow by no more than
//! [`MOUNT_OVERHEAD_BOUND`] over its decoded index, whatever the number of files.
//!
//! The mount is served by a child process (this test binary, running the ignored
//! test [`serve_mount_for_scale_test`]) that only decodes the index and mounts it, so
//! its memory is not blurred by building a million-file tree.

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use common::{ImageBuilder, TestImage, fuse_available, meta, mount_image, pattern};
use stoker_format::{Digest, Index};
use stoker_lazyfs::MountOptions;

/// What a mount may add to the serving process's resident memory beyond its decoded
/// index (threads, FUSE buffers, the fetch runtime, open files). Documented in
/// docs/RELIABILITY.md.
const MOUNT_OVERHEAD_BOUND: u64 = 64 << 20;

const DIRS: usize = 1_000;
const FILES_PER_DIR: usize = 1_000;
const SPARSE_SIZE: u64 = 10_000_000_000;
const CHILD_ENV: &str = "STOKER_SCALE_TEST_DIR";

/// Resident memory of process `pid`, in bytes.
fn resident_memory(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb << 10)
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn a_million_files_and_a_10_gb_sparse_file_mount_in_bounded_memory() {
    if !fuse_available("a_million_files_and_a_10_gb_sparse_file_mount_in_bounded_memory") {
        return;
    }
    let work = tempfile::tempdir().expect("work dir");
    let (image, index_blob) = {
        let mut b = ImageBuilder::new();
        let root = stoker_format::Tree::ROOT;
        let small = pattern(1, 64);
        for d in 0..DIRS {
            let dir = b.dir(root, format!("d{d:04}").as_bytes(), meta(0o755, 0, 0));
            for f in 0..FILES_PER_DIR {
                let name = format!("f{f:04}");
                b.file(dir, name.as_bytes(), &small, 1 << 20, meta(0o644, 0, 0));
            }
        }
        let data = [
            (0, pattern(2, 4096)),
            (SPARSE_SIZE / 2, pattern(3, 4096)),
            (SPARSE_SIZE - 4096, pattern(4, 4096)),
        ];
        b.sparse_file(root, b"sparse.bin", SPARSE_SIZE, &data, meta(0o644, 0, 0));
        b.finish_with_index_blob()
    };
    std::fs::write(work.path().join("index"), &index_blob).expect("write index");
    std::fs::write(work.path().join("blob"), &image.blob).expect("write blob");
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).expect("mount point");
    let index_bytes = image.index.raw_len() as u64;
    drop(image);

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "serve_mount_for_scale_test",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the serving process");
    let pid = child.id().to_string();
    let mut stdout = BufReader::new(child.stdout.take().expect("child stdout"));
    let before = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read child stdout") == 0 {
            panic!(
                "the serving process exited before mounting: {:?}",
                child.wait()
            );
        }
        if let Some(rss) = line
            .trim()
            .strip_prefix("mounted, resident bytes before mounting: ")
        {
            break rss.parse::<u64>().expect("a number");
        }
    };

    let entries = walk_and_read(&mountpoint);
    assert_eq!(entries, DIRS + DIRS * FILES_PER_DIR + 1);

    let after = resident_memory(&pid);
    drop(child.stdin.take()); // the child unmounts and exits
    let status = child.wait().expect("wait for the serving process");
    assert!(status.success(), "the serving process failed: {status}");
    let grown = after.saturating_sub(before);
    eprintln!(
        "serving process: {} MiB resident with the {} MiB index decoded, {} MiB after walking \
         {entries} entries (+{} MiB; bound +{} MiB)",
        before >> 20,
        index_bytes >> 20,
        after >> 20,
        grown >> 20,
        MOUNT_OVERHEAD_BOUND >> 20
    );
    assert!(
        grown <= MOUNT_OVERHEAD_BOUND,
        "the mount grew resident memory by {} MiB walking {entries} entries (bound {} MiB)",
        grown >> 20,
        MOUNT_OVERHEAD_BOUND >> 20
    );
}

/// Lists and stats every entry depth first, reads a sample of files and the sparse
/// file; returns the number of entries.
fn walk_and_read(root: &Path) -> usize {
    let mut entries = 0usize;
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("readdir") {
            let path = entry.expect("dir entry").path();
            let metadata = std::fs::symlink_metadata(&path).expect("stat");
            entries += 1;
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    for d in (0..DIRS).step_by(97) {
        let path = root.join(format!("d{d:04}/f{:04}", d % FILES_PER_DIR));
        assert_eq!(
            std::fs::read(path).expect("read a small file"),
            pattern(1, 64)
        );
    }
    let sparse = root.join("sparse.bin");
    assert_eq!(std::fs::metadata(&sparse).expect("stat").len(), SPARSE_SIZE);
    let mut file = std::fs::File::open(&sparse).expect("open the sparse file");
    let mut buffer = vec![0u8; 4096];
    for (offset, expected) in [
        (0, pattern(2, 4096)),
        (SPARSE_SIZE / 2, pattern(3, 4096)),
        (SPARSE_SIZE - 4096, pattern(4, 4096)),
        (SPARSE_SIZE / 4, vec![0u8; 4096]),
    ] {
        file.seek(SeekFrom::Start(offset)).expect("seek");
        file.read_exact(&mut buffer).expect("read the sparse file");
        assert!(buffer == expected, "wrong bytes at offset {offset}");
    }
    entries
}

/// The serving side of the test above; run only by it (as a child process).
#[test]
#[ignore = "run by a_million_files_and_a_10_gb_sparse_file_mount_in_bounded_memory"]
fn serve_mount_for_scale_test() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let index_blob = std::fs::read(dir.join("index")).expect("read index");
    let blob = Bytes::from(std::fs::read(dir.join("blob")).expect("read blob"));
    let index = Index::decode_verified(&index_blob, &Digest::of(&index_blob)).expect("decode");
    drop(index_blob);
    let image = TestImage {
        index: Arc::new(index),
        blob_digest: Digest::of(&blob),
        blob,
        chunk_bytes: Default::default(),
    };
    let before = resident_memory("self");
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    // Serve the mount at the parent's path: bind it there.
    let target = dir.join("mnt");
    let status = Command::new("mount")
        .arg("--bind")
        .arg(mounted.mountpoint.path())
        .arg(&target)
        .status()
        .expect("run mount --bind");
    assert!(status.success(), "mount --bind failed");
    println!("mounted, resident bytes before mounting: {before}");
    std::io::stdout().flush().expect("flush");
    // Serve until the parent closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    let _ = Command::new("umount").arg(&target).status();
    drop(mounted);
}
