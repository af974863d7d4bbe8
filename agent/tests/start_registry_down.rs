//! The real `stoker-agent` restarted while its registry does not answer (issue 8:
//! "agent start is never blocked by the registry"). The agent keeps every index it
//! has verified on disk (`<state_dir>/indexes`), so it restores its lazy mounts
//! without the registry: it serves its socket at once, and a new container of an
//! image whose startup chunks are in the node cache starts while the registry still
//! hangs. Once the registry answers again, containers keep starting.
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    AgentChild, EXPECTED, POLL, READ_LAYERS, UnmountOnDrop, containerd_tests_can_run, runtime,
};
use stoker_testkit::containerd::{CRI_NAMESPACE, TestContainerd};
use stoker_testkit::fault_proxy::{Fault, FaultProxy, Scope};
use stoker_testkit::image::push_layout;
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

/// Per-request timeout given to the agent (`timeouts.request_secs`), so its retry
/// budget (5 attempts) is seconds, not minutes.
const REQUEST_TIMEOUT_SECS: &str = "2";

/// Starts the agent binary; returns once its snapshotter socket accepts connections
/// (or after `wait`, whichever comes first) with the time that took.
fn start_agent(work: &Path, wait: Duration) -> (Child, Duration, bool) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("agent.log"))
        .expect("log file");
    let socket = work.join("agent.sock");
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_stoker-agent"))
        .env("STOKER_STATE_DIR", work.join("state"))
        .env("STOKER_SNAPSHOTTER_SOCKET", &socket)
        .env("STOKER_API_SOCKET", work.join("api.sock"))
        .env("STOKER_REQUEST_TIMEOUT_SECS", REQUEST_TIMEOUT_SECS)
        .env("STOKER_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start stoker-agent");
    // This agent's own worker, listening (not a previous agent's).
    let up = wait_until(wait, POLL, || {
        common::worker_of(child.id()).is_some()
            && std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    (child, started.elapsed(), up)
}

#[test]
fn an_agent_restarted_while_the_registry_hangs_comes_up_and_recovers() {
    let test = "an_agent_restarted_while_the_registry_hangs_comes_up_and_recovers";
    if !containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let work = tempfile::tempdir().expect("work dir");
    let _unmount = UnmountOnDrop(work.path().to_path_buf());
    let rt = runtime();
    let registry = TestRegistry::start().expect("registry");
    let layout = work.path().join("layout");
    common::three_layer_image("regdown")
        .write_layout(&layout, "v1")
        .expect("layout");
    push_layout(&layout, "v1", &registry.host(), "test/regdown:v1").expect("push");
    common::convert(&rt, &format!("{}/test/regdown:v1", registry.host()));
    // Everyone reaches the registry through the proxy.
    let proxy = rt
        .block_on(FaultProxy::start(&registry.host()))
        .expect("proxy");
    let image = format!("{}/test/regdown:v1", proxy.host());

    let (child, _, up) = start_agent(work.path(), Duration::from_secs(60));
    let mut agent = AgentChild(child);
    assert!(up, "the agent did not start");
    let containerd = TestContainerd::start(&work.path().join("agent.sock")).expect("containerd");
    containerd
        .allow_plain_http(&proxy.host())
        .expect("hosts.toml");
    rt.block_on(containerd.cri_pull_image(&image))
        .expect("CRI pull");
    let run = |containerd: &TestContainerd, name: &str| {
        containerd.run(
            CRI_NAMESPACE,
            &image,
            &format!("{name}-{}", std::process::id()),
            &["sh", "-c", READ_LAYERS],
        )
    };
    assert_eq!(
        run(&containerd, "before").expect("first container"),
        EXPECTED
    );

    // The registry now accepts connections and never answers. The agent is killed
    // and started again: its lazy mount died with it and must be restored.
    proxy.set_fault_with(Fault::Latency(Duration::from_secs(3600)), Scope::All, None);
    agent.kill9();
    let (child, start_delay, up) = start_agent(work.path(), Duration::from_secs(180));
    agent = AgentChild(child);
    assert!(
        up,
        "the agent never served its socket; log:\n{}",
        std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default()
    );
    eprintln!(
        "agent restart with a hanging registry: snapshotter socket served after {} ms \
         (request timeout {REQUEST_TIMEOUT_SECS} s)",
        start_delay.as_millis()
    );
    containerd
        .wait_for_snapshotter(common::DEADLINE)
        .expect("containerd reconnects");

    // The registry still hangs: the mount was restored from the kept index, and the
    // chunks this container reads are in the node cache.
    assert_eq!(
        run(&containerd, "registry-hanging").expect("a container while the registry hangs"),
        EXPECTED
    );

    // The registry answers again: a new container starts.
    proxy.clear_faults();
    let cleared = Instant::now();
    let mut last = None;
    let mut attempt = 0;
    let started = wait_until(Duration::from_secs(120), Duration::from_millis(200), || {
        attempt += 1;
        match run(&containerd, &format!("after-{attempt}")) {
            Ok(out) => {
                last = Some(Ok(out));
                true
            }
            Err(e) => {
                last = Some(Err(e.to_string()));
                false
            }
        }
    });
    assert!(
        started,
        "no container after the registry came back: {last:?}"
    );
    assert_eq!(last, Some(Ok(EXPECTED.to_string())));
    let line = format!(
        "RECOVERY | agent restarted with a hanging registry, new container after it answers | {:.1}\n",
        cleared.elapsed().as_secs_f64() * 1000.0
    );
    eprint!("{line}");
    drop(agent);
}
