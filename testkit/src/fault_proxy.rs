//! A fault-injecting HTTP/1.1 reverse proxy for tests, in front of a real registry.
//!
//! [`FaultProxy::start`] listens on a free `127.0.0.1` port and forwards every request to
//! the upstream registry (keeping the `Host` header, so the registry's upload `Location`s
//! point back at the proxy). Tests switch faults at run time:
//!
//! - [`Fault::Status`] (500, 503, …) and [`Fault::TooManyRequests`] with `Retry-After`,
//!   for N requests or until cleared ([`FaultProxy::set_fault_with`]);
//! - [`Fault::Latency`] before forwarding; [`Fault::StallBody`] (headers and the first K
//!   bytes, then nothing); [`Fault::TruncateBody`] (K bytes, then the connection drops);
//!   [`Fault::FlipByte`] (one byte of the body inverted);
//! - [`FaultProxy::set_down`]: the listener closes and open connections are cut, so
//!   connections are refused, until it is brought up again on the same port;
//! - [`FaultProxy::require_auth`]: the proxy demands bearer tokens from a token service of
//!   its own (`/token`, basic credentials or an identity token), which issues tokens that
//!   expire after a number of uses or when [`FaultProxy::expire_tokens`] is called; the
//!   registry behind it stays open (the proxy forwards without `Authorization`);
//! - [`FaultProxy::redirect_blobs`]: blob `GET`s are answered with a 307 to a second
//!   listener that serves them from the registry, with its own faults
//!   ([`FaultProxy::set_redirect_fault`]).
//!
//! Faults apply to requests matching a [`Scope`]: every `/v2/` request, blob `GET`/`HEAD`s
//! only, or paths with a prefix. Every request is recorded ([`FaultProxy::requests`],
//! [`FaultProxy::request_counts`]) with its method, path, `Range` and status, so tests
//! can assert single-flight, coalescing and retries.
//!
//! The module depends only on tokio, hyper, hyper-util, http-body-util and bytes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    AUTHORIZATION, HOST, HeaderValue, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the proxy does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    PassThrough,
    /// Answer with this HTTP status (and a registry error body) without forwarding.
    Status(u16),
    /// Answer 429 with `Retry-After: <seconds>`.
    TooManyRequests { retry_after_secs: u64 },
    /// Wait this long, then forward.
    Latency(Duration),
    /// Forward the headers and the first `after_bytes` of the body, then send nothing
    /// more until the client gives up.
    StallBody { after_bytes: u64 },
    /// Forward the first `after_bytes` of the body, then drop the connection (the
    /// `Content-Length` still announces the whole body).
    TruncateBody { after_bytes: u64 },
    /// Invert the body byte at `offset` (of this response's body).
    FlipByte { offset: u64 },
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every request under `/v2/` (not the proxy's own `/token`).
    All,
    /// `GET` and `HEAD` of `/v2/<name>/blobs/<digest>` (not uploads).
    Blobs,
    /// Requests whose path starts with this prefix.
    PathPrefix(String),
}

/// Credentials the proxy's token service accepts.
#[derive(Clone, Default)]
pub struct ProxyAuth {
    /// Username and password accepted (as HTTP Basic) by `GET /token`.
    pub basic: Option<(String, String)>,
    /// Refresh token accepted by `POST /token` (`grant_type=refresh_token`).
    pub identity_token: Option<String>,
    /// A token stops working after this many authorised requests; `None`: never.
    pub token_max_uses: Option<u32>,
}

/// Which listener a request arrived at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The proxy's main address.
    Main,
    /// The blob server that redirects point to.
    Redirect,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    pub listener: Listener,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether the request carried an `Authorization` header (its value is never kept).
    pub authorization: bool,
    /// The status the proxy answered (502 when the upstream was unreachable).
    pub status: u16,
}

impl ProxiedRequest {
    /// `GET` of a blob (not an upload).
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && is_blob_path(&self.path)
    }
}

/// `(listener, method, path, range)`, the key of [`FaultProxy::request_counts`].
pub type RequestKey = (Listener, String, String, Option<String>);

#[derive(Debug, Clone)]
struct ActiveFault {
    fault: Fault,
    scope: Scope,
    /// Matching requests still to be hit; `None`: until cleared.
    remaining: Option<u32>,
}

impl ActiveFault {
    fn none() -> Self {
        ActiveFault {
            fault: Fault::PassThrough,
            scope: Scope::All,
            remaining: None,
        }
    }

    /// The fault for a request with this method and path, consuming one use.
    fn take(&mut self, method: &Method, path: &str) -> Fault {
        let matches = match &self.scope {
            Scope::All => path.starts_with("/v2/"),
            Scope::Blobs => (method == Method::GET || method == Method::HEAD) && is_blob_path(path),
            Scope::PathPrefix(prefix) => path.starts_with(prefix.as_str()),
        };
        if !matches || self.fault == Fault::PassThrough {
            return Fault::PassThrough;
        }
        match &mut self.remaining {
            Some(0) => Fault::PassThrough,
            Some(n) => {
                *n -= 1;
                self.fault.clone()
            }
            None => self.fault.clone(),
        }
    }
}

struct State {
    fault: ActiveFault,
    redirect_fault: ActiveFault,
    redirect_blobs: bool,
    auth: Option<ProxyAuth>,
    /// Issued token → uses left (`None`: unlimited).
    tokens: HashMap<String, Option<u32>>,
    log: Vec<ProxiedRequest>,
}

struct Shared {
    upstream: String,
    main_addr: SocketAddr,
    redirect_addr: SocketAddr,
    client: Client<HttpConnector, ProxyBody>,
    state: Mutex<State>,
    tokens_issued: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fault proxy. Dropping it stops both listeners and cuts their connections.
pub struct FaultProxy {
    shared: Arc<Shared>,
    main_task: Mutex<Option<JoinHandle<()>>>,
    redirect_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy for the registry at `upstream` (`127.0.0.1:PORT`), passing everything
    /// through.
    pub async fn start(upstream: &str) -> std::io::Result<FaultProxy> {
        let main = TcpListener::bind("127.0.0.1:0").await?;
        let redirect = TcpListener::bind("127.0.0.1:0").await?;
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(30));
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            main_addr: main.local_addr()?,
            redirect_addr: redirect.local_addr()?,
            client: builder.build_http(),
            state: Mutex::new(State {
                fault: ActiveFault::none(),
                redirect_fault: ActiveFault::none(),
                redirect_blobs: false,
                auth: None,
                tokens: HashMap::new(),
                log: Vec::new(),
            }),
            tokens_issued: AtomicU64::new(0),
        });
        let main_task = tokio::spawn(serve(main, shared.clone(), Listener::Main));
        let redirect_task = tokio::spawn(serve(redirect, shared.clone(), Listener::Redirect));
        Ok(FaultProxy {
            shared,
            main_task: Mutex::new(Some(main_task)),
            redirect_task,
        })
    }

    /// `127.0.0.1:PORT`, to use as the registry host in references.
    pub fn host(&self) -> String {
        self.shared.main_addr.to_string()
    }

    /// The port of the main listener (kept across [`set_down`](Self::set_down)).
    pub fn port(&self) -> u16 {
        self.shared.main_addr.port()
    }

    /// `127.0.0.1:PORT` of the listener redirected blob requests go to.
    pub fn redirect_host(&self) -> String {
        self.shared.redirect_addr.to_string()
    }

    /// Applies `fault` to every `/v2/` request until changed.
    pub fn set_fault(&self, fault: Fault) {
        self.set_fault_with(fault, Scope::All, None);
    }

    /// Applies `fault` to requests in `scope`, for the next `times` of them (`None`:
    /// until changed).
    pub fn set_fault_with(&self, fault: Fault, scope: Scope, times: Option<u32>) {
        self.shared.state().fault = ActiveFault {
            fault,
            scope,
            remaining: times,
        };
    }

    /// Back to pass-through on both listeners.
    pub fn clear_faults(&self) {
        let mut state = self.shared.state();
        state.fault = ActiveFault::none();
        state.redirect_fault = ActiveFault::none();
    }

    /// Applies `fault` to requests at the redirect listener, for the next `times` of them.
    pub fn set_redirect_fault(&self, fault: Fault, times: Option<u32>) {
        self.shared.state().redirect_fault = ActiveFault {
            fault,
            scope: Scope::All,
            remaining: times,
        };
    }

    /// Answer blob `GET`s with `307 Temporary Redirect` to the redirect listener.
    pub fn redirect_blobs(&self, enabled: bool) {
        self.shared.state().redirect_blobs = enabled;
    }

    /// `true`: close the main listener and cut its connections, so new connections are
    /// refused. `false`: listen again on the same port.
    pub fn set_down(&self, down: bool) -> std::io::Result<()> {
        let mut task = self.main_task.lock().unwrap_or_else(|p| p.into_inner());
        if down {
            if let Some(task) = task.take() {
                task.abort();
            }
            return Ok(());
        }
        if task.is_none() {
            let std_listener = std::net::TcpListener::bind(self.shared.main_addr)?;
            std_listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(std_listener)?;
            *task = Some(tokio::spawn(serve(
                listener,
                self.shared.clone(),
                Listener::Main,
            )));
        }
        Ok(())
    }

    /// Require bearer tokens from the proxy's token service for every `/v2/` request.
    pub fn require_auth(&self, auth: ProxyAuth) {
        self.shared.state().auth = Some(auth);
    }

    /// Invalidate every token issued so far: the next request with one gets a 401.
    pub fn expire_tokens(&self) {
        self.shared.state().tokens.clear();
    }

    /// How many tokens the token service has issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_issued.load(Ordering::SeqCst)
    }

    /// Every request seen since start or the last [`clear_requests`](Self::clear_requests).
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared.state().log.clone()
    }

    /// Forget the requests seen so far.
    pub fn clear_requests(&self) {
        self.shared.state().log.clear();
    }

    /// How many times each `(listener, method, path, range)` was requested.
    pub fn request_counts(&self) -> HashMap<RequestKey, usize> {
        let mut counts = HashMap::new();
        for r in self.shared.state().log.iter() {
            *counts
                .entry((
                    r.listener,
                    r.method.clone(),
                    r.path.clone(),
                    r.range.clone(),
                ))
                .or_insert(0) += 1;
        }
        counts
    }

    /// How many recorded requests satisfy `predicate`.
    pub fn count(&self, predicate: impl Fn(&ProxiedRequest) -> bool) -> usize {
        self.shared
            .state()
            .log
            .iter()
            .filter(|r| predicate(r))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self
            .main_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        self.redirect_task.abort();
    }
}

/// Accepts connections until aborted; aborting drops the listener and, with the
/// `JoinSet`, every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>, which: Listener) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, which, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    which: Listener,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let range = request
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let authorization = request.headers().contains_key(AUTHORIZATION);

    let response = respond(&shared, which, &method, &path, request).await;

    shared.state().log.push(ProxiedRequest {
        listener: which,
        method: method.to_string(),
        path,
        range,
        authorization,
        status: response.status().as_u16(),
    });
    response
}

async fn respond(
    shared: &Arc<Shared>,
    which: Listener,
    method: &Method,
    path: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    if which == Listener::Main && path.starts_with("/token") {
        return token_service(shared, request).await;
    }
    let (fault, redirect, auth_required) = {
        let mut state = shared.state();
        let fault = match which {
            Listener::Main => state.fault.take(method, path),
            Listener::Redirect => state.redirect_fault.take(method, path),
        };
        let redirect = which == Listener::Main
            && state.redirect_blobs
            && method == Method::GET
            && is_blob_path(path);
        (
            fault,
            redirect,
            which == Listener::Main && state.auth.is_some(),
        )
    };
    if auth_required && path.starts_with("/v2") && !token_is_valid(shared, &request) {
        return unauthorized(shared);
    }
    match &fault {
        Fault::Status(code) => return error_response(*code, "injected by the fault proxy"),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut response = error_response(429, "too many requests (injected)");
            if let Ok(value) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
            return response;
        }
        Fault::Latency(delay) => tokio::time::sleep(*delay).await,
        _ => {}
    }
    if redirect {
        let location = format!("http://{}{path}", shared.redirect_addr);
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(LOCATION, value);
        }
        return response;
    }
    let strip_authorization = auth_required || which == Listener::Redirect;
    match forward(shared, request, strip_authorization).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = FaultyBody::new(body, fault);
            Response::from_parts(parts, UnsyncBoxBody::new(body))
        }
        Err(e) => error_response(502, &format!("upstream unreachable: {e}")),
    }
}

async fn forward(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    strip_authorization: bool,
) -> Result<Response<Incoming>, BoxError> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!("http://{}{path}", shared.upstream).parse()?;
    remove_hop_by_hop(&mut parts.headers);
    if strip_authorization {
        parts.headers.remove(AUTHORIZATION);
    }
    if !parts.headers.contains_key(HOST) {
        parts
            .headers
            .insert(HOST, HeaderValue::from_str(&shared.main_addr.to_string())?);
    }
    let body = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
    let mut response = shared
        .client
        .request(Request::from_parts(parts, body))
        .await?;
    remove_hop_by_hop(response.headers_mut());
    // The registry builds Locations from the Host header; rewrite any that still point
    // at the upstream.
    if let Some(location) = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        let upstream = format!("http://{}", shared.upstream);
        if let Some(rest) = location.strip_prefix(&upstream) {
            let rewritten = format!("http://{}{rest}", shared.main_addr);
            if let Ok(value) = HeaderValue::from_str(&rewritten) {
                response.headers_mut().insert(LOCATION, value);
            }
        }
    }
    Ok(response)
}

fn remove_hop_by_hop(headers: &mut hyper::HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
    ] {
        headers.remove(name);
    }
}

/// `GET /token` (Basic credentials) or `POST /token` (`refresh_token` form).
async fn token_service(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let Some(auth) = shared.state().auth.clone() else {
        return error_response(404, "the proxy does not require auth");
    };
    let accepted = if request.method() == Method::POST {
        let body = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return error_response(400, "unreadable token request"),
        };
        let form = String::from_utf8_lossy(&body).into_owned();
        let field = |name: &str| {
            form.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key == name).then(|| percent_decode(value))
            })
        };
        field("grant_type").as_deref() == Some("refresh_token")
            && auth.identity_token.is_some()
            && field("refresh_token") == auth.identity_token
    } else {
        let header = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        match &auth.basic {
            Some((user, password)) => {
                header
                    == format!(
                        "Basic {}",
                        base64_encode(format!("{user}:{password}").as_bytes())
                    )
            }
            None => false,
        }
    };
    if !accepted {
        return error_response(401, "bad credentials for the token service");
    }
    let serial = shared.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let token = format!("faultproxy-token-{serial}-{nanos:08x}");
    shared
        .state()
        .tokens
        .insert(token.clone(), auth.token_max_uses);
    let body = format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#);
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn token_is_valid(shared: &Arc<Shared>, request: &Request<Incoming>) -> bool {
    let Some(token) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let mut state = shared.state();
    match state.tokens.get_mut(token) {
        None => false,
        Some(None) => true,
        Some(Some(0)) => {
            state.tokens.remove(token);
            false
        }
        Some(Some(uses)) => {
            *uses -= 1;
            true
        }
    }
}

fn unauthorized(shared: &Arc<Shared>) -> Response<ProxyBody> {
    let mut response = error_response(401, "authentication required");
    let challenge = format!(
        r#"Bearer realm="http://{}/token",service="fault-proxy""#,
        shared.main_addr
    );
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
}

fn error_response(status: u16, message: &str) -> Response<ProxyBody> {
    let code = match status {
        401 => "UNAUTHORIZED",
        404 => "NOT_FOUND",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#);
    let mut response = Response::new(full(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn full(body: String) -> ProxyBody {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn is_blob_path(path: &str) -> bool {
    path.starts_with("/v2/") && path.contains("/blobs/sha256:")
}

/// The upstream body with a body fault applied.
struct FaultyBody {
    inner: Incoming,
    fault: Fault,
    /// Body bytes passed on so far.
    sent: u64,
    done: bool,
}

impl FaultyBody {
    fn new(inner: Incoming, fault: Fault) -> Self {
        FaultyBody {
            inner,
            fault,
            sent: 0,
            done: false,
        }
    }
}

impl Body for FaultyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return match this.fault {
                // Never wakes again: the client sees a body that stops.
                Fault::StallBody { .. } => Poll::Pending,
                _ => Poll::Ready(Some(Err("connection dropped by the fault proxy".into()))),
            };
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        let start = this.sent;
        let end = start + data.len() as u64;
        match this.fault {
            Fault::FlipByte { offset } if (start..end).contains(&offset) => {
                let mut bytes = data.to_vec();
                bytes[(offset - start) as usize] ^= 0xff;
                data = Bytes::from(bytes);
            }
            Fault::StallBody { after_bytes } | Fault::TruncateBody { after_bytes }
                if end >= after_bytes =>
            {
                data.truncate(after_bytes.saturating_sub(start) as usize);
                this.done = true;
            }
            _ => {}
        }
        this.sent = end;
        if data.is_empty() && this.done {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_encode(b"alice:pa:ss"), "YWxpY2U6cGE6c3M=");
        assert_eq!(base64_encode(b"u:p"), "dTpw");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b""), "");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Bb+c"), "a+b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn fault_scope_and_times() {
        let mut fault = ActiveFault {
            fault: Fault::Status(503),
            scope: Scope::Blobs,
            remaining: Some(1),
        };
        assert_eq!(
            fault.take(&Method::GET, "/v2/a/manifests/latest"),
            Fault::PassThrough
        );
        assert_eq!(
            fault.take(&Method::POST, "/v2/a/blobs/uploads/"),
            Fault::PassThrough
        );
        assert_eq!(
            fault.take(&Method::GET, "/v2/a/blobs/sha256:00"),
            Fault::Status(503)
        );
        assert_eq!(
            fault.take(&Method::GET, "/v2/a/blobs/sha256:00"),
            Fault::PassThrough
        );
    }
}
