//! The snapshots API over the agent's real unix socket, without containerd: every
//! call, containerd's overlay semantics, error codes, persistence, and the
//! remote-snapshot protocol containerd relies on.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{BindMounter, FakeResolver, InProcessAgent, runtime, snapshots_client};
use prost_types::FieldMask;
use stoker_api::Mount;
use stoker_api::snapshots::snapshots_client::SnapshotsClient;
use stoker_api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use stoker_snapshotter::StokerArtifact;
use stoker_snapshotter::remote::{
    IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL, SNAPSHOT_REF_LABEL,
};
use tonic::Code;
use tonic::transport::Channel;

type Client = SnapshotsClient<Channel>;

async fn prepare(
    client: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, tonic::Status> {
    client
        .prepare(PrepareSnapshotRequest {
            snapshotter: "stoker".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        })
        .await
        .map(|r| r.into_inner().mounts)
}

async fn commit(client: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    client
        .commit(CommitSnapshotRequest {
            snapshotter: "stoker".into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        })
        .await
        .map(|_| ())
}

async fn remove(client: &mut Client, key: &str) -> Result<(), tonic::Status> {
    client
        .remove(RemoveSnapshotRequest {
            snapshotter: "stoker".into(),
            key: key.into(),
        })
        .await
        .map(|_| ())
}

async fn stat(client: &mut Client, key: &str) -> Result<Info, tonic::Status> {
    client
        .stat(StatSnapshotRequest {
            snapshotter: "stoker".into(),
            key: key.into(),
        })
        .await
        .map(|r| r.into_inner().info.expect("info"))
}

async fn list(client: &mut Client, filters: &[&str]) -> Result<Vec<Info>, tonic::Status> {
    let mut stream = client
        .list(ListSnapshotsRequest {
            snapshotter: "stoker".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut infos = Vec::new();
    while let Some(batch) = stream.message().await? {
        infos.extend(batch.info);
    }
    Ok(infos)
}

fn option<'a>(mount: &'a Mount, prefix: &str) -> Option<&'a str> {
    mount.options.iter().find_map(|o| o.strip_prefix(prefix))
}

#[test]
fn every_call_follows_containerd_overlay_semantics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let root = dir.path().join("state");
    let socket = dir.path().join("run/snapshotter.sock");
    let agent = InProcessAgent::start_plain(&root, &socket);
    let rt = runtime();
    rt.block_on(async {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode");

        let mut c = snapshots_client(&socket).await;
        // A layer with no parent: a read-write bind mount of its own directory.
        let mounts = prepare(&mut c, "extract-1", "", HashMap::new())
            .await
            .expect("prepare");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].r#type, "bind");
        assert_eq!(mounts[0].options, vec!["rw", "rbind"]);
        let layer1_fs = std::path::PathBuf::from(&mounts[0].source);
        std::fs::write(layer1_fs.join("hello"), vec![b'x'; 50_000]).expect("write into layer");
        let active_usage = c
            .usage(UsageRequest {
                snapshotter: "stoker".into(),
                key: "extract-1".into(),
            })
            .await
            .expect("usage")
            .into_inner();
        assert!(
            active_usage.size >= 50_000 && active_usage.inodes == 2,
            "{active_usage:?}"
        );

        // Errors containerd maps back to errdefs.
        let dup = prepare(&mut c, "extract-1", "", HashMap::new())
            .await
            .expect_err("dup");
        assert_eq!(dup.code(), Code::AlreadyExists);
        let orphan = prepare(&mut c, "x", "missing", HashMap::new())
            .await
            .expect_err("orphan");
        assert_eq!(orphan.code(), Code::NotFound);
        let on_active = prepare(&mut c, "x", "extract-1", HashMap::new())
            .await
            .expect_err("on active");
        assert_eq!(on_active.code(), Code::InvalidArgument);
        assert_eq!(
            stat(&mut c, "nope").await.expect_err("stat").code(),
            Code::NotFound
        );

        commit(&mut c, "layer1", "extract-1").await.expect("commit");
        let info = stat(&mut c, "layer1").await.expect("stat");
        assert_eq!(info.kind, Kind::Committed as i32);
        assert!(info.created_at.is_some());
        let committed_usage = c
            .usage(UsageRequest {
                snapshotter: "stoker".into(),
                key: "layer1".into(),
            })
            .await
            .expect("usage")
            .into_inner();
        assert_eq!(committed_usage, active_usage);
        let mounts_of_committed = c
            .mounts(MountsRequest {
                snapshotter: "stoker".into(),
                key: "layer1".into(),
            })
            .await
            .expect_err("committed has no mounts");
        assert_eq!(mounts_of_committed.code(), Code::FailedPrecondition);

        // Second layer and a container on top: overlays, nearest layer first.
        prepare(&mut c, "extract-2", "layer1", HashMap::new())
            .await
            .expect("prepare 2");
        commit(&mut c, "layer2", "extract-2")
            .await
            .expect("commit 2");
        let mounts = prepare(&mut c, "container", "layer2", HashMap::new())
            .await
            .expect("container");
        assert_eq!(mounts[0].r#type, "overlay");
        let lower = option(&mounts[0], "lowerdir=").expect("lowerdir");
        assert_eq!(lower.split(':').count(), 2);
        assert!(lower.split(':').nth(1) == Some(layer1_fs.to_str().expect("utf8")));
        assert!(option(&mounts[0], "upperdir=").is_some());
        assert!(option(&mounts[0], "workdir=").is_some());
        let again = c
            .mounts(MountsRequest {
                snapshotter: "stoker".into(),
                key: "container".into(),
            })
            .await
            .expect("mounts")
            .into_inner()
            .mounts;
        assert_eq!(again, mounts);

        // A view of one layer: a read-only bind mount of it.
        let view = c
            .view(ViewSnapshotRequest {
                snapshotter: "stoker".into(),
                key: "view".into(),
                parent: "layer1".into(),
                labels: HashMap::new(),
            })
            .await
            .expect("view")
            .into_inner()
            .mounts;
        assert_eq!(view[0].r#type, "bind");
        assert_eq!(view[0].source, layer1_fs.display().to_string());
        assert_eq!(view[0].options, vec!["ro", "rbind"]);
        let commit_view = commit(&mut c, "v2", "view").await.expect_err("commit view");
        assert_eq!(commit_view.code(), Code::FailedPrecondition);
        let busy = remove(&mut c, "layer1").await.expect_err("has children");
        assert_eq!(busy.code(), Code::FailedPrecondition);

        // Labels are the only mutable field.
        let mut info = stat(&mut c, "layer2").await.expect("stat");
        info.labels.insert("team".into(), "ml".into());
        info.labels.insert("ignored".into(), "x".into());
        let updated = c
            .update(UpdateSnapshotRequest {
                snapshotter: "stoker".into(),
                info: Some(info.clone()),
                update_mask: Some(FieldMask {
                    paths: vec!["labels.team".into()],
                }),
            })
            .await
            .expect("update")
            .into_inner()
            .info
            .expect("info");
        assert_eq!(updated.labels.get("team").map(String::as_str), Some("ml"));
        assert!(!updated.labels.contains_key("ignored"));
        let immutable = c
            .update(UpdateSnapshotRequest {
                snapshotter: "stoker".into(),
                info: Some(info),
                update_mask: Some(FieldMask {
                    paths: vec!["parent".into()],
                }),
            })
            .await
            .expect_err("parent is immutable");
        assert_eq!(immutable.code(), Code::InvalidArgument);

        // List with filters.
        assert_eq!(list(&mut c, &[]).await.expect("list").len(), 4);
        let team = list(&mut c, &[r#"labels."team"==ml"#])
            .await
            .expect("filter");
        assert_eq!(
            team.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            vec!["layer2"]
        );
        let either = list(&mut c, &["kind==view", "name==container"])
            .await
            .expect("or");
        assert_eq!(either.len(), 2);
        let bad = list(&mut c, &["name~=x"]).await.expect_err("regex");
        assert_eq!(bad.code(), Code::InvalidArgument);
    });

    // Restart: the metadata is still there.
    drop(agent);
    let mut agent = InProcessAgent::start_plain(&root, &socket);
    rt.block_on(async {
        let mut c = snapshots_client(&socket).await;
        assert_eq!(list(&mut c, &[]).await.expect("list").len(), 4);
        for key in ["container", "view", "layer2", "layer1"] {
            remove(&mut c, key).await.expect("remove");
        }
        assert!(list(&mut c, &[]).await.expect("list").is_empty());
        // Cleanup removes directories nothing refers to.
        let stray = root.join("snapshots/999/fs");
        std::fs::create_dir_all(&stray).expect("stray dir");
        c.cleanup(CleanupRequest {
            snapshotter: "stoker".into(),
        })
        .await
        .expect("cleanup");
        assert!(!root.join("snapshots/999").exists());
        let left: Vec<_> = std::fs::read_dir(root.join("snapshots"))
            .expect("read")
            .collect();
        assert!(left.is_empty(), "directories left: {left:?}");
    });
    agent.stop();
}

fn cri_labels(layer: &str, chain_id: &str) -> HashMap<String, String> {
    HashMap::from([
        (
            IMAGE_REF_LABEL.to_string(),
            "127.0.0.1:1/app:v1".to_string(),
        ),
        (
            MANIFEST_DIGEST_LABEL.to_string(),
            "sha256:manifest".to_string(),
        ),
        (LAYER_DIGEST_LABEL.to_string(), layer.to_string()),
        (SNAPSHOT_REF_LABEL.to_string(), chain_id.to_string()),
    ])
}

#[test]
fn remote_layers_answer_already_exists_and_share_one_mount() {
    if !stoker_testkit::require_root("remote_layers_answer_already_exists_and_share_one_mount") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::write(tree.join("etc/hello"), "from the lazy image\n").expect("tree file");
    let root = dir.path().join("state");
    let socket = dir.path().join("snapshotter.sock");
    let resolver = Arc::new(FakeResolver {
        artifacts: HashMap::from([(
            "sha256:manifest".to_string(),
            StokerArtifact {
                index_digest: "sha256:index".into(),
                layer_digests: vec!["sha256:l1".into(), "sha256:l2".into()],
            },
        )]),
        calls: AtomicUsize::new(0),
    });
    let mounter = Arc::new(BindMounter::new(&tree));
    let agent = InProcessAgent::start(&root, &socket, resolver.clone(), mounter.clone());
    let mountpoint = agent.snapshotter.mountpoint("sha256:index");
    let rt = runtime();
    rt.block_on(async {
        let mut c = snapshots_client(&socket).await;
        // Layer 1 of 2: recorded, no mount yet.
        let l1 = prepare(&mut c, "extract-a-c1", "", cri_labels("sha256:l1", "c1"))
            .await
            .expect_err("remote layer");
        assert_eq!(l1.code(), Code::AlreadyExists);
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 0);
        // What containerd does next: find the committed target by label and parent.
        let found = list(
            &mut c,
            &["labels.\"containerd.io/snapshot.ref\"==c1,parent==\"\""],
        )
        .await
        .expect("walk");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, Kind::Committed as i32);
        assert!(
            stat(&mut c, "extract-a-c1").await.is_err(),
            "no active snapshot was made"
        );

        // Layer 2 of 2 (top): mounted once.
        let l2 = prepare(&mut c, "extract-b-c2", "c1", cri_labels("sha256:l2", "c2"))
            .await
            .expect_err("remote top layer");
        assert_eq!(l2.code(), Code::AlreadyExists);
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
        // Pulling again (another namespace) changes nothing.
        let again = prepare(&mut c, "extract-c-c2", "c1", cri_labels("sha256:l2", "c2"))
            .await
            .expect_err("exists");
        assert_eq!(again.code(), Code::AlreadyExists);

        // Two containers: overlays over the one lazy mount.
        for key in ["container-1", "container-2"] {
            let mounts = prepare(&mut c, key, "c2", HashMap::new())
                .await
                .expect("container");
            assert_eq!(mounts[0].r#type, "overlay");
            assert_eq!(
                option(&mounts[0], "lowerdir="),
                Some(mountpoint.to_str().expect("utf8"))
            );
        }
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
        assert_eq!(common::mounts_under(&mountpoint).len(), 1);
        let images = agent.snapshotter.mounted_images().await.expect("mounted");
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].users, 3);
        // An intermediate layer has no content: building on it is refused clearly.
        let on_lower = prepare(&mut c, "x", "c1", HashMap::new())
            .await
            .expect_err("lower layer");
        assert_eq!(on_lower.code(), Code::FailedPrecondition);
        assert!(
            on_lower.message().contains("sha256:l1"),
            "{}",
            on_lower.message()
        );
    });

    // Restart after the lazy filesystem died: it is mounted again.
    drop(agent);
    std::process::Command::new("umount")
        .arg(&mountpoint)
        .status()
        .expect("umount");
    assert!(common::mounts_under(&mountpoint).is_empty());
    let mounter = Arc::new(BindMounter::new(&tree));
    let mut agent = InProcessAgent::start(&root, &socket, resolver.clone(), mounter.clone());
    assert_eq!(
        mounter.mounts.load(Ordering::SeqCst),
        1,
        "restored on start"
    );
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("etc/hello")).expect("read through mount"),
        "from the lazy image\n"
    );

    rt.block_on(async {
        let mut c = snapshots_client(&socket).await;
        for key in ["container-1", "container-2", "c2"] {
            remove(&mut c, key).await.expect("remove");
        }
        assert_eq!(
            mounter.unmounts.load(Ordering::SeqCst),
            1,
            "last top layer unmounts"
        );
        assert!(common::mounts_under(&mountpoint).is_empty());
        remove(&mut c, "c1").await.expect("remove c1");
        assert!(list(&mut c, &[]).await.expect("list").is_empty());
    });
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "the answer is cached"
    );
    agent.stop();
}
