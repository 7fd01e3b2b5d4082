//! Connection limits per client address (the overall limit is a semaphore in
//! `server`). A `PerAddress` slot is held for the life of a connection and
//! given back on drop, so a crashed session cannot leak it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
}
