//! The controller library's error type.

/// Everything the controller can fail at. [`Error::metric_label`] names the
/// kind for the `stoker_controller_reconcile_errors` metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("agent on node {node}: {message}")]
    Agent { node: String, message: String },
    #[error("no running stoker-agent pod on node {0}")]
    NoAgent(String),
    #[error("bad trace: {0}")]
    BadTrace(String),
    #[error("bad plan: {0}")]
    BadPlan(String),
    #[error(transparent)]
    Format(#[from] stoker_format::FormatError),
    #[error("ImagePrefetch {object}: {message}")]
    InvalidSpec { object: String, message: String },
    #[error("finalizer of {object}: {message}")]
    Finalizer { object: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("leader election: {0}")]
    Lease(String),
}

impl Error {
    /// Wraps a Kubernetes API error with what was being done.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match http_status(source) {
                Some(409) => "kube_conflict",
                Some(429) => "kube_throttled",
                Some(404) => "kube_not_found",
                Some(s) if s >= 500 => "kube_server_error",
                Some(_) => "kube_client_error",
                None => "kube_transport",
            },
            Error::Agent { .. } => "agent",
            Error::NoAgent(_) => "no_agent",
            Error::BadTrace(_) => "bad_trace",
            Error::BadPlan(_) | Error::Format(_) => "bad_plan",
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Finalizer { .. } => "finalizer",
            Error::Tls(_) => "tls",
            Error::Metrics(_) => "metrics",
            Error::Lease(_) => "lease",
        }
    }

    /// True for errors that go away by themselves: conflicts, throttling,
    /// server errors, transport errors, unreachable agents. They are retried
    /// with exponential backoff; the others wait for the object to change.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => is_transient_kube(source),
            Error::Agent { .. } | Error::NoAgent(_) | Error::Lease(_) => true,
            _ => false,
        }
    }
}

/// The HTTP status of an API error, if the server answered.
pub fn http_status(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Conflicts (409), throttling (429), server errors (5xx) and transport
/// errors are worth retrying.
pub fn is_transient_kube(error: &kube::Error) -> bool {
    match http_status(error) {
        Some(code) => code == 409 || code == 429 || code >= 500,
        None => !matches!(
            error,
            kube::Error::SerdeError(_) | kube::Error::BuildRequest(_)
        ),
    }
}
