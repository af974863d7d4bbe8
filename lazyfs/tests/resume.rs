//! Resuming a mount in a new process ([`stoker_lazyfs::resume`]): a child process
//! mounts an image and is SIGKILLed while a read waits on it; this process, which
//! took a copy of the mount's `/dev/fuse` descriptor, resumes the mount, and the
//! waiting read returns the right bytes (the kernel resent it), with no error and
//! no remount.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use futures::future::BoxFuture;
use stoker_cache::ChunkCache;
use stoker_fetch::{BlobSource, Digest, FetchConfig, FetchSourceError, Fetcher};
use stoker_format::Tree;
use stoker_lazyfs::MountOptions;

/// Set in the child: the directory to mount at.
const CHILD_ENV: &str = "STOKER_RESUME_TEST_MOUNTPOINT";
const TEST: &str = "a_read_waiting_on_a_killed_server_is_answered_by_the_resumed_mount";

fn image() -> TestImage {
    let mut b = ImageBuilder::new();
    b.file(
        Tree::ROOT,
        b"waiting",
        &pattern(7, 300_000),
        1 << 20,
        meta(0o644, 0, 0),
    );
    b.file(
        Tree::ROOT,
        b"later",
        &pattern(8, 20_000),
        1 << 20,
        meta(0o644, 0, 0),
    );
    b.finish()
}

/// A registry that takes every request and never answers; it says so on stdout.
struct HangingSource;

impl BlobSource for HangingSource {
    fn read_range<'a>(
        &'a self,
        _blob: &'a Digest,
        _range: std::ops::Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        println!("\nchild: request");
        Box::pin(std::future::pending())
    }
}

/// The child: mounts the image over a hanging source, prints the mount's
/// `/dev/fuse` descriptor number, then serves until it is killed.
fn serve_in_child(mountpoint: &Path) {
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
    let fetcher = Fetcher::new(Arc::new(HangingSource), cache, FetchConfig::default());
    let handle = stoker_lazyfs::mount(
        Arc::clone(&image().index),
        fetcher,
        mountpoint,
        MountOptions::default(),
    )
    .expect("mount in the child");
    use std::os::fd::AsRawFd;
    println!("\nchild: fd {}", handle.fuse_device().as_raw_fd());
    loop {
        std::thread::park();
    }
}

/// The serving child, killed if the test fails before it does so itself.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_getfd(2)`), as root.
fn take_descriptor(pid: u32, fd: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and
    // flags, and returns a new descriptor (close-on-exec) or -1.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    assert!(
        copy >= 0,
        "pidfd_getfd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(copy as i32) }
}

#[test]
fn a_read_waiting_on_a_killed_server_is_answered_by_the_resumed_mount() {
    if let Some(mountpoint) = std::env::var_os(CHILD_ENV) {
        serve_in_child(Path::new(&mountpoint));
        return;
    }
    if !fuse_available(TEST) {
        return;
    }
    let image = image();
    let dir = tempfile::tempdir().expect("mount point");
    let mountpoint: PathBuf = dir.path().canonicalize().expect("canonical mount point");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &mountpoint)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the serving child"),
    );
    let mut lines = BufReader::new(child.0.stdout.take().expect("child stdout")).lines();
    let mut next_line = |what: &str| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the child exited before {what}"))
            .expect("read child output");
        // The test harness may have started the line.
        if let Some((_, rest)) = line.split_once(&format!("child: {what}")) {
            return rest.trim().to_string();
        }
    };
    let fd: i32 = next_line("fd").parse().expect("descriptor number");
    let kept = take_descriptor(child.0.id(), fd);

    // A read the child takes and never answers.
    let waiting_path = mountpoint.join("waiting");
    let (sender, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = sender.send(
            std::fs::File::open(&waiting_path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map(|_| bytes),
        );
    });
    next_line("request");
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().expect("reap the child");
    assert!(is_mounted(&mountpoint), "the mount outlived its server");

    // This process serves the mount now, from a cache and a registry that work.
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
    let (source, fetcher) = fetcher_for(&image, cache);
    let handle = stoker_lazyfs::resume(
        Arc::clone(&image.index),
        fetcher,
        &mountpoint,
        kept,
        MountOptions::default(),
    )
    .expect("resume the mount");
    // A deadline, so that a broken resume fails the test instead of hanging it.
    let waited = waited
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the waiting read ended after the resume");
    assert!(
        waited
            .as_ref()
            .is_ok_and(|bytes| bytes[..] == image.content(b"waiting")[..]),
        "the waiting read got {:?}",
        waited.map(|b| b.len())
    );
    let later = std::fs::read(mountpoint.join("later")).expect("read after the resume");
    assert!(later == image.content(b"later"), "a new read is right");
    assert!(
        source
            .request_count
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    handle.unmount().expect("unmount");
    assert!(!is_mounted(&mountpoint));
}
