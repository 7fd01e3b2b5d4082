//! Mapped accounts for the HTTP API backends, in miniature: a `Router` that
//! checks a local POP3 password and hands the backend `Proof::Bearer`
//! access tokens it gets from a test-controlled token source — and a fresh
//! one when `refresh` is asked (what an OAuth refresh-token flow does) —
//! plus popgate in-process with that router (`RoutedGateway`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use popgate::auth::accounts::{Route, Router};
use popgate::auth::{Credentials, Proof, Secret};
use popgate::backend::{BackendError, SharedBackend};
use popgate::config::Config;
use popgate::server::Server;
use tokio::sync::oneshot;

use super::IO_TIMEOUT;
use super::pop3::Pop3;

/// Where fresh access tokens come from: `Err` is a failed refresh (say, a
/// revoked refresh token).
pub type TokenSource = dyn Fn() -> Result<String, String> + Send + Sync;

pub struct TokenRouter {
    backend: SharedBackend,
    /// The POP3 user and password the device logs in with.
    local: (String, String),
    /// The backend account the tokens are for.
    account: String,
    current: Mutex<String>,
    source: Arc<TokenSource>,
    refreshes: AtomicUsize,
}

impl TokenRouter {
    pub fn new(
        backend: SharedBackend,
        local: (&str, &str),
        account: &str,
        first_token: String,
        source: Arc<TokenSource>,
    ) -> Arc<TokenRouter> {
        Arc::new(TokenRouter {
            backend,
            local: (local.0.to_string(), local.1.to_string()),
            account: account.to_string(),
            current: Mutex::new(first_token),
            source,
            refreshes: AtomicUsize::new(0),
        })
    }

    /// How many times the gateway asked for a fresh token.
    pub fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::SeqCst)
    }

    fn credentials(&self) -> Credentials {
        let token = self.current.lock().unwrap().clone();
        Credentials { user: self.account.clone(), proof: Proof::Bearer(Secret::new(token)) }
    }
}

#[async_trait]
impl Router for TokenRouter {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        let Proof::Password(password) = &client.proof else {
            return Err(BackendError::AuthFailed);
        };
        if client.user != self.local.0 || password.expose() != self.local.1 {
            return Err(BackendError::AuthFailed);
        }
        Ok(Route { backend: self.backend.clone(), credentials: self.credentials(), account: self.account.clone() })
    }

    async fn refresh(&self, _route: &Route) -> Result<Option<Credentials>, BackendError> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        let fresh = (self.source)().map_err(|why| BackendError::Unavailable(format!("token refresh failed: {why}")))?;
        *self.current.lock().unwrap() = fresh;
        Ok(Some(self.credentials()))
    }

    fn accepts_bearer_tokens(&self) -> bool {
        false
    }

    fn primary_backend(&self) -> SharedBackend {
        self.backend.clone()
    }
}

/// popgate in-process, routing logins through `router`, on 127.0.0.1 and a
/// kernel-chosen port. Dropping it stops it.
pub struct RoutedGateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RoutedGateway {
    pub fn start(mut config: Config, router: Arc<dyn Router>) -> RoutedGateway {
        config.listener.truncate(1);
        config.listener.first_mut().expect("a listener").address = "127.0.0.1:0".parse().unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("popgate-routed".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    match Server::start_with_router(&config, router).await {
                        Ok(server) => {
                            let _ = addr_tx.send(Ok(server.local_addrs()[0]));
                            let _ = stop_rx.await;
                            drop(server);
                        }
                        Err(e) => {
                            let _ = addr_tx.send(Err(e.to_string()));
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn the gateway thread");
        let addr = match addr_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("popgate did not start: {e}"),
            Err(e) => panic!("popgate did not start within {IO_TIMEOUT:?}: {e}"),
        };
        RoutedGateway { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn login(&self, user: &str, password: &str) -> Pop3 {
        Pop3::login(self.addr, user, password)
    }

    pub fn connect(&self) -> Pop3 {
        Pop3::connect(self.addr)
    }
}

impl Drop for RoutedGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + IO_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() && !std::thread::panicking() {
                let _ = thread.join();
            }
        }
    }
}
