//! Shared by the deploy-check tests: the variants of manifests/ and how to
//! render them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use stoker_deploy_check::{kustomize, workspace_root};

pub const NAMESPACE: &str = "stoker-system";

/// The kustomizations users apply, relative to manifests/.
pub const VARIANTS: &[&str] = &[
    ".",
    "base",
    "overlays/kind",
    "overlays/cert-manager",
    "extras/servicemonitor",
];

pub fn manifests_dir() -> PathBuf {
    workspace_root().join("manifests")
}

/// The generated CRD; `None` (with a loud message) until crdgen has written it.
pub fn crd_path() -> Option<PathBuf> {
    let path = manifests_dir().join("crds/imageprefetch.yaml");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is not generated yet (cargo run -p stoker-crds --bin crdgen); \
             the root kustomization is not rendered",
            path.display()
        );
        None
    }
}

/// The variants that can be rendered now.
pub fn renderable_variants() -> Vec<&'static str> {
    let crd = crd_path().is_some();
    VARIANTS
        .iter()
        .copied()
        .filter(|variant| crd || *variant != ".")
        .collect()
}

pub fn render(variant: &str) -> Vec<Value> {
    let dir = manifests_dir().join(variant);
    kustomize::render(&dir).unwrap_or_else(|e| panic!("rendering manifests/{variant}: {e}"))
}

/// `kubectl kustomize DIR` when a kubectl with kustomize v4+ is installed.
pub fn kubectl_kustomize(dir: &Path) -> Option<Result<Vec<Value>, String>> {
    let version = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let kustomize_major = version
        .lines()
        .find_map(|line| line.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    if kustomize_major.is_none_or(|major| major < 4) {
        return None;
    }
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return Some(Err(String::from_utf8_lossy(&output.stderr).to_string()));
    }
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    Some(kustomize::parse_documents(&text).map_err(|e| e.to_string()))
}

pub fn kind(object: &Value) -> &str {
    object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn name(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn find<'a>(objects: &'a [Value], kind_name: &str, object_name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == kind_name && name(o) == object_name)
        .unwrap_or_else(|| panic!("no {kind_name} {object_name} in the manifests"))
}

/// The pod template of a workload (Deployment, DaemonSet, Job, CronJob).
pub fn pod_template(object: &Value) -> Option<&Value> {
    match kind(object) {
        "Deployment" | "DaemonSet" | "Job" => object.pointer("/spec/template"),
        "CronJob" => object.pointer("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

pub fn array<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

pub fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}
