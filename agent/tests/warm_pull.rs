//! The pull of an image on a node that a prefetch plan warmed (issue 4's warm
//! start). Before the pull, the agent's prefetch executor found the image's
//! Stoker artifact and loaded (and verified) its index for the plan; containerd's
//! CRI PullImage through the Stoker snapshotter then needs neither again, so the
//! agent asks the registry for no referrers, no artifact manifest and no index
//! during the pull. Nothing faked: docker-registry, containerd 1.6 with CRI,
//! runc, and the `stoker-agent` binary.
//!
//! `measure_the_pull_of_a_warmed_image` (ignored; run it with `--ignored
//! --nocapture`) prints where the time of such a pull goes: the pull, the
//! registry requests made during it, and the agent's log lines about it (each
//! with its time since the first Prepare, the artifact lookup and the mount with
//! their durations), for a cold node and for `STOKER_MEASURE_RUNS` (3) warmed
//! ones. `STOKER_MEASURE_AGENT` runs another agent binary (e.g.
//! `target/release/stoker-agent`), `STOKER_MEASURE_FILES` sets the image's
//! number of small files (20,000, about the demo image's).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    AgentChild, DEADLINE, EXPECTED, POLL, READ_LAYERS, layer_gets, push, three_layer_image,
};
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{PrefetchRequest as Wire, PrefetchState};
use stoker_format::Plan;
use stoker_testkit::containerd::{CRI_NAMESPACE, TestContainerd};
use stoker_testkit::image::{Entry, ImageBuilder};
use stoker_testkit::registry::{LoggedRequest, TestRegistry};
use stoker_testkit::wait_until;

/// What the image's Stoker artifact holds, as the converter pushed it.
struct Converted {
    reference: String,
    index_digest: String,
    artifact_digest: String,
    /// The chunk blobs (not the index).
    chunk_blobs: Vec<String>,
    /// A plan of every chunk of the image.
    plan: Plan,
}

/// Pushes `image` as `repo:v1`, converts it, and reads back its artifact.
fn push_and_convert(
    rt: &tokio::runtime::Runtime,
    registry: &TestRegistry,
    dir: &Path,
    image: &ImageBuilder,
    repo: &str,
) -> (Converted, stoker_testkit::image::WrittenImage) {
    let (reference, written) = push(registry, dir, image, repo);
    common::convert(rt, &reference);
    let (found, index) = rt
        .block_on(async {
            let (store, selector) =
                stoker_convert::ImageStore::registry(common::plain_http_client(), &reference)?;
            let found = stoker_convert::artifact::find_artifact(&store, &selector, None).await?;
            let index = stoker_convert::load_index(&store, &found).await?;
            Ok::<_, stoker_convert::ConvertError>((found, index))
        })
        .expect("the converted image's artifact and index");
    let plan = Plan {
        index_digest: found.index_digest,
        chunks: (0..index.chunk_count()).collect(),
    };
    let converted = Converted {
        reference,
        index_digest: found.index_digest.to_string(),
        artifact_digest: found.artifact.to_string(),
        chunk_blobs: found
            .blobs
            .iter()
            .map(|(digest, _)| digest.to_string())
            .filter(|digest| *digest != found.index_digest.to_string())
            .collect(),
        plan,
    };
    (converted, written)
}

/// A node: the agent binary (its own state, sockets and cache) and a containerd
/// using it as its `stoker` snapshotter.
struct Node {
    // containerd goes first (its containers and rootfs mounts), then the agent.
    containerd: TestContainerd,
    _agent: AgentChild,
    api_socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Node {
    fn start(dir: &Path, registry: &TestRegistry, log_filter: &str) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let state = dir.join("state");
        let snapshotter_socket = dir.join("snapshotter.sock");
        let api_socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).expect("agent log");
        // The measurement may time another build of the agent (a release one).
        let binary = std::env::var_os("STOKER_MEASURE_AGENT").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_stoker-agent")),
            PathBuf::from,
        );
        let child = Command::new(binary)
            .env("STOKER_STATE_DIR", &state)
            .env("STOKER_SNAPSHOTTER_SOCKET", &snapshotter_socket)
            .env("STOKER_API_SOCKET", &api_socket)
            .env("STOKER_INSECURE_REGISTRIES", registry.host())
            .env("STOKER_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("start stoker-agent");
        let agent = AgentChild(child);
        let up = wait_until(DEADLINE, POLL, || {
            common::worker_of(agent.0.id()).is_some()
                && std::os::unix::net::UnixStream::connect(&snapshotter_socket).is_ok()
                && std::os::unix::net::UnixStream::connect(&api_socket).is_ok()
        });
        assert!(
            up,
            "the agent did not come up; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let containerd = TestContainerd::start(&snapshotter_socket).expect("containerd");
        containerd
            .allow_plain_http(&registry.host())
            .expect("hosts.toml");
        Node {
            containerd,
            _agent: agent,
            api_socket,
            state,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pushes `plan` for `reference` to the agent API as the controller does for
    /// an image it has learned, and waits until it is done.
    fn warm(&self, rt: &tokio::runtime::Runtime, reference: &str, plan: &Plan) {
        let last = rt.block_on(async {
            let channel = stoker_testkit::containerd::unix_channel(&self.api_socket)
                .await
                .expect("connect to the agent API");
            let mut stream = AgentClient::new(channel)
                .prefetch(Wire {
                    image_ref: reference.to_string(),
                    index_digest: plan.index_digest.to_string(),
                    plan: plan.encode().expect("plan"),
                    background_rest: false,
                    learning_complete: true,
                })
                .await
                .expect("prefetch call")
                .into_inner();
            let mut last = None;
            while let Some(progress) = stream.message().await.expect("progress") {
                last = Some(progress);
            }
            last
        });
        assert!(
            last.as_ref()
                .is_some_and(|p| p.state == PrefetchState::Done as i32),
            "the plan did not finish: {last:?}\nagent log:\n{}",
            self.log_text()
        );
    }

    /// CRI PullImage of `reference`, as the kubelet does; returns how long it took.
    fn pull(&self, rt: &tokio::runtime::Runtime, reference: &str) -> Duration {
        let started = Instant::now();
        rt.block_on(self.containerd.cri_pull_image(reference))
            .unwrap_or_else(|e| panic!("CRI pull: {e}\nagent log:\n{}", self.log_text()));
        started.elapsed()
    }
}

/// Requests the agent (not containerd) made.
fn agents_requests(requests: &[LoggedRequest]) -> Vec<&LoggedRequest> {
    requests
        .iter()
        .filter(|r| !r.user_agent.starts_with("containerd"))
        .collect()
}

#[test]
fn a_pull_after_a_plan_asks_the_registry_for_no_referrers_and_no_index() {
    let test = "a_pull_after_a_plan_asks_the_registry_for_no_referrers_and_no_index";
    if !common::lazy_containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let rt = common::runtime();
    let (image, written) = push_and_convert(
        &rt,
        &registry,
        dir.path(),
        &three_layer_image("warm"),
        "test/warm",
    );

    let node = Node::start(&dir.path().join("node"), &registry, "debug");
    node.warm(&rt, &image.reference, &image.plan);

    registry.clear_requests();
    node.pull(&rt, &image.reference);
    let out = node
        .containerd
        .run(
            CRI_NAMESPACE,
            &image.reference,
            "warm-1",
            &["sh", "-c", READ_LAYERS],
        )
        .unwrap_or_else(|e| panic!("run: {e}\nagent log:\n{}", node.log_text()));
    assert_eq!(out, EXPECTED);

    // containerd's own requests (the manifest and the config) are logged by the
    // time the container has run, and so would any the agent made for the pull.
    let (requests, config_seen) = registry.wait_for_requests(DEADLINE, |requests| {
        requests
            .iter()
            .any(|r| r.is_blob_get() && r.path.ends_with(&written.config.digest))
    });
    assert!(config_seen, "containerd fetched the config: {requests:?}");
    assert!(layer_gets(&requests, &written).is_empty(), "{requests:?}");
    // The container's reads found every chunk on disk, and the pull needed nothing
    // the plan's preparation had not found already: the agent asked for nothing.
    let asked: Vec<_> = agents_requests(&requests)
        .into_iter()
        .filter(|r| !(r.is_blob_get() && image.chunk_blobs.iter().any(|b| r.path.ends_with(b))))
        .collect();
    assert!(
        asked.is_empty(),
        "the agent asked the registry during the warmed pull: {asked:#?}\nagent log:\n{}",
        node.log_text()
    );
    let about_the_artifact: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.path.contains("/referrers/")
                || r.path.contains("/manifests/sha256-")
                || r.path.ends_with(&image.artifact_digest)
                || r.path.ends_with(&image.index_digest)
        })
        .collect();
    assert!(about_the_artifact.is_empty(), "{about_the_artifact:#?}");
    let log = node.log_text();
    assert!(
        log.contains("lazy filesystem mounted") && log.contains("index_from=\"memory\""),
        "the mount took the plan's index; agent log:\n{log}"
    );
    assert_eq!(
        common::mounts_under(&node.state)
            .iter()
            .filter(|m| m.contains("/mounts/"))
            .count(),
        1,
        "one lazy mount for the image"
    );
}

/// An image whose index is about the size of the demo's (20,000 files): the
/// three layers of [`three_layer_image`] and a fourth of small files.
fn measured_image() -> ImageBuilder {
    let files: usize = std::env::var("STOKER_MEASURE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut many = vec![Entry::dir("many")];
    for d in 0..100 {
        many.push(Entry::dir(format!("many/d{d}")));
    }
    for i in 0..files {
        let len = 200 + (i * 7919) % 1800;
        many.push(Entry::file(
            format!("many/d{}/file{i}.py", i % 100),
            common::pattern(i as u64, len),
        ));
    }
    three_layer_image("measured").layer(many)
}

#[test]
#[ignore = "a measurement: prints where a warmed pull's time goes; run with --ignored --nocapture"]
fn measure_the_pull_of_a_warmed_image() {
    let test = "measure_the_pull_of_a_warmed_image";
    if !common::lazy_containerd_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = common::UnmountOnDrop(dir.path().to_path_buf());
    let registry = TestRegistry::start().expect("registry");
    let rt = common::runtime();
    let (image, _) = push_and_convert(&rt, &registry, dir.path(), &measured_image(), "test/m");
    let runs: usize = std::env::var("STOKER_MEASURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // The production log level, and the lines about the pull.
    let filter = "info,stoker_agent::resolver=debug,stoker_snapshotter::service=debug";
    let mut warmed_pulls = Vec::new();
    for run in 0..=runs {
        // Run 0: a cold node (no plan), for comparison.
        let warmed = run > 0;
        let node = Node::start(&dir.path().join(format!("node{run}")), &registry, filter);
        if warmed {
            node.warm(&rt, &image.reference, &image.plan);
        }
        let log_before = node.log_text().len();
        registry.clear_requests();
        let took = node.pull(&rt, &image.reference);
        let (requests, _) = registry.wait_for_requests(DEADLINE, |requests| {
            requests.iter().any(|r| r.path.contains("/blobs/"))
        });
        let kind = if warmed { "warmed" } else { "cold" };
        eprintln!(
            "\n=== run {run} ({kind}): CRI PullImage {:.1} ms",
            took.as_secs_f64() * 1e3
        );
        for r in &requests {
            eprintln!(
                "  registry: {} {} {} {} B ({})",
                r.method, r.path, r.status, r.response_bytes, r.user_agent
            );
        }
        let log = node.log_text();
        let lines: Vec<(f64, &str)> = log[log_before..]
            .lines()
            .filter_map(|line| Some((log_seconds(line)?, line)))
            .collect();
        let first = lines
            .iter()
            .find(|(_, line)| line.contains(" Prepare "))
            .map_or(0.0, |(at, _)| *at);
        let wanted = [
            " Prepare ",
            "looked up",
            "known from",
            "mounted",
            "recorded remote",
        ];
        let mut last = first;
        for (at, line) in &lines {
            if wanted.iter().any(|w| line.contains(w)) {
                eprintln!("  agent +{:6.1} ms {}", (at - first) * 1e3, shorten(line));
                last = *at;
            }
        }
        eprintln!(
            "  agent: first Prepare to the top layer recorded: {:.1} ms",
            (last - first) * 1e3
        );
        // The floor: the same pull again, with every snapshot and blob present.
        let again = node.pull(&rt, &image.reference);
        eprintln!(
            "  the same pull again (nothing left to do): {:.1} ms",
            again.as_secs_f64() * 1e3
        );
        if warmed {
            warmed_pulls.push((took, again));
        }
    }
    let ms = |pick: fn(&(Duration, Duration)) -> Duration| {
        warmed_pulls
            .iter()
            .map(|pulls| format!("{:.1}", pick(pulls).as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("\nwarmed pulls (ms): {}", ms(|p| p.0));
    eprintln!("the same pulls again (ms): {}", ms(|p| p.1));
}

/// Seconds since midnight of a log line's timestamp
/// (`2026-11-23T09:21:35.479155Z  INFO …`).
fn log_seconds(line: &str) -> Option<f64> {
    let (_, time) = line.split_whitespace().next()?.split_once('T')?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// A log line without its timestamp, the long label maps of Prepare and
/// mountpoint paths.
fn shorten(line: &str) -> String {
    let line = line
        .split_once(' ')
        .map_or(line, |(_, rest)| rest.trim_start());
    let line = line.find("labels=").map_or(line, |at| &line[..at]);
    line.split(' ')
        .filter(|field| !field.starts_with("mountpoint=") && !field.starts_with("key="))
        .collect::<Vec<_>>()
        .join(" ")
}
