//! `stoker-bench --sections headline`: the headline numbers (issue 5).
//!
//! A real Python image of about 2 GB ([`image`]: Debian bookworm + python3, a layer of
//! pip packages from numpy to TensorFlow, and a start command that imports them and
//! computes) is served by a docker-registry behind a 1 Gbit/s link ([`link`]: a network
//! namespace, a veth pair and a `tbf` qdisc). It is converted once (`stoker convert`) and
//! started five ways, each on a fresh node (its own containerd, and for Stoker its own
//! `stoker-agent` and empty chunk cache), with the page cache dropped before each start:
//!
//! 1. **full pull**: `ctr images pull` into containerd's overlayfs, then `ctr run`;
//! 2. **Stoker lazy, cold**: CRI `PullImage` through the Stoker snapshotter, then
//!    `ctr run`; the agent records the startup trace;
//! 3. **Stoker, plan prefetched**: the trace of 2, collected through the agent API and
//!    merged into a plan, is pushed to a new node's agent (`Prefetch`); then the start;
//! 4. **Stoker, trace-ordered layout**: the image converted again with the plan
//!    (`stoker convert --plan`: the plan's chunks back to back in one hot blob), the
//!    re-bound plan prefetched on a new node; then the start;
//! 5. **local floor**: node 1 again, image already unpacked; only `ctr run` is timed.
//!
//! Time is to the container's first output line; bytes are the blob bytes the registry
//! served before the start (the prefetch) and during it. What the workload reads is the
//! trace of start 2: the chunks it touched, uncompressed and as stored.

mod image;
mod link;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{ContainerReadyRequest, StatusRequest};
use stoker_convert::{ConvertOptions, ConvertReport, ImageStore};
use stoker_format::{Digest, Index, Plan, Trace};
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::containerd::{AgentProcess, TestContainerd, unix_channel, workspace_binary};

use crate::demo::{
    AgentCounters, agent_counters, check_machine, collect_trace, describe_agent_counters,
    drop_caches, pull_into_overlayfs, push_plan, run_container,
};
use crate::report::{Section, mb};
use link::{NetnsRegistry, ThrottledLink};

/// The link's rate (`tc` syntax) and the same in bits per second for the report.
const RATE: &str = "1gbit";
/// The learning node's startup window: long enough for a cold start over the link;
/// the bench closes it earlier through the agent API (`ContainerReady`).
const LEARN_WINDOW_SECS: u64 = 240;
const REPOSITORY: &str = "bench/python:v1";

/// One start, measured.
struct Start {
    name: &'static str,
    /// To the first output line: from the pull, or for the floor from `ctr run`.
    first_line: Duration,
    output: String,
    /// Blob bytes and GETs served before the start (prefetch), and the prefetch's time.
    bytes_before: u64,
    gets_before: usize,
    prefetch: Option<Duration>,
    /// Blob bytes and GETs served from the pull to the container's exit.
    bytes_during: u64,
    gets_during: usize,
    /// For a Stoker start, what its agent answered (its `/metrics`).
    agent_counters: Option<AgentCounters>,
}

struct Headline {
    image: image::PythonImage,
    qdisc: String,
    convert_secs: f64,
    layout_convert_secs: f64,
    starts: Vec<Start>,
    plan_chunks: usize,
    /// What the workload read (start 2's trace): chunk bytes uncompressed, and as stored.
    read_bytes: u64,
    read_compressed_bytes: u64,
    hot_blob_bytes: u64,
}

pub async fn run() -> anyhow::Result<Section> {
    let handle = tokio::runtime::Handle::current();
    let headline = tokio::task::spawn_blocking(move || measure(&handle))
        .await
        .context("the headline bench's thread")??;
    Ok(table(&headline))
}

fn table(h: &Headline) -> Section {
    let floor = h
        .starts
        .iter()
        .find(|s| s.name.starts_with("5."))
        .map(|s| s.first_line.as_secs_f64())
        .unwrap_or(f64::NAN);
    let layers: Vec<String> = h.image.layer_bytes.iter().map(|&b| mb(b)).collect();
    let title = format!(
        "Headline: a {:.1} GB Python image over a 1 Gbit/s link",
        h.image.file_bytes as f64 / 1e9
    );
    let mut section = Section::new(
        &title,
        &format!(
            "A Python image built by the bench ({} of files, {} compressed in 3 layers: \
             Debian bookworm minbase + python3 {}, pip packages {}, app {}): {}. Its start command \
             imports them all and computes with each, then prints one line. The registry \
             runs in a network namespace behind a veth pair shaped by `{}`. Each start runs on a \
             fresh node (own containerd, own stoker-agent, empty chunk cache) after \
             `echo 3 > /proc/sys/vm/drop_caches`. Time: from the pull (CRI PullImage for Stoker, \
             `ctr images pull` for overlayfs) to the container's first output line; the floor \
             times only `ctr run` of an image already unpacked. Bytes: blob bytes the registry \
             served. `stoker convert`: {:.0} s; again with `--plan`: {:.0} s.",
            mb(h.image.file_bytes),
            mb(h.image.compressed_bytes()),
            layers.first().cloned().unwrap_or_default(),
            layers.get(1).cloned().unwrap_or_default(),
            layers.get(2).cloned().unwrap_or_default(),
            image::PACKAGES.join(", "),
            h.qdisc,
            h.convert_secs,
            h.layout_convert_secs,
        ),
        &[
            "start",
            "to first output line",
            "vs floor",
            "fetched before start (GETs, time)",
            "fetched during start (GETs)",
        ],
    );
    for s in &h.starts {
        section.row(vec![
            s.name.into(),
            format!("{:.2} s", s.first_line.as_secs_f64()),
            format!("{:.2}×", s.first_line.as_secs_f64() / floor),
            match s.prefetch {
                Some(t) => format!(
                    "{} ({}, {:.1} s)",
                    mb(s.bytes_before),
                    s.gets_before,
                    t.as_secs_f64()
                ),
                None => "–".into(),
            },
            format!("{} ({})", mb(s.bytes_during), s.gets_during),
        ]);
    }
    let by_name = |prefix: &str| h.starts.iter().find(|s| s.name.starts_with(prefix));
    if let Some(warm) = by_name("3.") {
        let ratio = warm.first_line.as_secs_f64() / floor;
        section.note(format!(
            "Goal (3) within 1.15× of the floor (5): {ratio:.2}× — {}.",
            if ratio <= 1.15 { "met" } else { "NOT met" }
        ));
    }
    if let Some(layout) = by_name("4.") {
        let ratio = layout.first_line.as_secs_f64() / floor;
        section.note(format!("(4) is at {ratio:.2}× of the floor."));
    }
    if let Some(lazy) = by_name("2.") {
        let ratio = lazy.bytes_during as f64 / h.read_bytes.max(1) as f64;
        section.note(format!(
            "What the workload reads (the trace of start 2, {} chunks: what the kernel asked the \
             lazy filesystem for, so mmap faults and kernel read-ahead included): {} uncompressed, \
             {} as stored (zstd). Goal: bytes fetched by (2) within 1.3× of what it reads: {} / {} = \
             {ratio:.2}× — {} ({:.2}× of the stored size of those chunks).",
            h.plan_chunks,
            mb(h.read_bytes),
            mb(h.read_compressed_bytes),
            mb(lazy.bytes_during),
            mb(h.read_bytes),
            if ratio <= 1.3 { "met" } else { "NOT met" },
            lazy.bytes_during as f64 / h.read_compressed_bytes.max(1) as f64,
        ));
    }
    section.note(format!(
        "The trace-ordered layout puts the plan's chunks in one hot blob of {}: the prefetch \
         of (4) takes a few large ranged GETs where (3) takes many small ones.",
        mb(h.hot_blob_bytes)
    ));
    section.note(
        "Bytes during a Stoker start include the image config, the Stoker index and the lazy \
         filesystem's read-ahead; the prefetched starts also read what the trace did not record.",
    );
    section.note(
        "The learning node's startup window opens at the pull and is closed by \
         `ContainerReady` once the container printed its line (240 s at most), so the \
         trace covers the start.",
    );
    for start in &h.starts {
        if let Some(counters) = &start.agent_counters {
            section.note(describe_agent_counters(start.name, counters));
        }
    }
    section.note(
        "Machine: 2 cores shared with other jobs (builds) during the run: times vary between runs.",
    );
    if h.image.built {
        section.note("The image was built in this run (cached under /var/tmp/stoker-bench-cache).");
    }
    section
}

fn measure(rt: &tokio::runtime::Handle) -> anyhow::Result<Headline> {
    check_machine()?;
    for tool in ["ip", "tc", "umoci", "python3"] {
        if stoker_testkit::find_tool(tool).is_none() {
            bail!("{tool} not found: run `make deps` (iproute2, umoci) and install python3 3.11");
        }
    }
    let agent_binary = workspace_binary("stoker-agent", "stoker-agent")?;
    let image = image::build_or_reuse().context("building the Python image")?;
    eprintln!(
        "headline: image of {} ({} compressed, layers {:?})",
        mb(image.file_bytes),
        mb(image.compressed_bytes()),
        image.layer_bytes
    );
    let work = tempfile::Builder::new()
        .prefix("stoker-headline-")
        .tempdir()?;
    let link = ThrottledLink::create(RATE)?;
    let qdisc = link.qdisc();
    let registry = NetnsRegistry::start(link)?;
    eprintln!("headline: registry at {} behind {qdisc}", registry.host());
    stoker_testkit::image::push_layout(&image.layout, image::TAG, &registry.host(), REPOSITORY)
        .context("pushing the image")?;
    let reference = format!("{}/{REPOSITORY}", registry.host());

    eprintln!("headline: stoker convert {reference}");
    let client = RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..Default::default()
    })?;
    let (store, selector) = ImageStore::registry(client, &reference)?;
    let options = ConvertOptions {
        staging_dir: Some(work.path().to_path_buf()),
        ..ConvertOptions::default()
    };
    let started = Instant::now();
    let normal = convert(rt, &store, &selector, &options)?;
    let convert_secs = started.elapsed().as_secs_f64();
    let mut starts = Vec::new();

    // 2. Stoker lazy, cold: the learning node.
    let learn_env = [("STOKER_TRACE_WINDOW_SECS", LEARN_WINDOW_SECS.to_string())];
    let lazy_node = Node::stoker(
        &agent_binary,
        &work.path().join("lazy"),
        &registry,
        &learn_env,
    )?;
    eprintln!("headline: (2) stoker lazy, cold");
    starts.push(lazy_node.pull_and_run(
        rt,
        &registry,
        "2. Stoker lazy, cold",
        "lazy",
        &reference,
        None,
    )?);
    lazy_node.expect_mounted(rt, &normal.index_digest)?;
    rt.block_on(container_ready(&lazy_node.agent()?.api_socket(), "lazy"));

    // 1. Full pull into overlayfs; 5. the floor, on the same node.
    eprintln!("headline: (1) full pull into overlayfs");
    {
        let node = Node::overlayfs(&work.path().join("overlayfs"))?;
        drop_caches();
        registry.clear_requests();
        let started = Instant::now();
        pull_into_overlayfs(&node.containerd, &reference)?;
        let (first_line, output) =
            run_container(&node.containerd, "overlayfs", &reference, "full", started)?;
        starts.push(Start {
            name: "1. full pull, overlayfs",
            first_line,
            output,
            bytes_before: 0,
            gets_before: 0,
            prefetch: None,
            bytes_during: registry.blob_bytes(),
            gets_during: registry.blob_requests(),
            agent_counters: None,
        });
        eprintln!("headline: (5) local floor: ctr run of the unpacked image");
        drop_caches();
        registry.clear_requests();
        let started = Instant::now();
        let (first_line, output) =
            run_container(&node.containerd, "overlayfs", &reference, "floor", started)?;
        starts.push(Start {
            name: "5. local floor (unpacked, run only)",
            first_line,
            output,
            bytes_before: 0,
            gets_before: 0,
            prefetch: None,
            bytes_during: registry.blob_bytes(),
            gets_during: registry.blob_requests(),
            agent_counters: None,
        });
    }

    // The trace of start 2, through the agent API, merged into a plan.
    let trace = rt.block_on(collect_trace(
        &lazy_node.agent()?.api_socket(),
        &normal.index_digest,
    ))?;
    drop(lazy_node);
    let plan = Plan::merge(std::slice::from_ref(&trace), None)?;
    let index = rt.block_on(load_index(&store, &normal.index_digest))?;
    let (read_bytes, read_compressed_bytes) = trace_bytes(&trace, &index)?;
    eprintln!(
        "headline: the workload read {} chunks, {} ({} stored)",
        plan.chunks.len(),
        mb(read_bytes),
        mb(read_compressed_bytes)
    );

    // 3. A new node, warmed from the plan.
    eprintln!("headline: (3) stoker, plan prefetched");
    let node = Node::stoker(&agent_binary, &work.path().join("warm"), &registry, &[])?;
    let warmed = node.prefetch(rt, &registry, &reference, &normal.index_digest, &plan)?;
    starts.push(node.pull_and_run(
        rt,
        &registry,
        "3. Stoker, plan prefetched",
        "warm",
        &reference,
        Some(warmed),
    )?);
    node.expect_mounted(rt, &normal.index_digest)?;
    drop(node);

    // 4. Converted again with the plan; a new node warmed from the re-bound plan.
    eprintln!("headline: stoker convert --plan (trace-ordered layout)");
    let started = Instant::now();
    let laid_out = convert(
        rt,
        &store,
        &selector,
        &ConvertOptions {
            layout_plan: Some(plan.clone()),
            ..options.clone()
        },
    )?;
    let layout_convert_secs = started.elapsed().as_secs_f64();
    let rebound = laid_out
        .layout_plan
        .clone()
        .context("no re-bound plan in the report")?;
    let hot_blob_bytes = laid_out.hot_blob.as_ref().map(|b| b.size).unwrap_or(0);
    eprintln!("headline: (4) stoker, trace-ordered layout, plan prefetched");
    let node = Node::stoker(&agent_binary, &work.path().join("layout"), &registry, &[])?;
    let warmed = node.prefetch(rt, &registry, &reference, &laid_out.index_digest, &rebound)?;
    starts.push(node.pull_and_run(
        rt,
        &registry,
        "4. Stoker, trace-ordered layout",
        "layout",
        &reference,
        Some(warmed),
    )?);
    node.expect_mounted(rt, &laid_out.index_digest)?;
    drop(node);

    for start in &starts {
        if !start.output.starts_with(image::READY_PREFIX) {
            bail!(
                "{} printed {:?}, not {:?}…",
                start.name,
                start.output,
                image::READY_PREFIX
            );
        }
    }
    starts.sort_by_key(|s| s.name);
    Ok(Headline {
        image,
        qdisc,
        convert_secs,
        layout_convert_secs,
        starts,
        plan_chunks: plan.chunks.len(),
        read_bytes,
        read_compressed_bytes,
        hot_blob_bytes,
    })
}

fn convert(
    rt: &tokio::runtime::Handle,
    store: &ImageStore,
    selector: &str,
    options: &ConvertOptions,
) -> anyhow::Result<ConvertReport> {
    rt.block_on(stoker_convert::convert(store, selector, options))
        .context("stoker convert")?
        .into_iter()
        .next()
        .context("stoker convert converted nothing")
}

async fn load_index(store: &ImageStore, digest: &str) -> anyhow::Result<Index> {
    let digest = Digest::parse(digest)?;
    Ok(Index::decode_verified(
        &store.blob(&digest).await?,
        &digest,
    )?)
}

/// Uncompressed and stored bytes of the distinct chunks in `trace`.
fn trace_bytes(trace: &Trace, index: &Index) -> anyhow::Result<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let (mut raw, mut stored) = (0u64, 0u64);
    for entry in &trace.entries {
        if seen.insert(entry.chunk) {
            let chunk = index
                .chunk(entry.chunk)
                .context("trace chunk outside the index")?;
            raw += u64::from(chunk.uncompressed_len);
            stored += u64::from(chunk.compressed_len);
        }
    }
    Ok((raw, stored))
}

/// Ends the container's startup window early; the trace is complete either way once
/// the window closes.
async fn container_ready(api_socket: &Path, container_id: &str) {
    let closed = async {
        let mut agent = AgentClient::new(unix_channel(api_socket).await?);
        anyhow::Ok(
            agent
                .container_ready(ContainerReadyRequest {
                    container_id: container_id.to_string(),
                })
                .await?
                .into_inner()
                .trace_closed,
        )
    }
    .await;
    if !matches!(closed, Ok(true)) {
        eprintln!(
            "headline: ContainerReady({container_id}) did not close the startup window ({closed:?}); \
             waiting for it to end ({LEARN_WINDOW_SECS} s)"
        );
    }
}

/// A fresh node: its own containerd and, for Stoker, its own agent and chunk cache.
struct Node {
    // containerd goes first (its containers and rootfs mounts), then the agent.
    containerd: TestContainerd,
    agent: Option<AgentProcess>,
    /// The agent's Prometheus endpoint.
    metrics_addr: Option<String>,
}

impl Node {
    fn overlayfs(dir: &Path) -> anyhow::Result<Node> {
        std::fs::create_dir_all(dir)?;
        Ok(Node {
            containerd: TestContainerd::start(&dir.join("no-snapshotter.sock"))?,
            agent: None,
            metrics_addr: None,
        })
    }

    fn stoker(
        binary: &Path,
        state: &Path,
        registry: &NetnsRegistry,
        env: &[(&str, String)],
    ) -> anyhow::Result<Node> {
        let mut env = env.to_vec();
        env.push(("STOKER_INSECURE_REGISTRIES", registry.host()));
        // The production log level: testkit's default (debug) logs every HTTP
        // request of the fetch path, which costs the measured starts CPU.
        env.push(("STOKER_LOG", "info".to_string()));
        let metrics_addr = format!("127.0.0.1:{}", stoker_testkit::free_port()?);
        env.push(("STOKER_METRICS_LISTEN", metrics_addr.clone()));
        let agent = AgentProcess::start(binary, state, &env).context("starting stoker-agent")?;
        let containerd = TestContainerd::start(&agent.snapshotter_socket())?;
        containerd.allow_plain_http(&registry.host())?;
        Ok(Node {
            containerd,
            agent: Some(agent),
            metrics_addr: Some(metrics_addr),
        })
    }

    fn agent(&self) -> anyhow::Result<&AgentProcess> {
        self.agent
            .as_ref()
            .context("an overlayfs node has no agent")
    }

    /// Pushes `plan` through the agent API, waits until it is done; returns what the
    /// registry served for it and how long it took.
    fn prefetch(
        &self,
        rt: &tokio::runtime::Handle,
        registry: &NetnsRegistry,
        reference: &str,
        index_digest: &str,
        plan: &Plan,
    ) -> anyhow::Result<(u64, usize, Duration)> {
        registry.clear_requests();
        let started = Instant::now();
        rt.block_on(push_plan(
            &self.agent()?.api_socket(),
            reference,
            index_digest,
            plan,
        ))
        .with_context(|| format!("prefetch; agent log:\n{}", self.agent_log()))?;
        let took = started.elapsed();
        Ok((registry.blob_bytes(), registry.blob_requests(), took))
    }

    /// CRI pull through the Stoker snapshotter and `ctr run`, measured.
    fn pull_and_run(
        &self,
        rt: &tokio::runtime::Handle,
        registry: &NetnsRegistry,
        name: &'static str,
        id: &str,
        reference: &str,
        warmed: Option<(u64, usize, Duration)>,
    ) -> anyhow::Result<Start> {
        drop_caches();
        registry.clear_requests();
        let started = Instant::now();
        rt.block_on(self.containerd.cri_pull_image(reference))
            .with_context(|| format!("CRI pull; agent log:\n{}", self.agent_log()))?;
        let (first_line, output) =
            run_container(&self.containerd, "stoker", reference, id, started)
                .with_context(|| format!("agent log:\n{}", self.agent_log()))?;
        let (bytes_before, gets_before, prefetch) = match warmed {
            Some((bytes, gets, took)) => (bytes, gets, Some(took)),
            None => (0, 0, None),
        };
        Ok(Start {
            name,
            first_line,
            output,
            bytes_before,
            gets_before,
            prefetch,
            bytes_during: registry.blob_bytes(),
            gets_during: registry.blob_requests(),
            agent_counters: self.metrics_addr.as_deref().and_then(agent_counters),
        })
    }

    /// Fails unless the agent served the image lazily from the index `index_digest`
    /// (not by a fallback pull, not from another conversion).
    fn expect_mounted(
        &self,
        rt: &tokio::runtime::Handle,
        index_digest: &str,
    ) -> anyhow::Result<()> {
        let status = rt.block_on(async {
            let mut agent = AgentClient::new(unix_channel(&self.agent()?.api_socket()).await?);
            anyhow::Ok(agent.status(StatusRequest::default()).await?.into_inner())
        })?;
        if !status.images.iter().any(|i| i.index_digest == index_digest) {
            bail!(
                "the agent did not mount index {index_digest} (mounted: {:?})",
                status.images
            );
        }
        Ok(())
    }

    fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_tail(4000))
            .unwrap_or_default()
    }
}
