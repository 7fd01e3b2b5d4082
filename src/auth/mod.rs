//! Client credentials as they travel from the POP3 session to a backend,
//! and the accounts they reach.
//!
//! Owns the `Secret` type, which never prints its content (Debug and Display
//! are redacted), and the check that refuses credentials a backend command
//! could be confused by. Never logs a secret.
//!
//! - `accounts`: the `Router` seam (which backend account a login reaches).
//! - `routing`: `[[account]]` configuration and the `AccountRouter`
//!   (pass-through by user or domain; mapped device users).
//! - `passwords`: Argon2id device password hashes; secrets from environment
//!   variables or files.
//! - `oauth`: providers, the token endpoint client, `popgate oauth login`
//!   flows and commands.
//! - `tokens`: the encrypted token store and per-account refresh.

pub mod accounts;
pub mod oauth;
pub mod passwords;
pub mod routing;
pub mod tokens;

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
