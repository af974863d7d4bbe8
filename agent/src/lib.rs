//! stoker-agent: the Stoker node agent, a containerd remote snapshotter.
//!
//! Where it sits in the data path (registry → fetch → verify → cache → filesystem →
//! **snapshotter** → container): containerd asks the agent, over its snapshots API on a
//! unix socket, for the mounts that become a container's root filesystem. For ordinary
//! images the agent behaves like containerd's overlayfs snapshotter; for images with a
//! Stoker artifact it skips the download and unpack, mounts the image's lazy filesystem
//! once per node, and gives containers an overlay on top of it.
//!
//! The snapshotter itself (snapshot semantics, metadata store, remote-snapshot hook,
//! gRPC service) is the `stoker-snapshotter` crate; the agent plugs the registry and
//! the lazy filesystem into it through its two traits,
//! [`ImageResolver`](stoker_snapshotter::ImageResolver) and
//! [`LazyMounter`](stoker_snapshotter::LazyMounter), and serves it.
//!
//! Modules:
//! - [`assembly`]: where per-file backing files for passthrough are kept, per image;
//! - [`lazy_mount`]: [`lazy_mount::RegistryLazyMounter`], mounting an image's lazy
//!   filesystem (index, fetcher over the node's chunk cache, FUSE mount);
//! - [`resolver`]: [`resolver::RegistryResolver`], finding an image's Stoker artifact in
//!   its registry;
//! - [`server`]: serving gRPC services on unix sockets;
//! - [`config`]: the agent's YAML configuration with defaults and `STOKER_*` overrides;
//! - [`containerd_check`]: what containerd's configuration lacks for the agent, logged at start;
//! - [`trace`]: startup traces recorded from the lazy mounts' first chunk accesses;
//! - [`prefetch`]: the prefetch executor that warms the chunk cache from plans;
//! - [`api_server`], [`tls`]: the agent API (`stoker.agent.v1`) on a unix socket and on
//!   TCP with mutual TLS;
//! - [`credentials`]: registry credentials pushed by the controller from image pull
//!   secrets, in memory only, asked per image before the docker config;
//! - [`warm_gate`], [`node_gate`]: the startup taint that holds pods off a new node
//!   until its plans are on disk, lifted by the agent on its own Node;
//! - [`supervisor`], [`fd_keeper`]: the parent process that keeps the lazy mounts'
//!   FUSE connections open while the agent's worker process restarts.

pub mod api_server;
pub mod assembly;
pub mod config;
pub mod containerd_check;
pub mod credentials;
pub mod fd_keeper;
pub mod lazy_mount;
pub mod node_gate;
pub mod prefetch;
pub mod resolver;
pub mod server;
pub mod supervisor;
pub mod tls;
pub mod trace;
pub mod warm_gate;

mod error;

pub use config::Config;
pub use error::AgentError;
