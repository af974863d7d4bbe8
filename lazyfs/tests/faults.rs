//! Fault injection at the level a container sees: reads through a real FUSE mount of an
//! image converted by stoker-convert and served by a real `docker-registry`, with the
//! testkit's [`FaultProxy`] between the fetcher and the registry.
//!
//! Every scenario asserts the same two things: a read returns the right bytes or fails
//! with EIO — never wrong bytes — and once the fault clears the same read returns the
//! right bytes. The time from "fault cleared" to the first correct read is printed as a
//! `RECOVERY | scenario | ms` line (`make test-faults` collects them into a table);
//! nothing asserts on time.
//!
//! Registry-client-level faults (each retry, each status) are in
//! `registry/tests/faults.rs`; this file checks what they become at the mount.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use stoker_cache::ChunkCache;
use stoker_convert::{ConvertOptions, ImageStore};
use stoker_fetch::{FetchConfig, Fetcher, RegistrySource};
use stoker_format::{ChunkLocation, Index};
use stoker_lazyfs::{MountHandle, MountOptions};
use stoker_registry::{RegistryClient, RegistryConfig, RetryPolicy, parse_reference};
use stoker_testkit::fault_proxy::{Fault, FaultProxy, Listener, ProxyAuth, Scope};
use stoker_testkit::image::{Entry, Generator, ImageBuilder, push_layout};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;
use tempfile::TempDir;

const REPO: &str = "faults/image";
/// Deadline for one ranged read, retries included: short, so faults end in EIO quickly.
const READ_DEADLINE: Duration = Duration::from_secs(3);
/// Liveness bound for any single file read: a read that has not returned by then is
/// hung (a bug), not slow. Far above the deadline; not a timing assertion.
const HANG: Duration = Duration::from_secs(90);
const USER: &str = "fault-user";
const PASSWORD: &str = "fault-pw-4c1d9e-never-logged";

const LARGE: &str = "data/large";
const MEDIUM: &str = "data/medium";
const LARGE_SIZE: u64 = 12 * 1024 * 1024 + 5;
const MEDIUM_SIZE: u64 = 3 * 1024 * 1024 + 17;
const SMALL_FILES: usize = 12;

fn small(i: usize) -> String {
    format!("data/small-{i}")
}

/// The files of the test image and their contents.
fn image_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert(LARGE.to_string(), Generator::random(LARGE_SIZE, 7).to_vec());
    files.insert(
        MEDIUM.to_string(),
        Generator::random(MEDIUM_SIZE, 8).to_vec(),
    );
    for i in 0..SMALL_FILES {
        files.insert(
            small(i),
            Generator::random(3000 + 1777 * i as u64, 100 + i as u64).to_vec(),
        );
    }
    files
}

/// Every test needs root, /dev/fuse, docker-registry and skopeo; says so loudly if not.
fn can_run(test: &str) -> bool {
    common::fuse_available(test)
        && stoker_testkit::require_tool(test, "docker-registry")
        && stoker_testkit::require_tool(test, "skopeo")
}

fn registry_config(basic_auth: Option<(String, String)>) -> RegistryConfig {
    RegistryConfig {
        plain_http: true,
        docker_config: None,
        basic_auth,
        request_timeout: Duration::from_secs(1),
        read_deadline: READ_DEADLINE,
        retry: RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(300),
        },
        ..RegistryConfig::default()
    }
}

/// A converted image in a real registry, the fault proxy in front of it, and the image
/// mounted through the proxy. Fields drop in order: the mount goes first.
struct Fixture {
    mount: Option<MountHandle>,
    fetcher: Fetcher,
    proxy: FaultProxy,
    registry: TestRegistry,
    index: Arc<Index>,
    files: BTreeMap<String, Vec<u8>>,
    client: RegistryClient,
    mountpoint: TempDir,
    cache_dir: PathBuf,
    _work: TempDir,
    runtime: tokio::runtime::Runtime,
}

struct Setup {
    basic_auth: bool,
    cache_dir: Option<PathBuf>,
    cache_bytes: u64,
    mount: MountOptions,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            basic_auth: false,
            cache_dir: None,
            cache_bytes: 1 << 30,
            mount: fault_mount_options(),
        }
    }
}

/// Each scenario reads a file to see what a fault does to a registry request,
/// so no read may be answered by a chunk that rode along with an earlier miss:
/// blob-order read-ahead is off here (reads.rs covers it, with faults too).
fn fault_mount_options() -> MountOptions {
    MountOptions {
        miss_readahead_bytes: 0,
        ..MountOptions::default()
    }
}

impl Fixture {
    fn start(setup: Setup) -> Fixture {
        capture_logs();
        stoker_registry::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let registry = TestRegistry::start().expect("docker-registry");
        let work = tempfile::tempdir().expect("work dir");
        let files = image_files();
        let mut entries = vec![Entry::dir("data")];
        for (path, bytes) in &files {
            entries.push(Entry::file(path.as_str(), bytes.clone()));
        }
        let layout = work.path().join("layout");
        ImageBuilder::new()
            .layer(entries)
            .write_layout(&layout, "v1")
            .expect("write layout");
        push_layout(&layout, "v1", &registry.host(), &format!("{REPO}:v1")).expect("skopeo push");

        // Convert and find the artifact directly at the registry; chunks are then read
        // through the proxy.
        let direct = RegistryClient::new(registry_config(None)).expect("client");
        let (store, selector) =
            ImageStore::registry(direct, &format!("{}/{REPO}:v1", registry.host()))
                .expect("reference");
        let index = runtime.block_on(async {
            stoker_convert::convert(&store, &selector, &ConvertOptions::default())
                .await
                .expect("convert");
            let found = stoker_convert::find_artifact(&store, &selector, None)
                .await
                .expect("artifact");
            stoker_convert::load_index(&store, &found)
                .await
                .expect("index")
        });
        let proxy = runtime
            .block_on(FaultProxy::start(&registry.host()))
            .expect("fault proxy");
        let credentials = setup
            .basic_auth
            .then(|| (USER.to_string(), PASSWORD.to_string()));
        if credentials.is_some() {
            proxy.require_auth(ProxyAuth {
                basic: Some((USER.into(), PASSWORD.into())),
                identity_token: None,
                token_max_uses: None,
            });
        }
        let client = RegistryClient::new(registry_config(credentials)).expect("client");
        let cache_dir = setup.cache_dir.unwrap_or_else(|| work.path().join("cache"));
        let index = Arc::new(index);
        let fetcher = new_fetcher(&client, &proxy, &cache_dir, setup.cache_bytes);
        let mountpoint = tempfile::tempdir().expect("mount point");
        let mut fixture = Fixture {
            mount: None,
            fetcher,
            proxy,
            registry,
            index,
            files,
            client,
            mountpoint,
            cache_dir,
            _work: work,
            runtime,
        };
        fixture.mount(setup.mount);
        fixture
    }

    fn mount(&mut self, options: MountOptions) {
        let _inside = self.runtime.enter();
        self.mount = Some(
            stoker_lazyfs::mount(
                Arc::clone(&self.index),
                self.fetcher.clone(),
                self.mountpoint.path(),
                options,
            )
            .expect("mount"),
        );
    }

    /// Unmounts, then mounts again over a freshly opened cache on the same directory
    /// and a new fetcher: what a restarted `stoker mount` or agent does.
    fn remount(&mut self, options: MountOptions) {
        if let Some(handle) = self.mount.take() {
            handle.unmount().expect("unmount");
        }
        let capacity = self.fetcher.cache().capacity();
        self.fetcher = new_fetcher(&self.client, &self.proxy, &self.cache_dir, capacity);
        self.mount(options);
    }

    /// Takes the proxy's listener down or back up (it listens again inside the runtime).
    fn set_registry_reachable(&self, reachable: bool) {
        let _inside = self.runtime.enter();
        self.proxy
            .set_down(!reachable)
            .expect("switching the proxy");
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.path().join(relative)
    }

    fn expected(&self, relative: &str) -> &[u8] {
        &self.files[relative]
    }

    /// Reads `relative` whole. Every byte returned is checked: `Ok` means the whole
    /// file, correct; `Err` is the errno the read failed with.
    fn read(&self, relative: &str) -> Result<(), i32> {
        read_checked(&self.path(relative), self.expected(relative))
    }

    /// Asserts that reading `relative` fails with EIO (and returns no wrong bytes).
    fn assert_eio(&self, scenario: &str, relative: &str) {
        let errors_before = self.fuse_read_errors();
        let started = Instant::now();
        let outcome = self.read(relative);
        assert_eq!(
            outcome,
            Err(libc::EIO),
            "{scenario}: reading {relative} under the fault"
        );
        eprintln!(
            "{scenario}: EIO after {} ms (read deadline {} ms, {} FUSE reads failed)",
            started.elapsed().as_millis(),
            READ_DEADLINE.as_millis(),
            self.fuse_read_errors() - errors_before
        );
    }

    fn fuse_read_errors(&self) -> u64 {
        self.mount
            .as_ref()
            .map_or(0, |handle| handle.counters().read_errors)
    }

    /// Reads `relative` until it is correct; prints the time since `cleared`.
    fn assert_recovers(&self, scenario: &str, relative: &str, cleared: Instant) {
        let mut last = Ok(());
        let mut attempts = 0;
        let recovered = wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            attempts += 1;
            last = self.read(relative);
            last.is_ok()
        });
        assert!(
            recovered,
            "{scenario}: {relative} still fails after the fault cleared: {last:?}"
        );
        report_recovery(scenario, cleared.elapsed());
        eprintln!("{scenario}: correct on read attempt {attempts} after the fault cleared");
    }

    /// The chunks of file `relative`, in file order.
    fn chunks(&self, relative: &str) -> Vec<ChunkLocation> {
        let id = self.index.resolve(relative.as_bytes()).expect("path");
        self.index
            .file_chunks(id)
            .map(|piece| self.index.chunk(piece.chunk).expect("chunk"))
            .collect()
    }

    fn blob_gets(&self) -> Vec<stoker_testkit::fault_proxy::ProxiedRequest> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.is_blob_get())
            .collect()
    }
}

fn new_fetcher(
    client: &RegistryClient,
    proxy: &FaultProxy,
    cache_dir: &Path,
    cache_bytes: u64,
) -> Fetcher {
    let cache = ChunkCache::open(cache_dir, cache_bytes).expect("open cache");
    let repo = parse_reference(&format!("{}/{REPO}", proxy.host())).expect("reference");
    let source = RegistrySource::new(client.clone(), repo);
    Fetcher::new(Arc::new(source), cache, FetchConfig::default())
}

/// Reads `path` in 1 MiB preads on a helper thread (so a hung read fails the test
/// instead of hanging it), checking every byte returned against `expected`.
fn read_checked(path: &Path, expected: &[u8]) -> Result<(), i32> {
    let path = path.to_path_buf();
    let expected = expected.to_vec();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(read_and_compare(&path, &expected));
    });
    match outcome.recv_timeout(HANG) {
        Ok(Ok(result)) => result,
        Ok(Err(wrong)) => panic!("{wrong}"),
        Err(_) => panic!("a read did not return within {HANG:?}: hung"),
    }
}

/// `Ok(Ok(()))`: all correct; `Ok(Err(errno))`: failed cleanly; `Err(text)`: wrong
/// bytes or a short file (the one outcome that must never happen).
fn read_and_compare(path: &Path, expected: &[u8]) -> Result<Result<(), i32>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => return Ok(Err(e.raw_os_error().unwrap_or(-1))),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0usize;
    loop {
        match file.read_at(&mut buf, offset as u64) {
            Ok(0) => break,
            Ok(n) => {
                let end = offset + n;
                if end > expected.len() || buf[..n] != expected[offset..end] {
                    return Err(format!(
                        "WRONG BYTES from {}: {n} bytes at offset {offset}",
                        path.display()
                    ));
                }
                offset = end;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(e.raw_os_error().unwrap_or(-1))),
        }
    }
    if offset != expected.len() {
        return Err(format!(
            "{} ended at {offset} of {} bytes",
            path.display(),
            expected.len()
        ));
    }
    Ok(Ok(()))
}

fn report_recovery(scenario: &str, elapsed: Duration) {
    // One write, so the line is not split by the test harness's own output.
    let line = format!(
        "RECOVERY | {scenario} | {:.1}\n",
        elapsed.as_secs_f64() * 1000.0
    );
    eprint!("{line}");
}

/// Parses `bytes=a-b` into `a..b+1`.
fn parse_range(header: &str) -> Option<std::ops::Range<u64>> {
    let (start, end) = header.strip_prefix("bytes=")?.split_once('-')?;
    Some(start.parse().ok()?..end.parse::<u64>().ok()? + 1)
}

// ---- log capture: the disk-full and credential checks read what tracing wrote ----

fn log_buffer() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        log_buffer()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends every tracing event of this test binary (all levels of Stoker's crates) to
/// an in-memory buffer.
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,h2=info,reqwest=info,oci_client=info")
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

// ---- issue 3 ----

#[test]
fn registry_stopped_before_a_read_gives_eio_then_the_same_read_succeeds() {
    let test = "registry_stopped_before_a_read_gives_eio_then_the_same_read_succeeds";
    if !can_run(test) {
        return;
    }
    let mut f = Fixture::start(Setup::default());
    // Metadata needs no registry.
    f.registry.stop();
    let listed = std::fs::read_dir(f.path("data")).expect("readdir").count();
    assert_eq!(listed, SMALL_FILES + 2);

    // The registry process is gone: the proxy answers 502, retried until the deadline.
    f.assert_eio("registry process stopped", MEDIUM);
    assert!(
        !f.chunks(MEDIUM)
            .iter()
            .any(|c| f.fetcher.cache().contains(&c.digest)),
        "nothing was cached while the registry was down"
    );
    f.registry.restart().expect("restart registry");
    f.assert_recovers("registry process stopped", MEDIUM, Instant::now());

    // Nothing listening at all (connection refused): same outcome.
    f.set_registry_reachable(false);
    f.assert_eio("registry unreachable (connection refused)", LARGE);
    let cleared = Instant::now();
    f.set_registry_reachable(true);
    f.assert_recovers("registry unreachable (connection refused)", LARGE, cleared);
}

#[test]
fn registry_down_in_the_middle_of_a_read_gives_eio_or_right_bytes_then_recovers() {
    let test = "registry_down_in_the_middle_of_a_read_gives_eio_or_right_bytes_then_recovers";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    // Bodies stall after 1000 bytes; once a blob response is under way, the registry
    // goes away, cutting the connection mid-body.
    f.proxy
        .set_fault_with(Fault::StallBody { after_bytes: 1000 }, Scope::Blobs, None);
    let path = f.path(LARGE);
    let expected = f.expected(LARGE).to_vec();
    let reader = std::thread::spawn(move || read_checked(&path, &expected));
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
            f.proxy.count(|r| r.is_blob_get()) > 0
        }),
        "no blob read reached the proxy"
    );
    f.set_registry_reachable(false);
    let outcome = reader.join().expect("reader thread");
    assert_eq!(outcome, Err(libc::EIO), "read cut mid-body");
    f.proxy.clear_faults();
    let cleared = Instant::now();
    f.set_registry_reachable(true);
    f.assert_recovers("registry down mid-read", LARGE, cleared);
}

#[test]
fn flipped_bytes_give_eio_or_right_bytes_and_are_counted() {
    let test = "flipped_bytes_give_eio_or_right_bytes_and_are_counted";
    if !can_run(test) {
        return;
    }
    let options = MountOptions {
        readahead_bytes: 0,
        ..fault_mount_options()
    };
    let f = Fixture::start(Setup {
        mount: options,
        ..Setup::default()
    });

    // One tampered response: the bad chunk is refetched once, the reader never notices.
    f.proxy
        .set_fault_with(Fault::FlipByte { offset: 100 }, Scope::Blobs, Some(1));
    assert_eq!(f.read(&small(0)), Ok(()), "one flip, then a clean refetch");
    let after_one = f.fetcher.stats().verification_failures;
    assert!(after_one >= 1, "the flip was counted: {after_one}");

    // Every response tampered: EIO, twice counted per chunk, nothing cached.
    f.proxy
        .set_fault_with(Fault::FlipByte { offset: 100 }, Scope::Blobs, None);
    f.assert_eio("bytes flipped in every body", MEDIUM);
    let stats = f.fetcher.stats();
    assert!(
        stats.verification_failures >= after_one + 2,
        "first attempt and refetch both counted: {stats:?}"
    );
    let first = f.chunks(MEDIUM)[0];
    assert!(
        !f.fetcher.cache().contains(&first.digest),
        "a chunk that failed verification was cached"
    );
    // A second read under the same fault fails again (no bad bytes kept anywhere).
    assert_eq!(f.read(MEDIUM), Err(libc::EIO));
    assert!(logs().contains("chunk from registry failed verification"));

    f.proxy.clear_faults();
    f.assert_recovers("bytes flipped in a body", MEDIUM, Instant::now());
}

#[test]
fn eight_concurrent_readers_of_a_large_file_fetch_each_chunk_once() {
    let test = "eight_concurrent_readers_of_a_large_file_fetch_each_chunk_once";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    f.proxy.clear_requests();
    let readers: Vec<_> = (0..8)
        .map(|r| {
            let path = f.path(LARGE);
            let expected = f.expected(LARGE).to_vec();
            std::thread::spawn(move || {
                // Different read sizes and starting points, so readers overlap unevenly.
                let file = File::open(&path).expect("open");
                let step = [4096, 65536, 131072, 1 << 20][r % 4];
                let start = (r * 1_500_000) % expected.len();
                let mut buf = vec![0u8; step];
                for (from, to) in [(start, expected.len()), (0, start)] {
                    let mut offset = from;
                    while offset < to {
                        let want = step.min(to - offset);
                        let n = file.read_at(&mut buf[..want], offset as u64).expect("read");
                        assert_eq!(n, want, "reader {r}: short read at {offset}");
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
        reader.join().expect("reader");
    }
    let gets = f.blob_gets();
    let ranges: Vec<_> = gets
        .iter()
        .map(|r| {
            r.range
                .as_deref()
                .and_then(parse_range)
                .expect("ranged GET")
        })
        .collect();
    for (i, chunk) in f.chunks(LARGE).iter().enumerate() {
        let wanted = chunk.compressed_range();
        let covering = ranges
            .iter()
            .filter(|r| r.start <= wanted.start && wanted.end <= r.end)
            .count();
        assert_eq!(
            covering, 1,
            "chunk {i} of {LARGE} was in {covering} registry requests: {ranges:?}"
        );
    }
    eprintln!(
        "8 readers, {} chunks: {} ranged GETs at the proxy, {} single-flight joins",
        f.chunks(LARGE).len(),
        gets.len(),
        f.fetcher.stats().flight_joins
    );
}

#[test]
fn a_cache_smaller_than_the_image_serves_a_full_walk_correctly_within_its_bound() {
    let test = "a_cache_smaller_than_the_image_serves_a_full_walk_correctly_within_its_bound";
    if !can_run(test) {
        return;
    }
    let capacity = 3 << 20;
    let f = Fixture::start(Setup {
        cache_bytes: capacity,
        ..Setup::default()
    });
    let paths: Vec<String> = f.files.keys().cloned().collect();
    let mut peak = 0;
    for _ in 0..2 {
        for path in &paths {
            assert_eq!(f.read(path), Ok(()), "{path}");
            peak = peak.max(f.fetcher.cache().usage().bytes);
        }
    }
    let usage = f.fetcher.cache().usage();
    assert!(usage.evictions > 0, "the cache had to evict: {usage:?}");
    // Pinned chunks may push usage over the bound briefly (cache crate docs); once
    // reads are done it is back under it.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            f.fetcher.cache().usage().bytes <= capacity
        }),
        "cache above its bound when idle: {:?}",
        f.fetcher.cache().usage()
    );
    eprintln!(
        "cache bound {capacity} B: peak {peak} B while reading, {} evictions",
        usage.evictions
    );
}

// ---- issue 8: registry faults ----

#[test]
fn flapping_5xx_are_retried_and_a_persistent_5xx_gives_eio_then_recovers() {
    let test = "flapping_5xx_are_retried_and_a_persistent_5xx_gives_eio_then_recovers";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    f.proxy
        .set_fault_with(Fault::Status(503), Scope::Blobs, Some(2));
    assert_eq!(f.read(&small(1)), Ok(()), "two 503s are retried");
    assert!(f.blob_gets().iter().any(|r| r.status == 503));

    f.proxy
        .set_fault_with(Fault::Status(500), Scope::Blobs, None);
    f.assert_eio("5xx until cleared", &small(2));
    f.proxy.clear_faults();
    f.assert_recovers("flapping 5xx", &small(2), Instant::now());
}

#[test]
fn too_many_requests_with_retry_after_is_waited_out_or_gives_eio_then_recovers() {
    let test = "too_many_requests_with_retry_after_is_waited_out_or_gives_eio_then_recovers";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    f.proxy.set_fault_with(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Scope::Blobs,
        Some(1),
    );
    let started = Instant::now();
    assert_eq!(f.read(&small(3)), Ok(()), "one 429 is waited out");
    eprintln!(
        "one 429 (Retry-After: 1): correct bytes after {} ms",
        started.elapsed().as_millis()
    );
    assert!(f.blob_gets().iter().any(|r| r.status == 429));

    f.proxy.set_fault_with(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Scope::Blobs,
        None,
    );
    f.assert_eio("429 until cleared", &small(4));
    f.proxy.clear_faults();
    f.assert_recovers("429 with Retry-After", &small(4), Instant::now());
}

#[test]
fn truncated_bodies_give_eio_or_right_bytes_then_recover() {
    let test = "truncated_bodies_give_eio_or_right_bytes_then_recover";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    f.proxy.set_fault_with(
        Fault::TruncateBody { after_bytes: 1000 },
        Scope::Blobs,
        Some(1),
    );
    assert_eq!(f.read(MEDIUM), Ok(()), "one truncated body is retried");

    f.proxy.set_fault_with(
        Fault::TruncateBody { after_bytes: 1000 },
        Scope::Blobs,
        None,
    );
    f.assert_eio("bodies truncated until cleared", LARGE);
    f.proxy.clear_faults();
    f.assert_recovers("truncated bodies", LARGE, Instant::now());
}

#[test]
fn slow_and_stalled_bodies_give_right_bytes_or_eio_then_recover() {
    let test = "slow_and_stalled_bodies_give_right_bytes_or_eio_then_recover";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    // Slow but within the per-request timeout: right bytes.
    f.proxy.set_fault_with(
        Fault::Latency(Duration::from_millis(300)),
        Scope::Blobs,
        None,
    );
    assert_eq!(f.read(&small(5)), Ok(()), "slow responses");

    // One stall mid-body: the attempt times out and is retried.
    f.proxy.set_fault_with(
        Fault::StallBody { after_bytes: 1000 },
        Scope::Blobs,
        Some(1),
    );
    assert_eq!(f.read(&small(6)), Ok(()), "one stalled body is retried");

    f.proxy
        .set_fault_with(Fault::StallBody { after_bytes: 1000 }, Scope::Blobs, None);
    f.assert_eio("bodies stalled until cleared", MEDIUM);
    f.proxy.clear_faults();
    f.assert_recovers("stall mid-body", MEDIUM, Instant::now());
}

#[test]
fn an_expired_token_is_renewed_without_a_failed_read() {
    let test = "an_expired_token_is_renewed_without_a_failed_read";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup {
        basic_auth: true,
        ..Setup::default()
    });
    assert_eq!(f.read(&small(7)), Ok(()), "first read, first token");
    let issued = f.proxy.tokens_issued();
    assert!(issued >= 1, "a token was issued");

    f.proxy.expire_tokens();
    let expired = Instant::now();
    assert_eq!(f.read(&small(8)), Ok(()), "read after token expiry");
    report_recovery("401 after token expiry", expired.elapsed());
    assert!(
        f.proxy.tokens_issued() > issued,
        "the client fetched a new token"
    );
    assert!(
        f.blob_gets().iter().any(|r| r.status == 401),
        "the expired token was refused: {:?}",
        f.blob_gets()
    );
    // Neither the password, nor the Basic header it makes, nor a token (the proxy's
    // all start with `faultproxy-token-`) is in the logs, at debug level.
    let logged = logs();
    assert!(!logged.contains(PASSWORD), "the password reached the logs");
    assert!(
        !logged.contains("faultproxy-token-"),
        "a bearer token reached the logs"
    );
    assert!(
        !logged.contains("Basic ") && !logged.contains("Bearer "),
        "an Authorization header reached the logs"
    );
}

#[test]
fn a_redirect_to_a_failing_blob_server_gives_eio_then_recovers() {
    let test = "a_redirect_to_a_failing_blob_server_gives_eio_then_recovers";
    if !can_run(test) {
        return;
    }
    let f = Fixture::start(Setup::default());
    f.proxy.redirect_blobs(true);
    assert_eq!(f.read(&small(9)), Ok(()), "redirected ranged read");
    let redirected = f
        .proxy
        .count(|r| r.listener == Listener::Redirect && r.is_blob_get());
    assert!(redirected >= 1, "the blob came from the redirect target");

    f.proxy.set_redirect_fault(Fault::Status(500), None);
    f.assert_eio("redirect target answers 500", &small(10));
    f.proxy.clear_faults();
    f.assert_recovers("redirect to a failing server", &small(10), Instant::now());

    f.proxy
        .set_redirect_fault(Fault::TruncateBody { after_bytes: 10 }, None);
    f.assert_eio("redirect target truncates", MEDIUM);
    f.proxy.clear_faults();
    f.assert_recovers("redirect target truncating bodies", MEDIUM, Instant::now());
}

// ---- issue 8: the cache disk ----

/// A tmpfs mounted for the test; unmounted (lazily) when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tmpfs dir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "stoker-faults",
            ])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) -> u64 {
    let mut file = File::create(path).expect("filler");
    let block = vec![0xA5u8; 64 << 10];
    let mut written = 0;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
    written
}

#[test]
fn a_full_cache_disk_keeps_serving_from_the_registry_and_says_so() {
    let test = "a_full_cache_disk_keeps_serving_from_the_registry_and_says_so";
    if !can_run(test) {
        return;
    }
    let Some(tmpfs) = Tmpfs::mount(4 << 20) else {
        panic!("{test}: mount -t tmpfs failed (we are root)");
    };
    let cache_dir = tmpfs.path().join("cache");
    let f = Fixture::start(Setup {
        cache_dir: Some(cache_dir),
        ..Setup::default()
    });
    let filler = tmpfs.path().join("filler");
    let filled = fill(&filler);
    eprintln!("cache tmpfs filled with {filled} bytes");

    for path in [LARGE, MEDIUM] {
        assert_eq!(f.read(path), Ok(()), "{path} with the cache disk full");
    }
    let stats = f.fetcher.stats();
    assert!(stats.disk_full_events > 0, "disk full counted: {stats:?}");
    assert!(
        logs().contains("chunk cache disk is full"),
        "disk full logged"
    );
    assert_eq!(f.fetcher.cache().usage().chunks, 0);

    // Room again: the same fetcher caches again, and says so.
    std::fs::remove_file(&filler).expect("remove filler");
    let freed = Instant::now();
    assert_eq!(f.read(&small(11)), Ok(()));
    let chunk = f.chunks(&small(11))[0];
    assert!(
        f.fetcher.cache().contains(&chunk.digest),
        "chunks are cached again once there is room"
    );
    assert!(logs().contains("caching resumed"), "recovery logged");
    report_recovery("cache disk full", freed.elapsed());
    drop(f);
    drop(tmpfs);
}

#[test]
fn corrupted_cache_files_are_detected_and_refetched() {
    let test = "corrupted_cache_files_are_detected_and_refetched";
    if !can_run(test) {
        return;
    }
    let mut f = Fixture::start(Setup::default());
    let paths: Vec<String> = f.files.keys().cloned().collect();
    for path in &paths {
        assert_eq!(f.read(path), Ok(()), "warming {path}");
    }
    let cache = f.fetcher.cache().clone();
    // Flip a byte in the middle of two chunks of the large file, truncate a third, and
    // flip one in a single-chunk file (those are served by passthrough from the chunk
    // file itself once cached).
    let large = f.chunks(LARGE);
    let small_chunk = f.chunks(&small(0))[0];
    let flipped = [large[1], large[5], small_chunk];
    for chunk in &flipped {
        let path = cache.chunk_path(&chunk.digest);
        let mut bytes = std::fs::read(&path).expect("cached chunk file");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, bytes).expect("corrupt chunk file");
    }
    let truncated = large[8];
    let path = cache.chunk_path(&truncated.digest);
    let len = std::fs::metadata(&path).expect("chunk file").len();
    File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(len / 3))
        .expect("truncate chunk file");
    drop(cache);

    // A restarted mount (new process state, same cache directory) checks each chunk
    // file on first open.
    f.remount(fault_mount_options());
    f.proxy.clear_requests();
    let restarted = Instant::now();
    for path in &paths {
        assert_eq!(f.read(path), Ok(()), "{path} after corruption");
    }
    report_recovery("cache files corrupted on disk", restarted.elapsed());
    // Each corrupt file is dropped at least once (two readers opening it at the same
    // moment may both see it fail), and is now back on disk with the right bytes.
    let usage = f.fetcher.cache().usage();
    assert!(
        usage.corrupt_dropped >= 4,
        "corrupt files dropped: {usage:?}"
    );
    for chunk in flipped.iter().chain([&truncated]) {
        let bytes = std::fs::read(f.fetcher.cache().chunk_path(&chunk.digest))
            .expect("refetched chunk cached again");
        assert_eq!(stoker_format::Digest::of(&bytes), chunk.digest);
    }
    let ranges: Vec<_> = f
        .blob_gets()
        .iter()
        .filter_map(|r| r.range.as_deref().and_then(parse_range))
        .collect();
    for chunk in flipped.iter().chain([&truncated]) {
        let wanted = chunk.compressed_range();
        assert!(
            ranges
                .iter()
                .any(|r| r.start <= wanted.start && wanted.end <= r.end),
            "corrupt chunk {} was refetched: {ranges:?}",
            chunk.digest
        );
    }
    // Only the corrupt chunks went back to the registry.
    let refetched: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let corrupt: u64 = flipped
        .iter()
        .chain([&truncated])
        .map(|c| u64::from(c.compressed_len))
        .sum();
    assert!(
        refetched <= corrupt + (256 << 10),
        "refetched {refetched} bytes for {corrupt} corrupt bytes"
    );
    assert!(logs().contains("cached chunk failed verification"));
}
