//! The crate's one error type, [`SnapshotterError`]. Each variant maps to the gRPC code
//! containerd's proxy client turns back into the matching `errdefs` error
//! (see [`SnapshotterError::grpc_code`]).

use std::path::PathBuf;

/// Everything that can go wrong in a snapshot call.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// The snapshot (or its parent) does not exist. gRPC `NotFound`.
    #[error("snapshot {0:?} not found")]
    NotFound(String),

    /// A snapshot with this key or name exists already. gRPC `AlreadyExists`;
    /// remote snapshotters also answer this when a layer needs no unpacking.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),

    /// The snapshot is in the wrong state for the call (e.g. committing a view,
    /// removing a snapshot that has children). gRPC `FailedPrecondition`.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The request itself is malformed (bad filter, immutable field, ...).
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

    /// The snapshot metadata store (redb) failed.
    #[error("snapshot metadata store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },

    /// A stored snapshot record cannot be decoded.
    #[error("snapshot record {name:?} is corrupt: {source}")]
    CorruptRecord {
        name: String,
        #[source]
        source: serde_json::Error,
    },

    /// Looking up an image's Stoker artifact or mounting its lazy filesystem failed
    /// (what an [`ImageResolver`](crate::ImageResolver) or
    /// [`LazyMounter`](crate::LazyMounter) reports).
    #[error("remote image {image}: {message}")]
    Remote { image: String, message: String },
}

impl SnapshotterError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SnapshotterError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC status code containerd expects for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            SnapshotterError::NotFound(_) => tonic::Code::NotFound,
            SnapshotterError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            SnapshotterError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            SnapshotterError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            SnapshotterError::Io { .. }
            | SnapshotterError::Store { .. }
            | SnapshotterError::CorruptRecord { .. }
            | SnapshotterError::Remote { .. } => tonic::Code::Internal,
        }
    }
}

impl From<SnapshotterError> for tonic::Status {
    fn from(error: SnapshotterError) -> Self {
        tonic::Status::new(error.grpc_code(), error.to_string())
    }
}
