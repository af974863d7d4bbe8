//! Registry mirrors: pulls from a registry go to its configured mirrors first, in
//! order, and to the registry itself when no mirror answers.
//!
//! A mirror is named by URL (`https://mirror.example`, `http://10.0.0.5:5000`) or
//! host; `http://` mirrors are reached over plain HTTP. Requests to a mirror carry
//! the mirror's own credentials (never the origin's) and, for manifests, the
//! `ns=<origin>` query parameter of containerd's mirror convention. Everything a
//! mirror serves is checked as the origin's would be: blobs and chunks by digest,
//! manifests by digest when the reference has one.
//!
//! A mirror that fails (connection error, timeout, 5xx) is skipped for
//! [`MIRROR_RETRY_AFTER`], so a dead mirror costs one request timeout, not one per
//! read. A mirror that lacks the content (404) is just passed over.

use std::future::Future;
use std::time::{Duration, Instant};

use oci_client::Reference;

use crate::client::{RegistryClient, lock};
use crate::error::RegistryError;

/// How long a failing mirror is skipped before it is tried again.
pub const MIRROR_RETRY_AFTER: Duration = Duration::from_secs(30);

/// `host[:port]` of a mirror given as a URL or a host, and whether it wants plain HTTP.
pub(crate) fn parse_mirror(mirror: &str) -> Result<(String, bool), RegistryError> {
    let (rest, plain_http) = if let Some(rest) = mirror.strip_prefix("http://") {
        (rest, true)
    } else if let Some(rest) = mirror.strip_prefix("https://") {
        (rest, false)
    } else {
        (mirror, false)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(RegistryError::Config(format!(
            "registry mirror {mirror:?} is not a URL of the form https://HOST[:PORT]"
        )));
    }
    Ok((host.to_string(), plain_http))
}

impl RegistryClient {
    /// Runs the pull operation `op` against each mirror of `reference`'s registry in
    /// turn, then against the registry itself.
    pub(crate) async fn with_mirrors<T, F, Fut>(
        &self,
        reference: &Reference,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Reference) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let Some(mirrors) = self.inner.mirrors.get(reference.registry()) else {
            return op(reference.clone()).await;
        };
        for mirror in mirrors {
            let skipped_until = lock(&self.inner.mirror_down).get(mirror).copied();
            if skipped_until.is_some_and(|until| Instant::now() < until) {
                continue;
            }
            let mut at_mirror = reference.clone();
            at_mirror.set_mirror_registry(mirror.clone());
            let limit = self.inner.config.request_timeout;
            let target = Self::target(&at_mirror, "mirror");
            let error = match tokio::time::timeout(limit, op(at_mirror)).await {
                Ok(Ok(value)) => {
                    lock(&self.inner.mirror_down).remove(mirror);
                    return Ok(value);
                }
                Ok(Err(error)) => error,
                Err(_) => RegistryError::Timeout {
                    target,
                    after: limit,
                },
            };
            if error.is_not_found() {
                tracing::debug!(%mirror, registry = reference.registry(), "mirror lacks it; next");
                continue;
            }
            tracing::warn!(
                %mirror,
                registry = reference.registry(),
                error = %error,
                "registry mirror failed; skipping it for {}s",
                MIRROR_RETRY_AFTER.as_secs()
            );
            lock(&self.inner.mirror_down)
                .insert(mirror.clone(), Instant::now() + MIRROR_RETRY_AFTER);
        }
        op(reference.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_are_urls_or_hosts() {
        assert_eq!(
            parse_mirror("https://mirror.example/").unwrap(),
            ("mirror.example".to_string(), false)
        );
        assert_eq!(
            parse_mirror("http://10.0.0.5:5000").unwrap(),
            ("10.0.0.5:5000".to_string(), true)
        );
        assert_eq!(
            parse_mirror("mirror.example:443").unwrap(),
            ("mirror.example:443".to_string(), false)
        );
        let bad = parse_mirror("https://mirror.example/v2/library").unwrap_err();
        assert!(
            bad.to_string().contains("mirror.example/v2/library"),
            "{bad}"
        );
        assert!(parse_mirror("").is_err());
    }
}
