//! manifests/grafana/stoker-dashboard.json queries only metrics the code
//! exports: every `stoker_*` name in a panel's query is the Prometheus name of
//! an OpenTelemetry instrument built somewhere in the workspace (names with
//! `.` become `_`, the unit adds `_bytes` or `_seconds` (always, as
//! opentelemetry-prometheus 0.33 does), counters add `_total`, histograms are
//! queried as `_bucket`, `_sum` or `_count`).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use stoker_deploy_check::workspace_root;

const INSTRUMENTS: &[(&str, Kind)] = &[
    ("u64_counter(", Kind::Counter),
    ("f64_counter(", Kind::Counter),
    ("i64_up_down_counter(", Kind::Gauge),
    ("f64_up_down_counter(", Kind::Gauge),
    ("u64_gauge(", Kind::Gauge),
    ("i64_gauge(", Kind::Gauge),
    ("f64_gauge(", Kind::Gauge),
    ("u64_histogram(", Kind::Histogram),
    ("f64_histogram(", Kind::Histogram),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Prometheus series names of every instrument built in `source`.
fn exported_names(source: &str, names: &mut BTreeSet<String>) {
    for (call, kind) in INSTRUMENTS {
        let mut rest = source;
        while let Some(at) = rest.find(call) {
            rest = &rest[at + call.len()..];
            let Some(literal) = rest.strip_prefix('"') else {
                continue;
            };
            let Some(end) = literal.find('"') else {
                continue;
            };
            let name = &literal[..end];
            if !name.starts_with("stoker") {
                continue;
            }
            let builder = &literal[end..literal.find(".build()").unwrap_or(literal.len())];
            let unit = builder
                .split_once(".with_unit(\"")
                .and_then(|(_, u)| u.split_once('"'))
                .map(|(u, _)| u);
            let mut base = name.replace('.', "_");
            let suffix = match unit {
                Some("By") => Some("_bytes"),
                Some("s") => Some("_seconds"),
                _ => None,
            };
            // opentelemetry-prometheus appends the unit even when the name
            // already ends with it (`stoker.fetch.bytes` → `..._bytes_bytes`).
            if let Some(suffix) = suffix {
                base.push_str(suffix);
            }
            match kind {
                Kind::Counter => {
                    names.insert(format!("{base}_total"));
                }
                Kind::Gauge => {
                    names.insert(base);
                }
                Kind::Histogram => {
                    for series in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{base}{series}"));
                    }
                }
            }
        }
    }
}

fn rust_sources(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" && name != "tests" {
                rust_sources(&path, found);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

fn queried_names(value: &Value, names: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match child.as_str() {
                    Some(expr) if key == "expr" || key == "definition" => {
                        metric_tokens(expr, names)
                    }
                    _ => queried_names(child, names),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queried_names(i, names)),
        Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn metric_tokens(expr: &str, names: &mut BTreeSet<String>) {
    for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if token.starts_with("stoker_") {
            names.insert(token.to_string());
        }
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let path = workspace_root().join("manifests/grafana/stoker-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "stoker");
    let mut queried = BTreeSet::new();
    queried_names(&dashboard, &mut queried);
    assert!(!queried.is_empty(), "the dashboard queries nothing");

    let mut sources = Vec::new();
    rust_sources(&workspace_root(), &mut sources);
    let mut exported = BTreeSet::new();
    for source in &sources {
        if let Ok(text) = std::fs::read_to_string(source) {
            exported_names(&text, &mut exported);
        }
    }

    let mut missing = Vec::new();
    for name in &queried {
        if exported.contains(name) {
            continue;
        }
        // A component that has no metrics yet is reported, not failed.
        let component_prefix = if name.starts_with("stoker_controller_") {
            "stoker_controller_"
        } else {
            "stoker_"
        };
        if !exported.iter().any(|e| e.starts_with(component_prefix)) {
            eprintln!("SKIPPED: {name}: no {component_prefix}* instrument exists in the code yet");
            continue;
        }
        missing.push(name.clone());
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no code exports: {missing:?}\nexported: {exported:#?}"
    );
}

#[test]
fn exported_names_follow_the_prometheus_exporter() {
    let mut names = BTreeSet::new();
    exported_names(
        r#"meter.u64_counter("stoker.fetch.bytes").with_unit("By").build();
           meter.f64_histogram("stoker_controller_reconcile_duration").with_unit("s").build();
           meter.i64_up_down_counter("stoker.fetch.in_flight").build();"#,
        &mut names,
    );
    for expected in [
        "stoker_fetch_bytes_bytes_total",
        "stoker_controller_reconcile_duration_seconds_bucket",
        "stoker_fetch_in_flight",
    ] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }
}
