//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the
//! process serves) and `/readyz` (listeners bound, not draining, backend
//! reachable — probed at most every few seconds, so a scrape storm never
//! becomes a backend storm). Never exposes configuration or secrets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::backend::SharedBackend;
use crate::telemetry::Metrics;

const PROBE_CACHE: Duration = Duration::from_secs(5);

/// Readiness as the server sees it.
pub struct Health {
    listening: AtomicBool,
    draining: AtomicBool,
    backend: SharedBackend,
    last_probe: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    pub fn new(backend: SharedBackend) -> Arc<Self> {
        Arc::new(Health {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            backend,
            last_probe: Mutex::new(None),
        })
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready; otherwise why not.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err("listeners not bound".into());
        }
        if self.is_draining() {
            return Err("draining".into());
        }
        let mut last = self.last_probe.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < PROBE_CACHE
        {
            return result.clone();
        }
        let result = match tokio::time::timeout(Duration::from_secs(3), self.backend.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("backend: {e}")),
            Err(_) => Err("backend probe timed out".into()),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub struct AdminServer {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    pub async fn start(address: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {address} (admin): {e}")))?;
        let address = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(AdminState { metrics, health });
        tracing::info!(%address, "admin listener");
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "admin listener failed");
            }
        });
        Ok(AdminServer { address, task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn metrics_page(State(state): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
