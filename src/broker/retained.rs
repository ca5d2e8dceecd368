//! The guard's account of the retained messages rumqttd stores, so that they stay bounded.
//!
//! rumqttd 0.20 keeps every retained message in memory until a publish with an empty payload
//! on its topic clears it (any such publish, retained or not), and has no limit: one client
//! storing 10,000 retained 100 KB messages took the gateway from 8 MB to 1.84 GB RSS (issue
//! 12.4). The guard sees every PUBLISH with its retain flag before rumqttd does, so it keeps
//! the same map in miniature (topic hash -> owner and size) and lets a retained publish through
//! only while the totals stay within `broker.max_retained_messages`/`max_retained_bytes` and the
//! publishing client's within `max_retained_per_client`/`max_retained_bytes_per_client`.
//!
//! Over a bound the publish is still relayed, with its retain flag cleared: the reading is kept
//! (ingest takes it, the sensor gets its PUBACK, local subscribers get it live), only not stored
//! for later subscribers. Refusing it would close the connection (3.1.1 has no negative PUBACK)
//! and a sensor that retains every reading would lose them all, reconnecting in a loop.
//!
//! Invariants:
//! - The book never holds more than the bounds; an entry is charged to the client that stored
//!   it last; replacing a topic's message first releases the old charge (if the new one does
//!   not fit, the old entry stays, as it does in rumqttd: a publish without retain leaves the
//!   stored message alone).
//! - The book may over-count rumqttd (a will reserved at CONNECT that never fired when the
//!   connection died before a clean DISCONNECT...), never under-count it: anything the book
//!   does not know about was never stored.

use std::collections::HashMap;

/// Hash of a topic (or a client id), the same everywhere within one process (random keys).
pub fn topic_hash(topic: &[u8]) -> u64 {
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(ahash::RandomState::new).hash_one(topic)
}

/// Bounds on retained messages (0 in a count or size: none may be stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    pub messages: usize,
    pub bytes: usize,
    pub per_client: usize,
    pub bytes_per_client: usize,
}

#[derive(Debug, Default)]
pub struct RetainedBook {
    /// Topic hash -> (owner hash, bytes).
    topics: HashMap<u64, (u64, usize)>,
    /// Owner hash -> (messages, bytes).
    owners: HashMap<u64, (usize, usize)>,
    messages: usize,
    bytes: usize,
}

/// The bound a retained message would break (its key and value, as the log shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    #[error("broker.max_retained_messages {0}")]
    Messages(usize),
    #[error("broker.max_retained_bytes {0}")]
    Bytes(usize),
    #[error("broker.max_retained_per_client {0}")]
    PerClient(usize),
    #[error("broker.max_retained_bytes_per_client {0}")]
    BytesPerClient(usize),
}

impl RetainedBook {
    fn release(&mut self, topic: u64) -> Option<(u64, usize)> {
        let (owner, bytes) = self.topics.remove(&topic)?;
        self.messages -= 1;
        self.bytes -= bytes;
        if let Some(o) = self.owners.get_mut(&owner) {
            o.0 -= 1;
            o.1 -= bytes;
            if o.0 == 0 {
                self.owners.remove(&owner);
            }
        }
        Some((owner, bytes))
    }

    fn charge(&mut self, topic: u64, owner: u64, bytes: usize) {
        self.topics.insert(topic, (owner, bytes));
        self.messages += 1;
        self.bytes += bytes;
        let o = self.owners.entry(owner).or_default();
        o.0 += 1;
        o.1 += bytes;
    }

    /// `owner` wants `bytes` stored as the retained message of `topic`. `Err(bound)` when that
    /// would break a bound (the book is then unchanged).
    pub fn store(
        &mut self,
        limits: &RetainedLimits,
        topic: u64,
        owner: u64,
        bytes: usize,
    ) -> Result<(), OverLimit> {
        let old = self.release(topic);
        let (own_n, own_b) = self.owners.get(&owner).copied().unwrap_or_default();
        let over = if self.messages + 1 > limits.messages {
            Some(OverLimit::Messages(limits.messages))
        } else if self.bytes + bytes > limits.bytes {
            Some(OverLimit::Bytes(limits.bytes))
        } else if own_n + 1 > limits.per_client {
            Some(OverLimit::PerClient(limits.per_client))
        } else if own_b + bytes > limits.bytes_per_client {
            Some(OverLimit::BytesPerClient(limits.bytes_per_client))
        } else {
            None
        };
        match over {
            None => {
                self.charge(topic, owner, bytes);
                Ok(())
            }
            Some(why) => {
                if let Some((o, b)) = old {
                    self.charge(topic, o, b);
                }
                Err(why)
            }
        }
    }

    /// A publish with an empty payload on `topic`: rumqttd drops its retained message.
    pub fn clear(&mut self, topic: u64) {
        self.release(topic);
    }

    /// Drop the entry of `topic` if `owner` holds it with `bytes` (a will that did not fire).
    pub fn release_if(&mut self, topic: u64, owner: u64, bytes: usize) {
        if self.topics.get(&topic) == Some(&(owner, bytes)) {
            self.release(topic);
        }
    }

    /// (messages, bytes) held.
    pub fn totals(&self) -> (usize, usize) {
        (self.messages, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: RetainedLimits = RetainedLimits {
        messages: 4,
        bytes: 1000,
        per_client: 3,
        bytes_per_client: 600,
    };

    #[test]
    fn bounds_per_client_and_in_total() {
        let mut b = RetainedBook::default();
        for t in 0..3 {
            b.store(&L, t, 1, 100).unwrap();
        }
        assert!(b
            .store(&L, 3, 1, 100)
            .unwrap_err()
            .to_string()
            .contains("per_client"));
        // Replacing one of its own topics is fine, and frees the old size.
        b.store(&L, 2, 1, 300).unwrap();
        assert_eq!(b.totals(), (3, 500));
        assert!(b
            .store(&L, 1, 1, 500)
            .unwrap_err()
            .to_string()
            .contains("bytes_per_client"));
        assert_eq!(
            b.totals(),
            (3, 500),
            "a refused replacement keeps the old entry"
        );
        b.store(&L, 10, 2, 400).unwrap();
        assert!(b
            .store(&L, 11, 2, 10)
            .unwrap_err()
            .to_string()
            .contains("max_retained_messages"));
        b.clear(0);
        assert!(b
            .store(&L, 11, 2, 201)
            .unwrap_err()
            .to_string()
            .contains("max_retained_bytes"));
        b.store(&L, 11, 2, 100).unwrap();
        assert_eq!(b.totals(), (4, 900));
        // Another client taking over a topic takes over its charge.
        b.clear(10);
        b.store(&L, 1, 2, 100).unwrap();
        assert_eq!(b.owners.get(&1), Some(&(1, 300)));
        b.release_if(1, 1, 100);
        assert_eq!(b.totals(), (3, 500), "not the owner: kept");
        b.release_if(1, 2, 100);
        assert_eq!(b.totals(), (2, 400));
    }
}
