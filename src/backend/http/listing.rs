//! What the HTTP backends remember between polls so that an unchanged
//! mailbox costs one request: per account, the provider's change cursor
//! (Gmail `historyId`, Graph `deltaLink`, JMAP `Email` state) and the
//! listing it describes. The backends own what a state holds; this module
//! owns only its bounds: a total number of remembered messages across
//! accounts (least recently used states go first) and an idle expiry.
//!
//! A remembered state is never the truth, only a starting point: every
//! poll asks the provider what changed since its cursor, and any doubt
//! (the cursor refused as too old, a reply that does not add up, too many
//! changes) makes the backend list the mailbox in full and start over.
//! Nothing here ever holds a credential: tokens a state was checked with
//! are kept as keyed hashes (`TokenSeal`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ring::hmac;

use crate::mail::{InvalidSetting, Secret};

/// Messages remembered in listing states, across the accounts of one
/// backend: ~100 octets each (an id, a date, a size), ~100 MB at most.
pub fn default_state_messages() -> u64 {
    1_000_000
}

/// A state unused this long is dropped: the next poll lists in full.
pub fn default_state_idle_secs() -> u64 {
    86_400
}

/// The bounds of the two settings every HTTP backend has.
pub fn check_settings(messages: u64, idle_secs: u64) -> Result<(), InvalidSetting> {
    InvalidSetting::bounded("listing_state_messages", messages, 0..=10_000_000)?;
    InvalidSetting::bounded("listing_state_idle_secs", idle_secs, 60..=2_592_000)
}

/// A listing state's weight against `listing_state_messages`.
pub trait Remembered: Send + Sync + 'static {
    fn messages(&self) -> usize;
}

/// Listing states by account key; disabled (nothing kept, every poll lists
/// in full) when the bound is 0.
pub struct ListingStates<S: Remembered> {
    cache: Option<moka::sync::Cache<String, Arc<S>>>,
}

impl<S: Remembered> Clone for ListingStates<S> {
    fn clone(&self) -> Self {
        ListingStates { cache: self.cache.clone() }
    }
}

impl<S: Remembered> ListingStates<S> {
    pub fn new(max_messages: u64, idle_secs: u64) -> Self {
        let cache = (max_messages > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_messages)
                .weigher(|_: &String, state: &Arc<S>| u32::try_from(state.messages() + 1).unwrap_or(u32::MAX))
                .time_to_idle(Duration::from_secs(idle_secs))
                .build()
        });
        ListingStates { cache }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    pub fn get(&self, key: &str) -> Option<Arc<S>> {
        self.cache.as_ref()?.get(key)
    }

    pub fn put(&self, key: &str, state: S) {
        if let Some(cache) = &self.cache {
            cache.insert(key.to_string(), Arc::new(state));
        }
    }

    pub fn forget(&self, key: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }

    /// After this gateway removed messages: the state without them (its
    /// cursor still predates the removal, so the provider reports it again
    /// and the state stays right whichever session stores last).
    pub fn drop_messages(&self, key: &str, without: impl FnOnce(&S) -> S) {
        if let Some(state) = self.get(key) {
            self.put(key, without(&state));
        }
    }
}

/// A keyed hash of an access token (per-process random key): a state
/// remembers which tokens were seen to reach its mailbox without holding
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSeal([u8; 32]);

impl TokenSeal {
    pub fn of(token: &Secret) -> TokenSeal {
        static KEY: OnceLock<hmac::Key> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new()).expect("system randomness")
        });
        let tag = hmac::sign(key, token.expose().as_bytes());
        let mut seal = [0; 32];
        seal.copy_from_slice(&tag.as_ref()[..32]);
        TokenSeal(seal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Listing(usize);
    impl Remembered for Listing {
        fn messages(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn states_are_bounded_by_messages_and_can_be_disabled() {
        let states = ListingStates::new(1_000, 60);
        states.put("a", Listing(10));
        assert_eq!(states.get("a").map(|s| s.0), Some(10));
        states.drop_messages("a", |s| Listing(s.0 - 1));
        assert_eq!(states.get("a").map(|s| s.0), Some(9));
        states.forget("a");
        assert!(states.get("a").is_none());
        // One state heavier than the whole bound is not kept.
        states.put("big", Listing(5_000));
        states.cache.as_ref().unwrap().run_pending_tasks();
        assert!(states.get("big").is_none());
        let off = ListingStates::<Listing>::new(0, 60);
        off.put("a", Listing(1));
        assert!(!off.enabled() && off.get("a").is_none());
    }

    #[test]
    fn settings_are_bounded() {
        assert!(check_settings(default_state_messages(), default_state_idle_secs()).is_ok());
        assert!(check_settings(0, 60).is_ok());
        assert_eq!(check_settings(10_000_001, 60).unwrap_err().key, "listing_state_messages");
        assert_eq!(check_settings(1, 59).unwrap_err().key, "listing_state_idle_secs");
        assert_eq!(check_settings(1, 2_592_001).unwrap_err().key, "listing_state_idle_secs");
    }

    #[test]
    fn seals_tell_tokens_apart_without_holding_them() {
        let (a, b) = (Secret::new("token-a"), Secret::new("token-b"));
        assert_eq!(TokenSeal::of(&a), TokenSeal::of(&a));
        assert_ne!(TokenSeal::of(&a), TokenSeal::of(&b));
    }
}
