//! The submission driver (scan to email): reads bytes, frames lines, feeds
//! the `smtp::Session`, performs the step it is handed, writes — the SMTP
//! twin of `connection.rs`. Logins go through the same throttle and router
//! as POP3 logins; a message is relayed synchronously to the account's
//! upstream with the account's credentials (a password, or an OAuth token
//! with one refresh when refused), so the device's DATA is answered 250 only
//! once the upstream accepted it and nothing is ever queued here.
//!
//! The relay client is lettre (maintained, async on tokio, rustls, AUTH
//! PLAIN/LOGIN/XOAUTH2, `send_raw` of the device's exact octets), not a
//! hand-written SMTP client. No SMTP rule lives here; secrets are never
//! logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::AsyncTransport;
use lettre::transport::smtp::authentication::{Credentials as SmtpCredentials, Mechanism as SmtpMechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, Tokio1Executor};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::Context;
use super::config::Limits;
use super::policy::{ListenerTls, LoginPolicy};
use super::stream::{ClientRead, ClientStream};
use crate::auth::accounts::Route;
use crate::auth::accounts::config::{ForeignSender, RelayTls, RelayUrl, SubmissionConfig};
use crate::backend::gmail::GmailBackend;
use crate::backend::graph::GraphBackend;
use crate::backend::select::BackendConfig;
use crate::backend::send::SendRefusal;
use crate::config::Config;
use crate::mail::{BackendError, Credentials, Proof, Secret};
use crate::smtp::{Envelope, LineReader, RelayFailure, Reply, SenderRules, Session, SessionConfig, Step};
use crate::telemetry::ListenerLabels;

const READ_CHUNK: usize = 8192;

/// Where one account's messages go.
enum Upstream {
    /// An SMTP relay, with extra trusted roots (PEM) read at startup.
    Smtp { relay: RelayUrl, ca: Option<Vec<u8>> },
    /// Microsoft Graph `sendMail` with the account's Graph token.
    Graph(GraphBackend),
    /// Gmail API `users.messages.send` with the account's API token.
    Gmail(GmailBackend),
}

/// One account's submission settings, resolved at startup.
struct AccountRelay {
    upstream: Upstream,
    settings: SubmissionConfig,
    /// The configured address, or `login` for mapped accounts.
    address: Option<String>,
}

/// Every account's relay and each device's hourly counts.
pub struct Relays {
    accounts: HashMap<String, AccountRelay>,
    /// Device user → (window start, messages, recipients).
    sent: Mutex<HashMap<String, (Instant, u32, u32)>>,
}

impl Relays {
    /// Resolves every `[account.submission]` (relay URL, CA file). Fails
    /// on a file that cannot be read, so a bad setup stops at startup.
    pub fn from_config(config: &Config) -> std::io::Result<Relays> {
        let mut accounts = HashMap::new();
        for account in &config.account {
            let Some(settings) = &account.submission else { continue };
            let backend = config.accounts().backend_named(&account.backend).cloned().unwrap_or_default();
            let failed = |why: String| std::io::Error::other(format!("account `{}`: submission: {why}", account.name));
            let upstream = match &backend {
                BackendConfig::Graph(graph) if settings.sends_through_api(&backend) => {
                    Upstream::Graph(GraphBackend::new(graph.clone()).map_err(|e| failed(e.to_string()))?)
                }
                BackendConfig::Gmail(gmail) if settings.sends_through_api(&backend) => {
                    Upstream::Gmail(GmailBackend::new(gmail.clone()).map_err(|e| failed(e.to_string()))?)
                }
                _ => {
                    let relay = settings.relay_url(&backend).map_err(|why| failed(format!("relay: {why}")))?;
                    let ca = match &settings.relay_ca_file {
                        Some(path) => Some(
                            std::fs::read(path)
                                .map_err(|e| failed(format!("relay_ca_file {}: {e}", path.display())))?,
                        ),
                        None => None,
                    };
                    Upstream::Smtp { relay, ca }
                }
            };
            let address = settings.address.clone().or_else(|| account.login.clone());
            accounts.insert(account.name.clone(), AccountRelay { upstream, settings: settings.clone(), address });
        }
        Ok(Relays { accounts, sent: Mutex::new(HashMap::new()) })
    }

    /// Counts one message to `recipients` for `device`, or refuses it when
    /// the rolling hour's allowance is spent.
    fn take_allowance(&self, device: &str, settings: &SubmissionConfig, recipients: usize) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Bounded: forget devices whose hour is over.
        if sent.len() > 10_000 {
            sent.retain(|_, (start, _, _)| now.duration_since(*start) < Duration::from_secs(3600));
        }
        let entry = sent.entry(device.to_string()).or_insert((now, 0, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(3600) {
            *entry = (now, 0, 0);
        }
        let recipients = u32::try_from(recipients).unwrap_or(u32::MAX);
        if entry.1 >= settings.max_messages_per_hour
            || entry.2.saturating_add(recipients) > settings.max_recipients_per_hour
        {
            return false;
        }
        entry.1 += 1;
        entry.2 = entry.2.saturating_add(recipients);
        true
    }
}

/// A logged-in device: where its messages go, as whom.
struct Authorized {
    route: Route,
    /// The account name (without a passthrough user).
    account: String,
    device: String,
    /// The device in metrics: a configured device user, or one value for
    /// every pass-through user (their names are not bounded).
    device_label: String,
}

/// Serves one accepted submission connection to the end.
pub async fn serve(
    mut stream: ClientStream,
    peer: SocketAddr,
    listener: &str,
    policy: LoginPolicy,
    context: Arc<Context>,
) {
    let session_id = super::connection::next_session_id();
    let span = tracing::info_span!("submission", %peer, session = session_id, user = tracing::field::Empty);
    let labels = ListenerLabels { listener: listener.to_string() };
    context.metrics.sessions_total.get_or_create(&labels).inc();
    let active = context.metrics.sessions_active.get_or_create(&labels).clone();
    active.inc();
    async move {
        tracing::debug!("connected");
        if policy.tls == ListenerTls::Implicit {
            let Some(tls) = context.tls.clone() else { return };
            let timeout = Duration::from_secs(context.limits().login_timeout_secs);
            match tokio::time::timeout(timeout, stream.upgrade(tls)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            }
        }
        let mut driver = Driver::new(stream, peer, policy, &context);
        let outcome = driver.run().await;
        tracing::debug!(?outcome, "disconnected");
    }
    .instrument(span)
    .await;
    active.dec();
}

/// Answers a connection over a limit (421) and closes it.
pub async fn refuse_busy<S: AsyncWrite + Unpin>(mut stream: S, peer: SocketAddr, why: &str) {
    tracing::warn!(%peer, why, "connection limit reached; refusing");
    let reply = Reply::with(421, (4, 3, 2), format!("{why}; try again later"));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&reply.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

#[derive(Debug)]
enum Outcome {
    Closed,
    Disconnected,
    TimedOut,
    ShutDown,
    Io(#[allow(dead_code)] std::io::Error),
}

struct Driver<'a> {
    stream: ClientStream,
    limits: Arc<Limits>,
    peer: SocketAddr,
    policy: LoginPolicy,
    context: &'a Context,
    session: Session,
    reader: LineReader,
    out: Vec<u8>,
    authorized: Option<Authorized>,
}

impl<'a> Driver<'a> {
    fn new(stream: ClientStream, peer: SocketAddr, policy: LoginPolicy, context: &'a Context) -> Self {
        let limits = context.limits();
        let tls_active = stream.is_tls();
        let config = SessionConfig {
            auth_line_limit: limits.auth_line,
            max_message_size: limits.submission_max_message_size,
            max_recipients: limits.submission_max_recipients,
            max_failed_logins: limits.max_failed_logins,
            login_permitted: policy.login_permitted(peer.ip(), tls_active),
            starttls_offered: context.tls.is_some() && policy.stls_offered(tls_active),
            ..SessionConfig::default()
        };
        Driver {
            stream,
            limits,
            peer,
            policy,
            context,
            session: Session::new(config),
            reader: LineReader::new(),
            out: Vec::with_capacity(1024),
            authorized: None,
        }
    }

    async fn run(&mut self) -> Outcome {
        match self.serve_lines().await {
            Ok(outcome) => outcome,
            Err(e) if is_disconnect(&e) => Outcome::Disconnected,
            Err(e) => Outcome::Io(e),
        }
    }

    async fn serve_lines(&mut self) -> std::io::Result<Outcome> {
        self.session.greeting().write_to(&mut self.out);
        let login_deadline = Instant::now() + Duration::from_secs(self.limits.login_timeout_secs);
        // RFC 5321 4.5.3.2: servers wait at least 5 minutes for a command.
        let idle = Duration::from_secs(self.limits.idle_timeout_secs);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            while let Some(line) = self.reader.next_line(self.session.line_limit()) {
                let step = self.session.on_line(line);
                if let Some(outcome) = self.perform(step).await? {
                    return Ok(outcome);
                }
            }
            self.flush().await?;
            let deadline = if self.session.is_authenticated() {
                Instant::now() + idle
            } else {
                login_deadline.min(Instant::now() + idle)
            };
            match self.stream.read_before(&mut buf, deadline, self.context.stopped()).await? {
                ClientRead::Stopped => {
                    let reply = self.session.shutting_down();
                    return self.close_with(reply, Outcome::ShutDown).await;
                }
                ClientRead::TimedOut => {
                    let reply = self.session.timed_out();
                    return self.close_with(reply, Outcome::TimedOut).await;
                }
                ClientRead::Closed => return Ok(Outcome::Disconnected),
                ClientRead::Data(n) => self.reader.push(&buf[..n]),
            }
        }
    }

    /// Performs one step; `Some` when the connection must end.
    async fn perform(&mut self, step: Step) -> std::io::Result<Option<Outcome>> {
        match step {
            Step::Read => {}
            Step::Reply(reply) => self.reply(reply),
            Step::Refused { reply, rule } => {
                if let Some(authorized) = &self.authorized {
                    tracing::info!(device = %authorized.device, rule = rule.label(), "refused by the account's envelope rules");
                    self.context.metrics.submission_refused(
                        &authorized.account,
                        &authorized.device_label,
                        rule.label(),
                    );
                }
                self.reply(reply)
            }
            Step::Close(reply) => return self.close_with(reply, Outcome::Closed).await.map(Some),
            Step::Login(credentials) => {
                self.flush().await?;
                let step = match self.log_in(&credentials).await {
                    None => {
                        let reply = self.session.shutting_down();
                        return self.close_with(reply, Outcome::ShutDown).await.map(Some);
                    }
                    Some(Ok((authorized, rules))) => {
                        tracing::Span::current().record("user", credentials.user.as_str());
                        tracing::info!(account = %authorized.account, "submission login");
                        self.authorized = Some(authorized);
                        self.session.login_succeeded(rules)
                    }
                    Some(Err(e)) => self.session.login_failed(&e),
                };
                return Box::pin(self.perform(step)).await;
            }
            Step::Relay { envelope, message } => {
                self.flush().await?;
                let result = tokio::select! {
                    biased;
                    _ = self.context.stopped() => {
                        let reply = self.session.shutting_down();
                        return self.close_with(reply, Outcome::ShutDown).await.map(Some);
                    }
                    result = self.relay(&envelope, &message) => result,
                };
                self.context.activity.relayed(self.authorized.as_ref().map(|a| a.device.as_str()), &result);
                let step = self.session.relay_finished(result);
                return Box::pin(self.perform(step)).await;
            }
            Step::StartTls(reply) => {
                let Some(tls) = self.context.tls.clone() else {
                    self.reply(Reply::with(454, (4, 7, 0), "TLS not available"));
                    return Ok(None);
                };
                self.reply(reply);
                self.flush().await?;
                // RFC 3207 / CVE-2011-0411: commands pipelined after
                // STARTTLS were sent in the clear; never read them.
                if self.reader.buffered() > 0 {
                    tracing::warn!(octets = self.reader.buffered(), "discarding plaintext pipelined after STARTTLS");
                }
                self.reader.clear();
                let timeout = Duration::from_secs(self.limits.login_timeout_secs);
                match tokio::time::timeout(timeout, self.stream.upgrade(tls)).await {
                    Ok(Ok(())) => {
                        let permitted = self.policy.login_permitted(self.peer.ip(), true);
                        self.session.tls_started(permitted);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "STARTTLS handshake failed");
                        return Ok(Some(Outcome::Closed));
                    }
                    Err(_) => return Ok(Some(Outcome::TimedOut)),
                }
            }
        }
        Ok(None)
    }

    /// The throttle's delay, the router, and (pass-through users, whose
    /// password only the upstream can check) a login at the upstream.
    async fn log_in(&self, credentials: &Credentials) -> Option<Result<(Authorized, SenderRules), BackendError>> {
        let context = self.context;
        let peer = self.peer.ip();
        let delay = context.throttle.delay_shared(peer, &credentials.user).await;
        let result = tokio::select! {
            _ = context.stopped() => return None,
            result = async {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let result = self.authorize(credentials).await;
                if let Err(BackendError::AuthFailed | BackendError::BadCredentials(_)) = &result {
                    let more = context.throttle.failure_delay_shared(&credentials.user, delay).await;
                    context.throttle.record_failure_shared(peer, &credentials.user).await;
                    if !more.is_zero() {
                        tokio::time::sleep(more).await;
                    }
                }
                result
            } => result,
        };
        match &result {
            Ok(_) => {
                context.throttle.record_success_shared(peer, &credentials.user).await;
                context.metrics.login("success", "ok");
            }
            Err(e) => {
                context.metrics.login("failure", "submission");
                tracing::info!(user = %credentials.user, error = %e, "submission login failed");
            }
        }
        Some(result)
    }

    async fn authorize(&self, credentials: &Credentials) -> Result<(Authorized, SenderRules), BackendError> {
        let route = self.context.router.route(credentials).await?;
        // A pass-through route is named "account:user" (account names
        // cannot hold a colon).
        let (account, passthrough) = match route.account.split_once(':') {
            Some((account, _)) => (account.to_string(), true),
            None => (route.account.clone(), false),
        };
        let Some(relay) = self.context.submission.accounts.get(&account) else {
            tracing::info!(%account, "login on the submission port of an account without [account.submission]");
            return Err(BackendError::Permanent("no submission for this account".into()));
        };
        if passthrough {
            // The router took the client's word; the upstream checks it.
            let Upstream::Smtp { relay: url, ca } = &relay.upstream else {
                return Err(BackendError::Permanent("pass-through users send through an SMTP relay".into()));
            };
            let transport = transport(url, ca.as_deref(), &relay.settings, &route.credentials)?;
            match transport.test_connection().await.map_err(|e| classify(&e)) {
                Ok(_) => {}
                Err(SendError::Refused { auth: true, .. }) => return Err(BackendError::AuthFailed),
                Err(e) => return Err(BackendError::unavailable(format!("relay: {e:?}"))),
            }
        }
        let own = relay.address.clone().unwrap_or_else(|| route.credentials.user.clone());
        let mut addresses = vec![own];
        addresses.extend(relay.settings.aliases.iter().cloned());
        let rules = SenderRules {
            addresses,
            rewrite: relay.settings.foreign_sender == ForeignSender::Rewrite,
            recipient_domains: relay.settings.recipient_domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        };
        let device_label =
            if passthrough { crate::telemetry::PASS_THROUGH_ACCOUNT.to_string() } else { credentials.user.clone() };
        Ok((Authorized { route, account, device: credentials.user.clone(), device_label }, rules))
    }

    /// Relays one message; `Ok` only once the upstream accepted it.
    async fn relay(&mut self, envelope: &Envelope, message: &[u8]) -> Result<(), RelayFailure> {
        let Some(authorized) = self.authorized.as_mut() else { return Err(RelayFailure::Unavailable) };
        let submission = &self.context.submission;
        let Some(relay) = submission.accounts.get(&authorized.account) else { return Err(RelayFailure::Unavailable) };
        if !submission.take_allowance(&authorized.device, &relay.settings, envelope.recipients.len()) {
            tracing::warn!(device = %authorized.device, "hourly sending allowance spent; refusing");
            self.context.metrics.submission_refused(&authorized.account, &authorized.device_label, "rate_limited");
            return Err(RelayFailure::RateLimited);
        }
        if !matches!(relay.upstream, Upstream::Smtp { .. }) {
            // A mail API sends to the message's headers, not to RCPT TO:
            // the two must agree, or the recipient rules (and the 250) would
            // be about other people than those who get the message.
            let mut headers = crate::smtp::header_recipients(message);
            let mut rcpts: Vec<String> = envelope.recipients.iter().map(|r| r.to_ascii_lowercase()).collect();
            headers.sort();
            headers.dedup();
            rcpts.sort();
            rcpts.dedup();
            if headers != rcpts {
                tracing::warn!(device = %authorized.device, "To/Cc/Bcc differ from RCPT TO; refused (the mail API sends by the headers)");
                self.context.metrics.submission_refused(
                    &authorized.account,
                    &authorized.device_label,
                    "upstream_permanent",
                );
                return Err(RelayFailure::Upstream {
                    code: 554,
                    text: "5.6.0 this account sends through a mail API, which sends to the To/Cc/Bcc headers: they \
                           must name exactly the RCPT TO recipients"
                        .into(),
                });
            }
        }
        let lettre_envelope = to_lettre_envelope(envelope)
            .map_err(|why| RelayFailure::Upstream { code: 553, text: format!("5.1.3 {why}") })?;
        let started = std::time::Instant::now();
        let mut result = send(relay, &authorized.route.credentials, &lettre_envelope, message).await;
        if let Err(SendError::Refused { auth: true, .. }) = &result
            && let Ok(Some(fresh)) = self.context.router.refresh(&authorized.route).await
        {
            // The held token expired (or the password was rotated): one
            // refresh, one retry.
            tracing::info!(account = %authorized.account, "upstream refused the held credentials; refreshed, retrying once");
            authorized.route.credentials = fresh;
            result = send(relay, &authorized.route.credentials, &lettre_envelope, message).await;
        }
        self.context.metrics.backend_op("submission", "relay", started.elapsed());
        let outcome = match result {
            Ok(()) => Ok(()),
            Err(SendError::Refused { auth: true, .. }) => Err(RelayFailure::Credentials),
            Err(SendError::Refused { code, text, .. }) => Err(RelayFailure::Upstream { code, text }),
            Err(SendError::Unreachable(why)) => {
                tracing::warn!(error = %why, "upstream unreachable");
                Err(RelayFailure::Unavailable)
            }
        };
        match &outcome {
            Ok(()) => self.context.metrics.submission_sent(&authorized.account, &authorized.device_label),
            Err(failure) => {
                let reason = match failure {
                    RelayFailure::Upstream { code, .. } if *code >= 500 => "upstream_permanent",
                    RelayFailure::Upstream { .. } => "upstream_temporary",
                    RelayFailure::Credentials => "credentials",
                    RelayFailure::RateLimited => "rate_limited",
                    RelayFailure::Unavailable => "unavailable",
                };
                self.context.metrics.submission_refused(&authorized.account, &authorized.device_label, reason);
            }
        }
        match &outcome {
            Ok(()) => tracing::info!(
                account = %authorized.account,
                device = %authorized.device,
                recipients = envelope.recipients.len(),
                octets = message.len(),
                "message relayed"
            ),
            Err(failure) => tracing::warn!(
                account = %authorized.account,
                device = %authorized.device,
                ?failure,
                "message not relayed"
            ),
        }
        self.context.metrics.command("RELAY", outcome.is_ok());
        outcome
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.stream.send_queued(&mut self.out, Duration::from_secs(self.limits.idle_timeout_secs)).await
    }

    fn reply(&mut self, reply: Reply) {
        self.context.metrics.command(self.session.last_command(), reply.is_positive());
        reply.write_to(&mut self.out);
    }

    async fn close_with(&mut self, reply: Reply, outcome: Outcome) -> std::io::Result<Outcome> {
        self.reply(reply);
        self.flush().await?;
        let _ = self.stream.shutdown().await;
        Ok(outcome)
    }
}

type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// The upstream connection for one account, with its credentials.
fn transport(
    url: &RelayUrl,
    ca: Option<&[u8]>,
    settings: &SubmissionConfig,
    credentials: &Credentials,
) -> Result<Transport, BackendError> {
    let tls_parameters = || {
        let mut builder = TlsParameters::builder(url.host.clone());
        if let Some(pem) = ca {
            let cert = Certificate::from_pem(pem).map_err(|e| BackendError::Permanent(format!("relay CA: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        builder.build_rustls().map_err(|e| BackendError::Permanent(format!("relay TLS: {e}")))
    };
    let tls = match url.tls {
        RelayTls::StartTls => Tls::Required(tls_parameters()?),
        RelayTls::Implicit => Tls::Wrapper(tls_parameters()?),
        RelayTls::None => Tls::None,
    };
    let (secret, mechanisms) = match &credentials.proof {
        Proof::Password(p) => (p, vec![SmtpMechanism::Plain, SmtpMechanism::Login]),
        Proof::Bearer(t) => (t, vec![SmtpMechanism::Xoauth2]),
    };
    Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(url.host.clone())
        .port(url.port)
        .tls(tls)
        .credentials(SmtpCredentials::new(credentials.user.clone(), secret.expose().to_string()))
        .authentication(mechanisms)
        .timeout(Some(Duration::from_secs(settings.relay_timeout_secs)))
        .build())
}

/// How one attempt at the upstream failed.
#[derive(Debug)]
enum SendError {
    /// The upstream answered with this reply; `auth`: to AUTH.
    Refused { code: u16, text: String, auth: bool },
    /// No SMTP answer (connection refused, TLS failure, timeout).
    Unreachable(String),
}

async fn send(
    relay: &AccountRelay,
    credentials: &Credentials,
    envelope: &lettre::address::Envelope,
    message: &[u8],
) -> Result<(), SendError> {
    let (url, ca) = match &relay.upstream {
        Upstream::Smtp { relay: url, ca } => (url, ca.as_deref()),
        Upstream::Graph(graph) => return send_through_api(relay, credentials, |t| graph.send_mime(t, message)).await,
        Upstream::Gmail(gmail) => return send_through_api(relay, credentials, |t| gmail.send_mime(t, message)).await,
    };
    let transport =
        transport(url, ca, &relay.settings, credentials).map_err(|e| SendError::Unreachable(e.to_string()))?;
    // The session hands over whole CRLF lines; lettre writes the CRLF
    // before the final "." itself.
    let message = message.strip_suffix(b"\r\n").unwrap_or(message);
    // The whole exchange is bounded (lettre's timeout is per command).
    let limit = Duration::from_secs(relay.settings.relay_timeout_secs * 3);
    match tokio::time::timeout(limit, transport.send_raw(envelope, message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(SendError::Unreachable("upstream timed out".into())),
    }
}

/// One send through a mail API with the account's token; its refusal as
/// the SMTP reply a device understands.
async fn send_through_api<'a, F, Fut>(
    relay: &AccountRelay,
    credentials: &'a Credentials,
    send: F,
) -> Result<(), SendError>
where
    F: FnOnce(&'a Secret) -> Fut,
    Fut: std::future::Future<Output = Result<(), SendRefusal>>,
{
    let Proof::Bearer(token) = &credentials.proof else {
        return Err(SendError::Refused {
            code: 554,
            text: "5.7.0 this account has no OAuth token for its mail API".into(),
            auth: false,
        });
    };
    let limit = Duration::from_secs(relay.settings.relay_timeout_secs);
    match tokio::time::timeout(limit, send(token)).await {
        Err(_) => Err(SendError::Unreachable("the mail API timed out".into())),
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => Err(api_refusal(&refusal)),
    }
}

/// The one place a mail API's refusal becomes an SMTP reply: throttling and
/// server errors are temporary (the device tries again later), a message the
/// API will not send is permanent, with the RFC 3463 code that fits.
fn api_refusal(refusal: &SendRefusal) -> SendError {
    let detail = |status: &u16, reason: &str| {
        let reason = if reason.is_empty() { "no error code" } else { reason };
        format!(
            "HTTP {status} {}",
            reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(100).collect::<String>()
        )
    };
    match refusal {
        SendRefusal::Token => {
            SendError::Refused { code: 535, text: "5.7.8 the mail API refused the token".into(), auth: true }
        }
        SendRefusal::Temporary { status: 429, reason } => SendError::Refused {
            code: 451,
            text: format!("4.7.0 the mail API is throttling this account ({}); try again later", detail(&429, reason)),
            auth: false,
        },
        SendRefusal::Temporary { status, reason } => SendError::Refused {
            code: 451,
            text: format!("4.3.0 the mail API failed ({}); try again later", detail(status, reason)),
            auth: false,
        },
        SendRefusal::Permanent { status: 413, reason } => SendError::Refused {
            code: 552,
            text: format!("5.3.4 the mail API refused the message as too large ({})", detail(&413, reason)),
            auth: false,
        },
        SendRefusal::Permanent { status: 403, reason } => SendError::Refused {
            code: 550,
            text: format!("5.7.1 the mail API does not let this account send this message ({})", detail(&403, reason)),
            auth: false,
        },
        SendRefusal::Permanent { status, reason } => SendError::Refused {
            code: 554,
            text: format!("5.6.0 the mail API refused the message ({})", detail(status, reason)),
            auth: false,
        },
        SendRefusal::Unreachable(why) => SendError::Unreachable(why.clone()),
    }
}

fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    match e.status() {
        Some(code) => {
            let code: u16 = code.to_string().parse().unwrap_or(451);
            let text = upstream_text(e);
            // 530/534/535 (and Gmail's 454 4.7.0 for a bad token) answer AUTH.
            let auth = matches!(code, 530 | 534 | 535) || (code == 454 && text.to_ascii_lowercase().contains("auth"));
            SendError::Refused { code, text, auth }
        }
        // lettre 0.11 answers a 334 after the XOAUTH2 initial response —
        // the server's error challenge for a refused token (Google's and
        // RFC 7628's failure form) — with this client error instead of
        // reading the final 535: it is the token being refused.
        None if e.is_client() && e.to_string().contains("does not expect a challenge") => SendError::Refused {
            code: 535,
            text: "5.7.8 the upstream refused the token (XOAUTH2 error challenge)".into(),
            auth: true,
        },
        None => SendError::Unreachable(e.to_string()),
    }
}

fn to_lettre_envelope(envelope: &Envelope) -> Result<lettre::address::Envelope, String> {
    let parse = |a: &str| a.parse::<lettre::Address>().map_err(|e| format!("address {a}: {e}"));
    let from = parse(&envelope.sender)?;
    let to = envelope.recipients.iter().map(|r| parse(r)).collect::<Result<Vec<_>, _>>()?;
    lettre::address::Envelope::new(Some(from), to).map_err(|e| e.to_string())
}

/// The upstream's reply text, without lettre's prefix.
fn upstream_text(e: &lettre::transport::smtp::Error) -> String {
    let text = e.to_string();
    match text.split_once("): ") {
        Some((_, rest)) => rest.to_string(),
        None => text,
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof)
}
