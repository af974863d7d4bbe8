//! A real containerd for tests: Debian's `containerd` 1.6 with Stoker as a proxy snapshotter.
//!
//! [`TestContainerd::start`] writes a config into a fresh temporary directory and starts
//! `/usr/bin/containerd` with its own root, state, gRPC/ttrpc sockets and registry hosts
//! directory, so it never touches the node's own containerd. The config:
//!
//! - declares the snapshotter under test as a proxy plugin:
//!   `[proxy_plugins.stoker] type = "snapshot", address = <snapshotter socket>`;
//! - enables the CRI plugin with `snapshotter = "stoker"` and
//!   `disable_snapshot_annotations = false`, so CRI passes the
//!   `containerd.io/snapshot/cri.*` labels that remote snapshotters need;
//! - uses runc (`io.containerd.runc.v2`) as the runtime;
//! - points CRI's registry `config_path` at `certs.d/` in the temporary directory;
//!   [`TestContainerd::allow_plain_http`] writes a `hosts.toml` there so a loopback
//!   registry is reached over plain HTTP.
//!
//! # No CNI
//!
//! CNI plugins are not installed: CRI logs "failed to load cni during init" and reports
//! its network as not ready, but `PullImage` works without it. Containers are run with
//! `ctr -n k8s.io run --snapshotter stoker --net-host …` ([`TestContainerd::run`]), which
//! needs no network setup, instead of CRI pod sandboxes.
//!
//! The snapshotter does not need to be running when containerd starts (the proxy plugin
//! connects on first use), but it must be before the first pull.
//!
//! Dropping the value kills containerd and the shims it started (found by their
//! `-address` argument), then lazily unmounts whatever is still mounted under the
//! temporary directory and removes it.
//!
//! # Nodes
//!
//! [`AgentProcess`] runs the `stoker-agent` binary ([`workspace_binary`] finds it in
//! cargo's target directory) with its state, chunk cache and sockets under one
//! directory; with a [`TestContainerd`] pointed at its snapshotter socket it stands in
//! for one node (the local e2e test and `make demo` run several side by side).
//! [`host_binary_entries`] makes images runnable with host binaries (`sh`, `cat`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ListImagesRequest, PullImageRequest, RemoveImageRequest};

use crate::{TestkitError, find_tool, wait_until};

/// How long [`TestContainerd::start`] waits for containerd's socket to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The name under which the snapshotter under test is configured (`--snapshotter stoker`).
pub const SNAPSHOTTER: &str = "stoker";
/// The namespace CRI uses; images pulled through CRI live there.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A running (or stopped) containerd with its own directories, sockets and log.
#[derive(Debug)]
pub struct TestContainerd {
    binary: PathBuf,
    dir: tempfile::TempDir,
    snapshotter_socket: PathBuf,
    child: Option<Child>,
}

impl TestContainerd {
    /// Starts containerd with `snapshotter_socket` as the address of the `stoker` proxy
    /// snapshotter, and waits until containerd's gRPC socket accepts connections.
    ///
    /// Fails with [`TestkitError::ToolMissing`] if `containerd`, `ctr` or `runc` is not
    /// installed.
    pub fn start(snapshotter_socket: &Path) -> Result<TestContainerd, TestkitError> {
        let binary = require("containerd", "install the Debian package `containerd`")?;
        require("ctr", "install the Debian package `containerd`")?;
        require("runc", "install the Debian package `runc`")?;
        // Keep paths short: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("stoker-ctd-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating containerd's temporary directory", e))?;
        let mut containerd = TestContainerd {
            binary,
            dir,
            snapshotter_socket: snapshotter_socket.to_path_buf(),
            child: None,
        };
        containerd.write_config()?;
        containerd.spawn_and_wait()?;
        Ok(containerd)
    }

    /// containerd's gRPC socket (what `ctr --address` and CRI clients connect to).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's persistent root (`root = …` in its config).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// containerd's state directory (`state = …`): task bundles and rootfs mounts.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// containerd's log (stdout and stderr, debug level), useful when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// The configuration file containerd was started with.
    pub fn config_file(&self) -> PathBuf {
        self.config_path()
    }

    /// The snapshotter socket containerd was configured with.
    pub fn snapshotter_socket(&self) -> &Path {
        &self.snapshotter_socket
    }

    /// The last `max_bytes` of containerd's log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        tail(&self.log_path(), max_bytes)
    }

    /// Makes CRI reach the registry at `host` (`HOST:PORT`) over plain HTTP, by writing
    /// `certs.d/HOST:PORT/hosts.toml`. containerd reads it on every pull, so this can be
    /// called at any time. `ctr pull` does not read it: pass `--plain-http` there
    /// ([`TestContainerd::ctr_pull`] does).
    pub fn allow_plain_http(&self, host: &str) -> Result<(), TestkitError> {
        let dir = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TestkitError::io(format!("creating {}", dir.display()), e))?;
        let hosts_toml = format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        let path = dir.join("hosts.toml");
        std::fs::write(&path, hosts_toml)
            .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    /// Runs `ctr --address <socket> -n <namespace> ARGS…` and returns its raw output,
    /// whatever its exit status.
    pub fn ctr_output(&self, namespace: &str, args: &[&str]) -> Result<Output, TestkitError> {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TestkitError::io(format!("running ctr {}", args.join(" ")), e))
    }

    /// Runs `ctr` like [`ctr_output`](Self::ctr_output) and returns its stdout, or
    /// [`TestkitError::ToolFailed`] with its stderr when it exits non-zero.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<String, TestkitError> {
        let output = self.ctr_output(namespace, args)?;
        if !output.status.success() {
            return Err(TestkitError::ToolFailed {
                command: format!("ctr -n {namespace} {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `ctr -n <namespace> images pull --plain-http --snapshotter stoker <image>`: pulls and
    /// unpacks through the snapshotter under test, without the CRI labels.
    pub fn ctr_pull(&self, namespace: &str, image: &str) -> Result<String, TestkitError> {
        self.ctr(
            namespace,
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                SNAPSHOTTER,
                image,
            ],
        )
    }

    /// `ctr -n <namespace> run --rm --snapshotter stoker --net-host <image> <id> CMD…`:
    /// runs a container to completion and returns its stdout.
    pub fn run(
        &self,
        namespace: &str,
        image: &str,
        container_id: &str,
        command: &[&str],
    ) -> Result<String, TestkitError> {
        let mut args = vec![
            "run",
            "--rm",
            "--snapshotter",
            SNAPSHOTTER,
            "--net-host",
            image,
            container_id,
        ];
        args.extend_from_slice(command);
        self.ctr(namespace, &args)
    }

    /// Snapshot keys the stoker snapshotter has in `namespace`, as containerd lists them
    /// (`ctr snapshots --snapshotter stoker ls`), without the header line.
    pub fn snapshot_keys(&self, namespace: &str) -> Result<Vec<String>, TestkitError> {
        let text = self.ctr(
            namespace,
            &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"],
        )?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// Waits until containerd reaches the snapshotter: `ctr snapshots ls` succeeds.
    ///
    /// After the snapshotter restarts, containerd's proxy client reconnects with a
    /// backoff of up to 3 s, and calls fail with `Unavailable` until then.
    pub fn wait_for_snapshotter(&self, timeout: Duration) -> Result<(), TestkitError> {
        let mut last_error = String::new();
        let ready = wait_until(timeout, POLL_INTERVAL, || {
            match self.snapshot_keys(CRI_NAMESPACE) {
                Ok(_) => true,
                Err(e) => {
                    last_error = e.to_string();
                    false
                }
            }
        });
        if ready {
            Ok(())
        } else {
            Err(TestkitError::Timeout {
                what: format!("containerd to reach the snapshotter ({last_error})"),
                waited: timeout,
            })
        }
    }

    /// Pulls `image` through CRI's `ImageService.PullImage` (CRI v1), as the kubelet
    /// does, and returns the image reference CRI answers (the image ID).
    pub async fn cri_pull_image(&self, image: &str) -> Result<String, TestkitError> {
        let mut client = self.cri_image_client().await?;
        let request = PullImageRequest {
            image: Some(image_spec(image)),
            auth: None,
            sandbox_config: None,
        };
        let response = client
            .pull_image(request)
            .await
            .map_err(|status| cri_failed("PullImage", image, status))?;
        Ok(response.into_inner().image_ref)
    }

    /// Removes `image` through CRI's `ImageService.RemoveImage`.
    pub async fn cri_remove_image(&self, image: &str) -> Result<(), TestkitError> {
        let mut client = self.cri_image_client().await?;
        let request = RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        client
            .remove_image(request)
            .await
            .map_err(|status| cri_failed("RemoveImage", image, status))?;
        Ok(())
    }

    /// Every tag and digest reference CRI knows, from `ImageService.ListImages`.
    pub async fn cri_list_images(&self) -> Result<Vec<String>, TestkitError> {
        let mut client = self.cri_image_client().await?;
        let response = client
            .list_images(ListImagesRequest { filter: None })
            .await
            .map_err(|status| cri_failed("ListImages", "", status))?;
        Ok(response
            .into_inner()
            .images
            .into_iter()
            .flat_map(|image| image.repo_tags.into_iter().chain(image.repo_digests))
            .collect())
    }

    /// A CRI v1 image service client connected to containerd's socket.
    pub async fn cri_image_client(
        &self,
    ) -> Result<ImageServiceClient<tonic::transport::Channel>, TestkitError> {
        let channel = unix_channel(&self.socket()).await?;
        let mut client = ImageServiceClient::new(channel);
        // containerd serves its socket before its CRI plugin has initialized, and
        // CRI answers "server is not initialized yet" until then: wait for it.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            match client.list_images(ListImagesRequest { filter: None }).await {
                Err(status)
                    if status.message().contains("not initialized")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                _ => return Ok(client),
            }
        }
    }

    /// True while the containerd process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills containerd and waits for it to exit. Its directories are kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                tracing::warn!(error = %e, "killing containerd");
            }
            if let Err(e) = child.wait() {
                tracing::warn!(error = %e, "waiting for containerd to exit");
            }
        }
    }

    /// Stops containerd if it runs, then starts it again with the same directories.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn_and_wait()
    }

    fn write_config(&self) -> Result<(), TestkitError> {
        let base = self.dir.path();
        let certs_dir = base.join("certs.d");
        std::fs::create_dir_all(&certs_dir)
            .map_err(|e| TestkitError::io(format!("creating {}", certs_dir.display()), e))?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "debug"

[proxy_plugins]
  [proxy_plugins.{SNAPSHOTTER}]
    type = "snapshot"
    address = "{snapshotter}"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stats_collect_period = 10
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{SNAPSHOTTER}"
      disable_snapshot_annotations = false
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{cni}/bin"
      conf_dir = "{cni}/conf"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{certs}"
"#,
            root = self.root_dir().display(),
            state = self.state_dir().display(),
            socket = self.socket().display(),
            snapshotter = self.snapshotter_socket.display(),
            cni = base.join("cni").display(),
            certs = certs_dir.display(),
        );
        let path = self.config_path();
        std::fs::write(&path, config)
            .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn spawn_and_wait(&mut self) -> Result<(), TestkitError> {
        let log = open_append(&self.log_path())?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the containerd log handle", e))?;
        // The runc shim looks runc up in PATH; runc lives in /usr/sbin.
        let path = format!(
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(self.config_path())
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);

        let socket = self.socket();
        let mut exited = None;
        let ready = wait_until(START_TIMEOUT, POLL_INTERVAL, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            StdUnixStream::connect(&socket).is_ok()
        });
        if let Some(status) = exited {
            self.child = None;
            return Err(TestkitError::ToolFailed {
                command: format!("containerd --config {}", self.config_path().display()),
                status: status.to_string(),
                stderr: self.log_tail(4000),
            });
        }
        if !ready {
            self.stop();
            return Err(TestkitError::Timeout {
                what: format!("containerd to accept connections on {}", socket.display()),
                waited: START_TIMEOUT,
            });
        }
        Ok(())
    }

    /// Kills the runc shims this containerd started: they run detached and are found by
    /// the `-address <our socket>` on their command line.
    /// Kills this containerd's shims and every process under them (the
    /// containers): killing only a shim would leave its containers running,
    /// adopted by init.
    fn kill_shims(&self) {
        let socket = self.socket();
        let socket = socket.to_string_lossy();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut shims = Vec::new();
        let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // The parent is the 4th field of /proc/PID/stat, after "(comm)".
            if let Some(parent) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let after_comm = stat.rsplit_once(')')?.1;
                    after_comm.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
            {
                children.entry(parent).or_default().push(pid);
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            let is_our_shim = args
                .first()
                .is_some_and(|program| program.contains("containerd-shim"))
                && args.iter().any(|arg| arg == socket.as_ref());
            if is_our_shim {
                shims.push(pid);
            }
        }
        let mut doomed = Vec::new();
        let mut queue = shims;
        while let Some(pid) = queue.pop() {
            doomed.push(pid);
            queue.extend(children.get(&pid).into_iter().flatten().copied());
        }
        for pid in doomed {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }

    /// Lazily unmounts everything still mounted under the temporary directory, deepest
    /// first (container root filesystems, shm mounts).
    fn unmount_leftovers(&self) {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mut mountpoints: Vec<String> = mountpoints_under(&prefix);
        mountpoints.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mountpoint in mountpoints {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mountpoint)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        self.stop();
        self.kill_shims();
        self.unmount_leftovers();
    }
}

/// Mount points (from /proc/self/mountinfo) at or below `prefix`.
pub fn mountpoints_under(prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|mountpoint| mountpoint == prefix || mountpoint.starts_with(&format!("{prefix}/")))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(octal) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tonic channel over a unix socket (the URI is a placeholder; the connector ignores it).
pub async fn unix_channel(socket: &Path) -> Result<tonic::transport::Channel, TestkitError> {
    let socket = socket.to_path_buf();
    let display = socket.display().to_string();
    tonic::transport::Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            TestkitError::io(
                format!("connecting gRPC to {display}"),
                std::io::Error::other(e.to_string()),
            )
        })
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        annotations: HashMap::new(),
        ..Default::default()
    }
}

fn cri_failed(call: &str, image: &str, status: tonic::Status) -> TestkitError {
    TestkitError::ToolFailed {
        command: format!("CRI {call} {image}"),
        status: format!("{:?}", status.code()),
        stderr: status.message().to_string(),
    }
}

fn require(tool: &str, hint: &str) -> Result<PathBuf, TestkitError> {
    find_tool(tool).ok_or_else(|| TestkitError::ToolMissing {
        tool: tool.into(),
        hint: hint.into(),
    })
}

fn open_append(path: &Path) -> Result<File, TestkitError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TestkitError::io(format!("opening {}", path.display()), e))
}

fn tail(path: &Path, max_bytes: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(max_bytes)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

impl TestContainerd {
    /// Builds a `ctr` command like [`TestContainerd::ctr_output`], for callers that read
    /// its output as it comes (e.g. the time to a container's first output line).
    pub fn ctr_command(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .stdin(Stdio::null());
        command
    }
}

/// Image entries that let a container run the given host binaries (e.g. `/bin/sh`,
/// `/bin/cat`): each binary and the shared libraries `ldd` lists for it, at the same
/// paths as on the host, with their parent directories.
pub fn host_binary_entries(binaries: &[&str]) -> Result<Vec<crate::image::Entry>, TestkitError> {
    use crate::image::Entry;
    let mut files: Vec<PathBuf> = Vec::new();
    for binary in binaries {
        let binary = PathBuf::from(binary);
        if !files.contains(&binary) {
            files.push(binary.clone());
        }
        let output = Command::new("ldd")
            .arg(&binary)
            .output()
            .map_err(|e| TestkitError::io(format!("running ldd {}", binary.display()), e))?;
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let library = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from);
            if let Some(library) = library
                && !files.contains(&library)
            {
                files.push(library);
            }
        }
    }
    let mut entries = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for host in files {
        let inside = host.strip_prefix("/").unwrap_or(&host).to_path_buf();
        for dir in inside
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !dir.as_os_str().is_empty() && !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
                entries.push(Entry::dir(dir.to_string_lossy().as_bytes()));
            }
        }
        // Symlinks (e.g. /bin -> usr/bin, libc.so.6 -> libc-2.x.so) are followed.
        let bytes = std::fs::read(&host)
            .map_err(|e| TestkitError::io(format!("reading {}", host.display()), e))?;
        entries.push(Entry::file(inside.to_string_lossy().as_bytes(), bytes).mode(0o755));
    }
    Ok(entries)
}

/// Finds a binary of this workspace that cargo built: next to the running executable
/// (a binary in `target/<profile>/`) or one directory up (a test in
/// `target/<profile>/deps/`). `package` names the crate to build when it is missing.
pub fn workspace_binary(name: &str, package: &str) -> Result<PathBuf, TestkitError> {
    let exe = std::env::current_exe()
        .map_err(|e| TestkitError::io("finding the running executable", e))?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| TestkitError::ToolMissing {
            tool: name.into(),
            hint: format!(
                "build it next to {} with `cargo build -p {package}` (same profile)",
                exe.display()
            ),
        })
}

/// A `stoker-agent` process standing in for a node's agent: its state, chunk cache,
/// traces and sockets all live under one directory, its settings come from `STOKER_*`
/// variables, and its log goes to `<state_dir>/agent.log`.
///
/// Dropping it stops the agent (SIGTERM, then SIGKILL after 10 s) and lazily unmounts
/// whatever is still mounted under its state directory.
#[derive(Debug)]
pub struct AgentProcess {
    binary: PathBuf,
    state_dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts `binary` with state in `state_dir` (created if needed), the snapshotter on
    /// [`snapshotter_socket`](Self::snapshotter_socket), the agent API on
    /// [`api_socket`](Self::api_socket), and `env` as further `STOKER_*` settings.
    /// Returns once the snapshotter socket accepts connections.
    pub fn start(
        binary: &Path,
        state_dir: &Path,
        env: &[(&str, String)],
    ) -> Result<AgentProcess, TestkitError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| TestkitError::io(format!("creating {}", state_dir.display()), e))?;
        let mut agent = AgentProcess {
            binary: binary.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            env: env
                .iter()
                .map(|(name, value)| (name.to_string(), value.clone()))
                .collect(),
            child: None,
        };
        agent.spawn_and_wait()?;
        Ok(agent)
    }

    /// The socket containerd's proxy plugin connects to.
    pub fn snapshotter_socket(&self) -> PathBuf {
        self.state_dir.join("snapshotter.sock")
    }

    /// The agent API's unix socket.
    pub fn api_socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The agent's chunk cache directory (the default, `<state_dir>/cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }

    /// The last `max_bytes` of the agent's log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        tail(&self.log_path(), max_bytes)
    }

    fn spawn_and_wait(&mut self) -> Result<(), TestkitError> {
        let log = open_append(&self.log_path())?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the agent log handle", e))?;
        let child = Command::new(&self.binary)
            .env("STOKER_STATE_DIR", &self.state_dir)
            .env("STOKER_SNAPSHOTTER_SOCKET", self.snapshotter_socket())
            .env("STOKER_API_SOCKET", self.api_socket())
            .env("STOKER_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);
        let socket = self.snapshotter_socket();
        let mut exited = None;
        let ready = wait_until(START_TIMEOUT, POLL_INTERVAL, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            StdUnixStream::connect(&socket).is_ok()
        });
        if let Some(status) = exited {
            self.child = None;
            return Err(TestkitError::ToolFailed {
                command: self.binary.display().to_string(),
                status: status.to_string(),
                stderr: self.log_tail(4000),
            });
        }
        if !ready {
            self.stop();
            return Err(TestkitError::Timeout {
                what: format!("stoker-agent to listen on {}", socket.display()),
                waited: START_TIMEOUT,
            });
        }
        Ok(())
    }

    /// SIGTERM (the agent writes out open traces and stops serving), SIGKILL if it is
    /// still running after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let exited = wait_until(Duration::from_secs(10), POLL_INTERVAL, || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        let mut mountpoints = mountpoints_under(&self.state_dir.to_string_lossy());
        mountpoints.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mountpoint in mountpoints {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mountpoint)
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn starts_and_answers_ctr() {
        if !crate::require_root("starts_and_answers_ctr")
            || !crate::require_tool("starts_and_answers_ctr", "containerd")
        {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let containerd =
            TestContainerd::start(&dir.path().join("snapshotter.sock")).expect("containerd starts");
        let version = containerd
            .ctr("default", &["version"])
            .expect("ctr version");
        assert!(version.contains("Server:"), "{version}");
        assert!(containerd.allow_plain_http("127.0.0.1:5000").is_ok());
        let hosts = std::fs::read_to_string(
            containerd
                .dir
                .path()
                .join("certs.d/127.0.0.1:5000/hosts.toml"),
        )
        .expect("hosts.toml written");
        assert!(hosts.contains("http://127.0.0.1:5000"));
    }
}
