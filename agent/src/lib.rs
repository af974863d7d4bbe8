//! stoker-agent: the Stoker node agent, a containerd remote snapshotter.
//!
//! Where it sits in the data path (registry → fetch → verify → cache → filesystem →
//! **snapshotter** → container): containerd asks the agent, over its snapshots API on a
//! unix socket, for the mounts that become a container's root filesystem. For ordinary
//! images the agent behaves like containerd's overlayfs snapshotter; for images with a
//! Stoker artifact it skips the download and unpack, mounts the image's lazy filesystem
//! once per node, and gives containers an overlay on top of it.
//!
//! Modules:
//! - [`snapshotter`]: snapshot semantics, metadata store (redb), remote-snapshot hook
//!   ([`snapshotter::ImageResolver`], [`snapshotter::LazyMounter`]), gRPC service;
//! - [`resolver`]: [`resolver::RegistryResolver`], finding an image's Stoker artifact in
//!   its registry;
//! - [`server`]: serving gRPC services on unix sockets;
//! - [`config`]: the agent's YAML configuration with defaults and `STOKER_*` overrides.

pub mod config;
pub mod resolver;
pub mod server;
pub mod snapshotter;

mod error;

pub use config::Config;
pub use error::AgentError;
pub use snapshotter::Snapshotter;
