//! A `Router` that SIGHUP can replace: logins after a reload are routed by
//! the new accounts and device users (a printer added or disabled takes
//! effect without a restart); sessions already logged in keep the backend
//! session they have.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use super::{Route, Router};
use crate::backend::SharedBackend;
use crate::mail::{BackendError, Credentials};

pub struct ReloadableRouter {
    current: RwLock<Arc<dyn Router>>,
}

impl ReloadableRouter {
    pub fn new(router: Arc<dyn Router>) -> Self {
        ReloadableRouter { current: RwLock::new(router) }
    }

    /// New logins go to `router` from now on.
    pub fn replace(&self, router: Arc<dyn Router>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = router;
    }

    fn current(&self) -> Arc<dyn Router> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl Router for ReloadableRouter {
    async fn route(&self, client: &Credentials) -> Result<Route, BackendError> {
        self.current().route(client).await
    }

    async fn refresh(&self, route: &Route) -> Result<Option<Credentials>, BackendError> {
        self.current().refresh(route).await
    }

    fn accepts_bearer_tokens(&self) -> bool {
        self.current().accepts_bearer_tokens()
    }

    fn primary_backend(&self) -> SharedBackend {
        self.current().primary_backend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::demo::{DemoBackend, DemoStore};

    #[tokio::test]
    async fn logins_after_a_replace_are_routed_by_the_new_router() {
        let first: SharedBackend = Arc::new(DemoBackend::new(DemoStore::new()));
        let second: SharedBackend = Arc::new(DemoBackend::new(DemoStore::new()));
        let router = ReloadableRouter::new(Arc::new(super::super::PassThrough::new(first.clone())));
        let client = Credentials::password("alice", "pw");
        assert!(Arc::ptr_eq(&router.route(&client).await.unwrap().backend, &first));
        router.replace(Arc::new(super::super::PassThrough::new(second.clone())));
        assert!(Arc::ptr_eq(&router.route(&client).await.unwrap().backend, &second));
        assert!(Arc::ptr_eq(&router.primary_backend(), &second));
    }
}
