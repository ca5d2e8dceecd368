//! Backpressure from ingest to the sensors, across rumqttd.
//!
//! rumqttd PUBACKs a publish as soon as its router has logged it, and never slows a publisher
//! down: when the ingest link falls behind by more than the router's in-memory log
//! (`broker.segment_size × segment_count`), the router moves the link ahead and those readings
//! are lost (counted as `broker_skipped`). The guard relays faster than the queue can commit at
//! full load, so this is not hypothetical: 400k of 1.5M readings were skipped in a 10 s burst
//! before this existed.
//!
//! So the guard counts the bytes of every sensor publish it relays, ingest counts the bytes of
//! every publish it takes from its link, and while the difference (what sits in the router's
//! log for us) is above half the log, the guard stops reading from sensor sockets: TCP pushes
//! back on the sensors, as a broker without a queue in front of it would.
//!
//! Invariants:
//! - Every byte a sensor publish puts into the ingest link's log is counted, whatever its topic:
//!   the guard counts each publish whose topic the ingest filter `#` matches (every topic but
//!   `$` ones, which rumqttd's `#` does not match), with the topic an MQTT 5 alias stands for;
//!   ingest counts every publish it takes that the guard relayed. A flood under `edgegate/` or
//!   of retained messages therefore holds sensors back like any other (issue 12.2: uncounted,
//!   60 KB QoS 0 messages under `edgegate/` made rumqttd skip 26,067 PUBACKed readings). A
//!   will, which rumqttd publishes itself when a connection ends without DISCONNECT, is counted
//!   by the guard when it closes that connection, which it does only once ingest is not behind.
//! - The gateway's own output (alerts, status: published by in-process links under
//!   `edgegate/`) also lands in that log, but is counted on neither side. To tell a sensor's
//!   publish under `edgegate/` (allowed by an ACL) from the gateway's own, the guard notes each
//!   such topic it relays ([`Pressure::relayed_reserved`]) and ingest takes the note back
//!   ([`Pressure::take_reserved`]): what was noted is a sensor's, the rest is the gateway's.
//! - Both sides count a publish as rumqttd's log does: 4 + topic + payload ([`log_bytes`]).
//! - Counts may drift (a publish rumqttd refuses, a skipped reading): whenever ingest has
//!   taken and handed on nothing for [`SETTLE_AFTER`] (time spent waiting for the rules stage
//!   is not idle), nothing can be in the log for it, and the counts are made equal again. A
//!   stall therefore lasts at most about that long.
//! - Waiting is never unbounded: the guard re-checks every [`RECHECK`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

/// Ingest idle this long: whatever was relayed has been taken.
pub const SETTLE_AFTER: Duration = Duration::from_millis(200);
/// A waiting guard connection re-checks at least this often.
const RECHECK: Duration = Duration::from_millis(50);

/// Bytes a publish takes in rumqttd's log: its `Storage::size` for a publish is 4 + topic +
/// payload (router/logs.rs). The 4 matter for floods of tiny messages (a 1-byte topic and an
/// empty payload take 5 bytes there, not 1).
pub fn log_bytes(topic_len: usize, payload_len: usize) -> usize {
    4 + topic_len + payload_len
}

/// Hash of a topic, the same for the guard and ingest within one process (random keys).
pub fn topic_hash(topic: &[u8]) -> u64 {
    static HASHER: OnceLock<ahash::RandomState> = OnceLock::new();
    HASHER.get_or_init(ahash::RandomState::new).hash_one(topic)
}

pub struct Pressure {
    /// Sensor publishes under `edgegate/` relayed and not yet seen by ingest, by topic hash:
    /// the notes since the last settle, and those of the settle before.
    reserved: Mutex<[HashMap<u64, u32>; 2]>,
    relayed: AtomicU64,
    consumed: AtomicU64,
    /// Bytes in the router's log for the ingest link above which sensors are paused.
    limit: u64,
    waiting: AtomicUsize,
    notify: Notify,
}

impl Pressure {
    pub fn new(limit: u64) -> Pressure {
        Pressure {
            reserved: Mutex::new([HashMap::new(), HashMap::new()]),
            relayed: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            limit: limit.max(1),
            waiting: AtomicUsize::new(0),
            notify: Notify::new(),
        }
    }

    /// Bytes relayed to the router and not yet taken by ingest (as far as the counts know).
    pub fn backlog(&self) -> u64 {
        self.relayed
            .load(Ordering::Relaxed)
            .saturating_sub(self.consumed.load(Ordering::Relaxed))
    }

    pub fn over(&self) -> bool {
        self.backlog() > self.limit
    }

    /// The guard relayed a publish of `bytes` (topic and payload).
    pub fn relayed(&self, bytes: usize) {
        self.relayed.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The guard relayed a sensor's publish under the gateway's own namespace (module docs).
    pub fn relayed_reserved(&self, topic_hash: u64) {
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        *r[0].entry(topic_hash).or_default() += 1;
    }

    /// Ingest took a publish on `topic` under the gateway's own namespace: was it a sensor's
    /// (noted by the guard; the note is used up) rather than the gateway's own output?
    pub fn take_reserved(&self, topic: &[u8]) -> bool {
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let h = topic_hash(topic);
        r.iter_mut().any(|notes| match notes.get_mut(&h) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                notes.remove(&h);
                true
            }
            None => false,
        })
    }

    /// Ingest took a publish of `bytes` (topic and payload).
    pub fn consumed(&self, bytes: usize) {
        self.consumed.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) > 0 && self.backlog() <= self.limit / 2 {
            self.notify.notify_waiters();
        }
    }

    /// Ingest has been idle: nothing is waiting for it in the router.
    pub fn settle(&self) {
        // A noted publish rumqttd refused never arrives: forget the notes too, but only those
        // of the settle before. One the guard made just before this settle, for a frame it had
        // not yet written, may still arrive: forgotten now, that sensor's publish would be
        // taken for the gateway's own output and pass uncounted.
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        r[1] = std::mem::take(&mut r[0]);
        drop(r);
        self.consumed
            .store(self.relayed.load(Ordering::Relaxed), Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Wait until the backlog is at most half the limit (returns at once when not over it).
    pub async fn wait(&self) {
        if !self.over() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        while self.backlog() > self.limit / 2 {
            let _ = tokio::time::timeout(RECHECK, self.notify.notified()).await;
        }
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_until_ingest_catches_up_or_settles() {
        let p = std::sync::Arc::new(Pressure::new(1000));
        p.relayed(800);
        assert!(!p.over());
        p.wait().await; // not over: returns at once
        p.relayed(800);
        assert!(p.over());
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "over the limit: the guard waits");
        p.consumed(700); // backlog 900: still above half
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!waiter.is_finished());
        p.consumed(500); // backlog 400
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .unwrap();
        // Drift (bytes ingest never saw) is undone by settling.
        p.relayed(5000);
        assert!(p.over());
        p.settle();
        assert_eq!(p.backlog(), 0);
    }

    #[test]
    fn notes_tell_a_sensors_reserved_publish_from_the_gateways_own() {
        let p = Pressure::new(1000);
        p.relayed_reserved(topic_hash(b"edgegate/x"));
        p.relayed_reserved(topic_hash(b"edgegate/x"));
        assert!(!p.take_reserved(b"edgegate/status"));
        assert!(p.take_reserved(b"edgegate/x"));
        assert!(p.take_reserved(b"edgegate/x"));
        assert!(!p.take_reserved(b"edgegate/x"), "each note is used once");
        p.relayed_reserved(topic_hash(b"edgegate/y"));
        p.settle();
        assert!(p.take_reserved(b"edgegate/y"), "a note survives one settle");
        p.relayed_reserved(topic_hash(b"edgegate/y"));
        p.settle();
        p.settle();
        assert!(!p.take_reserved(b"edgegate/y"), "two settles forget a note");
    }
}
