//! popgate in-process for the battery, as `support::gateway::Gateway` runs
//! it (its own tokio runtime on its own thread, on 127.0.0.1 and a
//! kernel-chosen port), with two differences: logins go through the
//! fixture's `Router` (pass-through, or OAuth tokens for the HTTP APIs), and
//! every thread of its runtime is marked for `memory_use`, so that only
//! popgate's allocations are counted — not the test client's, nor those of
//! a store that lives in the test process.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use popgate::auth::accounts::Router;
use popgate::config::Config;
use popgate::server::Server;
use tokio::sync::oneshot;

use crate::memory_use;
use crate::support::IO_TIMEOUT;
use crate::support::pop3::Pop3;

enum Stop {
    /// Stop accepting, let sessions finish, then end them.
    Graceful,
    /// Drop everything now.
    Abort,
}

pub struct Popgate {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Popgate {
    /// Serves `config` (its first listener, moved to 127.0.0.1:0) with
    /// logins routed by `router`.
    pub fn start(mut config: Config, router: Arc<dyn Router>) -> Popgate {
        init_logging();
        config.listener.truncate(1);
        config.listener.first_mut().expect("a listener in the configuration").address = "127.0.0.1:0".parse().unwrap();
        config.check().unwrap_or_else(|e| panic!("test configuration: {e}"));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("popgate-under-test".into())
            .spawn(move || {
                memory_use::count_this_thread();
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .on_thread_start(memory_use::count_this_thread)
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let server = match Server::start_with_router(&config, router).await {
                        Ok(server) => server,
                        Err(e) => {
                            let _ = addr_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = addr_tx.send(Ok(server.local_addrs()[0]));
                    match stop_rx.await {
                        Ok(Stop::Graceful) => server.shutdown().await,
                        Ok(Stop::Abort) | Err(_) => drop(server),
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn popgate's thread");
        let addr = match addr_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("popgate did not start: {e}"),
            Err(e) => panic!("popgate did not start within {IO_TIMEOUT:?}: {e}"),
        };
        Popgate { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn connect(&self) -> Pop3 {
        Pop3::connect(self.addr)
    }

    pub fn login(&self, user: &str, password: &str) -> Pop3 {
        Pop3::login(self.addr, user, password)
    }

    /// Graceful shutdown; returns once every session has ended, or panics
    /// after `limit`.
    pub fn shutdown(mut self, limit: Duration) {
        self.finish(Stop::Graceful, limit);
    }

    fn finish(&mut self, how: Stop, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + limit;
            while !thread.is_finished() {
                assert!(Instant::now() < deadline, "popgate did not shut down within {limit:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for Popgate {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(Stop::Abort);
            }
            return;
        }
        self.finish(Stop::Abort, IO_TIMEOUT);
    }
}

/// popgate's logs, shown with a failing test's output. `RUST_LOG` chooses
/// the level (default: popgate=debug).
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("popgate=debug"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}
