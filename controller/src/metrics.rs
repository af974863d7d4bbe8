//! Metrics (OpenTelemetry instruments, exported in Prometheus text format)
//! and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.
//!
//! | metric | labels |
//! | --- | --- |
//! | `stoker_controller_reconciles_total` | `controller` |
//! | `stoker_controller_reconcile_errors_total` | `controller`, `error` ([`Error::metric_label`]) |
//! | `stoker_controller_reconcile_duration_seconds` (histogram) | `controller` |
//! | `stoker_controller_plans_learned_total` | — |
//! | `stoker_controller_pushes_total` | `result` (`warm`, `failed`, `no_agent`) |

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hyper::StatusCode;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::Error;

/// The controller's instruments and the registry they are exported from.
pub struct Metrics {
    registry: prometheus::Registry,
    _provider: SdkMeterProvider,
    reconciles: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
    plans_learned: Counter<u64>,
    pushes: Counter<u64>,
    /// Caches synced and this replica is leading (or standing by healthily).
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, Error> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| Error::Metrics(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("stoker-controller");
        Ok(Arc::new(Metrics {
            reconciles: meter
                .u64_counter("stoker_controller_reconciles")
                .with_description("Reconciles started")
                .build(),
            errors: meter
                .u64_counter("stoker_controller_reconcile_errors")
                .with_description("Reconciles that failed, by error kind")
                .build(),
            duration: meter
                .f64_histogram("stoker_controller_reconcile_duration")
                .with_unit("s")
                .with_description("Time to reconcile one object")
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0,
                ])
                .build(),
            plans_learned: meter
                .u64_counter("stoker_controller_plans_learned")
                .with_description("Startup traces merged into plans")
                .build(),
            pushes: meter
                .u64_counter("stoker_controller_pushes")
                .with_description("Plan pushes to agents that reached a final state")
                .build(),
            registry,
            _provider: provider,
            ready: AtomicBool::new(false),
        }))
    }

    /// Counts a reconcile and measures it until the timer is dropped.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .add(1, &[KeyValue::new("controller", controller)]);
        ReconcileTimer {
            metrics: self,
            controller,
            started: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &'static str, error: &Error) {
        self.errors.add(
            1,
            &[
                KeyValue::new("controller", controller),
                KeyValue::new("error", error.metric_label()),
            ],
        );
    }

    pub fn plan_learned(&self) {
        self.plans_learned.add(1, &[]);
    }

    pub fn push_finished(&self, result: &'static str) {
        self.pushes.add(1, &[KeyValue::new("result", result)]);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which
        // the exporter does not produce.
        if let Err(error) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out)
        {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is
    /// dropped. Returns the bound address.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
        stoker_telemetry::serve_routes(addr, move |path| match path {
            "/metrics" => (StatusCode::OK, self.encode()),
            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                (StatusCode::OK, "ready\n".to_string())
            }
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "caches not synced\n".to_string(),
            ),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        })
        .await
        .map_err(|e| Error::Metrics(e.to_string()))
    }
}

/// Records the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.record(
            self.started.elapsed().as_secs_f64(),
            &[KeyValue::new("controller", self.controller)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_exported_with_error_labels() {
        let metrics = Metrics::new().unwrap();
        drop(metrics.reconcile("imageprefetch"));
        metrics.reconcile_failed("imageprefetch", &Error::NoAgent("n1".into()));
        let text = metrics.encode();
        assert!(
            text.contains("stoker_controller_reconciles_total{controller=\"imageprefetch\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stoker_controller_reconcile_errors_total{controller=\"imageprefetch\",error=\"no_agent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stoker_controller_reconcile_duration_seconds_bucket"),
            "{text}"
        );
    }
}
