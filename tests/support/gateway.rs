//! popgate under test: in-process (`Gateway`, its own tokio runtime on its
//! own thread, so tests stay plain blocking code) or as the real binary
//! (`GatewayProcess`, for the CLI and signals).

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use popgate::auth::accounts::{PassThrough, Router};
use popgate::backend::SharedBackend;
use popgate::backend::demo::{DemoBackend, DemoStore};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::server::Server;
use popgate::server::config::Limits;
use tokio::sync::oneshot;

use super::pop3::Pop3;
use super::{IO_TIMEOUT, Signal, free_port, send_signal};

enum Stop {
    /// `RunningServer::shutdown`: stop accepting, grace period, then end
    /// sessions.
    Graceful,
    /// Drop everything now (test teardown).
    Abort,
}

/// What a test can ask of a running in-process gateway.
enum Control {
    /// `RunningServer::reload_certificates` (what SIGHUP does to them).
    ReloadCertificates(std::sync::mpsc::Sender<Result<(), String>>),
}

/// popgate running in this process on 127.0.0.1 and a kernel-chosen port.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<Stop>>,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Over a `DemoStore` the test keeps a handle to, default limits.
    pub fn memory(store: &DemoStore) -> Gateway {
        Gateway::memory_with(store, |_| {})
    }

    /// Over a `DemoStore`, with limits adjusted by `limits`.
    pub fn memory_with(store: &DemoStore, limits: impl FnOnce(&mut Limits)) -> Gateway {
        let mut config = Config::default();
        limits(&mut config.limits);
        Gateway::start(config, std::sync::Arc::new(DemoBackend::new(store.clone())))
    }

    /// Over a backend URL (`imap://127.0.0.1:PORT`, `demo:`), default limits.
    pub fn url(backend_url: &str) -> Gateway {
        Gateway::url_with(backend_url, |_| {})
    }

    pub fn url_with(backend_url: &str, limits: impl FnOnce(&mut Limits)) -> Gateway {
        let mut config = Config {
            backend: BackendConfig::from_url(backend_url).unwrap_or_else(|e| panic!("{e}")),
            ..Config::default()
        };
        limits(&mut config.limits);
        Gateway::from_config(config)
    }

    /// From a whole configuration; its first listener moves to 127.0.0.1:0
    /// and the others are dropped.
    pub fn from_config(config: Config) -> Gateway {
        let backend = config.backend.build().unwrap_or_else(|e| panic!("building the backend: {e}"));
        Gateway::start(config, backend)
    }

    pub fn start(config: Config, backend: SharedBackend) -> Gateway {
        Gateway::routed(config, std::sync::Arc::new(PassThrough::new(backend)))
    }

    /// With logins routed by `router` (mapped accounts, OAuth tokens).
    pub fn routed(config: Config, router: std::sync::Arc<dyn Router>) -> Gateway {
        Gateway::routed_with_hook(config, router, || {})
    }

    /// Like `routed`; `on_thread_start` runs on the gateway's thread and on
    /// every thread of its runtime (the battery marks them to count only
    /// popgate's allocations).
    pub fn routed_with_hook(mut config: Config, router: std::sync::Arc<dyn Router>, on_thread_start: fn()) -> Gateway {
        init_logging();
        // Keep the first listener's policy; only its address changes.
        config.listener.truncate(1);
        config.listener.first_mut().expect("a listener in the test configuration").address =
            "127.0.0.1:0".parse().unwrap();
        config.check().unwrap_or_else(|e| panic!("test configuration: {e}"));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let (control_tx, mut control_rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("popgate-under-test".into())
            .spawn(move || {
                on_thread_start();
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .on_thread_start(on_thread_start)
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let server =
                        match Server::start(&config, router, std::sync::Arc::new(popgate::telemetry::Metrics::new()))
                            .await
                        {
                            Ok(server) => server,
                            Err(e) => {
                                let _ = addr_tx.send(Err(e.to_string()));
                                return;
                            }
                        };
                    let _ = addr_tx.send(Ok(server.local_addrs()[0]));
                    let stop = loop {
                        tokio::select! {
                            stop = &mut stop_rx => break stop,
                            Some(control) = control_rx.recv() => match control {
                                Control::ReloadCertificates(reply) => {
                                    let _ = reply.send(server.reload_certificates().map_err(|e| e.to_string()));
                                }
                            },
                        }
                    };
                    match stop {
                        Ok(Stop::Graceful) => server.shutdown().await,
                        Ok(Stop::Abort) | Err(_) => drop(server),
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
        Gateway { addr, stop: Some(stop_tx), control: control_tx, thread: Some(thread) }
    }

    /// Re-reads the certificate files now, as SIGHUP does.
    pub fn reload_certificates(&self) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.control.send(Control::ReloadCertificates(tx)).expect("gateway running");
        rx.recv_timeout(IO_TIMEOUT).expect("reload_certificates answered")
    }

    pub fn connect(&self) -> Pop3 {
        Pop3::connect(self.addr)
    }

    pub fn login(&self, user: &str, password: &str) -> Pop3 {
        Pop3::login(self.addr, user, password)
    }

    /// Graceful shutdown; returns once every session has ended. Panics if
    /// that takes longer than `limit`.
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

impl Drop for Gateway {
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

/// Logs of the gateway under test, shown with a failing test's output.
/// `RUST_LOG` chooses the level (default: popgate=debug).
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("popgate=debug"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// The `popgate` binary, serving on 127.0.0.1 and a port chosen at run time.
pub struct GatewayProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Every listener's address (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    /// The admin HTTP listener (/metrics, /healthz, /readyz).
    pub admin_addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// `popgate serve --listen 127.0.0.1:PORT --admin 127.0.0.1:PORT2 ARGS…`,
    /// once it answers (the admin default, a fixed port, would clash between
    /// tests running in parallel).
    pub fn start(args: &[&str]) -> GatewayProcess {
        let mut dir = tempfile::Builder::new().prefix("popgate-bin-").tempdir().expect("tempdir");
        for _attempt in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = fs::File::create(dir.path().join("popgate.log")).expect("log file");
            let child = Command::new(env!("CARGO_BIN_EXE_popgate"))
                .arg("serve")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--admin")
                .arg(admin_addr.to_string())
                .args(args)
                .env("RUST_LOG", "popgate=debug")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .expect("run popgate");
            let mut process = GatewayProcess { child: Some(child), addr, addrs: vec![addr], admin_addr, dir };
            match process.wait_until_ready() {
                Ok(()) => return process,
                Err(log) if log.contains("cannot listen") => {
                    dir = process.take_dir();
                    continue;
                }
                Err(log) => panic!("popgate did not start:\n{log}"),
            }
        }
        panic!(
            "popgate: no free port after 5 attempts:\n{}",
            std::fs::read_to_string(dir.path().join("popgate.log")).unwrap_or_default()
        );
    }

    /// `popgate serve --config FILE --admin 127.0.0.1:PORT`, where FILE holds
    /// `config(addrs)` for `listeners` addresses on 127.0.0.1 chosen at run
    /// time (retried with others if one is taken). `RUST_LOG` is not
    /// inherited: the configuration's `[log]` decides, unless `env` sets it.
    pub fn start_with_config(
        listeners: usize,
        env: &[(&str, &str)],
        config: impl Fn(&[SocketAddr]) -> String,
    ) -> GatewayProcess {
        assert!(listeners > 0);
        let mut dir = tempfile::Builder::new().prefix("popgate-bin-").tempdir().expect("tempdir");
        for _attempt in 0..5 {
            let addrs: Vec<SocketAddr> =
                (0..listeners).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
            let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config_path = dir.path().join("popgate.toml");
            fs::write(&config_path, config(&addrs)).expect("write popgate.toml");
            let log = fs::File::create(dir.path().join("popgate.log")).expect("log file");
            let child = Command::new(env!("CARGO_BIN_EXE_popgate"))
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .arg("--admin")
                .arg(admin_addr.to_string())
                .env_remove("RUST_LOG")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .expect("run popgate");
            let mut process = GatewayProcess { child: Some(child), addr: addrs[0], addrs, admin_addr, dir };
            match process.wait_until_ready() {
                Ok(()) => return process,
                Err(log) if log.contains("cannot listen") => {
                    dir = process.take_dir();
                    continue;
                }
                Err(log) => panic!("popgate did not start:\n{log}"),
            }
        }
        panic!(
            "popgate: no free port after 5 attempts:\n{}",
            std::fs::read_to_string(dir.path().join("popgate.log")).unwrap_or_default()
        );
    }

    /// SIGHUP: re-read the configuration and the certificates.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {}", self.pid());
    }

    /// Resident memory of the process (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                return Err(format!("popgate exited ({status}):\n{}", self.log()));
            }
            if let Ok(stream) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) {
                drop(stream);
                // The admin listener is bound just after the POP3 ones: give
                // it a moment, so that a test's first /readyz is not refused
                // on a loaded machine (it may be disabled: then go on).
                let admin_deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < admin_deadline
                    && std::net::TcpStream::connect_timeout(&self.admin_addr, Duration::from_secs(1)).is_err()
                {
                    std::thread::sleep(Duration::from_millis(25));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("popgate did not listen on {} within {IO_TIMEOUT:?}:\n{}", self.addr, self.log());
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn terminate(&self) {
        assert!(send_signal(self.pid(), Signal::Term), "SIGTERM to popgate");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "popgate still running after {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("popgate.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
