//! [`RegistryClient`] and the plumbing every operation shares: choosing HTTP or HTTPS per
//! registry, authentication (with one re-authentication on 401), the retry loop, and
//! request counters.
//!
//! Two transports sit underneath. oci-client does manifests, pushes and the token
//! handshake; one shared `reqwest::Client` (keep-alive, HTTP/2 over TLS) does the requests
//! oci-client cannot shape the way the data path needs: ranged reads, resumable blob
//! streams and the referrers API. Both use the same credentials and tokens.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oci_client::Reference;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use reqwest::header::{HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};

use crate::credentials::{CredentialStore, Credentials, canonical_host};
use crate::error::truncate;
use crate::{RegistryConfig, RegistryError, Target};

const USER_AGENT: &str = concat!("stoker/", env!("CARGO_PKG_VERSION"));
/// The longest `Retry-After` honoured by operations without a deadline.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// How much of an error body is read for the error message.
const ERROR_BODY_LIMIT: usize = 4096;

/// Installs rustls' `ring` crypto provider for the process. Binaries and tests call it once
/// at start; [`RegistryClient::new`] calls it too. Calling it again does nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Counters of what the client did, for tests and diagnostics. Shared by all clones.
#[derive(Debug, Default)]
pub struct RequestStats {
    requests: AtomicU64,
    retries: AtomicU64,
    reauthentications: AtomicU64,
}

impl RequestStats {
    /// HTTP requests this crate sent itself (ranged reads, blob streams, referrers,
    /// protocol probes), plus one per oci-client operation attempt (manifests, pushes).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Attempts made after a failed attempt.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Tokens (or credentials) fetched again after the registry answered 401.
    pub fn reauthentications(&self) -> u64 {
        self.reauthentications.load(Ordering::Relaxed)
    }
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// A client for OCI registries. Cheap to clone: clones share connections, tokens and
/// [`RequestStats`].
#[derive(Clone)]
pub struct RegistryClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: RegistryConfig,
    credentials: CredentialStore,
    /// The shared connection pool for the requests this crate sends itself.
    pub(crate) http: reqwest::Client,
    oci_https: oci_client::Client,
    oci_http: oci_client::Client,
    /// The scheme chosen for each loopback registry after probing.
    schemes: Mutex<HashMap<String, Scheme>>,
    auth_cache: Mutex<HashMap<AuthKey, CachedAuth>>,
    /// Serialises token fetches, so that a burst of 401s fetches one token.
    auth_refresh: tokio::sync::Mutex<()>,
    pub(crate) stats: RequestStats,
    /// Mirror hosts per registry host, in the order they are tried.
    pub(crate) mirrors: HashMap<String, Vec<String>>,
    /// Mirrors that failed, and until when they are skipped.
    pub(crate) mirror_down: Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What a request is for; push tokens carry the `pull,push` scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Pull,
    Push,
}

impl Access {
    fn operation(self) -> oci_client::RegistryOperation {
        match self {
            Access::Pull => oci_client::RegistryOperation::Pull,
            Access::Push => oci_client::RegistryOperation::Push,
        }
    }
    fn scope(self, repository: &str) -> String {
        match self {
            Access::Pull => format!("repository:{repository}:pull"),
            Access::Push => format!("repository:{repository}:pull,push"),
        }
    }
}

type AuthKey = (String, String, Access);

/// A cached `Authorization` and the [`CredentialSource`](crate::CredentialSource)'s answer
/// it was obtained with: when the source answers differently (new credentials, or none
/// after they expired), the header is fetched again instead of used.
struct CachedAuth {
    header: Arc<AuthHeader>,
    from_source: Option<Credentials>,
}

/// The `Authorization` a request carries. `Debug` never shows a secret.
pub(crate) enum AuthHeader {
    Anonymous,
    Basic { username: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthHeader::Anonymous => "Anonymous",
            AuthHeader::Basic { .. } => "Basic(<redacted>)",
            AuthHeader::Bearer(_) => "Bearer(<redacted>)",
        })
    }
}

impl AuthHeader {
    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            AuthHeader::Anonymous => request,
            AuthHeader::Basic { username, password } => {
                request.basic_auth(username, Some(password))
            }
            AuthHeader::Bearer(token) => request.bearer_auth(token),
        }
    }
}

/// How long an operation may keep retrying.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Budget {
    /// At most this many attempts.
    Attempts(u32),
    /// Until this instant; each attempt is also cut at `request_timeout`.
    Deadline(Instant),
}

/// Why [`RegistryClient::retrying`] gave up.
pub(crate) struct GaveUp {
    pub(crate) error: RegistryError,
    pub(crate) attempts: u32,
    /// True when the deadline, not the error, ended the operation.
    pub(crate) out_of_time: bool,
}

impl RegistryClient {
    /// Builds a client: loads the CA bundle and the credentials, and sets up the connection
    /// pools. Nothing is sent until the first operation.
    pub fn new(mut config: RegistryConfig) -> Result<Self, RegistryError> {
        install_crypto_provider();
        let mut mirrors = HashMap::new();
        for (registry, urls) in &config.mirrors {
            let mut hosts = Vec::new();
            for url in urls {
                let (host, plain_http) = crate::mirrors::parse_mirror(url)?;
                if plain_http && !config.insecure_hosts.contains(&host) {
                    config.insecure_hosts.push(host.clone());
                }
                hosts.push(host);
            }
            mirrors.insert(registry.clone(), hosts);
        }
        let credentials =
            CredentialStore::load(config.basic_auth.as_ref(), config.docker_config.as_deref())?;

        let mut http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout.unwrap_or(config.request_timeout))
            .read_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90));
        let mut extra_roots = Vec::new();
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| {
                RegistryError::Config(format!("reading CA bundle {}: {e}", path.display()))
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RegistryError::Config(format!("parsing CA bundle {}: {e}", path.display()))
            })?;
            if certificates.is_empty() {
                return Err(RegistryError::Config(format!(
                    "CA bundle {} holds no certificate",
                    path.display()
                )));
            }
            http = http.tls_certs_merge(certificates);
            extra_roots = split_pem_certificates(&pem)
                .into_iter()
                .map(|data| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                })
                .collect();
        }
        let http = http
            .build()
            .map_err(|e| RegistryError::Config(format!("building the HTTP client: {e}")))?;

        let oci = |protocol: ClientProtocol| {
            let oci_config = ClientConfig {
                protocol,
                extra_root_certificates: extra_roots.clone(),
                platform_resolver: None,
                read_timeout: Some(config.request_timeout),
                connect_timeout: Some(config.connect_timeout.unwrap_or(config.request_timeout)),
                user_agent: USER_AGENT,
                ..ClientConfig::default()
            };
            oci_client::Client::try_from(oci_config)
                .map_err(|e| RegistryError::Config(format!("building the OCI client: {e}")))
        };
        let oci_https = oci(ClientProtocol::Https)?;
        let oci_http = oci(ClientProtocol::Http)?;

        Ok(RegistryClient {
            inner: Arc::new(Inner {
                config,
                credentials,
                http,
                oci_https,
                oci_http,
                schemes: Mutex::new(HashMap::new()),
                auth_cache: Mutex::new(HashMap::new()),
                auth_refresh: tokio::sync::Mutex::new(()),
                stats: RequestStats::default(),
                mirrors,
                mirror_down: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Request, retry and re-authentication counters.
    pub fn stats(&self) -> &RequestStats {
        &self.inner.stats
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// `http` or `https` for `registry`: plain HTTP when configured; for a loopback
    /// registry, whatever answers (HTTPS first), probed once and remembered.
    pub(crate) async fn scheme(
        &self,
        registry: &str,
        target: &Target,
    ) -> Result<Scheme, RegistryError> {
        let config = &self.inner.config;
        if config.plain_http
            || config
                .insecure_hosts
                .iter()
                .any(|host| host.eq_ignore_ascii_case(registry))
        {
            return Ok(Scheme::Http);
        }
        if !is_loopback(registry) {
            return Ok(Scheme::Https);
        }
        if let Some(scheme) = lock(&self.inner.schemes).get(registry) {
            return Ok(*scheme);
        }
        let probe = |scheme: Scheme| {
            self.inner.stats.count_request();
            self.inner
                .http
                .get(format!("{}://{registry}/v2/", scheme.as_str()))
                .timeout(config.request_timeout)
                .send()
        };
        let scheme = match probe(Scheme::Https).await {
            Ok(_) => Scheme::Https,
            Err(tls_error) => match probe(Scheme::Http).await {
                Ok(_) => {
                    tracing::info!(
                        registry,
                        error = %tls_error,
                        "loopback registry does not answer HTTPS; using plain HTTP"
                    );
                    Scheme::Http
                }
                // Neither works: the HTTPS error says more (e.g. an untrusted certificate).
                Err(_) => return Err(RegistryError::transport(target, tls_error)),
            },
        };
        lock(&self.inner.schemes).insert(registry.to_string(), scheme);
        Ok(scheme)
    }

    /// `scheme://registry`, the base of every URL for `repo`.
    pub(crate) async fn base_url(
        &self,
        repo: &Reference,
        target: &Target,
    ) -> Result<String, RegistryError> {
        let registry = repo.resolve_registry();
        let scheme = self.scheme(registry, target).await?;
        Ok(format!("{}://{registry}", scheme.as_str()))
    }

    async fn oci_client(
        &self,
        registry: &str,
        target: &Target,
    ) -> Result<&oci_client::Client, RegistryError> {
        Ok(match self.scheme(registry, target).await? {
            Scheme::Http => &self.inner.oci_http,
            Scheme::Https => &self.inner.oci_https,
        })
    }

    /// What the configured [`CredentialSource`](crate::CredentialSource) has for `repo`.
    fn source_credentials(&self, repo: &Reference) -> Option<Credentials> {
        let source = self.inner.config.credential_source.as_ref()?;
        source.credentials_for(&canonical_host(repo.resolve_registry()), repo.repository())
    }

    /// The credentials for `repo`: the source's (given as `from_source`), else the static
    /// ones. A mirror gets its own credentials, never the origin's.
    fn credentials(
        &self,
        repo: &Reference,
        from_source: Option<Credentials>,
    ) -> Option<Credentials> {
        from_source.or_else(|| self.inner.credentials.for_registry(repo.resolve_registry()))
    }

    /// The oci-client for `repo`'s registry, with the credentials stored in it, so that its
    /// own token handshake works.
    pub(crate) async fn oci_ready(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
    ) -> Result<oci_client::Client, RegistryError> {
        let registry = repo.resolve_registry();
        let oci = self.oci_client(registry, target).await?;
        let credentials = self.credentials(repo, self.source_credentials(repo));
        oci.store_auth_if_needed(registry, &oci_auth(credentials.as_ref()))
            .await;
        if matches!(credentials, Some(Credentials::IdentityToken(_)))
            || self.inner.config.credential_source.is_some()
        {
            // oci-client cannot exchange refresh tokens, and keeps the first credentials
            // it was given per registry: fetch a token ourselves (again when the source's
            // credentials changed), which also hands it to oci-client for this repository.
            self.auth_header(repo, access, target).await?;
        }
        Ok(oci.clone())
    }

    /// The cached `Authorization` for `repo`, fetching it on first use.
    pub(crate) async fn auth_header(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
    ) -> Result<Arc<AuthHeader>, RegistryError> {
        let key = auth_key(repo, access);
        let from_source = self.source_credentials(repo);
        let cached = |cache: &HashMap<AuthKey, CachedAuth>| {
            cache
                .get(&key)
                .filter(|c| c.from_source == from_source)
                .map(|c| c.header.clone())
        };
        if let Some(header) = cached(&lock(&self.inner.auth_cache)) {
            return Ok(header);
        }
        let _refreshing = self.inner.auth_refresh.lock().await;
        if let Some(header) = cached(&lock(&self.inner.auth_cache)) {
            return Ok(header);
        }
        self.fetch_and_cache_auth(repo, access, target, key.clone(), from_source)
            .await
    }

    async fn fetch_and_cache_auth(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
        key: AuthKey,
        from_source: Option<Credentials>,
    ) -> Result<Arc<AuthHeader>, RegistryError> {
        let credentials = self.credentials(repo, from_source.clone());
        let header = Arc::new(self.fetch_auth(repo, access, target, credentials).await?);
        lock(&self.inner.auth_cache).insert(
            key,
            CachedAuth {
                header: header.clone(),
                from_source,
            },
        );
        Ok(header)
    }

    /// Fetches a new token after a 401. When `stale` is given and another task has already
    /// replaced it, that newer header is returned without fetching again.
    pub(crate) async fn reauthenticate(
        &self,
        repo: &Reference,
        access: Access,
        stale: Option<&Arc<AuthHeader>>,
        target: &Target,
    ) -> Result<Arc<AuthHeader>, RegistryError> {
        let key = auth_key(repo, access);
        let _refreshing = self.inner.auth_refresh.lock().await;
        if let Some(stale) = stale
            && let Some(current) = lock(&self.inner.auth_cache).get(&key)
            && !Arc::ptr_eq(stale, &current.header)
        {
            return Ok(current.header.clone());
        }
        self.inner
            .stats
            .reauthentications
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            registry = repo.resolve_registry(),
            repository = repo.repository(),
            ?access,
            "re-authenticating after 401"
        );
        let from_source = self.source_credentials(repo);
        self.fetch_and_cache_auth(repo, access, target, key, from_source)
            .await
    }

    /// Runs the challenge flow: oci-client's token handshake for anonymous and basic
    /// credentials, our own refresh-token exchange for identity tokens.
    async fn fetch_auth(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
        credentials: Option<Credentials>,
    ) -> Result<AuthHeader, RegistryError> {
        let registry = repo.resolve_registry();
        let oci = self.oci_client(registry, target).await?;
        self.inner.stats.count_request();
        match credentials {
            Some(Credentials::IdentityToken(refresh_token)) => {
                let token = self
                    .exchange_identity_token(repo, access, &refresh_token, target)
                    .await?;
                oci.store_auth_if_needed(registry, &RegistryAuth::Anonymous)
                    .await;
                oci.auth(
                    repo,
                    &RegistryAuth::Bearer(token.clone()),
                    access.operation(),
                )
                .await
                .map_err(|e| RegistryError::from_oci(target, e))?;
                Ok(AuthHeader::Bearer(token))
            }
            credentials => {
                let token = oci
                    .auth(repo, &oci_auth(credentials.as_ref()), access.operation())
                    .await
                    .map_err(|e| RegistryError::from_oci(target, e))?;
                Ok(match (token, credentials) {
                    (Some(token), _) => AuthHeader::Bearer(token),
                    (None, Some(Credentials::Basic { username, password })) => {
                        AuthHeader::Basic { username, password }
                    }
                    (None, _) => AuthHeader::Anonymous,
                })
            }
        }
    }

    /// docker's `identitytoken`: an OAuth2 refresh token, exchanged for an access token
    /// at the realm of the registry's Bearer challenge.
    async fn exchange_identity_token(
        &self,
        repo: &Reference,
        access: Access,
        refresh_token: &str,
        target: &Target,
    ) -> Result<String, RegistryError> {
        let base = self.base_url(repo, target).await?;
        let response = self
            .inner
            .http
            .get(format!("{base}/v2/"))
            .send()
            .await
            .map_err(|e| RegistryError::transport(target, e))?;
        let Some(challenge) = bearer_challenge(response.headers()) else {
            return Err(RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message:
                    "an identity token is configured but the registry sent no Bearer challenge"
                        .into(),
            });
        };
        let mut form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", refresh_token.to_string()),
            ("client_id", "stoker".to_string()),
            ("scope", access.scope(repo.repository())),
        ];
        if let Some(service) = challenge.service {
            form.push(("service", service));
        }
        let response = self
            .inner
            .http
            .post(&challenge.realm)
            .form(&form)
            .send()
            .await
            .map_err(|e| RegistryError::transport(target, e))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = read_error_body(response).await;
            return Err(RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message: format!(
                    "the token service answered {status} to the identity token: {body}"
                ),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: Option<String>,
            token: Option<String>,
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| RegistryError::transport(target, e))?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message: format!("unreadable token response: {e}"),
            })?;
        parsed
            .access_token
            .or(parsed.token)
            .ok_or_else(|| RegistryError::Unauthorized {
                target: Box::new(target.clone()),
                message: "the token response has no access_token".into(),
            })
    }

    /// Sends one request built by `build` (given the shared client and the registry's base
    /// URL) with `repo`'s authorization; on a 401, re-authenticates once and sends again.
    /// Other statuses are returned to the caller.
    pub(crate) async fn send(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let base = self.base_url(repo, target).await?;
        let mut auth = self.auth_header(repo, access, target).await?;
        let mut reauthenticated = false;
        loop {
            self.inner.stats.count_request();
            let response = auth
                .apply(build(&self.inner.http, &base))
                .send()
                .await
                .map_err(|e| RegistryError::transport(target, e))?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED && !reauthenticated {
                reauthenticated = true;
                auth = self
                    .reauthenticate(repo, access, Some(&auth), target)
                    .await?;
                continue;
            }
            return Ok(response);
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the budget runs out, sleeping
    /// between attempts by the retry policy (or the server's `Retry-After`).
    pub(crate) async fn retrying<T, Fut>(
        &self,
        target: &Target,
        budget: Budget,
        mut attempt: impl FnMut() -> Fut,
    ) -> Result<T, GaveUp>
    where
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let policy = self.inner.config.retry;
        let request_timeout = self.inner.config.request_timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = match budget {
                Budget::Attempts(_) => attempt().await,
                Budget::Deadline(deadline) => {
                    let limit =
                        request_timeout.min(deadline.saturating_duration_since(Instant::now()));
                    match tokio::time::timeout(limit, attempt()).await {
                        Ok(result) => result,
                        Err(_) => Err(RegistryError::Timeout {
                            target: Box::new(target.clone()),
                            after: limit,
                        }),
                    }
                }
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !error.is_transient() {
                return Err(GaveUp {
                    error,
                    attempts,
                    out_of_time: false,
                });
            }
            let wait = match error.retry_after() {
                Some(retry_after) => retry_after.min(MAX_RETRY_AFTER),
                None => policy.backoff(attempts),
            };
            let out_of_time = match budget {
                Budget::Attempts(max) => {
                    if attempts >= max {
                        return Err(GaveUp {
                            error,
                            attempts,
                            out_of_time: false,
                        });
                    }
                    false
                }
                Budget::Deadline(deadline) => Instant::now() + wait >= deadline,
            };
            if out_of_time {
                return Err(GaveUp {
                    error,
                    attempts,
                    out_of_time: true,
                });
            }
            tracing::debug!(%error, attempt = attempts, ?wait, "retrying after a transient error");
            self.inner.stats.count_retry();
            tokio::time::sleep(wait).await;
        }
    }

    /// Runs an oci-client operation with the retry policy, re-authenticating once per
    /// attempt on a 401.
    pub(crate) async fn oci_call<T, F, Fut>(
        &self,
        repo: &Reference,
        access: Access,
        target: &Target,
        call: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(oci_client::Client) -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let call = &call;
        let attempts = Budget::Attempts(self.inner.config.retry.max_attempts.max(1));
        self.retrying(target, attempts, move || async move {
            let oci = self.oci_ready(repo, access, target).await?;
            self.inner.stats.count_request();
            match call(oci.clone()).await {
                Ok(value) => Ok(value),
                Err(error) => match RegistryError::from_oci(target, error) {
                    RegistryError::Unauthorized { .. } => {
                        self.reauthenticate(repo, access, None, target).await?;
                        self.inner.stats.count_request();
                        call(oci)
                            .await
                            .map_err(|e| RegistryError::from_oci(target, e))
                    }
                    other => Err(other),
                },
            }
        })
        .await
        .map_err(|gave_up| gave_up.error)
    }

    /// A [`Target`] for `object` in `repo`.
    pub(crate) fn target(repo: &Reference, object: impl Into<String>) -> Box<Target> {
        Box::new(Target {
            registry: repo.resolve_registry().to_string(),
            repository: repo.repository().to_string(),
            object: object.into(),
            range: None,
        })
    }
}

/// Turns an unsuccessful response into an error, reading a bounded part of its body.
pub(crate) async fn status_error(target: &Target, response: reqwest::Response) -> RegistryError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let message = read_error_body(response).await;
    RegistryError::from_status(target, status, retry_after, message)
}

async fn read_error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    truncate(&String::from_utf8_lossy(&body))
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

fn bearer_challenge(headers: &HeaderMap) -> Option<BearerChallenge> {
    let value = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    http_auth::parser::ChallengeParser::new(value)
        .filter_map(Result::ok)
        .find(|challenge| challenge.scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|challenge| {
            let param = |name: &str| {
                challenge
                    .params
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.to_unescaped())
            };
            Some(BearerChallenge {
                realm: param("realm")?,
                service: param("service"),
            })
        })
}

fn oci_auth(credentials: Option<&Credentials>) -> RegistryAuth {
    match credentials {
        Some(Credentials::Basic { username, password }) => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        _ => RegistryAuth::Anonymous,
    }
}

fn auth_key(repo: &Reference, access: Access) -> AuthKey {
    (
        repo.resolve_registry().to_string(),
        repo.repository().to_string(),
        access,
    )
}

/// `localhost`, `127.0.0.0/8` or `::1`, with or without a port.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => registry,
        }
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Each `-----BEGIN CERTIFICATE-----` block of a PEM bundle, for oci-client, which takes
/// one certificate per entry.
fn split_pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut certificates = Vec::new();
    let mut rest = text.as_ref();
    while let Some(begin) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[begin..].find(END) else {
            break;
        };
        let end = begin + end + END.len();
        certificates.push(format!("{}\n", &rest[begin..end]).into_bytes());
        rest = &rest[end..];
    }
    certificates
}

/// Locks a mutex, ignoring poisoning (the maps stay consistent: every update is one insert).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "LOCALHOST:1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "example.com",
            "10.0.0.1:5000",
            "[fe80::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn parses_bearer_challenges() {
        let mut headers = HeaderMap::new();
        headers.insert(
            WWW_AUTHENTICATE,
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
                .parse()
                .unwrap(),
        );
        let challenge = bearer_challenge(&headers).unwrap();
        assert_eq!(challenge.realm, "https://auth.example/token");
        assert_eq!(challenge.service.as_deref(), Some("registry.example"));
        headers.insert(WWW_AUTHENTICATE, r#"Basic realm="x""#.parse().unwrap());
        assert!(bearer_challenge(&headers).is_none());
    }

    #[test]
    fn splits_pem_bundles() {
        let bundle = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let certificates = split_pem_certificates(bundle.as_bytes());
        assert_eq!(certificates.len(), 2);
        assert!(String::from_utf8_lossy(&certificates[1]).contains("BBB"));
    }

    #[test]
    fn auth_header_debug_hides_secrets() {
        let text = format!(
            "{:?} {:?}",
            AuthHeader::Bearer("tok-secret".into()),
            AuthHeader::Basic {
                username: "u".into(),
                password: "pw-secret".into()
            }
        );
        assert!(!text.contains("secret"), "{text}");
    }
}
