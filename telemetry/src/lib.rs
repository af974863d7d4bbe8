//! # stoker-telemetry
//!
//! Exports the metrics that the node-side crates (fetch, cache, lazyfs, agent)
//! record on the global OpenTelemetry meter `"stoker"`, in Prometheus text
//! format on `/metrics`, with `/healthz` beside it. `stoker mount
//! --metrics-addr` and `stoker-agent` call [`install`] once at start, before
//! any instrument is created, then [`Exporter::serve`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::Encoder as _;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the Prometheus exporter: {0}")]
    Exporter(String),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The Prometheus registry behind the global meter provider.
pub struct Exporter {
    registry: prometheus::Registry,
    _provider: SdkMeterProvider,
}

/// Installs a global meter provider whose instruments are exported through the
/// returned [`Exporter`].
pub fn install() -> Result<Arc<Exporter>, TelemetryError> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Ok(Arc::new(Exporter {
        registry,
        _provider: provider,
    }))
}

impl Exporter {
    /// The current metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out)
        {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Serves `/metrics` and `/healthz` on `addr` until the returned task is
    /// aborted. Returns the bound address (useful with port 0).
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), TelemetryError> {
        serve_routes(addr, move |path| match path {
            "/metrics" => (StatusCode::OK, self.encode()),
            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        })
        .await
    }
}

/// Serves plain-text HTTP/1.1 endpoints on `addr` until the returned task is
/// aborted: `route(path)` gives each request's status and body. Returns the
/// bound address (useful with port 0). The metrics endpoints of the node side
/// ([`Exporter::serve`]) and of the controller use it.
pub async fn serve_routes(
    addr: SocketAddr,
    route: impl Fn(&str) -> (StatusCode, String) + Send + Sync + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Listen { addr, source })?;
    let route = Arc::new(route);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let route = Arc::clone(&route);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let (status, body) = route(request.uri().path());
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%error, "metrics connection");
                }
            });
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn global_instruments_show_up_on_the_endpoint() {
        let exporter = install().unwrap();
        let counter = opentelemetry::global::meter("stoker")
            .u64_counter("stoker_test_events")
            .build();
        counter.add(3, &[]);
        let (addr, task) = exporter
            .serve("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let body = get(addr, "/metrics").await;
        assert!(body.contains("stoker_test_events_total 3"), "{body}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        task.abort();
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
}
