//! A registry behind a link with limited bandwidth.
//!
//! [`ThrottledLink`] makes a network namespace joined to the host by a veth pair
//! (`10.213.N.1` on the host, `10.213.N.2` inside), with a `tbf` qdisc of the given
//! rate on both ends, so traffic each way is shaped. [`NetnsRegistry`] runs Debian's
//! `docker-registry` inside that namespace (`ip netns exec`), listening on the inside
//! address: every byte a node pulls crosses the shaped link. Both remove what they
//! made when dropped (the registry process, the namespace, the veth pair).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use stoker_testkit::registry::{
    LoggedRequest, PROBE_USER_AGENT, parse_combined_log_line, probe_v2,
};
use stoker_testkit::wait_until;

const REGISTRY_PORT: u16 = 5000;

/// A network namespace and a veth pair shaped by `tbf`.
pub(crate) struct ThrottledLink {
    namespace: String,
    host_interface: String,
    /// The host's end of the link.
    pub host_ip: String,
    /// The namespace's end, where the registry listens.
    pub inner_ip: String,
}

impl ThrottledLink {
    /// Creates the namespace, the veth pair and the qdiscs. Fails naming the missing
    /// piece (for example a kernel without `sch_tbf`).
    pub fn create(rate: &str) -> anyhow::Result<ThrottledLink> {
        let id = std::process::id();
        let subnet = id % 250 + 1;
        let link = ThrottledLink {
            namespace: format!("stoker-bench-{id}"),
            host_interface: format!("sbh{id}"),
            host_ip: format!("10.213.{subnet}.1"),
            inner_ip: format!("10.213.{subnet}.2"),
        };
        let inner_interface = format!("sbn{id}");
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &link.namespace])?;
        ip(&[
            "link",
            "add",
            &link.host_interface,
            "type",
            "veth",
            "peer",
            "name",
            &inner_interface,
        ])?;
        ip(&["link", "set", &inner_interface, "netns", &link.namespace])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.host_ip),
            "dev",
            &link.host_interface,
        ])?;
        ip(&["link", "set", &link.host_interface, "up"])?;
        link.in_namespace(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", link.inner_ip),
                "dev",
                &inner_interface,
            ],
        )?;
        link.in_namespace("ip", &["link", "set", &inner_interface, "up"])?;
        link.in_namespace("ip", &["link", "set", "lo", "up"])?;
        // burst: at least rate / HZ; latency bounds the queue.
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "512kb", "latency", "20ms",
        ];
        let host_qdisc = ["qdisc", "add", "dev", &link.host_interface];
        run(Command::new("tc").args(host_qdisc).args(tbf))
            .context("tc qdisc add … tbf: the kernel needs sch_tbf (CONFIG_NET_SCH_TBF)")?;
        let inner_qdisc = ["qdisc", "add", "dev", &inner_interface];
        link.in_namespace("tc", &[&inner_qdisc[..], &tbf[..]].concat())
            .context("tc qdisc add … tbf in the namespace")?;
        Ok(link)
    }

    fn in_namespace(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.namespace, program])
            .args(args))
    }

    /// The `tc -s qdisc` line of the host end, for the report.
    pub fn qdisc(&self) -> String {
        Command::new("tc")
            .args(["qdisc", "show", "dev", &self.host_interface])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for ThrottledLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the host's.
        for args in [
            vec!["link", "del", self.host_interface.as_str()],
            vec!["netns", "del", self.namespace.as_str()],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?} (package iproute2)"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `docker-registry` inside a [`ThrottledLink`]'s namespace.
pub(crate) struct NetnsRegistry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Byte offset of `access.log` before which requests are ignored.
    log_offset: AtomicU64,
    // Dropped after the registry process is stopped (see Drop).
    link: ThrottledLink,
}

impl NetnsRegistry {
    /// Starts the registry with empty storage behind `link` and waits until it answers
    /// `GET /v2/` through the link.
    pub fn start(link: ThrottledLink) -> anyhow::Result<NetnsRegistry> {
        let binary = stoker_testkit::find_tool("docker-registry")
            .context("docker-registry not found: run `make deps`")?;
        let dir = tempfile::Builder::new()
            .prefix("stoker-bench-registry-")
            .tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  formatter: json\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {}:{REGISTRY_PORT}\n  secret: stoker-bench-secret\n",
                storage.display(),
                link.inner_ip
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &link.namespace])
            .arg(&binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("access.log"))?)
            .stderr(File::create(dir.path().join("registry.log"))?)
            .spawn()
            .context("starting docker-registry in the namespace")?;
        let mut registry = NetnsRegistry {
            child: Some(child),
            dir,
            log_offset: AtomicU64::new(0),
            link,
        };
        let addr: SocketAddr = format!("{}:{REGISTRY_PORT}", registry.link.inner_ip).parse()?;
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            if let Some(child) = registry.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                exited = true;
                return true;
            }
            probe_v2(addr)
        });
        if exited || !ready {
            let log = std::fs::read_to_string(registry.dir.path().join("registry.log"))
                .unwrap_or_default();
            bail!("docker-registry in the namespace did not answer on {addr}: {log}");
        }
        Ok(registry)
    }

    /// `HOST:PORT` of the registry, as used in image references.
    pub fn host(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.link.inner_ip)
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Requests logged since the last [`clear_requests`](Self::clear_requests).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.access_log()) {
            let _ = file.seek(SeekFrom::Start(self.log_offset.load(Ordering::SeqCst)));
            let _ = file.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(parse_combined_log_line)
            .filter(|r| r.user_agent != PROBE_USER_AGENT)
            .collect()
    }

    pub fn clear_requests(&self) {
        let len = std::fs::metadata(self.access_log())
            .map(|m| m.len())
            .unwrap_or(0);
        self.log_offset.store(len, Ordering::SeqCst);
    }

    /// Bytes of blobs served since the last clear. The registry logs a request after
    /// answering it, so this waits until the total stops changing (up to 3 s).
    pub fn blob_bytes(&self) -> u64 {
        let total = || -> u64 {
            self.requests()
                .iter()
                .filter(|r| r.is_blob_get())
                .map(|r| r.response_bytes)
                .sum()
        };
        let mut last = None;
        wait_until(Duration::from_secs(3), Duration::from_millis(250), || {
            let now = total();
            let settled = last == Some(now);
            last = Some(now);
            settled
        });
        last.unwrap_or_else(total)
    }

    /// Blob GET requests served since the last clear.
    pub fn blob_requests(&self) -> usize {
        self.requests().iter().filter(|r| r.is_blob_get()).count()
    }
}

impl Drop for NetnsRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
