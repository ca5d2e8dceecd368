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
//! - Only topics outside the gateway's own namespace (`edgegate/`) are counted, on both sides;
//!   the gateway's own publishes (alerts, status) never enter the guard.
//! - Counts may drift (a publish rumqttd refuses, a skipped reading, a topic alias): whenever
//!   ingest has been idle for [`SETTLE_AFTER`], nothing can be in the log for it, and the
//!   counts are made equal again. A stall therefore lasts at most about that long.
//! - Waiting is never unbounded: the guard re-checks every [`RECHECK`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Ingest idle this long: whatever was relayed has been taken.
pub const SETTLE_AFTER: Duration = Duration::from_millis(200);
/// A waiting guard connection re-checks at least this often.
const RECHECK: Duration = Duration::from_millis(50);

pub struct Pressure {
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

    /// Ingest took a publish of `bytes` (topic and payload).
    pub fn consumed(&self, bytes: usize) {
        self.consumed.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.waiting.load(Ordering::Relaxed) > 0 && self.backlog() <= self.limit / 2 {
            self.notify.notify_waiters();
        }
    }

    /// Ingest has been idle: nothing is waiting for it in the router.
    pub fn settle(&self) {
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
}
