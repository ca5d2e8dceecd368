//! What the CLI does to the queue: open it beside a running daemon, purge, and hand work
//! (replay, retry) to the daemon through the `requests` table, or do it itself.
//!
//! Invariants:
//! - Only the daemon's writer inserts into `events` while the daemon runs: the CLI asks for a
//!   replay or retry through `requests`, and [`Store::apply`] is the one implementation of
//!   both, used by the writer and by the CLI when no daemon runs.
//! - The CLI opens the file for writing only while holding the data-dir lock (taken by
//!   `cli::lock_queue`), so adding a missing table cannot race a daemon.
//! - A purge that removes the newest sequence records the high-water mark first.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::schema::SCHEMA;
use super::{delete_each, row_to_event, Committed, Limits, Store, StoreError, StoredEvent};

/// Work on the queue the CLI asks for (carried out by [`Store::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Queue acknowledged events kept by `queue.keep_acked` again (same envelopes).
    Replay {
        since_us: i64,
        filter: Option<String>,
    },
    /// Queue parked events again.
    Retry { filter: Option<String> },
}

impl Store {
    /// Open an existing queue for the CLI (read-only unless `write`), while the daemon may be
    /// running.
    pub fn open_cli(path: &Path, write: bool) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let flags = if write {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(path, flags).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        if write {
            // A file from before a table existed (`parked`): writes hold the data-dir lock, so
            // adding what is missing cannot race a daemon.
            conn.execute_batch(SCHEMA).map_err(err)?;
        }
        let has_parked = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'parked'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)?
            > 0;
        Store::from_file(conn, path, Limits::default(), has_parked)
    }

    /// Delete queued events older than `before_us` whose subject matches `filter` (CLI purge).
    /// Returns how many.
    pub fn purge(
        &mut self,
        before_us: Option<i64>,
        filter: Option<&str>,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        let mut doomed = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT pos, subject FROM events WHERE time_us < ?1 ORDER BY pos")
                .map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
            let rows = stmt
                .query_map(params![before_us.unwrap_or(i64::MAX)], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
            for row in rows {
                let (pos, subject) = row.map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
                if filter.is_none_or(|f| crate::core::topic::matches(f, &subject)) {
                    doomed.push(pos);
                }
            }
        }
        delete_each(&tx, "events", &doomed).map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        // The newest sequence may have gone with them: record the high-water mark.
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('next_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
            params![self.next_seq as i64],
        )
        .map_err(|e| StoreError::Sqlite { path: self.path.clone(), source: e })?;
        tx.commit().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        self.load_counters()?;
        Ok(doomed.len() as u64)
    }

    /// Ask the running daemon to do `req` (it picks the request up within a second).
    pub fn request(&mut self, req: &Request) -> Result<(), StoreError> {
        let (kind, since_us, filter) = match req {
            Request::Replay { since_us, filter } => ("replay", *since_us, filter),
            Request::Retry { filter } => ("retry", 0, filter),
        };
        self.conn
            .execute(
                "INSERT INTO requests (kind, since_us, filter) VALUES (?1, ?2, ?3)",
                params![kind, since_us, filter],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Pending CLI requests, removed from the table.
    pub fn take_requests(&mut self) -> Result<Vec<Request>, StoreError> {
        let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        let err = |e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        };
        let mut out = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT kind, since_us, filter FROM requests ORDER BY id")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (kind, since_us, filter) = row.map_err(err)?;
                match kind.as_str() {
                    "replay" => out.push(Request::Replay { since_us, filter }),
                    "retry" => out.push(Request::Retry { filter }),
                    other => tracing::warn!(kind = other, "queue: unknown request ignored"),
                }
            }
        }
        let seen: i64 = tx
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .map_err(err)?;
        if seen > 0 {
            tx.execute("DELETE FROM requests", []).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Carry out `req` in one transaction: the one implementation, used by the daemon's writer
    /// (for a CLI request) and by the CLI itself when no daemon runs (holding the data-dir
    /// lock). Returns how many events were queued again.
    pub fn apply(&mut self, req: &Request) -> Result<(u64, Committed), StoreError> {
        let kept = match req {
            Request::Replay { since_us, filter } => {
                self.kept_since(*since_us, filter.as_deref())?
            }
            Request::Retry { .. } => Vec::new(),
        };
        let mut txn = self.begin()?;
        let n = match req {
            Request::Replay { .. } => txn.requeue(&kept)?,
            Request::Retry { filter } => txn.unpark(filter.as_deref())?,
        };
        txn.commit().map(|c| (n, c))
    }

    /// Kept (acknowledged) events received since `since_us`, matching `filter`, oldest first.
    pub fn kept_since(
        &self,
        since_us: i64,
        filter: Option<&str>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT pos, seq, class, time_us, subject, topic, body FROM acked WHERE time_us >= ?1 ORDER BY pos")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since_us], row_to_event)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let e = row.map_err(|e| self.err(e))?;
            if filter.is_none_or(|f| crate::core::topic::matches(f, &e.subject)) {
                out.push(e);
            }
        }
        Ok(out)
    }
}
