//! popgate in-process for the battery: `support::gateway::Gateway` with
//! logins routed through the fixture's `Router` (pass-through, or OAuth
//! tokens for the HTTP APIs), and every thread of its runtime marked for
//! `memory_use`, so that only popgate's allocations are counted — not the
//! test client's, nor those of a store that lives in the test process.

use std::sync::Arc;

use popgate::auth::accounts::policy::DevicePolicy;
use popgate::auth::accounts::{Route, Router};
use popgate::backend::SharedBackend;
use popgate::config::Config;
use popgate::mail::{BackendError, Credentials};

use crate::memory_use;
pub use crate::support::gateway::Gateway as Popgate;

/// Serves `config` (its first listener, moved to 127.0.0.1:0) with logins
/// routed by `router`; with `[state] url` set to the fixture's Redis when it
/// has one (`fixture::WithRedis`).
pub fn start(mut config: Config, router: Arc<dyn Router>) -> Popgate {
    if let Some(url) = crate::fixture::state_url() {
        config.state.url = Some(url);
    }
    Popgate::routed_with_hook(config, router, memory_use::count_this_thread)
}

/// A fixture's router with a device policy on every route, as
/// `[account.policy]` gives a mapped account's devices.
pub struct WithPolicy {
    pub inner: Arc<dyn Router>,
    pub policy: DevicePolicy,
}

#[async_trait::async_trait]
impl Router for WithPolicy {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        let mut route = self.inner.route(client).await?;
        route.policy = self.policy.clone();
        Ok(route)
    }

    async fn refresh(&self, route: &Route) -> Result<Option<Credentials>, BackendError> {
        self.inner.refresh(route).await
    }

    fn accepts_bearer_tokens(&self) -> bool {
        self.inner.accepts_bearer_tokens()
    }

    fn primary_backend(&self) -> SharedBackend {
        self.inner.primary_backend()
    }
}
