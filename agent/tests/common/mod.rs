//! Shared helpers for the agent's integration tests: running the agent (in-process
//! with injected remote-snapshot fakes, or as the real binary), a gRPC client for its
//! socket, and small runnable test images built from host binaries.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use stoker_api::snapshots::snapshots_client::SnapshotsClient;
use stoker_snapshotter::SnapshotterError;
use stoker_snapshotter::{
    ImageResolver, LazyImage, LazyMounter, NoArtifacts, NoLazyMounts, Snapshotter,
    SnapshotterOptions, StokerArtifact,
};
use stoker_testkit::image::{Entry, ImageBuilder, WrittenImage, push_layout};
use stoker_testkit::registry::{LoggedRequest, TestRegistry};
use stoker_testkit::wait_until;

pub const POLL: Duration = Duration::from_millis(20);
pub const DEADLINE: Duration = Duration::from_secs(60);

/// What a test of the real agent binary against a real registry needs: docker-registry,
/// skopeo and root. Says loudly what is missing.
pub fn registry_tests_can_run(test: &str) -> bool {
    ["docker-registry", "skopeo"]
        .iter()
        .all(|tool| stoker_testkit::require_tool(test, tool))
        && stoker_testkit::require_root(test)
}

/// True when everything the containerd tests need is here; prints SKIPPED otherwise.
pub fn containerd_tests_can_run(test: &str) -> bool {
    stoker_testkit::require_root(test)
        && [
            "containerd",
            "ctr",
            "runc",
            "docker-registry",
            "skopeo",
            "umoci",
        ]
        .iter()
        .all(|tool| stoker_testkit::require_tool(test, tool))
        && {
            let ok = Path::new("/proc/filesystems").exists()
                && std::fs::read_to_string("/proc/filesystems")
                    .unwrap_or_default()
                    .contains("overlay");
            if !ok {
                eprintln!("SKIPPED: {test}: the kernel has no overlayfs");
            }
            ok
        }
}

/// [`containerd_tests_can_run`], and /dev/fuse for the lazy mounts; prints
/// SKIPPED otherwise.
pub fn lazy_containerd_tests_can_run(test: &str) -> bool {
    containerd_tests_can_run(test) && {
        let ok = Path::new("/dev/fuse").exists();
        if !ok {
            eprintln!("SKIPPED: {test}: /dev/fuse is absent");
        }
        ok
    }
}

/// A tokio runtime for the async helpers of sync tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A snapshots API client on a unix socket.
pub async fn snapshots_client(socket: &Path) -> SnapshotsClient<tonic::transport::Channel> {
    let channel = stoker_testkit::containerd::unix_channel(socket)
        .await
        .expect("connect to the snapshotter socket");
    SnapshotsClient::new(channel)
}

/// The snapshotter serving on a socket from a thread of its own, with injected
/// resolver and mounter.
pub struct InProcessAgent {
    pub socket: PathBuf,
    pub snapshotter: Arc<Snapshotter>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessAgent {
    pub fn start(
        root: &Path,
        socket: &Path,
        resolver: Arc<dyn ImageResolver>,
        mounter: Arc<dyn LazyMounter>,
    ) -> InProcessAgent {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (root, socket_path) = (root.to_path_buf(), socket.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let snapshotter = Arc::new(
                    Snapshotter::open(&root, resolver, mounter, SnapshotterOptions::default())
                        .await
                        .expect("open snapshotter"),
                );
                let listener =
                    stoker_agent::server::bind_unix_socket(&socket_path).expect("bind socket");
                ready_tx.send(snapshotter.clone()).expect("report ready");
                stoker_agent::server::serve_snapshotter(listener, snapshotter, async {
                    let _ = shutdown_rx.await;
                })
                .await
                .expect("serve");
            });
        });
        let snapshotter = ready_rx
            .recv_timeout(DEADLINE)
            .expect("in-process agent started");
        InProcessAgent {
            socket: socket.to_path_buf(),
            snapshotter,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// An ordinary snapshotter: no image has an artifact.
    pub fn start_plain(root: &Path, socket: &Path) -> InProcessAgent {
        InProcessAgent::start(root, socket, Arc::new(NoArtifacts), Arc::new(NoLazyMounts))
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent process a test started itself; killed (with its worker) when dropped.
pub struct AgentChild(pub Child);

impl AgentChild {
    /// SIGKILL of the agent (its supervisor); returns once its worker, which dies
    /// with it, is gone too, so that a new agent never talks to the old worker.
    pub fn kill9(&mut self) {
        let worker = worker_of(self.0.id());
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(worker) = worker {
            assert!(
                wait_until(DEADLINE, POLL, || !process_alive(worker)),
                "the agent worker {worker} outlived its supervisor"
            );
        }
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let worker = worker_of(self.0.id());
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(worker) = worker {
            let _ = wait_until(DEADLINE, POLL, || !process_alive(worker));
        }
    }
}

/// `GET /metrics` over plain HTTP/1.0 (the body ends when the server closes).
pub fn get_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// The real `stoker-agent` binary, configured through `STOKER_*` variables.
pub struct AgentProcess {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    pub fn start(state_dir: &Path, socket: &Path) -> AgentProcess {
        let mut agent = AgentProcess {
            socket: socket.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            child: None,
            log: state_dir.with_extension("log"),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_stoker-agent"))
            .env("STOKER_STATE_DIR", &self.state_dir)
            .env("STOKER_SNAPSHOTTER_SOCKET", &self.socket)
            .env("STOKER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start stoker-agent");
        self.child = Some(child);
        let socket = self.socket.clone();
        let up = wait_until(DEADLINE, POLL, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(up, "stoker-agent did not listen; log:\n{}", self.log_text());
    }

    /// SIGKILL of the whole agent, supervisor and worker, as `kill -9` of its pod's
    /// processes: no chance to clean up. Returns once both are gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let worker = worker_of(child.id());
            child.kill().expect("SIGKILL stoker-agent");
            child.wait().expect("reap stoker-agent");
            // The worker dies with its supervisor (PR_SET_PDEATHSIG).
            if let Some(worker) = worker {
                assert!(
                    wait_until(DEADLINE, POLL, || !process_alive(worker)),
                    "the agent worker {worker} outlived its supervisor"
                );
            }
        }
    }

    /// The pid of the agent's worker process (the supervisor's child), if it runs.
    pub fn worker_pid(&self) -> Option<u32> {
        worker_of(self.child.as_ref()?.id())
    }

    /// SIGKILL of the agent's worker process only; its supervisor starts a new one.
    /// Returns the killed worker's pid.
    pub fn kill9_worker(&self) -> u32 {
        let worker = self.worker_pid().expect("the agent has a worker process");
        let status = Command::new("kill")
            .args(["-9", &worker.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 {worker}");
        worker
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The first child of process `pid`: an agent supervisor's worker.
pub fn worker_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A resolver that knows one image by its manifest digest.
pub struct FakeResolver {
    pub artifacts: HashMap<String, StokerArtifact>,
    pub calls: AtomicUsize,
}

impl ImageResolver for FakeResolver {
    fn resolve<'a>(
        &'a self,
        _image_ref: &'a str,
        manifest_digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<StokerArtifact>, SnapshotterError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.artifacts.get(manifest_digest).cloned();
        Box::pin(async move { Ok(answer) })
    }
}

/// A lazy mounter that bind-mounts a directory holding the image's extracted tree.
pub struct BindMounter {
    pub tree: PathBuf,
    pub mounts: AtomicUsize,
    pub unmounts: AtomicUsize,
}

impl BindMounter {
    pub fn new(tree: &Path) -> BindMounter {
        BindMounter {
            tree: tree.to_path_buf(),
            mounts: AtomicUsize::new(0),
            unmounts: AtomicUsize::new(0),
        }
    }
}

impl LazyMounter for BindMounter {
    fn mount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        self.mounts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            run_tool("mount", &["--bind", "-o", "ro"], &[&self.tree, mountpoint]).map_err(
                |message| SnapshotterError::Remote {
                    image: image.image_ref.clone(),
                    message,
                },
            )
        })
    }

    fn unmount<'a>(
        &'a self,
        image: &'a LazyImage,
        mountpoint: &'a Path,
    ) -> BoxFuture<'a, Result<(), SnapshotterError>> {
        self.unmounts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            run_tool("umount", &[], &[mountpoint]).map_err(|message| SnapshotterError::Remote {
                image: image.image_ref.clone(),
                message,
            })
        })
    }
}

fn run_tool(tool: &str, args: &[&str], paths: &[&Path]) -> Result<(), String> {
    let output = Command::new(tool)
        .args(args)
        .args(paths)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Entries for a shell and `cat` copied from the host with the libraries they load,
/// so containers can run `sh -c '…'`. Paths follow the host (e.g.
/// `lib/x86_64-linux-gnu/libc.so.6`, `lib64/ld-linux-x86-64.so.2`).
pub fn host_shell_entries() -> Vec<Entry> {
    let mut files: Vec<(String, PathBuf)> = vec![
        ("bin/sh".into(), PathBuf::from("/bin/sh")),
        ("bin/cat".into(), PathBuf::from("/bin/cat")),
    ];
    for binary in ["/bin/sh", "/bin/cat"] {
        let output = Command::new("ldd").arg(binary).output().expect("ldd");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let path = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(path) = path
                && !files.iter().any(|(_, p)| p == Path::new(path))
            {
                files.push((
                    path.trim_start_matches('/').to_string(),
                    PathBuf::from(path),
                ));
            }
        }
    }
    let mut entries = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for (inside, host) in files {
        let mut dir = String::new();
        for component in Path::new(&inside)
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(&component.to_string_lossy());
            if !dirs.contains(&dir) {
                dirs.push(dir.clone());
                entries.push(Entry::dir(dir.clone()));
            }
        }
        let bytes = std::fs::read(&host).expect("read host binary");
        entries.push(Entry::file(inside, bytes).mode(0o755));
    }
    entries
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    stoker_testkit::containerd::mountpoints_under(&dir.display().to_string())
}

/// Lazily unmounts everything under a directory when dropped, so a failing test leaves
/// no mount behind. Declare it after the `TempDir` so it runs first.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let mut mountpoints = mounts_under(&self.0);
        mountpoints.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mountpoint in mountpoints {
            let _ = Command::new("umount").arg("-l").arg(&mountpoint).status();
        }
    }
}

/// A command that reads a file from each layer of [`three_layer_image`] and shows
/// whether layer 3's whiteout hid `data/gone`.
pub const READ_LAYERS: &str = "cat /data/one /data/two /data/three; \
                           if [ -e /data/gone ]; then echo gone-still-there; fi";
/// What [`READ_LAYERS`] prints when the layers are merged right.
pub const EXPECTED: &str = "layer one\nlayer two\nlayer three\n";

/// A runnable three-layer image: a shell from the host in layer 1, one data file per
/// layer, a whiteout in layer 3 of a file from layer 1, and a FIFO to block on.
pub fn three_layer_image(tag_text: &str) -> ImageBuilder {
    let mut first = host_shell_entries();
    first.push(Entry::dir("data"));
    first.push(Entry::file("data/one", "layer one\n"));
    first.push(Entry::file("data/gone", "deleted by layer three\n"));
    first.push(Entry::file("data/tag", tag_text.as_bytes().to_vec()));
    first.push(Entry::fifo("data/fifo"));
    ImageBuilder::new()
        .layer(first)
        .layer(vec![
            Entry::dir("data"),
            Entry::file("data/two", "layer two\n"),
        ])
        .layer(vec![
            Entry::dir("data"),
            Entry::file("data/three", "layer three\n"),
            Entry::whiteout("data/gone"),
        ])
}

/// Builds `image` in a layout under `dir` and pushes it to `registry` as `repo:v1`
/// with skopeo; returns the reference and what was written.
pub fn push(
    registry: &TestRegistry,
    dir: &Path,
    image: &ImageBuilder,
    repo: &str,
) -> (String, WrittenImage) {
    let layout = dir.join(format!("layout-{}", repo.replace('/', "-")));
    let written = image.write_layout(&layout, "v1").expect("write layout");
    push_layout(&layout, "v1", &registry.host(), &format!("{repo}:v1")).expect("push");
    (format!("{}/{repo}:v1", registry.host()), written)
}

/// The logged GETs of `image`'s layer blobs.
pub fn layer_gets(requests: &[LoggedRequest], image: &WrittenImage) -> Vec<String> {
    requests
        .iter()
        .filter(|r| {
            r.is_blob_get()
                && image
                    .layers
                    .iter()
                    .any(|l| r.path.ends_with(&l.blob.digest))
        })
        .map(|r| r.path.clone())
        .collect()
}

/// A registry client for the test registry: plain HTTP, no docker config.
pub fn plain_http_client() -> stoker_registry::RegistryClient {
    stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..Default::default()
    })
    .expect("registry client")
}

/// `stoker convert` of `reference` with the default options, over plain HTTP.
pub fn convert(
    rt: &tokio::runtime::Runtime,
    reference: &str,
) -> Vec<stoker_convert::ConvertReport> {
    rt.block_on(async {
        let (store, selector) =
            stoker_convert::ImageStore::registry(plain_http_client(), reference)?;
        stoker_convert::convert(
            &store,
            &selector,
            &stoker_convert::ConvertOptions::default(),
        )
        .await
    })
    .expect("stoker convert")
}

/// Deterministic, incompressible bytes (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
