//! Memory budgets: a byte count shared by many holders, so that what a client can make the
//! gateway hold in memory has a bound set in the configuration, whatever the client sends.
//!
//! Two budgets use it (see ARCHITECTURE.md, "Memory bound"):
//! - `pipeline.max_bytes`: payloads from the broker's hand-off until their events are
//!   committed (or dropped). A payload carries its [`Charge`] inside its own buffer
//!   ([`Budget::charged_copy`]), so the charge is given back exactly when the last copy of the
//!   bytes is freed, on every path (committed, filtered, dropped, failed), with no bookkeeping
//!   in the stages between.
//! - `broker.max_buffered_bytes`: the bodies of large packets the guard is still reading from
//!   clients (a client that sends most of a 256 KiB publish and then waits holds its buffer).
//!
//! Invariants:
//! - `used` never exceeds `max`, except by one charge that is larger than the whole budget and
//!   was taken when nothing else was held (so a single oversized item can always pass).
//! - A charge is given back once, when it is dropped; every waiter is woken then and tries again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

/// A byte budget; share it with `Arc`.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: AtomicUsize,
    freed: Notify,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    n: usize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Take `n` bytes if they fit now. A request larger than the whole budget fits only when
    /// nothing else is held.
    pub fn try_take(self: &Arc<Self>, n: usize) -> Option<Charge> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let fits = used.saturating_add(n) <= self.max || used == 0;
            if !fits {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Charge {
                        budget: self.clone(),
                        n,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Take `n` bytes, waiting until they fit.
    pub async fn take(self: &Arc<Self>, n: usize) -> Charge {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a charge given back in between still wakes us.
            freed.as_mut().enable();
            if let Some(c) = self.try_take(n) {
                return c;
            }
            freed.await;
        }
    }

    /// A copy of `data` whose charge is given back when the last clone of the returned bytes
    /// (or of any slice of them) is dropped.
    pub fn charged_copy(data: &[u8], charge: Charge) -> Bytes {
        Bytes::from_owner(Charged {
            data: data.into(),
            _charge: charge,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
        self.budget.freed.notify_waiters();
    }
}

/// Bytes that hold their charge.
struct Charged {
    data: Box<[u8]>,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn charges_are_bounded_and_given_back_with_the_last_copy() {
        let b = Budget::new(100);
        let c1 = b.try_take(60).expect("fits");
        assert!(b.try_take(50).is_none(), "60 + 50 > 100");
        let bytes = Budget::charged_copy(&[7u8; 60], c1);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(b.used(), 60, "a slice still holds the buffer");
        drop(slice);
        assert_eq!(b.used(), 0);
        assert!(b.try_take(100).is_some());
    }

    #[test]
    fn an_item_larger_than_the_budget_passes_alone() {
        let b = Budget::new(100);
        let big = b.try_take(500).expect("nothing held: passes");
        assert!(b.try_take(1).is_none());
        drop(big);
        let small = b.try_take(1).expect("fits");
        assert!(b.try_take(500).is_none(), "something is held");
        drop(small);
    }

    #[tokio::test]
    async fn a_waiter_gets_its_bytes_when_others_give_theirs_back() {
        let b = Budget::new(100);
        let held = b.try_take(80).expect("fits");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.take(50).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "80 + 50 > 100: waits");
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(b.used(), 50);
        drop(got);
        assert_eq!(b.used(), 0);
    }
}
