//! The SQLite file behind the queue: schema, appends, acks, leases, stats.
//!
//! One row per event, `seq` as the rowid: commit order is `seq` order. The row keeps the frozen
//! CloudEvents envelope (`body`), so a resend is byte-for-byte the first send.
//!
//! Sequence invariant: `sequence` values are never reused, even after every row was acknowledged
//! and deleted. The next sequence is `max(max(seq) + 1, meta.next_seq)`, and `meta.next_seq` is
//! written whenever a transaction deletes the newest row, so the high-water mark always survives
//! in one of the two places. Appends alone never touch `meta` (one page less per commit).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::SyncMode;
use crate::event::{Class, Event};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("queue directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An event as stored: what the forwarder sends.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub class: Class,
    pub time_us: i64,
    pub subject: String,
    pub topic: String,
    pub body: Vec<u8>,
}

/// Where the forwarder has leased up to, per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub alert: u64,
    pub telemetry: u64,
}

impl Cursor {
    pub fn advance(&mut self, e: &StoredEvent) {
        match e.class {
            Class::Alert => self.alert = self.alert.max(e.seq),
            Class::Telemetry => self.telemetry = self.telemetry.max(e.seq),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub depth: u64,
    pub bytes: u64,
    pub alerts: u64,
    /// Receive time of the oldest queued event (µs since the epoch).
    pub oldest_us: Option<i64>,
    pub next_sequence: u64,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    next_seq: u64,
    depth: u64,
    bytes: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY,
    class   INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    subject TEXT NOT NULL,
    topic   TEXT NOT NULL,
    body    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_alerts ON events(seq) WHERE class = 0;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open (creating if needed) the queue at `path` for writing.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // auto_vacuum must be chosen before the first table exists; INCREMENTAL lets us hand
        // freed pages back to the file system as rows are acknowledged.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        let sync_mode = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync_mode)
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            next_seq: 1,
            depth: 0,
            bytes: 0,
        };
        store.load_counters()?;
        Ok(store)
    }

    /// Open an existing queue read-only (CLI, while the daemon may be running).
    pub fn open_readonly(path: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            next_seq: 1,
            depth: 0,
            bytes: 0,
        };
        store.load_counters()?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn load_counters(&mut self) -> Result<(), StoreError> {
        let (depth, bytes, max_seq): (i64, i64, Option<i64>) = self
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), MAX(seq) FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| self.err(e))?;
        let meta_next: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        self.depth = depth as u64;
        self.bytes = bytes as u64;
        self.next_seq = (max_seq.unwrap_or(0) + 1).max(meta_next.unwrap_or(1)) as u64;
        Ok(())
    }

    pub fn begin(&mut self) -> Result<Txn<'_>, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
        Ok(Txn {
            tx,
            path,
            next_seq: &mut self.next_seq,
            depth: &mut self.depth,
            bytes: &mut self.bytes,
            pending_depth: 0,
            pending_bytes: 0,
            start_seq: 0,
            deleted_newest: false,
        })
    }

    /// Up to `limit` events after `cursor`: alerts first, then telemetry, each in seq order.
    pub fn lease(&self, cursor: Cursor, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        self.select_into(
            "SELECT seq, class, time_us, subject, topic, body FROM events WHERE class = 0 AND seq > ?1 ORDER BY seq LIMIT ?2",
            cursor.alert,
            limit,
            &mut out,
        )?;
        if out.len() < limit {
            let rest = limit - out.len();
            self.select_into(
                "SELECT seq, class, time_us, subject, topic, body FROM events WHERE seq > ?1 AND class = 1 ORDER BY seq LIMIT ?2",
                cursor.telemetry,
                rest,
                &mut out,
            )?;
        }
        Ok(out)
    }

    fn select_into(
        &self,
        sql: &str,
        after: u64,
        limit: usize,
        out: &mut Vec<StoredEvent>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok(StoredEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    class: Class::from_i64(r.get(1)?),
                    time_us: r.get(2)?,
                    subject: r.get(3)?,
                    topic: r.get(4)?,
                    body: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            out.push(row.map_err(|e| self.err(e))?);
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let (oldest, alerts): (Option<i64>, i64) = self
            .conn
            .query_row(
                "SELECT MIN(time_us), (SELECT COUNT(*) FROM events WHERE class = 0) FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        Ok(Stats {
            depth: self.depth,
            bytes: self.bytes,
            alerts: alerts as u64,
            oldest_us: oldest,
            next_sequence: self.next_seq,
        })
    }

    pub fn depth(&self) -> u64 {
        self.depth
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Give up to `pages` free pages back to the file system.
    pub fn reclaim(&mut self, pages: u32) -> Result<(), StoreError> {
        self.conn
            .execute_batch(&format!("PRAGMA incremental_vacuum({pages});"))
            .map_err(|e| self.err(e))
    }

    /// Move the WAL content into the main file (at shutdown and when idle).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }
}

/// One commit group. Counters change only if it commits.
pub struct Txn<'a> {
    tx: rusqlite::Transaction<'a>,
    path: PathBuf,
    next_seq: &'a mut u64,
    depth: &'a mut u64,
    bytes: &'a mut u64,
    pending_depth: i64,
    pending_bytes: i64,
    start_seq: u64,
    deleted_newest: bool,
}

impl Txn<'_> {
    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn seq_at(&self) -> u64 {
        *self.next_seq + self.start_seq
    }

    /// Append `event` with the next sequence, as the envelope from `source`. Returns the sequence.
    pub fn append(&mut self, event: &Event, source: &str) -> Result<u64, StoreError> {
        let seq = self.seq_at();
        let body = event.envelope(source, seq);
        let mut stmt = self
            .tx
            .prepare_cached("INSERT INTO events (seq, class, time_us, subject, topic, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(|e| self.err(e))?;
        stmt.execute(params![
            seq as i64,
            event.class.as_i64(),
            micros(event.time),
            event.subject,
            event.upstream_topic,
            body
        ])
        .map_err(|e| self.err(e))?;
        drop(stmt);
        self.start_seq += 1;
        self.pending_depth += 1;
        self.pending_bytes += body.len() as i64;
        Ok(seq)
    }

    /// Delete acknowledged events. Unknown sequences (already deleted) are ignored.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<(), StoreError> {
        let newest = self.seq_at().saturating_sub(1);
        let mut stmt = self
            .tx
            .prepare_cached("DELETE FROM events WHERE seq = ?1 RETURNING LENGTH(body)")
            .map_err(|e| self.err(e))?;
        let mut depth = 0i64;
        let mut bytes = 0i64;
        let mut newest_deleted = false;
        for &seq in seqs {
            let len: Option<i64> = stmt
                .query_row(params![seq as i64], |r| r.get(0))
                .optional()
                .map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
            if let Some(len) = len {
                depth += 1;
                bytes += len;
                newest_deleted |= seq == newest;
            }
        }
        drop(stmt);
        self.pending_depth -= depth;
        self.pending_bytes -= bytes;
        self.deleted_newest |= newest_deleted;
        Ok(())
    }

    /// Commit; returns the last sequence assigned so far.
    pub fn commit(self) -> Result<u64, StoreError> {
        let next = self.seq_at();
        if self.deleted_newest {
            self.tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![next as i64],
                )
                .map_err(|e| StoreError::Sqlite { path: self.path.clone(), source: e })?;
        }
        let path = self.path.clone();
        self.tx
            .commit()
            .map_err(|source| StoreError::Sqlite { path, source })?;
        *self.next_seq = next;
        *self.depth = (*self.depth as i64 + self.pending_depth).max(0) as u64;
        *self.bytes = (*self.bytes as i64 + self.pending_bytes).max(0) as u64;
        Ok(next - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Data, TYPE_READING};
    use bytes::Bytes;

    fn ev(class: Class, subject: &str) -> Event {
        Event {
            id: crate::event::new_id(),
            class,
            kind: TYPE_READING,
            subject: subject.into(),
            upstream_topic: format!("edge/gw/{subject}"),
            time: SystemTime::now(),
            data: Data::Json(Bytes::from_static(b"1")),
            traceparent: None,
        }
    }

    #[test]
    fn sequence_survives_reopen_even_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let mut s = Store::open(&path, SyncMode::Normal).unwrap();
            let mut t = s.begin().unwrap();
            for _ in 0..3 {
                t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            }
            assert_eq!(t.commit().unwrap(), 3);
            let mut t = s.begin().unwrap();
            t.ack(&[3]).unwrap();
            t.commit().unwrap();
            let mut t = s.begin().unwrap();
            t.ack(&[1, 2]).unwrap();
            t.commit().unwrap();
            assert_eq!(s.depth(), 0);
        }
        let mut s = Store::open(&path, SyncMode::Normal).unwrap();
        assert_eq!(s.next_seq(), 4);
        let mut t = s.begin().unwrap();
        assert_eq!(t.append(&ev(Class::Telemetry, "a"), "src").unwrap(), 4);
        t.commit().unwrap();
    }

    #[test]
    fn uncommitted_work_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("q.db"), SyncMode::Full).unwrap();
        {
            let mut t = s.begin().unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            // dropped without commit: rolled back
        }
        assert_eq!(s.depth(), 0);
        assert_eq!(s.next_seq(), 1);
        assert!(s.lease(Cursor::default(), 10).unwrap().is_empty());
    }

    #[test]
    fn lease_gives_alerts_first_then_telemetry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("q.db"), SyncMode::Normal).unwrap();
        let mut t = s.begin().unwrap();
        t.append(&ev(Class::Telemetry, "t1"), "src").unwrap();
        t.append(&ev(Class::Alert, "a1"), "src").unwrap();
        t.append(&ev(Class::Telemetry, "t2"), "src").unwrap();
        t.append(&ev(Class::Alert, "a2"), "src").unwrap();
        t.commit().unwrap();
        let got: Vec<String> = s
            .lease(Cursor::default(), 10)
            .unwrap()
            .into_iter()
            .map(|e| e.subject)
            .collect();
        assert_eq!(got, ["a1", "a2", "t1", "t2"]);
        let mut c = Cursor::default();
        for e in s.lease(c, 3).unwrap() {
            c.advance(&e);
        }
        let rest: Vec<String> = s
            .lease(c, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.subject)
            .collect();
        assert_eq!(rest, ["t2"]);
        let st = s.stats().unwrap();
        assert_eq!((st.depth, st.alerts), (4, 2));
        assert!(st.bytes > 0);
    }
}
