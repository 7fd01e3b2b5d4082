//! Opening a session: TCP, TLS or STARTTLS, the greeting, and the login
//! with the credentials the router chose (the POP3 client's own, or those
//! popgate holds for a mapped account).
//!
//! Never logs a password or token, and never sends credentials a server
//! could misread: they are validated first, and non-ASCII ones go
//! base64-encoded in `AUTHENTICATE PLAIN` rather than raw in LOGIN. Bearer
//! tokens go in XOAUTH2, or in OAUTHBEARER (RFC 7628) to a server that
//! offers only that.
//!
//! Never sends credentials a server said it will not take in clear text
//! (RFC 3501 LOGINDISABLED, or no `AUTH=PLAIN` where PLAIN would be used):
//! that is a configuration error, reported as "use TLS". And never calls a
//! server again for an account before the backoff it asked for has passed
//! (`backoff::Backoff`).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use async_imap::Client;
use async_imap::error::Error as ImapError;
use async_imap::imap_proto::{Response, Status};
use tokio::net::TcpStream;

use super::backoff::Backoff;
use super::conn::describe;
use super::transport::{TlsSetup, Transport};
use super::wire::{TLS_REQUIRED, classify_login_refusal, truncate};
use super::{ImapConfig, ImapTls};
use crate::mail::{BackendError, Credentials, Proof};

type ImapClient = Client<Transport>;

/// A logged-in session and the capabilities the server announced with it
/// (upper-cased), if it did.
pub struct LoggedIn {
    pub session: async_imap::Session<Transport>,
    pub capabilities: Option<HashSet<String>>,
}

/// Runs `step` within `limit`; a timeout or error is `Unavailable`.
async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(limit, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BackendError::Unavailable(format!("{what}: {}", truncate(&e.to_string(), 200)))),
        Err(_) => Err(BackendError::Unavailable(format!("{what}: timed out after {}s", limit.as_secs()))),
    }
}

/// Connects, secures the connection as configured and logs in.
pub async fn connect_and_login(
    config: &ImapConfig,
    tls: Option<&TlsSetup>,
    credentials: &Credentials,
    backoff: &Backoff,
) -> Result<LoggedIn, BackendError> {
    credentials.validate().map_err(BackendError::BadCredentials)?;
    backoff.check(&credentials.user)?;
    let limit = Duration::from_secs(config.timeout_secs);
    let address = format!("{}:{}", config.host, config.port());
    let tcp =
        within(limit, &format!("connecting to {address}"), TcpStream::connect((config.host.as_str(), config.port())))
            .await?;
    // Commands are small and latency-bound; do not let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    let tls = || tls.ok_or_else(|| BackendError::Permanent("TLS requested but not configured".into()));

    // The greeting's capabilities are trusted only on a connection that is
    // already what it will be for the login (not before STARTTLS).
    let (client, greeted) = match config.tls {
        ImapTls::None => {
            let mut client = Client::new(Transport::plain(tcp));
            // In clear text, what the server allows matters before any
            // credential goes out: ask if the greeting did not say.
            let caps = match greeting(&mut client, limit).await? {
                Some(caps) => caps,
                None => ask_capabilities(&mut client, limit).await?,
            };
            refuse_cleartext_credentials(&caps, credentials)?;
            (client, Some(caps))
        }
        ImapTls::Implicit => {
            let transport = within(limit, "TLS handshake", tls()?.handshake(tcp)).await?;
            let mut client = Client::new(transport);
            let caps = greeting(&mut client, limit).await?;
            (client, caps)
        }
        ImapTls::Starttls => {
            let mut client = Client::new(Transport::plain(tcp));
            greeting(&mut client, limit).await?;
            within(limit, "STARTTLS refused", client.run_command_and_check_ok("STARTTLS", None)).await?;
            // Whatever the server (or a man in the middle) sent after the OK
            // was sent in clear text; `into_inner` drops async-imap's read
            // buffer, so none of it can be taken for a protected reply.
            let Some(tcp) = client.into_inner().into_plain() else {
                return Err(BackendError::Unavailable("STARTTLS on a TLS connection".into()));
            };
            let transport = within(limit, "TLS handshake after STARTTLS", tls()?.handshake(tcp)).await?;
            // No greeting follows STARTTLS.
            (Client::new(transport), None)
        }
    };
    login(client, credentials, limit, greeted.as_ref(), backoff).await
}

/// CAPABILITY before login, upper-cased.
async fn ask_capabilities(client: &mut ImapClient, limit: Duration) -> Result<HashSet<String>, BackendError> {
    within(limit, "asking for capabilities", async {
        // async-imap's own tagging is private before login: a tag of ours,
        // which its counter (A0001, …) never produces.
        use tokio::io::AsyncWriteExt as _;
        client.get_mut().write_all(b"C0 CAPABILITY\r\n").await?;
        client.get_mut().flush().await?;
        let mut caps = HashSet::new();
        loop {
            let Some(response) = client.read_response().await? else {
                return Err(ImapError::ConnectionLost);
            };
            match response.parsed() {
                Response::Capabilities(list) => caps.extend(list.iter().map(greeting_capability_name)),
                Response::Done { tag, status, .. } if tag.0 == "C0" => {
                    return match status {
                        Status::Ok => Ok(caps),
                        _ => Err(ImapError::Bad("CAPABILITY refused".into())),
                    };
                }
                _ => {}
            }
        }
    })
    .await
}

/// On a cleartext connection: refuses to send credentials the server said
/// it will not take without TLS — LOGIN under LOGINDISABLED (RFC 3501
/// 6.2.3: the client MUST NOT), PLAIN or a bearer mechanism it does not
/// offer while LOGINDISABLED says it wants TLS first. A configuration
/// error: the backend URL must ask for TLS.
fn refuse_cleartext_credentials(caps: &HashSet<String>, credentials: &Credentials) -> Result<(), BackendError> {
    let offers = |m: &str| caps.contains(&format!("AUTH={m}"));
    let login_disabled = caps.contains("LOGINDISABLED");
    let refused = match &credentials.proof {
        Proof::Password(password) if credentials.user.is_ascii() && password.expose().is_ascii() => login_disabled,
        Proof::Password(_) => !offers("PLAIN"),
        Proof::Bearer(_) => login_disabled && !offers("XOAUTH2") && !offers("OAUTHBEARER"),
    };
    if refused {
        tracing::warn!(user = %credentials.user, "{TLS_REQUIRED}");
        return Err(BackendError::Permanent(format!(
            "{TLS_REQUIRED} (the server announced LOGINDISABLED or no AUTH=PLAIN on a cleartext connection; \
             no credentials were sent)"
        )));
    }
    Ok(())
}

/// Reads the server greeting; returns the capabilities it announced (in a
/// `[CAPABILITY …]` code), upper-cased, if any. PREAUTH is refused: the
/// connection would be logged in as someone without the client's
/// credentials being checked.
async fn greeting(client: &mut ImapClient, limit: Duration) -> Result<Option<HashSet<String>>, BackendError> {
    let response = within(limit, "reading the server greeting", client.read_response()).await?;
    let Some(response) = response else {
        return Err(BackendError::Unavailable("server closed the connection before its greeting".into()));
    };
    match response.parsed() {
        Response::Data { status: Status::Ok, outcome } => Ok(match &outcome.code {
            Some(async_imap::imap_proto::ResponseCode::Capabilities(caps)) => {
                Some(caps.iter().map(greeting_capability_name).collect())
            }
            _ => None,
        }),
        Response::Data { status: Status::PreAuth, .. } => Err(BackendError::Permanent(
            "server pre-authenticated the connection, so the client's credentials could not be checked".into(),
        )),
        Response::Data { status: status @ Status::Bye, outcome } => {
            let text = describe(status, outcome.code.as_ref(), outcome.information.as_deref());
            Err(match classify_login_refusal(&text) {
                in_use @ BackendError::InUse(_) => in_use,
                _ => BackendError::Unavailable(format!("server refused the connection: {text}")),
            })
        }
        other => {
            Err(BackendError::Unavailable(format!("unexpected greeting: {}", truncate(&format!("{other:?}"), 200))))
        }
    }
}

/// A SASL exchange of one client message (PLAIN, XOAUTH2, OAUTHBEARER).
/// async-imap base64-encodes what `process` returns.
struct OneShot {
    payload: Option<Vec<u8>>,
    /// The answer to any further challenge.
    after: &'static [u8],
}

impl async_imap::Authenticator for OneShot {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        // A second challenge is an error report (XOAUTH2 and OAUTHBEARER
        // send their JSON error that way) or a request PLAIN cannot answer:
        // the answer makes the server finish with a tagged NO instead of
        // waiting — an empty line for XOAUTH2, a lone %x01 for OAUTHBEARER
        // (RFC 7628 §3.2.3).
        match self.payload.take() {
            Some(payload) => payload,
            None => self.after.to_vec(),
        }
    }
}

/// RFC 5801 `saslname` escaping for the OAUTHBEARER GS2 header.
fn gs2_escape(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

async fn login(
    client: ImapClient,
    credentials: &Credentials,
    limit: Duration,
    greeted: Option<&HashSet<String>>,
    backoff: &Backoff,
) -> Result<LoggedIn, BackendError> {
    let user = credentials.user.as_str();
    let (mechanism, payload, after): (_, _, &'static [u8]) = match &credentials.proof {
        Proof::Password(password) if user.is_ascii() && password.expose().is_ascii() => {
            // async-imap quotes and escapes `"` and `\` itself.
            let login = client.login_with_capabilities(user, password.expose());
            return match tokio::time::timeout(limit, login).await {
                Err(_) => Err(BackendError::Unavailable(format!("login timed out after {}s", limit.as_secs()))),
                Ok(Err((error, _client))) => Err(login_error(error, &credentials.user, backoff)),
                Ok(Ok((session, caps))) => {
                    Ok(LoggedIn { session, capabilities: caps.map(|caps| caps.iter().map(capability_name).collect()) })
                }
            };
        }
        // Non-ASCII would go raw in LOGIN, which servers without
        // UTF8=ACCEPT refuse; PLAIN carries it base64-encoded.
        Proof::Password(password) => {
            // A server that announced its mechanisms without PLAIN would
            // refuse it (or worse, take it somewhere it should not).
            if greeted.is_some_and(|caps| !caps.contains("AUTH=PLAIN")) {
                return Err(BackendError::Permanent(
                    "the server offers no AUTHENTICATE PLAIN, needed for non-ASCII credentials".into(),
                ));
            }
            ("PLAIN", format!("\0{user}\0{}", password.expose()), b"")
        }
        // XOAUTH2 by default: it is what Gmail, Outlook and Dovecot's oauth2
        // passdb all accept. OAUTHBEARER when the server announced it and
        // not XOAUTH2. A server with neither refuses the mechanism, which
        // reads as a failed login.
        Proof::Bearer(token) => {
            if user.contains('\x01') {
                return Err(BackendError::BadCredentials("invalid user name for XOAUTH2"));
            }
            let offers = |m: &str| greeted.is_some_and(|caps| caps.contains(&format!("AUTH={m}")));
            if offers("OAUTHBEARER") && !offers("XOAUTH2") {
                let payload = format!("n,a={},\x01auth=Bearer {}\x01\x01", gs2_escape(user), token.expose());
                ("OAUTHBEARER", payload, b"\x01")
            } else {
                ("XOAUTH2", format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose()), b"")
            }
        }
    };
    let authenticator = OneShot { payload: Some(payload.into_bytes()), after };
    match tokio::time::timeout(limit, client.authenticate(mechanism, authenticator)).await {
        Err(_) => Err(BackendError::Unavailable(format!("login timed out after {}s", limit.as_secs()))),
        Ok(Err((error, _client))) => Err(login_error(error, user, backoff)),
        Ok(Ok(session)) => Ok(LoggedIn { session, capabilities: None }),
    }
}

/// What a failed LOGIN/AUTHENTICATE means. The error texts are the server's
/// (async-imap formats them as `code: …, info: …`) and never contain the
/// password.
fn login_error(error: ImapError, user: &str, backoff: &Backoff) -> BackendError {
    match error {
        ImapError::No(text) | ImapError::Bad(text) => {
            backoff.record_from(user, &text);
            let error = classify_login_refusal(&text);
            if let BackendError::Permanent(why) = &error {
                // A configuration problem: worth more than the info line
                // every failed login gets.
                tracing::warn!(user, "IMAP login refused: {why}");
            }
            error
        }
        ImapError::Validate(_) => BackendError::BadCredentials("credentials contain a character IMAP cannot carry"),
        ImapError::ConnectionLost => BackendError::Unavailable("server closed the connection during login".into()),
        other => BackendError::Unavailable(format!("login: {}", truncate(&other.to_string(), 200))),
    }
}

fn greeting_capability_name(c: &async_imap::imap_proto::Capability<'_>) -> String {
    use async_imap::imap_proto::Capability;
    match c {
        Capability::Imap4rev1 => "IMAP4REV1".into(),
        Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

fn capability_name(c: &async_imap::types::Capability) -> String {
    use async_imap::types::Capability;
    match c {
        Capability::Imap4rev1 => "IMAP4REV1".into(),
        Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauthbearer_user_names_are_gs2_escaped() {
        assert_eq!(gs2_escape("a,b=c@example.com"), "a=2Cb=3Dc@example.com");
        let mut oneshot = OneShot { payload: Some(b"first".to_vec()), after: b"\x01" };
        use async_imap::Authenticator as _;
        assert_eq!(oneshot.process(b""), b"first");
        assert_eq!(oneshot.process(b"{\"status\":\"invalid_token\"}"), b"\x01");
    }
}
