//! The shared words of popgate: what crosses from one part to another.
//!
//! The POP3 session, the backends and the account router all speak of
//! credentials, secrets, message ids and the classes of failure a reply is
//! chosen from; none of them owns these words, so they live here, and this
//! module imports nothing else of the crate. Owns `Secret`, whose content no
//! formatting trait shows: the wrong thing (logging a password) is made
//! impossible rather than remembered.

use std::fmt;

/// A password, token or SASL payload. Its content is reachable only through
/// `expose`, and no formatting trait shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What the client proved who it is with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    Password(Secret),
    /// An OAuth 2.0 bearer token (SASL XOAUTH2 or OAUTHBEARER from the client).
    Bearer(Secret),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub proof: Proof,
}

impl Credentials {
    pub fn password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials { user: user.into(), proof: Proof::Password(Secret::new(password)) }
    }

    /// Refuses credentials that no backend command may carry: empty user
    /// names, and NUL, CR or LF anywhere (they could end or split a protocol
    /// line on the backend side).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.user.is_empty() {
            return Err("empty user name");
        }
        let forbidden = |s: &str| s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'));
        if forbidden(&self.user) {
            return Err("NUL, CR or LF in the user name");
        }
        match &self.proof {
            Proof::Password(p) if forbidden(p.expose()) => Err("NUL, CR or LF in the password"),
            Proof::Bearer(t) if forbidden(t.expose()) || t.expose().contains('\x01') => Err("invalid bearer token"),
            Proof::Password(_) | Proof::Bearer(_) => Ok(()),
        }
    }
}

/// How a message is addressed in its store (IMAP UID, JMAP id, …). Opaque to
/// everything but the backend that issued it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreId(pub String);

/// Why a backend call failed, in terms a POP3 reply can be chosen from.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store refused these credentials.
    #[error("authentication failed")]
    AuthFailed,
    /// The credentials cannot be sent to this store (e.g. NUL or CR/LF in them).
    #[error("credentials rejected before reaching the backend: {0}")]
    BadCredentials(&'static str),
    /// The mailbox is locked or too many sessions are open for this account.
    #[error("mailbox in use: {0}")]
    InUse(String),
    /// Transient: network, timeout, server down, throttled. Try again later.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A permanent problem with this account or configuration.
    #[error("backend refused: {0}")]
    Permanent(String),
    /// The message no longer exists in the store.
    #[error("message no longer exists")]
    MessageGone,
}

impl BackendError {
    pub fn unavailable(what: impl fmt::Display) -> Self {
        BackendError::Unavailable(what.to_string())
    }
}

/// A configuration value that is out of bounds or contradicts another,
/// named by its key. Each part checks its own table and names keys relative
/// to it; whoever assembles the file puts the table's path in front
/// (`within`), so the message names the key as the file spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {why}")]
pub struct InvalidSetting {
    pub key: String,
    pub why: String,
}

impl InvalidSetting {
    pub fn new(key: impl Into<String>, why: impl Into<String>) -> Self {
        InvalidSetting { key: key.into(), why: why.into() }
    }

    /// `Ok` when `value` lies in `bounds`; otherwise names `key` and the
    /// bounds. Every numeric setting goes through this, so no value the
    /// checks accept can overflow a timer or a cache downstream.
    pub fn bounded<T: PartialOrd + fmt::Display>(
        key: &str,
        value: T,
        bounds: std::ops::RangeInclusive<T>,
    ) -> Result<(), InvalidSetting> {
        if bounds.contains(&value) {
            return Ok(());
        }
        let (low, high) = bounds.into_inner();
        Err(InvalidSetting::new(key, format!("must be between {low} and {high} (is {value})")))
    }

    /// The same problem, with the key inside the table `prefix`.
    pub fn within(self, prefix: &str) -> Self {
        let key = if self.key.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", self.key) };
        InvalidSetting { key, why: self.why }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let c = Credentials::password("alice", "hunter2");
        let shown = format!("{c:?} {}", Secret::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(Credentials::password("alice", "a\"b\\c").validate().is_ok());
        assert!(Credentials::password("alice", "a\0b").validate().is_err());
        assert!(Credentials::password("al\rice", "x").validate().is_err());
        assert!(Credentials::password("alice", "x\ny").validate().is_err());
        assert!(Credentials::password("", "x").validate().is_err());
    }
}
