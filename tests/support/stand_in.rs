//! What the HTTP API stand-ins (`gmail_api`, `graph_api`) share: injected
//! the HTTP server on its own thread, injected throttling, and the record
//! of every request they saw.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::IO_TIMEOUT;

/// An injected failure for the next request whose path and query contain
/// `path_contains`.
#[derive(Debug, Clone)]
pub struct Throttle {
    pub path_contains: String,
    /// Gmail: 429 (`rateLimitExceeded`) or 403 (`userRateLimitExceeded`);
    /// Graph: 429 (`ApplicationThrottled`), 503 (`ServiceUnavailable`) or
    /// 504 (a gateway timeout).
    pub status: u16,
    pub retry_after: Option<u64>,
    /// Applies to an inner request of a batch instead of a top-level one.
    pub in_batch: bool,
}

/// A request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub at: Instant,
    pub status: u16,
    /// It carried `Prefer: IdType="ImmutableId"` (Graph; false for Gmail).
    pub immutable_ids: bool,
    /// An inner request of a batch.
    pub in_batch: bool,
}

/// The gap between the first request answered `status` and the next one
/// whose path and query contain `path_part` (its retry).
pub fn gap_after(seen: &[Seen], status: u16, path_part: &str) -> Duration {
    let at = seen.iter().position(|r| r.status == status).expect("a throttled request");
    let retry = seen[at + 1..]
        .iter()
        .find(|r| format!("{}?{}", r.path, r.query).contains(path_part))
        .expect("a retry after the throttled request");
    retry.at.duration_since(seen[at].at)
}

/// An axum app served on 127.0.0.1 (a port chosen at run time) by a
/// runtime on a thread of its own; stopped on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `app`; `name` names the thread and the stand-in in errors.
    pub fn start(name: &str, app: axum::Router) -> HttpServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-stand-in"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    addr_tx.send(listener.local_addr().expect("addr")).expect("report address");
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn the stand-in");
        let addr = addr_rx.recv_timeout(IO_TIMEOUT).unwrap_or_else(|e| panic!("the {name} stand-in started: {e}"));
        HttpServer { addr, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + IO_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}
