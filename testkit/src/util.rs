//! Small helpers shared by tests: free ports, polling with a deadline, tool detection.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::TestkitError;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and releasing it, so another process could
/// take it before the caller binds it; on loopback in a test that is rare enough.
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TestkitError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| TestkitError::io("reading the address of a bound socket", e))?;
    Ok(addr.port())
}

/// Polls `condition` every `poll_interval` until it returns true or `timeout` has passed.
///
/// Returns whether the condition became true. The condition is always checked at least
/// once, and once more after the deadline, so a slow last poll is not lost.
pub fn wait_until(
    timeout: Duration,
    poll_interval: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return condition();
        }
        std::thread::sleep(poll_interval.min(deadline - now));
    }
}

/// Finds an executable by name in `PATH`, then in `/usr/sbin` and `/sbin`
/// (where `runc` lives, and which a non-login `PATH` may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.push(PathBuf::from("/sbin"));
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns true if `tool` is installed. If not, prints
/// `SKIPPED: <test>: <tool> not found` to stderr so the skip is visible in test output.
///
/// Use it only for tools that may truly be absent on a developer machine; CI installs
/// all of them through `make deps`.
pub fn require_tool(test: &str, tool: &str) -> bool {
    if find_tool(tool).is_some() {
        return true;
    }
    eprintln!("SKIPPED: {test}: {tool} not found (run `make deps` to install it)");
    false
}

/// Returns true when running as root. If not, prints `SKIPPED: <test>: needs root`.
pub fn require_root(test: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid of the process that looks at it.
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid == 0 {
        return true;
    }
    eprintln!("SKIPPED: {test}: needs root (running as uid {euid})");
    false
}
