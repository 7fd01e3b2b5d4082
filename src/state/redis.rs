//! The Redis implementation of [`SharedState`] (Redis 6+, Valkey, managed
//! Redis), on the `redis` crate's `ConnectionManager`: one multiplexed
//! connection per process that reconnects by itself.
//!
//! It connects on first use, so popgate starts (and serves, on local state)
//! while Redis is down. Every command is bounded by `command_timeout_ms`;
//! after a failure the store is not asked again for `retry_after_secs`, so
//! an outage costs one timeout, not one per login. Going down and coming
//! back are each logged once, with the target but never the password.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ConnectionInfo, ProtocolVersion, RedisConnectionInfo};

use super::{SharedState, StateConfig, StateError};
use crate::mail::Secret;

/// Where the store is, as parsed from `[state] url` (no password in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
}

impl RedisTarget {
    /// Parses `redis://[user@]host[:port][/db]` or `rediss://…`. The error
    /// never repeats the URL (it may hold a password).
    pub fn parse(text: &str) -> Result<RedisTarget, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e}); use redis://host:port/0"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err("use redis://host:port/0 or rediss://host:port/0".into()),
        };
        if url.password().is_some() {
            return Err("a password in the URL would be shown wherever the URL is; put it in \
                        state.password_file or state.password_env"
                .into());
        }
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err("the URL names no host; use redis://host:port/0".into()),
        };
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            n => n
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=1_000).contains(n))
                .ok_or("the path must be a database number, e.g. /0")?,
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err("no query or fragment: options are keys of [state]".into());
        }
        let username = (!url.username().is_empty()).then(|| url.username().to_string());
        Ok(RedisTarget { tls, host, port: url.port().unwrap_or(6379), db, username })
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self.username.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{user}{host}:{}/{}", self.port, self.db)
    }
}

pub struct RedisState {
    target: RedisTarget,
    client: Client,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    retry_after: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    resting_until: Mutex<Option<Instant>>,
    down: AtomicBool,
}

impl RedisState {
    pub fn new(url: &str, password: Option<Secret>, config: &StateConfig) -> Result<RedisState, String> {
        let target = RedisTarget::parse(url)?;
        let addr = if target.tls {
            // The redis crate's rustls client takes the process's provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            ConnectionAddr::TcpTls { host: target.host.clone(), port: target.port, insecure: false, tls_params: None }
        } else {
            ConnectionAddr::Tcp(target.host.clone(), target.port)
        };
        let info = ConnectionInfo {
            addr,
            redis: RedisConnectionInfo {
                db: target.db,
                username: target.username.clone(),
                password: password.map(|p| p.expose().to_string()),
                protocol: ProtocolVersion::RESP2,
            },
        };
        let client = Client::open(info).map_err(|e| format!("state.url: {e}"))?;
        Ok(RedisState {
            target,
            client,
            prefix: config.key_prefix.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            command_timeout: config.command_timeout(),
            retry_after: Duration::from_secs(config.retry_after_secs),
            connection: tokio::sync::Mutex::new(None),
            resting_until: Mutex::new(None),
            down: AtomicBool::new(false),
        })
    }

    /// The store, for logs: never with the password.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Whether the last command failed (for health and metrics).
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        if let Some(until) = *self.resting_until.lock().unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Err(StateError::Unavailable("resting after a failure".into()));
        }
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &*slot {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.command_timeout)
            // No retries inside a command: a login must not wait for them.
            // A broken connection is reconnected on the next command, and
            // after a failure the store rests `retry_after_secs` anyway.
            .set_number_of_retries(0)
            .set_max_delay(1_000);
        let connection = tokio::time::timeout(
            self.connect_timeout + self.command_timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| StateError::Unavailable("connect timed out".into()))?
        .map_err(|e| StateError::Unavailable(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one pipeline, bounded in time; records outages and recoveries.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StateError> {
        let result = async {
            let mut connection = self.connection().await?;
            tokio::time::timeout(self.command_timeout, pipe.query_async::<T>(&mut connection))
                .await
                .map_err(|_| StateError::Unavailable("command timed out".into()))?
                .map_err(|e| StateError::Unavailable(e.to_string()))
        }
        .await;
        match &result {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(store = %self.target, "shared state store reachable again");
                }
            }
            Err(StateError::Unavailable(why)) => {
                if why != "resting after a failure" {
                    *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + self.retry_after);
                    if !self.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(store = %self.target, error = %why,
                            "shared state store unavailable: this replica uses its local state until it is back");
                    }
                }
            }
        }
        result
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl SharedState for RedisState {
    async fn increment(&self, keys: &[String], ttl: Duration) -> Result<Vec<u64>, StateError> {
        let mut pipe = redis::pipe();
        // MULTI/EXEC: every INCR lands with its PEXPIRE, so no counter is
        // ever left without an expiry.
        pipe.atomic();
        for key in keys {
            let key = self.key(key);
            pipe.incr(&key, 1u64).pexpire(&key, millis(ttl) as i64).ignore();
        }
        self.run(&pipe).await
    }

    async fn get(&self, keys: &[String]) -> Result<Vec<Option<u64>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.get(self.key(key));
        }
        self.run(&pipe).await
    }

    async fn set(&self, entries: &[(String, u64)], ttl: Duration) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.pset_ex(self.key(key), *value, millis(ttl)).ignore();
        }
        self.run(&pipe).await
    }

    async fn remove(&self, keys: &[String]) -> Result<(), StateError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.del(keys.iter().map(|k| self.key(k)).collect::<Vec<_>>()).ignore();
        self.run(&pipe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_print_without_secrets() {
        let t = RedisTarget::parse("rediss://popgate@cache.example:6380/3").unwrap();
        assert_eq!(t.to_string(), "rediss://popgate@cache.example:6380/3");
        assert_eq!(RedisTarget::parse("redis://[::1]").unwrap().to_string(), "redis://[::1]:6379/0");
    }
}
