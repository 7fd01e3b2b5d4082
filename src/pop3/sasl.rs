//! SASL exchanges on the POP3 side (RFC 5034 AUTH): decoding client
//! responses into credentials. No I/O; the session drives the exchange.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::auth::{Credentials, Proof, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
}

impl Mechanism {
    pub const ALL: &'static [Mechanism] = &[Mechanism::Plain];

    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error("authorization identity differs from authentication identity")]
    Authzid,
}

/// Decodes a base64 client response; `=` is the empty response (RFC 5034).
pub fn decode_response(line: &str) -> Result<Vec<u8>, SaslError> {
    if line == "=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line.trim_end()).map_err(|_| SaslError::Base64)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`.
pub fn plain(response: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = response.split(|b| *b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed("PLAIN"));
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed("PLAIN"));
    let (authzid, user, password) = (text(authzid)?, text(authcid)?, text(passwd)?);
    if !authzid.is_empty() && authzid != user {
        return Err(SaslError::Authzid);
    }
    Ok(Credentials { user, proof: Proof::Password(Secret::new(password)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_forms() {
        let c = plain(b"\0alice\0pa ss").unwrap();
        assert_eq!(c, Credentials::password("alice", "pa ss"));
        assert!(plain(b"alice\0alice\0x").is_ok());
        assert_eq!(plain(b"bob\0alice\0x"), Err(SaslError::Authzid));
        assert_eq!(plain(b"alice\0x"), Err(SaslError::Malformed("PLAIN")));
        assert_eq!(plain(b"\0a\0b\0c"), Err(SaslError::Malformed("PLAIN")));
        assert_eq!(decode_response("="), Ok(vec![]));
        assert_eq!(decode_response("!!"), Err(SaslError::Base64));
        assert_eq!(decode_response("AGFsaWNlAHg=").unwrap(), b"\0alice\0x");
    }
}
