//! Parked events: those the upstream can never accept as they are, set aside so the events
//! behind them go on (see the store's module doc).
//!
//! Invariants:
//! - Parking moves rows from `events` to `parked` in the writer's transaction: they leave the
//!   depth and bytes, keep their envelope, and come back (same envelope) only by `queue retry`.
//! - At most [`PARKED_MAX`] events and [`PARKED_MAX_BYTES`] bytes stay parked: beyond, the
//!   oldest are deleted and counted as evicted.
//! - A file from before parking existed (opened by the CLI) reads as having none.

use rusqlite::params;

use super::read::PAGE;
use super::write::{runs, Txn};
use super::{delete_each, row_to_event, Store, StoreError, StoredEvent};

/// Most parked events kept: beyond, the oldest parked event is deleted (counted as evicted),
/// so a flood of events the upstream cannot take cannot fill the disk.
pub const PARKED_MAX: u64 = 10_000;
/// Most bytes (envelope and topics) of parked events kept, likewise.
pub const PARKED_MAX_BYTES: u64 = 64 << 20;

impl Store {
    /// Delete parked events matching `filter` (CLI `purge --parked`). Returns how many.
    pub fn purge_parked(&mut self, filter: Option<&str>) -> Result<u64, StoreError> {
        let mut doomed = Vec::new();
        self.each_parked(filter, |e, _| {
            doomed.push(e.pos as i64);
            true
        })?;
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        delete_each(&tx, "parked", &doomed).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(doomed.len() as u64)
    }

    /// Every parked event matching `filter` with its reason, oldest first, handed to `f` a page
    /// at a time (constant memory), until `f` returns false.
    pub fn each_parked(
        &self,
        filter: Option<&str>,
        mut f: impl FnMut(StoredEvent, String) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = 0;
        loop {
            let page = self.parked_page(after, PAGE)?;
            let full = page.len() == PAGE;
            for (e, reason) in page {
                after = e.pos;
                if filter.is_none_or(|flt| crate::core::topic::matches(flt, &e.subject))
                    && !f(e, reason)
                {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Like [`Store::page`], of the parked events, each with the reason it was set aside.
    pub fn parked_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(StoredEvent, String)>, StoreError> {
        if !self.has_parked {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT pos, seq, class, time_us, subject, topic, body, reason FROM parked WHERE pos > ?1 ORDER BY pos LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok((row_to_event(r)?, r.get::<_, String>(7)?))
            })
            .map_err(|e| self.err(e))?;
        rows.map(|r| r.map_err(|e| self.err(e))).collect()
    }
}

impl Txn<'_> {
    /// Set queued events aside (see the module doc): moved to `parked` with `reason`. Unknown
    /// positions are ignored. Returns how many were moved; parked events beyond [`PARKED_MAX`]
    /// (the oldest) are deleted and counted in `removed.evicted`.
    pub fn park(
        &mut self,
        positions: &[u64],
        reason: &str,
        now_us: i64,
    ) -> Result<u64, StoreError> {
        let runs = runs(positions);
        let mut moved = 0;
        {
            let mut copy = self
                .tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO parked (pos, seq, class, time_us, parked_us, reason, subject, topic, body)
                     SELECT pos, seq, class, time_us, ?3, ?4, subject, topic, body FROM events WHERE pos BETWEEN ?1 AND ?2",
                )
                .map_err(|e| self.err(e))?;
            for &(a, b) in &runs {
                moved += copy
                    .execute(params![a as i64, b as i64, now_us, reason])
                    .map_err(|e| self.err(e))? as u64;
            }
        }
        self.delete_runs(&runs)?;
        // Parked events are bounded too: beyond PARKED_MAX the oldest go (counted as evicted).
        let over = self
            .tx
            .execute(
                "DELETE FROM parked WHERE pos IN (SELECT pos FROM parked ORDER BY pos LIMIT MAX(0, (SELECT COUNT(*) FROM parked) - ?1))",
                params![PARKED_MAX as i64],
            )
            .map_err(|e| self.err(e))? as u64;
        // And by bytes (events up to the upstream's packet size could otherwise hold
        // PARKED_MAX times that outside `max_bytes`): the oldest beyond PARKED_MAX_BYTES go.
        let over_bytes = self
            .tx
            .execute(
                "DELETE FROM parked WHERE pos <= (SELECT pos FROM (SELECT pos, SUM(length(body) + length(topic) + length(subject)) OVER (ORDER BY pos DESC) AS newer FROM parked) WHERE newer > ?1 ORDER BY pos DESC LIMIT 1)",
                params![PARKED_MAX_BYTES as i64],
            )
            .map_err(|e| self.err(e))? as u64;
        self.removed.evicted += over + over_bytes;
        Ok(moved)
    }

    /// Queue parked events again (`queue retry`; same envelope), matching `filter`, at the end
    /// of the queue. Returns how many.
    pub fn unpark(&mut self, filter: Option<&str>) -> Result<u64, StoreError> {
        let mut events = Vec::new();
        {
            let mut stmt = self
                .tx
                .prepare_cached("SELECT pos, seq, class, time_us, subject, topic, body FROM parked ORDER BY pos")
                .map_err(|e| self.err(e))?;
            let rows = stmt.query_map([], row_to_event).map_err(|e| self.err(e))?;
            for r in rows {
                let e = r.map_err(|e| self.err(e))?;
                if filter.is_none_or(|f| crate::core::topic::matches(f, &e.subject)) {
                    events.push(e);
                }
            }
        }
        let doomed: Vec<i64> = events.iter().map(|e| e.pos as i64).collect();
        delete_each(&self.tx, "parked", &doomed).map_err(|e| self.err(e))?;
        self.requeue(&events)
    }
}
