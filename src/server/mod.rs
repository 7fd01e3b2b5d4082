//! Listeners, the accept loop, connection limits and graceful shutdown.
//!
//! `Server::start` binds every listener (failing fast if one cannot be bound)
//! and spawns the accept loops; `RunningServer::shutdown` turns readiness
//! off, keeps accepting for `drain_delay_secs` (so load balancers catch up),
//! stops accepting, gives sessions the grace period, then ends the rest with
//! `-ERR [SYS/TEMP]` — and a session ended that way commits no deletions.

pub mod activity;
pub mod admin;
pub mod config;
pub mod connection;
pub mod limits;
pub mod login;
pub mod policy;
pub mod stream;
pub mod submission;
pub mod systemd;
pub mod throttle;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::accounts::Router;
use crate::backend::SharedBackend;
use crate::backend::pool::SessionPool;
use crate::backend::sizes::{ExactSizes, SizeStore};
use crate::config::Config;
use crate::state::SharedState;
use crate::telemetry::{Metrics, Refusal};
use admin::Health;
use config::Limits;
use limits::{ConnectionLimit, PerAddressLimit};
use policy::{ListenerTls, LoginPolicy};
use stream::ClientStream;
use throttle::LoginThrottle;
use tls::{CertificateStore, TlsError};

/// What every connection shares.
pub struct Context {
    limits: std::sync::RwLock<Arc<Limits>>,
    /// The configured backend (routes may reach others).
    pub backend: SharedBackend,
    /// Which backend account each login reaches.
    pub router: Arc<dyn Router>,
    pub sizes: ExactSizes,
    /// The TLS configuration of implicit-TLS and STLS connections, if any.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub throttle: LoginThrottle,
    pub metrics: Arc<Metrics>,
    /// Warm backend sessions between POP3 sessions of one account.
    pub pool: Arc<SessionPool>,
    /// Turns true when the grace period is over: sessions must end now.
    pub stop: watch::Receiver<bool>,
    /// Sessions committing deletions right now (UPDATE).
    pub updates: Arc<Updates>,
    /// Where submission listeners relay each account's messages.
    pub submission: Arc<submission::Relays>,
    /// What each device did last, for the admin page.
    pub activity: Arc<activity::Activity>,
}

/// Counts sessions inside UPDATE, so that shutdown lets them finish: a
/// session ended between IMAP's `UID STORE +FLAGS (\Deleted)` and its
/// `UID EXPUNGE` would leave flags set and the client without a reply.
#[derive(Default)]
pub struct Updates {
    running: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

/// Held while one session's UPDATE runs.
pub struct UpdateRunning(Arc<Updates>);

impl Updates {
    pub fn enter(self: &Arc<Self>) -> UpdateRunning {
        self.running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        UpdateRunning(self.clone())
    }

    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when no session is inside UPDATE.
    pub async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for UpdateRunning {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// After the grace period, sessions inside UPDATE get this long more to
/// finish (their backend calls have timeouts of their own) before the rest
/// are ended: a commit half done is worse than a late exit.
const UPDATE_FINISH_LIMIT: Duration = Duration::from_secs(600);
/// Warm backend sessions all get this long, together, to log out.
const POOL_CLOSE_LIMIT: Duration = Duration::from_secs(5);

impl Context {
    /// The limits now in force (a SIGHUP reload may change them).
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves once the grace period is over and sessions must end.
    pub async fn stopped(&self) {
        let _ = self.stop.clone().wait_for(|s| *s).await;
    }
}

/// What one listener's connections share.
struct ListenerContext {
    /// The listener's address, as a metrics label.
    label: String,
    policy: LoginPolicy,
    per_address: Arc<PerAddressLimit>,
    protocol: config::Protocol,
}

pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    context: Arc<Context>,
    permits: Arc<ConnectionLimit>,
    per_address: Arc<PerAddressLimit>,
    pool: Arc<SessionPool>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    certificates: Option<Arc<CertificateStore>>,
    draining: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grace: Duration,
    drain_delay: Duration,
}

pub struct Server;

/// Exact sizes in the shared state store, keyed by account and UIDL (the
/// account's length first, so no two (account, UIDL) pairs share a key).
struct SharedSizes {
    shared: Arc<dyn SharedState>,
    ttl: Duration,
}

impl SharedSizes {
    fn key(account: &str, uidl: &str) -> String {
        format!("size:{}:{account}:{uidl}", account.len())
    }
}

#[async_trait::async_trait]
impl SizeStore for SharedSizes {
    async fn sizes(&self, account: &str, uidls: &[&str]) -> Vec<Option<u64>> {
        let keys: Vec<String> = uidls.iter().map(|u| Self::key(account, u)).collect();
        self.shared.get(&keys).await.unwrap_or_default()
    }

    async fn remember(&self, account: &str, sizes: &[(&str, u64)]) {
        let entries: Vec<(String, u64)> = sizes.iter().map(|(u, size)| (Self::key(account, u), *size)).collect();
        let _ = self.shared.set(&entries, self.ttl).await;
    }
}

/// Provider holds (Gmail's long throttles, Graph's per-app limits) in the
/// shared state store: until when, in Unix milliseconds, expiring with it.
struct SharedProviderHolds(Arc<dyn SharedState>);

impl SharedProviderHolds {
    fn key(account: &str) -> String {
        format!("hold:{}:{account}", account.len())
    }
}

#[async_trait::async_trait]
impl crate::backend::http::SharedHolds for SharedProviderHolds {
    async fn publish(&self, account: &str, until: std::time::SystemTime) {
        let Ok(ttl) = until.duration_since(std::time::SystemTime::now()) else { return };
        let millis = until.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        if let Err(e) = self.0.set(&[(Self::key(account), millis as u64)], ttl).await {
            tracing::debug!(error = %e, "provider hold not shared");
        }
    }

    async fn until(&self, account: &str) -> Option<std::time::SystemTime> {
        let millis = self.0.get(&[Self::key(account)]).await.ok()?.pop()??;
        Some(std::time::UNIX_EPOCH + Duration::from_millis(millis))
    }
}

/// Providers' request budgets (Outlook's per-mailbox requests per window)
/// counted in the shared state store, so that replicas spend one budget.
struct SharedRequestBudgets(Arc<dyn SharedState>);

#[async_trait::async_trait]
impl crate::backend::http::SharedBudgets for SharedRequestBudgets {
    async fn spend(&self, key: &str, n: u64, ttl: Duration) -> Option<u64> {
        match self.0.add(key, n, ttl).await {
            Ok(total) => Some(total),
            Err(e) => {
                tracing::debug!(error = %e, "request budget counted by this replica alone");
                None
            }
        }
    }
}

/// An account's concurrent-request places (Outlook's 4 per mailbox) as
/// locks `KEY:0` … `KEY:N-1` in the shared state store, each taken with a
/// fencing lease that expires: a replica that dies mid-request gives its
/// place back by expiry, and one whose lease expired can never release
/// another's.
struct SharedRequestSlots {
    shared: Arc<dyn SharedState>,
    /// Where the next search for a free place starts (spreads the tries).
    next: std::sync::atomic::AtomicUsize,
}

struct SharedSlot {
    shared: Arc<dyn SharedState>,
    lease: crate::state::Lease,
}

#[async_trait::async_trait]
impl crate::backend::http::SlotLease for SharedSlot {
    async fn give_back(self: Box<Self>) {
        if let Err(e) = self.shared.unlock(&self.lease).await {
            tracing::debug!(error = %e, "a request place is given back by expiry");
        }
    }
}

#[async_trait::async_trait]
impl crate::backend::http::SharedSlots for SharedRequestSlots {
    async fn take(
        &self,
        key: &str,
        slots: usize,
        ttl: Duration,
    ) -> Result<Option<Box<dyn crate::backend::http::SlotLease>>, ()> {
        let slots = slots.max(1);
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..slots {
            let place = format!("{key}:{}", (start + i) % slots);
            match self.shared.try_lock(&place, ttl).await {
                Ok(Some(lease)) => return Ok(Some(Box::new(SharedSlot { shared: self.shared.clone(), lease }))),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "concurrent requests counted by this replica alone");
                    return Err(());
                }
            }
        }
        Ok(None)
    }
}

/// Keeps `popgate_state_up` current until the server stops. The store
/// itself logs each outage once, when it starts and when it ends.
async fn report_state_store(shared: Arc<dyn SharedState>, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        metrics.state_store_up("redis", shared.is_up());
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

impl Server {
    /// Loads certificates and binds every listener (failing fast, with the
    /// file or address named), then starts serving, with logins routed by
    /// `router` and counted into `metrics`.
    pub async fn start(
        config: &Config,
        router: Arc<dyn Router>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<RunningServer> {
        let backend = router.primary_backend();
        let certificates = if config.tls.certificates.is_empty() {
            None
        } else {
            Some(CertificateStore::load(config.tls.certificates.clone()).map_err(std::io::Error::other)?)
        };
        let mut listeners = Vec::new();
        for l in &config.listener {
            if l.tls != ListenerTls::None && certificates.is_none() {
                return Err(std::io::Error::other(format!(
                    "listener {} uses TLS but no certificate is configured",
                    l.address
                )));
            }
            let listener = bind(l.address)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.address)))?;
            listeners.push((listener, l.policy(), l.protocol));
        }
        let (draining, _) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let mut sizes = ExactSizes::new(config.limits.size_cache_entries);
        let mut throttle = LoginThrottle::new(config.throttle.clone());
        if let Some(shared) = config.state.open().map_err(std::io::Error::other)? {
            let ttl = Duration::from_secs(config.state.size_ttl_secs);
            sizes = sizes.shared_with(Arc::new(SharedSizes { shared: shared.clone(), ttl }));
            throttle = throttle.shared_with(shared.clone());
            crate::backend::http::share_holds(Arc::new(SharedProviderHolds(shared.clone())));
            crate::backend::http::share_budgets(Arc::new(SharedRequestBudgets(shared.clone())));
            crate::backend::http::share_slots(Arc::new(SharedRequestSlots {
                shared: shared.clone(),
                next: std::sync::atomic::AtomicUsize::new(0),
            }));
            tokio::spawn(report_state_store(shared, metrics.clone(), stop_rx.clone()));
        }
        let context = Arc::new(Context {
            limits: std::sync::RwLock::new(Arc::new(config.limits.clone())),
            backend,
            router,
            sizes,
            tls: certificates.as_ref().map(|c| c.server_config()),
            throttle,
            metrics,
            pool: SessionPool::new(config.backend_pool.clone()),
            stop: stop_rx,
            updates: Arc::new(Updates::default()),
            submission: Arc::new(submission::Relays::from_config(config)?),
            activity: Arc::new(activity::Activity::new()),
        });
        tokio::spawn(evict_idle_sessions(Arc::downgrade(&context.pool)));
        context.metrics.backend(context.backend.kind());
        let health = Health::new(context.backend.clone());
        if let Some(store) = &certificates {
            export_expiries(store, &context.metrics);
        }
        let permits = ConnectionLimit::new(config.limits.max_connections);
        let per_address = PerAddressLimit::new(config.limits.max_connections_per_address);
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        for (listener, policy, protocol) in listeners {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, tls = ?policy.tls, ?protocol, backend = context.backend.kind(), "listening");
            addrs.push(addr);
            let listener_context = Arc::new(ListenerContext {
                label: addr.to_string(),
                policy,
                per_address: per_address.clone(),
                protocol,
            });
            tasks.spawn(accept_loop(
                listener,
                context.clone(),
                listener_context,
                permits.clone(),
                draining.subscribe(),
            ));
        }
        if let Some(store) = &certificates
            && config.tls.reload_check_secs > 0
        {
            tokio::spawn(watch_certificates(
                Arc::downgrade(store),
                context.metrics.clone(),
                Duration::from_secs(config.tls.reload_check_secs),
            ));
        }
        health.set_listening();
        Ok(RunningServer {
            addrs,
            context: context.clone(),
            permits,
            per_address,
            pool: context.pool.clone(),
            metrics: context.metrics.clone(),
            health,
            certificates,
            draining,
            stop,
            tasks,
            grace: Duration::from_secs(config.limits.shutdown_grace_secs),
            drain_delay: Duration::from_secs(config.limits.drain_delay_secs),
        })
    }
}

/// Connections the kernel queues before popgate accepts them. tokio's
/// `TcpListener::bind` uses 128, which a fleet of devices polling at the same
/// minute overflows: the overflowing clients then wait for a greeting that
/// never comes.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Closes warm backend sessions that idled too long, until the server is gone.
async fn evict_idle_sessions(pool: std::sync::Weak<SessionPool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(15));
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.evict_expired().await;
    }
}

fn diff_limits(old: &Limits, new: &Limits) -> Vec<String> {
    let old = toml::Value::try_from(old).ok();
    let new = toml::Value::try_from(new).ok();
    let (Some(toml::Value::Table(old)), Some(toml::Value::Table(new))) = (old, new) else {
        return vec!["limits".into()];
    };
    new.iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| format!("limits.{k}: {} -> {v}", old.get(k).map(|o| o.to_string()).unwrap_or_default()))
        .collect()
}

/// The expiry of every certificate now in use, as gauges.
fn export_expiries(store: &CertificateStore, metrics: &Metrics) {
    for (file, not_after) in store.expiries() {
        metrics.certificate_expires(&file, not_after);
    }
}

/// Reloads certificates whose files changed, until the server is gone.
async fn watch_certificates(store: std::sync::Weak<CertificateStore>, metrics: Arc<Metrics>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(store) = store.upgrade() else { return };
        match store.reload_if_changed() {
            Ok(true) => {
                export_expiries(&store, &metrics);
                tracing::info!("certificates changed on disk; reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "certificate files changed but cannot be loaded; keeping the old ones")
            }
        }
    }
}

impl RunningServer {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Warm backend sessions (for tests and benchmarks).
    pub fn pool(&self) -> Arc<SessionPool> {
        self.pool.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What each device did last, for the admin page.
    pub fn activity(&self) -> Arc<activity::Activity> {
        self.context.activity.clone()
    }

    /// Readiness, for the admin listener.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Applies what can change without a restart (SIGHUP): limits and
    /// throttling for new connections, and the certificates (re-read from
    /// their files). Returns what changed, for the log; settings that need a
    /// restart (listeners, backend, pool, cache size) are named as ignored.
    pub fn reload(&mut self, new: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        let old = self.context.limits();
        if *old != new.limits {
            changes.extend(diff_limits(&old, &new.limits));
            // A count checked against the limit in force: connections
            // above a lowered limit end in their own time and are not
            // replaced.
            let above = self.permits.set_max(new.limits.max_connections);
            if above > 0 {
                changes.push(format!(
                    "limits.max_connections: {above} connections above the new limit stay until they end"
                ));
            }
            self.per_address.set_max(new.limits.max_connections_per_address);
            self.grace = Duration::from_secs(new.limits.shutdown_grace_secs);
            self.drain_delay = Duration::from_secs(new.limits.drain_delay_secs);
            *self.context.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new.limits.clone());
        }
        if self.context.throttle.config() != new.throttle {
            changes.push("throttle settings (counters restart)".into());
            self.context.throttle.reconfigure(new.throttle.clone());
        }
        match self.reload_certificates() {
            Ok(()) if self.certificates.is_some() => changes.push("certificates re-read".into()),
            Ok(()) => {}
            Err(e) => changes.push(format!("certificates NOT reloaded, old ones kept: {e}")),
        }
        changes
    }

    /// Re-reads the certificate files (SIGHUP). Sessions in progress keep
    /// their TLS state; new handshakes get the new certificates. On error
    /// the old certificates stay.
    pub fn reload_certificates(&self) -> Result<(), TlsError> {
        match &self.certificates {
            Some(store) => store.reload().map(|()| export_expiries(store, &self.metrics)),
            None => Ok(()),
        }
    }

    /// Stops accepting, waits up to the grace period for sessions, then ends
    /// those still open.
    pub async fn shutdown(mut self) {
        // Readiness goes false first, so a load balancer stops sending
        // clients before the listeners close.
        self.health.set_draining();
        if !self.drain_delay.is_zero() {
            // Still accepting: whoever routes clients here has not noticed
            // the failing readiness yet, and a refused client is worse than
            // one more session in the grace period.
            tracing::info!(
                delay_secs = self.drain_delay.as_secs(),
                "not ready; accepting until drain_delay_secs is over"
            );
            tokio::time::sleep(self.drain_delay).await;
        }
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
                let updates = self.context.updates.clone();
                if updates.running() > 0 {
                    tracing::info!(sessions = updates.running(), "letting sessions inside UPDATE finish their commit");
                    if tokio::time::timeout(UPDATE_FINISH_LIMIT, updates.settled()).await.is_err() {
                        tracing::error!("sessions still inside UPDATE after the limit; ending them");
                    }
                }
                self.tasks.abort_all();
            }
        }
        self.pool.close_all(POOL_CLOSE_LIMIT).await;
        tracing::info!("shut down");
    }
}

/// The client's address as every later check sees it: an IPv4 client of a
/// dual-stack (`[::]`) listener arrives as `::ffff:a.b.c.d`, and must match
/// IPv4 networks, limits and throttle entries (and be logged) as `a.b.c.d`.
pub fn canonical_peer(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<Context>,
    listener_context: Arc<ListenerContext>,
    permits: Arc<ConnectionLimit>,
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
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(5);
                (socket, canonical_peer(peer))
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
        let permit = permits.try_acquire();
        let slot = listener_context.per_address.acquire(peer.ip());
        let context = context.clone();
        let listener_context = listener_context.clone();
        sessions.spawn(async move {
            let policy = listener_context.policy.clone();
            let submission = listener_context.protocol == config::Protocol::Submission;
            match (permit, slot) {
                (Some(permit), Some(slot)) if submission => {
                    submission::serve(ClientStream::Plain(socket), peer, &listener_context.label, policy, context)
                        .await;
                    drop((permit, slot));
                }
                (Some(permit), Some(slot)) => {
                    connection::serve(ClientStream::Plain(socket), peer, &listener_context.label, policy, context)
                        .await;
                    drop((permit, slot));
                }
                // An implicit-TLS client cannot read a cleartext reply.
                (permit, _) if policy.tls == ListenerTls::Implicit => {
                    let why =
                        if permit.is_none() { Refusal::MaxConnections } else { Refusal::MaxConnectionsPerAddress };
                    context.metrics.refused(why);
                    drop(socket)
                }
                (permit, slot) => {
                    let (why, text) = if permit.is_none() {
                        (Refusal::MaxConnections, "too many connections")
                    } else {
                        debug_assert!(slot.is_none());
                        (Refusal::MaxConnectionsPerAddress, "too many connections from your address")
                    };
                    context.metrics.refused(why);
                    if submission {
                        submission::refuse_busy(socket, peer, text).await
                    } else {
                        connection::refuse_busy(socket, peer, text).await
                    }
                }
            }
        });
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}
