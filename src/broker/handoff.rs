//! The hand-off: a sensor's publish goes from its connection straight into the pipeline as a
//! [`Reading`], and its PUBACK (QoS 1) or PUBREC (QoS 2) waits until the reading is committed
//! to the queue, or the rules decided it goes nowhere upstream (see [`crate::core::ack`]).
//!
//! rumqttd still gets every publish, as QoS 0, for local subscribers, retained messages and
//! wills; it never acknowledges a sensor's reading, and readings never wait in its in-memory
//! log (where a reader that falls behind is skipped).
//!
//! Invariants:
//! - A PUBACK is sent for a reading only when every reading the connection handed on before
//!   it is settled too: acknowledgements leave in the order the publishes arrived (MQTT
//!   3.1.1 §4.6, 5 §4.6), whatever was dropped or refused between them.
//! - What one connection owes is bounded ([`OWED_MAX`]): past it, the guard stops reading
//!   from that sensor until acknowledgements went out (its own backpressure).
//! - QoS 2: a publish is handed on once per packet id until the client's PUBREL, which the
//!   guard answers itself; a retransmission in between is not a new reading.
//! - A `traceparent` user property goes into the event only in W3C form
//!   ([`valid_traceparent`]); anything else is left out and counted
//!   (`edgegate_traceparent_invalid_total`), the reading kept.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;

use crate::core::ack::{Acks, Inbound};
use crate::core::budget::Budget;
use crate::core::decode::Payload;
use crate::core::event::Reading;
use crate::core::metrics::{DropReason, Metrics};
use crate::core::outlet::{offer, Offered, WhenFull};
use crate::core::reserved::OWN_PREFIX;

/// Acknowledgements one connection may owe before the guard stops reading from it. A client
/// that keeps publishing without reading its socket holds this many at most (16 bytes each).
pub const OWED_MAX: usize = 4096;

/// Where readings go: the rules stage's channel, within the pipeline's memory budget.
#[derive(Clone)]
pub struct Handoff {
    pub tx: flume::Sender<Inbound>,
    pub when_full: WhenFull,
    /// `pipeline.max_bytes`: each reading's payload holds its share until its last copy is
    /// freed (committed, filtered or dropped).
    pub budget: Arc<Budget>,
}

/// What became of a publish offered to the pipeline.
pub enum Handed {
    /// In the pipeline: its acknowledgement waits for its ticket.
    Ticketed,
    /// Not a reading, or dropped (counted): acknowledged behind the earlier ones.
    Behind,
    /// The rules stage is gone (shutting down): no acknowledgement.
    Closed,
}

/// W3C trace context (version 00 form, which later versions extend): `vv-{32 hex}-{16 hex}-ff`,
/// lowercase hex, trace id and parent id not all zeros, version not `ff`. Anything else would
/// be copied into every event of the reading unchecked.
pub fn valid_traceparent(tp: &str) -> bool {
    fn hex(s: &str, n: usize) -> bool {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let mut parts = tp.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    // Version 00 has exactly four fields; a later version may append more.
    let rest_ok = version != "00" || parts.next().is_none();
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && rest_ok
}

/// A publish as the pipeline gets it.
pub struct Publish<'a> {
    pub topic: &'a [u8],
    pub payload: &'a [u8],
    pub traceparent: Option<&'a [u8]>,
}

impl Handoff {
    /// Offer a publish: a reading with a ticket of `acks` (`None`: nobody waits for it). Waits
    /// while the rules stage is busy under `pipeline.when_full = "block"`.
    pub async fn offer(&self, p: Publish<'_>, acks: Option<&Owed>, metrics: &Metrics) -> Handed {
        if p.topic.first() == Some(&b'$') {
            // Broker topics (an ACL let it through) are not readings.
            return Handed::Behind;
        }
        let topic = String::from_utf8_lossy(p.topic).into_owned();
        if topic.starts_with(OWN_PREFIX) {
            metrics.drop_events(
                DropReason::ReservedTopic,
                1,
                &format_args!("a sensor published to {topic:?}, in the gateway's own namespace (allowed by broker.acl): not a reading"),
            );
            return Handed::Behind;
        }
        metrics.readings_received.inc();
        let size = p.payload.len() + topic.len();
        let charge = match self.budget.try_take(size) {
            Some(c) => c,
            None if self.when_full == WhenFull::Block => self.budget.take(size).await,
            None => {
                metrics.drop_events(
                    DropReason::ChannelFull,
                    1,
                    &format_args!(
                        "pipeline.max_bytes ({} bytes) held by readings not yet committed; dropped reading on {topic}",
                        self.budget.max()
                    ),
                );
                return Handed::Behind;
            }
        };
        let traceparent = match p.traceparent.map(String::from_utf8_lossy) {
            Some(tp) if !valid_traceparent(&tp) => {
                metrics.traceparent_invalid.inc();
                tracing::debug!(%topic, traceparent = %tp.escape_debug(), "traceparent is not W3C trace context: left out");
                None
            }
            tp => tp.map(|t| t.into_owned()),
        };
        let reading = Reading {
            topic,
            received: SystemTime::now(),
            payload: Payload::decode(Budget::charged_copy(p.payload, charge)),
            traceparent,
        };
        let ticket = acks.map(|o| o.acks.ticket_eager(o.waited_for()));
        let ticketed = ticket.is_some();
        let offered = offer(
            &self.tx,
            self.when_full,
            (reading, ticket),
            metrics,
            "rules stage",
            |(r, _)| &r.topic,
        );
        match offered.await {
            Offered::Sent if ticketed => Handed::Ticketed,
            Offered::Sent => Handed::Behind,
            Offered::Dropped((_, t)) => {
                // Its number goes back (nothing else issues on this connection): the
                // publish is acknowledged behind the earlier ones, like one not handed on.
                if let (Some(_), Some(o)) = (t, acks) {
                    o.acks.unissue();
                }
                Handed::Behind
            }
            Offered::Closed(_) => Handed::Closed,
        }
    }
}

/// An acknowledgement a connection owes its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owe {
    /// Sent once this ticket number is settled.
    after: u64,
    pkid: u16,
    /// PUBREC (QoS 2) rather than PUBACK.
    rec: bool,
}

/// One connection's acknowledgements to its client, in the order its publishes arrived.
pub struct Owed {
    pub acks: Arc<Acks>,
    queue: Mutex<VecDeque<Owe>>,
    /// The relay towards the client sent some: room for more.
    pub room: tokio::sync::Notify,
    /// QoS 2 packet ids handed on and not yet released by the client's PUBREL.
    qos2: Mutex<HashSet<u16>>,
    /// When acknowledgements were last sent.
    last_sent: Mutex<Option<Instant>>,
}

/// A publish that comes this soon after the connection's last acknowledgements, with nothing
/// else owed, is from a sender that waits for each one (see [`crate::core::ack::Ticket::eager`]): a
/// client on the same host or a wired LAN answers within a fraction of a millisecond. Longer
/// and a sensor paced at a few milliseconds passes for one that waits (measured: 20 ms made
/// the bench's four 250/s publishers commit every 2.5 ms, 1,152 instead of ~680 bytes written
/// per event); a client further away than this gets the full `queue.commit_delay`.
const WAITED_FOR: Duration = Duration::from_millis(1);

impl Default for Owed {
    fn default() -> Self {
        Owed {
            acks: Acks::new(),
            queue: Mutex::new(VecDeque::new()),
            room: tokio::sync::Notify::new(),
            qos2: Mutex::new(HashSet::new()),
            last_sent: Mutex::new(None),
        }
    }
}

impl Owed {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Owe>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Owe an acknowledgement for `pkid`, due once `after` is settled (the connection's
    /// last ticket for one handed on; the last one before it for one that was not).
    pub fn owe(&self, pkid: u16, rec: bool, after: u64) {
        self.queue().push_back(Owe { after, pkid, rec });
        if after <= self.acks.settled() {
            self.acks.poke();
        }
    }

    /// How many acknowledgements are owed.
    pub fn len(&self) -> usize {
        self.queue().len()
    }

    /// Nothing owed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The acknowledgements now due, encoded, in order (empty: none).
    pub fn due(&self) -> BytesMut {
        let settled = self.acks.settled();
        let mut out = BytesMut::new();
        let mut q = self.queue();
        while let Some(o) = q.front().filter(|o| o.after <= settled).copied() {
            q.pop_front();
            let [hi, lo] = o.pkid.to_be_bytes();
            out.extend_from_slice(&[if o.rec { 0x50 } else { 0x40 }, 2, hi, lo]);
        }
        drop(q);
        if !out.is_empty() {
            *self.last_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.room.notify_one();
        }
        out
    }

    /// Does the client seem to wait for each acknowledgement before it publishes again? (It
    /// owes nothing else and got its last ones moments ago.)
    pub fn waited_for(&self) -> bool {
        self.waited_for_within(WAITED_FOR)
    }

    fn waited_for_within(&self, within: Duration) -> bool {
        self.is_empty()
            && self
                .last_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < within)
    }

    /// A QoS 2 publish with `pkid`: true when it is new (to be handed on), false for a
    /// retransmission of one not yet released.
    pub fn qos2_new(&self, pkid: u16) -> bool {
        self.qos2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pkid)
    }

    /// The client's PUBREL for `pkid`: true when it was one of ours (the guard answers it).
    pub fn qos2_release(&self, pkid: u16) -> bool {
        self.qos2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1z",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }

    /// Issue 12, memory: four clients flooding 256 KB QoS 0 publishes with the upstream down
    /// took the gateway to 2.8 GB (channels of 4,096 readings each, whatever their size). The
    /// readings the pipeline holds are bounded in bytes: past `pipeline.max_bytes` a new one
    /// waits (block) or is dropped and counted (drop_newest), and the bytes come back when the
    /// last copy of a payload is freed, wherever that happens.
    #[tokio::test]
    async fn readings_in_the_pipeline_are_bounded_in_bytes() {
        let metrics = Metrics::new();
        let payload = vec![b'z'; 100_000];
        let p = || Publish {
            topic: b"sensors/big/t",
            payload: &payload,
            traceparent: None,
        };
        for when_full in [WhenFull::DropNewest, WhenFull::Block] {
            let (tx, rx) = flume::bounded(4096);
            let h = Handoff {
                tx,
                when_full,
                budget: Budget::new(350_000),
            };
            for _ in 0..3 {
                assert!(matches!(h.offer(p(), None, &metrics).await, Handed::Behind));
            }
            assert_eq!(rx.len(), 3);
            assert!(h.budget.used() > 300_000);
            if when_full == WhenFull::DropNewest {
                h.offer(p(), None, &metrics).await;
                assert_eq!(rx.len(), 3, "the fourth does not fit: dropped");
                assert_eq!(metrics.dropped(DropReason::ChannelFull), 1);
            } else {
                let blocked =
                    tokio::time::timeout(Duration::from_millis(100), h.offer(p(), None, &metrics))
                        .await;
                assert!(blocked.is_err(), "the fourth waits");
            }
            // An event made of the first reading holds its bytes until it is dropped too.
            let (first, _) = rx.recv().expect("reading");
            let copy = first.payload.clone();
            drop(first);
            let before = h.budget.used();
            drop(copy);
            assert!(h.budget.used() < before, "freed with the last copy");
            assert!(matches!(h.offer(p(), None, &metrics).await, Handed::Behind));
        }
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order_only_when_everything_before_is_settled() {
        let owed = Owed::default();
        let t1 = owed.acks.ticket();
        owed.owe(10, false, t1.number());
        // Not a reading (a refused topic, a drop): behind ticket 1, no ticket of its own.
        owed.owe(11, false, owed.acks.issued());
        let t2 = owed.acks.ticket();
        owed.owe(12, true, t2.number());
        assert!(owed.due().is_empty(), "nothing settled yet");
        t1.settle();
        assert_eq!(&owed.due()[..], &[0x40, 2, 0, 10, 0x40, 2, 0, 11]);
        assert_eq!(owed.len(), 1);
        t2.settle();
        assert_eq!(&owed.due()[..], &[0x50, 2, 0, 12]);
        assert!(owed.is_empty());
    }

    #[test]
    fn a_qos2_retransmission_is_not_a_new_reading_until_released() {
        let owed = Owed::default();
        assert!(owed.qos2_new(7));
        assert!(!owed.qos2_new(7), "DUP before PUBREL");
        assert!(owed.qos2_release(7));
        assert!(
            !owed.qos2_release(7),
            "a second PUBREL is not ours any more"
        );
        assert!(owed.qos2_new(7), "the id may be used again after PUBCOMP");
    }

    #[test]
    fn a_sender_that_publishes_right_after_its_puback_is_waited_for() {
        let owed = Owed::default();
        assert!(!owed.waited_for(), "nothing sent yet: a first publish");
        let t = owed.acks.ticket();
        owed.owe(1, false, t.number());
        t.settle();
        assert!(!owed.due().is_empty());
        // (Within a second here, not WAITED_FOR: a loaded test machine may pause the thread.)
        let soon = Duration::from_secs(1);
        assert!(
            owed.waited_for_within(soon),
            "published again right after its PUBACK"
        );
        let t = owed.acks.ticket();
        owed.owe(2, false, t.number());
        assert!(
            !owed.waited_for(),
            "something else owed: a pipelining sender"
        );
        t.settle();
        let _ = owed.due();
        std::thread::sleep(WAITED_FOR * 5);
        assert!(!owed.waited_for(), "a sensor that publishes now and then");
    }
}
