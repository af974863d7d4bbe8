//! The agent checks containerd's configuration at start (issue 7) and says exactly
//! what is missing: the real `stoker-agent` binary, pointed (`STOKER_CONTAINERD_CONFIG`)
//! at the configuration a real containerd runs with, and at one that lacks the proxy
//! plugin and the CRI settings.

use std::path::Path;

use stoker_testkit::containerd::{AgentProcess, TestContainerd};

#[test]
fn the_agent_names_what_containerds_configuration_lacks() {
    let test = "the_agent_names_what_containerds_configuration_lacks";
    if !stoker_testkit::require_root(test) || !stoker_testkit::require_tool(test, "containerd") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = Path::new(env!("CARGO_BIN_EXE_stoker-agent"));

    // containerd configured for the agent's socket: the agent says so.
    let state = dir.path().join("good");
    let containerd = TestContainerd::start(&state.join("snapshotter.sock")).expect("containerd");
    let config = containerd.config_file().display().to_string();
    let agent = AgentProcess::start(binary, &state, &[("STOKER_CONTAINERD_CONFIG", config)])
        .expect("agent");
    let log = agent.log_tail(1 << 20);
    assert!(log.contains("containerd is configured for Stoker"), "{log}");
    assert!(!log.contains("containerd configuration:"), "{log}");
    drop(agent);
    drop(containerd);

    // A default containerd configuration: every missing piece is named, with its fix.
    let state = dir.path().join("default");
    let config = dir.path().join("default.toml");
    std::fs::write(
        &config,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n",
    )
    .expect("write config");
    let agent = AgentProcess::start(
        binary,
        &state,
        &[("STOKER_CONTAINERD_CONFIG", config.display().to_string())],
    )
    .expect("agent");
    let log = agent.log_tail(1 << 20);
    let socket = state.join("snapshotter.sock").display().to_string();
    for expected in [
        format!("no proxy plugin points at the agent's snapshotter socket {socket}"),
        "CRI uses the snapshotter \"overlayfs\" and no runtime handler uses \"stoker\"".to_string(),
        "disable_snapshot_annotations is not set".to_string(),
        "[proxy_plugins.stoker]".to_string(),
    ] {
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
    }
}
