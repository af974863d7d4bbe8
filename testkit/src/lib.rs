//! stoker-testkit: the test harness shared by every Stoker crate (dev-dependency only).
//!
//! Stoker's data path is registry → fetch → verify → cache → filesystem → snapshotter →
//! container. This crate provides the real pieces that sit at the two ends of that path
//! in tests, so that tests exercise real behaviour instead of mocks:
//!
//! - [`registry`]: starts Debian's `docker-registry` (distribution 2.8) on a free loopback
//!   port with storage in a temporary directory, can stop/restart it, and parses its access
//!   log so tests can count requests.
//! - [`image`]: builds deterministic OCI images (tar layers, gzip/zstd/none) in an OCI
//!   image-layout directory, including a "standard" image covering every OCI layer case,
//!   dedup image pairs and malicious layers; pushes layouts with `skopeo` and unpacks them
//!   with `umoci` to get a ground-truth root filesystem.
//! - [`tree`]: [`tree::TreeSnapshot`], a plain comparable description of a filesystem tree,
//!   captured from a real directory or built field by field from an index or a FUSE mount.
//!
//! Tests needing an external tool that is truly absent call [`require_tool`], which prints
//! a loud `SKIPPED:` line.

pub mod containerd;
pub mod fault_proxy;
pub mod image;
pub mod registry;
pub mod tree;

mod error;
mod util;

pub use error::TestkitError;
pub use util::{find_tool, free_port, require_root, require_tool, wait_until};
