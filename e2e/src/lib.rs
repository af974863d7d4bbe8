//! stoker-e2e: Stoker end to end on one machine, without Kubernetes.
//!
//! The crate holds tests only. `tests/local.rs` (`make e2e-local`, and part of
//! `make test`) runs the whole data path — registry → fetch → verify → cache →
//! filesystem → snapshotter → container — on two "nodes", each a real containerd
//! with its own `stoker-agent` process (separate state, chunk cache and sockets),
//! and drives them the way the controller does: it collects the startup trace a
//! container left on node 1, merges it into a plan, pushes the plan to node 2's
//! agent over gRPC with mutual TLS, and checks that the same container then starts
//! on node 2 without fetching anything from the registry.
//!
//! The kind-based scenario (`make e2e`) is the shell script `run.sh` next to it.
