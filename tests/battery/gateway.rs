//! popgate in-process for the battery: `support::gateway::Gateway` with
//! logins routed through the fixture's `Router` (pass-through, or OAuth
//! tokens for the HTTP APIs), and every thread of its runtime marked for
//! `memory_use`, so that only popgate's allocations are counted — not the
//! test client's, nor those of a store that lives in the test process.

use std::sync::Arc;

use popgate::auth::accounts::Router;
use popgate::config::Config;

use crate::memory_use;
pub use crate::support::gateway::Gateway as Popgate;

/// Serves `config` (its first listener, moved to 127.0.0.1:0) with logins
/// routed by `router`.
pub fn start(config: Config, router: Arc<dyn Router>) -> Popgate {
    Popgate::routed_with_hook(config, router, memory_use::count_this_thread)
}
