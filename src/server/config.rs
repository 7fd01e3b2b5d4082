//! The server's own configuration: listeners and their login policy, the
//! certificates, the limits on connections and sessions, and the admin
//! listener. `config.rs` assembles these tables into the file; the rules
//! that tie them together (a TLS listener needs a certificate) are checked
//! here, with keys named as the file spells them.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::policy::{ListenerTls, LoginPolicy};
use super::tls::CertificateConfig;
use crate::mail::InvalidSetting;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// "none" (cleartext), "starttls" (cleartext + STLS) or "implicit" (995).
    #[serde(default)]
    pub tls: ListenerTls,
    /// Accept USER/PASS and AUTH without TLS (devices that cannot do TLS).
    #[serde(default)]
    pub allow_cleartext_login: bool,
    /// With `allow_cleartext_login`: only from these networks (CIDR).
    #[serde(default)]
    pub cleartext_networks: Vec<ipnet::IpNet>,
    /// Loopback clients count as secure without TLS.
    #[serde(default = "yes")]
    pub loopback_is_secure: bool,
    /// "pop3" (default) or "submission" (SMTP from scanners, relayed).
    #[serde(default, skip_serializing_if = "Protocol::is_pop3")]
    pub protocol: Protocol,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Pop3,
    /// SMTP submission (RFC 6409): "starttls" on 587, "implicit" on 465.
    Submission,
}

impl Protocol {
    pub fn is_pop3(&self) -> bool {
        *self == Protocol::Pop3
    }
}

impl ListenerConfig {
    /// A cleartext listener with the default policy (`--listen ADDR`).
    pub fn plain(address: SocketAddr) -> Self {
        ListenerConfig {
            address,
            tls: ListenerTls::None,
            allow_cleartext_login: false,
            cleartext_networks: Vec::new(),
            loopback_is_secure: true,
            protocol: Protocol::Pop3,
        }
    }

    /// Cleartext logins from `networks` (`--allow-cleartext-from`); none:
    /// unchanged.
    pub fn allowing_cleartext_from(mut self, networks: &[ipnet::IpNet]) -> Self {
        if !networks.is_empty() {
            self.allow_cleartext_login = true;
            self.cleartext_networks = networks.to_vec();
        }
        self
    }

    /// Why this listener would refuse every login from the network, if it
    /// would: it takes connections from other machines, has no TLS and
    /// allows no cleartext login (the printer on the LAN that only ever
    /// hears "authentication failed").
    pub fn refuses_every_network_login(&self) -> bool {
        !self.address.ip().to_canonical().is_loopback() && !self.policy().any_network_login_possible()
    }

    /// A warning, naming the flag and the keys that fix it, for every
    /// listener that would refuse every login from the network.
    pub fn login_warnings(listeners: &[ListenerConfig]) -> Vec<String> {
        listeners
            .iter()
            .filter(|l| l.refuses_every_network_login())
            .map(|l| {
                format!(
                    "listener {} accepts connections from other machines but will refuse every login from them: \
                     it has no TLS and allows no cleartext login. For printers and scanners without TLS, start \
                     with `--allow-cleartext-from 192.168.1.0/24` (your devices' network) next to --listen, or set \
                     `allow_cleartext_login = true` and `cleartext_networks = [\"192.168.1.0/24\"]` in its \
                     [[listener]]; for clients with TLS, set its `tls` to \"starttls\" or \"implicit\" and \
                     configure [tls] certificates",
                    l.address
                )
            })
            .collect()
    }

    pub fn policy(&self) -> LoginPolicy {
        LoginPolicy {
            tls: self.tls,
            allow_cleartext_login: self.allow_cleartext_login,
            cleartext_networks: self.cleartext_networks.clone(),
            loopback_is_secure: self.loopback_is_secure,
        }
    }
}

/// Certificates for the TLS listeners (implicit TLS and STLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The first is the default; others are chosen by SNI.
    pub certificates: Vec<CertificateConfig>,
    /// Seconds between checks of the files for changes (0: only on SIGHUP).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), reload_check_secs: 60 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line in octets, CRLF included (RFC 2449: at least 255).
    pub command_line: usize,
    /// Longest SASL response line (OAuth tokens need a few KiB).
    pub auth_line: usize,
    /// Failed logins on one connection before it is closed.
    pub max_failed_logins: u32,
    /// Seconds a client has from connecting to finish logging in.
    pub login_timeout_secs: u64,
    /// Seconds of silence after login before autologout (RFC 1939: ≥ 600).
    pub idle_timeout_secs: u64,
    /// Connections served at once; more get `-ERR [SYS/TEMP]` and are closed.
    pub max_connections: usize,
    /// Connections from one client address at once.
    pub max_connections_per_address: usize,
    /// On SIGTERM/SIGINT, seconds sessions may take to finish.
    pub shutdown_grace_secs: u64,
    /// On SIGTERM/SIGINT, seconds popgate keeps accepting new connections
    /// while `/readyz` already says 503, before the grace period starts:
    /// time for a load balancer (or Kubernetes' endpoints) to stop sending
    /// clients, so a rolling update refuses nobody.
    pub drain_delay_secs: u64,
    /// Exact message sizes remembered across sessions (entries).
    pub size_cache_entries: u64,
    /// Submission: the largest message accepted (octets; advertised as SIZE).
    pub submission_max_message_size: u64,
    /// Submission: recipients of one message.
    pub submission_max_recipients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command_line: 255,
            auth_line: 8192,
            max_failed_logins: 3,
            login_timeout_secs: 60,
            idle_timeout_secs: 600,
            max_connections: 1000,
            max_connections_per_address: 100,
            shutdown_grace_secs: 30,
            drain_delay_secs: 0,
            size_cache_entries: 1_000_000,
            submission_max_message_size: 25 * 1024 * 1024,
            submission_max_recipients: 50,
        }
    }
}

/// The admin HTTP listener: /metrics, /healthz, /readyz, and the admin
/// page at `/` (see docs/ADMIN.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Keep it on loopback or a management network. The probes and metrics
    /// are not authenticated; the admin page is, off loopback, once
    /// `password_hash` or `token_file` is set (without either it answers
    /// loopback clients only).
    pub address: SocketAddr,
    /// Pass-through mode: label metrics with each login name (unbounded
    /// series, and e-mail addresses in Prometheus) instead of one
    /// "pass-through" value. Configured accounts are always labelled by name.
    pub metrics_login_names: bool,
    /// The admin page's password, as an Argon2id PHC string (`popgate
    /// passwd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// A file whose first line is a token the admin page accepts as its
    /// password (e.g. a mounted Secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// Where the page keeps the devices it added or changed. Unset:
    /// `admin-state.toml` beside the token store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<std::path::PathBuf>,
    /// How long an admin sign-in lasts.
    pub session_secs: u64,
    /// Mark the session cookie `Secure`: set it when the page is reached
    /// through a TLS-terminating proxy (the listener itself is plain HTTP).
    pub cookie_secure: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            address: "127.0.0.1:9110".parse().expect("valid address"),
            metrics_login_names: false,
            password_hash: None,
            token_file: None,
            state_file: None,
            session_secs: 8 * 3600,
            cookie_secure: false,
        }
    }
}

impl AdminConfig {
    /// Bounds, and a password hash that is really an Argon2id hash.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        InvalidSetting::bounded("session_secs", self.session_secs, 60..=7 * 86_400)?;
        if let Some(hash) = &self.password_hash {
            crate::auth::passwords::DeviceHash::parse(hash)
                .map_err(|e| InvalidSetting::new("password_hash", e.to_string()))?;
        }
        Ok(())
    }

    /// Someone can sign in to the admin page (otherwise: loopback only).
    pub fn has_credentials(&self) -> bool {
        self.password_hash.is_some() || self.token_file.is_some()
    }
}

/// The longest any timer may be set to: a day. Far beyond any sensible
/// setting, and far from where `Instant + Duration` overflows.
pub const MAX_TIMER_SECS: u64 = 86_400;

/// The longest `[limits] drain_delay_secs`: load balancers and Kubernetes
/// notice a failing readiness probe (or a terminating pod) within seconds.
pub const MAX_DRAIN_DELAY_SECS: u64 = 30;

/// Checks `[[listener]]`, `[tls]` and `[limits]` together. The bounds are
/// documented in config/popgate.toml and docs/RELIABILITY.md.
pub fn check(listeners: &[ListenerConfig], tls: &TlsConfig, l: &Limits) -> Result<(), InvalidSetting> {
    if listeners.is_empty() {
        return Err(InvalidSetting::new("listener", "at least one listener is needed"));
    }
    InvalidSetting::bounded("limits.command_line", l.command_line, 255..=65_536)?;
    InvalidSetting::bounded("limits.auth_line", l.auth_line, 255..=1_048_576)?;
    InvalidSetting::bounded("limits.max_failed_logins", l.max_failed_logins, 1..=100)?;
    InvalidSetting::bounded("limits.login_timeout_secs", l.login_timeout_secs, 1..=3_600)?;
    // RFC 1939: the autologout timer is at least 10 minutes.
    InvalidSetting::bounded("limits.idle_timeout_secs", l.idle_timeout_secs, 600..=MAX_TIMER_SECS)?;
    InvalidSetting::bounded("limits.max_connections", l.max_connections, 1..=1_000_000)?;
    InvalidSetting::bounded("limits.max_connections_per_address", l.max_connections_per_address, 1..=1_000_000)?;
    InvalidSetting::bounded("limits.shutdown_grace_secs", l.shutdown_grace_secs, 0..=3_600)?;
    // Short by design: a longer delay only postpones the drain.
    InvalidSetting::bounded("limits.drain_delay_secs", l.drain_delay_secs, 0..=MAX_DRAIN_DELAY_SECS)?;
    InvalidSetting::bounded("limits.size_cache_entries", l.size_cache_entries, 0..=100_000_000)?;
    InvalidSetting::bounded("limits.submission_max_message_size", l.submission_max_message_size, 1_024..=157_286_400)?;
    InvalidSetting::bounded("limits.submission_max_recipients", l.submission_max_recipients, 1..=1_000)?;
    InvalidSetting::bounded("tls.reload_check_secs", tls.reload_check_secs, 0..=MAX_TIMER_SECS)?;
    if listeners.iter().any(|l| l.tls != ListenerTls::None) && tls.certificates.is_empty() {
        return Err(InvalidSetting::new("tls.certificates", "a listener uses TLS but no certificate is configured"));
    }
    Ok(())
}
