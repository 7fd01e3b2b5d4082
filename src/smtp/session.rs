//! The SMTP submission session state machine (RFC 5321, RFC 6409 message
//! submission, RFC 4954 AUTH, RFC 3207 STARTTLS, RFC 1870 SIZE, RFC 6152
//! 8BITMIME, RFC 6531 SMTPUTF8, RFC 2920 PIPELINING, RFC 2034
//! ENHANCEDSTATUSCODES).
//!
//! Fed one line at a time (command lines, SASL responses and DATA lines
//! alike), it answers with a `Step`: a reply to write, or work for the
//! driver — log in, relay a message — whose outcome is fed back. It decides
//! every SMTP rule and the account's envelope rules (sender, From header,
//! recipient domains); it does no I/O and never relays anything itself. Each
//! state carries only the data valid in it: a transaction exists only once
//! logged in.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::mail::{BackendError, Credentials, Proof, Secret};
use crate::smtp::command::{Command, Line, MailParameters, ParseError};
use crate::smtp::reply::Reply;

/// Session policy, decided per connection by the server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub command_line_limit: usize,
    /// Longest SASL response line (base64 of user and password).
    pub auth_line_limit: usize,
    /// Longest line of a message, CRLF included (RFC 5321: at least 1000).
    pub data_line_limit: usize,
    /// Largest message, in octets after dot-unstuffing (advertised as SIZE).
    pub max_message_size: u64,
    /// Recipients of one message.
    pub max_recipients: usize,
    /// Failed logins after which the connection is closed.
    pub max_failed_logins: u32,
    /// Refused commands (unknown, bad syntax, out of sequence) after which
    /// the connection is closed.
    pub max_bad_commands: u32,
    /// AUTH is allowed on this connection now.
    pub login_permitted: bool,
    /// STARTTLS can be offered on this connection.
    pub starttls_offered: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "popgate".into(),
            command_line_limit: 512,
            auth_line_limit: 8192,
            data_line_limit: 8192,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 50,
            max_failed_logins: 3,
            max_bad_commands: 10,
            login_permitted: true,
            starttls_offered: false,
        }
    }
}

/// What the logged-in account may send as and to, handed over at login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderRules {
    /// The account's address first, then its aliases (compared without
    /// regard to case).
    pub addresses: Vec<String>,
    /// A sender or From not in `addresses` is rewritten to the first one
    /// instead of refused (scanners that put their own name in From).
    pub rewrite: bool,
    /// Recipient domains allowed (lower case); empty: any.
    pub recipient_domains: Vec<String>,
}

impl SenderRules {
    fn allows_sender(&self, address: &str) -> bool {
        self.addresses.iter().any(|a| a.eq_ignore_ascii_case(address))
    }

    fn allows_recipient(&self, address: &str) -> bool {
        if self.recipient_domains.is_empty() {
            return true;
        }
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.recipient_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    fn own_address(&self) -> &str {
        self.addresses.first().map(String::as_str).unwrap_or("")
    }
}

/// The envelope of one message to relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse-path after the sender rules (never empty).
    pub sender: String,
    pub recipients: Vec<String>,
    /// BODY=8BITMIME was declared.
    pub eight_bit: bool,
    /// SMTPUTF8 was declared.
    pub smtputf8: bool,
}

/// Why the driver could not relay a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayFailure {
    /// The upstream answered with this reply code (4xx or 5xx) and text.
    Upstream { code: u16, text: String },
    /// The upstream could not be reached or did not answer in time.
    Unavailable,
    /// The upstream refused the account's credentials (after one refresh).
    Credentials,
    /// This device sent its hourly allowance of messages or recipients.
    RateLimited,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Nothing to write (a line of the message): read the next line.
    Read,
    /// Write the reply, then read the next line.
    Reply(Reply),
    /// Write the reply, then close the connection.
    Close(Reply),
    /// Write the reply, then start TLS; then call `tls_started`.
    StartTls(Reply),
    /// Check these credentials, then call `login_succeeded` or
    /// `login_failed`.
    Login(Credentials),
    /// Relay the message, then call `relay_finished`. Nothing may be
    /// answered before the upstream accepted or refused it.
    Relay { envelope: Envelope, message: Vec<u8> },
    /// An envelope rule refused a sender or recipient: write the reply,
    /// then read the next line (as `Reply`); the driver counts the refusal
    /// for the device (an administrator wants to see a scanner that keeps
    /// sending as someone else).
    Refused { reply: Reply, rule: Rule },
}

/// The envelope rule behind a `Step::Refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// MAIL FROM is neither the account's address nor an alias.
    Sender,
    /// The From header is neither (and the rules do not rewrite it).
    FromHeader,
    /// RCPT TO is outside the allowed domains.
    Recipient,
}

impl Rule {
    /// A bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rule::Sender => "sender",
            Rule::FromHeader => "from_header",
            Rule::Recipient => "recipient",
        }
    }
}

/// Where a multi-line AUTH exchange stands.
#[derive(Debug)]
enum Exchange {
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

/// One mail transaction (after MAIL).
#[derive(Debug)]
struct Transaction {
    sender: String,
    parameters: MailParameters,
    recipients: Vec<String>,
}

/// The message being received in DATA.
#[derive(Debug, Default)]
struct Body {
    octets: Vec<u8>,
    too_big: bool,
    line_too_long: bool,
}

#[derive(Debug)]
enum State {
    Anonymous {
        sasl: Option<Exchange>,
    },
    /// Waiting for the driver to check credentials.
    LoggingIn {
        user: String,
    },
    Authenticated {
        user: String,
        rules: SenderRules,
        mail: Option<Transaction>,
    },
    Data {
        user: String,
        rules: SenderRules,
        mail: Transaction,
        body: Body,
    },
    /// Waiting for the driver to relay.
    Relaying {
        user: String,
        rules: SenderRules,
    },
    Closed,
}

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    /// EHLO or HELO was received (since the last STARTTLS).
    greeted: bool,
    failed_logins: u32,
    bad_commands: u32,
    last_command: &'static str,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Session {
            config,
            state: State::Anonymous { sasl: None },
            greeted: false,
            failed_logins: 0,
            bad_commands: 0,
            last_command: "NONE",
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::new(220, None, format!("{} ESMTP popgate", self.config.hostname))
    }

    /// The user name once logged in (or logging in), for logs.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::LoggingIn { user }
            | State::Authenticated { user, .. }
            | State::Data { user, .. }
            | State::Relaying { user, .. } => Some(user),
            _ => None,
        }
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated { .. } | State::Data { .. } | State::Relaying { .. })
    }

    /// The keyword of the last command received ("AUTH" for SASL lines,
    /// "DATA" for message lines, "INVALID" for lines that did not parse).
    pub fn last_command(&self) -> &'static str {
        self.last_command
    }

    /// The line length limit for the next line.
    pub fn line_limit(&self) -> usize {
        match self.state {
            State::Anonymous { sasl: Some(_) } => self.config.auth_line_limit,
            State::Data { .. } => self.config.data_line_limit,
            _ => self.config.command_line_limit,
        }
    }

    /// Called after STARTTLS: the connection is now encrypted, and the
    /// session starts over (RFC 3207 4.2: forget what was said before).
    pub fn tls_started(&mut self, login_permitted: bool) {
        self.config.starttls_offered = false;
        self.config.login_permitted = login_permitted;
        self.greeted = false;
        self.state = State::Anonymous { sasl: None };
    }

    /// Answers one framed line.
    pub fn on_line(&mut self, line: Line) -> Step {
        if let State::Data { body, .. } = &mut self.state {
            self.last_command = "DATA";
            match line {
                Line::TooLong => body.line_too_long = true,
                Line::Complete(l) if l == b"." => return self.end_of_data(),
                Line::Complete(l) => {
                    // RFC 5321 4.5.2: a leading dot was doubled by the client.
                    let l = l.strip_prefix(b".").unwrap_or(&l);
                    if (body.octets.len() + l.len() + 2) as u64 > self.config.max_message_size {
                        body.too_big = true;
                    } else if !body.too_big {
                        body.octets.extend_from_slice(l);
                        body.octets.extend_from_slice(b"\r\n");
                    }
                }
            }
            return Step::Read;
        }
        let line = match line {
            Line::Complete(l) => l,
            Line::TooLong => {
                self.last_command = "INVALID";
                if let State::Anonymous { sasl: sasl @ Some(_) } = &mut self.state {
                    *sasl = None;
                    return self.bad_command(Reply::with(500, (5, 5, 6), "authentication exchange line too long"));
                }
                return self.bad_command(Reply::with(500, (5, 5, 2), "line too long"));
            }
        };
        if let State::Anonymous { sasl: sasl @ Some(_) } = &mut self.state {
            self.last_command = "AUTH";
            let exchange = sasl.take().expect("matched Some");
            return self.sasl_step(exchange, &line);
        }
        match Command::parse(&line) {
            Ok(command) => {
                self.last_command = command.name();
                self.on_command(command)
            }
            Err(e) => {
                self.last_command = "INVALID";
                let reply = match e {
                    ParseError::Unknown => Reply::with(500, (5, 5, 2), "command not recognized"),
                    ParseError::Syntax(why) => Reply::with(501, (5, 5, 4), why),
                    ParseError::Parameter(p) => Reply::with(555, (5, 5, 4), format!("unsupported parameter {p}")),
                    ParseError::NeedsUtf8 => {
                        Reply::with(553, (5, 6, 7), "non-ASCII address needs the SMTPUTF8 parameter")
                    }
                };
                self.bad_command(reply)
            }
        }
    }

    fn on_command(&mut self, command: Command) -> Step {
        match command {
            Command::Ehlo(_) | Command::Helo(_) => {
                self.greeted = true;
                self.reset_transaction();
                return Step::Reply(match command {
                    Command::Ehlo(_) => self.ehlo_reply(),
                    _ => Reply::new(250, None, self.config.hostname.clone()),
                });
            }
            Command::Noop => return Step::Reply(Reply::with(250, (2, 0, 0), "Ok")),
            Command::Rset => {
                self.reset_transaction();
                return Step::Reply(Reply::with(250, (2, 0, 0), "Ok"));
            }
            Command::Quit => {
                self.state = State::Closed;
                return Step::Close(Reply::with(221, (2, 0, 0), "Bye"));
            }
            Command::Vrfy => {
                return Step::Reply(Reply::with(252, (2, 5, 2), "cannot VRFY; send the message and see"));
            }
            Command::Help => return Step::Reply(Reply::with(214, (2, 0, 0), "see RFC 5321 and RFC 6409")),
            _ => {}
        }
        if !self.greeted {
            return self.bad_command(Reply::with(503, (5, 5, 1), "send EHLO first"));
        }
        match command {
            Command::StartTls if self.config.starttls_offered => {
                if matches!(self.state, State::Anonymous { .. }) {
                    Step::StartTls(Reply::with(220, (2, 0, 0), "Ready to start TLS"))
                } else {
                    self.bad_command(Reply::with(503, (5, 5, 1), "STARTTLS only before AUTH"))
                }
            }
            Command::StartTls => self.bad_command(Reply::with(502, (5, 5, 1), "STARTTLS not available here")),
            Command::Auth { mechanism, initial_response } => self.auth(&mechanism, initial_response),
            Command::Mail { from, parameters } => self.mail(from, parameters),
            Command::Rcpt { to } => self.rcpt(to),
            Command::Data => self.data(),
            Command::Ehlo(_)
            | Command::Helo(_)
            | Command::Noop
            | Command::Rset
            | Command::Quit
            | Command::Vrfy
            | Command::Help => unreachable!("answered above"),
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.config.starttls_offered {
            lines.push("STARTTLS".into());
        }
        if self.config.login_permitted && matches!(self.state, State::Anonymous { .. }) {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Reply::lines(250, lines)
    }

    fn reset_transaction(&mut self) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Authenticated { user, rules, .. } | State::Data { user, rules, .. } => {
                self.state = State::Authenticated { user, rules, mail: None };
            }
            State::Anonymous { .. } => self.state = State::Anonymous { sasl: None },
            other => self.state = other,
        }
    }

    fn auth(&mut self, mechanism: &str, initial_response: Option<Secret>) -> Step {
        if !matches!(self.state, State::Anonymous { .. }) {
            return self.bad_command(Reply::with(503, (5, 5, 1), "already authenticated"));
        }
        if !self.config.login_permitted {
            let how = if self.config.starttls_offered { "; issue STARTTLS first" } else { "" };
            return Step::Reply(Reply::with(530, (5, 7, 0), format!("login is not allowed without TLS here{how}")));
        }
        let first = match mechanism {
            "PLAIN" => Exchange::Plain,
            "LOGIN" => Exchange::LoginUser,
            _ => return self.bad_command(Reply::with(504, (5, 5, 4), "unsupported mechanism; use PLAIN or LOGIN")),
        };
        match initial_response {
            Some(ir) => self.sasl_step(first, ir.expose().as_bytes()),
            None => self.await_sasl(first),
        }
    }

    fn await_sasl(&mut self, exchange: Exchange) -> Step {
        let prompt = match exchange {
            Exchange::Plain => "",
            Exchange::LoginUser => "VXNlcm5hbWU6",
            Exchange::LoginPassword { .. } => "UGFzc3dvcmQ6",
        };
        self.state = State::Anonymous { sasl: Some(exchange) };
        Step::Reply(Reply::new(334, None, prompt))
    }

    /// One client response in an AUTH exchange.
    fn sasl_step(&mut self, exchange: Exchange, line: &[u8]) -> Step {
        self.state = State::Anonymous { sasl: None };
        if line == b"*" {
            return Step::Reply(Reply::with(501, (5, 0, 0), "authentication cancelled"));
        }
        let decoded = if line == b"=" { Ok(Vec::new()) } else { STANDARD.decode(line) };
        let Ok(decoded) = decoded else {
            return self.count_failure(Reply::with(501, (5, 5, 2), "invalid base64 in the authentication exchange"));
        };
        let text = String::from_utf8(decoded);
        let Ok(text) = text else {
            return self.count_failure(Reply::with(535, (5, 7, 8), "credentials are not UTF-8"));
        };
        let credentials = match exchange {
            Exchange::LoginUser => return self.await_sasl(Exchange::LoginPassword { user: text }),
            Exchange::LoginPassword { user } => Credentials { user, proof: Proof::Password(Secret::new(text)) },
            Exchange::Plain => {
                // RFC 4616: [authzid] NUL authcid NUL passwd.
                let mut parts = text.split('\0');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(authzid), Some(user), Some(password), None) if authzid.is_empty() || authzid == user => {
                        Credentials { user: user.to_string(), proof: Proof::Password(Secret::new(password)) }
                    }
                    _ => return self.count_failure(Reply::with(535, (5, 7, 8), "malformed PLAIN response")),
                }
            }
        };
        if let Err(why) = credentials.validate() {
            return self.count_failure(Reply::with(535, (5, 7, 8), why));
        }
        self.state = State::LoggingIn { user: credentials.user.clone() };
        Step::Login(credentials)
    }

    fn count_failure(&mut self, reply: Reply) -> Step {
        self.failed_logins += 1;
        self.state = State::Anonymous { sasl: None };
        if self.failed_logins >= self.config.max_failed_logins {
            self.state = State::Closed;
            return Step::Close(Reply::with(421, (4, 7, 0), "too many failed authentications; closing"));
        }
        Step::Reply(reply)
    }

    fn bad_command(&mut self, reply: Reply) -> Step {
        self.bad_commands += 1;
        if self.bad_commands >= self.config.max_bad_commands {
            self.state = State::Closed;
            return Step::Close(Reply::with(421, (4, 7, 0), "too many errors; closing"));
        }
        Step::Reply(reply)
    }

    /// The driver accepted the credentials; `rules` are the account's.
    pub fn login_succeeded(&mut self, rules: SenderRules) -> Step {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::LoggingIn { user } => {
                self.state = State::Authenticated { user, rules, mail: None };
                Step::Reply(Reply::with(235, (2, 7, 0), "Authentication successful"))
            }
            other => {
                self.state = other;
                Step::Reply(Reply::with(503, (5, 5, 1), "no login in progress"))
            }
        }
    }

    /// The driver refused the credentials or could not check them.
    pub fn login_failed(&mut self, error: &BackendError) -> Step {
        let reply = reply_for_login_error(error);
        match error {
            BackendError::AuthFailed | BackendError::BadCredentials(_) => self.count_failure(reply),
            _ => {
                self.state = State::Anonymous { sasl: None };
                Step::Reply(reply)
            }
        }
    }

    fn mail(&mut self, from: String, parameters: MailParameters) -> Step {
        let State::Authenticated { rules, mail, .. } = &mut self.state else {
            return self.bad_command(Reply::with(530, (5, 7, 0), "authentication required"));
        };
        if mail.is_some() {
            return self.bad_command(Reply::with(503, (5, 5, 1), "nested MAIL command"));
        }
        if parameters.size.is_some_and(|s| s > self.config.max_message_size) {
            return Step::Reply(Reply::with(552, (5, 3, 4), "message size exceeds fixed maximum message size"));
        }
        let sender = if rules.allows_sender(&from) {
            from
        } else if rules.rewrite {
            rules.own_address().to_string()
        } else {
            let shown = if from.is_empty() { "<>".to_string() } else { from };
            return Step::Refused {
                reply: Reply::with(
                    550,
                    (5, 7, 1),
                    format!("sender {shown} refused: send as {} or one of its aliases", rules.own_address()),
                ),
                rule: Rule::Sender,
            };
        };
        *mail = Some(Transaction { sender, parameters, recipients: Vec::new() });
        Step::Reply(Reply::with(250, (2, 1, 0), "Ok"))
    }

    fn rcpt(&mut self, to: String) -> Step {
        let State::Authenticated { rules, mail, .. } = &mut self.state else {
            return self.bad_command(Reply::with(503, (5, 5, 1), "need MAIL command"));
        };
        let Some(mail) = mail else {
            return self.bad_command(Reply::with(503, (5, 5, 1), "need MAIL command"));
        };
        if mail.recipients.len() >= self.config.max_recipients {
            return Step::Reply(Reply::with(452, (4, 5, 3), "too many recipients"));
        }
        if !to.is_ascii() && !mail.parameters.smtputf8 {
            return Step::Reply(Reply::with(553, (5, 6, 7), "non-ASCII address needs the SMTPUTF8 parameter"));
        }
        if !rules.allows_recipient(&to) {
            return Step::Refused {
                reply: Reply::with(550, (5, 7, 1), format!("recipient {to} refused: its domain is not allowed")),
                rule: Rule::Recipient,
            };
        }
        mail.recipients.push(to);
        Step::Reply(Reply::with(250, (2, 1, 5), "Ok"))
    }

    fn data(&mut self) -> Step {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Authenticated { user, rules, mail: Some(mail) } if !mail.recipients.is_empty() => {
                self.state = State::Data { user, rules, mail, body: Body::default() };
                Step::Reply(Reply::new(354, None, "End data with <CR><LF>.<CR><LF>"))
            }
            State::Authenticated { user, rules, mail: Some(mail) } => {
                self.state = State::Authenticated { user, rules, mail: Some(mail) };
                self.bad_command(Reply::with(554, (5, 5, 1), "no valid recipients"))
            }
            other => {
                let authenticated = matches!(other, State::Authenticated { .. });
                self.state = other;
                if authenticated {
                    self.bad_command(Reply::with(503, (5, 5, 1), "need MAIL command"))
                } else {
                    self.bad_command(Reply::with(530, (5, 7, 0), "authentication required"))
                }
            }
        }
    }

    fn end_of_data(&mut self) -> Step {
        let State::Data { user, rules, mail, body } = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!("called in DATA only");
        };
        let refuse = |session: &mut Session, user: String, rules: SenderRules, reply: Reply| {
            session.state = State::Authenticated { user, rules, mail: None };
            Step::Reply(reply)
        };
        if body.too_big {
            let reply = Reply::with(552, (5, 3, 4), "message size exceeds fixed maximum message size");
            return refuse(self, user, rules, reply);
        }
        if body.line_too_long {
            let limit = self.config.data_line_limit;
            let reply = Reply::with(500, (5, 5, 2), format!("message has a line longer than {limit} octets"));
            return refuse(self, user, rules, reply);
        }
        let message = match check_from_header(body.octets, &rules) {
            Ok(message) => message,
            Err(why) => {
                self.state = State::Authenticated { user, rules, mail: None };
                return Step::Refused { reply: Reply::with(550, (5, 7, 1), why), rule: Rule::FromHeader };
            }
        };
        let envelope = Envelope {
            sender: mail.sender,
            recipients: mail.recipients,
            eight_bit: mail.parameters.eight_bit,
            smtputf8: mail.parameters.smtputf8,
        };
        self.state = State::Relaying { user, rules };
        Step::Relay { envelope, message }
    }

    /// The driver relayed the message (or could not).
    pub fn relay_finished(&mut self, result: Result<(), RelayFailure>) -> Step {
        if let State::Relaying { user, rules } = std::mem::replace(&mut self.state, State::Closed) {
            self.state = State::Authenticated { user, rules, mail: None };
        }
        match result {
            Ok(()) => Step::Reply(Reply::with(250, (2, 0, 0), "Ok: accepted by the upstream")),
            Err(failure) => Step::Reply(reply_for_relay_failure(&failure)),
        }
    }

    /// The idle timer expired.
    pub fn timed_out(&mut self) -> Reply {
        self.state = State::Closed;
        Reply::with(421, (4, 4, 2), "idle for too long; closing")
    }

    /// The server is shutting down.
    pub fn shutting_down(&mut self) -> Reply {
        self.state = State::Closed;
        Reply::with(421, (4, 3, 2), "server shutting down; try again later")
    }
}

/// The one place a failed login becomes an SMTP reply.
pub fn reply_for_login_error(error: &BackendError) -> Reply {
    match error {
        BackendError::AuthFailed => Reply::with(535, (5, 7, 8), "authentication credentials invalid"),
        BackendError::BadCredentials(why) => Reply::with(535, (5, 7, 8), *why),
        BackendError::InUse(_) | BackendError::Unavailable(_) | BackendError::MessageGone => {
            Reply::with(454, (4, 7, 0), "temporary authentication failure; try again later")
        }
        BackendError::Permanent(_) => Reply::with(554, (5, 7, 0), "this account cannot send mail"),
    }
}

/// The one place a relay failure becomes an SMTP reply: the upstream's own
/// class (4xx: try again; 5xx: give up) always reaches the device.
pub fn reply_for_relay_failure(failure: &RelayFailure) -> Reply {
    match failure {
        RelayFailure::Upstream { code, text } => {
            let code = if (400..600).contains(code) { *code } else { 451 };
            let class = (code / 100) as u8;
            // Keep the upstream's enhanced code when it gave one.
            let has_enhanced = text
                .split(' ')
                .next()
                .is_some_and(|w| w.starts_with(&format!("{class}.")) && w.split('.').count() == 3);
            let text: String = text.chars().take(400).collect();
            // RFC 2034: the enhanced code comes first, right after the
            // reply code.
            match text.split_once(' ') {
                Some((enhanced, rest)) if has_enhanced => {
                    Reply::new(code, None, format!("{enhanced} upstream: {rest}"))
                }
                _ => Reply::with(code, (class, 0, 0), format!("upstream: {text}")),
            }
        }
        RelayFailure::Unavailable => {
            Reply::with(451, (4, 4, 1), "upstream unavailable; message not sent, try again later")
        }
        RelayFailure::Credentials => {
            Reply::with(451, (4, 7, 0), "upstream refused the account's credentials; message not sent, try again later")
        }
        RelayFailure::RateLimited => {
            Reply::with(450, (4, 7, 1), "hourly sending limit reached for this device; try again later")
        }
    }
}

/// Checks the From header against the rules; rewrites it (or adds one) when
/// the rules say so. `Err`: the text of the refusal.
fn check_from_header(message: Vec<u8>, rules: &SenderRules) -> Result<Vec<u8>, String> {
    let header = find_header(&message, "from");
    let own = rules.own_address();
    match header {
        Some((start, end)) => {
            let value = String::from_utf8_lossy(&message[start..end]);
            let value = value.split_once(':').map(|(_, v)| v).unwrap_or("");
            let addresses = header_addresses(value);
            if !addresses.is_empty() && addresses.iter().all(|a| rules.allows_sender(a)) {
                return Ok(message);
            }
            if !rules.rewrite {
                let shown = addresses.first().cloned().unwrap_or_else(|| value.trim().to_string());
                return Err(format!("From: {shown} refused: send as {own} or one of its aliases"));
            }
            // Keep the display name ("Scanner 3F" <…>), replace the address.
            let display = value.split_once('<').map(|(d, _)| d.trim()).filter(|d| !d.is_empty());
            let new = match display {
                Some(d) => format!("From: {d} <{own}>\r\n"),
                None => format!("From: <{own}>\r\n"),
            };
            let mut out = Vec::with_capacity(message.len() + new.len());
            out.extend_from_slice(&message[..start]);
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(&message[end..]);
            Ok(out)
        }
        None if rules.rewrite => {
            let mut out = format!("From: <{own}>\r\n").into_bytes();
            out.extend_from_slice(&message);
            Ok(out)
        }
        None => Err(format!("the message has no From: header; send as {own}")),
    }
}

/// The byte range of the first header field `name` (with its folded
/// continuation lines and final CRLF), in the header section.
fn find_header(message: &[u8], name: &str) -> Option<(usize, usize)> {
    let mut pos = 0;
    let mut found: Option<usize> = None;
    while pos < message.len() {
        let end = memchr::memchr(b'\n', &message[pos..]).map(|i| pos + i + 1).unwrap_or(message.len());
        let line = &message[pos..end];
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if let Some(start) = found {
            if !continuation {
                return Some((start, pos));
            }
        } else if line == b"\r\n" || line == b"\n" {
            return None;
        } else if !continuation
            && line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            && line[name.len()..].trim_ascii_start().first() == Some(&b':')
        {
            found = Some(pos);
        }
        pos = end;
    }
    found.map(|start| (start, message.len()))
}

/// The addresses in a From header value: those in angle brackets, or else
/// the comma-separated bare addresses (comments dropped).
fn header_addresses(value: &str) -> Vec<String> {
    let unfolded: String = value.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    let bracketed: Vec<String> =
        unfolded.split('<').skip(1).filter_map(|s| s.split_once('>').map(|(a, _)| a.trim().to_string())).collect();
    if !bracketed.is_empty() {
        return bracketed;
    }
    unfolded
        .split(',')
        .map(|a| {
            let without_comment = match a.split_once('(') {
                Some((before, rest)) => format!("{before}{}", rest.split_once(')').map(|(_, r)| r).unwrap_or("")),
                None => a.to_string(),
            };
            without_comment.trim().to_string()
        })
        .filter(|a| !a.is_empty())
        .collect()
}

/// Every address in the message's To, Cc and Bcc headers (each occurrence,
/// folded lines unfolded), lower-cased: whom a mail API that sends by the
/// headers would send to. Group names without addresses are left out.
pub fn header_recipients(message: &[u8]) -> Vec<String> {
    let header_end = memchr::memmem::find(message, b"\r\n\r\n").map(|i| i + 2).unwrap_or(message.len());
    let mut fields: Vec<String> = Vec::new();
    for line in message[..header_end].split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(line);
            }
        } else if !line.is_empty() {
            fields.push(line.to_string());
        }
    }
    fields
        .iter()
        .filter_map(|field| field.split_once(':'))
        .filter(|(name, _)| ["to", "cc", "bcc"].iter().any(|n| name.trim().eq_ignore_ascii_case(n)))
        .flat_map(|(_, value)| address_list(value))
        .filter(|a| a.contains('@'))
        .collect()
}

/// The addresses of an RFC 5322 address list: items split at commas outside
/// quotes, angle brackets and comments; of each, the bracketed address, or
/// the item without comments; a group's name (before its colon) and its
/// closing `;` left out. Lower-cased.
fn address_list(value: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let (mut quoted, mut angle, mut comment, mut escaped) = (false, false, 0u32, false);
    for c in value.chars() {
        let last = items.last_mut().expect("never empty");
        if escaped {
            escaped = false;
            if !quoted && comment == 0 {
                last.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            _ if quoted || comment > 0 => {}
            '<' => {
                angle = true;
                last.clear();
                last.push('<');
            }
            '>' if angle => {
                angle = false;
                last.push('>');
            }
            ',' | ';' if !angle => items.push(String::new()),
            ':' if !angle => last.clear(),
            _ if last.ends_with('>') => {}
            c => last.push(c),
        }
    }
    items
        .iter()
        .map(|item| item.trim().trim_start_matches('<').trim_end_matches('>').trim().to_ascii_lowercase())
        .filter(|a| !a.is_empty())
        .collect()
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
