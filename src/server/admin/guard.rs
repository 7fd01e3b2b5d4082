//! Who may use the admin page: sign-in against `[admin] password_hash` or
//! the token in `[admin] token_file` (throttled like POP3 logins), the
//! session cookie (`HttpOnly; SameSite=Strict`, `Secure` when configured),
//! the CSRF token every form carries, and — with no credential configured —
//! loopback clients only.
//!
//! Sessions live in a bounded in-memory table (a restart signs everyone
//! out). Never logs or renders a password, token, cookie or hash.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::passwords::{DeviceHash, Verifier};
use crate::mail::Secret;
use crate::server::config::AdminConfig;
use crate::server::throttle::{LoginThrottle, ThrottleConfig};

/// The session cookie's name.
pub const COOKIE: &str = "popgate_admin";
/// Sessions held at once; past it the oldest is dropped.
const MAX_SESSIONS: usize = 1_000;
/// A visitor who has not signed in keeps their CSRF token this long.
const ANONYMOUS_SECS: u64 = 15 * 60;
/// The throttle's user name for admin sign-ins.
const THROTTLE_USER: &str = "admin";

/// What the configuration lets in.
#[derive(Debug, Clone)]
pub enum Access {
    /// No credential configured: loopback clients, no sign-in.
    LoopbackOnly,
    /// A password hash and/or a token file.
    SignIn { hash: Option<DeviceHash>, token_file: Option<PathBuf> },
}

/// One browser's session.
#[derive(Clone)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    pub signed_in: bool,
    expires: Instant,
}

pub struct Guard {
    access: Access,
    sessions: Mutex<HashMap<String, Session>>,
    lifetime: Duration,
    pub cookie_secure: bool,
    throttle: LoginThrottle,
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("system randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal strings, compared through their digests (no early exit on the
/// first differing byte of the secret itself).
pub(crate) fn same(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

impl Guard {
    pub fn new(config: &AdminConfig, throttle: ThrottleConfig) -> Result<Guard, String> {
        let access = if config.has_credentials() {
            let hash = match &config.password_hash {
                Some(phc) => Some(DeviceHash::parse(phc).map_err(|e| format!("admin.password_hash: {e}"))?),
                None => None,
            };
            Access::SignIn { hash, token_file: config.token_file.clone() }
        } else {
            Access::LoopbackOnly
        };
        Ok(Guard {
            access,
            sessions: Mutex::new(HashMap::new()),
            lifetime: Duration::from_secs(config.session_secs),
            cookie_secure: config.cookie_secure,
            throttle: LoginThrottle::new(throttle),
        })
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// `peer` may see the page at all.
    pub fn admits(&self, peer: IpAddr) -> bool {
        match self.access {
            Access::LoopbackOnly => peer.to_canonical().is_loopback(),
            Access::SignIn { .. } => true,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session the cookie names, if it is still valid.
    pub fn session(&self, cookie: Option<&str>) -> Option<Session> {
        let id = cookie?;
        let mut table = self.table();
        let session = table.get(id)?;
        if session.expires <= Instant::now() {
            table.remove(id);
            return None;
        }
        Some(session.clone())
    }

    /// A new session: signed in from the start in loopback-only mode (the
    /// address was the check), otherwise anonymous until `sign_in`.
    pub fn open(&self) -> Session {
        let signed_in = matches!(self.access, Access::LoopbackOnly);
        let lifetime = if signed_in { self.lifetime } else { Duration::from_secs(ANONYMOUS_SECS) };
        let session =
            Session { id: random_token(), csrf: random_token(), signed_in, expires: Instant::now() + lifetime };
        let mut table = self.table();
        let now = Instant::now();
        table.retain(|_, s| s.expires > now);
        if table.len() >= MAX_SESSIONS
            && let Some(oldest) = table.values().min_by_key(|s| s.expires).map(|s| s.id.clone())
        {
            table.remove(&oldest);
        }
        table.insert(session.id.clone(), session.clone());
        session
    }

    /// `form_csrf` is the session's CSRF token.
    pub fn csrf_ok(session: &Session, form_csrf: Option<&str>) -> bool {
        form_csrf.is_some_and(|t| same(t, &session.csrf))
    }

    /// Checks `password` (after the throttle's delay for `peer`); on
    /// success the session is replaced by a signed-in one (a new id, so a
    /// planted cookie is worth nothing).
    pub async fn sign_in(&self, peer: IpAddr, old: &Session, password: Secret) -> Option<Session> {
        let Access::SignIn { hash, token_file } = &self.access else { return None };
        let delay = self.throttle.delay(peer, THROTTLE_USER);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut ok = false;
        if let Some(path) = token_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let token = text.lines().next().unwrap_or("").trim();
                    ok = !token.is_empty() && same(token, password.expose());
                }
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "admin token file unreadable"),
            }
        }
        if !ok && let Some(hash) = hash {
            ok = Verifier::shared().verify(hash, Some(password)).await.unwrap_or(false);
        }
        if !ok {
            let more = self.throttle.failure_delay(THROTTLE_USER, delay);
            self.throttle.record_failure(peer, THROTTLE_USER);
            tracing::info!(%peer, "admin sign-in failed");
            if !more.is_zero() {
                tokio::time::sleep(more).await;
            }
            return None;
        }
        self.throttle.record_success(peer, THROTTLE_USER);
        tracing::info!(%peer, "admin signed in");
        let mut table = self.table();
        table.remove(&old.id);
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            signed_in: true,
            expires: Instant::now() + self.lifetime,
        };
        table.insert(session.id.clone(), session.clone());
        Some(session)
    }

    pub fn sign_out(&self, session: &Session) {
        self.table().remove(&session.id);
    }

    /// The `Set-Cookie` value for `session`.
    pub fn cookie(&self, session: &Session) -> String {
        let secure = if self.cookie_secure { "; Secure" } else { "" };
        format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", session.id)
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').filter_map(|pair| pair.trim().split_once('=')).find(|(n, _)| *n == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(config: AdminConfig) -> Guard {
        Guard::new(&config, ThrottleConfig::default()).unwrap()
    }

    #[test]
    fn without_credentials_only_loopback_is_admitted_and_signed_in() {
        let guard = guard(AdminConfig::default());
        assert!(guard.admits("127.0.0.1".parse().unwrap()));
        assert!(guard.admits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!guard.admits("192.0.2.1".parse().unwrap()));
        assert!(guard.open().signed_in);
    }

    #[tokio::test]
    async fn the_token_file_signs_in_and_a_wrong_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        let guard = guard(AdminConfig { token_file: Some(file), ..AdminConfig::default() });
        let anonymous = guard.open();
        assert!(!anonymous.signed_in);
        let peer = "192.0.2.1".parse().unwrap();
        assert!(guard.sign_in(peer, &anonymous, Secret::new("wrong")).await.is_none());
        let session = guard.sign_in(peer, &anonymous, Secret::new("s3cret-token")).await.unwrap();
        assert!(session.signed_in && session.id != anonymous.id);
        assert!(guard.session(Some(&anonymous.id)).is_none(), "the anonymous session is replaced");
    }

    #[test]
    fn the_csrf_token_must_match() {
        let guard = guard(AdminConfig::default());
        let session = guard.open();
        assert!(Guard::csrf_ok(&session, Some(&session.csrf.clone())));
        assert!(!Guard::csrf_ok(&session, Some("x")));
        assert!(!Guard::csrf_ok(&session, None));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let guard = guard(AdminConfig { cookie_secure: true, ..AdminConfig::default() });
        let cookie = guard.cookie(&guard.open());
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"));
        assert_eq!(cookie_value("a=b; popgate_admin=xyz", COOKIE), Some("xyz"));
    }
}
