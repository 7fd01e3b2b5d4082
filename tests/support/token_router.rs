//! Mapped accounts for the HTTP API backends, in miniature: a `Router` that
//! checks a local POP3 password and hands the backend `Proof::Bearer`
//! access tokens it gets from a test-controlled token source — and a fresh
//! one when `refresh` is asked (what an OAuth refresh-token flow does) —
//! to run popgate in-process with (`support::gateway::Gateway::routed`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use popgate::auth::accounts::{Route, Router};
use popgate::backend::SharedBackend;
use popgate::mail::{BackendError, Credentials, Proof, Secret};

/// Where fresh access tokens come from: `Err` is a failed refresh (say, a
/// revoked refresh token).
pub type TokenSource = dyn Fn() -> Result<String, String> + Send + Sync;

pub struct TokenRouter {
    backend: SharedBackend,
    /// The POP3 user and password the device logs in with.
    local: (String, String),
    /// The backend account the tokens are for.
    account: String,
    current: Mutex<String>,
    source: Arc<TokenSource>,
    refreshes: AtomicUsize,
}

impl TokenRouter {
    pub fn new(
        backend: SharedBackend,
        local: (&str, &str),
        account: &str,
        first_token: String,
        source: Arc<TokenSource>,
    ) -> Arc<TokenRouter> {
        Arc::new(TokenRouter {
            backend,
            local: (local.0.to_string(), local.1.to_string()),
            account: account.to_string(),
            current: Mutex::new(first_token),
            source,
            refreshes: AtomicUsize::new(0),
        })
    }

    /// How many times the gateway asked for a fresh token.
    pub fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::SeqCst)
    }

    /// The access token the router hands out now.
    pub fn current_token(&self) -> String {
        self.current.lock().unwrap().clone()
    }

    fn credentials(&self) -> Credentials {
        let token = self.current.lock().unwrap().clone();
        Credentials { user: self.account.clone(), proof: Proof::Bearer(Secret::new(token)) }
    }
}

#[async_trait]
impl Router for TokenRouter {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        let Proof::Password(password) = &client.proof else {
            return Err(BackendError::AuthFailed);
        };
        if client.user != self.local.0 || password.expose() != self.local.1 {
            return Err(BackendError::AuthFailed);
        }
        Ok(Route {
            backend: self.backend.clone(),
            credentials: self.credentials(),
            account: self.account.clone(),
            label: self.account.clone(),
            policy: Default::default(),
        })
    }

    async fn refresh(&self, _route: &Route) -> Result<Option<Credentials>, BackendError> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        let fresh = (self.source)().map_err(|why| BackendError::Unavailable(format!("token refresh failed: {why}")))?;
        *self.current.lock().unwrap() = fresh;
        Ok(Some(self.credentials()))
    }

    fn accepts_bearer_tokens(&self) -> bool {
        false
    }

    fn primary_backend(&self) -> SharedBackend {
        self.backend.clone()
    }
}
