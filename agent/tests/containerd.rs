//! End to end with a real containerd 1.6, runc and docker-registry: images pulled
//! through CRI and `ctr` into the stoker snapshotter, containers run from them, the
//! agent killed and restarted, and everything removed again.
//!
//! The lazy filesystem itself comes from another crate; here a fake resolver says
//! which image "has a Stoker artifact" and a fake mounter bind-mounts the image's
//! tree extracted by umoci. Everything else — containerd, CRI, the snapshotter
//! protocol, overlayfs, runc — is real.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{
    AgentProcess, BindMounter, DEADLINE, EXPECTED, FakeResolver, InProcessAgent, POLL, READ_LAYERS,
    containerd_tests_can_run, layer_gets, mounts_under, push, runtime, three_layer_image,
};
use stoker_snapshotter::StokerArtifact;
use stoker_testkit::containerd::{CRI_NAMESPACE, TestContainerd};
use stoker_testkit::image::WrittenImage;
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

/// Waits until the registry logged a GET of each of `image`'s layer blobs (log lines
/// may trail the responses) and returns how many there were.
fn wait_all_layers_fetched(registry: &TestRegistry, image: &WrittenImage) -> usize {
    let (requests, _) = registry.wait_for_requests(DEADLINE, |requests| {
        count_layer_gets(requests, image) >= image.layers.len()
    });
    count_layer_gets(&requests, image)
}

fn count_layer_gets(
    requests: &[stoker_testkit::registry::LoggedRequest],
    image: &WrittenImage,
) -> usize {
    layer_gets(requests, image).len()
}

/// Keys of the snapshots the agent holds (all namespaces), via containerd's view.
fn snapshot_count(containerd: &TestContainerd, namespaces: &[&str]) -> usize {
    namespaces
        .iter()
        .map(|ns| containerd.snapshot_keys(ns).expect("list snapshots").len())
        .sum()
}

#[test]
fn ordinary_images_pull_run_survive_kill9_and_clean_up() {
    let test = "ordinary_images_pull_run_survive_kill9_and_clean_up";
    if !containerd_tests_can_run(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let (cri_image, cri_written) =
        push(&registry, dir.path(), &three_layer_image("cri"), "test/cri");
    let (ctr_image, _) = push(&registry, dir.path(), &three_layer_image("ctr"), "test/ctr");

    let state = dir.path().join("agent");
    let mut agent = AgentProcess::start(&state, &dir.path().join("agent.sock"));
    let containerd = TestContainerd::start(&agent.socket).expect("containerd");
    containerd
        .allow_plain_http(&registry.host())
        .expect("hosts.toml");
    let rt = runtime();

    // Through CRI, as the kubelet does: an ordinary image is downloaded and unpacked.
    rt.block_on(containerd.cri_pull_image(&cri_image))
        .expect("CRI pull");
    assert_eq!(
        wait_all_layers_fetched(&registry, &cri_written),
        3,
        "all layers downloaded"
    );
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &cri_image,
            "cri-1",
            &["sh", "-c", READ_LAYERS],
        )
        .expect("run from CRI-pulled image");
    assert_eq!(out, EXPECTED);

    // Through ctr in another namespace.
    containerd
        .ctr_pull("default", &ctr_image)
        .expect("ctr pull");
    let out = containerd
        .run(
            "default",
            &ctr_image,
            "ctr-1",
            &["sh", "-c", "cat /data/tag; echo; cat /data/three"],
        )
        .expect("run from ctr-pulled image");
    assert_eq!(out, "ctr\nlayer three\n");
    assert_eq!(snapshot_count(&containerd, &[CRI_NAMESPACE, "default"]), 6);

    // kill -9 and restart: the snapshots are still there and new containers start.
    agent.kill9();
    agent.restart();
    containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reconnects");
    assert_eq!(snapshot_count(&containerd, &[CRI_NAMESPACE, "default"]), 6);
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &cri_image,
            "cri-2",
            &["sh", "-c", READ_LAYERS],
        )
        .expect("run after agent restart");
    assert_eq!(out, EXPECTED);

    // Remove the images: no snapshots and no mounts are left.
    rt.block_on(containerd.cri_remove_image(&cri_image))
        .expect("CRI remove");
    containerd
        .ctr("default", &["images", "rm", "--sync", &ctr_image])
        .expect("ctr images rm");
    let empty = wait_until(DEADLINE, POLL, || {
        snapshot_count(&containerd, &[CRI_NAMESPACE, "default"]) == 0
    });
    assert!(
        empty,
        "snapshots left: {:?}",
        containerd.snapshot_keys(CRI_NAMESPACE)
    );
    let snapshot_dirs = std::fs::read_dir(state.join("snapshotter/snapshots"))
        .expect("snapshots dir")
        .count();
    assert_eq!(snapshot_dirs, 0, "snapshot directories left behind");
    assert!(
        mounts_under(dir.path()).is_empty(),
        "mounts left: {:?}",
        mounts_under(dir.path())
    );
    assert!(mounts_under(&containerd.state_dir()).is_empty());
}

#[test]
fn stoker_images_skip_download_and_share_one_lazy_mount() {
    let test = "stoker_images_skip_download_and_share_one_lazy_mount";
    if !containerd_tests_can_run(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let image = three_layer_image("lazy");
    let (lazy_image, written) = push(&registry, dir.path(), &image, "test/lazy");
    let (plain_image, plain_written) = push(
        &registry,
        dir.path(),
        &three_layer_image("plain"),
        "test/plain",
    );

    // The "lazy filesystem": the image's tree as umoci extracts it.
    let layout = dir.path().join("layout-test-lazy");
    let tree = stoker_testkit::image::unpack_reference(&layout, "v1", &dir.path().join("bundle"))
        .expect("umoci unpack");
    let resolver = Arc::new(FakeResolver {
        artifacts: HashMap::from([(
            written.manifest.digest.clone(),
            StokerArtifact {
                index_digest: "sha256:0123456789abcdef".into(),
                layer_digests: written
                    .layers
                    .iter()
                    .map(|l| l.blob.digest.clone())
                    .collect(),
            },
        )]),
        calls: AtomicUsize::new(0),
    });
    let mounter = Arc::new(BindMounter::new(&tree));
    let state = dir.path().join("agent");
    let socket = dir.path().join("agent.sock");
    let agent = InProcessAgent::start(&state, &socket, resolver.clone(), mounter.clone());
    let mountpoint = agent.snapshotter.mountpoint("sha256:0123456789abcdef");
    let containerd = TestContainerd::start(&socket).expect("containerd");
    containerd
        .allow_plain_http(&registry.host())
        .expect("hosts.toml");
    let rt = runtime();

    // CRI pull: manifest and config only, no layer blob.
    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&lazy_image))
        .expect("CRI pull");
    // The config is the last thing containerd fetches before unpacking: once its line
    // is logged, any layer GET would be too.
    let (requests, config_fetched) = registry.wait_for_requests(DEADLINE, |requests| {
        requests
            .iter()
            .any(|r| r.is_blob_get() && r.path.ends_with(&written.config.digest))
    });
    assert!(config_fetched, "{requests:?}");
    assert!(
        requests.iter().any(|r| r.path.contains("/manifests/")),
        "{requests:?}"
    );
    assert_eq!(
        count_layer_gets(&requests, &written),
        0,
        "layers were downloaded: {requests:?}"
    );
    assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);

    // Two containers at once, both blocked on a FIFO: one lazy mount between them.
    let blocked = "cat /data/one /data/two /data/three; cat /data/fifo";
    for id in ["lazy-a", "lazy-b"] {
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
                    id,
                    "sh",
                    "-c",
                    blocked,
                ],
            )
            .expect("start container");
    }
    let both_running = wait_until(DEADLINE, POLL, || {
        let tasks = containerd
            .ctr(CRI_NAMESPACE, &["tasks", "ls"])
            .unwrap_or_default();
        tasks.lines().filter(|l| l.contains("RUNNING")).count() == 2
    });
    assert!(
        both_running,
        "{}",
        containerd
            .ctr(CRI_NAMESPACE, &["tasks", "ls"])
            .unwrap_or_default()
    );
    assert_eq!(
        mounter.mounts.load(Ordering::SeqCst),
        1,
        "one mount per image"
    );
    assert_eq!(mounts_under(&mountpoint).len(), 1);
    let images = rt
        .block_on(agent.snapshotter.mounted_images())
        .expect("mounted images");
    assert_eq!(images.len(), 1);
    assert!(images[0].users >= 3, "{images:?}");
    for id in ["lazy-a", "lazy-b"] {
        containerd
            .ctr(CRI_NAMESPACE, &["tasks", "kill", "-s", "SIGKILL", id])
            .expect("kill");
    }
    let stopped = wait_until(DEADLINE, POLL, || {
        let tasks = containerd
            .ctr(CRI_NAMESPACE, &["tasks", "ls"])
            .unwrap_or_default();
        tasks.lines().filter(|l| l.contains("RUNNING")).count() == 0
    });
    assert!(stopped);
    for id in ["lazy-a", "lazy-b"] {
        containerd
            .ctr(CRI_NAMESPACE, &["tasks", "rm", id])
            .expect("task rm");
        containerd
            .ctr(CRI_NAMESPACE, &["containers", "rm", id])
            .expect("container rm");
    }

    // A container run to completion reads files of every layer through the overlay.
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &lazy_image,
            "lazy-c",
            &["sh", "-c", READ_LAYERS],
        )
        .expect("run lazy container");
    assert_eq!(out, EXPECTED);

    // An image without an artifact still unpacks normally through the same snapshotter.
    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&plain_image))
        .expect("CRI pull plain");
    assert_eq!(wait_all_layers_fetched(&registry, &plain_written), 3);
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &plain_image,
            "plain-1",
            &["sh", "-c", "cat /data/tag"],
        )
        .expect("run plain container");
    assert_eq!(out, "plain");

    // Agent restart after its lazy filesystem died with it: remounted, containers start.
    drop(agent);
    std::process::Command::new("umount")
        .arg(&mountpoint)
        .status()
        .expect("umount");
    let mounter = Arc::new(BindMounter::new(&tree));
    let agent = InProcessAgent::start(&state, &socket, resolver.clone(), mounter.clone());
    assert_eq!(
        mounter.mounts.load(Ordering::SeqCst),
        1,
        "lazy mount restored"
    );
    containerd
        .wait_for_snapshotter(DEADLINE)
        .expect("containerd reconnects");
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &lazy_image,
            "lazy-d",
            &["sh", "-c", READ_LAYERS],
        )
        .expect("run after restart");
    assert_eq!(out, EXPECTED);

    // Removing both images leaves no snapshot and no mount behind.
    rt.block_on(containerd.cri_remove_image(&lazy_image))
        .expect("remove lazy");
    rt.block_on(containerd.cri_remove_image(&plain_image))
        .expect("remove plain");
    let empty = wait_until(DEADLINE, POLL, || {
        snapshot_count(&containerd, &[CRI_NAMESPACE]) == 0
    });
    assert!(
        empty,
        "snapshots left: {:?}",
        containerd.snapshot_keys(CRI_NAMESPACE)
    );
    let records = rt
        .block_on(agent.snapshotter.list(&[]))
        .expect("agent list");
    assert!(records.is_empty(), "agent records left: {records:?}");
    assert_eq!(mounter.unmounts.load(Ordering::SeqCst), 1);
    assert!(
        mounts_under(&state).is_empty(),
        "mounts left: {:?}",
        mounts_under(&state)
    );
    assert!(mounts_under(&containerd.state_dir()).is_empty());
}

#[test]
fn converted_images_are_found_in_the_registry_and_not_downloaded() {
    let test = "converted_images_are_found_in_the_registry_and_not_downloaded";
    if !containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let (converted, written) = push(
        &registry,
        dir.path(),
        &three_layer_image("converted"),
        "test/converted",
    );
    let (unconverted, unconverted_written) = push(
        &registry,
        dir.path(),
        &three_layer_image("unconverted"),
        "test/unconverted",
    );
    let rt = runtime();
    let client = common::plain_http_client();
    let reports = common::convert(&rt, &converted);
    let index_digest = reports[0].index_digest.clone();

    // The lazy filesystem is still a bind mount of the extracted tree; the lookup of
    // the artifact is the real one (referrers fallback tag on docker-registry 2.8).
    let tree = stoker_testkit::image::unpack_reference(
        &dir.path().join("layout-test-converted"),
        "v1",
        &dir.path().join("bundle"),
    )
    .expect("umoci unpack");
    let mounter = Arc::new(BindMounter::new(&tree));
    let socket = dir.path().join("agent.sock");
    let agent = InProcessAgent::start(
        &dir.path().join("agent"),
        &socket,
        Arc::new(stoker_agent::resolver::RegistryResolver::new(client)),
        mounter.clone(),
    );
    let containerd = TestContainerd::start(&socket).expect("containerd");
    containerd
        .allow_plain_http(&registry.host())
        .expect("hosts.toml");

    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&converted))
        .expect("CRI pull converted");
    let blob_gets: Vec<String> = registry
        .requests()
        .into_iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.path)
        .collect();
    assert!(
        blob_gets
            .iter()
            .all(|path| path.ends_with(&written.config.digest)),
        "only the config blob may be fetched: {blob_gets:?}"
    );
    let mounted = rt
        .block_on(agent.snapshotter.mounted_images())
        .expect("mounted images");
    assert_eq!(mounted.len(), 1);
    assert_eq!(mounted[0].image.index_digest, index_digest);
    assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &converted,
            "converted-1",
            &["sh", "-c", READ_LAYERS],
        )
        .expect("run converted");
    assert_eq!(out, EXPECTED);

    // No artifact: the referrers lookup finds nothing and the image is unpacked.
    registry.clear_requests();
    rt.block_on(containerd.cri_pull_image(&unconverted))
        .expect("CRI pull unconverted");
    assert_eq!(wait_all_layers_fetched(&registry, &unconverted_written), 3);
    let out = containerd
        .run(
            CRI_NAMESPACE,
            &unconverted,
            "unconverted-1",
            &["sh", "-c", "cat /data/tag"],
        )
        .expect("run unconverted");
    assert_eq!(out, "unconverted");
}
