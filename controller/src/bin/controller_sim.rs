//! `controller-sim`: a simulation benchmark of the controller's event
//! handling at cluster scale, without a cluster.
//!
//! It runs the real reconciler, warmer and gate writer against an in-process
//! API server (every request answered at once) and in-process agents (every
//! push acknowledged and finished at once), and measures:
//!
//! 1. cold start: 5,000 nodes in 10 pools and 500 ImagePrefetch objects (50
//!    per pool, each with a learned plan) reconciled; every candidate agent
//!    must receive its plans;
//! 2. scale-up: one workload scales 10 → 60 replicas while 50 new nodes of
//!    its pool join with the startup taint; the time until every new node's
//!    agent has all its plans, and until the gated nodes' warm targets are
//!    written;
//! 3. memory: the process's resident set (VmRSS and peak VmHWM from
//!    /proc/self/status).
//!
//! `cargo run --release -p stoker-controller --bin controller-sim [-- --nodes N --prefetches M --json]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use http::{Request, Response};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, Node, NodeSpec, PodSpec, PodTemplateSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use stoker_api::agent::{
    GetTraceResponse, PrefetchProgress, PrefetchRequest, PrefetchState, TraceSummary,
};
use stoker_controller::Error;
use stoker_controller::agents::{AgentApi, ProgressStream};
use stoker_controller::learning::encode_for_status;
use stoker_controller::metrics::Metrics;
use stoker_controller::reconcile::{self, Context};
use stoker_controller::warmer::{Warmer, WarmerConfig};
use stoker_crds::warm_gate::STARTUP_TAINT_KEY;
use stoker_crds::{FINALIZER, ImagePrefetch, ImagePrefetchSpec, ImagePrefetchStatus, ImageStatus};
use stoker_format::{Digest, Plan};

const POOLS: usize = 10;
const NAMESPACE: &str = "sim";

/// Agents that acknowledge and finish every push at once, counting them.
#[derive(Default)]
struct SimAgents {
    pushes: AtomicUsize,
    /// Nanoseconds since `epoch` of the last push received.
    last_push_ns: AtomicU64,
    epoch: Option<Instant>,
}

impl SimAgents {
    fn new() -> Self {
        SimAgents {
            epoch: Some(Instant::now()),
            ..SimAgents::default()
        }
    }

    fn last_push(&self) -> Instant {
        self.epoch.unwrap_or_else(Instant::now)
            + Duration::from_nanos(self.last_push_ns.load(Ordering::Relaxed))
    }
}

impl AgentApi for SimAgents {
    fn prefetch(
        &self,
        _node: &str,
        request: PrefetchRequest,
    ) -> BoxFuture<'static, Result<ProgressStream, Error>> {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.map_or(0, |e| e.elapsed().as_nanos() as u64);
        self.last_push_ns.fetch_max(now, Ordering::Relaxed);
        let done = PrefetchProgress {
            index_digest: request.index_digest,
            state: PrefetchState::Done as i32,
            chunks_done: 1,
            chunks_total: 1,
            ..PrefetchProgress::default()
        };
        async move { Ok(futures::stream::iter([Ok(done)]).boxed()) }.boxed()
    }
    fn cancel_prefetch(&self, _: &str, _: &str) -> BoxFuture<'static, Result<bool, Error>> {
        async { Ok(false) }.boxed()
    }
    fn list_traces(&self, _: &str) -> BoxFuture<'static, Result<Vec<TraceSummary>, Error>> {
        async { Ok(Vec::new()) }.boxed()
    }
    fn get_trace(
        &self,
        node: &str,
        _: &str,
    ) -> BoxFuture<'static, Result<GetTraceResponse, Error>> {
        let node = node.to_string();
        async move { Err(Error::NoAgent(node)) }.boxed()
    }
    fn container_ready(&self, _: &str, _: &str) -> BoxFuture<'static, Result<bool, Error>> {
        async { Ok(false) }.boxed()
    }
    fn set_credentials(
        &self,
        _: &str,
        credentials: Vec<stoker_api::agent::RegistryCredential>,
    ) -> BoxFuture<'static, Result<u32, Error>> {
        let stored = credentials.len() as u32;
        async move { Ok(stored) }.boxed()
    }
}

/// Requests the in-process API server answered, by kind.
#[derive(Default)]
struct ApiCounts {
    status_patches: AtomicUsize,
    events: AtomicUsize,
    node_patches: AtomicUsize,
    other: AtomicUsize,
}

/// A kube client whose API server answers every request at once.
fn instant_api(counts: Arc<ApiCounts>) -> kube::Client {
    let prefetch_json = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "stoker.dev/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": "x", "namespace": NAMESPACE}, "spec": {"workload": {}}
    }))
    .unwrap_or_default();
    let node_json = serde_json::to_vec(
        &serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "x"}}),
    )
    .unwrap_or_default();
    let service = tower::service_fn(move |request: Request<Body>| {
        let counts = counts.clone();
        let (prefetch_json, node_json) = (prefetch_json.clone(), node_json.clone());
        async move {
            let path = request.uri().path().to_string();
            let body = if path.ends_with("/status") {
                counts.status_patches.fetch_add(1, Ordering::Relaxed);
                prefetch_json
            } else if path.contains("/events") {
                counts.events.fetch_add(1, Ordering::Relaxed);
                request
                    .into_body()
                    .collect_bytes()
                    .await
                    .map(|b| b.to_vec())
                    .unwrap_or_default()
            } else if path.starts_with("/api/v1/nodes/") {
                counts.node_patches.fetch_add(1, Ordering::Relaxed);
                node_json
            } else {
                counts.other.fetch_add(1, Ordering::Relaxed);
                b"{}".to_vec()
            };
            Response::builder().status(200).body(Body::from(body))
        }
    });
    kube::Client::new(service, "default")
}

fn node(name: &str, pool: usize, gated: bool) -> Node {
    let mut taints = vec![Taint {
        key: "nvidia.com/gpu".into(),
        value: Some("present".into()),
        effect: "NoSchedule".into(),
        ..Taint::default()
    }];
    if gated {
        taints.push(Taint {
            key: STARTUP_TAINT_KEY.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                ("pool".to_string(), format!("pool-{pool}")),
                ("kubernetes.io/hostname".to_string(), name.to_string()),
                (
                    "topology.kubernetes.io/zone".to_string(),
                    format!("zone-{}", pool % 3),
                ),
                ("nvidia.com/gpu.present".to_string(), "true".to_string()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn deployment(i: usize, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([("app".to_string(), format!("app-{i}"))]);
    Deployment {
        metadata: ObjectMeta {
            name: Some(format!("app-{i}")),
            namespace: Some(NAMESPACE.into()),
            uid: Some(format!("uid-{i}")),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some(BTreeMap::from([(
                        "pool".to_string(),
                        format!("pool-{}", i % POOLS),
                    )])),
                    tolerations: Some(vec![Toleration {
                        key: Some("nvidia.com/gpu".into()),
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }]),
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some(format!("registry.example/team/app-{i}:v1")),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// An ImagePrefetch that learned a 2 GiB plan (2048 chunks in a few runs,
/// as a real startup reads them).
fn prefetch(i: usize, deployment: &Deployment) -> anyhow::Result<ImagePrefetch> {
    let mut p = ImagePrefetch::new(
        &format!("app-{i}"),
        ImagePrefetchSpec::for_deployment(&format!("app-{i}")),
    );
    p.metadata.namespace = Some(NAMESPACE.into());
    p.metadata.uid = Some(format!("prefetch-{i}"));
    p.metadata.generation = Some(1);
    p.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let digest = Digest::of(format!("index-{i}").as_bytes());
    let chunks: Vec<u32> = (0..16u32)
        .flat_map(|run| run * 1000..run * 1000 + 128)
        .collect();
    let plan = encode_for_status(
        &Plan {
            index_digest: digest,
            chunks,
        },
        40 << 10,
    )?;
    let image = deployment
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone())
        .context("image")?;
    p.status = Some(ImagePrefetchStatus {
        images: vec![ImageStatus {
            image,
            index_digest: Some(digest.to_string()),
            pods_learned: 3,
            hot_chunks: plan.chunks as u64,
            hot_bytes: (plan.chunks as u64) << 20,
            plan: Some(plan.base64),
            ..ImageStatus::default()
        }],
        ..ImagePrefetchStatus::default()
    });
    Ok(p)
}

fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:") / 1024, field("VmHWM:") / 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn wait_for(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !condition() {
        anyhow::ensure!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

struct Args {
    nodes: usize,
    prefetches: usize,
    json: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 5000,
        prefetches: 500,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--nodes" => args.nodes = it.next().context("--nodes N")?.parse()?,
            "--prefetches" => args.prefetches = it.next().context("--prefetches N")?.parse()?,
            "--json" => args.json = true,
            other => {
                anyhow::bail!("unknown argument {other:?} (use --nodes N --prefetches M --json)")
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let (rss_start, _) = memory();
    let counts = Arc::new(ApiCounts::default());
    let client = instant_api(counts.clone());
    let agents = Arc::new(SimAgents::new());
    let warmer = Warmer::new(agents.clone(), WarmerConfig::default());
    let (prefetch_store, mut prefetch_writer) = reflector::store::<ImagePrefetch>();
    let (deployment_store, mut deployment_writer) = reflector::store::<Deployment>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stoker-controller".into(),
            instance: Some("sim".into()),
        },
    );
    let ctx = Context::new(
        client.clone(),
        prefetch_store,
        deployment_store,
        warmer.clone(),
        agents.clone(),
        Metrics::new()?,
        recorder,
    );

    // 1. Cold start.
    let started = Instant::now();
    for n in 0..args.nodes {
        warmer.node_applied(&node(&format!("node-{n}"), n % POOLS, false));
    }
    let nodes_loaded = started.elapsed();
    let mut prefetches = Vec::new();
    for i in 0..args.prefetches {
        let d = deployment(i, 10);
        deployment_writer.apply_watcher_event(&watcher::Event::Apply(d.clone()));
        let p = prefetch(i, &d)?;
        prefetch_writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        prefetches.push(Arc::new(p));
    }
    let expected_pushes = (0..args.prefetches)
        .map(|i| (0..args.nodes).filter(|n| n % POOLS == i % POOLS).count())
        .sum::<usize>();
    let reconcile_start = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(prefetches.iter().cloned())
        .map(|p| {
            let ctx = ctx.clone();
            async move {
                let t = Instant::now();
                let result = reconcile::reconcile(p, ctx).await;
                (t.elapsed(), result)
            }
        })
        .buffer_unordered(16)
        .map(|(latency, result)| {
            if let Err(error) = result {
                eprintln!("reconcile failed: {error}");
            }
            latency
        })
        .collect()
        .await;
    let reconciled = reconcile_start.elapsed();
    wait_for(
        "every candidate agent to receive its plans",
        Duration::from_secs(120),
        || agents.pushes.load(Ordering::Relaxed) >= expected_pushes,
    )
    .await?;
    let all_pushed = agents
        .last_push()
        .saturating_duration_since(reconcile_start);
    let first_key = ObjectRef::from_obj(&*prefetches[0]);
    wait_for("warm nodes", Duration::from_secs(120), || {
        let c = warmer.counts(&first_key);
        c.total > 0 && c.warm == c.total
    })
    .await?;
    let mut sorted = latencies.clone();
    sorted.sort();
    let (rss_cold, _) = memory();

    // 2. Scale-up with new, gated nodes joining the first workload's pool.
    warmer.set_synced();
    let _ = stoker_controller::gate::write_dirty_gates(&client, &warmer).await;
    let pushes_before = agents.pushes.load(Ordering::Relaxed);
    let patches_before = counts.node_patches.load(Ordering::Relaxed);
    let new_nodes = 50;
    let per_node_plans = (0..args.prefetches).filter(|i| i % POOLS == 0).count();
    let scale_start = Instant::now();
    for n in 0..new_nodes {
        warmer.node_applied(&node(&format!("new-node-{n}"), 0, true));
    }
    let scaled = deployment(0, 60);
    deployment_writer.apply_watcher_event(&watcher::Event::Apply(scaled));
    let scale_reconcile = Instant::now();
    reconcile::reconcile(prefetches[0].clone(), ctx.clone())
        .await
        .map_err(|e| anyhow::anyhow!("scale-up reconcile: {e}"))?;
    let scale_reconcile = scale_reconcile.elapsed();
    wait_for("the new nodes' plans", Duration::from_secs(60), || {
        agents.pushes.load(Ordering::Relaxed) >= pushes_before + new_nodes * per_node_plans
    })
    .await?;
    let scale_pushed = agents.last_push().saturating_duration_since(scale_start);
    let gates = stoker_controller::gate::write_dirty_gates(&client, &warmer).await;
    let gates_written = scale_start.elapsed();
    anyhow::ensure!(
        counts.node_patches.load(Ordering::Relaxed) - patches_before == new_nodes
            && gates.len() == new_nodes,
        "expected {new_nodes} warm-target writes, got {}",
        gates.len()
    );
    let (rss_end, hwm) = memory();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "nodes": args.nodes, "prefetches": args.prefetches,
                "pushes": expected_pushes,
                "nodes_load_ms": ms(nodes_loaded),
                "reconcile_ms": {"p50": ms(percentile(&sorted, 0.5)), "p99": ms(percentile(&sorted, 0.99)),
                                 "max": ms(percentile(&sorted, 1.0))},
                "cold_start_all_reconciled_ms": ms(reconciled),
                "cold_start_all_agents_reached_ms": ms(all_pushed),
                "scale_up_reconcile_ms": ms(scale_reconcile),
                "scale_up_all_agents_reached_ms": ms(scale_pushed),
                "scale_up_gates_written_ms": ms(gates_written),
                "rss_mib": {"start": rss_start, "after_cold_start": rss_cold, "end": rss_end, "peak": hwm},
                "api_requests": {"status_patches": counts.status_patches.load(Ordering::Relaxed),
                                 "events": counts.events.load(Ordering::Relaxed),
                                 "node_patches": counts.node_patches.load(Ordering::Relaxed)},
            })
        );
    } else {
        println!(
            "controller-sim: {} nodes in {POOLS} pools, {} ImagePrefetch objects",
            args.nodes, args.prefetches
        );
        println!(
            "  nodes fed to the warmer           {:>9.1} ms",
            ms(nodes_loaded)
        );
        println!(
            "  reconcile latency p50/p99/max     {:>9.2} / {:.2} / {:.2} ms",
            ms(percentile(&sorted, 0.5)),
            ms(percentile(&sorted, 0.99)),
            ms(percentile(&sorted, 1.0))
        );
        println!(
            "  cold start: all reconciled        {:>9.1} ms",
            ms(reconciled)
        );
        println!(
            "  cold start: {expected_pushes} pushes reached agents {:>9.1} ms",
            ms(all_pushed)
        );
        println!(
            "  scale-up reconcile                {:>9.2} ms",
            ms(scale_reconcile)
        );
        println!(
            "  scale-up: {new_nodes} new nodes x {per_node_plans} plans reached agents {:>7.1} ms",
            ms(scale_pushed)
        );
        println!(
            "  scale-up: {new_nodes} warm targets written  {:>9.1} ms",
            ms(gates_written)
        );
        println!(
            "  RSS start / after cold start / end / peak: {rss_start} / {rss_cold} / {rss_end} / {hwm} MiB"
        );
        println!(
            "  API requests: {} status patches, {} events, {} node patches",
            counts.status_patches.load(Ordering::Relaxed),
            counts.events.load(Ordering::Relaxed),
            counts.node_patches.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
