//! Listeners, the accept loop, connection limits and graceful shutdown.
//!
//! `Server::start` binds every listener (failing fast if one cannot be bound)
//! and spawns the accept loops; `RunningServer::shutdown` stops accepting,
//! gives sessions the grace period, then ends the rest with
//! `-ERR [SYS/TEMP]` — and a session ended that way commits no deletions.

pub mod connection;
pub mod limits;
pub mod policy;
pub mod stream;
pub mod throttle;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::backend::imap::ImapBackend;
use crate::backend::memory::{MemoryBackend, MemoryStore};
use crate::backend::sizes::ExactSizes;
use crate::backend::{BackendError, SharedBackend};
use crate::config::{BackendConfig, Config, Limits};

/// What every connection shares.
pub struct Context {
    pub limits: Limits,
    pub backend: SharedBackend,
    pub sizes: ExactSizes,
    /// Turns true when the grace period is over: sessions must end now.
    pub stop: watch::Receiver<bool>,
}

pub fn build_backend(config: &BackendConfig) -> Result<SharedBackend, BackendError> {
    Ok(match config {
        BackendConfig::Demo(demo) => {
            let store = MemoryStore::from_config(demo)
                .map_err(|e| BackendError::Permanent(format!("cannot load demo messages: {e}")))?;
            Arc::new(MemoryBackend::new(store))
        }
        BackendConfig::Imap(imap) => Arc::new(ImapBackend::new(imap.clone())?),
    })
}

pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    draining: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grace: Duration,
}

pub struct Server;

impl Server {
    /// Binds every listener and starts serving.
    pub async fn start(config: &Config, backend: SharedBackend) -> std::io::Result<RunningServer> {
        let mut listeners = Vec::new();
        for l in &config.listener {
            let listener = TcpListener::bind(l.address)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.address)))?;
            listeners.push(listener);
        }
        let (draining, _) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let context = Arc::new(Context {
            limits: config.limits.clone(),
            backend,
            sizes: ExactSizes::new(config.limits.size_cache_entries),
            stop: stop_rx,
        });
        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        for listener in listeners {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, backend = context.backend.kind(), "listening");
            addrs.push(addr);
            tasks.spawn(accept_loop(listener, context.clone(), permits.clone(), draining.subscribe()));
        }
        Ok(RunningServer {
            addrs,
            draining,
            stop,
            tasks,
            grace: Duration::from_secs(config.limits.shutdown_grace_secs),
        })
    }
}

impl RunningServer {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting, waits up to the grace period for sessions, then ends
    /// those still open.
    pub async fn shutdown(mut self) {
        let _ = self.draining.send(true);
        let grace = self.grace;
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::info!("grace period over; ending remaining sessions");
            let _ = self.stop.send(true);
            if tokio::time::timeout(Duration::from_secs(5), async { while self.tasks.join_next().await.is_some() {} })
                .await
                .is_err()
            {
                self.tasks.abort_all();
            }
        }
        tracing::info!("shut down");
    }
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<Context>,
    permits: Arc<Semaphore>,
    mut draining: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let permit = permits.clone().try_acquire_owned().ok();
        let context = context.clone();
        sessions.spawn(async move {
            match permit {
                Some(permit) => {
                    connection::serve(socket, peer, context).await;
                    drop(permit);
                }
                None => connection::refuse_busy(socket, peer).await,
            }
        });
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}
