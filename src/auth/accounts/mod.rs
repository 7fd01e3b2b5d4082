//! Which backend account a POP3 login reaches, and with which credentials.
//!
//! The `Router` is the one seam between who logs in (the POP3 client's user
//! name and password or token) and what the backend is asked to accept. The
//! default, `PassThrough`, hands the client's credentials to the one
//! configured backend unchanged. Never logs a secret.

pub mod config;
pub mod mime_filter;
pub mod policy;
pub mod reloadable;
pub mod router;
pub mod seen;
pub mod ui_state;

use async_trait::async_trait;

use crate::backend::SharedBackend;
use crate::mail::{BackendError, Credentials};

/// Where a login goes.
pub struct Route {
    pub backend: SharedBackend,
    /// What the backend is given (the client's own in pass-through).
    pub credentials: Credentials,
    /// A stable name for the backend account, unique across backends (exact
    /// sizes are cached under it), for logs (never a secret).
    pub account: String,
    /// The account's `account` label in metrics: bounded by the
    /// configuration (a configured account's name, or one value for every
    /// pass-through login), never a raw login name unless the operator
    /// opted in (`[admin] metrics_login_names`).
    pub label: String,
    /// Which messages this login sees and what its DELE does.
    pub policy: policy::DevicePolicy,
}

#[async_trait]
pub trait Router: Send + Sync {
    /// Checks what the router can check itself and picks the backend
    /// account. `BackendError::AuthFailed` for a bad local password.
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError>;

    /// The backend of `route` refused the credentials the router gave it
    /// (e.g. an expired access token): return fresh ones to retry once, or
    /// `None` when retrying cannot help (pass-through).
    async fn refresh(&self, _route: &Route) -> Result<Option<Credentials>, BackendError> {
        Ok(None)
    }

    /// Clients may log in with OAuth bearer tokens (SASL XOAUTH2,
    /// OAUTHBEARER).
    fn accepts_bearer_tokens(&self) -> bool;

    /// The backend probed for readiness.
    fn primary_backend(&self) -> SharedBackend;
}

/// The client's credentials go to the one backend unchanged.
pub struct PassThrough {
    backend: SharedBackend,
    /// Label metrics with the login name (opt-in: unbounded series).
    label_by_login: bool,
}

impl PassThrough {
    pub fn new(backend: SharedBackend) -> Self {
        PassThrough { backend, label_by_login: false }
    }

    /// Metrics carry each login name as its `account` label instead of
    /// `telemetry::PASS_THROUGH_ACCOUNT`.
    pub fn labelled_by_login(mut self, on: bool) -> Self {
        self.label_by_login = on;
        self
    }
}

#[async_trait]
impl Router for PassThrough {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        let label =
            if self.label_by_login { client.user.clone() } else { crate::telemetry::PASS_THROUGH_ACCOUNT.to_string() };
        Ok(Route {
            backend: self.backend.clone(),
            credentials: client.clone(),
            account: client.user.clone(),
            label,
            policy: Default::default(),
        })
    }

    fn accepts_bearer_tokens(&self) -> bool {
        self.backend.accepts_bearer_tokens()
    }

    fn primary_backend(&self) -> SharedBackend {
        self.backend.clone()
    }
}
