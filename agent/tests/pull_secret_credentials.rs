//! Registry credentials pushed to the real `stoker-agent` over its agent API
//! (`SetCredentials`, as the controller does from Kubernetes image pull secrets), with
//! no docker config on the node, against a private registry (the fault proxy's token
//! service in front of a real `docker-registry`):
//!
//! - before the push, the converted image cannot be mounted: the snapshotter's
//!   artifact lookup is refused and containerd is told to unpack normally;
//! - after it, the same Prepare calls containerd makes find the artifact, the agent
//!   mounts the image lazily, and its files read back right through the mount;
//! - a credential past its expiry is no longer used: a second private image, whose
//!   credential has expired, is not mounted and the registry sees no credentials;
//! - the pushed credentials survive a SIGKILL of the agent's worker process: its
//!   supervisor keeps them and hands them to the next worker;
//! - the pushed password and the tokens never reach the agent's log (trace level) or
//!   its `/metrics`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{
    AgentChild, DEADLINE, POLL, UnmountOnDrop, convert, get_metrics, plain_http_client,
    process_alive, snapshots_client, worker_of,
};
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{RegistryCredential, SetCredentialsRequest, StatusRequest};
use stoker_api::snapshots::snapshots_client::SnapshotsClient;
use stoker_api::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use stoker_snapshotter::remote::{
    IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL, SNAPSHOT_REF_LABEL,
};
use stoker_testkit::fault_proxy::{FaultProxy, ProxiedRequest, ProxyAuth};
use stoker_testkit::image::{Entry, ImageBuilder, push_layout};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;
use tonic::Code;
use tonic::transport::Channel;

const USER: &str = "pull-secret-user";
const PASSWORD: &str = "pull-secret-pw-4c1d9e-never-logged";

/// A small three-layer image: one file per layer and a whiteout in the top one.
fn layered_image(name: &str) -> ImageBuilder {
    ImageBuilder::new()
        .layer(vec![
            Entry::dir("data"),
            Entry::file("data/one", format!("{name}: layer one\n")),
            Entry::file("data/gone", "hidden by layer three\n"),
        ])
        .layer(vec![
            Entry::dir("data"),
            Entry::file("data/two", format!("{name}: layer two\n")),
        ])
        .layer(vec![
            Entry::dir("data"),
            Entry::file("data/three", format!("{name}: layer three\n")),
            Entry::whiteout("data/gone"),
        ])
}

/// A converted image in the registry, as containerd would name its layers.
struct PrivateImage {
    /// As the node sees it: through the proxy.
    reference: String,
    manifest_digest: String,
    layer_digests: Vec<String>,
}

fn push_and_convert(
    rt: &tokio::runtime::Runtime,
    registry: &TestRegistry,
    proxy: &FaultProxy,
    dir: &Path,
    repo: &str,
) -> PrivateImage {
    let layout = dir.join(repo.replace('/', "-"));
    let written = layered_image(repo)
        .write_layout(&layout, "v1")
        .expect("write layout");
    push_layout(&layout, "v1", &registry.host(), &format!("{repo}:v1")).expect("push");
    let direct = format!("{}/{repo}:v1", registry.host());
    convert(rt, &direct);
    let manifest = rt
        .block_on(plain_http_client().fetch_manifest(&direct))
        .expect("manifest");
    PrivateImage {
        reference: format!("{}/{repo}:v1", proxy.host()),
        manifest_digest: manifest.digest.to_string(),
        layer_digests: written
            .layers
            .iter()
            .map(|l| l.blob.digest.clone())
            .collect(),
    }
}

/// What containerd's CRI unpacker asks for layer `i` of `image`: an extraction
/// snapshot whose committed name (chain ID) is `chain-<repo>-<i>`.
async fn prepare_layer(
    client: &mut SnapshotsClient<Channel>,
    image: &PrivateImage,
    i: usize,
) -> Result<(), tonic::Status> {
    let chain = |i: usize| format!("chain-{}-{i}", image.manifest_digest);
    let labels = HashMap::from([
        (IMAGE_REF_LABEL.to_string(), image.reference.clone()),
        (
            MANIFEST_DIGEST_LABEL.to_string(),
            image.manifest_digest.clone(),
        ),
        (
            LAYER_DIGEST_LABEL.to_string(),
            image.layer_digests[i].clone(),
        ),
        (SNAPSHOT_REF_LABEL.to_string(), chain(i)),
    ]);
    let key = format!("extract-{i}-{}", chain(i));
    let parent = if i == 0 { String::new() } else { chain(i - 1) };
    client
        .prepare(PrepareSnapshotRequest {
            snapshotter: "stoker".into(),
            key: key.clone(),
            parent,
            labels,
        })
        .await?;
    // An ordinary active snapshot: containerd would unpack into it. We only needed
    // to see that the layer was not remote.
    client
        .remove(RemoveSnapshotRequest {
            snapshotter: "stoker".into(),
            key,
        })
        .await
        .expect("remove the extraction snapshot");
    Ok(())
}

/// Prepares every layer of `image`; true if each was answered "already exists" (the
/// image is remote: mounted lazily), false if the first was an ordinary snapshot.
async fn pull_lazily(client: &mut SnapshotsClient<Channel>, image: &PrivateImage) -> bool {
    for i in 0..image.layer_digests.len() {
        match prepare_layer(client, image, i).await {
            Ok(()) => {
                assert_eq!(i, 0, "layer {i} unpacked normally after remote ones");
                return false;
            }
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => panic!("prepare of layer {i}: {status}"),
        }
    }
    true
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn credential(proxy: &FaultProxy, prefix: &str, expires_at_unix: i64) -> RegistryCredential {
    RegistryCredential {
        registry: proxy.host(),
        repository_prefix: prefix.into(),
        username: USER.into(),
        password: PASSWORD.into(),
        identity_token: String::new(),
        expires_at_unix,
    }
}

async fn set_credentials(
    api: &mut AgentClient<Channel>,
    credentials: Vec<RegistryCredential>,
) -> u32 {
    api.set_credentials(SetCredentialsRequest { credentials })
        .await
        .expect("SetCredentials")
        .into_inner()
        .stored
}

/// A request for `private/other`: its manifests and blobs, or a token for it.
fn about_other(request: &ProxiedRequest) -> bool {
    request.path.contains("private/other") || request.path.contains("private%2Fother")
}

/// Requests that carried credentials or a token and were served.
fn authorised(requests: &[ProxiedRequest]) -> Vec<&ProxiedRequest> {
    requests
        .iter()
        .filter(|r| r.authorization && r.status < 300)
        .collect()
}

#[test]
fn pushed_pull_secret_credentials_mount_a_private_image_and_expire() {
    let test = "pushed_pull_secret_credentials_mount_a_private_image_and_expire";
    if !common::registry_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let rt = common::runtime();
    let work = tempfile::tempdir().expect("work dir");
    let _unmount = UnmountOnDrop(work.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let proxy = rt
        .block_on(FaultProxy::start(&registry.host()))
        .expect("proxy");
    let app = push_and_convert(&rt, &registry, &proxy, work.path(), "private/app");
    let other = push_and_convert(&rt, &registry, &proxy, work.path(), "private/other");
    // From now on the registry is private: bearer tokens from a token service that
    // takes the pull secret's username and password.
    proxy.require_auth(ProxyAuth {
        basic: Some((USER.into(), PASSWORD.into())),
        identity_token: None,
        token_max_uses: None,
    });

    // The real agent, with no docker config on the node.
    let state = work.path().join("state");
    let api_socket = work.path().join("agent.sock");
    let snapshotter_socket = work.path().join("snapshotter.sock");
    let log_path = work.path().join("agent.log");
    let metrics_addr = format!(
        "127.0.0.1:{}",
        stoker_testkit::free_port().expect("free port")
    );
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_stoker-agent"))
        .env("STOKER_STATE_DIR", &state)
        .env("STOKER_SNAPSHOTTER_SOCKET", &snapshotter_socket)
        .env("STOKER_API_SOCKET", &api_socket)
        .env(
            "STOKER_DOCKER_CONFIG",
            work.path().join("no-such-docker-config.json"),
        )
        .env("STOKER_METRICS_LISTEN", &metrics_addr)
        .env("STOKER_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start stoker-agent");
    let agent = AgentChild(child);
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_until(DEADLINE, POLL, || {
            std::os::unix::net::UnixStream::connect(&api_socket).is_ok()
                && std::os::unix::net::UnixStream::connect(&snapshotter_socket).is_ok()
        }),
        "the agent did not come up; log:\n{}",
        log_text()
    );

    rt.block_on(async {
        let mut snapshots = snapshots_client(&snapshotter_socket).await;
        let mut api = AgentClient::new(
            stoker_testkit::containerd::unix_channel(&api_socket)
                .await
                .expect("connect to the agent API"),
        );

        // No credentials: the artifact lookup is refused, containerd unpacks normally.
        assert!(
            !pull_lazily(&mut snapshots, &app).await,
            "mounted without credentials"
        );
        let refused = proxy.requests();
        assert!(
            refused.iter().any(|r| r.status == 401),
            "the registry refused the agent: {refused:?}"
        );
        assert!(authorised(&refused).is_empty(), "{refused:?}");

        // The controller's push: this repository only, valid for an hour.
        let stored = set_credentials(
            &mut api,
            vec![credential(&proxy, "private/app", unix_now() + 3600)],
        )
        .await;
        assert_eq!(stored, 1);
        assert!(
            pull_lazily(&mut snapshots, &app).await,
            "not mounted after SetCredentials; log:\n{}",
            log_text()
        );
        let status = api
            .status(StatusRequest {})
            .await
            .expect("Status")
            .into_inner();
        let mounted = status
            .images
            .iter()
            .find(|m| m.image_ref == app.reference)
            .unwrap_or_else(|| panic!("{} is not mounted: {status:?}", app.reference));
        let root = Path::new(&mounted.mountpoint);
        for (file, text) in [
            ("data/one", "private/app: layer one\n"),
            ("data/two", "private/app: layer two\n"),
            ("data/three", "private/app: layer three\n"),
        ] {
            assert_eq!(
                std::fs::read_to_string(root.join(file)).expect("read through the mount"),
                text,
                "{file}"
            );
        }
        assert!(
            !root.join("data/gone").exists(),
            "the whiteout of layer three hides data/gone"
        );
        assert!(
            proxy
                .requests()
                .iter()
                .any(|r| r.is_blob_get() && r.authorization && r.status == 206),
            "chunks were read with the pushed credentials"
        );

        // A credential that expires: held, then gone once its time has passed.
        let stored = set_credentials(
            &mut api,
            vec![credential(&proxy, "private/other", unix_now() + 2)],
        )
        .await;
        assert_eq!(stored, 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while set_credentials(&mut api, Vec::new()).await != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the credential did not expire"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        proxy.clear_requests();
        assert!(
            !pull_lazily(&mut snapshots, &other).await,
            "mounted with an expired credential"
        );
        let after_expiry = proxy.requests();
        assert!(
            after_expiry.iter().any(about_other),
            "the agent did look the image up: {after_expiry:?}"
        );
        assert!(
            authorised(&after_expiry)
                .iter()
                .all(|r| !about_other(r) && !r.path.starts_with("/token")),
            "the expired credential was used: {after_expiry:?}"
        );

        // The worker dies; the next one has the credential that is still valid.
        let worker = worker_of(agent.0.id()).expect("the agent's worker process");
        let killed = Command::new("kill")
            .args(["-9", &worker.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let stored = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new worker answered; log:\n{}",
                log_text()
            );
            let new_worker = worker_of(agent.0.id()).filter(|pid| *pid != worker);
            if new_worker.is_some_and(process_alive)
                && let Ok(channel) = stoker_testkit::containerd::unix_channel(&api_socket).await
                && let Ok(response) = AgentClient::new(channel)
                    .set_credentials(SetCredentialsRequest {
                        credentials: Vec::new(),
                    })
                    .await
            {
                break response.into_inner().stored;
            }
            tokio::time::sleep(POLL).await;
        };
        assert_eq!(stored, 1, "the new worker holds the pushed credential");
    });

    let metrics = get_metrics(&metrics_addr);
    let logged = log_text();
    assert!(!logged.is_empty());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for (what, secret) in [
        ("password", PASSWORD),
        ("basic credentials (base64)", basic.as_str()),
        ("bearer token", "faultproxy-token-"),
    ] {
        assert!(!logged.contains(secret), "the {what} is in the agent's log");
        assert!(!metrics.contains(secret), "the {what} is in /metrics");
    }
    assert!(
        logged.contains("SetCredentials"),
        "the calls were logged (without secrets)"
    );
}
