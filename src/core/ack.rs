//! Acknowledgement tickets: how the end of the pipeline tells a sensor's connection that a
//! reading is safe, so that the sensor's PUBACK means "committed to the queue".
//!
//! ```text
//! guard (per connection) ──(Reading, Ticket n)──> rules ──Append(Event, Ticket)──> queue writer
//!      ^                                                     └─ or Settle(Ticket)      │ commit
//!      └──────────────── Acks::settled() >= n: PUBACK (PUBREC) for every reading up to n ┘
//! ```
//!
//! Invariants:
//! - A connection numbers the readings it hands on 1, 2, 3... ([`Acks::ticket`]); they travel
//!   one channel after another, each first in, first out, so they are settled in that order.
//!   Settling ticket n therefore also stands for every earlier one of the connection, and the
//!   connection keeps a single number ([`Acks::settled`]), never a set.
//! - A ticket is settled only once nothing that must precede its PUBACK is left: the events the
//!   reading became are committed (or were dropped, counted), or the rules decided it goes
//!   nowhere upstream. A ticket that is dropped unsettled (the process stops) leaves the sensor
//!   without a PUBACK: it sends the reading again after it reconnects (at least once).
//! - Settling costs an atomic maximum and a wake-up of the connection; the writer settles
//!   once per commit group, never once per reading.
//!
//! Layer: core (imports only `core::event`): the broker's hand-off issues tickets, the rules
//! stage and the queue writer settle them, none of them imports another for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::core::event::Reading;

/// A reading on its way through the pipeline, with the ticket its PUBACK waits for (`None`:
/// nobody waits, as for QoS 0 or a will).
pub type Inbound = (Reading, Option<Ticket>);

/// One connection's acknowledgement state, shared by its relay and the pipeline.
#[derive(Default)]
pub struct Acks {
    /// Highest ticket number settled.
    settled: AtomicU64,
    /// Highest ticket number handed out (written by the connection only).
    issued: AtomicU64,
    settled_changed: Notify,
}

/// The right to have reading `n` of a connection acknowledged, once settled.
#[derive(Clone)]
pub struct Ticket {
    acks: Arc<Acks>,
    n: u64,
    /// The sender waits for this acknowledgement before it sends more (it published right
    /// after its previous PUBACK, with nothing else outstanding): the queue should not hold
    /// the commit for more readings that cannot come.
    pub eager: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.n)
    }
}

impl Acks {
    pub fn new() -> Arc<Acks> {
        Arc::new(Acks::default())
    }

    /// The next ticket of this connection (called by the connection only, in order).
    pub fn ticket(self: &Arc<Acks>) -> Ticket {
        self.ticket_eager(false)
    }

    /// The next ticket, for a sender that waits for it (see [`Ticket::eager`]).
    pub fn ticket_eager(self: &Arc<Acks>, eager: bool) -> Ticket {
        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        Ticket {
            acks: self.clone(),
            n,
            eager,
        }
    }

    /// Take back the last ticket handed out, which went nowhere (dropped before it reached the
    /// pipeline; called by the connection only, before it issues another).
    pub fn unissue(&self) {
        let _ = self
            .issued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The number of the last ticket handed out (0: none yet).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Every ticket up to this number is settled.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }

    /// Resolves after a ticket was settled since the last call (or one is settled already and
    /// nobody waited yet).
    pub async fn changed(&self) {
        self.settled_changed.notified().await
    }

    /// Wake the connection as if a ticket was settled (it found one already settled).
    pub fn poke(&self) {
        self.settled_changed.notify_one();
    }
}

impl Ticket {
    /// Everything this ticket waited for is done: the reading may be acknowledged.
    pub fn settle(self) {
        let before = self.acks.settled.fetch_max(self.n, Ordering::AcqRel);
        if before < self.n {
            self.acks.settled_changed.notify_one();
        }
    }

    /// The connection it belongs to (an identity, for counting; never dereferenced).
    pub fn connection(&self) -> usize {
        Arc::as_ptr(&self.acks) as usize
    }

    /// Its number, for tests and logs.
    pub fn number(&self) -> u64 {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settling_a_later_ticket_covers_the_earlier_ones_and_wakes_once() {
        let acks = Acks::new();
        let (t1, t2, t3) = (acks.ticket(), acks.ticket(), acks.ticket());
        assert_eq!((t1.number(), t2.number(), t3.number()), (1, 2, 3));
        assert_eq!(acks.issued(), 3);
        assert_eq!(acks.settled(), 0);
        t2.settle();
        assert_eq!(acks.settled(), 2);
        // A late settle of an earlier ticket does not move the mark back.
        t1.settle();
        assert_eq!(acks.settled(), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), acks.changed())
            .await
            .expect("woken by the settle");
        t3.settle();
        assert_eq!(acks.settled(), 3);
        tokio::time::timeout(std::time::Duration::from_secs(1), acks.changed())
            .await
            .expect("woken again");
    }
}
