//! The per-connection driver: reads bytes, frames lines, feeds the session,
//! performs the step it is handed, writes. No POP3 rule lives here — only
//! I/O, timeouts and the order of operations.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::Context;
use super::config::Limits;
use super::login::{self, LoggedIn};
use super::policy::{ListenerTls, LoginPolicy};
use super::stream::{ClientRead, ClientStream};
use crate::auth::accounts::policy::Notice;
use crate::auth::accounts::seen;
use crate::backend::pool::{Borrowed, SharedMailbox};
use crate::backend::{Disposal, Mailbox};
use crate::mail::{BackendError, StoreId};
use crate::pop3::response::ResponseCode;
use crate::pop3::sasl::Mechanism;
use crate::pop3::{BodyEncoder, LineReader, Response, Session, SessionConfig, Step};
use crate::telemetry::{ListenerLabels, Refusal};

/// Flush a message body to the socket whenever this much is pending.
const WRITE_CHUNK: usize = 64 * 1024;
const READ_CHUNK: usize = 4096;
/// Backend chunks fetched ahead of the one being written.
const PREFETCH_CHUNKS: usize = 2;

/// Serves one accepted connection to the end.
pub async fn serve(
    mut stream: ClientStream,
    peer: SocketAddr,
    listener: &str,
    policy: LoginPolicy,
    context: Arc<Context>,
) {
    let session_id = next_session_id();
    let span = tracing::info_span!("session", %peer, session = session_id, user = tracing::field::Empty, backend = context.backend.kind());
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
                Ok(Err(e)) => {
                    context.metrics.refused(Refusal::TlsHandshakeFailed);
                    return tracing::debug!(error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    context.metrics.refused(Refusal::TlsHandshakeTimeout);
                    return tracing::debug!("TLS handshake timed out");
                }
            }
        }
        let mut driver = Driver::new(stream, peer, policy, &context);
        let outcome = driver.run().await;
        context.activity.session_ended();
        driver.log_client_left_unable_to_log_in();
        if let Some(backend) = driver.backend.take() {
            backend.end().await;
        }
        tracing::debug!(?outcome, "disconnected");
    }
    .instrument(span)
    .await;
    active.dec();
}

/// Answers a connection over a limit and closes it.
pub async fn refuse_busy<S>(mut stream: S, peer: SocketAddr, why: &str)
where
    S: AsyncWrite + Unpin,
{
    tracing::warn!(%peer, why, "connection limit reached; refusing");
    let reply = Response::err_code(ResponseCode::SysTemp, format!("{why}; try again later"));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&reply.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

pub(super) fn next_session_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug)]
enum Outcome {
    /// The session ended itself (QUIT, too many failures, …).
    Closed,
    /// The client went away.
    Disconnected,
    TimedOut,
    ShutDown,
    Io(#[allow(dead_code)] std::io::Error),
}

struct Driver<'a> {
    stream: ClientStream,
    /// The limits in force when the connection started (a reload applies
    /// to new connections).
    limits: Arc<Limits>,
    peer: SocketAddr,
    policy: LoginPolicy,
    context: &'a Context,
    session: Session,
    reader: LineReader,
    out: Vec<u8>,
    /// The account's backend connections once logged in: each backend call
    /// borrows one and gives it back.
    backend: Option<SharedMailbox>,
    /// The user name once logged in (for the per-account metric).
    account: Option<String>,
    /// Each listed message's UIDL, by store id: a RETR whose octets
    /// disagree with LIST corrects the remembered size under it.
    uidls: std::collections::HashMap<StoreId, String>,
    /// The device's DELE is a dry run (`on_delete = "keep"`).
    keep: bool,
    /// What removing means for this device (`on_delete`), set on every
    /// connection the UPDATE borrows.
    disposal: Disposal,
    /// The kind of backend the login was routed to (metrics label).
    backend_kind: &'static str,
    /// `each_device_once`: the device's record, and the messages this
    /// session retrieved whole (RETR to the end), recorded at UPDATE.
    visit: Option<seen::Visit>,
    retrieved: Vec<StoreId>,
    /// `oversize = "notice"`: the notices in the maildrop, by their ids
    /// there, served from memory (never fetched from the backend).
    notices: std::collections::HashMap<StoreId, Notice>,
    /// A refused login was logged (the end of the connection says no more).
    refusal_logged: bool,
}

impl<'a> Driver<'a> {
    fn new(stream: ClientStream, peer: SocketAddr, policy: LoginPolicy, context: &'a Context) -> Self {
        let limits = context.limits();
        let tls_active = stream.is_tls();
        let mut mechanisms = vec![Mechanism::Plain, Mechanism::Login];
        if context.router.accepts_bearer_tokens() {
            mechanisms.extend([Mechanism::XOAuth2, Mechanism::OAuthBearer]);
        }
        let config = SessionConfig {
            command_line_limit: limits.command_line,
            auth_line_limit: limits.auth_line,
            max_failed_logins: limits.max_failed_logins,
            login_permitted: policy.login_permitted(peer.ip(), tls_active),
            stls_offered: context.tls.is_some() && policy.stls_offered(tls_active),
            mechanisms,
            ..SessionConfig::default()
        };
        Driver {
            stream,
            limits: limits.clone(),
            peer,
            policy,
            context,
            session: Session::new(config),
            reader: LineReader::new(),
            out: Vec::with_capacity(1024),
            backend: None,
            account: None,
            uidls: std::collections::HashMap::new(),
            keep: false,
            disposal: Disposal::AsConfigured,
            backend_kind: context.backend.kind(),
            visit: None,
            retrieved: Vec::new(),
            notices: std::collections::HashMap::new(),
            refusal_logged: false,
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
        let idle = Duration::from_secs(self.limits.idle_timeout_secs);
        let mut buf = [0u8; READ_CHUNK];
        // When the last read returned: the replies to what it brought are
        // timed from there (`popgate_command_service_seconds`).
        let mut read_at: Option<std::time::Instant> = None;
        let mut answered = false;
        loop {
            // Answer every complete line already received (pipelining) before
            // reading again.
            while let Some(line) = self.reader.next_line(self.session.line_limit()) {
                let step = self.session.on_line(line);
                answered = true;
                self.log_refused_login(&step);
                if let Some(outcome) = self.perform(step).await? {
                    return Ok(outcome);
                }
                // Replies to a long pipelined burst go out as they grow, so
                // the buffer stays bounded (the socket's back-pressure then
                // slows the client down).
                if self.out.len() >= WRITE_CHUNK {
                    self.flush().await?;
                }
            }
            self.flush().await?;
            if let Some(read_at) = read_at.take()
                && std::mem::take(&mut answered)
            {
                self.context.metrics.command_served(self.session.last_command(), read_at.elapsed());
            }
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
                ClientRead::Data(n) => {
                    read_at = Some(std::time::Instant::now());
                    self.reader.push(&buf[..n]);
                }
            }
        }
    }

    /// A login the listener's policy refused is logged at info, with the
    /// client's address and the reason — a printer that only says
    /// "authentication failed" is diagnosed from here. Never the password.
    fn log_refused_login(&mut self, step: &Step) {
        let command = self.session.last_command();
        if matches!(step, Step::Reply(reply) if !reply.is_ok())
            && matches!(command, "USER" | "PASS" | "AUTH")
            && !self.session.is_authenticated()
            && !self.stream.is_tls()
            && let Some(reason) = self.policy.cleartext_refusal(self.peer.ip())
        {
            tracing::info!(peer = %self.peer.ip(), command, reason, "login refused: cleartext login not allowed");
            self.refusal_logged = true;
        }
    }

    /// A client that read CAPA (no USER, no SASL) and left without trying
    /// to log in was refused as surely: logged like a refusal, once.
    fn log_client_left_unable_to_log_in(&self) {
        if self.refusal_logged
            || self.account.is_some()
            || self.stream.is_tls()
            || self.session.last_command() == "NONE"
        {
            return;
        }
        if let Some(reason) = self.policy.cleartext_refusal(self.peer.ip()) {
            tracing::info!(
                peer = %self.peer.ip(),
                reason,
                "login refused: cleartext login not allowed, and the client left without trying (CAPA offered no login)"
            );
        }
    }

    /// Performs one step; `Some` when the connection must end.
    async fn perform(&mut self, step: Step) -> std::io::Result<Option<Outcome>> {
        match step {
            Step::Reply(reply) => self.reply(reply),
            Step::Close(reply) => {
                if reply.is_ok()
                    && let Some(account) = &self.account
                {
                    self.context.metrics.account_succeeded(account);
                }
                if reply.is_ok() && self.session.entered_update() && self.visit.is_some() && !self.retrieved.is_empty()
                {
                    // UPDATE without marks: what was retrieved is recorded
                    // all the same. Failing to record loses nothing: the
                    // device gets those messages again.
                    self.flush().await?;
                    let committing = self.context.updates.enter();
                    if let Err(e) = self.commit_visit(&[]).await {
                        tracing::warn!(error = %e, "each_device_once: retrieved messages not recorded");
                    }
                    drop(committing);
                }
                return self.close_with(reply, Outcome::Closed).await.map(Some);
            }
            Step::Login(credentials) => {
                self.flush().await?;
                let step = match login::log_in(self.context, self.peer.ip(), &credentials).await {
                    None => {
                        let reply = self.session.shutting_down();
                        return self.close_with(reply, Outcome::ShutDown).await.map(Some);
                    }
                    Some(Ok(LoggedIn {
                        backend,
                        reused: _,
                        maildrop,
                        account,
                        backend_kind,
                        keep,
                        disposal,
                        visit,
                        retention,
                        notices,
                    })) => {
                        self.visit = visit;
                        self.disposal = disposal;
                        self.backend_kind = backend_kind;
                        self.keep = keep;
                        self.backend = Some(backend);
                        self.account = Some(account);
                        self.uidls = maildrop.visible().map(|(_, m)| (m.id.clone(), m.uidl.clone())).collect();
                        // A notice's DELE is its original's: the original's
                        // UIDL for the UPDATE's records and logs.
                        self.uidls.extend(notices.values().map(|n| (n.original.clone(), n.original_uidl.clone())));
                        self.notices = notices;
                        self.session.login_succeeded_with(maildrop, retention)
                    }
                    Some(Err(login::LoginError::Backend(e))) => self.session.login_failed(&e),
                    Some(Err(login::LoginError::TooSoon)) => self.session.login_delayed(),
                };
                return Box::pin(self.perform(step)).await;
            }
            Step::Send { id, ok, encoder, expected_octets } => {
                return self.send_message(id, ok, encoder, expected_octets).await;
            }
            Step::Update(ids) => {
                let ids = self.originals(ids);
                self.flush().await?;
                let started = std::time::Instant::now();
                let committing = self.context.updates.enter();
                let result = if self.visit.is_some() {
                    self.commit_visit(&ids).await
                } else {
                    match self.backend.as_mut() {
                        // Nothing to remove: no connection is borrowed for it.
                        Some(_) if ids.is_empty() => Ok(0),
                        Some(_) if self.keep => {
                            // on_delete = "keep": a dry run.
                            let uidls: Vec<&str> =
                                ids.iter().filter_map(|id| self.uidls.get(id)).map(String::as_str).collect();
                            tracing::info!(would_remove = ids.len(), uidls = ?uidls, "on_delete = keep: nothing removed");
                            Ok(0)
                        }
                        Some(backend) => match backend.borrow().await {
                            Ok(mut lent) => {
                                let removed = match lent.mailbox().dispose_as(&self.disposal) {
                                    Ok(()) => lent.mailbox().remove(&ids).await,
                                    Err(e) => Err(e),
                                };
                                backend.give_back(lent, removed.is_ok()).await;
                                removed.map(|()| ids.len())
                            }
                            Err(e) => Err(e),
                        },
                        None => Err(BackendError::unavailable("no backend session")),
                    }
                };
                self.context.activity.committed(&result);
                let metrics = &self.context.metrics;
                if !self.keep {
                    metrics.backend_op(self.backend_kind, "remove", started.elapsed());
                    metrics.deleted(result.is_ok(), ids.len() as u64);
                }
                match &result {
                    Ok(n) => tracing::info!(removed = n, "update committed"),
                    Err(e) => {
                        metrics.backend_error(self.backend_kind, login::error_class(e));
                        tracing::warn!(error = %e, requested = ids.len(), "update failed")
                    }
                }
                let reply = self.session.update_finished(result);
                let closed = Box::pin(self.perform(Step::Close(reply))).await;
                // Shutdown waits for this session until its reply is out.
                drop(committing);
                return closed;
            }
            Step::StartTls(reply) => {
                let Some(tls) = self.context.tls.clone() else {
                    self.reply(Response::err("STLS not available here"));
                    return Ok(None);
                };
                self.reply(reply);
                self.flush().await?;
                // Anything the client sent after STLS, before the handshake,
                // was sent in the clear: it must never be read as a command.
                if self.reader.buffered() > 0 {
                    tracing::warn!(octets = self.reader.buffered(), "discarding plaintext pipelined after STLS");
                }
                self.reader.clear();
                let timeout = Duration::from_secs(self.limits.login_timeout_secs);
                match tokio::time::timeout(timeout, self.stream.upgrade(tls)).await {
                    Ok(Ok(())) => {
                        let permitted = self.policy.login_permitted(self.peer.ip(), true);
                        self.session.tls_started(permitted);
                        tracing::debug!("STLS negotiated");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "STLS handshake failed");
                        return Ok(Some(Outcome::Closed));
                    }
                    Err(_) => return Ok(Some(Outcome::TimedOut)),
                }
            }
        }
        Ok(None)
    }

    /// The marked ids with each notice's replaced by its original's (the
    /// message its DELE removes), each once.
    fn originals(&self, ids: Vec<StoreId>) -> Vec<StoreId> {
        let mut originals: Vec<StoreId> = Vec::with_capacity(ids.len());
        for id in ids {
            let id = self.notices.get(&id).map_or(id, |notice| notice.original.clone());
            if !originals.contains(&id) {
                originals.push(id);
            }
        }
        originals
    }

    /// RETR or TOP of a notice: from memory, through the same encoder
    /// (dot-stuffing, TOP's line count, the size check), no backend call.
    fn send_notice(
        &mut self,
        notice: &Notice,
        ok: Response,
        mut encoder: BodyEncoder,
        expected_octets: Option<u64>,
    ) -> Option<Outcome> {
        ok.write_to(&mut self.out);
        encoder.push(&notice.bytes, &mut self.out);
        encoder.finish(&mut self.out);
        let metrics = &self.context.metrics;
        if let Some(expected) = expected_octets
            && encoder.octets() != expected
        {
            // Cannot happen (the size is the built octets'): never send a
            // message that disagrees with LIST.
            tracing::error!(expected, sent = encoder.octets(), "notice size differs from LIST: closing");
            metrics.command(self.session.last_command(), false);
            self.out.clear();
            return Some(Outcome::Closed);
        }
        metrics.retrieved_bytes.inc_by(encoder.octets());
        metrics.command(self.session.last_command(), true);
        self.context.activity.sent_message(expected_octets.is_some());
        if expected_octets.is_some() && self.visit.is_some() && !self.retrieved.contains(&notice.original) {
            self.retrieved.push(notice.original.clone());
        }
        None
    }

    async fn send_message(
        &mut self,
        id: StoreId,
        ok: Response,
        mut encoder: BodyEncoder,
        expected_octets: Option<u64>,
    ) -> std::io::Result<Option<Outcome>> {
        if let Some(notice) = self.notices.get(&id).cloned() {
            return Ok(self.send_notice(&notice, ok, encoder, expected_octets));
        }
        let started = std::time::Instant::now();
        // The connection is borrowed for the stream's length; a client gone
        // mid-stream ends this call at `?`, and the connection, dropped
        // mid-message, is closed rather than given back.
        let mut lent = None;
        let sent = match self.backend.as_mut() {
            None => Err(BackendError::unavailable("no backend session")),
            Some(backend) => match backend.borrow().await {
                Err(e) => Err(e),
                Ok(mut borrowed) => {
                    let write_timeout = Duration::from_secs(self.limits.idle_timeout_secs);
                    let (sent, drained) = stream_message(
                        borrowed.mailbox(),
                        &id,
                        ok,
                        &mut encoder,
                        &mut self.stream,
                        &mut self.out,
                        write_timeout,
                    )
                    .await?;
                    lent = Some((borrowed, drained));
                    sent
                }
            },
        };
        let metrics = &self.context.metrics;
        metrics.backend_op(self.backend_kind, "fetch", started.elapsed());
        metrics.retrieved_bytes.inc_by(encoder.octets());
        match sent {
            Err(e) => {
                // A message gone leaves the connection as it was; any other
                // failure may have left it mid-reply.
                self.give_back(lent, matches!(e, BackendError::MessageGone)).await;
                let metrics = &self.context.metrics;
                metrics.backend_error(self.backend_kind, login::error_class(&e));
                tracing::warn!(error = %e, "fetch failed");
                let step = self.session.fetch_failed(&e);
                Box::pin(self.perform(step)).await
            }
            Ok(false) => {
                // Part of the message is on the wire: the only honest end is
                // to drop the connection (the client sees no final ".").
                self.give_back(lent, false).await;
                self.out.clear();
                Ok(Some(Outcome::Closed))
            }
            Ok(true) => {
                // The store sent other octets than it did when LIST's size
                // was measured (Graph's `$value` is a MIME conversion, not
                // stored bytes: nothing promises two are identical). A
                // message whose length disagrees with LIST is never
                // completed: no terminator, the connection is closed (the
                // client keeps its copy of nothing and deletes nothing),
                // and the size just counted replaces the remembered one, so
                // the next session lists what RETR sends.
                // The rest of the message (a pending CR, a last line end)
                // and the terminator, held back until the count is known.
                let mut tail = Vec::new();
                encoder.finish(&mut tail);
                if let Some(expected) = expected_octets
                    && encoder.octets() != expected
                {
                    let sent = encoder.octets();
                    tracing::error!(
                        expected,
                        sent,
                        "message size differs from LIST: closing without the terminator; the next session lists the new size"
                    );
                    if let (Some(account), Some(uidl)) = (&self.account, self.uidls.get(&id)) {
                        self.context.sizes.correct(account, uidl, sent).await;
                    }
                    metrics.command(self.session.last_command(), false);
                    self.out.clear();
                    self.give_back(lent, true).await;
                    return Ok(Some(Outcome::Closed));
                }
                metrics.command(self.session.last_command(), true);
                self.context.activity.sent_message(expected_octets.is_some());
                if expected_octets.is_some() && self.visit.is_some() && !self.retrieved.contains(&id) {
                    self.retrieved.push(id.clone());
                }
                self.out.extend_from_slice(&tail);
                // A whole retrieval (RETR: the session expects its octets)
                // may mark the message read; TOP never does. Failing to
                // mark it is no reason to fail what the client already has.
                let mut marked = true;
                if expected_octets.is_some()
                    && let Some((borrowed, _)) = lent.as_mut()
                    && let Err(e) = borrowed.mailbox().retrieved(&id).await
                {
                    tracing::warn!(error = %e, "could not mark the retrieved message read");
                    marked = false;
                }
                self.give_back(lent, marked).await;
                Ok(None)
            }
        }
    }

    /// `each_device_once`'s UPDATE: what the session retrieved whole and
    /// what it marked go into the device's record; of the marked, only
    /// those every device of the account has had leave the store (per
    /// `on_delete`); the rest stay, hidden from this device. The reply
    /// counts every marked message: to this device they are gone.
    async fn commit_visit(&mut self, marked: &[StoreId]) -> Result<usize, BackendError> {
        let (Some(visit), Some(backend)) = (self.visit.as_ref(), self.backend.as_mut()) else {
            return Err(BackendError::unavailable("no backend session"));
        };
        let mut had = self.retrieved.clone();
        had.extend(marked.iter().filter(|id| !self.retrieved.contains(id)).cloned());
        if had.is_empty() {
            return Ok(0);
        }
        let mut lent = backend.borrow().await?;
        // The Message-IDs, so that a message back under a new UIDL is known.
        let (headers, healthy) = match lent.mailbox().headers(&had, crate::auth::accounts::policy::HEADER_LIMIT).await {
            Ok(headers) if headers.len() == had.len() => (headers, true),
            Ok(_) => (vec![None; had.len()], true),
            Err(e) => {
                tracing::warn!(error = %e, "each_device_once: no Message-IDs; recording UIDLs alone");
                (vec![None; had.len()], false)
            }
        };
        let had: Vec<(StoreId, String, Option<bytes::Bytes>)> = had
            .into_iter()
            .zip(headers)
            .filter_map(|(id, header)| self.uidls.get(&id).map(|uidl| (id, uidl.clone(), header)))
            .collect();
        let leaving = match visit.commit(&had, marked).await {
            Ok(leaving) => leaving,
            Err(e) => {
                backend.give_back(lent, healthy).await;
                return Err(e);
            }
        };
        let removed = if leaving.is_empty() {
            Ok(())
        } else if self.keep {
            let uidls: Vec<&str> = leaving.iter().filter_map(|id| self.uidls.get(id)).map(String::as_str).collect();
            tracing::info!(would_remove = leaving.len(), uidls = ?uidls, "on_delete = keep: nothing removed");
            Ok(())
        } else {
            match lent.mailbox().dispose_as(&self.disposal) {
                Ok(()) => lent.mailbox().remove(&leaving).await,
                Err(e) => Err(e),
            }
        };
        backend.give_back(lent, healthy && removed.is_ok()).await;
        removed.map(|()| marked.len())
    }

    /// Ends a call's borrow: the connection is kept for the account's next
    /// call only if `healthy` and the message stream was read to its end
    /// (a TOP stops early, which may leave a reply half read).
    async fn give_back(&mut self, lent: Option<(Borrowed, bool)>, healthy: bool) {
        if let (Some((borrowed, drained)), Some(backend)) = (lent, self.backend.as_mut()) {
            backend.give_back(borrowed, healthy && drained).await;
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.stream.send_queued(&mut self.out, Duration::from_secs(self.limits.idle_timeout_secs)).await
    }

    /// Queues a reply, counting it under the command it answers.
    fn reply(&mut self, reply: Response) {
        self.context.metrics.command(self.session.last_command(), reply.is_ok());
        reply.write_to(&mut self.out);
    }

    async fn close_with(&mut self, reply: Response, outcome: Outcome) -> std::io::Result<Outcome> {
        self.reply(reply);
        self.flush().await?;
        let _ = self.stream.shutdown().await;
        Ok(outcome)
    }
}

/// Streams a message through `encoder`. `Err`: nothing of the reply was
/// written (nor is left queued in `out`), the client may get an -ERR. `Ok(false)`: the backend failed after +OK went
/// out. `Ok(true)`: all sent but the terminator. With it, whether the
/// backend's stream was read to its end.
///
/// The backend fetch and the client write overlap: the next chunks are
/// fetched (up to `PREFETCH_CHUNKS` ahead) while the current one is written,
/// so a large RETR runs at the slower side's speed, with memory bounded by
/// a few chunks.
async fn stream_message<S: AsyncWrite + Unpin>(
    mailbox: &mut dyn Mailbox,
    id: &StoreId,
    ok: Response,
    encoder: &mut BodyEncoder,
    socket: &mut S,
    out: &mut Vec<u8>,
    write_timeout: Duration,
) -> std::io::Result<(Result<bool, BackendError>, bool)> {
    let stream = match mailbox.fetch(id).await {
        Ok(stream) => stream,
        // Nothing of a reply was read.
        Err(e) => return Ok((Err(e), true)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH_CHUNKS);
    let fetch = async move {
        let mut stream = stream;
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            // A closed channel means the writer is done (TOP, or the client
            // went away): stop fetching.
            if tx.send(item).await.is_err() || failed {
                return false;
            }
        }
        true
    };
    let write = write_chunks(rx, ok, encoder, socket, out, write_timeout);
    let (drained, written) = tokio::join!(fetch, write);
    Ok((written?, drained))
}

async fn write_chunks<S: AsyncWrite + Unpin>(
    mut chunks: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, BackendError>>,
    ok: Response,
    encoder: &mut BodyEncoder,
    socket: &mut S,
    out: &mut Vec<u8>,
    write_timeout: Duration,
) -> std::io::Result<Result<bool, BackendError>> {
    // Wait for the first chunk before promising +OK: a failure now can still
    // be an -ERR.
    let mut next = chunks.recv().await;
    if let Some(Err(e)) = next {
        return Ok(Err(e));
    }
    // Until the first write, the +OK and the octets after it are only in
    // `out` (after whatever replies were queued before): a failure can
    // still take them back and be an -ERR (the fault matrix's JMAP RETR
    // failing 1 000 octets in was answered by a close without any reply).
    let queued = out.len();
    let mut written = false;
    ok.write_to(out);
    loop {
        match next {
            None => return Ok(Ok(true)),
            Some(Ok(chunk)) => {
                // Write what is pending only once more of the message has
                // come: the last chunk's octets stay in `out`, so the
                // terminating ".CRLF" goes out with them, never in a write
                // (a TLS record) of its own that clients splitting replies
                // by network chunk misread.
                if out.len() >= WRITE_CHUNK {
                    // A client that stops reading must not hold the session
                    // (and its backend connection) forever.
                    tokio::time::timeout(write_timeout, socket.write_all(out))
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading"))??;
                    out.clear();
                    written = true;
                }
                encoder.push(&chunk, out);
                if encoder.is_done() {
                    return Ok(Ok(true));
                }
            }
            Some(Err(e)) if !written => {
                out.truncate(queued);
                return Ok(Err(e));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "backend failed mid-message; closing");
                return Ok(Ok(false));
            }
        }
        next = chunks.recv().await;
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend failing after its first chunk but before anything reached
    /// the client is an -ERR (`Err`), with the +OK and the octets taken back
    /// and the replies queued before kept; once octets went out, only a
    /// close is honest (`Ok(false)`).
    #[tokio::test]
    async fn a_failure_before_the_first_write_can_still_be_an_err() {
        for (first, want_err) in [(1000, true), (2 * WRITE_CHUNK, false)] {
            let (tx, rx) = tokio::sync::mpsc::channel(3);
            tx.send(Ok(bytes::Bytes::from(vec![b'a'; first]))).await.unwrap();
            tx.send(Ok(bytes::Bytes::from_static(b"more"))).await.unwrap();
            tx.send(Err(BackendError::unavailable("reset"))).await.unwrap();
            drop(tx);
            let mut socket = Vec::new();
            let mut out = b"+OK queued before\r\n".to_vec();
            let mut encoder = BodyEncoder::whole();
            let ok = Response::ok("message follows");
            let sent = write_chunks(rx, ok, &mut encoder, &mut socket, &mut out, Duration::from_secs(5)).await;
            if want_err {
                assert!(matches!(sent, Ok(Err(BackendError::Unavailable(_)))), "{sent:?}");
                assert!(socket.is_empty());
                assert_eq!(out, b"+OK queued before\r\n", "the +OK and the octets are taken back");
            } else {
                assert!(matches!(sent, Ok(Ok(false))), "{sent:?}");
                assert!(socket.starts_with(b"+OK queued before\r\n+OK message follows\r\n"));
            }
        }
    }

    /// Whatever the chunking, the terminator is never left to a write of
    /// its own: after the body, `out` still holds the last octets, and the
    /// ".CRLF" is appended to them.
    #[tokio::test]
    async fn the_terminator_goes_out_with_the_last_octets() {
        for sizes in [vec![WRITE_CHUNK - 2], vec![1000, WRITE_CHUNK - 1002], vec![WRITE_CHUNK * 2 - 2], vec![10]] {
            let (tx, rx) = tokio::sync::mpsc::channel(sizes.len());
            for size in &sizes {
                let mut chunk = vec![b'a'; *size];
                chunk.extend_from_slice(b"\r\n");
                tx.send(Ok(bytes::Bytes::from(chunk))).await.unwrap();
            }
            drop(tx);
            let mut socket = Vec::new();
            let mut out = Vec::new();
            let mut encoder = BodyEncoder::whole();
            let ok = Response::ok("message follows");
            let sent = write_chunks(rx, ok, &mut encoder, &mut socket, &mut out, Duration::from_secs(5)).await;
            assert!(matches!(sent, Ok(Ok(true))));
            encoder.finish(&mut out);
            assert!(
                out.len() > 3 && out.ends_with(b"\r\n.\r\n"),
                "{sizes:?}: the terminator alone ({} octets)",
                out.len()
            );
            socket.extend_from_slice(&out);
            let body_octets: usize = sizes.iter().map(|s| s + 2).sum();
            assert_eq!(socket.len(), "+OK message follows\r\n".len() + body_octets + 3, "{sizes:?}");
        }
    }
}
