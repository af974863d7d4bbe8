//! Resuming a mount in a new process ([`stoker_lazyfs::resume`]): a child process
//! mounts an image and is SIGKILLed; this process, which took a copy of the
//! mount's `/dev/fuse` descriptor, resumes the mount:
//!
//! - a read that waited on the killed child returns the right bytes (the kernel
//!   resent it), with no error and no remount;
//! - files kept open across the kill, one opened with passthrough and one in
//!   cached mode, can be opened again (the kernel refuses an open in another mode
//!   or with another backing file), every other file passes through, and once
//!   the old opens are closed their files pass through too.

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
/// Set in the child of [`OPEN_TEST`]: the chunk cache and open-state file to use.
const CHILD_CACHE_ENV: &str = "STOKER_RESUME_TEST_CACHE";
const CHILD_STATE_ENV: &str = "STOKER_RESUME_TEST_STATE";
const TEST: &str = "a_read_waiting_on_a_killed_server_is_answered_by_the_resumed_mount";
const OPEN_TEST: &str = "files_open_across_a_crash_are_opened_again_in_their_mode_after_resume";

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

/// The child of [`OPEN_TEST`]: mounts [`open_image`] over a working source, a
/// chunk cache and an open-state file given by the parent, prints the mount's
/// `/dev/fuse` descriptor number, then answers each line on its standard input
/// with its count of passthrough opens, until it is killed.
fn serve_opens_in_child(mountpoint: &Path) {
    let var = |name: &str| PathBuf::from(std::env::var_os(name).expect(name));
    let cache = ChunkCache::open(var(CHILD_CACHE_ENV), 1 << 30).expect("cache");
    let (_source, fetcher) = fetcher_for(&open_image(), cache);
    let handle = stoker_lazyfs::mount(
        Arc::clone(&open_image().index),
        fetcher,
        mountpoint,
        MountOptions {
            open_state: Some(var(CHILD_STATE_ENV)),
            ..MountOptions::default()
        },
    )
    .expect("mount in the child");
    use std::os::fd::AsRawFd;
    println!("\nchild: fd {}", handle.fuse_device().as_raw_fd());
    for _ in std::io::stdin().lines() {
        println!(
            "\nchild: passthrough opens {}",
            handle.counters().passthrough_opens
        );
    }
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
    let mut next_line = child_reports(child.0.stdout.take().expect("child stdout"));
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

/// Three single-chunk files: two are cached before the mount, one is not.
fn open_image() -> TestImage {
    let mut b = ImageBuilder::new();
    for (seed, name) in [(11, "passed"), (12, "cached"), (13, "fresh")] {
        b.file(
            Tree::ROOT,
            name.as_bytes(),
            &pattern(seed, 200_000),
            1 << 20,
            meta(0o644, 0, 0),
        );
    }
    b.finish()
}

#[test]
fn files_open_across_a_crash_are_opened_again_in_their_mode_after_resume() {
    if let Some(mountpoint) = std::env::var_os(CHILD_ENV) {
        serve_opens_in_child(Path::new(&mountpoint));
        return;
    }
    if !fuse_available(OPEN_TEST) {
        return;
    }
    let image = open_image();
    let cache_dir = tempfile::tempdir().expect("cache dir");
    {
        let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
        image.warm(&cache, b"passed");
        image.warm(&cache, b"fresh");
    }
    let run_dir = tempfile::tempdir().expect("runtime dir");
    let state = run_dir.path().join("mount.open-state");
    let dir = tempfile::tempdir().expect("mount point");
    let mountpoint: PathBuf = dir.path().canonicalize().expect("canonical mount point");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", OPEN_TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &mountpoint)
            .env(CHILD_CACHE_ENV, cache_dir.path())
            .env(CHILD_STATE_ENV, &state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the serving child"),
    );
    let mut ask = child.0.stdin.take().expect("child stdin");
    let mut next_line = child_reports(child.0.stdout.take().expect("child stdout"));
    let fd: i32 = next_line("fd").parse().expect("descriptor number");
    let kept = take_descriptor(child.0.id(), fd);
    let mut child_passthrough_opens = || {
        use std::io::Write;
        ask.write_all(b"?\n").expect("ask the child");
        next_line("passthrough opens")
            .parse::<u64>()
            .expect("a count")
    };

    // Kept open across the crash: one file passed through, one read through the
    // filesystem (its chunk was not cached when it was opened).
    let passed = std::fs::File::open(mountpoint.join("passed")).expect("open passed");
    assert_eq!(
        child_passthrough_opens(),
        1,
        "passed is opened with passthrough"
    );
    let mut cached = std::fs::File::open(mountpoint.join("cached")).expect("open cached");
    let mut bytes = Vec::new();
    cached.read_to_end(&mut bytes).expect("read cached");
    assert!(bytes == image.content(b"cached"));
    assert_eq!(
        child_passthrough_opens(),
        1,
        "cached is opened in cached mode"
    );

    child.0.kill().expect("SIGKILL the child");
    child.0.wait().expect("reap the child");
    assert!(is_mounted(&mountpoint), "the mount outlived its server");
    assert!(state.exists(), "the open-state file outlived its writer");

    let cache = ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache");
    let (_source, fetcher) = fetcher_for(&image, cache);
    let handle = stoker_lazyfs::resume(
        Arc::clone(&image.index),
        fetcher,
        &mountpoint,
        kept,
        MountOptions {
            open_state: Some(state.clone()),
            ..MountOptions::default()
        },
    )
    .expect("resume the mount");
    let read = |name: &str| std::fs::read(mountpoint.join(name));
    let passthrough_opens = || handle.counters().passthrough_opens;

    // Open again in passthrough mode, with the backing file the child registered.
    let again = read("passed").expect("open passed again after the resume");
    assert!(again == image.content(b"passed"), "passed reads right");
    assert_eq!(passthrough_opens(), 1, "passed is passed through again");
    let mut old = vec![0; 1000];
    use std::os::unix::fs::FileExt;
    passed
        .read_exact_at(&mut old, 5000)
        .expect("read the old open of passed");
    assert!(old[..] == image.content(b"passed")[5000..6000]);
    // Open again in cached mode, though its chunk is cached now.
    let again = read("cached").expect("open cached again after the resume");
    assert!(again == image.content(b"cached"), "cached reads right");
    assert_eq!(
        passthrough_opens(),
        1,
        "cached stays in cached mode while open"
    );
    // Not open before: passed through.
    let fresh = read("fresh").expect("open fresh");
    assert!(fresh == image.content(b"fresh"), "fresh reads right");
    assert_eq!(passthrough_opens(), 2, "fresh is passed through");

    // The old opens' releases reach this process: cached passes through then.
    drop(passed);
    drop(cached);
    let passed_through = stoker_testkit::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(20),
        || {
            let before = passthrough_opens();
            read("cached").is_ok_and(|b| b == image.content(b"cached"))
                && passthrough_opens() > before
        },
    );
    assert!(
        passed_through,
        "cached is passed through once its old open is closed"
    );
    handle.unmount().expect("unmount");
    assert!(!is_mounted(&mountpoint));
    assert!(!state.exists(), "unmounting deletes the open-state file");
}

#[test]
fn when_the_open_state_cannot_be_written_it_is_deleted_and_new_files_are_not_passed_through() {
    let test =
        "when_the_open_state_cannot_be_written_it_is_deleted_and_new_files_are_not_passed_through";
    if !fuse_available(test) {
        return;
    }
    let Some(tmpfs) = Tmpfs::mount(64 << 10) else {
        panic!("{test}: mount -t tmpfs failed (we are root)");
    };
    let state = tmpfs.path().join("mount.open-state");
    let image = open_image();
    let mounted = mount_image(
        &image,
        1 << 30,
        MountOptions {
            open_state: Some(state.clone()),
            ..MountOptions::default()
        },
        |cache| {
            image.warm(cache, b"passed");
            image.warm(cache, b"fresh");
        },
    );
    assert!(state.exists(), "the mount creates its open-state file");
    tmpfs.fill();

    // Answered with passthrough, but the open cannot be recorded.
    let passed = std::fs::read(mounted.path("passed")).expect("read passed");
    assert!(passed == image.content(b"passed"));
    assert_eq!(mounted.handle.counters().passthrough_opens, 1);
    assert!(
        !state.exists(),
        "an open-state file that cannot be written is deleted"
    );
    // Still served, without passthrough: a resumed mount, finding no open-state
    // file, would answer every open in cached mode, which this open matches.
    let fresh = std::fs::read(mounted.path("fresh")).expect("read fresh");
    assert!(fresh == image.content(b"fresh"));
    assert_eq!(
        mounted.handle.counters().passthrough_opens,
        1,
        "fresh is not passed through"
    );
}

/// Reads the serving child's reports: each call returns what follows
/// `child: WHAT` on the next line that has it (the test harness may have
/// started the line), and panics if the child exits first.
fn child_reports(stdout: std::process::ChildStdout) -> impl FnMut(&str) -> String {
    let mut lines = BufReader::new(stdout).lines();
    move |what: &str| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the child exited before {what}"))
            .expect("read child output");
        if let Some((_, rest)) = line.split_once(&format!("child: {what}")) {
            return rest.trim().to_string();
        }
    }
}
