//! End to end with nothing faked: a converted image pulled through CRI into the real
//! `stoker-agent` binary, which finds the Stoker artifact in a real docker-registry,
//! mounts the image's lazy FUSE filesystem, and lets runc start containers on an
//! overlay over it — without downloading a single layer blob.

mod common;

use std::path::Path;

use common::{
    AgentProcess, DEADLINE, EXPECTED, POLL, READ_LAYERS, layer_gets, push, runtime,
    three_layer_image,
};
use stoker_testkit::containerd::{CRI_NAMESPACE, TestContainerd};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

/// Mount points of type `fuse.stoker` at or below `dir`, from /proc/self/mountinfo.
fn lazy_mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mountpoint = fields.split(' ').nth(4)?;
            let fstype = rest.split(' ').next()?;
            (fstype == "fuse.stoker" && mountpoint.starts_with(&prefix))
                .then(|| mountpoint.to_string())
        })
        .collect()
}

fn running_tasks(containerd: &TestContainerd) -> usize {
    containerd
        .ctr(CRI_NAMESPACE, &["tasks", "ls"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("RUNNING"))
        .count()
}

#[test]
fn converted_image_starts_lazily_from_the_real_agent() {
    let test = "converted_image_starts_lazily_from_the_real_agent";
    if !common::lazy_containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let (lazy_image, written) = push(
        &registry,
        dir.path(),
        &three_layer_image("lazy"),
        "test/lazy",
    );
    let (plain_image, plain_written) = push(
        &registry,
        dir.path(),
        &three_layer_image("plain"),
        "test/plain",
    );
    let rt = runtime();

    let reports = common::convert(&rt, &lazy_image);
    let index_digest = reports[0].index_digest.clone();

    // The real agent binary, state in a temp dir (chunk cache under it), and containerd.
    let state = dir.path().join("agent");
    let mut agent = AgentProcess::start(&state, &dir.path().join("agent.sock"));
    let containerd = TestContainerd::start(&agent.socket).expect("containerd");
    containerd
        .allow_plain_http(&registry.host())
        .expect("hosts.toml");

    // CRI pull: manifests, the config, the Stoker index — no layer blob.
    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&lazy_image))
        .expect("CRI pull");
    let (requests, seen) = registry.wait_for_requests(DEADLINE, |requests| {
        let fetched = |digest: &str| {
            requests
                .iter()
                .any(|r| r.is_blob_get() && r.path.ends_with(digest))
        };
        fetched(&written.config.digest) && fetched(&index_digest)
    });
    assert!(
        seen,
        "config and index were not fetched: {requests:?}\nagent log:\n{}",
        agent.log_text()
    );
    assert!(layer_gets(&requests, &written).is_empty(), "{requests:?}");
    for r in requests.iter().filter(|r| r.is_blob_get()) {
        assert!(
            r.path.starts_with("/v2/test/lazy/blobs/sha256:"),
            "unexpected blob GET {r:?}"
        );
    }
    assert_eq!(lazy_mounts_under(&state).len(), 1, "one lazy mount");

    // A container blocked on a FIFO, and a second one reading every layer: one mount.
    containerd
        .ctr(
            CRI_NAMESPACE,
            &[
                "run",
                "-d",
                "--snapshotter",
                "stoker",
                "--net-host",
                &lazy_image,
                "lazy-a",
                "sh",
                "-c",
                "cat /data/fifo",
            ],
        )
        .expect("start lazy-a");
    assert!(
        wait_until(DEADLINE, POLL, || running_tasks(&containerd) == 1),
        "lazy-a not running"
    );
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &lazy_image,
            "lazy-b",
            &["sh", "-c", READ_LAYERS],
        )
        .unwrap_or_else(|e| panic!("run lazy-b: {e}\nagent log:\n{}", agent.log_text()));
    assert_eq!(out, EXPECTED);
    assert_eq!(
        lazy_mounts_under(&state).len(),
        1,
        "two containers share one lazy mount"
    );
    // The file bytes came through ranged chunk reads, still no layer blob.
    let requests = registry.requests();
    assert!(layer_gets(&requests, &written).is_empty(), "{requests:?}");
    containerd
        .ctr(CRI_NAMESPACE, &["tasks", "kill", "-s", "SIGKILL", "lazy-a"])
        .expect("kill lazy-a");
    assert!(wait_until(DEADLINE, POLL, || running_tasks(&containerd) == 0));
    containerd
        .ctr(CRI_NAMESPACE, &["tasks", "rm", "lazy-a"])
        .expect("task rm");
    containerd
        .ctr(CRI_NAMESPACE, &["containers", "rm", "lazy-a"])
        .expect("container rm");

    // An image without an artifact is downloaded and unpacked as usual.
    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&plain_image))
        .expect("CRI pull plain");
    let (requests, all_layers) = registry.wait_for_requests(DEADLINE, |requests| {
        layer_gets(requests, &plain_written).len() >= plain_written.layers.len()
    });
    assert!(all_layers, "{requests:?}");
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &plain_image,
            "plain-1",
            &["sh", "-c", "cat /data/tag"],
        )
        .expect("run plain");
    assert_eq!(out, "plain");

    // kill -9: the FUSE session dies with the agent. The restarted agent remounts the
    // image and a new container starts.
    agent.kill9();
    // The assembled passthrough files of an image the crash left behind (its unmount
    // never ran) go at the restart; the remounted image's stay.
    let assembled = state.join("cache").join("assembled");
    let stale = assembled.join("ab".repeat(32));
    std::fs::create_dir_all(&stale).expect("stale image dir");
    std::fs::write(stale.join("file"), b"bytes").expect("stale assembled file");
    let mounted_image_dir = assembled.join(index_digest.trim_start_matches("sha256:"));
    std::fs::create_dir_all(&mounted_image_dir).expect("mounted image dir");
    agent.restart();
    containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reconnects");
    assert!(!stale.exists(), "stale assembled files removed at start");
    assert!(
        mounted_image_dir.is_dir(),
        "the remounted image keeps its files"
    );
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &lazy_image,
            "lazy-c",
            &["sh", "-c", READ_LAYERS],
        )
        .unwrap_or_else(|e| panic!("run after restart: {e}\nagent log:\n{}", agent.log_text()));
    assert_eq!(out, EXPECTED);
    assert_eq!(lazy_mounts_under(&state).len(), 1);

    // Remove both images: no snapshots, no mounts.
    rt.block_on(containerd.cri_remove_image(&lazy_image))
        .expect("remove lazy");
    rt.block_on(containerd.cri_remove_image(&plain_image))
        .expect("remove plain");
    let empty = wait_until(DEADLINE, POLL, || {
        containerd
            .snapshot_keys(CRI_NAMESPACE)
            .map(|keys| keys.is_empty())
            .unwrap_or(false)
    });
    assert!(
        empty,
        "snapshots left: {:?}",
        containerd.snapshot_keys(CRI_NAMESPACE)
    );
    assert!(
        wait_until(DEADLINE, POLL, || lazy_mounts_under(&state).is_empty()),
        "lazy mounts left: {:?}",
        lazy_mounts_under(&state)
    );
    assert!(
        common::mounts_under(&state).is_empty(),
        "mounts left: {:?}",
        common::mounts_under(&state)
    );
    assert!(common::mounts_under(&containerd.state_dir()).is_empty());
}
