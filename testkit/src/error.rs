//! The one error type of the test harness.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while setting up test fixtures.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// An external program the harness needs is not installed.
    #[error("{tool} not found (looked in PATH, /usr/sbin, /sbin): {hint}")]
    ToolMissing { tool: String, hint: String },

    /// An external program ran but failed.
    #[error("`{command}` failed with {status}: {stderr}")]
    ToolFailed {
        command: String,
        status: String,
        stderr: String,
    },

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A condition did not become true before its deadline.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },

    /// The registry process exited while we were waiting for it.
    #[error("docker-registry exited early ({status}); its log {log:?} ends with:\n{log_tail}")]
    RegistryExited {
        status: String,
        log: PathBuf,
        log_tail: String,
    },

    /// An image description cannot be turned into a valid OCI image or layout.
    #[error("invalid test image: {0}")]
    InvalidImage(String),
}

impl TestkitError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TestkitError::Io {
            context: context.into(),
            source,
        }
    }
}
