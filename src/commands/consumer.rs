//! Reference logic for a cloud consumer of the forwarded streams: drop duplicates by event `id`,
//! detect lost events by gaps in `sequence`, per gateway (`source`).
//!
//! Delivery is at-least-once: after a reconnect or a crash a gateway sends again what its
//! broker had not acknowledged, so duplicates arrive close to their first copy (at most
//! `upstream.inflight` of them per reconnect). Memory stays bounded: ids are remembered for a
//! window of sequences behind the highest contiguous one.
//!
//! Layer: commands (used by `demo`, the example consumer and the tests).

use std::collections::{BTreeSet, HashMap, HashSet};

/// How far behind the contiguous prefix ids are still remembered.
const ID_WINDOW: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First time seen: process it.
    New,
    /// Same `id` seen before: drop it.
    Duplicate,
}

#[derive(Debug, Default)]
struct Source {
    /// Every sequence up to here was seen.
    contiguous: u64,
    /// Seen sequences above `contiguous`.
    above: BTreeSet<u64>,
    /// Recent ids with their sequence.
    ids: HashMap<String, u64>,
    new: u64,
    duplicates: u64,
}

/// Dedup and gap tracking for one consumer.
#[derive(Debug, Default)]
pub struct Tracker {
    sources: HashMap<String, Source>,
}

/// Totals over all sources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub unique: u64,
    pub duplicates: u64,
    /// Sequence numbers below the highest seen that never arrived.
    pub missing: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Record an event (`source`, `id`, `sequence`) and say whether it is new.
    pub fn observe(&mut self, source: &str, id: &str, sequence: u64) -> Verdict {
        let s = match self.sources.get_mut(source) {
            Some(s) => s,
            None => self.sources.entry(source.to_string()).or_default(),
        };
        if s.ids.contains_key(id) {
            s.duplicates += 1;
            return Verdict::Duplicate;
        }
        s.ids.insert(id.to_string(), sequence);
        s.new += 1;
        if sequence > s.contiguous {
            s.above.insert(sequence);
            while s.above.first() == Some(&(s.contiguous + 1)) {
                s.above.pop_first();
                s.contiguous += 1;
            }
        }
        if s.ids.len() as u64 > 2 * ID_WINDOW {
            let floor = s.contiguous.saturating_sub(ID_WINDOW);
            s.ids.retain(|_, seq| *seq >= floor);
        }
        Verdict::New
    }

    /// Sequences of `source` below the highest seen that have not arrived (so far).
    pub fn gaps(&self, source: &str) -> Vec<u64> {
        let Some(s) = self.sources.get(source) else {
            return Vec::new();
        };
        let Some(&max) = s.above.last() else {
            return Vec::new();
        };
        let seen: HashSet<u64> = s.above.iter().copied().collect();
        ((s.contiguous + 1)..max)
            .filter(|q| !seen.contains(q))
            .collect()
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for (name, s) in &self.sources {
            t.unique += s.new;
            t.duplicates += s.duplicates;
            t.missing += self.gaps(name).len() as u64;
        }
        t
    }

    /// `(source, highest contiguous sequence)` for every gateway seen.
    pub fn progress(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .sources
            .iter()
            .map(|(k, s)| (k.clone(), s.contiguous))
            .collect();
        v.sort();
        v
    }
}

/// The envelopes in one upstream message: a structured CloudEvent (a JSON object) is one; a
/// CloudEvents JSON batch (a JSON array, sent with `upstream.batch_events > 1`) holds several,
/// in queue order.
pub fn envelopes(payload: &[u8]) -> Result<Vec<serde_json::Value>, serde_json::Error> {
    match serde_json::from_slice(payload)? {
        serde_json::Value::Array(batch) => Ok(batch),
        one => Ok(vec![one]),
    }
}

/// The parts of an envelope the tracker needs: (`source`, `id`, `sequence`).
pub fn envelope_keys(envelope: &serde_json::Value) -> Option<(&str, &str, u64)> {
    let source = envelope.get("source")?.as_str()?;
    let id = envelope.get("id")?.as_str()?;
    let seq = envelope.get("sequence")?.as_str()?.parse().ok()?;
    Some((source, id, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_events_and_batches() {
        let one = br#"{"id":"a","source":"s","sequence":"00000000000000000001"}"#;
        assert_eq!(envelopes(one).unwrap().len(), 1);
        let batch = br#"[{"id":"a","source":"s","sequence":"00000000000000000001"},{"id":"b","source":"s","sequence":"00000000000000000002"}]"#;
        let b = envelopes(batch).unwrap();
        assert_eq!(envelope_keys(&b[1]), Some(("s", "b", 2)));
        assert!(envelopes(b"[1,").is_err());
    }

    #[test]
    fn duplicates_and_gaps() {
        let mut t = Tracker::new();
        assert_eq!(t.observe("gw", "a", 1), Verdict::New);
        assert_eq!(t.observe("gw", "b", 2), Verdict::New);
        assert_eq!(t.observe("gw", "a", 1), Verdict::Duplicate);
        assert_eq!(t.observe("gw", "d", 4), Verdict::New);
        assert_eq!(t.gaps("gw"), [3]);
        assert_eq!(
            t.totals(),
            Totals {
                unique: 3,
                duplicates: 1,
                missing: 1
            }
        );
        assert_eq!(t.observe("gw", "c", 3), Verdict::New, "late, not lost");
        assert_eq!(t.totals().missing, 0);
        assert_eq!(t.progress(), [("gw".to_string(), 4)]);
        assert_eq!(t.observe("other", "a", 1), Verdict::New, "per source");
    }

    #[test]
    fn memory_stays_bounded() {
        let mut t = Tracker::new();
        for i in 1..=(3 * ID_WINDOW) {
            t.observe("gw", &i.to_string(), i);
        }
        let s = &t.sources["gw"];
        assert!(s.ids.len() as u64 <= 2 * ID_WINDOW + 1);
        assert!(s.above.is_empty());
    }
}
