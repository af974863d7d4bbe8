//! `make demo`: the main job on one machine, through containerd, no cluster.
//!
//! It starts its own docker-registry and containerd 1.6 instances (stoker-testkit),
//! builds a generated ML-like image with a shell and a start script, converts it
//! (`stoker convert`), and starts it three ways, each on a fresh "node" (its own
//! containerd, and for Stoker its own `stoker-agent` process and empty chunk cache):
//!
//! 1. **full pull**: `ctr images pull` into containerd's overlayfs snapshotter (every
//!    layer downloaded and unpacked), then `ctr run`; and then, as the reference for
//!    a warm start, **local**: the same image started again on that node, already
//!    unpacked, page cache dropped;
//! 2. **Stoker lazy, cold**: a CRI `PullImage` through the Stoker proxy snapshotter
//!    (which mounts the image's lazy filesystem), then `ctr run`: chunks are fetched
//!    as the start script reads them, and the agent records the startup trace;
//! 3. **Stoker warmed from a plan**: the trace of run 2, collected through node 2's
//!    agent API and merged into a plan (`Plan::merge`), is pushed to node 3's agent
//!    API (`Prefetch`); once it is done (and the page cache dropped), the same pull
//!    and run.
//!
//! For each it measures the time from the pull to the container's first output line
//! and the bytes the registry served, and prints a table. Everything it starts
//! (registry, containerd, agents, containers, mounts, temporary directories) is
//! stopped and removed when it returns.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{GetTraceRequest, ListTracesRequest, PrefetchRequest, PrefetchState};
use stoker_format::{Plan, Trace, TraceEntry};
use stoker_testkit::containerd::{
    AgentProcess, CRI_NAMESPACE, TestContainerd, host_binary_entries, unix_channel,
    workspace_binary,
};
use stoker_testkit::image::{Entry, push_layout};
use stoker_testkit::registry::TestRegistry;

use crate::images::{MlImageSize, ml_image};
use crate::report::{Section, mb};

/// What the start script prints once its startup reads are done.
pub const READY_LINE: &str = "stoker demo: model loaded";
/// The learning node's startup window: it opens when the image is mounted (at the
/// pull) and must cover the container's start; the trace is collected after it.
const LEARN_WINDOW_SECS: u64 = 20;
const DEADLINE: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);

/// One way of starting the container, measured.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub name: &'static str,
    /// From the start of the pull to the container's first output line.
    pub first_line: Duration,
    /// Of which the pull (zero for a start without one).
    pub pull: Duration,
    /// Everything the container printed.
    pub output: String,
    /// Bytes the registry served to warm the node before the pull (plans).
    pub bytes_before: u64,
    /// Bytes the registry served from the pull to the container's exit.
    pub bytes_during: u64,
    /// Blob GETs the registry served from the pull to the container's exit.
    pub gets_during: usize,
    /// For a Stoker start, the agent's counters after it.
    pub agent_counters: Option<AgentCounters>,
}

/// What a Stoker node's agent counted (its Prometheus `/metrics`) by the end of a start.
#[derive(Debug, Clone, Default)]
pub struct AgentCounters {
    /// Files opened with FUSE passthrough: read by the kernel, not the agent.
    pub passthrough_opens: u64,
    /// FUSE read requests the agent answered.
    pub fuse_reads: u64,
    /// FUSE operations the agent answered, by operation: how many, and the
    /// seconds spent answering them (summed over the agent's threads), most
    /// time first.
    pub fuse_ops: Vec<(String, u64, f64)>,
}

/// The three starts of one image.
#[derive(Debug, Clone)]
pub struct DemoResult {
    /// Uncompressed size of the image's files, and of its compressed layers.
    pub image_bytes: u64,
    pub compressed_bytes: u64,
    pub full: StartRun,
    /// The image started again where the full pull unpacked it: the floor.
    pub local: StartRun,
    pub lazy: StartRun,
    pub warm: StartRun,
    /// Chunks and uncompressed bytes of the plan learned from the lazy start.
    pub plan_chunks: usize,
    pub plan_bytes: u64,
}

impl DemoResult {
    pub fn runs(&self) -> [&StartRun; 4] {
        [&self.full, &self.local, &self.lazy, &self.warm]
    }
}

/// `stoker-bench --sections demo`: the demo as a report section.
pub async fn run(size: MlImageSize) -> anyhow::Result<Section> {
    Ok(table(&measure(size).await?))
}

/// The demo's table: one row per start.
pub fn table(result: &DemoResult) -> Section {
    let mut section = Section::new(
        "Demo: three ways to start a container through containerd",
        &format!(
            "A generated ML-like image of {} ({} compressed), run with `ctr run` on a fresh containerd \
             each time. Its start script reads a tenth of the Python modules, an eighth of the \
             libraries and the head of a weight file, then prints one line. `full pull`: `ctr images pull` \
             into containerd's overlayfs snapshotter. `local`: the same node starts the image again, \
             already unpacked (page cache dropped): the floor for a warm start. `stoker lazy`: CRI \
             PullImage through the Stoker snapshotter, empty chunk cache. `stoker warmed`: another \
             node, its agent first warmed through the agent API with the plan learned from the lazy \
             start's trace ({} chunks, {}), page cache dropped. Time is from the pull (for `local`, \
             from `ctr run`) to the first output line; bytes are what the registry served.",
            mb(result.image_bytes),
            mb(result.compressed_bytes),
            result.plan_chunks,
            mb(result.plan_bytes),
        ),
        &[
            "start",
            "pull → first line",
            "of which pull",
            "fetched before the pull",
            "fetched pull → exit",
            "time vs full pull",
            "time vs local",
            "bytes vs full pull",
        ],
    );
    let (full, local) = (&result.full, &result.local);
    for run in result.runs() {
        section.row(vec![
            run.name.into(),
            format!("{:.2} s", run.first_line.as_secs_f64()),
            format!("{:.2} s", run.pull.as_secs_f64()),
            mb(run.bytes_before),
            format!("{} ({} GETs)", mb(run.bytes_during), run.gets_during),
            format!(
                "{:.2}",
                run.first_line.as_secs_f64() / full.first_line.as_secs_f64()
            ),
            format!(
                "{:.2}",
                run.first_line.as_secs_f64() / local.first_line.as_secs_f64()
            ),
            format!(
                "{:.3}",
                run.bytes_during as f64 / full.bytes_during.max(1) as f64
            ),
        ]);
    }
    section.note(
        "Registry on loopback: on a real network the full pull pays for every byte, so the gap grows.",
    );
    for run in result.runs() {
        if let Some(c) = &run.agent_counters {
            section.note(describe_agent_counters(run.name, c));
        }
    }
    section.note(
        "What the warmed start still fetches: the image config, the Stoker index, and the lazy \
         filesystem's read-ahead (4 MiB past a file's last read, and on a miss up to 512 KiB of \
         the chunks that follow in the blob), which a startup trace does not record since the \
         container never reads it.",
    );
    section
}

/// Runs the three starts of an image of `size` and returns what was measured. Fails
/// (instead of skipping) when something it needs is missing, naming it.
pub async fn measure(size: MlImageSize) -> anyhow::Result<DemoResult> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || measure_blocking(size, &handle))
        .await
        .context("the demo's thread")?
}

fn measure_blocking(size: MlImageSize, rt: &tokio::runtime::Handle) -> anyhow::Result<DemoResult> {
    check_machine()?;
    let agent_binary = workspace_binary("stoker-agent", "stoker-agent")?;
    let work = tempfile::Builder::new().prefix("stoker-demo-").tempdir()?;
    let registry = TestRegistry::start().context("starting docker-registry")?;

    // The image: the ML-like layers, then a shell and the start script.
    let (image, image_bytes) = ml_image(size);
    let script = start_script(size);
    let mut app = host_binary_entries(&["/bin/sh", "/bin/cat", "/usr/bin/head"])?;
    app.push(Entry::dir("app"));
    app.push(Entry::file("app/start.sh", script).mode(0o755));
    let image = image.layer(app);
    eprintln!(
        "demo: building a {} image and pushing it to {}",
        mb(image_bytes),
        registry.host()
    );
    let layout = work.path().join("layout");
    let written = image.write_layout(&layout, "v1")?;
    let compressed_bytes: u64 = written.layers.iter().map(|l| l.blob.size).sum();
    push_layout(&layout, "v1", &registry.host(), "demo/ml:v1")?;
    let reference = format!("{}/demo/ml:v1", registry.host());

    eprintln!("demo: stoker convert {reference}");
    let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..Default::default()
    })?;
    let report = rt
        .block_on(async {
            let (store, selector) = stoker_convert::ImageStore::registry(client, &reference)?;
            stoker_convert::convert(
                &store,
                &selector,
                &stoker_convert::ConvertOptions::default(),
            )
            .await
        })
        .context("stoker convert")?
        .into_iter()
        .next()
        .context("stoker convert converted nothing")?;

    // 2. Stoker lazy, cold; its startup window closes while the full pull runs.
    let learn_env = [("STOKER_TRACE_WINDOW_SECS", LEARN_WINDOW_SECS.to_string())];
    let lazy_node = StokerNode::start(
        &agent_binary,
        &work.path().join("lazy"),
        &registry,
        &learn_env,
    )?;
    eprintln!("demo: stoker lazy (cold cache)");
    registry.clear_requests();
    let lazy = lazy_node.pull_and_run(
        rt,
        &registry,
        "stoker lazy (cold cache)",
        "lazy",
        &reference,
        0,
    )?;

    // 1. Full pull into overlayfs, on a containerd of its own.
    eprintln!("demo: full pull (overlayfs)");
    let (full, local) = {
        let containerd = TestContainerd::start(&work.path().join("no-snapshotter.sock"))?;
        registry.clear_requests();
        let started = Instant::now();
        pull_into_overlayfs(&containerd, &reference)?;
        let pull = started.elapsed();
        let (first_line, output) =
            run_container(&containerd, "overlayfs", &reference, "full", started)?;
        let full = StartRun {
            name: "full pull (overlayfs)",
            first_line,
            pull,
            output,
            bytes_before: 0,
            bytes_during: blob_bytes(&registry),
            gets_during: blob_gets(&registry),
            agent_counters: None,
        };
        eprintln!("demo: local start (already unpacked)");
        drop_caches();
        registry.clear_requests();
        let (first_line, output) = run_container(
            &containerd,
            "overlayfs",
            &reference,
            "local",
            Instant::now(),
        )?;
        let local = StartRun {
            name: "local (already unpacked)",
            first_line,
            pull: Duration::ZERO,
            output,
            bytes_before: 0,
            bytes_during: blob_bytes(&registry),
            gets_during: blob_gets(&registry),
            agent_counters: None,
        };
        (full, local)
    };

    // The lazy start's trace, through the agent API, merged into a plan.
    let trace = rt.block_on(collect_trace(
        &lazy_node.agent.api_socket(),
        &report.index_digest,
    ))?;
    if let (Some(first), Some(last)) = (trace.entries.first(), trace.entries.last()) {
        eprintln!(
            "demo: the lazy start's trace: {} chunks, first read {:.2} s and last {:.2} s after its window opened",
            trace.entries.len(),
            first.micros as f64 / 1e6,
            last.micros as f64 / 1e6
        );
    }
    let plan = Plan::merge(std::slice::from_ref(&trace), None)?;
    let plan_bytes: u64 = trace.entries.iter().map(|e| u64::from(e.len)).sum();
    drop(lazy_node);

    // 3. Another node, warmed from the plan through its agent API, then the same start.
    eprintln!(
        "demo: stoker warmed from a plan ({} chunks, {})",
        plan.chunks.len(),
        mb(plan_bytes)
    );
    let warm_node = StokerNode::start(&agent_binary, &work.path().join("warm"), &registry, &[])?;
    registry.clear_requests();
    rt.block_on(push_plan(
        &warm_node.agent.api_socket(),
        &reference,
        &report.index_digest,
        &plan,
    ))?;
    let bytes_before = blob_bytes(&registry);
    drop_caches();
    registry.clear_requests();
    let warm = warm_node.pull_and_run(
        rt,
        &registry,
        "stoker warmed from a plan",
        "warm",
        &reference,
        bytes_before,
    )?;
    drop(warm_node);

    for run in [&full, &local, &lazy, &warm] {
        if run.output.trim_end() != READY_LINE {
            bail!("{} printed {:?}, not {READY_LINE:?}", run.name, run.output);
        }
    }
    Ok(DemoResult {
        image_bytes,
        compressed_bytes,
        full,
        local,
        lazy,
        warm,
        plan_chunks: plan.chunks.len(),
        plan_bytes,
    })
}

/// Writes dirty pages and drops the page cache, so that a start finds neither the
/// image's files nor cached chunks in memory.
pub(crate) fn drop_caches() {
    // Failing only makes the starts warmer than they should be: warn, go on.
    if let Err(e) = drop_page_cache() {
        eprintln!("stoker-bench: WARNING: could not drop the page cache: {e}");
    }
}

/// `sync`, then drops the page cache, dentries and inodes; fails if either fails.
pub(crate) fn drop_page_cache() -> anyhow::Result<()> {
    let synced = std::process::Command::new("sync").status()?;
    if !synced.success() {
        bail!("sync failed: {synced}");
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// Root, /dev/fuse and the Debian packages the demo runs (`make deps` installs them).
pub(crate) fn check_machine() -> anyhow::Result<()> {
    if !stoker_testkit::require_root("demo") {
        bail!("the demo mounts filesystems and runs containerd: run it as root");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is absent: the demo needs FUSE (package fuse3, and a kernel with FUSE)");
    }
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "skopeo",
        "ldd",
    ] {
        if stoker_testkit::find_tool(tool).is_none() {
            bail!(
                "{tool} not found: run `make deps` (Debian packages containerd, runc, docker-registry, skopeo)"
            );
        }
    }
    Ok(())
}

/// The start script: reads what an ML service reads at startup, then prints one line.
/// The file names follow `images::ml_image`.
fn start_script(size: MlImageSize) -> String {
    let mut files = Vec::new();
    for i in (0..size.small_files).filter(|i| i % 3 != 0 && i % 10 == 1) {
        files.push(format!("/opt/venv/pkg{}/module{i}.py", i % 100));
    }
    for i in (0..size.libraries).step_by(8) {
        files.push(format!("/usr/lib/lib{i}.so"));
    }
    let weight_head = (4u64 << 20).min(size.weight_file_bytes / 4);
    let mut script = String::from("#!/bin/sh\nset -e\n");
    for group in files.chunks(50) {
        script.push_str(&format!("cat {} > /dev/null\n", group.join(" ")));
    }
    if size.weight_files > 0 {
        script.push_str(&format!(
            "head -c {weight_head} /models/weights0.bin > /dev/null\n"
        ));
    }
    script.push_str(&format!("echo '{READY_LINE}'\n"));
    script
}

/// A node for Stoker: its own agent (state, cache, sockets) and containerd.
struct StokerNode {
    // containerd goes first (its containers and rootfs mounts), then the agent.
    containerd: TestContainerd,
    agent: AgentProcess,
    /// The agent's Prometheus endpoint.
    metrics_addr: String,
}

impl StokerNode {
    fn start(
        binary: &Path,
        state: &Path,
        registry: &TestRegistry,
        env: &[(&str, String)],
    ) -> anyhow::Result<StokerNode> {
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
        Ok(StokerNode {
            containerd,
            agent,
            metrics_addr,
        })
    }

    /// The agent's FUSE counters (see [`agent_counters`]).
    fn agent_counters(&self) -> Option<AgentCounters> {
        agent_counters(&self.metrics_addr)
    }

    /// CRI pull (through the Stoker snapshotter) and `ctr run`, measured.
    fn pull_and_run(
        &self,
        rt: &tokio::runtime::Handle,
        registry: &TestRegistry,
        name: &'static str,
        id: &str,
        reference: &str,
        bytes_before: u64,
    ) -> anyhow::Result<StartRun> {
        let started = Instant::now();
        rt.block_on(self.containerd.cri_pull_image(reference))
            .with_context(|| format!("CRI pull; agent log:\n{}", self.agent.log_tail(4000)))?;
        let pull = started.elapsed();
        let (first_line, output) =
            run_container(&self.containerd, "stoker", reference, id, started)
                .with_context(|| format!("agent log:\n{}", self.agent.log_tail(4000)))?;
        Ok(StartRun {
            name,
            first_line,
            pull,
            output,
            bytes_before,
            bytes_during: blob_bytes(registry),
            gets_during: blob_gets(registry),
            agent_counters: self.agent_counters(),
        })
    }
}

/// The FUSE counters of the agent whose Prometheus endpoint is `metrics_addr`;
/// `None` if they cannot be read (a report then leaves them out).
pub(crate) fn agent_counters(metrics_addr: &str) -> Option<AgentCounters> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(metrics_addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {metrics_addr}\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let sum = |name: &str, label: Option<&str>| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(name))
            .filter(|line| label.is_none_or(|l| line.contains(l)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    Some(AgentCounters {
        passthrough_opens: sum("stoker_fuse_passthrough_opens_total", None) as u64,
        fuse_reads: sum("stoker_fuse_operations_total", Some("op=\"read\"")) as u64,
        fuse_ops: fuse_op_times(&text),
    })
}

/// One line for a report: what the agent answered during a start.
pub(crate) fn describe_agent_counters(name: &str, c: &AgentCounters) -> String {
    let ops: Vec<String> = c
        .fuse_ops
        .iter()
        .map(|(op, count, seconds)| format!("{op} {count} in {:.0} ms", seconds * 1e3))
        .collect();
    format!(
        "{name}: the agent answered {} FUSE reads; {} files were opened with FUSE passthrough \
         (read by the kernel from the chunk cache, not through the agent). Time the agent \
         spent answering FUSE operations: {}.",
        c.fuse_reads,
        c.passthrough_opens,
        ops.join(", ")
    )
}

/// Per FUSE operation, from Prometheus text: how many the agent answered and the
/// seconds it spent on them (`stoker_fuse_operation_duration_seconds` count and
/// sum), most time first.
fn fuse_op_times(metrics: &str) -> Vec<(String, u64, f64)> {
    let mut ops: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for line in metrics.lines() {
        let (series, is_count) = if let Some(rest) =
            line.strip_prefix("stoker_fuse_operation_duration_seconds_sum")
        {
            (rest, false)
        } else if let Some(rest) = line.strip_prefix("stoker_fuse_operation_duration_seconds_count")
        {
            (rest, true)
        } else {
            continue;
        };
        let Some(op) = series
            .split("op=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let Some(value) = series
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let entry = ops.entry(op.to_string()).or_default();
        if is_count {
            entry.0 += value as u64;
        } else {
            entry.1 += value;
        }
    }
    let mut ops: Vec<(String, u64, f64)> = ops
        .into_iter()
        .map(|(op, (count, seconds))| (op, count, seconds))
        .collect();
    ops.sort_by(|a, b| b.2.total_cmp(&a.2));
    ops
}

/// `ctr images pull` of `reference` (plain HTTP) into containerd's overlayfs
/// snapshotter: every layer downloaded and unpacked, as a node does today.
pub(crate) fn pull_into_overlayfs(
    containerd: &TestContainerd,
    reference: &str,
) -> anyhow::Result<()> {
    containerd
        .ctr(
            CRI_NAMESPACE,
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                reference,
            ],
        )
        .context("ctr images pull")?;
    Ok(())
}

/// `ctr run --rm` of the start script; returns the time from `started` to the first
/// output line, and the whole output.
pub(crate) fn run_container(
    containerd: &TestContainerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
    started: Instant,
) -> anyhow::Result<(Duration, String)> {
    let mut child = containerd
        .ctr_command(
            CRI_NAMESPACE,
            &[
                "run",
                "--rm",
                "--snapshotter",
                snapshotter,
                "--net-host",
                reference,
                id,
                "/app/start.sh",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr run")?;
    let stdout = child.stdout.take().context("ctr's stdout")?;
    let mut lines = BufReader::new(stdout);
    let mut output = String::new();
    lines.read_line(&mut output)?;
    let first_line = started.elapsed();
    lines.read_to_string(&mut output)?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("ctr run {id} ({snapshotter}) failed with {status}: {stderr}");
    }
    Ok((first_line, output))
}

/// Blob GETs the registry served since its requests were last cleared.
pub(crate) fn blob_gets(registry: &TestRegistry) -> usize {
    registry
        .requests()
        .iter()
        .filter(|r| r.is_blob_get())
        .count()
}

/// Bytes of blobs the registry served since its requests were last cleared.
fn blob_bytes(registry: &TestRegistry) -> u64 {
    registry
        .requests()
        .iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.response_bytes)
        .sum()
}

/// Waits until the agent's trace of `index_digest` is complete (its startup window
/// closed) and returns it, from the agent API.
pub(crate) async fn collect_trace(api_socket: &Path, index_digest: &str) -> anyhow::Result<Trace> {
    let mut agent = AgentClient::new(unix_channel(api_socket).await?);
    let deadline = Instant::now() + DEADLINE;
    let trace_id = loop {
        let traces = agent
            .list_traces(ListTracesRequest::default())
            .await?
            .into_inner()
            .traces;
        if let Some(trace) = traces
            .iter()
            .find(|t| t.index_digest == index_digest && t.complete)
        {
            break trace.trace_id.clone();
        }
        if Instant::now() > deadline {
            bail!("no complete startup trace of {index_digest}: {traces:?}");
        }
        tokio::time::sleep(POLL).await;
    };
    let response = agent
        .get_trace(GetTraceRequest { trace_id })
        .await?
        .into_inner();
    let mut files: Vec<String> = Vec::new();
    let entries = response
        .entries
        .iter()
        .map(|e| {
            let file = match files.iter().position(|f| *f == e.path) {
                Some(file) => file,
                None => {
                    files.push(e.path.clone());
                    files.len() - 1
                }
            };
            TraceEntry {
                chunk: e.chunk_index,
                len: e.chunk_length,
                file: file as u32,
                file_offset: e.file_offset,
                micros: e.micros_since_start,
            }
        })
        .collect();
    Ok(Trace {
        index_digest: index_digest.to_string(),
        files,
        entries,
        ..Trace::default()
    })
}

/// Pushes `plan` to the agent API and waits until it is done.
pub(crate) async fn push_plan(
    api_socket: &Path,
    reference: &str,
    index_digest: &str,
    plan: &Plan,
) -> anyhow::Result<()> {
    let mut agent = AgentClient::new(unix_channel(api_socket).await?);
    let mut progress = agent
        .prefetch(PrefetchRequest {
            image_ref: reference.to_string(),
            index_digest: index_digest.to_string(),
            plan: plan.encode()?,
            background_rest: false,
            learning_complete: true,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(message) = tokio::time::timeout(DEADLINE, progress.message())
        .await
        .context("no prefetch progress")??
    {
        last = Some(message);
    }
    match last {
        Some(p) if p.state == PrefetchState::Done as i32 => Ok(()),
        other => bail!("the prefetch did not finish: {other:?}"),
    }
}
