//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the
//! process serves; the body also says how the last backend probe went) and
//! `/readyz` ("this process can take POP3 connections": listeners bound and
//! not draining — nothing else). Backend health never touches readiness: a
//! provider's blip must leave pods in the Service, where clients get
//! `-ERR [SYS/TEMP]`, rather than take every pod out and have devices see
//! "connection refused". It is probed when `/metrics` or `/healthz` is
//! asked for, at most once per `BACKEND_PROBE_EVERY` whatever the scrape
//! rate (a scrape storm never becomes a backend storm, and a gateway nobody
//! watches sends the backend nothing of its own), into
//! `popgate_backend_up` and `/healthz`.
//!
//! Beside them, the admin page at `/` (`page.rs`): overview, accounts,
//! devices and their changes, behind `guard.rs`. The probes and metrics
//! stay unauthenticated, as monitoring expects them.
//! Never exposes configuration or secrets.

pub mod chart;
pub mod connect;
pub mod guard;
pub mod page;
pub mod views;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::backend::SharedBackend;
use crate::telemetry::Metrics;

/// The backend is probed at most this often (`popgate_backend_up`,
/// `/healthz`).
pub const BACKEND_PROBE_EVERY: Duration = Duration::from_secs(15);
/// A probe that takes longer counts as a failure.
const BACKEND_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The last backend probe: when, and its result.
struct Probe {
    at: Instant,
    result: Result<(), String>,
}

/// Readiness and backend health as the server sees them.
pub struct Health {
    listening: AtomicBool,
    draining: AtomicBool,
    backend: SharedBackend,
    last_probe: Mutex<Option<Probe>>,
    /// Held while a probe runs: concurrent scrapes wait for it, not probe.
    probing: tokio::sync::Mutex<()>,
}

impl Health {
    pub fn new(backend: SharedBackend) -> Arc<Self> {
        Arc::new(Health {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            backend,
            last_probe: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
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

    /// `Ok` when this process can take POP3 connections; otherwise why not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err("listeners not bound");
        }
        if self.is_draining() {
            return Err("draining");
        }
        Ok(())
    }

    /// Probes the backend once, records the result (metric and `/healthz`).
    pub async fn probe_backend(&self, metrics: &Metrics) {
        let kind = self.backend.kind();
        let result = match tokio::time::timeout(BACKEND_PROBE_TIMEOUT, self.backend.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                metrics.backend_error(kind, crate::server::login::error_class(&e));
                Err(e.to_string())
            }
            Err(_) => {
                metrics.backend_error(kind, "unavailable");
                Err(format!("no answer within {} s", BACKEND_PROBE_TIMEOUT.as_secs()))
            }
        };
        metrics.backend_probed(kind, result.is_ok());
        let mut last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
        let was_up = last.as_ref().map(|p| p.result.is_ok());
        match (&result, was_up) {
            (Err(e), Some(true) | None) => tracing::warn!(backend = kind, error = %e, "backend probe failed"),
            (Ok(()), Some(false)) => tracing::info!(backend = kind, "backend reachable again"),
            _ => {}
        }
        *last = Some(Probe { at: Instant::now(), result });
    }

    /// Probes the backend unless the last probe is recent enough.
    pub async fn probe_backend_if_due(&self, metrics: &Metrics) {
        let _probing = self.probing.lock().await;
        let due = {
            let last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
            last.as_ref().is_none_or(|p| p.at.elapsed() >= BACKEND_PROBE_EVERY)
        };
        if due {
            self.probe_backend(metrics).await;
        }
    }

    /// The backend's last probe, in a line.
    pub fn backend_summary(&self) -> String {
        let kind = self.backend.kind();
        let last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
        match last.as_ref() {
            None => format!("backend {kind}: not probed yet"),
            Some(Probe { at, result: Ok(()) }) => {
                format!("backend {kind}: reachable (probed {} s ago)", at.elapsed().as_secs())
            }
            Some(Probe { at, result: Err(e) }) => {
                format!("backend {kind}: UNREACHABLE (probed {} s ago): {e}", at.elapsed().as_secs())
            }
        }
    }

    /// The `/healthz` body: liveness, and the backend's last probe.
    fn detail(&self) -> String {
        let backend = self.backend_summary();
        let ready = match self.ready() {
            Ok(()) => "ready".to_string(),
            Err(why) => format!("not ready: {why}"),
        };
        format!("ok\n{ready}\n{backend}\n")
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
        AdminServer::start_with_page(address, metrics, health, None).await
    }

    /// The probes and metrics, and the admin page at `/` when `page` is
    /// given.
    pub async fn start_with_page(
        address: SocketAddr,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        page: Option<Arc<page::Page>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {address} (admin): {e}")))?;
        let address = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(AdminState { metrics, health });
        let app = match page {
            Some(page) => app.merge(page::routes(page)),
            None => app,
        };
        tracing::info!(%address, "admin listener");
        let task = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
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
    state.health.probe_backend_if_due(&state.metrics).await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Always 200 while the process serves HTTP (liveness must not restart a
/// pod because a provider is down); the body carries the detail.
async fn healthz(State(state): State<AdminState>) -> impl IntoResponse {
    state.health.probe_backend_if_due(&state.metrics).await;
    state.health.detail()
}
