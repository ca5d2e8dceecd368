//! Events held back: queued, but not offered upstream again before a due time.
//!
//! The upstream refused them in a way that may pass (an MQTT 5 PUBACK with a transient failure
//! reason, a refused batch, connections dying on them): they stay in the queue and are offered
//! again once due, on the same connection or a later one.
//!
//! Invariants:
//! - A position is held at most once (holding it again moves its due time).
//! - `order` lists hold times in the order they were set, so its front is the next due one;
//!   entries whose position was released or held again are stale and skipped.
//! - The forwarder reads no new events while [`MAX_HELD_BACK`] positions are held (an upstream
//!   that refuses everything then paces it), so the map stays bounded by that plus one window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Held-back positions beyond which the forwarder reads nothing new until some are due.
pub const MAX_HELD_BACK: usize = 10_000;

#[derive(Debug)]
pub struct HeldBack {
    retry: Duration,
    until: HashMap<u64, Instant>,
    order: VecDeque<(Instant, u64)>,
}

impl HeldBack {
    pub fn new(retry: Duration) -> HeldBack {
        HeldBack {
            retry,
            until: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Hold `pos` back until `retry` after `now`.
    pub fn hold(&mut self, pos: u64, now: Instant) {
        let t = now + self.retry;
        self.until.insert(pos, t);
        self.order.push_back((t, pos));
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Is `pos` held and not due yet?
    pub fn holds(&self, pos: u64, now: Instant) -> bool {
        self.until.get(&pos).is_some_and(|t| *t > now)
    }

    /// Forget `pos` (offered again, or gone from the queue).
    pub fn release(&mut self, pos: u64) {
        self.until.remove(&pos);
    }

    fn prune(&mut self) {
        while let Some((t, p)) = self.order.front() {
            if self.until.get(p) == Some(t) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// When the next held position is due.
    pub fn next_due(&mut self) -> Option<Instant> {
        self.prune();
        self.order.front().map(|(t, _)| *t)
    }

    /// Is any held position due at `now`?
    pub fn any_due(&mut self, now: Instant) -> bool {
        self.next_due().is_some_and(|t| t <= now)
    }

    /// The held positions due at `now`, ascending (they stay held until released).
    pub fn due(&mut self, now: Instant) -> Vec<u64> {
        self.prune();
        let mut out: Vec<u64> = self
            .order
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter(|(t, p)| self.until.get(p) == Some(t))
            .map(|(_, p)| *p)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Forget every position due at `now` (a new connection reads the queue from its head and
    /// meets them there, if they are still queued).
    pub fn release_due(&mut self, now: Instant) {
        self.until.retain(|_, t| *t > now);
        self.prune();
    }

    /// Entries in the due-order list, stale ones included (for tests of its bound).
    #[cfg(test)]
    pub fn order_len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_in_hold_order_and_released_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = HeldBack::new(Duration::from_secs(60));
        h.hold(7, t0);
        h.hold(3, t0 + s);
        assert!(h.holds(7, t0 + s) && h.holds(3, t0 + s));
        assert_eq!(h.next_due(), Some(t0 + Duration::from_secs(60)));
        assert!(!h.any_due(t0 + Duration::from_secs(59)));
        assert_eq!(h.due(t0 + Duration::from_secs(60)), vec![7]);
        assert!(!h.holds(7, t0 + Duration::from_secs(60)));
        assert_eq!(h.due(t0 + Duration::from_secs(61)), vec![3, 7]);
        h.release(7);
        assert_eq!(h.next_due(), Some(t0 + Duration::from_secs(61)));
        // Held again: the later due time counts, the earlier entry is stale.
        h.hold(3, t0 + Duration::from_secs(61));
        assert_eq!(h.due(t0 + Duration::from_secs(100)), Vec::<u64>::new());
        assert_eq!(h.next_due(), Some(t0 + Duration::from_secs(121)));
        assert_eq!(h.order_len(), 1, "stale entries are pruned from the front");
        h.release_due(t0 + Duration::from_secs(121));
        assert_eq!((h.len(), h.next_due()), (0, None));
    }
}
