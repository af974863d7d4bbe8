//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on loopback.
//!
//! [`TestRegistry::start`] writes a config into a fresh temporary directory, starts
//! `/usr/bin/docker-registry serve` on a free `127.0.0.1` port with filesystem storage in
//! that directory (`storage.delete.enabled: true`), and polls `GET /v2/` until it answers.
//! [`TestRegistry::stop`] and [`TestRegistry::restart`] simulate the registry going down
//! and coming back on the same port with the same content. Dropping the value kills the
//! process and removes the directory.
//!
//! # What the registry logs
//!
//! distribution 2.8 writes one access-log line per request to stdout, in Apache
//! *Combined Log Format*:
//!
//! ```text
//! 127.0.0.1 - - [22/Nov/2026:18:21:07 +0000] "GET /v2/foo/blobs/sha256:… HTTP/1.1" 206 1024 "" "agent"
//! ```
//!
//! The harness sends stdout to `access.log` and parses it in [`TestRegistry::requests`]:
//! method, path (with query string), status and response size are available.
//! **The `Range` request header is not logged** (not in the access log, and not in the
//! JSON application log even at debug level), so [`LoggedRequest::range`] is always
//! `None` here. Tests that need the ranges a client asked for must read them from a proxy
//! in front of the registry. The status (`206` vs `200`) and the response size are
//! logged and are often enough.
//!
//! The access-log line is written after the response has been sent, so a client can see
//! its response a moment before the line appears: poll with
//! [`TestRegistry::wait_for_requests`] rather than reading once.
//!
//! The application log (stderr) goes to `registry.log` next to it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{TestkitError, find_tool, free_port, wait_until};

/// How long [`TestRegistry::start`] waits for `GET /v2/` to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// User agent of the harness's own readiness probes; their log lines are filtered out.
/// The user agent of [`probe_v2`]'s requests, to leave them out of request logs.
pub const PROBE_USER_AGENT: &str = "stoker-testkit-probe";

/// One request as recorded in the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method, e.g. `GET`, `HEAD`, `PUT`.
    pub method: String,
    /// Request target as sent, including any query string, e.g. `/v2/repo/blobs/sha256:…`.
    pub path: String,
    /// HTTP status of the response.
    pub status: u16,
    /// The `Range` header of the request. docker-registry 2.8 does not log it, so this is
    /// always `None` for [`TestRegistry`]; it is here for proxies that do know it.
    pub range: Option<String>,
    /// Size of the response body in bytes, as logged.
    pub response_bytes: u64,
    /// The client's `User-Agent`.
    pub user_agent: String,
}

impl LoggedRequest {
    /// True for `GET` of a blob (`/v2/<repo>/blobs/sha256:…`), the requests a lazy fetcher makes.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.path.contains("/blobs/sha256:")
    }
}

/// A running (or stopped) `docker-registry` with its own storage, config and logs.
#[derive(Debug)]
pub struct TestRegistry {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Byte offset in `access.log` before which requests are ignored (see `clear_requests`).
    log_offset: AtomicU64,
}

impl TestRegistry {
    /// Starts a registry on a free loopback port with empty storage, and waits until
    /// `GET /v2/` answers.
    ///
    /// Fails with [`TestkitError::ToolMissing`] if `docker-registry` is not installed.
    pub fn start() -> Result<TestRegistry, TestkitError> {
        let binary = find_tool("docker-registry").ok_or_else(|| TestkitError::ToolMissing {
            tool: "docker-registry".into(),
            hint: "install the Debian package `docker-registry` (`make deps` does)".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("stoker-registry-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating the registry's temporary directory", e))?;
        let port = free_port()?;
        let mut registry = TestRegistry {
            binary,
            port,
            dir,
            child: None,
            log_offset: AtomicU64::new(0),
        };
        registry.write_config()?;
        registry.spawn_and_wait()?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`, the form used in image references (`HOST/repo:tag`).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, the base URL of the registry API.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The TCP port the registry listens on (kept across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the registry's blobs and repositories.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The access log (Combined Log Format, one line per request).
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// The registry's application log (JSON lines), useful when a test fails.
    pub fn app_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// True while the registry process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry process and waits for it to exit. Its port stops accepting
    /// connections; storage and logs are kept. Does nothing if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                tracing::warn!(error = %e, "killing docker-registry");
            }
            if let Err(e) = child.wait() {
                tracing::warn!(error = %e, "waiting for docker-registry to exit");
            }
        }
    }

    /// Stops the registry if it runs, then starts it again on the same port with the same
    /// storage, and waits until it answers.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn_and_wait()
    }

    /// All requests logged since start (or since the last [`clear_requests`](Self::clear_requests)),
    /// in order, without the harness's own readiness probes.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        let offset = self.log_offset.load(Ordering::SeqCst);
        let text = match read_from_offset(&self.access_log_path(), offset) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, "reading the registry access log");
                return Vec::new();
            }
        };
        text.lines()
            .filter_map(parse_combined_log_line)
            .filter(|request| request.user_agent != PROBE_USER_AGENT)
            .collect()
    }

    /// Forgets the requests logged so far: later calls to [`requests`](Self::requests)
    /// only return newer ones. Lines still in flight (see the module docs) may still show
    /// up, so clear only when the client is idle.
    pub fn clear_requests(&self) {
        let len = std::fs::metadata(self.access_log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        self.log_offset.store(len, Ordering::SeqCst);
    }

    /// Polls [`requests`](Self::requests) until `condition` holds for them or `timeout`
    /// passes; returns the last list seen and whether the condition held.
    pub fn wait_for_requests(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&[LoggedRequest]) -> bool,
    ) -> (Vec<LoggedRequest>, bool) {
        let mut last = Vec::new();
        let held = wait_until(timeout, POLL_INTERVAL, || {
            last = self.requests();
            condition(&last)
        });
        (last, held)
    }

    fn write_config(&self) -> Result<(), TestkitError> {
        let storage = self.storage_dir();
        std::fs::create_dir_all(&storage)
            .map_err(|e| TestkitError::io(format!("creating {}", storage.display()), e))?;
        // A fixed http.secret keeps upload sessions valid across restart().
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: stoker-testkit-secret\n",
            storage = storage.display(),
            port = self.port,
        );
        let path = self.config_path();
        std::fs::write(&path, config)
            .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn spawn_and_wait(&mut self) -> Result<(), TestkitError> {
        let access_log = open_append(&self.access_log_path())?;
        let app_log = open_append(&self.app_log_path())?;
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(access_log)
            .stderr(app_log)
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);

        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut exited = None;
        let ready = wait_until(START_TIMEOUT, POLL_INTERVAL, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            probe_v2(addr)
        });
        if let Some(status) = exited {
            self.child = None;
            return Err(TestkitError::RegistryExited {
                status: status.to_string(),
                log: self.app_log_path(),
                log_tail: tail(&self.app_log_path(), 2000),
            });
        }
        if !ready {
            self.stop();
            return Err(TestkitError::Timeout {
                what: format!("docker-registry to answer GET {}/v2/", self.url()),
                waited: START_TIMEOUT,
            });
        }
        Ok(())
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `GET /v2/` (as [`PROBE_USER_AGENT`]) and returns true on a `200` answer.
pub fn probe_v2(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {PROBE_USER_AGENT}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response.starts_with(b"HTTP/1.1 200")
}

/// Parses one Combined Log Format line:
/// `IP - USER [TIME] "METHOD TARGET PROTO" STATUS SIZE "REFERER" "USER-AGENT"`.
pub fn parse_combined_log_line(line: &str) -> Option<LoggedRequest> {
    let (_, rest) = line.split_once("] \"")?;
    let (request_line, rest) = rest.split_once("\" ")?;
    let mut request_parts = request_line.split(' ');
    let method = request_parts.next()?.to_string();
    let path = request_parts.next()?.to_string();
    let mut fields = rest.splitn(3, ' ');
    let status = fields.next()?.parse().ok()?;
    let response_bytes = fields.next()?.parse().unwrap_or(0);
    let quoted = fields.next().unwrap_or("");
    let user_agent = quoted
        .rsplit_once(" \"")
        .map(|(_, ua)| ua.trim_end_matches('"').to_string())
        .unwrap_or_default();
    Some(LoggedRequest {
        method,
        path,
        status,
        range: None,
        response_bytes,
        user_agent,
    })
}

fn open_append(path: &Path) -> Result<File, TestkitError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TestkitError::io(format!("opening {}", path.display()), e))
}

fn read_from_offset(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    // A line being written right now may be cut: keep only complete lines; the rest is
    // read on the next call.
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok(String::from_utf8_lossy(&bytes[..complete]).into_owned())
}

fn tail(path: &Path, max_bytes: u64) -> String {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    read_from_offset(path, len.saturating_sub(max_bytes)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_lines() {
        let line = r#"127.0.0.1 - - [22/Nov/2026:18:21:07 +0000] "GET /v2/foo/blobs/sha256:00 HTTP/1.1" 206 157 "" "curl/7.88.1""#;
        let request = parse_combined_log_line(line).expect("parses");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/v2/foo/blobs/sha256:00");
        assert_eq!(request.status, 206);
        assert_eq!(request.response_bytes, 157);
        assert_eq!(request.user_agent, "curl/7.88.1");
        assert!(request.is_blob_get());
        assert_eq!(parse_combined_log_line("garbage"), None);
        // A line cut in the middle of being written.
        assert_eq!(
            parse_combined_log_line(r#"127.0.0.1 - - [22/Nov/2026"#),
            None
        );
    }
}
