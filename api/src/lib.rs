//! Generated gRPC code (tonic 0.14 + prost) for the two APIs Stoker speaks.
//!
//! - [`snapshots`]: containerd's `containerd.services.snapshots.v1`. The node
//!   agent serves it on a unix socket as a containerd proxy snapshotter; this
//!   is where the data path ends: the snapshotter hands containerd the mounts
//!   (overlayfs over the lazily mounted image) that become a container's root.
//! - [`agent`]: `stoker.agent.v1`, the agent's control API. The controller is
//!   its client: it pushes prefetch plans and collects startup traces.
//!
//! Both client and server code are generated. The `.proto` sources live in
//! `proto/`; see the crate README for how they map to containerd's.

/// Generated code, laid out like the protobuf packages.
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub mod stoker {
        pub mod agent {
            pub mod v1 {
                tonic::include_proto!("stoker.agent.v1");
            }
        }
    }
}

/// `containerd.services.snapshots.v1`: the snapshotter API.
pub use proto::containerd::services::snapshots::v1 as snapshots;
/// containerd's mount type, shared by the snapshot messages.
pub use proto::containerd::types::Mount;
/// `stoker.agent.v1`: the agent's control API.
pub use proto::stoker::agent::v1 as agent;

/// The gRPC service name containerd's proxy plugin calls.
pub const SNAPSHOTS_SERVICE: &str = "containerd.services.snapshots.v1.Snapshots";
