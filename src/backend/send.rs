//! Sending a finished MIME message through a provider's mail API (Gmail
//! `users.messages.send`, Microsoft Graph `sendMail`): the generic "send raw
//! MIME" operation of the API backends, used by whoever accepts mail (the
//! submission listener) for accounts whose tokens are API tokens — Graph
//! tokens are not valid for SMTP AUTH.
//!
//! Synchronous and never retried here: a POST that failed half-way may have
//! been sent, and the caller's client (a scanner) retries on a 4xx reply. A
//! refusal says what the provider said, so the caller can map it to its own
//! protocol's reply. Secrets are never in these errors.

use std::time::Duration;

use reqwest::StatusCode;

use super::http;
use crate::mail::Secret;

/// Why a provider did not accept a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRefusal {
    /// 401: the token was refused (expired): refresh and try once more.
    Token,
    /// 429 or 5xx: nothing was sent; the same message may be sent later.
    Temporary { status: u16, reason: String },
    /// Another 4xx: the provider will not send this message as it is.
    Permanent { status: u16, reason: String },
    /// No HTTP answer (connection refused, TLS failure, timeout).
    Unreachable(String),
}

impl SendRefusal {
    /// Classifies an error answer; `reason` is the provider's error code
    /// (`ErrorSendAsDenied`, `invalidArgument`, …), never a token.
    pub fn from_status(status: StatusCode, reason: String) -> SendRefusal {
        match status.as_u16() {
            401 => SendRefusal::Token,
            status @ (408 | 429 | 500..=599) => SendRefusal::Temporary { status, reason },
            status => SendRefusal::Permanent { status, reason },
        }
    }
}

/// POSTs `build`'s request once within `timeout`; `Ok` only on `expected`.
/// `reason` reads the provider's error code out of an error body.
pub async fn post_once(
    what: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    expected: StatusCode,
    reason: fn(&[u8]) -> String,
) -> Result<(), SendRefusal> {
    let response = match tokio::time::timeout(timeout, request.send()).await {
        Err(_) => return Err(SendRefusal::Unreachable(format!("{what}: timed out waiting for the server"))),
        Ok(Err(e)) => return Err(SendRefusal::Unreachable(http::transport_error(what, &e).to_string())),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    // A send is done when the provider says so: 202 (Graph) or 200
    // (Gmail). Any other success code is treated as done too — the message
    // was accepted — but noted.
    if status.is_success() {
        if status != expected {
            tracing::info!(what, status = status.as_u16(), "unexpected success status for a send");
        }
        return Ok(());
    }
    let body = http::read_limited(response, 64 * 1024, timeout).await.unwrap_or_default();
    let refusal = SendRefusal::from_status(status, reason(&body));
    tracing::warn!(what, status = status.as_u16(), ?refusal, "the provider refused to send the message");
    Err(refusal)
}

/// The bearer `Authorization` header for `token` (marked sensitive).
pub fn authorization(token: &Secret) -> Result<reqwest::header::HeaderValue, SendRefusal> {
    let token = http::bearer_token(token).map_err(|e| SendRefusal::Permanent { status: 0, reason: e.to_string() })?;
    Ok(http::bearer_header(&token))
}
