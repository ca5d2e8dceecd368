//! The writer's transaction ([`Txn`], one commit group): append, acknowledge, expire, evict
//! for the limits, and the cap the free space of the file system sets.
//!
//! Invariants:
//! - Counters (depth, bytes, alerts) and `next_seq`/`next_pos` change only when the group
//!   commits; a dropped `Txn` changes nothing.
//! - After a commit `max_events` and `max_bytes` (or the lower space cap) hold: telemetry is
//!   evicted (or, with `drop_newest`, rejected) before any alert is; an alert evicts alerts
//!   only when no telemetry is left.
//! - `meta.next_seq` is written only by a group that removed the row holding the newest
//!   sequence and appended none after it (so sequences are never reused).
//! - Acknowledgements delete by runs of consecutive positions; unknown positions are ignored.

use std::path::Path;

use rusqlite::params;

use super::row;
use super::{
    micros, row_bytes, Committed, Limits, Removed, Store, StoreError, StoredEvent, ROW_OVERHEAD,
};
use crate::config::QueueFull;
use crate::core::event::{Class, Event};

/// While the file system is short of `queue.min_free`, the queue may still hold this much
/// (accounted bytes): live traffic goes on through a small queue, only a backlog is bounded.
pub const SPACE_CAP_FLOOR: u64 = 1 << 20;

/// One commit group. Counters change only if it commits.
///
/// Within a group, removals (acknowledgements) go before appends: the pages the removed rows
/// freed are filled again in the same transaction, so each is written to the WAL once, not
/// once freed and again when reused by the next group (measured: half the bytes written per
/// event with a healthy link, see the README's benchmark section).
pub struct Txn<'a> {
    pub(super) tx: rusqlite::Transaction<'a>,
    path: &'a Path,
    limits: &'a Limits,
    /// `limits.max_bytes`, or less while the file system is short of space (0: unbounded).
    max_bytes: u64,
    next_seq: &'a mut u64,
    next_pos: &'a mut u64,
    depth: &'a mut u64,
    bytes: &'a mut u64,
    alerts: &'a mut u64,
    new_seq: u64,
    new_pos: u64,
    d_depth: i64,
    d_bytes: i64,
    d_alerts: i64,
    removed_newest: bool,
    appended: u64,
    pub(super) removed: Removed,
}

/// Runs of consecutive positions, as inclusive ranges (the input in any order, duplicates
/// allowed).
pub(super) fn runs(positions: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = positions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in sorted {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == p => *b = p,
            _ => out.push((p, p)),
        }
    }
    out
}

/// What became of an appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Written (visible once the transaction commits) with this sequence at this position.
    Queued { seq: u64, pos: u64 },
    /// The queue is full and `when_full = "drop_newest"`.
    Rejected,
}

impl Txn<'_> {
    pub(super) fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        }
    }

    fn depth_now(&self) -> u64 {
        (*self.depth as i64 + self.d_depth).max(0) as u64
    }

    fn bytes_now(&self) -> u64 {
        (*self.bytes as i64 + self.d_bytes).max(0) as u64
    }

    fn alerts_now(&self) -> u64 {
        (*self.alerts as i64 + self.d_alerts).max(0) as u64
    }

    fn over(&self, extra_events: u64, extra_bytes: u64) -> bool {
        (self.limits.max_events > 0 && self.depth_now() + extra_events > self.limits.max_events)
            || (self.max_bytes > 0 && self.bytes_now() + extra_bytes > self.max_bytes)
    }

    /// Append `event` with the next sequence, as the envelope from `source`, making room or
    /// rejecting it when a limit would be passed.
    pub fn append(&mut self, event: &Event, source: &str) -> Result<Appended, StoreError> {
        let seq = *self.next_seq + self.new_seq;
        let stored = row::encode(event, source);
        let size = row_bytes(
            stored.len(),
            event.upstream_topic.len(),
            event.subject.len(),
        );
        if self.over(1, size) {
            let telemetry_left = self.depth_now() > self.alerts_now();
            match (self.limits.when_full, event.class) {
                (QueueFull::DropNewest, Class::Telemetry) => {
                    self.removed.rejected += 1;
                    return Ok(Appended::Rejected);
                }
                (QueueFull::DropNewest, Class::Alert) if !telemetry_left => {
                    self.removed.rejected += 1;
                    return Ok(Appended::Rejected);
                }
                _ => {
                    if !self.evict_for(1, size, event.class)? {
                        self.removed.rejected += 1;
                        return Ok(Appended::Rejected);
                    }
                }
            }
        }
        let pos = *self.next_pos + self.new_pos;
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO events (pos, seq, class, time_us, subject, topic, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(|e| StoreError::Sqlite { path: self.path.to_path_buf(), source: e })?;
        stmt.execute(params![
            pos as i64,
            seq as i64,
            event.class.as_i64(),
            micros(event.time),
            event.subject,
            event.upstream_topic,
            stored
        ])
        .map_err(|e| StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source: e,
        })?;
        drop(stmt);
        self.new_seq += 1;
        self.new_pos += 1;
        self.appended += 1;
        // This row holds the newest sequence now: whatever was removed before it in this
        // transaction no longer needs the high-water mark written (a commit that acknowledges
        // the previous newest row and appends after it writes no `meta` page).
        self.removed_newest = false;
        self.d_depth += 1;
        self.d_bytes += size as i64;
        if event.class == Class::Alert {
            self.d_alerts += 1;
        }
        Ok(Appended::Queued { seq, pos })
    }

    /// Evict oldest events until `events`/`bytes` more fit: telemetry first; alerts only when no
    /// telemetry is left and the newcomer is an alert. Frees a little extra (1/64 of the limit)
    /// so eviction runs once per batch, not once per event. Returns whether it fits now.
    fn evict_for(&mut self, events: u64, bytes: u64, incoming: Class) -> Result<bool, StoreError> {
        let slack_events = self.limits.max_events / 64;
        let slack_bytes = self.max_bytes / 64;
        for class in [Class::Telemetry, Class::Alert] {
            if class == Class::Alert && incoming == Class::Telemetry {
                break;
            }
            while self.over(events + slack_events, bytes + slack_bytes) {
                let chunk = self
                    .excess_rows(events + slack_events, bytes + slack_bytes)
                    .clamp(1, 256);
                let n = self.remove_oldest(class, chunk, None)?;
                if n == 0 {
                    break;
                }
                self.removed.evicted += n;
            }
        }
        Ok(!self.over(events, bytes))
    }

    /// About how many rows must go for `events`/`bytes` more to fit.
    fn excess_rows(&self, events: u64, bytes: u64) -> u64 {
        let depth = self.depth_now();
        let by_events = if self.limits.max_events > 0 {
            (depth + events).saturating_sub(self.limits.max_events)
        } else {
            0
        };
        let by_bytes = if self.max_bytes > 0 && depth > 0 {
            let avg = (self.bytes_now() / depth).max(1);
            (self.bytes_now() + bytes)
                .saturating_sub(self.max_bytes)
                .div_ceil(avg)
        } else {
            0
        };
        by_events.max(by_bytes)
    }

    /// Remove up to `limit` oldest events of `class` (older than `before_us` if given).
    fn remove_oldest(
        &mut self,
        class: Class,
        limit: u64,
        before_us: Option<i64>,
    ) -> Result<u64, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM events WHERE pos IN (SELECT pos FROM events WHERE class = ?1 AND time_us < ?3 ORDER BY pos LIMIT ?2)
                 RETURNING seq, LENGTH(body) + LENGTH(topic) + LENGTH(subject)",
            )
            .map_err(|e| StoreError::Sqlite { path: self.path.to_path_buf(), source: e })?;
        let rows = stmt
            .query_map(
                params![class.as_i64(), limit as i64, before_us.unwrap_or(i64::MAX)],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .map_err(|e| StoreError::Sqlite {
                path: self.path.to_path_buf(),
                source: e,
            })?;
        let newest = (*self.next_seq + self.new_seq).saturating_sub(1) as i64;
        let (mut n, mut bytes, mut newest_gone) = (0u64, 0u64, false);
        for row in rows {
            let (seq, len) = row.map_err(|e| StoreError::Sqlite {
                path: self.path.to_path_buf(),
                source: e,
            })?;
            n += 1;
            bytes += len as u64 + ROW_OVERHEAD;
            newest_gone |= seq == newest;
        }
        drop(stmt);
        self.d_depth -= n as i64;
        self.d_bytes -= bytes as i64;
        if class == Class::Alert {
            self.d_alerts -= n as i64;
        }
        self.removed_newest |= newest_gone;
        Ok(n)
    }

    /// Remove events older than `queue.max_age` (judged in queue order).
    pub fn expire(&mut self, now_us: i64) -> Result<(), StoreError> {
        let Some(max_age) = self.limits.max_age else {
            return Ok(());
        };
        let cutoff = now_us - max_age.as_micros() as i64;
        for class in [Class::Telemetry, Class::Alert] {
            loop {
                let n = self.remove_oldest(class, 1000, Some(cutoff))?;
                self.removed.expired += n;
                if n < 1000 {
                    break;
                }
            }
        }
        if !self.limits.keep_acked.is_zero() {
            let kept_cutoff = now_us - self.limits.keep_acked.as_micros() as i64;
            self.tx
                .execute(
                    "DELETE FROM acked WHERE acked_us < ?1",
                    params![kept_cutoff],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Remove acknowledged events (by queue position); with `keep_acked`, move them to the
    /// replay table. Unknown positions (already gone) are ignored.
    pub fn ack(&mut self, positions: &[u64], now_us: i64) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        // Acknowledgements come in runs of consecutive positions: one range statement per run
        // rather than one per event.
        let runs = runs(positions);
        let keep = !self.limits.keep_acked.is_zero();
        if keep {
            let mut copy = self
                .tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO acked (pos, seq, class, time_us, acked_us, subject, topic, body)
                     SELECT pos, seq, class, time_us, ?3, subject, topic, body FROM events WHERE pos BETWEEN ?1 AND ?2",
                )
                .map_err(|e| self.err(e))?;
            for &(a, b) in &runs {
                copy.execute(params![a as i64, b as i64, now_us])
                    .map_err(|e| self.err(e))?;
            }
        }
        self.delete_runs(&runs)
    }

    /// Delete the rows of `runs` (inclusive position ranges) from `events`, counted.
    pub(super) fn delete_runs(&mut self, runs: &[(u64, u64)]) -> Result<(), StoreError> {
        let newest = (*self.next_seq + self.new_seq).saturating_sub(1) as i64;
        let mut stmt = self
            .tx
            .prepare_cached("DELETE FROM events WHERE pos BETWEEN ?1 AND ?2 RETURNING seq, class, LENGTH(body) + LENGTH(topic) + LENGTH(subject)")
            .map_err(|e| self.err(e))?;
        let (mut depth, mut bytes, mut alerts, mut newest_gone) = (0i64, 0i64, 0i64, false);
        for &(a, b) in runs {
            let mut rows = stmt
                .query(params![a as i64, b as i64])
                .map_err(|e| self.err(e))?;
            while let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let (seq, class, len): (i64, i64, i64) = (
                    r.get(0).map_err(|e| self.err(e))?,
                    r.get(1).map_err(|e| self.err(e))?,
                    r.get(2).map_err(|e| self.err(e))?,
                );
                depth += 1;
                bytes += len + ROW_OVERHEAD as i64;
                alerts += (class == 0) as i64;
                newest_gone |= seq == newest;
            }
        }
        drop(stmt);
        self.d_depth -= depth;
        self.d_bytes -= bytes;
        self.d_alerts -= alerts;
        self.removed_newest |= newest_gone;
        Ok(())
    }
}

impl Store {
    pub fn begin(&mut self) -> Result<Txn<'_>, StoreError> {
        let tx = self
            .conn
            .transaction()
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })?;
        Ok(Txn {
            tx,
            path: &self.path,
            limits: &self.limits,
            max_bytes: match (self.limits.max_bytes, self.space_cap) {
                (0, cap) | (cap, 0) => cap,
                (a, b) => a.min(b),
            },
            next_seq: &mut self.next_seq,
            next_pos: &mut self.next_pos,
            depth: &mut self.depth,
            bytes: &mut self.bytes,
            alerts: &mut self.alerts,
            new_seq: 0,
            new_pos: 0,
            d_depth: 0,
            d_bytes: 0,
            d_alerts: 0,
            removed_newest: false,
            appended: 0,
            removed: Removed::default(),
        })
    }

    /// While its file system is short of `queue.min_free`, the queue grows no further: capped
    /// at its size when the shortage began (at least one byte: an empty queue then takes
    /// nothing new). The cap stays put while the shortage lasts (new events take the place of
    /// old ones in the pages they freed); `false` lifts it.
    ///
    /// The cap is never below the space the file already holds (an emptied queue reuses its
    /// free pages without growing the file) nor below [`SPACE_CAP_FLOOR`]: a queue that drains
    /// as fast as it fills keeps working on a nearly full disk, and only a backlog is bounded.
    pub fn cap_at_current_size(&mut self, cap: bool) {
        self.space_cap = match (cap, self.space_cap) {
            (false, _) => 0,
            (true, 0) => {
                let held = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
                self.bytes.max(held).max(SPACE_CAP_FLOOR)
            }
            (true, c) => c,
        };
    }

    /// Is the queue capped by the free space of its file system?
    pub fn space_capped(&self) -> bool {
        self.space_cap > 0
    }
}

impl Txn<'_> {
    /// Queue kept events again (same envelope: same id and sequence) at the end of the queue.
    pub fn requeue(&mut self, events: &[StoredEvent]) -> Result<u64, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO events (pos, seq, class, time_us, subject, topic, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(|e| StoreError::Sqlite { path: self.path.to_path_buf(), source: e })?;
        for e in events {
            let pos = *self.next_pos + self.new_pos;
            stmt.execute(params![
                pos as i64,
                e.seq as i64,
                e.class.as_i64(),
                e.time_us,
                e.subject,
                e.topic,
                e.body
            ])
            .map_err(|err| StoreError::Sqlite {
                path: self.path.to_path_buf(),
                source: err,
            })?;
            self.new_pos += 1;
            self.d_depth += 1;
            self.d_bytes += row_bytes(e.body.len(), e.topic.len(), e.subject.len()) as i64;
            if e.class == Class::Alert {
                self.d_alerts += 1;
            }
        }
        Ok(events.len() as u64)
    }

    /// Commit the group.
    pub fn commit(self) -> Result<Committed, StoreError> {
        let next = *self.next_seq + self.new_seq;
        if self.removed_newest {
            self.tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                    params![next as i64],
                )
                .map_err(|e| StoreError::Sqlite { path: self.path.to_path_buf(), source: e })?;
        }
        self.tx.commit().map_err(|source| StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        })?;
        *self.next_seq = next;
        *self.next_pos += self.new_pos;
        *self.depth = (*self.depth as i64 + self.d_depth).max(0) as u64;
        *self.bytes = (*self.bytes as i64 + self.d_bytes).max(0) as u64;
        *self.alerts = (*self.alerts as i64 + self.d_alerts).max(0) as u64;
        Ok(Committed {
            last_seq: next - 1,
            last_pos: *self.next_pos - 1,
            appended: self.appended,
            removed: self.removed,
        })
    }
}
