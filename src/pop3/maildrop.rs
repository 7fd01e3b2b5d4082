//! The maildrop snapshot taken at login.
//!
//! Message numbers are positions in this snapshot and never change during the
//! session; mail that arrives later is not in it. DELE only marks an entry;
//! nothing is removed from the store until the UPDATE state.

use crate::mail::StoreId;
use crate::pop3::command::MessageNumber;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: StoreId,
    pub uidl: String,
    /// Exact octets of the canonical CRLF form (what RETR sends, unstuffed).
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    NoSuchMessage,
    Deleted,
}

#[derive(Debug)]
pub struct Maildrop {
    messages: Vec<Message>,
    deleted: Vec<bool>,
    deleted_count: usize,
    deleted_octets: u64,
    total_octets: u64,
}

impl Maildrop {
    pub fn new(messages: Vec<Message>) -> Self {
        let total_octets = messages.iter().map(|m| m.size).sum();
        let deleted = vec![false; messages.len()];
        Maildrop { messages, deleted, deleted_count: 0, deleted_octets: 0, total_octets }
    }

    /// (count, octets) of the messages not marked deleted, as STAT reports.
    pub fn stat(&self) -> (usize, u64) {
        (self.messages.len() - self.deleted_count, self.total_octets - self.deleted_octets)
    }

    fn index(&self, number: MessageNumber) -> Result<usize, Lookup> {
        let n = number as usize;
        if n == 0 || n > self.messages.len() {
            return Err(Lookup::NoSuchMessage);
        }
        if self.deleted[n - 1] {
            return Err(Lookup::Deleted);
        }
        Ok(n - 1)
    }

    /// The message with this number, unless it does not exist or is marked.
    pub fn get(&self, number: MessageNumber) -> Result<&Message, Lookup> {
        self.index(number).map(|i| &self.messages[i])
    }

    pub fn mark_deleted(&mut self, number: MessageNumber) -> Result<(), Lookup> {
        let i = self.index(number)?;
        self.deleted[i] = true;
        self.deleted_count += 1;
        self.deleted_octets += self.messages[i].size;
        Ok(())
    }

    pub fn unmark_all(&mut self) {
        self.deleted.fill(false);
        self.deleted_count = 0;
        self.deleted_octets = 0;
    }

    /// (number, message) for every message not marked deleted.
    pub fn visible(&self) -> impl Iterator<Item = (MessageNumber, &Message)> {
        self.messages.iter().enumerate().filter(|(i, _)| !self.deleted[*i]).map(|(i, m)| (i as MessageNumber + 1, m))
    }

    /// The store ids of exactly the messages marked deleted.
    pub fn marked(&self) -> Vec<StoreId> {
        self.messages.iter().zip(&self.deleted).filter(|(_, d)| **d).map(|(m, _)| m.id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop3() -> Maildrop {
        Maildrop::new(
            (1..=3).map(|i| Message { id: StoreId(format!("id{i}")), uidl: format!("u{i}"), size: i * 100 }).collect(),
        )
    }

    #[test]
    fn marks_hide_and_reset() {
        let mut m = drop3();
        assert_eq!(m.stat(), (3, 600));
        assert_eq!(m.get(0), Err(Lookup::NoSuchMessage));
        assert_eq!(m.get(4), Err(Lookup::NoSuchMessage));
        m.mark_deleted(2).unwrap();
        assert_eq!(m.mark_deleted(2), Err(Lookup::Deleted));
        assert_eq!(m.get(2), Err(Lookup::Deleted));
        assert_eq!(m.stat(), (2, 400));
        assert_eq!(m.visible().map(|(n, _)| n).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(m.marked(), vec![StoreId("id2".into())]);
        m.unmark_all();
        assert_eq!(m.stat(), (3, 600));
        assert!(m.marked().is_empty());
    }
}
