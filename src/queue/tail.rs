//! The committed tail: events the writer just committed, handed to the forwarder in memory.
//!
//! Without it, every commit costs a second trip to the writer thread and an SQLite read (a read
//! transaction, its file locks, and a copy of each row) before the forwarder can send. The
//! writer pushes each committed group here; the forwarder takes from here while it is caught up
//! with the file, and reads the file otherwise (after a reconnect, behind a backlog, after the
//! tail overflowed).
//!
//! Invariants:
//! - Only committed events are pushed (after their transaction committed), in position order.
//! - Every committed event with a position `>= start` that is still queued is in `events`, until
//!   the forwarder takes it. When the tail is full, the oldest event is dropped from memory (not
//!   from the queue) and `start` moves past it. Anything that removes or inserts rows out of order
//!   (eviction, expiry, replay, a purge by the CLI, a replaced file) resets the tail to empty at
//!   the next position, so the forwarder goes back to the file.
//! - The forwarder may take from the tail only when its cursor for both classes is at or past
//!   `start - 1`: then the file holds nothing for it that the tail does not.
//! - A read of the file asks for more than the forwarder wants ([`READ_AHEAD`] events, up to
//!   [`READ_AHEAD_BYTES`]): behind a backlog, each read is a trip through the busy writer
//!   thread (it answers after its current commit), so a read per few dozen events held the
//!   forwarder to a fraction of its speed. The rest waits in the reader, in order, and is handed
//!   out before anything else; an alert committed meanwhile waits behind at most that much.

use std::collections::VecDeque;

use super::store::{Cursor, StoredEvent};
use super::Leased;
use crate::core::event::Class;

/// One upstream connection's place in the queue, and whether the tail may answer for it
/// (`QueueHandle::read` is how the forwarder reads with it). A new connection starts a new
/// reader at the head of the queue.
#[derive(Debug, Default)]
pub struct Reader {
    /// The queue file this reader's positions belong to (see [`Tail::new_epoch`]).
    epoch: u64,
    cursor: Cursor,
    /// Caught up with the file at least once: the tail may answer from now on. (Before that
    /// the file holds what an earlier connection left unacknowledged, which the tail never has.)
    synced: bool,
    /// Rows read from the file beyond what was asked for, handed out first, in order.
    ahead: VecDeque<StoredEvent>,
    /// Where the rows handed out end (`cursor` is where the file reads end: past `ahead`).
    handed: Cursor,
}

/// Events a read of the file asks for at least (see the module doc).
pub const READ_AHEAD: usize = 1024;
/// ...as long as their envelopes stay within this many bytes (what was asked for comes whatever
/// its size).
pub const READ_AHEAD_BYTES: usize = 256 << 10;

impl Reader {
    /// Up to `limit` events read ahead earlier or from the tail, when it may and can answer;
    /// advances. `None`: the file must answer.
    pub fn from_tail(&mut self, tail: &mut Tail, limit: usize) -> Option<Vec<StoredEvent>> {
        if self.epoch != tail.epoch {
            // The file was replaced: start over at its head.
            *self = Reader {
                epoch: tail.epoch,
                ..Reader::default()
            };
            return None;
        }
        if !self.ahead.is_empty() {
            let n = limit.min(self.ahead.len());
            let rows: Vec<StoredEvent> = self.ahead.drain(..n).collect();
            for row in &rows {
                self.handed.advance(row);
            }
            return Some(rows);
        }
        if !self.synced {
            return None;
        }
        tail.take(&mut self.cursor, limit)
    }

    /// Are rows read ahead waiting to be handed out?
    pub fn has_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Where a read of the file starts.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Where the events handed out so far end (before the ones read ahead).
    pub fn passed(&self) -> Cursor {
        if self.ahead.is_empty() {
            self.cursor
        } else {
            self.handed
        }
    }

    /// The file answered `leased` to a read of up to `asked` events: advance past them and hand
    /// out the first `limit`, keeping the rest. A complete answer means nothing up to the last
    /// commit is left for us in the file, so the tail may answer once the rest is handed out.
    pub fn from_file(&mut self, leased: Leased, asked: usize, limit: usize) -> Vec<StoredEvent> {
        self.handed = self.cursor;
        for row in &leased.rows {
            self.cursor.advance(row);
        }
        if let (true, Some(upto)) = (leased.complete(asked), leased.upto) {
            self.cursor.alert = self.cursor.alert.max(upto);
            self.cursor.telemetry = self.cursor.telemetry.max(upto);
            self.synced = true;
        }
        let mut rows = leased.rows;
        if rows.len() > limit {
            self.ahead.extend(rows.drain(limit..));
        }
        for row in &rows {
            self.handed.advance(row);
        }
        rows
    }
}

pub struct Tail {
    /// Bumped when the queue file is replaced while running (corruption): readers of an
    /// earlier epoch start over.
    epoch: u64,
    /// Lowest position the tail answers for.
    start: u64,
    /// Highest committed position pushed (or the one before `start` after a reset).
    end: u64,
    events: VecDeque<StoredEvent>,
    bytes: usize,
    /// Alerts among `events` (the alert pass of `take` is skipped without them).
    alerts: usize,
    max_events: usize,
    max_bytes: usize,
}

impl Tail {
    /// A tail answering for positions from `next_pos` on; `max_events == 0` keeps nothing (no
    /// upstream: nobody would take the events).
    pub fn new(next_pos: u64, max_events: usize, max_bytes: usize) -> Tail {
        Tail {
            epoch: 0,
            start: next_pos,
            end: next_pos.saturating_sub(1),
            events: VecDeque::new(),
            bytes: 0,
            alerts: 0,
            max_events,
            max_bytes,
        }
    }

    /// Forget what is held; answer only for positions from `next_pos` on.
    pub fn reset(&mut self, next_pos: u64) {
        self.events.clear();
        self.bytes = 0;
        self.alerts = 0;
        self.start = next_pos;
        self.end = next_pos.saturating_sub(1);
    }

    /// The queue file was replaced: forget what is held, and make every reader start over.
    pub fn new_epoch(&mut self, next_pos: u64) {
        self.epoch += 1;
        self.reset(next_pos);
    }

    /// Does this tail keep events at all (a gateway with an upstream)?
    pub fn keeps(&self) -> bool {
        self.max_events > 0
    }

    /// A committed event (positions must grow).
    pub fn push(&mut self, e: StoredEvent) {
        if e.pos <= self.end {
            // Out of order: cannot vouch for completeness any more.
            self.reset(e.pos.max(self.end) + 1);
            return;
        }
        self.end = e.pos;
        self.bytes += e.body.len();
        self.alerts += (e.class == Class::Alert) as usize;
        self.events.push_back(e);
        while self.events.len() > self.max_events || self.bytes > self.max_bytes {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.body.len();
            self.alerts -= (old.class == Class::Alert) as usize;
            self.start = old.pos + 1;
        }
    }

    /// Up to `limit` events after `cursor`, alerts first (like the file's lease), taken out of
    /// the tail; `None` when the cursor is behind `start` (the file must answer). When every
    /// event after the cursor was taken, the cursor moves to the end of the tail for both
    /// classes.
    pub fn take(&mut self, cursor: &mut Cursor, limit: usize) -> Option<Vec<StoredEvent>> {
        if !self.keeps() || cursor.alert.min(cursor.telemetry).saturating_add(1) < self.start {
            return None;
        }
        let mut out = Vec::new();
        for class in [Class::Alert, Class::Telemetry] {
            if class == Class::Alert && self.alerts == 0 {
                continue;
            }
            let after = match class {
                Class::Alert => cursor.alert,
                Class::Telemetry => cursor.telemetry,
            };
            let mut i = 0;
            while i < self.events.len() && out.len() < limit {
                let e = &self.events[i];
                if e.class == class && e.pos > after {
                    if let Some(e) = self.events.remove(i) {
                        self.bytes -= e.body.len();
                        self.alerts -= (e.class == Class::Alert) as usize;
                        out.push(e);
                    }
                } else {
                    i += 1;
                }
            }
        }
        for e in &out {
            cursor.advance(e);
        }
        let rest = self.events.iter().any(|e| match e.class {
            Class::Alert => e.pos > cursor.alert,
            Class::Telemetry => e.pos > cursor.telemetry,
        });
        if !rest {
            cursor.alert = cursor.alert.max(self.end);
            cursor.telemetry = cursor.telemetry.max(self.end);
            // Taken or already behind the cursor: nothing left worth keeping.
            self.events.clear();
            self.bytes = 0;
            self.alerts = 0;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pos: u64, class: Class) -> StoredEvent {
        StoredEvent {
            pos,
            seq: pos,
            class,
            time_us: 0,
            subject: "s".into(),
            topic: "t".into(),
            body: vec![b'x'; 10],
        }
    }

    fn positions(v: &[StoredEvent]) -> Vec<u64> {
        v.iter().map(|e| e.pos).collect()
    }

    #[test]
    fn a_cursor_behind_the_tail_must_read_the_file() {
        let mut t = Tail::new(5, 100, 1 << 20);
        t.push(ev(5, Class::Telemetry));
        let mut c = Cursor {
            alert: 3,
            telemetry: 4,
        };
        assert!(t.take(&mut c, 10).is_none(), "position 4 may hold an alert");
        c.alert = 4;
        assert_eq!(positions(&t.take(&mut c, 10).unwrap()), vec![5]);
        assert_eq!((c.alert, c.telemetry), (5, 5));
    }

    #[test]
    fn a_new_epoch_sends_every_reader_back_to_the_file() {
        let mut t = Tail::new(1, 100, 1 << 20);
        let mut r = Reader::default();
        let leased = Leased {
            rows: vec![ev(1, Class::Telemetry)],
            upto: Some(1),
            cut: false,
        };
        assert_eq!(positions(&r.from_file(leased, 10, 10)), vec![1]);
        t.push(ev(2, Class::Telemetry));
        assert_eq!(positions(&r.from_tail(&mut t, 10).unwrap()), vec![2]);
        // The file is replaced: the reader starts over at its head (cursor 0, not synced).
        t.new_epoch(3);
        t.push(ev(3, Class::Telemetry));
        assert!(r.from_tail(&mut t, 10).is_none());
        assert_eq!(r.cursor(), Cursor::default());
        assert!(
            r.from_tail(&mut t, 10).is_none(),
            "must catch up with the file first"
        );
    }

    #[test]
    fn what_was_read_ahead_is_handed_out_first_and_only_it_counts_as_passed() {
        let mut t = Tail::new(1, 100, 1 << 20);
        let mut r = Reader::default();
        let file: Vec<StoredEvent> = (1..=5).map(|p| ev(p, Class::Telemetry)).collect();
        for e in &file {
            t.push(e.clone());
        }
        // Asked for 8 (reading ahead), wanted 2: five came, so the file is caught up with.
        let leased = Leased {
            rows: file.clone(),
            upto: Some(5),
            cut: false,
        };
        assert_eq!(positions(&r.from_file(leased, 8, 2)), vec![1, 2]);
        assert_eq!(r.cursor().telemetry, 5, "the file is read up to 5");
        assert_eq!(r.passed().telemetry, 2, "only 1 and 2 were handed out");
        t.push(ev(6, Class::Telemetry));
        // What was read ahead goes before the tail's newer events.
        assert_eq!(positions(&r.from_tail(&mut t, 2).unwrap()), vec![3, 4]);
        assert_eq!(r.passed().telemetry, 4);
        assert_eq!(positions(&r.from_tail(&mut t, 2).unwrap()), vec![5]);
        assert_eq!(r.passed().telemetry, 5);
        assert_eq!(positions(&r.from_tail(&mut t, 2).unwrap()), vec![6]);
        // A read stopped at its byte bound is not caught up, however few rows it brought.
        let mut r = Reader::default();
        let leased = Leased {
            rows: file[..3].to_vec(),
            upto: Some(5),
            cut: true,
        };
        assert_eq!(positions(&r.from_file(leased, 8, 1)), vec![1]);
        assert_eq!(positions(&r.from_tail(&mut t, 5).unwrap()), vec![2, 3]);
        assert!(r.from_tail(&mut t, 5).is_none(), "4 and 5 are in the file");
        assert_eq!(r.cursor().telemetry, 3);
    }

    #[test]
    fn alerts_first_within_the_limit_and_the_rest_stays() {
        let mut t = Tail::new(1, 100, 1 << 20);
        for (p, c) in [
            (1, Class::Telemetry),
            (2, Class::Alert),
            (3, Class::Telemetry),
            (4, Class::Alert),
        ] {
            t.push(ev(p, c));
        }
        let mut c = Cursor::default();
        assert_eq!(positions(&t.take(&mut c, 3).unwrap()), vec![2, 4, 1]);
        assert_eq!((c.alert, c.telemetry), (4, 1));
        assert_eq!(positions(&t.take(&mut c, 3).unwrap()), vec![3]);
        assert_eq!((c.alert, c.telemetry), (4, 4));
        assert!(t.take(&mut c, 3).unwrap().is_empty());
    }

    #[test]
    fn overflow_moves_start_so_the_forwarder_reads_the_file() {
        let mut t = Tail::new(1, 2, 1 << 20);
        for p in 1..=5 {
            t.push(ev(p, Class::Telemetry));
        }
        let mut c = Cursor::default();
        assert!(
            t.take(&mut c, 10).is_none(),
            "1..=3 were dropped from memory"
        );
        c = Cursor {
            alert: 3,
            telemetry: 3,
        };
        assert_eq!(positions(&t.take(&mut c, 10).unwrap()), vec![4, 5]);
        // Bytes bound too.
        let mut t = Tail::new(1, 100, 25);
        for p in 1..=5 {
            t.push(ev(p, Class::Telemetry));
        }
        let mut c = Cursor {
            alert: 3,
            telemetry: 3,
        };
        assert_eq!(positions(&t.take(&mut c, 10).unwrap()), vec![4, 5]);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Push(bool),
            Take(usize),
            /// A new upstream connection: nothing was acknowledged, so it must get everything.
            Reconnect,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => any::<bool>().prop_map(Op::Push),
                4 => (1usize..6).prop_map(Op::Take),
                1 => Just(Op::Reconnect),
            ]
        }

        /// The file's lease: events after the cursor, alerts first.
        fn file_lease(file: &[StoredEvent], c: Cursor, limit: usize) -> Vec<StoredEvent> {
            let mut out: Vec<StoredEvent> = file
                .iter()
                .filter(|e| e.class == Class::Alert && e.pos > c.alert)
                .take(limit)
                .cloned()
                .collect();
            let rest = limit - out.len();
            out.extend(
                file.iter()
                    .filter(|e| e.class == Class::Telemetry && e.pos > c.telemetry)
                    .take(rest)
                    .cloned(),
            );
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            /// A reader over the tail and a file (as `QueueHandle::read` combines them) gets
            /// every committed event exactly once, in order within each class, whatever the
            /// tail's size and the interleaving; a reader for a new connection gets them all
            /// again (the file keeps every event here: none was acknowledged), though the
            /// earlier connection already took some of them from the tail.
            #[test]
            fn tail_and_file_together_deliver_everything_once_in_order(
                ops in proptest::collection::vec(op(), 1..80),
                cap in 0usize..6,
                ahead in 0usize..6,
                cut_at in 1usize..12,
            ) {
                let mut tail = Tail::new(1, cap, 1 << 20);
                let mut file: Vec<StoredEvent> = Vec::new();
                let mut reader = Reader::default();
                let mut got: Vec<StoredEvent> = Vec::new();
                let drain = |tail: &mut Tail, file: &[StoredEvent], reader: &mut Reader,
                             got: &mut Vec<StoredEvent>, limit: usize| -> usize {
                    let rows = match reader.from_tail(tail, limit) {
                        Some(rows) => rows,
                        None => {
                            // Reading ahead, and sometimes stopped by the byte bound (after
                            // `cut_at` rows, never before `limit`).
                            let asked = limit + ahead;
                            let mut rows = file_lease(file, reader.cursor(), asked);
                            let keep = cut_at.max(limit);
                            let cut = rows.len() > keep;
                            rows.truncate(keep);
                            let leased = Leased {
                                rows,
                                upto: Some(file.last().map(|e| e.pos).unwrap_or(0)),
                                cut,
                            };
                            reader.from_file(leased, asked, limit)
                        }
                    };
                    let n = rows.len();
                    got.extend(rows);
                    n
                };
                for op in ops {
                    match op {
                        Op::Push(alert) => {
                            let pos = file.len() as u64 + 1;
                            let e = ev(pos, if alert { Class::Alert } else { Class::Telemetry });
                            file.push(e.clone());
                            tail.push(e);
                        }
                        Op::Take(limit) => {
                            drain(&mut tail, &file, &mut reader, &mut got, limit);
                        }
                        Op::Reconnect => {
                            reader = Reader::default();
                            got.clear();
                        }
                    }
                }
                while drain(&mut tail, &file, &mut reader, &mut got, 4) > 0 {}
                let mut positions: Vec<u64> = got.iter().map(|e| e.pos).collect();
                for class in [Class::Alert, Class::Telemetry] {
                    let seen: Vec<u64> =
                        got.iter().filter(|e| e.class == class).map(|e| e.pos).collect();
                    prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "order {:?}", seen);
                }
                positions.sort_unstable();
                prop_assert_eq!(positions, (1..=file.len() as u64).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn reset_and_disabled_tails_answer_only_for_what_follows() {
        let mut t = Tail::new(1, 100, 1 << 20);
        t.push(ev(1, Class::Telemetry));
        t.reset(10);
        let mut c = Cursor {
            alert: 5,
            telemetry: 5,
        };
        assert!(t.take(&mut c, 10).is_none());
        let mut off = Tail::new(1, 0, 0);
        off.push(ev(1, Class::Telemetry));
        let mut c = Cursor::default();
        assert!(off.take(&mut c, 10).is_none());
        // Out of order pushes (a replay) reset the tail.
        let mut t = Tail::new(1, 100, 1 << 20);
        t.push(ev(3, Class::Telemetry));
        t.push(ev(2, Class::Telemetry));
        let mut c = Cursor {
            alert: 2,
            telemetry: 2,
        };
        assert!(t.take(&mut c, 10).is_none());
    }
}
