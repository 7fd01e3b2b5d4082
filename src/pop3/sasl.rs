//! SASL exchanges on the POP3 side (RFC 5034 AUTH): decoding client
//! responses into credentials. No I/O; the session drives the exchange.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::mail::{Credentials, Proof, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// draft-murchison-sasl-login: user name, then password, each prompted.
    Login,
    /// Google's XOAUTH2: `user=…^Aauth=Bearer …^A^A`.
    XOAuth2,
    /// RFC 7628.
    OAuthBearer,
}

impl Mechanism {
    pub const ALL: &'static [Mechanism] =
        &[Mechanism::Plain, Mechanism::Login, Mechanism::XOAuth2, Mechanism::OAuthBearer];

    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            "XOAUTH2" => Some(Mechanism::XOAuth2),
            "OAUTHBEARER" => Some(Mechanism::OAuthBearer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// Carries a bearer token rather than a password.
    pub fn is_oauth(self) -> bool {
        matches!(self, Mechanism::XOAuth2 | Mechanism::OAuthBearer)
    }
}

/// The challenge LOGIN sends for the user name (base64 of "Username:").
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
/// The challenge LOGIN sends for the password (base64 of "Password:").
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// A user name and bearer token from an OAuth mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerToken {
    pub user: String,
    pub token: Secret,
}

/// `user=<user>^Aauth=Bearer <token>^A^A` (Google's XOAUTH2 format).
pub fn xoauth2(response: &[u8]) -> Result<BearerToken, SaslError> {
    let text = std::str::from_utf8(response).map_err(|_| SaslError::Malformed("XOAUTH2"))?;
    let mut user = None;
    let mut token = None;
    for field in text.split('\x01').filter(|f| !f.is_empty()) {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(auth) = field.strip_prefix("auth=") {
            token = bearer(auth);
        }
    }
    match (user, token) {
        (Some(user), Some(token)) if !user.is_empty() => {
            Ok(BearerToken { user: user.to_string(), token: Secret::new(token) })
        }
        _ => Err(SaslError::Malformed("XOAUTH2")),
    }
}

/// RFC 7628: `n,a=<user>,^A[key=value^A]*^A`, with `auth=Bearer <token>`.
pub fn oauthbearer(response: &[u8]) -> Result<BearerToken, SaslError> {
    let text = std::str::from_utf8(response).map_err(|_| SaslError::Malformed("OAUTHBEARER"))?;
    let (gs2, rest) = text.split_once('\x01').ok_or(SaslError::Malformed("OAUTHBEARER"))?;
    // gs2-header: cbind-flag "," [authzid] ","  (RFC 5801); channel binding
    // is not supported, so "p=" is refused.
    let mut gs2_parts = gs2.splitn(3, ',');
    let (Some(flag), Some(authzid), Some("")) = (gs2_parts.next(), gs2_parts.next(), gs2_parts.next()) else {
        return Err(SaslError::Malformed("OAUTHBEARER"));
    };
    if flag != "n" && flag != "y" {
        return Err(SaslError::Malformed("OAUTHBEARER"));
    }
    let user = authzid.strip_prefix("a=").map(|u| u.replace("=2C", ",").replace("=3D", "="));
    let token = rest.split('\x01').find_map(|kv| kv.strip_prefix("auth=")).and_then(bearer);
    match (user, token) {
        (Some(user), Some(token)) if !user.is_empty() => Ok(BearerToken { user, token: Secret::new(token) }),
        _ => Err(SaslError::Malformed("OAUTHBEARER")),
    }
}

/// `Bearer <token>`, scheme case-insensitive (RFC 6750).
fn bearer(auth: &str) -> Option<&str> {
    let (scheme, token) = auth.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token.trim())
}

/// The RFC 7628 error challenge (also what Google sends for XOAUTH2): the
/// client must answer it (with `^A` or an empty line) before the final -ERR.
pub fn oauth_error_challenge(mechanism: Mechanism) -> String {
    let json = match mechanism {
        Mechanism::XOAuth2 => r#"{"status":"401","schemes":"bearer"}"#,
        _ => r#"{"status":"invalid_token","schemes":"bearer"}"#,
    };
    STANDARD.encode(json)
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
    fn oauth_forms() {
        let t =
            xoauth2(b"user=someone@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")
                .unwrap();
        assert_eq!(t.user, "someone@example.com");
        assert_eq!(t.token.expose(), "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        assert!(xoauth2(b"user=a\x01\x01").is_err());
        assert!(xoauth2(b"auth=Bearer x\x01\x01").is_err());
        assert!(xoauth2(b"user=a\x01auth=Basic x\x01\x01").is_err());
        // RFC 7628 section 4.1's example.
        let t = oauthbearer(b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01").unwrap();
        assert_eq!(t.user, "user@example.com");
        assert_eq!(t.token.expose(), "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==");
        assert_eq!(oauthbearer(b"n,a=a=2Cb,\x01auth=Bearer t\x01\x01").unwrap().user, "a,b");
        assert!(oauthbearer(b"p=tls-unique,a=u,\x01auth=Bearer t\x01\x01").is_err());
        assert!(oauthbearer(b"n,,\x01auth=Bearer t\x01\x01").is_err(), "no user name");
        assert!(oauthbearer(b"garbage").is_err());
        let challenge = STANDARD.decode(oauth_error_challenge(Mechanism::OAuthBearer)).unwrap();
        assert!(String::from_utf8(challenge).unwrap().contains("invalid_token"));
    }

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
