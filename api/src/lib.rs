//! Generated gRPC code (tonic 0.14 + prost) for the two APIs Stoker speaks.
//!
//! - [`snapshots`]: containerd's `containerd.services.snapshots.v1`. The node
//!   agent serves it on a unix socket as a containerd proxy snapshotter; this
//!   is where the data path ends: the snapshotter hands containerd the mounts
//!   (overlayfs over the lazily mounted image) that become a container's root.
//! - [`agent`]: `stoker.agent.v1`, the agent's control API. The controller is
//!   its client: it pushes prefetch plans and registry credentials (from image
//!   pull secrets) and collects startup traces. `Debug` of
//!   [`agent::RegistryCredential`] never shows its password or token.
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

/// Never shows the password or the identity token, so that a credential
/// logged by mistake (`{:?}` of a request) leaks nothing.
impl std::fmt::Debug for agent::RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &str| if secret.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("repository_prefix", &self.repository_prefix)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("identity_token", &redacted(&self.identity_token))
            .field("expires_at_unix", &self.expires_at_unix)
            .finish()
    }
}

/// The gRPC service name containerd's proxy plugin calls.
pub const SNAPSHOTS_SERVICE: &str = "containerd.services.snapshots.v1.Snapshots";

#[cfg(test)]
mod tests {
    use super::agent::{RegistryCredential, SetCredentialsRequest};

    #[test]
    fn debug_of_credentials_never_shows_secrets() {
        let request = SetCredentialsRequest {
            credentials: vec![RegistryCredential {
                registry: "registry.example:5000".into(),
                repository_prefix: "team".into(),
                username: "puller".into(),
                password: "hunter2-password".into(),
                identity_token: "refresh-token-xyz".into(),
                expires_at_unix: 1,
            }],
        };
        let text = format!("{request:?} {request:#?}");
        assert!(text.contains("registry.example:5000") && text.contains("puller"));
        assert!(
            !text.contains("hunter2") && !text.contains("refresh-token"),
            "{text}"
        );
    }
}
