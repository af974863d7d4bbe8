//! The real `stoker-agent` killed with SIGKILL in the middle of a prefetch (issue 8):
//! what reached the chunk cache is whole and verified, nothing half-written survives
//! the restart, and the same plan pushed again finishes, fetching only what was
//! missing.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::AgentChild;
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{PrefetchRequest as Wire, PrefetchState};
use stoker_format::{Digest, Plan};
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::fault_proxy::{Fault, FaultProxy, Scope};
use stoker_testkit::image::{Entry, Generator, ImageBuilder, push_layout};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::wait_until;

const REPO: &str = "agent/prefetch-kill";

/// The agent binary with its cache in `cache_dir`, one prefetch request at a time.
fn start_agent(work: &Path, cache_dir: &Path, api_socket: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("agent.log"))
        .expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_stoker-agent"))
        .env("STOKER_STATE_DIR", work.join("state"))
        .env("STOKER_SNAPSHOTTER_SOCKET", work.join("snap.sock"))
        .env("STOKER_API_SOCKET", api_socket)
        .env("STOKER_CACHE_DIR", cache_dir)
        .env("STOKER_PREFETCH_CONCURRENCY", "1")
        .env("STOKER_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start stoker-agent");
    // This agent's own worker, listening (not a previous agent's).
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            common::worker_of(child.id()).is_some()
                && std::os::unix::net::UnixStream::connect(api_socket).is_ok()
        }),
        "the agent API did not come up; log:\n{}",
        std::fs::read_to_string(work.join("agent.log")).unwrap_or_default()
    );
    child
}

/// A client of the agent API, polling until the socket takes a gRPC connection.
async fn unix_client(socket: &Path) -> AgentClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match stoker_testkit::containerd::unix_channel(socket).await {
            Ok(channel) => return AgentClient::new(channel),
            Err(e) if Instant::now() < deadline => {
                eprintln!("agent API not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect to the agent API: {e}"),
        }
    }
}

fn wire(image_ref: &str, plan: &Plan) -> Wire {
    Wire {
        image_ref: image_ref.to_string(),
        index_digest: plan.index_digest.to_string(),
        plan: plan.encode().expect("plan"),
        background_rest: false,
        learning_complete: false,
    }
}

/// Every chunk file in the cache: (name, whether its bytes hash to its name).
fn cached_chunks(cache_dir: &Path) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let Ok(prefixes) = std::fs::read_dir(cache_dir.join("chunks")) else {
        return found;
    };
    for prefix in prefixes.flatten() {
        for file in std::fs::read_dir(prefix.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(file.path()).unwrap_or_default();
            let good = Digest::of(&bytes).to_string() == format!("sha256:{name}");
            found.push((name, good));
        }
    }
    found
}

fn temp_files(cache_dir: &Path) -> usize {
    std::fs::read_dir(cache_dir.join("tmp")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_prefetch_leaves_only_verified_chunks_and_the_plan_completes_after_restart()
 {
    let test = "an_agent_killed_mid_prefetch_leaves_only_verified_chunks_and_the_plan_completes_after_restart";
    if !common::registry_tests_can_run(test) {
        return;
    }
    stoker_registry::install_crypto_provider();
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().expect("work dir");
    let layout = work.path().join("layout");
    ImageBuilder::new()
        .layer(vec![
            Entry::dir("data"),
            Entry::generated_file("data/big", Generator::random(16 << 20, 3)),
        ])
        .write_layout(&layout, "v1")
        .expect("layout");
    push_layout(&layout, "v1", &registry.host(), &format!("{REPO}:v1")).expect("push");
    let direct = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })
    .expect("client");
    let (store, selector) =
        stoker_convert::ImageStore::registry(direct, &format!("{}/{REPO}:v1", registry.host()))
            .expect("reference");
    stoker_convert::convert(
        &store,
        &selector,
        &stoker_convert::ConvertOptions::default(),
    )
    .await
    .expect("convert");
    let found = stoker_convert::find_artifact(&store, &selector, None)
        .await
        .expect("artifact");
    let index = stoker_convert::load_index(&store, &found)
        .await
        .expect("index");
    let plan = Plan {
        index_digest: found.index_digest,
        chunks: (0..index.chunk_count()).collect(),
    };
    let total = u64::from(index.chunk_count());

    // Slow blob reads, so the prefetch is under way long enough to be interrupted.
    let proxy = FaultProxy::start(&registry.host()).await.expect("proxy");
    proxy.set_fault_with(
        Fault::Latency(Duration::from_millis(700)),
        Scope::Blobs,
        None,
    );
    let image_ref = format!("{}/{REPO}:v1", proxy.host());
    let cache_dir = work.path().join("cache");
    let api_socket = work.path().join("agent.sock");
    let mut agent = AgentChild(start_agent(work.path(), &cache_dir, &api_socket));

    let mut client = unix_client(&api_socket).await;
    let mut stream = client
        .prefetch(wire(&image_ref, &plan))
        .await
        .expect("prefetch call")
        .into_inner();
    // Kill as soon as some, not all, chunks are done.
    let mut done_at_kill = 0;
    while let Some(progress) = stream.message().await.expect("progress") {
        if progress.chunks_done > 0 {
            done_at_kill = progress.chunks_done;
            break;
        }
    }
    agent.kill9();
    let killed = Instant::now();
    assert!(
        done_at_kill > 0 && done_at_kill < total,
        "the kill came mid-prefetch: {done_at_kill} of {total} chunks done"
    );
    let after_kill = cached_chunks(&cache_dir);
    let bad: Vec<_> = after_kill.iter().filter(|(_, good)| !good).collect();
    assert!(
        bad.is_empty(),
        "unverified chunk files in the cache: {bad:?}"
    );
    eprintln!(
        "SIGKILL at {done_at_kill}/{total} chunks: {} whole chunk files, {} temporary files",
        after_kill.len(),
        temp_files(&cache_dir)
    );

    // Restart, no fault: the same plan completes, fetching only what was missing.
    proxy.clear_faults();
    proxy.clear_requests();
    agent = AgentChild(start_agent(work.path(), &cache_dir, &api_socket));
    assert_eq!(temp_files(&cache_dir), 0, "leftovers removed at start");
    let mut client = unix_client(&api_socket).await;
    let mut stream = client
        .prefetch(wire(&image_ref, &plan))
        .await
        .expect("prefetch call")
        .into_inner();
    let mut last = None;
    while let Some(progress) = stream.message().await.expect("progress") {
        last = Some(progress);
    }
    let last = last.expect("progress");
    assert_eq!(
        last.state,
        PrefetchState::Done as i32,
        "{last:?}; log:\n{}",
        std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default()
    );
    let recovered = killed.elapsed();
    let cached = cached_chunks(&cache_dir);
    assert_eq!(cached.len() as u64, total, "every chunk cached");
    assert!(cached.iter().all(|(_, good)| *good), "every chunk verified");
    // Only the chunks missing at the kill were fetched again.
    let refetched: u64 = proxy
        .requests()
        .iter()
        .filter(|r| r.is_blob_get() && !r.path.contains(&found.index_digest.hex()))
        .filter_map(|r| r.range.as_deref())
        .filter_map(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)
        })
        .sum();
    let missing: u64 = index
        .chunks()
        .filter(|c| {
            !after_kill
                .iter()
                .any(|(n, _)| format!("sha256:{n}") == c.digest.to_string())
        })
        .map(|c| u64::from(c.compressed_len))
        .sum();
    assert!(
        refetched <= missing + (64 << 10),
        "refetched {refetched} bytes, {missing} were missing"
    );
    drop(agent);
    let line = format!(
        "RECOVERY | agent SIGKILL mid-prefetch, plan done after restart | {:.1}\n",
        recovered.as_secs_f64() * 1000.0
    );
    eprint!("{line}");
}
