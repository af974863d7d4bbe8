//! A container reading a file in a loop while parts of the node restart (issue 8):
//! - the agent's worker process killed with SIGKILL: its supervisor keeps the lazy
//!   mount's FUSE connection open and the next worker resumes it, so the container
//!   sees no error at all;
//! - the same, while a container holds files open that the killed worker opened
//!   with FUSE passthrough: new processes and containers of the image can still
//!   open them (the kernel accepts only opens in the same mode and with the same
//!   backing file, which the new worker learns from the mount's open-state file);
//! - the whole agent (supervisor and worker) killed, as when its pod is deleted:
//!   the container must never read wrong bytes; what it sees is printed, not
//!   asserted (its reads fail with ENOTCONN: the FUSE connection died with every
//!   process that held it); new containers work once the agent is back;
//! - containerd restarted: no error.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    AgentProcess, DEADLINE, EXPECTED, POLL, READ_LAYERS, UnmountOnDrop, containerd_tests_can_run,
    push, runtime, three_layer_image,
};
use stoker_testkit::containerd::{CRI_NAMESPACE, TestContainerd};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

/// Reads `/data/one` forever, one line per read into `/out/log`: `ok`, `WRONG …`
/// (bytes other than the file's) or `ERR …` (the read failed).
const READ_LOOP: &str = r#"while :; do
  if out=$(cat /data/one 2>&1); then
    if [ "$out" = "layer one" ]; then echo ok; else echo "WRONG $out"; fi
  else
    echo "ERR $out"
  fi
done >>/out/log 2>&1"#;

/// `ctr run -d` of `image` as container `name` through the Stoker snapshotter,
/// running `sh -c script` with `out` bound at `/out`.
fn run_detached(
    containerd: &TestContainerd,
    out: &Path,
    image: &str,
    name: &str,
    script: &str,
) -> Result<String, stoker_testkit::TestkitError> {
    let bind = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    containerd.ctr(
        CRI_NAMESPACE,
        &[
            "run",
            "-d",
            "--snapshotter",
            "stoker",
            "--net-host",
            "--mount",
            &bind,
            image,
            name,
            "sh",
            "-c",
            script,
        ],
    )
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A converted image pulled through CRI into a containerd whose snapshotter is the
/// real agent, and a container reading `/data/one` in a loop into `log`. Fields drop
/// in order: containerd and the agent stop before the directories go.
struct Env {
    containerd: TestContainerd,
    agent: AgentProcess,
    image: String,
    reader: String,
    log: PathBuf,
    _registry: TestRegistry,
    _rt: tokio::runtime::Runtime,
    _unmount: UnmountOnDrop,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start(tag: &str) -> Env {
        stoker_registry::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let unmount = UnmountOnDrop(dir.path().to_path_buf());
        let registry = TestRegistry::start().expect("registry");
        let (image, _) = push(
            &registry,
            dir.path(),
            &three_layer_image(tag),
            &format!("test/{tag}"),
        );
        let rt = runtime();
        common::convert(&rt, &image);

        let state = dir.path().join("agent");
        let agent = AgentProcess::start(&state, &dir.path().join("agent.sock"));
        let containerd = TestContainerd::start(&agent.socket).expect("containerd");
        containerd
            .allow_plain_http(&registry.host())
            .expect("hosts.toml");
        rt.block_on(containerd.cri_pull_image(&image))
            .expect("CRI pull");

        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("out dir");
        let log = out.join("log");
        // runc's state directory is shared by every containerd on the machine: a name
        // of our own, removed at the end.
        let reader = format!("{tag}-reader-{}", std::process::id());
        run_detached(&containerd, &out, &image, &reader, READ_LOOP)
            .unwrap_or_else(|e| panic!("start the reader: {e}\nagent log:\n{}", agent.log_text()));
        assert!(
            wait_until(DEADLINE, POLL, || {
                log_lines(&log).iter().filter(|l| *l == "ok").count() >= 20
            }),
            "the reader did not read: {:?}",
            log_lines(&log)
        );
        Env {
            containerd,
            agent,
            image,
            reader,
            log,
            _registry: registry,
            _rt: rt,
            _unmount: unmount,
            _dir: dir,
        }
    }

    /// Runs a new container reading every layer; returns when it printed them right.
    fn new_container_reads(&self, name: &str) {
        let out = self
            .containerd
            .run(
                CRI_NAMESPACE,
                &self.image,
                &format!("{name}-{}", std::process::id()),
                &["sh", "-c", READ_LAYERS],
            )
            .unwrap_or_else(|e| panic!("run {name}: {e}\nagent log:\n{}", self.agent.log_text()));
        assert_eq!(out, EXPECTED);
    }

    /// Lets the reader go on for 50 more reads (or 20 s), stops it, and returns its
    /// log from line `from` on, after asserting no read ever returned wrong bytes.
    fn finish_reader(&self, from: usize) -> Vec<String> {
        let target = log_lines(&self.log).len() + 50;
        let _ = wait_until(Duration::from_secs(20), POLL, || {
            log_lines(&self.log).len() >= target
        });
        for args in [
            &["task", "kill", "-s", "SIGKILL", &self.reader][..],
            &["task", "delete", "--force", &self.reader][..],
            &["container", "delete", &self.reader][..],
        ] {
            let _ = self.containerd.ctr(CRI_NAMESPACE, args);
        }
        let lines = log_lines(&self.log);
        let wrong: Vec<_> = lines.iter().filter(|l| l.starts_with("WRONG")).collect();
        assert!(wrong.is_empty(), "the reader saw wrong bytes: {wrong:?}");
        lines[from.min(lines.len())..].to_vec()
    }
}

fn summary(after: &[String]) -> (usize, Vec<&String>) {
    let oks = after.iter().filter(|l| *l == "ok").count();
    let errors = after.iter().filter(|l| l.starts_with("ERR")).collect();
    (oks, errors)
}

/// One write, so the line is not split by the test harness's own output.
fn report_recovery(scenario: &str, elapsed: Duration) {
    let line = format!(
        "RECOVERY | {scenario} | {:.1}\n",
        elapsed.as_secs_f64() * 1000.0
    );
    eprint!("{line}");
}

#[test]
fn a_container_reading_in_a_loop_sees_no_error_while_the_agent_worker_is_killed_and_restarted() {
    let test = "a_container_reading_in_a_loop_sees_no_error_while_the_agent_worker_is_killed_and_restarted";
    if !containerd_tests_can_run(test) {
        return;
    }
    let env = Env::start("workerkill");
    let before_kill = log_lines(&env.log).len();
    let killed_worker = env.agent.kill9_worker();
    let killed = Instant::now();
    assert!(
        wait_until(DEADLINE, POLL, || env
            .agent
            .worker_pid()
            .is_some_and(|pid| pid != killed_worker)),
        "the supervisor did not start a new worker; log:\n{}",
        env.agent.log_text()
    );
    // The running container reads again, through the same mount, resumed.
    let lines_at_restart = log_lines(&env.log).len();
    assert!(
        wait_until(DEADLINE, POLL, || log_lines(&env.log).len()
            >= lines_at_restart + 20),
        "the reader did not go on after the worker restart: {:?}\nagent log:\n{}",
        &log_lines(&env.log)[before_kill..],
        env.agent.log_text()
    );
    let reading_again = killed.elapsed();
    assert!(
        env.agent
            .log_text()
            .contains("resumed the FUSE connection of a mount"),
        "the new worker did not resume the kept mount; log:\n{}",
        env.agent.log_text()
    );
    env.containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reaches the new worker");
    env.new_container_reads("after-worker-restart");
    let after = env.finish_reader(before_kill);
    let (oks, errors) = summary(&after);
    assert!(
        errors.is_empty(),
        "the running container saw {} errors across the worker restart, first: {:?}\nagent warnings and errors:\n{}",
        errors.len(),
        errors.first(),
        env.agent
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(oks >= 20, "the reader kept reading: {oks} correct reads");
    eprintln!("running container across an agent worker SIGKILL: {oks} correct reads, no error");
    report_recovery(
        "agent worker SIGKILL, running container reads again",
        reading_again,
    );
}

#[test]
fn a_container_reading_in_a_loop_never_sees_wrong_bytes_across_an_agent_sigkill() {
    let test = "a_container_reading_in_a_loop_never_sees_wrong_bytes_across_an_agent_sigkill";
    if !containerd_tests_can_run(test) {
        return;
    }
    let mut env = Env::start("agentkill");
    let before_kill = log_lines(&env.log).len();
    env.agent.kill9();
    let killed = Instant::now();
    env.agent.restart();
    env.containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reconnects");
    // A new container reads every layer once the agent is back.
    env.new_container_reads("after-agent-restart");
    let recovered = killed.elapsed();
    let after = env.finish_reader(before_kill);
    let (oks, errors) = summary(&after);
    eprintln!(
        "running container across agent SIGKILL + restart: {oks} correct reads, {} failed reads after the kill{}",
        errors.len(),
        errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    report_recovery("agent SIGKILL, new container reads", recovered);
}

#[test]
fn a_container_reading_in_a_loop_sees_no_error_while_containerd_restarts() {
    let test = "a_container_reading_in_a_loop_sees_no_error_while_containerd_restarts";
    if !containerd_tests_can_run(test) {
        return;
    }
    let mut env = Env::start("ctrdrestart");
    let before = log_lines(&env.log).len();
    let restarted = Instant::now();
    env.containerd.restart().expect("restart containerd");
    env.containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reaches the agent again");
    env.new_container_reads("after-containerd-restart");
    let recovered = restarted.elapsed();
    let after = env.finish_reader(before);
    let (oks, errors) = summary(&after);
    // The agent and its FUSE session do not depend on containerd: running
    // containers keep reading through the restart.
    assert!(
        errors.is_empty(),
        "the running container saw errors while containerd restarted: {errors:?}"
    );
    assert!(oks > 0, "the reader kept reading");
    eprintln!("running container across a containerd restart: {oks} correct reads, no error");
    report_recovery("containerd restarted, new container reads", recovered);
}

/// Opens `/data/one` on descriptor 3 and keeps it open, with `/bin/cat` running,
/// until killed (opening the image's fifo for reading blocks for good).
const HOLD_OPEN: &str = "exec 3</data/one; echo held >/out/held; exec cat /data/fifo";

/// The open-state record of the file at `path` on a lazy mount (see
/// stoker-lazyfs `open_state.rs`: 16 bytes per inode id, the id being the inode
/// number - 1; cached opens, passthrough opens, backing id, little-endian).
fn open_state_record(state_file: &Path, path: &Path) -> [u32; 3] {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path)
        .expect("stat on the lazy mount")
        .ino();
    let bytes = std::fs::read(state_file).expect("read the open-state file");
    let at = ((ino - 1) * 16) as usize;
    let word = |i: usize| {
        bytes
            .get(at + 4 * i..at + 4 * i + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    [word(0), word(1), word(2)]
}

#[test]
fn files_held_open_with_passthrough_across_a_worker_restart_can_be_opened_again() {
    let test = "files_held_open_with_passthrough_across_a_worker_restart_can_be_opened_again";
    if !containerd_tests_can_run(test) {
        return;
    }
    // The reader has read /data/one (and run /bin/cat) many times: their chunks
    // are cached, so new opens of them pass through.
    let env = Env::start("holdopen");
    let out = env.log.parent().expect("out dir").to_path_buf();
    let holder = format!("holdopen-holder-{}", std::process::id());
    run_detached(&env.containerd, &out, &env.image, &holder, HOLD_OPEN).unwrap_or_else(|e| {
        panic!(
            "start the holder: {e}\nagent log:\n{}",
            env.agent.log_text()
        )
    });
    let remove_holder = || {
        for args in [
            &["task", "kill", "-s", "SIGKILL", &holder][..],
            &["task", "delete", "--force", &holder][..],
            &["container", "delete", &holder][..],
        ] {
            let _ = env.containerd.ctr(CRI_NAMESPACE, args);
        }
    };
    assert!(
        wait_until(DEADLINE, POLL, || out.join("held").exists()),
        "the holder did not open /data/one"
    );

    // The worker answered the holder's open with passthrough.
    let state_dir = env
        .agent
        .socket
        .parent()
        .expect("socket dir")
        .join("open-state");
    let names: Vec<_> = std::fs::read_dir(&state_dir)
        .expect("the agent keeps open-state files")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "one lazy mount, one open-state file: {names:?}"
    );
    let state_file = state_dir.join(&names[0]);
    let mountpoint = env
        .agent
        .state_dir
        .join("snapshotter/mounts")
        .join(&names[0]);
    let [cached, passthrough, backing] =
        open_state_record(&state_file, &mountpoint.join("data/one"));
    assert!(
        cached == 0 && passthrough >= 1 && backing != 0,
        "/data/one is held open with passthrough: cached {cached}, passthrough {passthrough}, backing id {backing}"
    );

    let before_kill = log_lines(&env.log).len();
    let killed_worker = env.agent.kill9_worker();
    assert!(
        wait_until(DEADLINE, POLL, || env
            .agent
            .worker_pid()
            .is_some_and(|pid| pid != killed_worker)),
        "the supervisor did not start a new worker; log:\n{}",
        env.agent.log_text()
    );
    env.containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reaches the new worker");
    assert!(
        env.agent
            .log_text()
            .contains("resumed the FUSE connection of a mount"),
        "the new worker did not resume the kept mount; log:\n{}",
        env.agent.log_text()
    );
    // A new container runs /bin/sh and /bin/cat and reads /data/one, all still
    // open in the holder (and the reader) with the killed worker's passthrough.
    env.new_container_reads("after-restart-with-held-files");
    // New processes in the running reader exec /bin/cat and open /data/one too.
    let after = env.finish_reader(before_kill);
    remove_holder();
    let (oks, errors) = summary(&after);
    assert!(
        errors.is_empty(),
        "the running container saw {} errors across the worker restart, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(oks >= 20, "the reader kept reading: {oks} correct reads");
    eprintln!(
        "files held open with passthrough across a worker SIGKILL: a new container and {oks} new reads opened them, no error"
    );
}
