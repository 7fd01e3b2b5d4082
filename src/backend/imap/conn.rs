//! One logged-in IMAP connection and the only way commands go over it.
//!
//! async-imap's typed helpers hide a tagged NO/BAD on FETCH (their streams
//! just end) and keep nothing if a stream is dropped mid-response, so every
//! command after login goes through `Conn`: it sends the command line, reads
//! responses until that command's tagged completion, hands the untagged ones
//! to the caller, and enforces three rules:
//!
//! - every send and every wait is bounded by the command timeout;
//! - after a timeout, an I/O or parse error, an interrupted write, or a BYE,
//!   the connection is poisoned: every later call is `Unavailable`;
//! - one command at a time. The command awaiting its completion is recorded
//!   here (not in any future), so if a caller stops waiting — a
//!   `MessageStream` dropped mid-chunk for TOP — the next `send` first reads
//!   the abandoned command's replies to its end and discards them, instead of
//!   mistaking them for its own.
//!
//! A message's body is not left to async-imap, which buffers a whole
//! response: `start_literal` reads the FETCH line that announces the
//! literal, `literal_chunk` hands the literal on as it arrives, and
//! `end_literal` lets async-imap parse the rest of the response with the
//! literal replaced by an empty one (`Transport::divert`). A literal
//! abandoned midway (TOP) is read away, unkept, before the next command,
//! within the command timeout like any reply, else the connection is given
//! up.
//!
//! Why not pipeline: Dovecot runs pipelined FETCHes concurrently and sends
//! the second command's untagged FETCH before the first one's tagged OK, so
//! untagged data cannot be attributed to a command by position. Pipelining
//! partial FETCHes would need their replies routed by (UID, origin) instead.

use std::sync::Arc;
use std::time::Duration;

use async_imap::Session;
use async_imap::imap_proto::{AttributeValue, MailboxDatum, RequestId, Response, ResponseCode, Status};
use bytes::Bytes;
use tokio::time::{Instant, timeout_at};

use super::backoff::Backoff;
use super::transport::Transport;
use super::wire::{classify_refusal, truncate};
use crate::mail::BackendError;

pub type ImapSession = Session<Transport>;

/// The longest response line `start_literal` looks at; the FETCH line that
/// announces a message's literal is a few dozen octets.
const MAX_LINE: usize = 64 * 1024;

/// How `start_literal` got on.
pub enum Started {
    /// The message's literal starts.
    Literal,
    /// The command completed without one.
    Done(Reply),
}

/// The first line of a FETCH response whose last item is `BODY[] {n}`
/// (after `Literal8`, so a BINARY reply reads the same).
struct LiteralHead {
    size: u64,
    /// Where `{n}` starts in the line.
    open: usize,
    /// The UID the line names before the literal, if any.
    uid: Option<u32>,
}

fn body_literal_head(line: &[u8]) -> Option<LiteralHead> {
    let rest = line.strip_prefix(b"* ")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let items = rest.get(digits..)?;
    if digits == 0 || items.len() < 8 || !items[..8].eq_ignore_ascii_case(b" FETCH (") {
        return None;
    }
    let body = line.strip_suffix(b"\r\n")?.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let size_digits = &body[open + 1..];
    if size_digits.is_empty() || size_digits.len() > 19 || !size_digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(size_digits).ok()?.parse().ok()?;
    const ITEM: &[u8] = b"BODY[] ";
    let before = &body[..open];
    let item_at = before.len().checked_sub(ITEM.len() + 1)?;
    if !before[item_at + 1..].eq_ignore_ascii_case(ITEM) || !matches!(before[item_at], b' ' | b'(') {
        return None;
    }
    let uid = before
        .windows(5)
        .position(|w| w.eq_ignore_ascii_case(b" UID ") || w.eq_ignore_ascii_case(b"(UID "))
        .and_then(|at| {
            let digits: Vec<u8> = before[at + 5..].iter().take_while(|b| b.is_ascii_digit()).copied().collect();
            std::str::from_utf8(&digits).ok()?.parse().ok()
        });
    Some(LiteralHead { size, open, uid })
}

/// How a command ended.
#[derive(Debug)]
pub struct Reply {
    pub outcome: Outcome,
    pub code: Option<ResponseCode<'static>>,
    /// Status, response code and text, for messages and classification.
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    No,
    Bad,
}

impl Reply {
    /// `Ok(self)` on OK; otherwise the refusal as a `BackendError`.
    pub fn ok_or_refused(self, what: &str) -> Result<Reply, BackendError> {
        match self.outcome {
            Outcome::Ok => Ok(self),
            Outcome::No => Err(classify_refusal(false, &self.text, what)),
            Outcome::Bad => Err(classify_refusal(true, &self.text, what)),
        }
    }
}

pub struct Conn {
    session: ImapSession,
    limit: Duration,
    /// Why this connection may not be used any more. Set once, never cleared.
    poisoned: Option<String>,
    /// A command line is being written: if this is still set when the next
    /// call starts, the write was interrupted and the stream holds half a
    /// command.
    writing: bool,
    /// The command sent whose tagged completion has not been read yet.
    pending: Option<RequestId>,
    /// The UID whose literal `start_literal` diverted, until `end_literal`.
    literal: Option<u32>,
    /// `start_literal` is waiting for the literal to start.
    awaiting_literal: bool,
    /// The text of an untagged BYE: the server is closing the connection.
    bye: Option<String>,
    /// LOGOUT was sent: its BYE is expected, not news worth a warning.
    logging_out: bool,
    /// Messages in the selected mailbox, from EXISTS and EXPUNGE responses.
    pub exists: u32,
    /// Where a backoff the server asks for in a refusal is recorded, and
    /// for which account.
    backoff: Option<(Arc<Backoff>, String)>,
}

impl Conn {
    pub fn new(session: ImapSession, limit: Duration) -> Self {
        Conn {
            session,
            limit,
            poisoned: None,
            writing: false,
            pending: None,
            literal: None,
            awaiting_literal: false,
            bye: None,
            logging_out: false,
            exists: 0,
            backoff: None,
        }
    }

    /// Records backoffs the server asks for in its refusals for `user`.
    pub fn report_backoff_to(&mut self, backoff: Arc<Backoff>, user: &str) {
        self.backoff = Some((backoff, user.to_string()));
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Whether the connection can still carry commands.
    pub fn usable(&self) -> bool {
        self.poisoned.is_none() && !self.writing
    }

    /// Marks the connection unusable and returns the error to report.
    pub fn poison(&mut self, why: impl Into<String>) -> BackendError {
        let why = truncate(&why.into(), 300);
        if self.poisoned.is_none() {
            if self.logging_out {
                tracing::debug!(reason = %why, "IMAP connection ended during LOGOUT");
            } else {
                tracing::warn!(reason = %why, "IMAP connection unusable");
            }
            self.poisoned = Some(why.clone());
        }
        BackendError::Unavailable(format!("IMAP connection unusable: {}", self.poisoned.as_deref().unwrap_or(&why)))
    }

    fn check(&mut self) -> Result<(), BackendError> {
        if self.writing {
            self.writing = false;
            return Err(self.poison("a command was interrupted while being sent"));
        }
        match &self.poisoned {
            Some(why) => Err(BackendError::Unavailable(format!("IMAP connection unusable: {why}"))),
            None => Ok(()),
        }
    }

    /// Sends one command line; its replies are read by `finish`. An
    /// abandoned command's replies are read and discarded first.
    async fn send(&mut self, command: &str) -> Result<RequestId, BackendError> {
        self.check()?;
        if self.awaiting_literal {
            // async-imap would buffer the whole literal it reads away.
            return Err(self.poison("a message fetch was abandoned before its body came"));
        }
        if let Some(abandoned) = self.pending.clone() {
            // What is left of an abandoned literal is read away (not
            // kept) within the command timeout, like any reply.
            self.literal = None;
            self.finish(&abandoned, |_| {}).await?;
        }
        self.writing = true;
        let sent = tokio::time::timeout(self.limit, self.session.run_command(command)).await;
        match sent {
            Ok(Ok(tag)) => {
                self.writing = false;
                self.pending = Some(tag.clone());
                Ok(tag)
            }
            Ok(Err(e)) => {
                self.writing = false;
                Err(self.poison(format!("sending a command: {e}")))
            }
            Err(_) => {
                self.writing = false;
                Err(self.poison(format!("sending a command timed out after {}s", self.limit.as_secs())))
            }
        }
    }

    /// Reads until `tag` completes. Untagged responses are passed to
    /// `on_data` (unsolicited ones included: the callback filters); EXISTS,
    /// EXPUNGE and BYE are also tracked here.
    async fn finish(
        &mut self,
        tag: &RequestId,
        mut on_data: impl FnMut(&Response<'_>) + Send,
    ) -> Result<Reply, BackendError> {
        self.check()?;
        if self.pending.as_ref() != Some(tag) {
            return Err(self.poison("waited for a command that is not pending"));
        }
        let deadline = Instant::now() + self.limit;
        loop {
            if let Some(reply) = self.read_one(tag, deadline, &mut on_data).await? {
                return Ok(reply);
            }
        }
    }

    /// Reads one response to the pending command `tag`: `Some` if it was
    /// the tagged completion.
    async fn read_one(
        &mut self,
        tag: &RequestId,
        deadline: Instant,
        on_data: &mut (impl FnMut(&Response<'_>) + Send),
    ) -> Result<Option<Reply>, BackendError> {
        let response = match timeout_at(deadline, self.session.read_response()).await {
            Err(_) => {
                return Err(self.poison(format!("no reply within {}s", self.limit.as_secs())));
            }
            Ok(Err(e)) => return Err(self.poison(format!("reading a reply: {e}"))),
            Ok(Ok(None)) => {
                let why = match self.bye.take() {
                    Some(bye) => format!("server closed the connection: {bye}"),
                    None => "server closed the connection".to_string(),
                };
                return Err(self.poison(why));
            }
            Ok(Ok(Some(response))) => response,
        };
        let parsed = response.parsed();
        if let Response::Done { tag: done, status, outcome } = parsed {
            if done != tag {
                return Err(self.poison(format!("reply for unknown tag {}", done.0)));
            }
            self.pending = None;
            let outcome_kind = match status {
                Status::Ok => Outcome::Ok,
                Status::No => Outcome::No,
                Status::Bad => Outcome::Bad,
                other => return Err(self.poison(format!("unexpected completion status {other:?}"))),
            };
            let code = outcome.code.as_ref().map(code_to_owned);
            let text = describe(status, outcome.code.as_ref(), outcome.information.as_deref());
            if outcome_kind != Outcome::Ok
                && let Some((backoff, user)) = &self.backoff
            {
                backoff.record_from(user, &text);
            }
            if let Some(bye) = &self.bye
                && !self.logging_out
            {
                // The command completed, but the server is going away.
                let why = format!("server said BYE: {bye}");
                self.poison(why);
            }
            return Ok(Some(Reply { outcome: outcome_kind, code, text }));
        }
        self.track(parsed);
        on_data(parsed);
        Ok(None)
    }

    /// Sends `command`, a `UID FETCH` of one message's `BODY[]` (or
    /// `BINARY[]`), and reads its replies up to that literal, which is then
    /// not left to async-imap (it would buffer it whole) but read as it
    /// arrives with `literal_chunk`; `end_literal` reads the rest. Replies
    /// before it go to `on_data`, as with `run`. The literal is the
    /// message `uid` if the FETCH line says so, or says no UID at all (a
    /// one-UID command draws no other message's body); another UID poisons
    /// the connection.
    pub async fn start_literal(
        &mut self,
        command: &str,
        uid: u32,
        mut on_data: impl FnMut(&Response<'_>) + Send,
    ) -> Result<Started, BackendError> {
        let tag = self.send(command).await?;
        if !self.session.get_ref().between_responses() {
            return Err(self.poison("octets of an earlier reply were left unread"));
        }
        let deadline = Instant::now() + self.limit;
        self.awaiting_literal = true;
        let started = self.await_literal(&tag, uid, deadline, &mut on_data).await;
        self.awaiting_literal = false;
        started
    }

    async fn await_literal(
        &mut self,
        tag: &RequestId,
        uid: u32,
        deadline: Instant,
        on_data: &mut (impl FnMut(&Response<'_>) + Send),
    ) -> Result<Started, BackendError> {
        loop {
            let line = match timeout_at(deadline, self.session.get_mut().peek_line(MAX_LINE)).await {
                Err(_) => return Err(self.poison(format!("no reply within {}s", self.limit.as_secs()))),
                Ok(Err(e)) => return Err(self.poison(format!("reading a reply: {e}"))),
                Ok(Ok(None)) => return Err(self.poison("a reply line longer than 64 KiB")),
                Ok(Ok(Some(line))) => line,
            };
            if let Some(head) = body_literal_head(&line) {
                if head.uid.is_some_and(|got| got != uid) {
                    return Err(self.poison(format!("asked for UID {uid}'s body, got another message's")));
                }
                let stand_in = [&line[..head.open], b"{0}\r\n"].concat();
                self.session.get_mut().divert(line.len(), head.size, stand_in);
                self.literal = Some(uid);
                return Ok(Started::Literal);
            }
            if let Some(reply) = self.read_one(tag, deadline, on_data).await? {
                return Ok(Started::Done(reply));
            }
        }
    }

    /// The next octets of the literal `start_literal` found: up to `max`,
    /// after waiting (within the command timeout) for `want` of them or
    /// all that is left. `None`: it is all read.
    pub async fn literal_chunk(&mut self, want: usize, max: usize) -> Result<Option<Bytes>, BackendError> {
        self.check()?;
        if self.literal.is_none() || self.session.get_ref().literal_left() == 0 {
            return Ok(None);
        }
        match tokio::time::timeout(self.limit, self.session.get_mut().take_literal(want, max)).await {
            Err(_) => Err(self.poison(format!("no octets of the message within {}s", self.limit.as_secs()))),
            Ok(Err(e)) => Err(self.poison(format!("reading a message: {e}"))),
            Ok(Ok(bytes)) => Ok(Some(bytes)),
        }
    }

    /// Reads what follows the literal to the command's completion; the
    /// FETCH it was in must name the message `start_literal` was given (or
    /// no UID). Unread octets of the literal are skipped (bounded by the
    /// command timeout).
    pub async fn end_literal(&mut self) -> Result<Reply, BackendError> {
        self.check()?;
        let (Some(tag), Some(uid)) = (self.pending.clone(), self.literal.take()) else {
            return Err(self.poison("no message literal is being read"));
        };
        let mut other = None;
        let reply = self
            .finish(&tag, |response| {
                if let Response::Fetch(_, attributes) = response
                    && attributes.iter().any(|a| matches!(a, AttributeValue::BodySection { section: None, .. }))
                    && let Some(got) = attributes.iter().find_map(|a| match a {
                        AttributeValue::Uid(got) => Some(*got),
                        _ => None,
                    })
                    && got != uid
                {
                    other = Some(got);
                }
            })
            .await?;
        if let Some(got) = other {
            return Err(self.poison(format!("asked for UID {uid}'s body, the FETCH said UID {got}")));
        }
        Ok(reply)
    }

    /// `Unavailable` if the server has closed the connection (looked at
    /// without waiting), as the next command would find.
    pub fn check_open(&mut self) -> Result<(), BackendError> {
        self.check()?;
        if self.pending.is_none() && self.session.get_mut().closed_by_server() {
            return Err(self.poison("server closed the connection"));
        }
        Ok(())
    }

    /// Sends a command and reads its replies (see `finish`).
    pub async fn run(
        &mut self,
        command: &str,
        on_data: impl FnMut(&Response<'_>) + Send,
    ) -> Result<Reply, BackendError> {
        let tag = self.send(command).await?;
        self.finish(&tag, on_data).await
    }

    /// Keeps the mailbox state the backend relies on up to date. EXPUNGE
    /// carries a sequence number, which is never used: only the count is.
    fn track(&mut self, response: &Response<'_>) {
        match response {
            Response::MailboxData(MailboxDatum::Exists(n)) => self.exists = *n,
            Response::Expunge(_) => self.exists = self.exists.saturating_sub(1),
            Response::Data { status: Status::Bye, outcome } => {
                self.bye = Some(truncate(outcome.information.as_deref().unwrap_or("(no text)"), 200));
            }
            _ => {}
        }
    }

    /// LOGOUT within `limit`, errors ignored. The LOGOUT's own BYE is
    /// expected and harmless.
    pub async fn logout(mut self, limit: Duration) {
        if !self.usable() {
            return;
        }
        self.limit = limit;
        self.logging_out = true;
        let _ = self.run("LOGOUT", |_| {}).await;
    }
}

/// The `'static` copy of a response code we keep after the response buffer
/// is gone; only the codes the backend looks at are kept exactly.
fn code_to_owned(code: &ResponseCode<'_>) -> ResponseCode<'static> {
    match code {
        ResponseCode::ReadOnly => ResponseCode::ReadOnly,
        ResponseCode::ReadWrite => ResponseCode::ReadWrite,
        ResponseCode::UidValidity(v) => ResponseCode::UidValidity(*v),
        ResponseCode::UidNext(v) => ResponseCode::UidNext(*v),
        ResponseCode::TryCreate => ResponseCode::TryCreate,
        ResponseCode::Capabilities(caps) => {
            ResponseCode::Capabilities(caps.iter().map(|c| capability_to_owned(c)).collect())
        }
        _ => ResponseCode::Alert, // not inspected; `Reply::text` has it
    }
}

fn capability_to_owned(c: &async_imap::imap_proto::Capability<'_>) -> async_imap::imap_proto::Capability<'static> {
    use async_imap::imap_proto::Capability;
    match c {
        Capability::Imap4rev1 => Capability::Imap4rev1,
        Capability::Auth(a) => Capability::Auth(a.to_string().into()),
        Capability::Atom(a) => Capability::Atom(a.to_string().into()),
    }
}

/// `NO [CODE] text` as one line, for logs, errors and classification. Codes
/// imap-proto does not know (INUSE, UNAVAILABLE, EXPUNGEISSUED, …) are left
/// in the text by its parser, so they survive here too.
pub fn describe(status: &Status, code: Option<&ResponseCode<'_>>, info: Option<&str>) -> String {
    let status = match status {
        Status::Ok => "OK",
        Status::No => "NO",
        Status::Bad => "BAD",
        Status::PreAuth => "PREAUTH",
        Status::Bye => "BYE",
    };
    let code = match code {
        Some(ResponseCode::ReadOnly) => " [READ-ONLY]".to_string(),
        Some(ResponseCode::TryCreate) => " [TRYCREATE]".to_string(),
        Some(ResponseCode::Alert) => " [ALERT]".to_string(),
        Some(other) => format!(" [{other:?}]"),
        None => String::new(),
    };
    truncate(&format!("{status}{code} {}", info.unwrap_or("")), 300)
}
