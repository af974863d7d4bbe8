//! The agent's supervisor: a small parent process that keeps lazy mounts alive
//! while the agent's worker process restarts.
//!
//! `stoker-agent` starts as the supervisor. It runs the real agent as a child
//! process (the *worker*: the same binary, with [`SUPERVISOR_PID_ENV`] set and its
//! standard input connected to the supervisor's [`fd_keeper`](crate::fd_keeper)),
//! keeps a copy of every lazy mount's `/dev/fuse` descriptor the worker hands it,
//! and restarts the worker when it dies. The new worker gets the descriptors back
//! and resumes serving the mounts, so containers reading from them see a pause,
//! not an error.
//!
//! The supervisor does nothing else: no registry, no containerd, no Kubernetes, so
//! there is little in it to crash. SIGTERM and SIGINT are passed to the worker and
//! the supervisor exits when the worker does. The worker is killed if the
//! supervisor dies (`PR_SET_PDEATHSIG`), so the two never outlive each other's
//! purpose. A worker that exits with status 0 is not restarted.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::AgentError;
use crate::fd_keeper::{self, Keeper};

/// Set in the worker's environment to the supervisor's pid.
pub const SUPERVISOR_PID_ENV: &str = "STOKER_SUPERVISOR_PID";

/// Restart delays: doubled after each quick crash, from the first to the last.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A worker that ran this long resets the delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `program args…` as the worker until it exits by itself with status 0, or
/// the supervisor is told to stop; restarts it otherwise. Returns the exit code
/// the supervisor should exit with.
pub async fn supervise(program: OsString, args: Vec<OsString>) -> Result<i32, AgentError> {
    let keeper = Keeper::default();
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| AgentError::io("installing the SIGTERM handler", e))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| AgentError::io("installing the SIGINT handler", e))?;
    let mut delay = FIRST_RESTART_DELAY;
    loop {
        let (ours, theirs) = fd_keeper::socket_pair()?;
        let mut worker = tokio::process::Command::new(&program)
            .args(&args)
            .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::from(theirs))
            .spawn()
            .map_err(|e| AgentError::io("starting the agent worker", e))?;
        let pid = worker.id();
        tracing::info!(
            pid,
            kept_mounts = keeper.len(),
            "supervisor: agent worker started"
        );
        serve_keeper(&keeper, ours)?;
        let started = Instant::now();
        let stop_with = tokio::select! {
            status = worker.wait() => {
                let status = status.map_err(|e| AgentError::io("waiting for the agent worker", e))?;
                if status.success() {
                    tracing::info!("supervisor: agent worker exited; stopping");
                    return Ok(0);
                }
                tracing::error!(status = %describe(status), kept_mounts = keeper.len(), "supervisor: agent worker died; restarting it, its mounts stay alive");
                None
            }
            _ = terminate.recv() => Some(Signal::SIGTERM),
            _ = interrupt.recv() => Some(Signal::SIGINT),
        };
        if let Some(stop) = stop_with {
            tracing::info!(signal = %stop, "supervisor: stopping the agent worker");
            if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
                let _ = kill(Pid::from_raw(pid), stop);
            }
            let status = worker
                .wait()
                .await
                .map_err(|e| AgentError::io("waiting for the agent worker", e))?;
            return Ok(status.code().unwrap_or(0));
        }
        if started.elapsed() >= HEALTHY_RUN {
            delay = FIRST_RESTART_DELAY;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = terminate.recv() => return Ok(0),
            _ = interrupt.recv() => return Ok(0),
        }
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
}

/// Serves the worker's keeper socket on a thread of its own until the worker
/// closes it.
fn serve_keeper(keeper: &Keeper, socket: OwnedFd) -> Result<(), AgentError> {
    let keeper = keeper.clone();
    std::thread::Builder::new()
        .name("fd-keeper".into())
        .spawn(move || keeper.serve(socket))
        .map(drop)
        .map_err(|e| AgentError::io("starting the fd keeper thread", e))
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

/// In the worker: dies with the supervisor (`PR_SET_PDEATHSIG`), and takes the
/// keeper socket from standard input. `None` when this process is not a worker.
pub fn worker_keeper_socket() -> Result<Option<OwnedFd>, AgentError> {
    let Ok(supervisor) = std::env::var(SUPERVISOR_PID_ENV) else {
        return Ok(None);
    };
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| AgentError::io("asking to die with the supervisor", e.into()))?;
    // The supervisor may have died before the line above: then the parent is not it.
    if nix::unistd::getppid().to_string() != supervisor {
        return Err(AgentError::FailedPrecondition(
            "the agent's supervisor exited before its worker started".into(),
        ));
    }
    let socket = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| AgentError::io("taking the fd keeper socket from standard input", e))?;
    Ok(Some(socket))
}
