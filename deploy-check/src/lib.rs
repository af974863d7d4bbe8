//! stoker-deploy-check: checks of the Kubernetes install, run by `make test` on a
//! machine with no cluster.
//!
//! Stoker's data path (registry → fetch → verify → cache → filesystem →
//! snapshotter → container) runs on nodes that `manifests/` sets up: the agent
//! DaemonSet that serves the snapshotter, the controller that warms nodes, and the
//! RBAC, admission policy and certificates between them. This crate is not on the
//! data path; it makes sure that what `kubectl apply -k manifests/` would create
//! is what the code expects:
//!
//! - [`kustomize`] renders a kustomization with the subset of kustomize the
//!   manifests use (tests compare it with `kubectl kustomize` where kubectl exists);
//! - [`schema`] parses every object into its typed Kubernetes struct and reports
//!   fields the type does not know (a typo is an error, not a silently dropped field);
//! - [`rbac`] checks that the rules bound to each ServiceAccount cover every API
//!   call in [`api_calls`], and grant nothing more.

pub mod api_calls;
pub mod kustomize;
pub mod rbac;
pub mod schema;

use std::path::PathBuf;

/// What can go wrong while rendering or checking the manifests.
#[derive(Debug, thiserror::Error)]
pub enum DeployCheckError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {message}")]
    Kustomization { path: PathBuf, message: String },
    #[error("{object}: {message}")]
    Patch { object: String, message: String },
    #[error("{object}: {message}")]
    Schema { object: String, message: String },
}

/// The workspace root (where manifests/, images/ and docs/ are).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// `kind/namespace/name` of an object, for messages.
pub fn object_id(object: &serde_json::Value) -> String {
    let field = |path: &[&str]| -> String {
        let mut value = object;
        for key in path {
            match value.get(key) {
                Some(next) => value = next,
                None => return String::new(),
            }
        }
        value.as_str().unwrap_or_default().to_string()
    };
    let namespace = field(&["metadata", "namespace"]);
    let name = field(&["metadata", "name"]);
    if namespace.is_empty() {
        format!("{}/{}", field(&["kind"]), name)
    } else {
        format!("{}/{}/{}", field(&["kind"]), namespace, name)
    }
}
