//! How a [`RegistryClient`](crate::RegistryClient) connects: transport security,
//! credentials, timeouts and the retry policy.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

/// Settings for a [`RegistryClient`](crate::RegistryClient). `Default` gives HTTPS with the
/// system roots, credentials from the default docker config, 30 s per request, 60 s per
/// ranged read and 5 attempts for other operations.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Use plain HTTP for every registry.
    pub plain_http: bool,
    /// Registries (`host` or `host:port`, as written in references) reached over plain HTTP.
    /// Loopback registries need not be listed: HTTPS is tried first and plain HTTP is used
    /// when the TLS connection fails, as containerd does.
    pub insecure_hosts: Vec<String>,
    /// PEM file with extra CA certificates to trust, in addition to the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Docker `config.json` to read credentials from. `Default` sets
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; `None` reads none. A file
    /// that does not exist means "no credentials", a file that cannot be parsed is an error.
    pub docker_config: Option<PathBuf>,
    /// Username and password for every registry; takes precedence over the docker config.
    pub basic_auth: Option<(String, String)>,
    /// Credentials asked for per repository before `basic_auth` and the docker config, and
    /// again whenever the client authenticates: when they change (or the source stops
    /// giving any), cached tokens obtained with the old ones are not used any more.
    pub credential_source: Option<Arc<dyn crate::CredentialSource>>,
    /// Limit for a single HTTP request: each wait for response bytes. A ranged read
    /// also bounds each whole attempt by it.
    pub request_timeout: Duration,
    /// Limit for setting up a connection (TCP and TLS); `None`: `request_timeout`.
    pub connect_timeout: Option<Duration>,
    /// Budget for one [`read_range`](crate::RegistryClient::read_range), all attempts and
    /// back-off included. When it runs out the read fails with
    /// [`RegistryError::DeadlineExceeded`](crate::RegistryError::DeadlineExceeded).
    pub read_deadline: Duration,
    /// Back-off between attempts, and the attempt limit for operations without a deadline.
    pub retry: RetryPolicy,
    /// Mirrors per registry host (as written in references, e.g. `docker.io` or
    /// `registry.example:5000`), as URLs (`https://mirror.example`, `http://10.0.0.5:5000`):
    /// manifest, referrer and ranged blob reads try them in order before the registry.
    pub mirrors: BTreeMap<String, Vec<String>>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            plain_http: false,
            insecure_hosts: Vec::new(),
            ca_bundle: None,
            docker_config: default_docker_config_path(),
            basic_auth: None,
            credential_source: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: None,
            read_deadline: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            mirrors: BTreeMap::new(),
        }
    }
}

/// Never prints the password.
impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("plain_http", &self.plain_http)
            .field("insecure_hosts", &self.insecure_hosts)
            .field("ca_bundle", &self.ca_bundle)
            .field("docker_config", &self.docker_config)
            .field(
                "basic_auth",
                &self
                    .basic_auth
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field(
                "credential_source",
                &self.credential_source.as_ref().map(|_| "<set>"),
            )
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_deadline", &self.read_deadline)
            .field("retry", &self.retry)
            .field("mirrors", &self.mirrors)
            .finish()
    }
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn default_docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

/// Exponential back-off with full jitter: before retry `n` (1-based) the client waits a
/// random time in `[0, min(max_backoff, base_backoff × 2^(n-1))]`.
///
/// A `Retry-After` header on a 429 or 503 replaces the computed wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts (first try included) for operations that have no deadline: manifests,
    /// pushes, referrers, blob streams. Ranged reads are bounded by
    /// [`RegistryConfig::read_deadline`] instead.
    pub max_attempts: u32,
    /// The back-off ceiling before the first retry.
    pub base_backoff: Duration,
    /// The largest back-off ceiling.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the wait before retry number `retry` (1-based).
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// A random wait in `[0, backoff_ceiling(retry)]` (full jitter).
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self.backoff_ceiling(retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(policy.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(policy.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(policy.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(policy.backoff_ceiling(5), Duration::from_secs(1));
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_secs(1));
        for retry in 1..20 {
            assert!(policy.backoff(retry) <= policy.backoff_ceiling(retry));
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let config = RegistryConfig {
            basic_auth: Some(("alice".into(), "s3cret-password".into())),
            ..RegistryConfig::default()
        };
        let text = format!("{config:?}");
        assert!(text.contains("alice"));
        assert!(!text.contains("s3cret-password"));
    }
}
