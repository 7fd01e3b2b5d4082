//! Logging and metrics.
//!
//! Logs: everything goes through `tracing`; one span per connection carries
//! peer, session id, user and backend. Secrets are never a field: they are
//! `auth::Secret`, which prints as `<redacted>`, and the libraries that log
//! raw protocol bytes are capped so no level shows credentials.
//!
//! Text logs carry ANSI colour only when stderr is a terminal (and
//! `NO_COLOR` is unset): journald and log files get plain text.
//!
//! Metrics: one `Metrics` registry (Prometheus text via prometheus-client),
//! served by `server::admin` on `/metrics`, plus the standard `process_*`
//! metrics. Every label is bounded by the code or the configuration:
//! command names, fixed result and reason words, backend kinds, listener
//! addresses, certificate files, configured account names. A pass-through
//! login is never a label value unless `[admin] metrics_login_names` asks
//! for it (`PASS_THROUGH_ACCOUNT` otherwise).

use std::io::IsTerminal as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicU64;
use tracing_subscriber::EnvFilter;

/// Libraries that log raw protocol bytes (an IMAP LOGIN line, an HTTP
/// Authorization header) at trace level: capped at `info` whatever the
/// filter says, even a filter that names one of their modules.
const WIRE_LOGGERS: &[&str] = &["async_imap", "imap_proto", "hyper", "hyper_util", "h2", "reqwest", "rustls"];

fn is_wire_logger(target: &str) -> bool {
    WIRE_LOGGERS.iter().any(|w| target == *w || target.strip_prefix(w).is_some_and(|rest| rest.starts_with("::")))
}

/// What a client alone causes in rustls's message parsing ("Illegal SNI
/// extension: ignoring IP address" at WARN, for every client that sends an
/// IP address as server name): nothing an operator can act on, so never
/// shown above debug — and rustls's debug output is withheld by the wire
/// cap, so these modules are not shown at all.
fn is_client_caused_tls_noise(target: &str, level: tracing::Level) -> bool {
    level <= tracing::Level::INFO && target.starts_with("rustls::msgs::")
}

/// The output filter: wire loggers capped at `info`, client-caused TLS
/// noise dropped.
fn shown(target: &str, level: tracing::Level) -> bool {
    let capped = is_wire_logger(target) && level > tracing::Level::INFO;
    !capped && !is_client_caused_tls_noise(target, level)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "popgate=debug", … (RUST_LOG overrides it).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// The configured (or RUST_LOG) filter.
pub fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level))
}

/// Changes the log filter of the running process (SIGHUP).
pub struct LogReload(Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>);

impl LogReload {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        (self.0)(filter(level))
    }
}

/// Colour codes only for a person at a terminal: journald stores them as
/// binary blobs and log files show them as garbage. `NO_COLOR` (any value,
/// no-color.org) turns them off on a terminal too.
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber; `RUST_LOG` overrides the configured level.
/// `None` if a subscriber was already installed (tests).
pub fn init(config: &LogConfig) -> Option<LogReload> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter(&config.level));
    // A separate filter on the output layer: whatever the user's filter lets
    // through, the wire loggers never get past `info` — that is where
    // credentials would appear.
    let cap = tracing_subscriber::filter::filter_fn(|meta| shown(meta.target(), *meta.level()));
    let output = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")))
            .with_writer(std::io::stderr)
            .with_filter(cap)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(cap)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output).try_init().ok()?;
    Some(LogReload(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandNameLabels {
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    pub result: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OAuthRefreshLabels {
    /// A configured account name (bounded by the configuration).
    pub account: String,
    /// "ok", "invalid_grant", "interaction_required", "consent_required",
    /// "invalid_client", "unauthorized_client", "invalid_scope", "refused",
    /// "unavailable", "invalid_response", "store_failed", "config".
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendErrorLabels {
    /// A backend kind ("imap", "jmap", "gmail", "graph", "demo", …).
    pub backend: String,
    /// A fixed word: "auth", "bad_credentials", "in_use", "unavailable",
    /// "permanent", "message_gone".
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendKindLabels {
    pub backend: String,
}

/// `store`: the shared state store's kind ("redis").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateStoreLabels {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// A configured account name (or `PASS_THROUGH_ACCOUNT`).
    pub account: String,
    /// A configured device user name (or `PASS_THROUGH_ACCOUNT`).
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubmissionLabels {
    pub account: String,
    pub device: String,
    /// "sent", or one of `SUBMISSION_REFUSALS`.
    pub result: String,
}

/// Why a device's message was not relayed: a fixed set of words.
/// `sender`, `from_header` and `recipient` are the account's envelope rules
/// (`smtp::session::Rule::label`).
pub const SUBMISSION_REFUSALS: &[&str] = &[
    "rate_limited",
    "upstream_temporary",
    "upstream_permanent",
    "unavailable",
    "credentials",
    "sender",
    "from_header",
    "recipient",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// A fixed word, one of `REFUSAL_REASONS`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// The configured certificate file (`[[tls.certificates]] cert`).
    pub certificate: String,
}

/// Why a connection was refused before a POP3 session began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `[limits] max_connections` reached.
    MaxConnections,
    /// `[limits] max_connections_per_address` reached.
    MaxConnectionsPerAddress,
    /// The implicit-TLS handshake failed (or the client sent no TLS).
    TlsHandshakeFailed,
    /// The implicit-TLS handshake did not finish within `login_timeout_secs`.
    TlsHandshakeTimeout,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerAddress,
        Refusal::TlsHandshakeFailed,
        Refusal::TlsHandshakeTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerAddress => "max_connections_per_address",
            Refusal::TlsHandshakeFailed => "tls_handshake_failed",
            Refusal::TlsHandshakeTimeout => "tls_handshake_timeout",
        }
    }
}

/// Every `class` of `popgate_backend_errors_total`.
pub const BACKEND_ERROR_CLASSES: &[&str] =
    &["auth", "bad_credentials", "in_use", "unavailable", "permanent", "message_gone"];

/// Every `result` of `popgate_oauth_refreshes_total`.
pub const OAUTH_REFRESH_RESULTS: &[&str] =
    &["ok", "invalid_grant", "refused", "unavailable", "invalid_response", "store_failed", "config", "superseded"];

/// The `account` label of every pass-through login, unless
/// `[admin] metrics_login_names` is on: login names are unbounded (one
/// series per guess) and are often e-mail addresses.
pub const PASS_THROUGH_ACCOUNT: &str = "pass-through";

type HistogramFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn service_histogram() -> Histogram {
    // 10 µs .. ~42 s: most commands are answered from memory in microseconds.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 23))
}

/// Every metric popgate exports.
pub struct Metrics {
    registry: Registry,
    pub sessions_active: Family<ListenerLabels, Gauge>,
    pub sessions_total: Family<ListenerLabels, Counter>,
    pub commands: Family<CommandLabels, Counter>,
    pub command_service: Family<CommandNameLabels, Histogram, fn() -> Histogram>,
    pub logins: Family<LoginLabels, Counter>,
    pub backend_latency: HistogramFamily,
    pub retrieved_bytes: Counter,
    pub backend_logins: Counter,
    pub backend_sessions_reused: Counter,
    pub deletions: Family<ResultLabels, Counter>,
    pub last_success: Family<AccountLabels, Gauge<f64, AtomicU64>>,
    pub oauth_refreshes: Family<OAuthRefreshLabels, Counter>,
    pub oauth_token_expiry: Family<AccountLabels, Gauge<f64, AtomicU64>>,
    pub backend_errors: Family<BackendErrorLabels, Counter>,
    pub backend_up: Family<BackendKindLabels, Gauge>,
    pub connections_refused: Family<RefusalLabels, Counter>,
    pub certificate_expiry: Family<CertificateLabels, Gauge<f64, AtomicU64>>,
    pub oauth_operator_action: Family<AccountLabels, Gauge>,
    pub submission_messages: Family<SubmissionLabels, Counter>,
    pub submission_last_sent: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    pub submission_last_error: Family<SubmissionLabels, Gauge<f64, AtomicU64>>,
    pub state_up: Family<StateStoreLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            sessions_active: Family::default(),
            sessions_total: Family::default(),
            commands: Family::default(),
            command_service: Family::new_with_constructor(service_histogram),
            logins: Family::default(),
            backend_latency: Family::new_with_constructor(latency_histogram),
            retrieved_bytes: Counter::default(),
            backend_logins: Counter::default(),
            backend_sessions_reused: Counter::default(),
            deletions: Family::default(),
            last_success: Family::default(),
            oauth_refreshes: Family::default(),
            oauth_token_expiry: Family::default(),
            backend_errors: Family::default(),
            backend_up: Family::default(),
            connections_refused: Family::default(),
            certificate_expiry: Family::default(),
            oauth_operator_action: Family::default(),
            submission_messages: Family::default(),
            submission_last_sent: Family::default(),
            submission_last_error: Family::default(),
            state_up: Family::default(),
            registry: Registry::default(),
        };
        // Every reason is exported from the start (at 0), so an alert on
        // `increase()` sees the first refusal.
        for reason in Refusal::ALL {
            drop(metrics.connections_refused.get_or_create(&RefusalLabels { reason: reason.as_str().into() }));
        }
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("popgate");
        registry.register("sessions_active", "POP3 sessions open now", metrics.sessions_active.clone());
        registry.register("sessions", "POP3 sessions accepted", metrics.sessions_total.clone());
        registry.register("commands", "POP3 commands by name and result", metrics.commands.clone());
        registry.register(
            "command_service_seconds",
            "Time from a client's command reaching popgate (its read) to the reply written, by the last command \
             of what was read: the work a command costs, without the time it waited for popgate to read it",
            metrics.command_service.clone(),
        );
        registry.register("logins", "Login attempts by result and reason", metrics.logins.clone());
        registry.register(
            "backend_operation_duration_seconds",
            "Backend operation latency by backend kind and operation",
            metrics.backend_latency.clone(),
        );
        registry.register("retrieved_bytes", "Message octets sent by RETR and TOP", metrics.retrieved_bytes.clone());
        registry.register("backend_logins", "Logins to a backend (new sessions)", metrics.backend_logins.clone());
        registry.register(
            "backend_sessions_reused",
            "POP3 sessions served by a warm backend session (no backend login)",
            metrics.backend_sessions_reused.clone(),
        );
        registry.register("deletions", "Messages removed in the UPDATE state, by result", metrics.deletions.clone());
        registry.register(
            "account_last_success_timestamp_seconds",
            "Unix time of the last session that ended well, per account (alert when a device stops polling)",
            metrics.last_success.clone(),
        );
        registry.register(
            "oauth_refreshes",
            "OAuth access token refreshes (and client-credentials requests) per mapped account, by result",
            metrics.oauth_refreshes.clone(),
        );
        registry.register(
            "oauth_token_expiry_timestamp_seconds",
            "Unix time the access token popgate holds for an account expires",
            metrics.oauth_token_expiry.clone(),
        );
        registry.register(
            "backend_errors",
            "Backend operations that failed, by backend kind and error class",
            metrics.backend_errors.clone(),
        );
        registry.register(
            "backend_up",
            "1 if the last reachability probe of the backend succeeded, 0 if not (not part of /readyz)",
            metrics.backend_up.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before a POP3 session began, by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Unix time the leaf certificate of each configured certificate file expires (notAfter)",
            metrics.certificate_expiry.clone(),
        );
        registry.register(
            "submission_messages",
            "Messages devices submitted for relay (scan to email), per account and device, by result: \"sent\" \
             (the upstream accepted it) or the reason it was refused",
            metrics.submission_messages.clone(),
        );
        registry.register(
            "submission_last_sent_timestamp_seconds",
            "Unix time a device's last message was accepted by the upstream",
            metrics.submission_last_sent.clone(),
        );
        registry.register(
            "submission_last_error_timestamp_seconds",
            "Unix time a device's message was last refused, per reason (the newest series is the last error)",
            metrics.submission_last_error.clone(),
        );
        registry.register(
            "oauth_operator_action_needed",
            "1 while an account's OAuth provider refuses popgate until an operator acts (sign in again, consent, \
             renew the client secret, fix the scopes), else 0: alert on it",
            metrics.oauth_operator_action.clone(),
        );
        registry.register(
            "state_up",
            "1 while the shared state store ([state] url) answers, 0 while replicas fall back to local state \
             (only exported when one is configured)",
            metrics.state_up.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]),
        );
        Metrics { registry: root, ..metrics }
    }

    /// A backend operation failed; `class` is a fixed word (see
    /// `BackendErrorLabels`).
    pub fn backend_error(&self, backend: &str, class: &str) {
        self.backend_errors.get_or_create(&BackendErrorLabels { backend: backend.into(), class: class.into() }).inc();
    }

    /// Exports a backend's error counters at 0 from the start, so an alert
    /// on `increase()` sees the first error.
    pub fn backend(&self, backend: &str) {
        for class in BACKEND_ERROR_CLASSES {
            drop(
                self.backend_errors
                    .get_or_create(&BackendErrorLabels { backend: backend.into(), class: (*class).into() }),
            );
        }
    }

    pub fn state_store_up(&self, store: &str, up: bool) {
        self.state_up.get_or_create(&StateStoreLabels { store: store.into() }).set(i64::from(up));
    }

    pub fn backend_probed(&self, backend: &str, up: bool) {
        self.backend_up.get_or_create(&BackendKindLabels { backend: backend.into() }).set(i64::from(up));
    }

    pub fn refused(&self, why: Refusal) {
        self.connections_refused.get_or_create(&RefusalLabels { reason: why.as_str().into() }).inc();
    }

    pub fn certificate_expires(&self, certificate: &str, unix_secs: i64) {
        self.certificate_expiry
            .get_or_create(&CertificateLabels { certificate: certificate.into() })
            .set(unix_secs as f64);
    }

    pub fn command(&self, command: &str, ok: bool) {
        let result = if ok { "ok" } else { "err" };
        self.commands.get_or_create(&CommandLabels { command: command.to_string(), result: result.into() }).inc();
    }

    /// What a command cost from its read to its reply's write.
    pub fn command_served(&self, command: &str, took: Duration) {
        self.command_service
            .get_or_create(&CommandNameLabels { command: command.to_string() })
            .observe(took.as_secs_f64());
    }

    pub fn login(&self, result: &str, reason: &str) {
        self.logins.get_or_create(&LoginLabels { result: result.into(), reason: reason.into() }).inc();
    }

    pub fn backend_op(&self, backend: &str, operation: &str, took: Duration) {
        self.backend_latency
            .get_or_create(&BackendLabels { backend: backend.into(), operation: operation.into() })
            .observe(took.as_secs_f64());
    }

    pub fn deleted(&self, ok: bool, count: u64) {
        let result = if ok { "committed" } else { "failed" };
        self.deletions.get_or_create(&ResultLabels { result: result.into() }).inc_by(count);
    }

    pub fn account_succeeded(&self, account: &str) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.last_success.get_or_create(&AccountLabels { account: account.to_string() }).set(now);
    }

    /// Exports an OAuth account's refresh counters at 0 from the start, so
    /// an alert on `increase()` sees the first failure.
    pub fn oauth_account(&self, account: &str) {
        for result in OAUTH_REFRESH_RESULTS {
            drop(
                self.oauth_refreshes
                    .get_or_create(&OAuthRefreshLabels { account: account.into(), result: (*result).into() }),
            );
        }
    }

    pub fn oauth_refresh(&self, account: &str, result: &str) {
        self.oauth_refreshes
            .get_or_create(&OAuthRefreshLabels { account: account.into(), result: result.into() })
            .inc();
    }

    /// Whether `account` waits for an operator (see `oauth_operator_action_needed`).
    pub fn oauth_operator_action(&self, account: &str, needed: bool) {
        self.oauth_operator_action.get_or_create(&AccountLabels { account: account.into() }).set(i64::from(needed));
    }

    pub fn oauth_token_expires(&self, account: &str, unix_secs: u64) {
        self.oauth_token_expiry.get_or_create(&AccountLabels { account: account.into() }).set(unix_secs as f64);
    }

    /// A device's message was accepted by the upstream.
    pub fn submission_sent(&self, account: &str, device: &str) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let labels = SubmissionLabels { account: account.into(), device: device.into(), result: "sent".into() };
        self.submission_messages.get_or_create(&labels).inc();
        self.submission_last_sent
            .get_or_create(&DeviceLabels { account: account.into(), device: device.into() })
            .set(now);
    }

    /// A device's message was not relayed, for `reason` (one of
    /// `SUBMISSION_REFUSALS`; anything else is counted as "unavailable").
    pub fn submission_refused(&self, account: &str, device: &str, reason: &str) {
        let reason = if SUBMISSION_REFUSALS.contains(&reason) { reason } else { "unavailable" };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let labels = SubmissionLabels { account: account.into(), device: device.into(), result: reason.into() };
        self.submission_messages.get_or_create(&labels).inc();
        self.submission_last_error.get_or_create(&labels).set(now);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The standard `process_*` metrics of the Prometheus client libraries
/// (cpu, memory, file descriptors, threads, start time), read at each
/// scrape. prometheus-client has no process collector; metrics-process
/// reads them the way client_golang does (/proc on Linux) and is used here
/// without its `metrics` crate front end.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = metrics_process::collector::collect();
        if let Some(cpu) = m.cpu_seconds_total {
            let metric = ConstCounter::new(cpu);
            let e = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            metric.encode(e)?;
        }
        let gauges = [
            ("process_open_fds", "Number of open file descriptors", m.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", m.max_fds),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", m.virtual_memory_bytes),
            (
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes",
                m.virtual_memory_max_bytes,
            ),
            ("process_resident_memory_bytes", "Resident memory size in bytes", m.resident_memory_bytes),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                m.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads in the process", m.threads),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let metric = ConstGauge::new(value as i64);
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_caused_tls_warnings_are_not_shown() {
        use tracing::Level;
        assert!(!shown("rustls::msgs::handshake", Level::WARN), "the SNI-is-an-IP warning");
        assert!(!shown("rustls::msgs::handshake", Level::ERROR));
        assert!(shown("rustls::server::tls13", Level::WARN), "other rustls warnings stay");
        assert!(!shown("rustls::server::tls13", Level::TRACE), "wire loggers stay capped");
        assert!(shown("popgate::server", Level::WARN));
        assert!(shown("popgate::server", Level::TRACE));
    }

    #[test]
    fn wire_loggers_are_recognized_with_their_modules() {
        for target in ["async_imap", "async_imap::imap_stream", "hyper::proto::h1", "rustls::server"] {
            assert!(is_wire_logger(target), "{target}");
        }
        for target in ["popgate", "popgate::server", "async_imapx", "hyperlocal"] {
            assert!(!is_wire_logger(target), "{target}");
        }
    }

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new();
        m.command("RETR", true);
        m.login("failure", "auth");
        m.backend_op("imap", "fetch", Duration::from_millis(3));
        m.deleted(true, 2);
        m.account_succeeded("printer-3");
        m.oauth_refresh("scans", "invalid_grant");
        m.oauth_token_expires("scans", 1_900_000_000);
        m.retrieved_bytes.inc_by(10);
        m.sessions_total.get_or_create(&ListenerLabels { listener: "127.0.0.1:1110".into() }).inc();
        let text = m.encode();
        for needle in [
            "popgate_commands_total{command=\"RETR\",result=\"ok\"} 1",
            "popgate_logins_total{result=\"failure\",reason=\"auth\"} 1",
            "popgate_backend_operation_duration_seconds_bucket{le=\"0.004\",backend=\"imap\",operation=\"fetch\"} 1",
            "popgate_deletions_total{result=\"committed\"} 2",
            "popgate_account_last_success_timestamp_seconds{account=\"printer-3\"}",
            "popgate_oauth_refreshes_total{account=\"scans\",result=\"invalid_grant\"} 1",
            "popgate_oauth_token_expiry_timestamp_seconds{account=\"scans\"} 1900000000",
            "popgate_retrieved_bytes_total 10",
            "popgate_sessions_total{listener=\"127.0.0.1:1110\"} 1",
            "popgate_build_info{version=",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
