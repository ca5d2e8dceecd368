//! Reading the queue: leases for the forwarder's tail (alerts first), pages for an export,
//! and the stats.
//!
//! Invariants:
//! - Reads never change the file nor the counters.
//! - A lease returns events after the cursor only, alerts before telemetry, each class in
//!   queue-position order; a page-at-a-time walk ([`Store::each`]) holds at most [`PAGE`] rows
//!   in memory, however long the queue.

use rusqlite::params;

use super::{row_to_event, Cursor, Stats, Store, StoreError, StoredEvent};

/// How far a bounded read may go (see [`Store::lease_bounded`]).
struct Budget {
    want: usize,
    max_bytes: usize,
    bytes: usize,
    cut: bool,
}

/// Rows read per statement when paging through a table.
pub(super) const PAGE: usize = 1000;

const SELECT_EVENT: &str = "SELECT pos, seq, class, time_us, subject, topic, body FROM events";

impl Store {
    /// Up to `limit` events after `cursor`: alerts first, then telemetry, each in queue order.
    pub fn lease(&self, cursor: Cursor, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.lease_bounded(cursor, limit, limit, usize::MAX)?.0)
    }

    /// Like [`Store::lease`], but past the first `want` events only while their envelopes
    /// stay within `max_bytes` (a read ahead of what is needed must not hold large events in
    /// memory). The flag: the read stopped at that bound.
    pub fn lease_bounded(
        &self,
        cursor: Cursor,
        want: usize,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<StoredEvent>, bool), StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut budget = Budget {
            want,
            max_bytes,
            bytes: 0,
            cut: false,
        };
        let alerts = format!("{SELECT_EVENT} WHERE class = 0 AND pos > ?1 ORDER BY pos LIMIT ?2");
        let telemetry =
            format!("{SELECT_EVENT} WHERE pos > ?1 AND class = 1 ORDER BY pos LIMIT ?2");
        if self.alerts > 0 {
            self.select_bounded(
                &alerts,
                params![cursor.alert as i64, limit as i64],
                &mut out,
                &mut budget,
            )?;
        }
        if out.len() < limit && !budget.cut {
            let rest = limit - out.len();
            self.select_bounded(
                &telemetry,
                params![cursor.telemetry as i64, rest as i64],
                &mut out,
                &mut budget,
            )?;
        }
        Ok((out, budget.cut))
    }

    fn select_into(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        out: &mut Vec<StoredEvent>,
    ) -> Result<(), StoreError> {
        let mut unbounded = Budget {
            want: usize::MAX,
            max_bytes: usize::MAX,
            bytes: 0,
            cut: false,
        };
        self.select_bounded(sql, p, out, &mut unbounded)
    }

    fn select_bounded(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        out: &mut Vec<StoredEvent>,
        budget: &mut Budget,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(p, row_to_event).map_err(|e| self.err(e))?;
        for row in rows {
            if out.len() >= budget.want && budget.bytes >= budget.max_bytes {
                budget.cut = true;
                break;
            }
            let row = row.map_err(|e| self.err(e))?;
            budget.bytes = budget.bytes.saturating_add(row.body.len());
            out.push(row);
        }
        Ok(())
    }

    /// Oldest first, optionally only events whose subject matches `filter`; up to `limit`.
    pub fn peek(&self, limit: usize, filter: Option<&str>) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        self.each(filter, |e| {
            out.push(e);
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Every queued event matching `filter`, oldest first, handed to `f` one at a time (read a
    /// page at a time: constant memory), until `f` returns false.
    pub fn each(
        &self,
        filter: Option<&str>,
        mut f: impl FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = 0;
        loop {
            let page = self.page(after, PAGE)?;
            let full = page.len() == PAGE;
            for e in page {
                after = e.pos;
                if filter.is_none_or(|flt| crate::core::topic::matches(flt, &e.subject)) && !f(e) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Up to `limit` queued events after position `after`, in position order (one page of an
    /// export: constant memory however long the queue).
    pub fn page(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(PAGE));
        self.select_into(
            &format!("{SELECT_EVENT} WHERE pos > ?1 ORDER BY pos LIMIT ?2"),
            params![after as i64, limit as i64],
            &mut out,
        )?;
        Ok(out)
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let oldest: Option<i64> = self
            .conn
            .query_row(
                "SELECT MIN(t) FROM (SELECT time_us AS t FROM (SELECT time_us FROM events WHERE class = 1 ORDER BY pos LIMIT 1)
                 UNION ALL SELECT time_us FROM (SELECT time_us FROM events WHERE class = 0 ORDER BY pos LIMIT 1))",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        let kept: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM acked", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let parked: i64 = if self.has_parked {
            self.conn
                .query_row("SELECT COUNT(*) FROM parked", [], |r| r.get(0))
                .map_err(|e| self.err(e))?
        } else {
            0
        };
        Ok(Stats {
            depth: self.depth,
            bytes: self.bytes,
            alerts: self.alerts,
            oldest_us: oldest,
            next_sequence: self.next_seq,
            kept: kept as u64,
            parked: parked as u64,
        })
    }
}
