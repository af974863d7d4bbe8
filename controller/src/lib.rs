//! # stoker-controller
//!
//! The Kubernetes side of Stoker. The data path (registry → fetch → verify →
//! cache → filesystem → snapshotter → container) runs on each node; this
//! controller decides, ahead of time, which chunks each node should already
//! hold when a container starts there:
//!
//! 1. **Learning**: when a pod of a workload with an [`ImagePrefetch`] starts,
//!    the controller collects the container's startup trace from the node's
//!    agent ([`agents`]), merges it into the image's plan ([`learning`]) and
//!    records plan and summary in the ImagePrefetch status ([`reconcile`]).
//! 2. **Warming**: when a node that can run the workload appears, or the
//!    workload scales up, the controller pushes the plan to each candidate
//!    node's agent and tracks the progress ([`warmer`], [`candidates`]), after
//!    the registry credentials of the workload's image pull secrets
//!    ([`pull_secrets`]).
//! 3. **Gating**: new nodes registered with the startup taint get a warm
//!    target annotation listing the plans they must hold; the agent lifts the
//!    taint when they are on disk ([`gate`], `stoker_crds::warm_gate`).
//!
//! [`run`] wires it together: reflectors over ImagePrefetch, Deployments,
//! ReplicaSets (metadata only), Pods (metadata only, plus the agent pods) and
//! Nodes (pruned), two kube-runtime controllers, leader election
//! ([`leader`]), and metrics ([`metrics`]). Every API call the controller and
//! the agent make is listed in [`rbac::REQUIRED`].
//!
//! [`ImagePrefetch`]: stoker_crds::ImagePrefetch

pub mod agents;
pub mod candidates;
pub mod default_prefetch;
mod error;
pub mod fake_agents;
pub mod gate;
pub mod leader;
pub mod learning;
pub mod metrics;
pub mod pull_secrets;
pub mod rbac;
pub mod reconcile;
pub mod run;
pub mod status;
pub mod warmer;
pub mod workload;

pub use error::{Error, http_status, is_transient_kube};
