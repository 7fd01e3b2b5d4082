//! The POP3 session state machine (RFC 1939 states, RFC 2449 CAPA, RFC 5034
//! AUTH).
//!
//! It is fed one line at a time and answers with a `Step`: a reply to write,
//! or work for the driver (log in, send a message, commit deletions) whose
//! outcome is fed back. It decides every POP3 rule; it never does I/O and
//! never touches the store itself. Each state carries only the data valid in
//! it, so a maildrop exists only in TRANSACTION.

use crate::mail::{BackendError, Credentials, Proof, StoreId};
use crate::pop3::command::{Command, Line, ParseError};
use crate::pop3::maildrop::{Lookup, Maildrop};
use crate::pop3::response::{BodyEncoder, Response, ResponseCode};
use crate::pop3::sasl::{self, Mechanism};

/// Session policy, decided per connection by the server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Longest command line, CRLF included (RFC 2449 minimum: 255).
    pub command_line_limit: usize,
    /// Longest SASL response line (tokens are long).
    pub auth_line_limit: usize,
    /// Failed logins after which the connection is closed.
    pub max_failed_logins: u32,
    /// USER/PASS and AUTH are allowed on this connection now.
    pub login_permitted: bool,
    /// STLS can be offered on this connection.
    pub stls_offered: bool,
    /// SASL mechanisms the backend can really use, in CAPA order.
    pub mechanisms: Vec<Mechanism>,
    pub implementation: String,
    /// The server-wide EXPIRE and LOGIN-DELAY, shown before login with
    /// `USER` (RFC 2449: each user's may differ); a login brings its own.
    pub retention: Retention,
}

/// RFC 2449 EXPIRE and LOGIN-DELAY: what CAPA announces for a user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// EXPIRE in days; `None`: NEVER (nothing is removed unless DELE'd).
    pub expire_days: Option<u32>,
    /// LOGIN-DELAY: the least seconds between two logins.
    pub login_delay_secs: u64,
}

impl Retention {
    fn capabilities(&self, per_user: bool) -> [String; 2] {
        let user = if per_user { " USER" } else { "" };
        let expire = match self.expire_days {
            None => "NEVER".to_string(),
            Some(days) => days.to_string(),
        };
        [format!("EXPIRE {expire}{user}"), format!("LOGIN-DELAY {}{user}", self.login_delay_secs)]
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            command_line_limit: 255,
            auth_line_limit: 8192,
            max_failed_logins: 3,
            login_permitted: true,
            stls_offered: false,
            mechanisms: vec![Mechanism::Plain, Mechanism::Login],
            implementation: concat!("popgate ", env!("CARGO_PKG_VERSION")).to_string(),
            retention: Retention::default(),
        }
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Write the reply, then read the next line.
    Reply(Response),
    /// Write the reply, then close the connection.
    Close(Response),
    /// Open the maildrop with these credentials, then call `login_succeeded`
    /// or `login_failed`.
    Login(Credentials),
    /// Send a message: fetch `id`, write `ok` once the first octets are at
    /// hand, then stream through `encoder`. On a fetch error before anything
    /// was written, write `fetch_failed`'s reply; after, close. `expected_octets`
    /// is the LIST size, for RETR only: a whole retrieval, which the store
    /// may mark read; TOP (`None`) never marks anything.
    Send { id: StoreId, ok: Response, encoder: BodyEncoder, expected_octets: Option<u64> },
    /// UPDATE state: remove exactly these messages, then call
    /// `update_finished` and close.
    Update(Vec<StoreId>),
    /// Write the reply, then start TLS on the connection.
    StartTls(Response),
}

/// Where a multi-line AUTH exchange stands.
#[derive(Debug)]
enum Exchange {
    /// Waiting for the (only) client response of PLAIN, XOAUTH2, OAUTHBEARER.
    Response(Mechanism),
    /// LOGIN: waiting for the user name.
    LoginUser,
    /// LOGIN: waiting for the password.
    LoginPassword { user: String },
    /// An OAuth login failed; the error challenge is out and the client's
    /// dummy answer is awaited before the final -ERR (RFC 7628 3.2.3).
    OAuthFailed { reply: Response },
}

#[derive(Debug)]
enum State {
    Authorization {
        user: Option<String>,
        sasl: Option<Exchange>,
    },
    /// Waiting for the driver to open the maildrop.
    LoggingIn {
        user: String,
        oauth: Option<Mechanism>,
    },
    Transaction {
        user: String,
        maildrop: Maildrop,
    },
    /// QUIT received; waiting for the driver to commit deletions.
    Update,
    Closed,
}

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    failed_logins: u32,
    /// The keyword of the command being answered, for metrics.
    last_command: &'static str,
    /// QUIT came in the TRANSACTION state: the session entered UPDATE
    /// (with marks or without).
    entered_update: bool,
    /// The logged-in user's EXPIRE and LOGIN-DELAY.
    user_retention: Option<Retention>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Session {
            config,
            state: State::Authorization { user: None, sasl: None },
            failed_logins: 0,
            last_command: "NONE",
            entered_update: false,
            user_retention: None,
        }
    }

    pub fn greeting(&self) -> Response {
        Response::ok("popgate ready")
    }

    /// The user name once logged in (or logging in), for logs.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::LoggingIn { user, .. } | State::Transaction { user, .. } => Some(user),
            _ => None,
        }
    }

    /// QUIT came after login (RFC 1939's UPDATE state was entered, even
    /// when nothing was marked): what the session did may now be recorded.
    pub fn entered_update(&self) -> bool {
        self.entered_update
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Transaction { .. } | State::Update)
    }

    /// The keyword of the last command received ("AUTH" for SASL
    /// continuation lines, "INVALID" for lines that did not parse).
    pub fn last_command(&self) -> &'static str {
        self.last_command
    }

    /// The line length limit for the next line.
    pub fn line_limit(&self) -> usize {
        match self.state {
            State::Authorization { sasl: Some(_), .. } => self.config.auth_line_limit,
            _ => self.config.command_line_limit,
        }
    }

    /// Called after STLS: the connection is now encrypted.
    pub fn tls_started(&mut self, login_permitted: bool) {
        self.config.stls_offered = false;
        self.config.login_permitted = login_permitted;
        // Nothing said before TLS counts after it (RFC 2595 4): a USER sent in
        // the clear could have been injected.
        if let State::Authorization { user, sasl } = &mut self.state {
            *user = None;
            *sasl = None;
        }
    }

    /// Answers one framed line.
    pub fn on_line(&mut self, line: Line) -> Step {
        let line = match line {
            Line::Complete(l) => l,
            Line::TooLong => {
                self.last_command = "INVALID";
                if let State::Authorization { sasl: sasl @ Some(_), .. } = &mut self.state {
                    *sasl = None;
                    return Step::Reply(Response::err("authentication response too long; AUTH cancelled"));
                }
                return Step::Reply(Response::err("command line too long"));
            }
        };
        if let State::Authorization { sasl: sasl @ Some(_), .. } = &mut self.state {
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
                match e {
                    ParseError::Unknown => Step::Reply(Response::err("unknown command")),
                    e => Step::Reply(Response::err(e.to_string())),
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) -> Step {
        match command {
            Command::Capa => return Step::Reply(self.capabilities()),
            Command::Noop if matches!(self.state, State::Transaction { .. }) => return Step::Reply(Response::ok("")),
            _ => {}
        }
        match &mut self.state {
            State::Authorization { user, .. } => match command {
                Command::Quit => {
                    self.state = State::Closed;
                    Step::Close(Response::ok("popgate signing off"))
                }
                Command::Stls if self.config.stls_offered => Step::StartTls(Response::ok("begin TLS negotiation")),
                Command::Stls => Step::Reply(Response::err("STLS not available here")),
                Command::User(_) | Command::Pass(_) | Command::Auth { .. } if !self.config.login_permitted => {
                    let how = if self.config.stls_offered { "; use STLS first" } else { "" };
                    Step::Reply(Response::err_code(
                        ResponseCode::Auth,
                        format!("cleartext login is not allowed on this connection{how}"),
                    ))
                }
                Command::User(name) => {
                    *user = Some(name);
                    Step::Reply(Response::ok("send PASS"))
                }
                Command::Pass(password) => match user.take() {
                    None => Step::Reply(Response::err("USER first")),
                    Some(name) => {
                        self.begin_login(Credentials { user: name, proof: crate::mail::Proof::Password(password) })
                    }
                },
                Command::Auth { mechanism: None, .. } => Step::Reply(
                    Response::ok("SASL mechanisms follow")
                        .with_body(self.config.mechanisms.iter().map(|m| m.name().to_string()).collect()),
                ),
                Command::Auth { mechanism: Some(name), initial_response } => {
                    *user = None;
                    let Some(mechanism) = Mechanism::from_name(&name).filter(|m| self.config.mechanisms.contains(m))
                    else {
                        return Step::Reply(Response::err("unsupported SASL mechanism"));
                    };
                    let first = match mechanism {
                        Mechanism::Login => Exchange::LoginUser,
                        other => Exchange::Response(other),
                    };
                    match initial_response {
                        Some(ir) => self.sasl_step(first, ir.expose().as_bytes()),
                        None => {
                            let prompt = match first {
                                Exchange::LoginUser => sasl::LOGIN_USER_PROMPT,
                                _ => "",
                            };
                            self.await_sasl(first, prompt)
                        }
                    }
                }
                Command::Apop => Step::Reply(Response::err("APOP is not supported")),
                _ => Step::Reply(Response::err("not allowed before login")),
            },
            State::Transaction { maildrop, .. } => match command {
                Command::Stat => {
                    let (count, octets) = maildrop.stat();
                    Step::Reply(Response::ok(format!("{count} {octets}")))
                }
                Command::List(None) => {
                    let (count, octets) = maildrop.stat();
                    let lines = maildrop.visible().map(|(n, m)| format!("{n} {}", m.size)).collect();
                    Step::Reply(Response::ok(format!("{count} messages ({octets} octets)")).with_body(lines))
                }
                Command::List(Some(n)) => Step::Reply(match maildrop.get(n) {
                    Ok(m) => Response::ok(format!("{n} {}", m.size)),
                    Err(e) => lookup_error(e),
                }),
                Command::Uidl(None) => {
                    let lines = maildrop.visible().map(|(n, m)| format!("{n} {}", m.uidl)).collect();
                    Step::Reply(Response::ok("unique-id listing follows").with_body(lines))
                }
                Command::Uidl(Some(n)) => Step::Reply(match maildrop.get(n) {
                    Ok(m) => Response::ok(format!("{n} {}", m.uidl)),
                    Err(e) => lookup_error(e),
                }),
                Command::Retr(n) => match maildrop.get(n) {
                    Ok(m) => Step::Send {
                        id: m.id.clone(),
                        ok: Response::ok(format!("{} octets", m.size)),
                        encoder: BodyEncoder::whole(),
                        expected_octets: Some(m.size),
                    },
                    Err(e) => Step::Reply(lookup_error(e)),
                },
                Command::Top(n, lines) => match maildrop.get(n) {
                    Ok(m) => Step::Send {
                        id: m.id.clone(),
                        ok: Response::ok("top of message follows"),
                        encoder: BodyEncoder::top(lines),
                        expected_octets: None,
                    },
                    Err(e) => Step::Reply(lookup_error(e)),
                },
                Command::Dele(n) => Step::Reply(match maildrop.mark_deleted(n) {
                    Ok(()) => Response::ok(format!("message {n} deleted")),
                    Err(e) => lookup_error(e),
                }),
                Command::Rset => {
                    maildrop.unmark_all();
                    let (count, octets) = maildrop.stat();
                    Step::Reply(Response::ok(format!("maildrop has {count} messages ({octets} octets)")))
                }
                Command::Quit => {
                    self.entered_update = true;
                    let marked = maildrop.marked();
                    if marked.is_empty() {
                        self.state = State::Closed;
                        Step::Close(Response::ok("popgate signing off"))
                    } else {
                        self.state = State::Update;
                        Step::Update(marked)
                    }
                }
                Command::Stls => Step::Reply(Response::err("STLS is only allowed before login")),
                _ => Step::Reply(Response::err("not allowed after login")),
            },
            State::LoggingIn { .. } | State::Update | State::Closed => {
                Step::Reply(Response::err("command not allowed now"))
            }
        }
    }

    fn await_sasl(&mut self, exchange: Exchange, challenge: &str) -> Step {
        self.state = State::Authorization { user: None, sasl: Some(exchange) };
        Step::Reply(Response::continuation(challenge))
    }

    /// One client response in an AUTH exchange.
    fn sasl_step(&mut self, exchange: Exchange, line: &[u8]) -> Step {
        if let Exchange::OAuthFailed { reply } = exchange {
            // Whatever the client answered, the exchange ends here.
            return self.count_failure(reply);
        }
        if line == b"*" {
            return Step::Reply(Response::err("AUTH cancelled"));
        }
        let decoded =
            match std::str::from_utf8(line).map_err(|_| sasl::SaslError::Base64).and_then(sasl::decode_response) {
                Ok(bytes) => bytes,
                Err(e) => return self.count_failure(Response::err_code(ResponseCode::Auth, e.to_string())),
            };
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|_| sasl::SaslError::Malformed("LOGIN"));
        let credentials = match exchange {
            Exchange::LoginUser => {
                return match text(decoded) {
                    Ok(user) => self.await_sasl(Exchange::LoginPassword { user }, sasl::LOGIN_PASSWORD_PROMPT),
                    Err(e) => self.count_failure(Response::err_code(ResponseCode::Auth, e.to_string())),
                };
            }
            Exchange::LoginPassword { user } => text(decoded).map(|password| Credentials::password(user, password)),
            Exchange::Response(Mechanism::Plain) => sasl::plain(&decoded),
            Exchange::Response(m @ (Mechanism::XOAuth2 | Mechanism::OAuthBearer)) => {
                let token = if m == Mechanism::XOAuth2 { sasl::xoauth2(&decoded) } else { sasl::oauthbearer(&decoded) };
                match token {
                    Ok(t) => {
                        return self
                            .begin_login_with(Credentials { user: t.user, proof: Proof::Bearer(t.token) }, Some(m));
                    }
                    Err(e) => Err(e),
                }
            }
            Exchange::Response(Mechanism::Login) | Exchange::OAuthFailed { .. } => {
                Err(sasl::SaslError::Malformed("AUTH"))
            }
        };
        match credentials {
            Ok(credentials) => self.begin_login(credentials),
            Err(e) => self.count_failure(Response::err_code(ResponseCode::Auth, e.to_string())),
        }
    }

    fn begin_login(&mut self, credentials: Credentials) -> Step {
        self.begin_login_with(credentials, None)
    }

    fn begin_login_with(&mut self, credentials: Credentials, oauth: Option<Mechanism>) -> Step {
        if let Err(why) = credentials.validate() {
            return self.count_failure(Response::err_code(ResponseCode::Auth, why));
        }
        self.state = State::LoggingIn { user: credentials.user.clone(), oauth };
        Step::Login(credentials)
    }

    fn count_failure(&mut self, reply: Response) -> Step {
        self.failed_logins += 1;
        self.state = State::Authorization { user: None, sasl: None };
        if self.failed_logins >= self.config.max_failed_logins {
            self.state = State::Closed;
            return Step::Close(Response::err_code(ResponseCode::Auth, "too many failed logins; closing"));
        }
        Step::Reply(reply)
    }

    /// The driver opened the maildrop; the user's policy is the server's.
    pub fn login_succeeded(&mut self, maildrop: Maildrop) -> Step {
        let retention = self.config.retention;
        self.login_succeeded_with(maildrop, retention)
    }

    /// The login is refused because this user logged in less than its
    /// LOGIN-DELAY ago (RFC 2449 8.1.3). Not a failed password.
    pub fn login_delayed(&mut self) -> Step {
        self.state = State::Authorization { user: None, sasl: None };
        Step::Reply(Response::err_code(ResponseCode::LoginDelay, "logged in too recently; try again later"))
    }

    /// The driver opened the maildrop; CAPA now tells this user's EXPIRE
    /// and LOGIN-DELAY.
    pub fn login_succeeded_with(&mut self, maildrop: Maildrop, retention: Retention) -> Step {
        self.user_retention = Some(retention);
        let user = match std::mem::replace(&mut self.state, State::Closed) {
            State::LoggingIn { user, .. } => user,
            other => {
                self.state = other;
                return Step::Reply(Response::err("no login in progress"));
            }
        };
        let (count, octets) = maildrop.stat();
        self.state = State::Transaction { user, maildrop };
        Step::Reply(Response::ok(format!("maildrop has {count} messages ({octets} octets)")))
    }

    /// The driver could not open the maildrop.
    pub fn login_failed(&mut self, error: &BackendError) -> Step {
        let reply = reply_for_backend_error(error);
        if let (State::LoggingIn { oauth: Some(mechanism), .. }, BackendError::AuthFailed) = (&self.state, error) {
            let challenge = sasl::oauth_error_challenge(*mechanism);
            return self.await_sasl(Exchange::OAuthFailed { reply }, &challenge);
        }
        match error {
            BackendError::AuthFailed | BackendError::BadCredentials(_) => self.count_failure(reply),
            _ => {
                self.state = State::Authorization { user: None, sasl: None };
                Step::Reply(reply)
            }
        }
    }

    /// A message could not be fetched (nothing of it was written yet).
    pub fn fetch_failed(&mut self, error: &BackendError) -> Step {
        Step::Reply(reply_for_backend_error(error))
    }

    /// The UPDATE state's removals finished (or failed).
    pub fn update_finished(&mut self, result: Result<usize, BackendError>) -> Response {
        self.state = State::Closed;
        match result {
            Ok(n) => Response::ok(format!("popgate signing off ({n} messages deleted)")),
            Err(e) => {
                let mut reply = reply_for_backend_error(&e);
                reply.text = format!("some deleted messages not removed: {}", reply.text);
                reply
            }
        }
    }

    /// The autologout timer expired: close without entering UPDATE.
    pub fn timed_out(&mut self) -> Response {
        self.state = State::Closed;
        Response::err("autologout: idle for too long")
    }

    /// The server is shutting down: close without entering UPDATE.
    pub fn shutting_down(&mut self) -> Response {
        self.state = State::Closed;
        Response::err_code(ResponseCode::SysTemp, "server shutting down; nothing was deleted, try again later")
    }

    fn capabilities(&self) -> Response {
        let mut caps: Vec<String> =
            vec!["TOP".into(), "UIDL".into(), "RESP-CODES".into(), "AUTH-RESP-CODE".into(), "PIPELINING".into()];
        match self.user_retention {
            Some(own) if self.is_authenticated() => caps.extend(own.capabilities(false)),
            _ => caps.extend(self.config.retention.capabilities(true)),
        }
        if let State::Authorization { .. } = self.state {
            if self.config.login_permitted {
                caps.push("USER".into());
                let mechs: Vec<&str> = self.config.mechanisms.iter().map(|m| m.name()).collect();
                caps.push(format!("SASL {}", mechs.join(" ")));
            }
            if self.config.stls_offered {
                caps.push("STLS".into());
            }
        }
        caps.push(format!("IMPLEMENTATION {}", self.config.implementation));
        Response::ok("capability list follows").with_body(caps)
    }
}

fn lookup_error(e: Lookup) -> Response {
    match e {
        Lookup::NoSuchMessage => Response::err("no such message"),
        Lookup::Deleted => Response::err("message already deleted"),
    }
}

/// The one place a backend failure becomes a POP3 reply.
pub fn reply_for_backend_error(error: &BackendError) -> Response {
    match error {
        BackendError::AuthFailed => Response::err_code(ResponseCode::Auth, "invalid user name or password"),
        BackendError::BadCredentials(why) => Response::err_code(ResponseCode::Auth, *why),
        BackendError::InUse(_) => Response::err_code(ResponseCode::InUse, "mailbox in use; try again later"),
        BackendError::Unavailable(_) => {
            Response::err_code(ResponseCode::SysTemp, "mail store unavailable; try again later")
        }
        BackendError::Permanent(_) => Response::err_code(ResponseCode::SysPerm, "mail store refused the request"),
        BackendError::MessageGone => Response::err("message no longer exists in the mail store"),
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
