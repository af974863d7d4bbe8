//! The controller at cluster scale: runs `controller-sim --json` (the real
//! reconciler, warmer and gate writer fed 5,000 nodes and 500 ImagePrefetch
//! objects, with an in-process API server and agents; see
//! controller/src/bin/controller_sim.rs) and checks its numbers against the
//! goals: a scale-up reaches every candidate agent within 1 s, memory under
//! 256 MB.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::report::Section;

/// Goal: a scale-up event reaches all candidate agents within this time.
const SCALE_UP_GOAL_MS: f64 = 1000.0;
/// Goal: the controller's resident memory stays under this.
const MEMORY_GOAL_MIB: f64 = 256.0;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let sim = build_sim()?;
    let (nodes, prefetches) = if quick { (1000, 100) } else { (5000, 500) };
    eprintln!("bench controller: {nodes} nodes, {prefetches} ImagePrefetch objects");
    let output = Command::new(&sim)
        .args([
            "--json",
            "--nodes",
            &nodes.to_string(),
            "--prefetches",
            &prefetches.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", sim.display()))?;
    if !output.status.success() {
        bail!(
            "controller-sim failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("controller-sim printed no JSON line")?;
    let result: Value = serde_json::from_str(json).context("controller-sim's JSON")?;
    section(&result)
}

/// Builds the release `controller-sim` (cargo does nothing when it is up to
/// date) and returns its path.
fn build_sim() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "stoker-controller",
            "--bin",
            "controller-sim",
        ])
        .status()
        .context("running cargo build for controller-sim")?;
    if !status.success() {
        bail!("cargo build --release -p stoker-controller --bin controller-sim failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let sim = target.join("release/controller-sim");
    if !sim.is_file() {
        bail!("{} is missing after the build", sim.display());
    }
    Ok(sim)
}

fn number(result: &Value, pointer: &str) -> anyhow::Result<f64> {
    result
        .pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("controller-sim's JSON has no number at {pointer}"))
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "**missed**" }.into()
}

/// The report section from controller-sim's JSON.
fn section(result: &Value) -> anyhow::Result<Section> {
    let nodes = number(result, "/nodes")?;
    let prefetches = number(result, "/prefetches")?;
    let mut section = Section::new(
        "Controller at scale (`controller-sim`)",
        &format!(
            "The controller's real reconciler, warmer and gate writer, fed {nodes} nodes in 10 pools and \
             {prefetches} ImagePrefetch objects (each with a learned plan) against an in-process API server \
             and in-process agents that answer at once, so the numbers are the controller's own work. \
             Scale-up: one workload goes from 10 to 60 replicas while 50 new nodes of its pool join with \
             the startup taint; measured until every new node's agent has received all its plans. Memory \
             is the simulation process's resident set (/proc/self/status)."
        ),
        &["measure", "value", "goal", ""],
    );
    let ms = |v: f64| format!("{v:.1} ms");
    let scale_up = number(result, "/scale_up_all_agents_reached_ms")?;
    section.row(vec![
        "scale-up: all candidate agents reached".into(),
        ms(scale_up),
        ms(SCALE_UP_GOAL_MS),
        verdict(scale_up <= SCALE_UP_GOAL_MS),
    ]);
    section.row(vec![
        "scale-up: reconcile".into(),
        ms(number(result, "/scale_up_reconcile_ms")?),
        String::new(),
        String::new(),
    ]);
    section.row(vec![
        "scale-up: warm targets of the 50 gated nodes written".into(),
        ms(number(result, "/scale_up_gates_written_ms")?),
        String::new(),
        String::new(),
    ]);
    section.row(vec![
        "reconcile latency p50 / p99 / max".into(),
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            number(result, "/reconcile_ms/p50")?,
            number(result, "/reconcile_ms/p99")?,
            number(result, "/reconcile_ms/max")?
        ),
        String::new(),
        String::new(),
    ]);
    section.row(vec![
        format!(
            "cold start: {} pushes reached agents",
            number(result, "/pushes")?
        ),
        ms(number(result, "/cold_start_all_agents_reached_ms")?),
        String::new(),
        String::new(),
    ]);
    let peak = number(result, "/rss_mib/peak")?;
    section.row(vec![
        "memory: peak resident set".into(),
        format!("{peak:.0} MiB"),
        format!("{MEMORY_GOAL_MIB:.0} MiB"),
        verdict(peak < MEMORY_GOAL_MIB),
    ]);
    section.row(vec![
        "memory: resident set at the end".into(),
        format!("{:.0} MiB", number(result, "/rss_mib/end")?),
        String::new(),
        String::new(),
    ]);
    section.note(format!(
        "API requests during the run: {} status patches, {} events, {} node patches.",
        number(result, "/api_requests/status_patches")?,
        number(result, "/api_requests/events")?,
        number(result, "/api_requests/node_patches")?
    ));
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_checked_from_the_json() {
        let result = serde_json::json!({
            "nodes": 5000, "prefetches": 500, "pushes": 250000,
            "nodes_load_ms": 10.0,
            "reconcile_ms": {"p50": 0.5, "p99": 2.0, "max": 3.0},
            "cold_start_all_reconciled_ms": 100.0,
            "cold_start_all_agents_reached_ms": 900.0,
            "scale_up_reconcile_ms": 1.0,
            "scale_up_all_agents_reached_ms": 1200.0,
            "scale_up_gates_written_ms": 5.0,
            "rss_mib": {"start": 5, "after_cold_start": 80, "end": 90, "peak": 100},
            "api_requests": {"status_patches": 500, "events": 10, "node_patches": 50},
        });
        let markdown = section(&result).expect("section").markdown();
        assert!(
            markdown.contains(
                "| scale-up: all candidate agents reached | 1200.0 ms | 1000.0 ms | **missed** |"
            ),
            "{markdown}"
        );
        assert!(
            markdown.contains("| memory: peak resident set | 100 MiB | 256 MiB | met |"),
            "{markdown}"
        );
        let missing = section(&serde_json::json!({"nodes": 1})).expect_err("incomplete");
        assert!(missing.to_string().contains("/prefetches"), "{missing}");
    }
}
