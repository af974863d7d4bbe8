//! The crate's one error type, [`RegistryError`], and [`Target`], the context every
//! network error carries: which registry, repository, object and byte range.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use stoker_format::Digest;

/// What a request was about: `registry/repository object [bytes a-b]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Registry host, e.g. `127.0.0.1:5000`.
    pub registry: String,
    /// Repository, e.g. `library/ubuntu`.
    pub repository: String,
    /// The object, e.g. `blob sha256:…`, `manifest latest`, `referrers of sha256:…`.
    pub object: String,
    /// The byte range asked for, end exclusive.
    pub range: Option<Range<u64>>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.registry, self.repository, self.object)?;
        if let Some(range) = &self.range {
            write!(f, " bytes {}..{}", range.start, range.end)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong talking to a registry. Network errors name their
/// [`Target`]; none carries a credential or token.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The [`RegistryConfig`](crate::RegistryConfig) cannot be used.
    #[error("invalid registry configuration: {0}")]
    Config(String),

    /// A reference string is not `host[:port]/repo[:tag|@digest]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The docker config file exists but cannot be read or parsed.
    #[error("docker config {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },

    /// Connecting, TLS, or reading the body failed.
    #[error("{target}: {source}")]
    Transport {
        target: Box<Target>,
        #[source]
        source: reqwest::Error,
    },

    /// No answer within the per-request timeout.
    #[error("{target}: no response within {after:?}")]
    Timeout {
        target: Box<Target>,
        after: Duration,
    },

    /// HTTP 429, with the server's `Retry-After` if it sent one.
    #[error("{target}: rate limited by the registry (HTTP 429){}", match retry_after { Some(d) => format!(", retry after {d:?}"), None => String::new() })]
    RateLimited {
        target: Box<Target>,
        retry_after: Option<Duration>,
    },

    /// HTTP 404, or a registry error code meaning "unknown".
    #[error("{target}: not found: {message}")]
    NotFound {
        target: Box<Target>,
        message: String,
    },

    /// HTTP 401 after authenticating, or the token service refused the credentials.
    #[error("{target}: not authorized: {message}")]
    Unauthorized {
        target: Box<Target>,
        message: String,
    },

    /// Any other unsuccessful HTTP status.
    #[error("{target}: HTTP {status}: {message}")]
    Status {
        target: Box<Target>,
        status: u16,
        message: String,
    },

    /// The response broke the protocol: a wrong length or `Content-Range`, a failure of
    /// blob storage after a redirect. Worth retrying.
    #[error("{target}: bad response: {reason}")]
    BadResponse { target: Box<Target>, reason: String },

    /// A ranged read got the whole blob (HTTP 200), too large to slice.
    #[error("{target}: the registry ignored the Range header and sent the whole blob{}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    RangeIgnored {
        target: Box<Target>,
        size: Option<u64>,
    },

    /// Content does not hash to the digest it was asked for by. The target names the
    /// expected digest.
    #[error("{target}: digest mismatch, the content hashes to {actual}")]
    DigestMismatch { target: Box<Target>, actual: Digest },

    /// A manifest or index cannot be parsed or does not fit the operation. `manifest`
    /// names it (reference or digest).
    #[error("invalid manifest {manifest}: {reason}")]
    InvalidManifest { manifest: String, reason: String },

    /// An image index has no manifest for a requested platform.
    #[error("no manifest for platform {wanted} in the image index (it has: {available})")]
    NoMatchingPlatform { wanted: String, available: String },

    /// A ranged read ran out of its deadline; `last_error` is why the last attempt failed.
    #[error(
        "{}/{}: reading bytes {}..{} of blob {blob}: deadline of {deadline:?} exceeded after {attempts} attempt(s); last error: {last_error}",
        target.registry, target.repository, range.start, range.end
    )]
    DeadlineExceeded {
        target: Box<Target>,
        blob: Digest,
        range: Range<u64>,
        deadline: Duration,
        attempts: u32,
        last_error: Box<RegistryError>,
    },

    /// An oci-client error with no better classification.
    #[error("{target}: {source}")]
    Oci {
        target: Box<Target>,
        #[source]
        source: OciDistributionError,
    },
}

impl RegistryError {
    /// True when trying again later may succeed: connection failures, timeouts, 429,
    /// 5xx, 408, broken responses, and a ranged read that ran out of time.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => {
                !source.is_builder() && !source.is_redirect() && !is_tls_rejection(source)
            }
            RegistryError::Timeout { .. }
            | RegistryError::RateLimited { .. }
            | RegistryError::BadResponse { .. }
            | RegistryError::DeadlineExceeded { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// The [`Target`] of a network error.
    pub fn target(&self) -> Option<&Target> {
        match self {
            RegistryError::Transport { target, .. }
            | RegistryError::Timeout { target, .. }
            | RegistryError::RateLimited { target, .. }
            | RegistryError::NotFound { target, .. }
            | RegistryError::Unauthorized { target, .. }
            | RegistryError::Status { target, .. }
            | RegistryError::BadResponse { target, .. }
            | RegistryError::RangeIgnored { target, .. }
            | RegistryError::DigestMismatch { target, .. }
            | RegistryError::DeadlineExceeded { target, .. }
            | RegistryError::Oci { target, .. } => Some(target),
            _ => None,
        }
    }

    /// True for [`RegistryError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }

    /// The server's `Retry-After`, when it gave one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn transport(target: &Target, source: reqwest::Error) -> Self {
        RegistryError::Transport {
            target: Box::new(target.clone()),
            source,
        }
    }

    /// Classifies an unsuccessful HTTP status.
    pub(crate) fn from_status(
        target: &Target,
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    ) -> Self {
        let target = Box::new(target.clone());
        match status {
            401 => RegistryError::Unauthorized { target, message },
            404 => RegistryError::NotFound { target, message },
            429 => RegistryError::RateLimited {
                target,
                retry_after,
            },
            _ => RegistryError::Status {
                target,
                status,
                message,
            },
        }
    }

    /// Maps an oci-client error onto this enum, keeping its classification.
    pub(crate) fn from_oci(target: &Target, error: OciDistributionError) -> Self {
        match error {
            OciDistributionError::RequestError(source) => RegistryError::transport(target, source),
            OciDistributionError::UnauthorizedError { .. } => RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message: "the registry answered 401".into(),
            },
            OciDistributionError::AuthenticationFailure(message) => RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message: format!("the token service refused: {}", truncate(&message)),
            },
            OciDistributionError::ImageManifestNotFoundError(message) => RegistryError::NotFound {
                target: Box::new(target.clone()),
                message,
            },
            OciDistributionError::ServerError { code, message, .. } => {
                RegistryError::from_status(target, code, None, truncate(&message))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let message = truncate(&envelope.to_string());
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let status = if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::NameUnknown
                            | OciErrorCode::ManifestUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    404
                } else if codes.contains(&&OciErrorCode::Unauthorized) {
                    401
                } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                    429
                } else if codes.contains(&&OciErrorCode::Denied) {
                    403
                } else {
                    400
                };
                RegistryError::from_status(target, status, None, message)
            }
            OciDistributionError::DigestError(e) => RegistryError::BadResponse {
                target: Box::new(target.clone()),
                reason: e.to_string(),
            },
            source => RegistryError::Oci {
                target: Box::new(target.clone()),
                source,
            },
        }
    }
}

/// True when a TLS handshake failed for a reason retrying cannot fix: an untrusted or
/// invalid certificate, or a peer that does not speak TLS.
fn is_tls_rejection(error: &reqwest::Error) -> bool {
    fn caused_by_rustls(error: &(dyn std::error::Error + 'static)) -> bool {
        if error.is::<rustls::Error>() {
            return true;
        }
        // io::Error::source() skips the error it wraps; look inside it directly.
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && caused_by_rustls(inner)
        {
            return true;
        }
        error.source().is_some_and(caused_by_rustls)
    }
    caused_by_rustls(error)
}

/// Error bodies go into messages; keep them short.
pub(crate) fn truncate(text: &str) -> String {
    const MAX: usize = 300;
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
