//! Model-based property test: random sequences of append / lease / ack / reopen against a
//! simple in-memory model of what the queue must hold.

use super::tests::ev;
use super::*;
use crate::config::SyncMode;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(bool),
    /// Ack the leased events whose index (mod the number leased) is picked.
    Ack(Vec<usize>),
    Reopen,
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<bool>().prop_map(Op::Append),
        3 => proptest::collection::vec(any::<usize>(), 0..6).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
        1 => Just(Op::Expire),
    ]
}

/// The model: queued (seq, class) in commit order, and the next sequence.
#[derive(Default)]
struct Model {
    queued: Vec<(u64, Class)>,
    next_seq: u64,
}

impl Model {
    /// What a lease of everything must return: alerts first, then telemetry, each in order.
    fn expected(&self) -> Vec<u64> {
        let alerts = self
            .queued
            .iter()
            .filter(|e| e.1 == Class::Alert)
            .map(|e| e.0);
        let telemetry = self
            .queued
            .iter()
            .filter(|e| e.1 == Class::Telemetry)
            .map(|e| e.0);
        alerts.chain(telemetry).collect()
    }

    fn append(&mut self, class: Class, max: usize, when_full: QueueFull) -> Option<u64> {
        if self.queued.len() >= max {
            let telemetry = self.queued.iter().position(|e| e.1 == Class::Telemetry);
            let victim = match (when_full, class, telemetry) {
                (_, _, Some(i))
                    if !(when_full == QueueFull::DropNewest && class == Class::Telemetry) =>
                {
                    Some(i)
                }
                (QueueFull::DropOldest, Class::Alert, None) => {
                    self.queued.iter().position(|e| e.1 == Class::Alert)
                }
                _ => None,
            };
            match victim {
                Some(i) => {
                    self.queued.remove(i);
                }
                None => return None,
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued.push((seq, class));
        Some(seq)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn queue_matches_model(ops in proptest::collection::vec(op(), 1..60), max in 1usize..12, newest in any::<bool>()) {
        let when_full = if newest { QueueFull::DropNewest } else { QueueFull::DropOldest };
        let limits = Limits { max_events: max as u64, when_full, ..Limits::default() };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut store = Store::open(&path, SyncMode::Normal, limits).unwrap().0;
        let mut model = Model { next_seq: 1, ..Model::default() };
        for op in ops {
            match op {
                Op::Append(alert) => {
                    let class = if alert { Class::Alert } else { Class::Telemetry };
                    let mut t = store.begin().unwrap();
                    let got = t.append(&ev(class, "s"), "src").unwrap();
                    t.commit().unwrap();
                    match (got, model.append(class, max, when_full)) {
                        (Appended::Queued { seq, .. }, Some(m)) => prop_assert_eq!(seq, m),
                        (Appended::Rejected, None) => {}
                        (g, m) => prop_assert!(false, "store {:?} model {:?}", g, m),
                    }
                }
                Op::Ack(picks) => {
                    let leased = store.lease(Cursor::default(), 1000).unwrap();
                    if leased.is_empty() { continue; }
                    let chosen: Vec<&StoredEvent> = picks.iter().map(|i| &leased[i % leased.len()]).collect();
                    let mut t = store.begin().unwrap();
                    t.ack(&chosen.iter().map(|e| e.pos).collect::<Vec<_>>(), 0).unwrap();
                    t.commit().unwrap();
                    model.queued.retain(|(s, _)| !chosen.iter().any(|e| e.seq == *s));
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(&path, SyncMode::Normal, limits).unwrap().0;
                    prop_assert_eq!(store.next_seq(), model.next_seq);
                }
                Op::Expire => {
                    // No max_age configured: expiry removes nothing.
                    let mut t = store.begin().unwrap();
                    t.expire(now_us()).unwrap();
                    prop_assert_eq!(t.commit().unwrap().removed, Removed::default());
                }
            }
            let seqs: Vec<u64> = store.lease(Cursor::default(), 1000).unwrap().iter().map(|e| e.seq).collect();
            prop_assert_eq!(&seqs, &model.expected());
            prop_assert_eq!(store.depth(), model.queued.len() as u64);
            prop_assert!(store.depth() <= max as u64);
        }
    }
}
