//! What rumqttd's per-filter logs hold, mirrored by the guard, so that local fan-out has a
//! memory bound (`broker.max_fanout_bytes`).
//!
//! rumqttd keeps, for every subscription filter it was ever given, an in-memory log of the
//! publishes that matched it: segments of `broker.segment_size` (a segment is closed once it
//! reaches that size, so it may exceed it by one message), at most `broker.segment_count` of
//! them, the oldest dropped when a new one is needed. It never frees a filter, and a log that
//! nobody reads keeps its last segments for good. Measured before this bound: 100 filters fed
//! 12 × 100 KB each took the gateway from 8.6 MB to 196 MB; `broker.max_filters` = 1000 allowed
//! about 2 GB (`bench/filter-logs.py`).
//!
//! The guard sees every publish it relays to rumqttd and every filter it lets through, so it
//! runs the same segment arithmetic per filter ([`Fanout::admit`]). A publish whose relay
//! would take the total past the bound is not relayed: the reading still goes upstream (the
//! hand-off comes first), only local subscribers miss it, counted as
//! `edgegate_broker_rejected_total{reason="fanout_limit"}`.
//!
//! Only a log that is still growing is held to the bound. A log that has all its segments
//! ("mature") only rotates: it is always served, so a dashboard on `sensors/#` keeps getting
//! readings however many other filters an attacker fills. Its size then moves by at most one
//! segment and one message, and it got there holding at least `segment_count - 1` segments
//! within the bound, so the logs hold at most about `max_bytes × (1 + (segment_size +
//! message) / ((segment_count - 1) × segment_size))`: 1.4 × with the defaults (8 segments of
//! 128 KiB, 256 KiB messages).
//!
//! Invariants:
//! - The mirrored total is at least what rumqttd holds for relayed publishes: a publish that
//!   matches several filters is counted in each (rumqttd shares the bytes), and a message is
//!   counted at 4 bytes plus its topic and payload, as rumqttd sizes it, plus
//!   [`MESSAGE_OVERHEAD`] for its bookkeeping.
//! - Filters are never forgotten, like rumqttd's. Shared subscriptions (`$share/group/f`) are
//!   logged under `f`.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::core::topic::matches;

/// Bytes rumqttd spends per stored message beyond its topic and payload (the publish and its
/// place in a segment), counted so that floods of tiny messages are bounded too.
pub const MESSAGE_OVERHEAD: usize = 96;

/// One filter's log, as segment sizes (oldest first; the last is being filled).
struct Log {
    filter: Box<str>,
    segments: VecDeque<usize>,
    /// An MQTT 3.1.1 client subscribed to it at some time (its session may still hold it).
    v3: bool,
}

struct Inner {
    known: HashSet<Box<str>>,
    logs: Vec<Log>,
    total: usize,
}

/// What [`Fanout::admit`] decided about a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// It matches some filter and fits: counted in each matching log; relay it. `v3`: one of
    /// those filters was subscribed by an MQTT 3.1.1 client (see [`Fanout::add_filter`]).
    Counted { v3: bool },
    /// No filter matches: no local subscriber can get it (relay it only to keep it retained).
    Unmatched,
    /// It would take the logs past the bound: do not relay it.
    Refused,
}

/// The mirror of rumqttd's filter logs; one per broker.
pub struct Fanout {
    segment_size: usize,
    segment_count: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl Fanout {
    pub fn new(segment_size: usize, segment_count: usize, max_bytes: usize) -> Fanout {
        Fanout {
            segment_size: segment_size.max(1),
            segment_count: segment_count.max(1),
            max_bytes,
            inner: Mutex::new(Inner {
                known: HashSet::new(),
                logs: Vec::new(),
                total: 0,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A filter rumqttd is given (again or for the first time), by an MQTT 3.1.1 client when
    /// `v3`. That stays known for good: rumqttd 0.20 panics writing a publish that carries
    /// MQTT 5 properties to a 3.1.1 connection (before the links this killed the subscriber's
    /// connection and poisoned the listener; the link's adapter now drops them for a 3.1.1
    /// connection too), so such publishes reach those filters without their properties.
    pub fn add_filter(&self, filter: &[u8], v3: bool) {
        let f = String::from_utf8_lossy(filter);
        let f = match f.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => &f,
        };
        let mut inner = self.inner();
        if inner.known.insert(f.into()) {
            inner.logs.push(Log {
                filter: f.into(),
                segments: VecDeque::from([0]),
                v3,
            });
        } else if v3 {
            if let Some(log) = inner.logs.iter_mut().find(|l| &*l.filter == f) {
                log.v3 = true;
            }
        }
    }

    /// Bytes the mirrored logs hold.
    pub fn held(&self) -> usize {
        self.inner().total
    }

    /// May a publish of `payload_len` bytes to `topic` be relayed? If so, it is counted in the
    /// log of every filter it matches; if its relay would take the total past the bound (and
    /// grow a log still filling), nothing changes and the answer is no.
    pub fn admit(&self, topic: &[u8], payload_len: usize) -> Admit {
        let Ok(topic) = std::str::from_utf8(topic) else {
            // The guard refuses such topics before; rumqttd would match nothing with it.
            return Admit::Unmatched;
        };
        let size = 4 + topic.len() + payload_len + MESSAGE_OVERHEAD;
        let mut inner = self.inner();
        if inner.logs.is_empty() {
            return Admit::Unmatched;
        }
        // First the change the append would make, then (if admitted) the append.
        let mut grow = 0usize;
        let mut shrink = 0usize;
        let mut growing = 0usize;
        let mut any = false;
        let mut v3 = false;
        for log in inner.logs.iter().filter(|l| matches(&l.filter, topic)) {
            any = true;
            v3 |= log.v3;
            grow += size;
            if !self.mature(log) {
                growing += size;
            }
            if self.rotates(log) {
                shrink += log.segments.front().copied().unwrap_or(0);
            }
        }
        if !any {
            return Admit::Unmatched;
        }
        let after = (inner.total + grow).saturating_sub(shrink);
        if growing > 0 && after > self.max_bytes && after > inner.total {
            return Admit::Refused;
        }
        let (seg_size, seg_count) = (self.segment_size, self.segment_count);
        for log in inner.logs.iter_mut().filter(|l| matches(&l.filter, topic)) {
            if log.segments.back().is_some_and(|&b| b >= seg_size) {
                if log.segments.len() >= seg_count {
                    log.segments.pop_front();
                }
                log.segments.push_back(0);
            }
            if let Some(b) = log.segments.back_mut() {
                *b += size;
            }
        }
        inner.total = after;
        Admit::Counted { v3 }
    }

    /// `log` has all its segments: from now on it only rotates.
    fn mature(&self, log: &Log) -> bool {
        self.segment_count >= 2 && log.segments.len() >= self.segment_count
    }

    /// The next append to `log` drops its oldest segment (rumqttd's retention).
    fn rotates(&self, log: &Log) -> bool {
        log.segments.back().is_some_and(|&b| b >= self.segment_size)
            && log.segments.len() >= self.segment_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_a_311_client_subscribed_to_is_remembered() {
        let f = Fanout::new(1 << 16, 4, 1 << 24);
        f.add_filter(b"s/#", false);
        assert_eq!(f.admit(b"s/t", 10), Admit::Counted { v3: false });
        f.add_filter(b"$share/g/s/#", true);
        f.add_filter(b"s/#", false);
        assert_eq!(f.admit(b"s/t", 10), Admit::Counted { v3: true }, "sticky");
        f.add_filter(b"x/+", false);
        assert_eq!(f.admit(b"x/y", 10), Admit::Counted { v3: false });
    }

    #[test]
    fn a_publish_nobody_subscribed_to_costs_nothing() {
        let f = Fanout::new(1024, 2, 10_000);
        assert_eq!(f.admit(b"a/b", 5000), Admit::Unmatched);
        f.add_filter(b"x/#", false);
        assert_eq!(f.admit(b"a/b", 5000), Admit::Unmatched);
        assert_eq!(f.held(), 0);
    }

    #[test]
    fn each_matching_log_is_counted_and_rotates_like_rumqttd() {
        let f = Fanout::new(1000, 2, 1 << 20);
        f.add_filter(b"s/#", false);
        f.add_filter(b"s/+", false);
        f.add_filter(b"$share/g/s/t", false);
        let m = 4 + 3 + 900 + MESSAGE_OVERHEAD;
        assert_eq!(f.admit(b"s/t", 900), Admit::Counted { v3: false });
        assert_eq!(f.held(), 3 * m);
        // Each log: [m] -> full segment, next opens a second: [m, m]; the third drops the
        // oldest: still two segments each.
        assert_eq!(f.admit(b"s/t", 900), Admit::Counted { v3: false });
        assert_eq!(f.admit(b"s/t", 900), Admit::Counted { v3: false });
        assert_eq!(f.admit(b"s/t", 900), Admit::Counted { v3: false });
        assert_eq!(f.held(), 3 * 2 * m);
    }

    #[test]
    fn a_log_with_all_its_segments_is_served_past_the_bound() {
        let m = 4 + 3 + 600 + MESSAGE_OVERHEAD;
        // Two segments of 1000: a/1 fills [2m, m] (mature) within the bound, not a/2 too.
        let f = Fanout::new(1000, 2, 3 * m + 100);
        f.add_filter(b"a/1", false);
        f.add_filter(b"a/2", false);
        for _ in 0..3 {
            assert_eq!(f.admit(b"a/1", 600), Admit::Counted { v3: false });
        }
        assert_eq!(
            f.admit(b"a/2", 600),
            Admit::Refused,
            "a growing log is held to the bound"
        );
        let mut most = 0;
        for _ in 0..10 {
            assert_eq!(
                f.admit(b"a/1", 600),
                Admit::Counted { v3: false },
                "a mature log only rotates: served"
            );
            most = most.max(f.held());
        }
        assert!(most > 3 * m + 100, "past the bound by its active segment");
        assert!(most <= 4 * m, "by a segment at most: {most}");
        assert_eq!(
            f.admit(b"a/2", 600),
            Admit::Refused,
            "still no room for a growing one"
        );
    }

    #[test]
    fn growth_past_the_bound_is_refused_but_full_logs_still_rotate() {
        let m = 4 + 3 + 1000 + MESSAGE_OVERHEAD;
        // Room for two logs of two segments each, not three.
        let f = Fanout::new(1000, 2, 4 * m + 10);
        for t in [&b"a/1"[..], b"a/2", b"a/3"] {
            f.add_filter(t, false);
        }
        for _ in 0..2 {
            assert_eq!(f.admit(b"a/1", 1000), Admit::Counted { v3: false });
            assert_eq!(f.admit(b"a/2", 1000), Admit::Counted { v3: false });
        }
        assert_eq!(f.held(), 4 * m);
        assert_eq!(
            f.admit(b"a/3", 1000),
            Admit::Refused,
            "a third log would pass the bound"
        );
        assert_eq!(f.held(), 4 * m, "a refused publish changes nothing");
        assert_eq!(
            f.admit(b"a/1", 1000),
            Admit::Counted { v3: false },
            "a full log rotates: no growth"
        );
        assert_eq!(f.held(), 4 * m);
    }
}
