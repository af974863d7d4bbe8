//! The agent library's one error type.

/// Everything that can go wrong in the agent. Each error maps to a gRPC code (see
/// [`AgentError::grpc_code`]); snapshot errors keep the one containerd's proxy client
/// turns back into the matching `errdefs` error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A snapshot call failed (the error carries its own gRPC code).
    #[error(transparent)]
    Snapshotter(#[from] stoker_snapshotter::SnapshotterError),

    /// The call is not possible in the current state (e.g. a trace already under
    /// way). gRPC `FailedPrecondition`.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The request itself is malformed (e.g. not an image reference).
    /// gRPC `InvalidArgument`.
    #[error("{0}")]
    InvalidArgument(String),

    /// A filesystem or system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Work on a remote image (its index, its trace, its prefetch) failed.
    #[error("remote image {image}: {message}")]
    Remote { image: String, message: String },

    /// The configuration file or an environment override is invalid.
    #[error("configuration: {0}")]
    Config(String),
}

impl AgentError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC status code containerd expects for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            AgentError::Snapshotter(error) => error.grpc_code(),
            AgentError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            AgentError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            AgentError::Config(_) => tonic::Code::InvalidArgument,
            AgentError::Io { .. } | AgentError::Remote { .. } => tonic::Code::Internal,
        }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(error: AgentError) -> Self {
        tonic::Status::new(error.grpc_code(), error.to_string())
    }
}
