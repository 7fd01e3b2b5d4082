//! Connection limits: overall (`ConnectionLimit`) and per client address
//! (`PerAddressLimit`). A slot is held for the life of a connection and
//! given back on drop, so a crashed session cannot leak it. Both are counts
//! checked against the limit in force: lowering a limit (SIGHUP) lets the
//! connections above it finish, and holds once they have.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The overall connection limit.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// (limit, connections open)
    state: Mutex<(usize, usize)>,
}

pub struct ConnectionSlot {
    limit: Arc<ConnectionLimit>,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit { state: Mutex::new((max, 0)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more connection, if under the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let mut state = self.lock();
        if state.1 >= state.0 {
            return None;
        }
        state.1 += 1;
        Some(ConnectionSlot { limit: self.clone() })
    }

    /// A new limit for new connections. Returns how many connections are
    /// open above it (they stay until they end; none replaces them).
    pub fn set_max(&self, max: usize) -> usize {
        let mut state = self.lock();
        state.0 = max;
        state.1.saturating_sub(max)
    }

    pub fn open(&self) -> usize {
        self.lock().1
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut state = self.limit.lock();
        state.1 -= 1;
    }
}

#[derive(Debug)]
pub struct PerAddressLimit {
    max: AtomicUsize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

pub struct AddressSlot {
    limit: Arc<PerAddressLimit>,
    address: IpAddr,
}

impl PerAddressLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerAddressLimit { max: AtomicUsize::new(max), open: Mutex::new(HashMap::new()) })
    }

    /// Changes the limit for new connections (connections already open stay).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A slot for one more connection from `address`, if under the limit.
    pub fn acquire(self: &Arc<Self>, address: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        *count += 1;
        Some(AddressSlot { limit: self.clone(), address })
    }

    pub fn open_from(&self, address: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&address).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_returned() {
        let limit = PerAddressLimit::new(2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let s1 = limit.acquire(a).unwrap();
        let _s2 = limit.acquire(a).unwrap();
        assert!(limit.acquire(a).is_none());
        assert!(limit.acquire(b).is_some());
        drop(s1);
        assert_eq!(limit.open_from(a), 1);
        assert!(limit.acquire(a).is_some());
    }

    #[test]
    fn a_lowered_limit_holds_once_the_excess_ends() {
        let limit = ConnectionLimit::new(3);
        let slots: Vec<_> = (0..3).map(|_| limit.try_acquire().unwrap()).collect();
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.set_max(1), 2, "two above the new limit");
        drop(slots);
        assert_eq!(limit.open(), 0);
        let held = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.set_max(2), 0);
        let _second = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(held);
    }
}
