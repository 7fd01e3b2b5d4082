//! One OAuth account's access token: handed out while it is fresh,
//! refreshed before it expires — once, however many devices ask at the same
//! moment (one async lock per account is held across the refresh, so the
//! others wait for its result instead of refreshing too).
//!
//! Order of a refresh: ask the provider; store the answer (a rotated
//! refresh token replaces the old one durably); only then use the new
//! access token. If the store cannot be written, the new token is kept in
//! memory, not used, and the save is retried first on the next request.
//!
//! Failure: the device gets `-ERR [SYS/TEMP]` (unless the old access token
//! is still valid), one clear log line says what to do, the refreshes
//! metric counts it, and the provider is not asked again for
//! `retry_after_failure_secs` — by any replica: the wait is written to a
//! shared store before its refresh lock is given back, and a replica that
//! takes the lock looks for it before calling the token endpoint. The
//! stored token is never deleted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{RefreshLock, StoreError, StoredToken, TokenEvent, TokenStore, unix_now};
use crate::auth::oauth::Grant;
use crate::auth::oauth::client::{OAuthClient, TokenError};
use crate::mail::Secret;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    #[error("no OAuth token stored for account {0}: run `popgate oauth login {0}`")]
    Missing(String),
    #[error("account {account}: the stored token has no refresh token: run `popgate oauth login {account}`")]
    NoRefreshToken { account: String },
    #[error("account {account}: token refresh failed: {why}")]
    RefreshFailed { account: String, why: String },
    #[error("account {account}: {source}")]
    Store { account: String, source: StoreError },
    #[error(
        "account {0}: the access token expired and this replica does not refresh (token_store.refresh = false); waiting for the one that does"
    )]
    WaitingForRefresher(String),
    #[error("account {0}: the backend refuses a token issued moments ago (wrong account, scope or permissions?)")]
    FreshTokenRefused(String),
}

/// How long a refusal only an operator can end (`TokenError::operator_action`)
/// keeps popgate from asking the provider again: asking every
/// `retry_after_failure_secs` would change nothing but the provider's
/// opinion of the app. A token stored meanwhile (`popgate oauth login`) is
/// used at once.
pub const OPERATOR_RETRY: Duration = Duration::from_secs(3600);

/// How often a request waiting for another replica's refresh looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);

enum Turn {
    /// This process refreshes, holding the lock.
    Refresh(RefreshLock),
    /// Another process stored a usable token meanwhile.
    Found(Secret),
    /// No refresh now, and why.
    NotNow(String),
}

pub struct TokenSourceSettings {
    pub may_refresh: bool,
    pub margin: Duration,
    pub retry_after: Duration,
}

pub struct TokenSource {
    account: String,
    client: OAuthClient,
    store: Arc<dyn TokenStore>,
    settings: TokenSourceSettings,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The token in use; it is in the store.
    current: Option<StoredToken>,
    /// The store's version of `current` (0: the store has no versions).
    version: u64,
    /// A refreshed token the store did not take yet: not used until it
    /// does; with the refresh lock to give back once it is stored.
    unsaved: Option<(StoredToken, RefreshLock)>,
    /// The last refresh failure, what it was, and how long not to ask the
    /// provider again.
    failed: Option<(Instant, String, Duration)>,
    /// "No token" was logged once already.
    missing_reported: bool,
}

impl TokenSource {
    pub fn new(
        account: String,
        client: OAuthClient,
        store: Arc<dyn TokenStore>,
        settings: TokenSourceSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.oauth_account(&account);
        TokenSource { account, client, store, settings, metrics, state: Mutex::new(State::default()) }
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// A fresh access token, refreshed first if it expires within the
    /// margin.
    pub async fn access_token(&self) -> Result<Secret, TokenSourceError> {
        let mut state = self.state.lock().await;
        self.fresh(&mut state, None).await
    }

    /// The backend refused `refused`: a new token, unless another request
    /// already replaced it (then that one).
    pub async fn after_refusal(&self, refused: &Secret) -> Result<Secret, TokenSourceError> {
        let mut state = self.state.lock().await;
        self.fresh(&mut state, Some(refused)).await
    }

    /// Background upkeep: refreshes a token that is due, so devices that
    /// poll rarely find a fresh one and refresh tokens do not lapse from
    /// disuse. Quiet when there is no token yet.
    pub async fn maintain(&self) {
        let mut state = self.state.lock().await;
        if state.current.is_none() && self.client.grant == Grant::AuthorizationCode {
            match self.store.load(&self.account).await {
                Ok(Some(_)) => {}
                Ok(None) => return self.report_missing(&mut state),
                Err(e) => return tracing::warn!(account = %self.account, error = %e, "cannot read the token store"),
            }
        }
        let _ = self.fresh(&mut state, None).await;
    }

    /// Notes `event` where the admin page and `oauth status` see it; a
    /// note that cannot be written is logged, never a reason to fail.
    async fn note(&self, event: TokenEvent) {
        if let Err(e) = self.store.note(&self.account, event, unix_now()).await {
            tracing::warn!(account = %self.account, error = %e, "cannot note the token event");
        }
    }

    fn report_missing(&self, state: &mut State) {
        if !state.missing_reported {
            state.missing_reported = true;
            tracing::error!(
                account = %self.account,
                "no OAuth token stored for this account: run `popgate oauth login {}`; its devices get -ERR [SYS/TEMP] until then",
                self.account
            );
        }
    }

    fn usable(&self, token: &StoredToken, refused: Option<&Secret>, now: u64) -> bool {
        !token.is_due(now, self.settings.margin) && refused != Some(&token.access_token)
    }

    /// Still valid (not expired) and not the refused one: usable as a last
    /// resort while refreshing fails.
    fn still_valid(token: &StoredToken, refused: Option<&Secret>, now: u64) -> bool {
        !token.is_expired(now) && refused != Some(&token.access_token)
    }

    fn adopt(&self, state: &mut State, token: StoredToken, version: u64) {
        state.version = version;
        if let Some(at) = token.expires_at {
            self.metrics.oauth_token_expires(&self.account, at);
        }
        if state.failed.as_ref().is_some_and(|(_, _, wait)| *wait >= OPERATOR_RETRY) {
            tracing::info!(account = %self.account, "a new token is in use: the account no longer waits for an operator");
            self.metrics.oauth_operator_action(&self.account, false);
        }
        state.current = Some(token);
        state.failed = None;
        state.missing_reported = false;
    }

    /// Adopts the stored token if it differs from the one in use: a new
    /// version in a versioned store; otherwise a newer `obtained_at`.
    async fn look_in_store(&self, state: &mut State) -> Result<(), StoreError> {
        if let Some((stored, version)) = self.store.load_versioned(&self.account).await? {
            let newer = match &state.current {
                None => true,
                Some(_) if version != 0 || state.version != 0 => version != state.version,
                Some(current) => stored.obtained_at >= current.obtained_at && stored != *current,
            };
            if newer {
                tracing::debug!(account = %self.account, "using the token found in the store");
                self.adopt(state, stored, version);
            }
        }
        Ok(())
    }

    /// Takes the refresh lock — or, while another process holds it, waits
    /// (bounded by the store's `refresh_wait`) for the token it stores.
    /// With the store unreachable nobody can know who refreshes: nobody
    /// does, and the request ends in `-ERR [SYS/TEMP]` unless the current
    /// token is still valid.
    async fn refresh_turn(&self, state: &mut State, refused: Option<&Secret>) -> Turn {
        let deadline = Instant::now() + self.store.refresh_wait();
        loop {
            let why = match self.store.lock_refresh(&self.account).await {
                Ok(Some(lock)) => {
                    // Someone may have stored a token between our look and
                    // the lock.
                    match self.look_in_store(state).await {
                        Ok(()) => match &state.current {
                            Some(current) if self.usable(current, refused, unix_now()) => {
                                self.store.unlock_refresh(lock).await;
                                return Turn::Found(current.access_token.clone());
                            }
                            _ => return Turn::Refresh(lock),
                        },
                        Err(e) => {
                            self.store.unlock_refresh(lock).await;
                            format!("cannot read the token store: {e}")
                        }
                    }
                }
                Ok(None) => {
                    if self.look_in_store(state).await.is_ok()
                        && let Some(current) = &state.current
                        && self.usable(current, refused, unix_now())
                    {
                        return Turn::Found(current.access_token.clone());
                    }
                    "another replica is refreshing the token and has not stored it yet".to_string()
                }
                Err(e) => format!("cannot take the refresh lock, so not refreshing: {e}"),
            };
            if Instant::now() >= deadline {
                tracing::warn!(account = %self.account, "{why}");
                return Turn::NotNow(why);
            }
            tokio::time::sleep(LOCK_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    async fn fresh(&self, state: &mut State, refused: Option<&Secret>) -> Result<Secret, TokenSourceError> {
        let account = &self.account;
        // A refreshed token the store has not taken: store it before anything.
        if let Some((pending, lock)) = state.unsaved.take() {
            match self.store.save_over(account, &pending, state.version).await {
                Ok(Some(version)) => {
                    tracing::info!(account = %account, "stored the refreshed token (after an earlier failure)");
                    self.adopt(state, pending, version);
                    self.store.unlock_refresh(lock).await;
                }
                Ok(None) => {
                    tracing::warn!(account = %account, "a newer token was stored while this refresh could not be: using that one");
                    self.store.unlock_refresh(lock).await;
                }
                Err(source) => {
                    state.unsaved = Some((pending, lock));
                    self.metrics.oauth_refresh(account, "store_failed");
                    tracing::error!(account = %account, error = %source, "still cannot store the refreshed token; not using it");
                    return Err(TokenSourceError::Store { account: account.clone(), source });
                }
            }
        }
        let now = unix_now();
        if let Some(current) = &state.current
            && self.usable(current, refused, now)
        {
            return Ok(current.access_token.clone());
        }

        // Another process (`popgate oauth login`, another replica) may have
        // stored a newer token: look before refreshing, which would
        // otherwise spend a refresh token someone rotated.
        if let Err(source) = self.look_in_store(state).await {
            tracing::warn!(account = %account, error = %source, "cannot read the token store");
            if state.current.is_none() {
                return Err(TokenSourceError::Store { account: account.clone(), source });
            }
        }
        if let Some(current) = &state.current
            && self.usable(current, refused, now)
        {
            return Ok(current.access_token.clone());
        }

        let current = state.current.clone();
        if current.is_none() && self.client.grant == Grant::AuthorizationCode {
            self.report_missing(state);
            return Err(TokenSourceError::Missing(account.clone()));
        }
        let last_resort =
            current.as_ref().filter(|c| Self::still_valid(c, refused, now)).map(|c| c.access_token.clone());

        if !self.settings.may_refresh {
            return last_resort.ok_or_else(|| TokenSourceError::WaitingForRefresher(account.clone()));
        }
        if let Some(current) = &current
            && refused == Some(&current.access_token)
            && now.saturating_sub(current.obtained_at) < self.settings.retry_after.as_secs()
        {
            // Refreshing again would only make the provider rate-limit us.
            tracing::warn!(account = %account, "the backend refuses a token issued moments ago; not refreshing again yet");
            return Err(TokenSourceError::FreshTokenRefused(account.clone()));
        }
        if let Some((at, why, wait)) = &state.failed
            && at.elapsed() < *wait
        {
            return last_resort
                .ok_or_else(|| TokenSourceError::RefreshFailed { account: account.clone(), why: why.clone() });
        }

        // Only one process refreshes: wait for the lock, or for what the
        // process holding it stores.
        let lock = match self.refresh_turn(state, refused).await {
            Turn::Refresh(lock) => lock,
            Turn::Found(access) => return Ok(access),
            Turn::NotNow(why) => {
                return last_resort.ok_or_else(|| TokenSourceError::RefreshFailed { account: account.clone(), why });
            }
        };
        let current = state.current.clone();
        let last_resort =
            current.as_ref().filter(|c| Self::still_valid(c, refused, now)).map(|c| c.access_token.clone());
        // Another replica's refresh failed moments ago: wait as it does,
        // instead of asking the provider again from here.
        if let Some(left) = self.store.refresh_backoff(account).await {
            self.store.unlock_refresh(lock).await;
            let why = format!("another replica's token refresh failed; no refresh for {}s more", left.as_secs().max(1));
            tracing::info!(account = %account, wait_ms = left.as_millis() as u64, "{why}");
            state.failed = Some((Instant::now(), why.clone(), left));
            return last_resort.ok_or_else(|| TokenSourceError::RefreshFailed { account: account.clone(), why });
        }
        let previous_refresh = current.as_ref().and_then(|c| c.refresh_token.clone());
        let requested = match self.client.grant {
            Grant::ClientCredentials => self.client.client_credentials().await,
            Grant::AuthorizationCode => match &previous_refresh {
                Some(refresh_token) => self.client.refresh(refresh_token).await,
                None => {
                    self.store.unlock_refresh(lock).await;
                    return Err(TokenSourceError::NoRefreshToken { account: account.clone() });
                }
            },
        };
        let metrics = &self.metrics;
        match requested {
            Ok(response) => {
                let fresh = response.into_stored(previous_refresh.as_ref());
                let rotated = previous_refresh.is_some() && fresh.refresh_token != previous_refresh;
                // Durably stored before the new access token is used: with
                // rotation the old refresh token may be dead already.
                // Written over the version it was refreshed from, so a
                // token stored meanwhile is never overwritten.
                match self.store.save_over(account, &fresh, state.version).await {
                    Ok(Some(version)) => {
                        self.store.unlock_refresh(lock).await;
                        metrics.oauth_refresh(account, "ok");
                        self.note(TokenEvent::Refreshed).await;
                        tracing::info!(
                            account = %account,
                            rotated,
                            expires_in_secs = fresh.remaining_secs(unix_now()),
                            "access token refreshed"
                        );
                        let access = fresh.access_token.clone();
                        self.adopt(state, fresh, version);
                        Ok(access)
                    }
                    Ok(None) => {
                        self.store.unlock_refresh(lock).await;
                        metrics.oauth_refresh(account, "superseded");
                        tracing::warn!(account = %account, "a newer token was stored during this refresh: using that one");
                        let _ = self.look_in_store(state).await;
                        match &state.current {
                            Some(current) if self.usable(current, refused, unix_now()) => {
                                Ok(current.access_token.clone())
                            }
                            _ => Err(TokenSourceError::RefreshFailed {
                                account: account.clone(),
                                why: "the stored token changed during the refresh".into(),
                            }),
                        }
                    }
                    Err(source) => {
                        metrics.oauth_refresh(account, "store_failed");
                        tracing::error!(
                            account = %account, error = %source,
                            "refreshed the token but cannot store it; not using it until it is stored"
                        );
                        // The lock stays held (until it expires) so that no
                        // other replica refreshes with the old refresh token.
                        state.unsaved = Some((fresh, lock));
                        Err(TokenSourceError::Store { account: account.clone(), source })
                    }
                }
            }
            Err(e) => {
                metrics.oauth_refresh(account, e.metric_result());
                let still = if last_resort.is_some() {
                    "; the current access token is still valid and stays in use"
                } else {
                    "; devices get -ERR [SYS/TEMP]"
                };
                let mut wait = self.settings.retry_after;
                match &e {
                    TokenError::Refused { .. } if e.is_invalid_grant() => tracing::error!(
                        account = %account, error = %e,
                        "the provider refused the refresh token (revoked; expired — Google expires them after 7 days while the app's consent screen is in Testing, publish it to stop that; or the account's password changed): run `popgate oauth login {account}`; the stored token is kept{still}"
                    ),
                    _ if let Some((name, what_to_do)) = e.operator_action() => {
                        wait = wait.max(OPERATOR_RETRY);
                        metrics.oauth_operator_action(account, true);
                        tracing::error!(
                            account = %account, error = %e, refusal = name,
                            "operator action needed: {}; popgate asks the provider again in {} min, or as soon as a new token is stored{still}",
                            what_to_do.replace("ACCOUNT", account), wait.as_secs() / 60
                        );
                    }
                    _ => tracing::error!(
                        account = %account, error = %e,
                        "token refresh failed; retrying in {}s{still}", self.settings.retry_after.as_secs()
                    ),
                }
                if e.is_invalid_grant() {
                    self.note(TokenEvent::InvalidGrant(previous_refresh.as_ref().map(super::fingerprint))).await;
                }
                state.failed = Some((Instant::now(), e.to_string(), wait));
                // Shared before the lock is given back, so that the next
                // replica to take it finds the wait.
                if !wait.is_zero() {
                    self.store.note_refresh_failure(account, wait).await;
                }
                self.store.unlock_refresh(lock).await;
                last_resort
                    .ok_or_else(|| TokenSourceError::RefreshFailed { account: account.clone(), why: e.to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::auth::oauth::OAuthConfig;

    /// A store whose saves fail while `failing` is set.
    #[derive(Default)]
    struct FlakyStore {
        tokens: std::sync::Mutex<BTreeMap<String, StoredToken>>,
        failing: AtomicBool,
    }

    #[async_trait]
    impl TokenStore for FlakyStore {
        async fn load(&self, account: &str) -> Result<Option<StoredToken>, StoreError> {
            Ok(self.tokens.lock().unwrap().get(account).cloned())
        }
        async fn save(&self, account: &str, token: &StoredToken) -> Result<(), StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Other("disk full".into()));
            }
            self.tokens.lock().unwrap().insert(account.into(), token.clone());
            Ok(())
        }
        async fn load_all(&self) -> Result<BTreeMap<String, StoredToken>, StoreError> {
            Ok(self.tokens.lock().unwrap().clone())
        }
    }

    /// A token endpoint that issues `a1`/`r1`, `a2`/`r2`, … after `delay`.
    async fn token_endpoint(delay: Duration) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let issued = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let issued = issued.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !String::from_utf8_lossy(&request).contains("grant_type=") {
                        let n = socket.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    tokio::time::sleep(delay).await;
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    let body = format!(
                        r#"{{"access_token":"a{n}","refresh_token":"r{n}","expires_in":3600,"token_type":"Bearer"}}"#
                    );
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        (url, count)
    }

    async fn source(delay: Duration) -> (Arc<TokenSource>, Arc<FlakyStore>, Arc<AtomicUsize>) {
        let (url, count) = token_endpoint(delay).await;
        let config: OAuthConfig = toml::from_str(&format!(
            "provider = \"generic\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\nscopes = [\"mail\"]"
        ))
        .unwrap();
        let store = Arc::new(FlakyStore::default());
        let expired = StoredToken {
            access_token: Secret::new("a0"),
            refresh_token: Some(Secret::new("r0")),
            expires_at: Some(unix_now() - 1),
            obtained_at: unix_now() - 3600,
            scope: None,
        };
        store.save("acct", &expired).await.unwrap();
        let settings = TokenSourceSettings {
            may_refresh: true,
            margin: Duration::from_secs(60),
            retry_after: Duration::from_secs(30),
        };
        let metrics = Arc::new(Metrics::new());
        let source =
            TokenSource::new("acct".into(), OAuthClient::new(&config).unwrap(), store.clone(), settings, metrics);
        (Arc::new(source), store, count)
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_refresh() {
        let (source, store, count) = source(Duration::from_millis(200)).await;
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.access_token().await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().expose(), "a1");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let stored = store.load("acct").await.unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose(), "r1");
        // A refusal of the old token gets the new one, without a refresh.
        assert_eq!(source.after_refusal(&Secret::new("a0")).await.unwrap().expose(), "a1");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// Three "replicas" (token sources) sharing one state store: one
    /// refresh for all of them, the others read what it stored.
    #[tokio::test]
    async fn replicas_sharing_a_store_refresh_once() {
        use crate::state::memory::MemoryState;
        use crate::state::{SharedState, StateConfig};
        let (url, count) = token_endpoint(Duration::from_millis(200)).await;
        let config: OAuthConfig = toml::from_str(&format!(
            "provider = \"generic\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\nscopes = [\"mail\"]"
        ))
        .unwrap();
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(100));
        let key = super::super::StoreKey::generate_text();
        let store = |shared: Arc<dyn SharedState>| -> Arc<dyn TokenStore> {
            let key = super::super::StoreKey::from_text(&key).unwrap();
            Arc::new(super::super::SharedTokenStore::new(shared, key, &StateConfig::default(), None))
        };
        let expired = StoredToken {
            access_token: Secret::new("a0"),
            refresh_token: Some(Secret::new("r0")),
            expires_at: Some(unix_now() - 1),
            obtained_at: unix_now() - 3600,
            scope: None,
        };
        store(shared.clone()).save("acct", &expired).await.unwrap();
        let replicas: Vec<Arc<TokenSource>> = (0..3)
            .map(|_| {
                let settings = TokenSourceSettings {
                    may_refresh: true,
                    margin: Duration::from_secs(60),
                    // No pause after a refresh: the refusal below comes at once.
                    retry_after: Duration::ZERO,
                };
                Arc::new(TokenSource::new(
                    "acct".into(),
                    OAuthClient::new(&config).unwrap(),
                    store(shared.clone()),
                    settings,
                    Arc::new(Metrics::new()),
                ))
            })
            .collect();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let source = replicas[i % 3].clone();
                tokio::spawn(async move { source.access_token().await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().expose(), "a1");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // A refusal seen on every replica: still one refresh.
        let tasks: Vec<_> = replicas
            .iter()
            .map(|source| {
                let source = source.clone();
                tokio::spawn(async move { source.after_refusal(&Secret::new("a1")).await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().expose(), "a2");
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let stored = store(shared).load("acct").await.unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose(), "r2");
    }

    /// A token endpoint that answers every request with HTTP 500.
    async fn failing_endpoint() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let asked = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let asked = asked.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !String::from_utf8_lossy(&request).contains("grant_type=") {
                        let n = socket.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    asked.fetch_add(1, Ordering::SeqCst);
                    let body = "<html>down</html>";
                    let response = format!(
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        (url, count)
    }

    /// A refresh that failed on one "replica" holds the others off for the
    /// same `retry_after_failure_secs`: one call to the token endpoint.
    #[tokio::test]
    async fn a_failed_refresh_backs_off_every_replica_sharing_the_store() {
        use crate::state::memory::MemoryState;
        use crate::state::{SharedState, StateConfig};
        let (url, count) = failing_endpoint().await;
        let config: OAuthConfig = toml::from_str(&format!(
            "provider = \"generic\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\nscopes = [\"mail\"]"
        ))
        .unwrap();
        let shared: Arc<dyn SharedState> = Arc::new(MemoryState::new(100));
        let key = super::super::StoreKey::generate_text();
        let store = |shared: Arc<dyn SharedState>| -> Arc<dyn TokenStore> {
            let key = super::super::StoreKey::from_text(&key).unwrap();
            Arc::new(super::super::SharedTokenStore::new(shared, key, &StateConfig::default(), None))
        };
        let expired = StoredToken {
            access_token: Secret::new("a0"),
            refresh_token: Some(Secret::new("r0")),
            expires_at: Some(unix_now() - 1),
            obtained_at: unix_now() - 3600,
            scope: None,
        };
        store(shared.clone()).save("acct", &expired).await.unwrap();
        let replica = |shared: Arc<dyn SharedState>| {
            let settings = TokenSourceSettings {
                may_refresh: true,
                margin: Duration::from_secs(60),
                retry_after: Duration::from_secs(30),
            };
            TokenSource::new(
                "acct".into(),
                OAuthClient::new(&config).unwrap(),
                store(shared),
                settings,
                Arc::new(Metrics::new()),
            )
        };
        let replicas: Vec<TokenSource> = (0..3).map(|_| replica(shared.clone())).collect();
        for source in &replicas {
            for _ in 0..3 {
                let e = source.access_token().await.unwrap_err();
                assert!(matches!(e, TokenSourceError::RefreshFailed { .. }), "{e}");
            }
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "one call to the token endpoint for all three");
    }

    #[tokio::test]
    async fn a_refreshed_token_is_used_only_once_it_is_stored() {
        let (source, store, count) = source(Duration::ZERO).await;
        store.failing.store(true, Ordering::SeqCst);
        let e = source.access_token().await.unwrap_err();
        assert!(matches!(e, TokenSourceError::Store { .. }), "{e}");
        assert!(!e.to_string().contains("a1"));
        assert_eq!(store.load("acct").await.unwrap().unwrap().refresh_token.unwrap().expose(), "r0");
        // Still failing: the pending token is not used, and not refreshed
        // again (its refresh token may be the only live one).
        assert!(source.access_token().await.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1);
        store.failing.store(false, Ordering::SeqCst);
        assert_eq!(source.access_token().await.unwrap().expose(), "a1");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(store.load("acct").await.unwrap().unwrap().refresh_token.unwrap().expose(), "r1");
    }
}
