//! The SQLite file behind the queue: schema, appends, acks, leases, limits, stats.
//!
//! Tables:
//! - `events`: one row per queued event. `pos` is the queue position (commit order, what the
//!   forwarder leases and acknowledges by); `seq` is the event's CloudEvents `sequence`; `body`
//!   is the frozen envelope, so a resend is byte-for-byte the first send.
//! - `acked`: with `queue.keep_acked`, acknowledged rows are moved here for replay.
//! - `parked`: events the upstream can never accept as they are (a wildcard or empty topic, too
//!   large for `upstream.max_packet_size`, refused for good by the broker), set aside by the
//!   forwarder so the events behind them go on, with the reason. They are not counted in the
//!   depth; `queue retry` queues them again (same envelope), `queue purge --parked` deletes them.
//! - `meta`: the sequence high-water mark.
//! - `requests`: work asked for by the CLI while the daemon runs (replay).
//!
//! Invariants:
//! - Sequences are never reused, even after every row was acknowledged: the next sequence is
//!   `max(max(seq) + 1, meta.next_seq)`, and `meta.next_seq` is written by any transaction that
//!   removes the row holding the newest sequence and appends none after it. Appends alone
//!   never touch `meta`.
//! - Positions only grow while the store is open; only this process inserts into `events`
//!   (the CLI asks the daemon to replay through `requests`).
//! - Counters (depth, bytes) change only when a transaction commits.
//! - Limits (`max_events`, `max_bytes`) hold after every commit: telemetry is evicted (or, with
//!   `drop_newest`, rejected) before any alert is.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::{QueueFull, SyncMode};
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

impl StoreError {
    /// Is this the database reporting a damaged file?
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
                if matches!(e.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    }

    /// Is this the disk being full?
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. } if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

/// An event as stored: what the forwarder sends.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub pos: u64,
    pub seq: u64,
    pub class: Class,
    pub time_us: i64,
    pub subject: String,
    pub topic: String,
    pub body: Vec<u8>,
}

/// Where the forwarder has leased up to, per class (queue positions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub alert: u64,
    pub telemetry: u64,
}

impl Cursor {
    pub fn advance(&mut self, e: &StoredEvent) {
        match e.class {
            Class::Alert => self.alert = self.alert.max(e.pos),
            Class::Telemetry => self.telemetry = self.telemetry.max(e.pos),
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
    /// Acknowledged events kept for replay.
    pub kept: u64,
    /// Events set aside (see the module doc).
    pub parked: u64,
}

/// Bounds on what the queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// 0: unbounded.
    pub max_events: u64,
    /// Accounted bytes (see [`row_bytes`]); 0: unbounded.
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub when_full: QueueFull,
    /// Keep acknowledged events this long for replay (zero: delete at once).
    pub keep_acked: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events: 0,
            max_bytes: 0,
            max_age: None,
            when_full: QueueFull::DropOldest,
            keep_acked: Duration::ZERO,
        }
    }
}

/// Bytes an event is accounted for: its envelope and topics plus a fixed row overhead (the
/// other columns, the b-tree cell and page slack measured on a filled file).
pub fn row_bytes(body: usize, topic: usize, subject: usize) -> u64 {
    (body + topic + subject) as u64 + ROW_OVERHEAD
}

const ROW_OVERHEAD: u64 = 40;

/// Page size of a new queue file (see `Store::open_checked`).
const PAGE_SIZE: u32 = 512;

/// The WAL is checkpointed once it holds this much.
const WAL_CHECKPOINT_BYTES: i64 = 1 << 20;

/// What the WAL may take: the autocheckpoint threshold ([`WAL_CHECKPOINT_BYTES`]) plus a commit
/// group written before the checkpoint runs (1024 events of a few hundred bytes and their
/// index pages). The space check keeps this much free beside `queue.min_free`.
pub const WAL_LIMIT: u64 = 2 << 20;

/// Events removed other than by an acknowledgement, by reason, in one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub evicted: u64,
    pub rejected: u64,
    pub expired: u64,
}

impl Removed {
    pub fn add(&mut self, o: Removed) {
        self.evicted += o.evicted;
        self.rejected += o.rejected;
        self.expired += o.expired;
    }
}

/// Result of a committed transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Committed {
    /// Last sequence assigned so far.
    pub last_seq: u64,
    /// Last queue position assigned so far.
    pub last_pos: u64,
    pub appended: u64,
    pub removed: Removed,
}

/// While the file system is short of `queue.min_free`, the queue may still hold this much
/// (accounted bytes): live traffic goes on through a small queue, only a backlog is bounded.
pub const SPACE_CAP_FLOOR: u64 = 1 << 20;

pub struct Store {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    next_seq: u64,
    next_pos: u64,
    depth: u64,
    bytes: u64,
    alerts: u64,
    data_version: i64,
    /// While the file system is short of `queue.min_free`: the accounted bytes the queue may
    /// not grow past (0: no such cap).
    space_cap: u64,
    /// The file has the `parked` table (a queue written only by an older version, opened by
    /// the CLI, has not).
    has_parked: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    pos     INTEGER PRIMARY KEY,
    seq     INTEGER NOT NULL,
    class   INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    subject TEXT NOT NULL,
    topic   TEXT NOT NULL,
    body    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_alerts ON events(pos) WHERE class = 0;
CREATE TABLE IF NOT EXISTS acked (
    pos      INTEGER PRIMARY KEY,
    seq      INTEGER NOT NULL,
    class    INTEGER NOT NULL,
    time_us  INTEGER NOT NULL,
    acked_us INTEGER NOT NULL,
    subject  TEXT NOT NULL,
    topic    TEXT NOT NULL,
    body     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    pos       INTEGER PRIMARY KEY,
    seq       INTEGER NOT NULL,
    class     INTEGER NOT NULL,
    time_us   INTEGER NOT NULL,
    parked_us INTEGER NOT NULL,
    reason    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    topic     TEXT NOT NULL,
    body      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, since_us INTEGER NOT NULL, filter TEXT);
";

/// Most parked events kept: beyond, the oldest parked event is deleted (counted as evicted),
/// so a flood of events the upstream cannot take cannot fill the disk.
pub const PARKED_MAX: u64 = 10_000;
/// Most bytes (envelope and topics) of parked events kept, likewise.
pub const PARKED_MAX_BYTES: u64 = 64 << 20;

/// Rows read per statement when paging through a table.
const PAGE: usize = 1000;

const SELECT_EVENT: &str = "SELECT pos, seq, class, time_us, subject, topic, body FROM events";

pub fn now_us() -> i64 {
    micros(SystemTime::now())
}

pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        pos: r.get::<_, i64>(0)? as u64,
        seq: r.get::<_, i64>(1)? as u64,
        class: Class::from_i64(r.get(2)?),
        time_us: r.get(3)?,
        subject: r.get(4)?,
        topic: r.get(5)?,
        body: r.get(6)?,
    })
}

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

/// What happened when the queue file was opened.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// A damaged file was moved here and a fresh queue created.
    pub quarantined: Option<PathBuf>,
    pub problem: Option<String>,
}

impl Store {
    /// Open (creating if needed) the queue at `path` for writing. A file that fails the
    /// integrity check is moved aside (never deleted) and a fresh queue is created; sequence
    /// numbering continues after what could be read from the damaged file.
    pub fn open(
        path: &Path,
        sync: SyncMode,
        limits: Limits,
    ) -> Result<(Store, OpenReport), StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        match Self::open_checked(path, sync, limits) {
            Ok(s) => Ok((s, OpenReport::default())),
            Err(e) if e.is_corruption() || integrity_failed(&e) => {
                let high_water = salvage_next_seq(path);
                let aside = quarantine(path)?;
                let mut s = Self::open_checked(path, sync, limits)?;
                if let Some(n) = high_water {
                    s.set_next_seq(n)?;
                }
                Ok((
                    s,
                    OpenReport {
                        quarantined: Some(aside),
                        problem: Some(e.to_string()),
                    },
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn open_checked(path: &Path, sync: SyncMode, limits: Limits) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // auto_vacuum must be chosen before the first table exists; INCREMENTAL lets us hand
        // freed pages back to the file system as rows are acknowledged.
        // Both take effect only on a new file (a queue created by an older version keeps its
        // 1 KiB pages). The smallest pages: a commit writes each page it touches to the WAL
        // whole, and an event of a few hundred bytes fills a 512-byte page alone, so a commit
        // group writes its events plus three pages (the file header, the pointer map and the
        // table's root), not a half-empty last page on top. Measured with a healthy link and a
        // 50 ms commit delay: 1,158 instead of 1,503 bytes written per event at 100 events/s
        // (4 KiB pages wrote 6.7 KB per event at 1,000 events/s, one commit per event).
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL;"
        ))
        .map_err(err)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(err)?;
        if check != "ok" {
            return Err(StoreError::Sqlite {
                path: path.to_path_buf(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(format!("integrity check failed: {check}")),
                ),
            });
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        let sync_mode = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync_mode)
            .map_err(err)?;
        // Keep the WAL from growing past ~1 MiB between checkpoints, whatever the file's page
        // size (measured: 4 MiB wrote 35 % more per event at 1,000 events/s).
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(err)?;
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            WAL_CHECKPOINT_BYTES / page_size.max(512),
        )
        .map_err(err)?;
        // After a checkpoint, cut a WAL that one large transaction grew back to that size, so
        // it does not keep holding the space (queue::space counts on it).
        conn.pragma_update(None, "journal_size_limit", WAL_LIMIT as i64)
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            limits,
            next_seq: 1,
            next_pos: 1,
            depth: 0,
            bytes: 0,
            alerts: 0,
            data_version: 0,
            space_cap: 0,
            has_parked: true,
        };
        store.load_counters()?;
        Ok(store)
    }

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
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            limits: Limits::default(),
            next_seq: 1,
            next_pos: 1,
            depth: 0,
            bytes: 0,
            alerts: 0,
            data_version: 0,
            space_cap: 0,
            has_parked,
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

    /// (Re)compute the counters from the file.
    pub fn load_counters(&mut self) -> Result<(), StoreError> {
        let q = "SELECT COUNT(*), COALESCE(SUM(LENGTH(body) + LENGTH(topic) + LENGTH(subject)), 0), MAX(seq), MAX(pos),
                        COALESCE(SUM(class = 0), 0) FROM events";
        let (depth, bytes, max_seq, max_pos, alerts): (i64, i64, Option<i64>, Option<i64>, i64) =
            self.conn
                .query_row(q, [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .map_err(|e| self.err(e))?;
        let max_pos_of = |table: &str| {
            self.conn
                .query_row(&format!("SELECT MAX(pos) FROM {table}"), [], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .map_err(|e| self.err(e))
        };
        let max_acked = max_pos_of("acked")?.max(if self.has_parked {
            max_pos_of("parked")?
        } else {
            None
        });
        let meta_next: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        self.depth = depth as u64;
        self.bytes = bytes as u64 + depth as u64 * ROW_OVERHEAD;
        self.alerts = alerts as u64;
        self.next_seq = self
            .next_seq
            .max((max_seq.unwrap_or(0) + 1).max(meta_next.unwrap_or(1)) as u64);
        self.next_pos = self
            .next_pos
            .max((max_pos.unwrap_or(0).max(max_acked.unwrap_or(0)) + 1) as u64);
        self.data_version = self.data_version()?;
        Ok(())
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Has another connection (the CLI) changed the file since we last looked? If so, reload
    /// the counters.
    pub fn external_change(&mut self) -> Result<bool, StoreError> {
        let v = self.data_version()?;
        if v == self.data_version {
            return Ok(false);
        }
        self.load_counters()?;
        Ok(true)
    }

    /// Go on numbering after another file (one replaced while running): positions and
    /// sequences never go below `next_pos`/`next_seq`.
    pub fn continue_after(&mut self, next_seq: u64, next_pos: u64) -> Result<(), StoreError> {
        self.next_pos = self.next_pos.max(next_pos);
        if next_seq > self.next_seq {
            self.set_next_seq(next_seq)?;
        }
        Ok(())
    }

    fn set_next_seq(&mut self, next: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('next_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![next as i64],
            )
            .map_err(|e| self.err(e))?;
        self.next_seq = self.next_seq.max(next);
        Ok(())
    }

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

    /// Up to `limit` events after `cursor`: alerts first, then telemetry, each in queue order.
    pub fn lease(&self, cursor: Cursor, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        let alerts = format!("{SELECT_EVENT} WHERE class = 0 AND pos > ?1 ORDER BY pos LIMIT ?2");
        let telemetry =
            format!("{SELECT_EVENT} WHERE pos > ?1 AND class = 1 ORDER BY pos LIMIT ?2");
        if self.alerts > 0 {
            self.select_into(
                &alerts,
                params![cursor.alert as i64, limit as i64],
                &mut out,
            )?;
        }
        if out.len() < limit {
            let rest = limit - out.len();
            self.select_into(
                &telemetry,
                params![cursor.telemetry as i64, rest as i64],
                &mut out,
            )?;
        }
        Ok(out)
    }

    fn select_into(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        out: &mut Vec<StoredEvent>,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(p, row_to_event).map_err(|e| self.err(e))?;
        for row in rows {
            out.push(row.map_err(|e| self.err(e))?);
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
                if filter.is_none_or(|flt| crate::rules::topic::matches(flt, &e.subject)) && !f(e) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
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
                if filter.is_none_or(|f| crate::rules::topic::matches(f, &subject)) {
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
                if filter.is_none_or(|flt| crate::rules::topic::matches(flt, &e.subject))
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
            if filter.is_none_or(|f| crate::rules::topic::matches(f, &e.subject)) {
                out.push(e);
            }
        }
        Ok(out)
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

    pub fn depth(&self) -> u64 {
        self.depth
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The position the next append will get.
    pub fn next_pos(&self) -> u64 {
        self.next_pos
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn limits(&self) -> Limits {
        self.limits
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

    /// Size of the WAL file now (0 when there is none).
    pub fn wal_len(&self) -> u64 {
        std::fs::metadata(format!("{}-wal", self.path.display()))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Is the queue capped by the free space of its file system?
    pub fn space_capped(&self) -> bool {
        self.space_cap > 0
    }

    /// Give up to `pages` free pages back to the file system.
    pub fn reclaim(&mut self, pages: u32) -> Result<(), StoreError> {
        self.conn
            .execute_batch(&format!("PRAGMA incremental_vacuum({pages});"))
            .map_err(|e| self.err(e))
    }

    /// Free pages in the file (reclaimable).
    pub fn free_pages(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Move the WAL content into the main file (at shutdown and when idle).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }
}

/// Delete the rows of `table` at `positions`, one statement each.
fn delete_each(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    positions: &[i64],
) -> rusqlite::Result<()> {
    let mut del = tx.prepare(&format!("DELETE FROM {table} WHERE pos = ?1"))?;
    for p in positions {
        del.execute(params![p])?;
    }
    Ok(())
}

fn integrity_failed(e: &StoreError) -> bool {
    e.to_string().contains("integrity check failed")
}

/// Best effort: the sequence high-water mark of a damaged file, so numbering goes on after it.
fn salvage_next_seq(path: &Path) -> Option<u64> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let max: Option<i64> = conn
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .ok()
        .flatten();
    let meta: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })
        .ok();
    let next = (max.unwrap_or(0) + 1).max(meta.unwrap_or(1));
    (next > 1).then_some(next as u64)
}

/// Move `path` (and its WAL and shared-memory files) aside as `path.corrupt-<unix time>`.
fn quarantine(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let dir_err = |source| StoreError::Dir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &aside).map_err(dir_err)?;
    for suffix in ["-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            std::fs::rename(&from, &to).map_err(dir_err)?;
        }
    }
    Ok(aside)
}

/// One commit group. Counters change only if it commits.
///
/// Within a group, removals (acknowledgements) go before appends: the pages the removed rows
/// freed are filled again in the same transaction, so each is written to the WAL once, not
/// once freed and again when reused by the next group (measured: half the bytes written per
/// event with a healthy link, see the README's benchmark section).
pub struct Txn<'a> {
    tx: rusqlite::Transaction<'a>,
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
    removed: Removed,
}

/// Runs of consecutive positions, as inclusive ranges (the input in any order, duplicates
/// allowed).
fn runs(positions: &[u64]) -> Vec<(u64, u64)> {
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
    /// Written (visible once the transaction commits); `body` is the frozen envelope.
    Queued { seq: u64, pos: u64, body: Vec<u8> },
    /// The queue is full and `when_full = "drop_newest"`.
    Rejected,
}

impl Txn<'_> {
    fn err(&self, source: rusqlite::Error) -> StoreError {
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
        let body = event.envelope(source, seq);
        let size = row_bytes(body.len(), event.upstream_topic.len(), event.subject.len());
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
            body
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
        Ok(Appended::Queued { seq, pos, body })
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
    fn delete_runs(&mut self, runs: &[(u64, u64)]) -> Result<(), StoreError> {
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
                if filter.is_none_or(|f| crate::rules::topic::matches(f, &e.subject)) {
                    events.push(e);
                }
            }
        }
        let doomed: Vec<i64> = events.iter().map(|e| e.pos as i64).collect();
        delete_each(&self.tx, "parked", &doomed).map_err(|e| self.err(e))?;
        self.requeue(&events)
    }

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Data, TYPE_READING};
    use bytes::Bytes;

    #[test]
    fn acknowledgements_group_into_runs() {
        assert_eq!(runs(&[5, 3, 4, 9, 1, 4]), vec![(1, 1), (3, 5), (9, 9)]);
        assert!(runs(&[]).is_empty());
    }

    pub(crate) fn ev(class: Class, subject: &str) -> Event {
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

    fn open(dir: &Path, limits: Limits) -> Store {
        Store::open(&dir.join("q.db"), SyncMode::Normal, limits)
            .unwrap()
            .0
    }

    fn subjects(s: &Store) -> Vec<String> {
        s.lease(Cursor::default(), 1000)
            .unwrap()
            .into_iter()
            .map(|e| e.subject)
            .collect()
    }

    #[test]
    fn sequence_survives_reopen_even_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), Limits::default());
            let mut t = s.begin().unwrap();
            for _ in 0..3 {
                t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            }
            assert_eq!(t.commit().unwrap().last_seq, 3);
            let mut t = s.begin().unwrap();
            t.ack(&[3], 0).unwrap();
            t.commit().unwrap();
            let mut t = s.begin().unwrap();
            t.ack(&[1, 2], 0).unwrap();
            t.commit().unwrap();
            assert_eq!(s.depth(), 0);
        }
        let mut s = open(dir.path(), Limits::default());
        assert_eq!(s.next_seq(), 4);
        let mut t = s.begin().unwrap();
        assert!(matches!(
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap(),
            Appended::Queued { seq: 4, .. }
        ));
        t.commit().unwrap();
    }

    fn meta_next_seq(s: &Store) -> Option<i64> {
        s.conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap()
    }

    /// The writer acknowledges before it appends (one group): removing the newest row there
    /// needs no high-water mark, the appended rows carry the sequence on. Removing the newest
    /// row after the last append still records it.
    #[test]
    fn high_water_mark_written_only_when_no_append_follows_the_newest_removal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), Limits::default());
            let mut t = s.begin().unwrap();
            for _ in 0..3 {
                t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            }
            t.commit().unwrap();
            // Acks of the whole queue, the newest included, then an append: no `meta` write.
            let mut t = s.begin().unwrap();
            t.ack(&[1, 2, 3], 0).unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            assert_eq!(t.commit().unwrap().last_seq, 4);
            assert_eq!(meta_next_seq(&s), None);
            // An append, then its own removal in the same transaction: recorded.
            let mut t = s.begin().unwrap();
            t.ack(&[4], 0).unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            t.ack(&[5], 0).unwrap();
            t.commit().unwrap();
            assert_eq!(s.depth(), 0);
            assert_eq!(meta_next_seq(&s), Some(6));
        }
        let mut s = open(dir.path(), Limits::default());
        assert_eq!(s.next_seq(), 6, "sequences are never reused");
        let mut t = s.begin().unwrap();
        assert!(matches!(
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap(),
            Appended::Queued { seq: 6, .. }
        ));
        t.commit().unwrap();
    }

    /// An append that evicts the newest row to make room and is then rejected anyway (larger
    /// than the whole budget): the newest sequence left with the evicted row, so the
    /// high-water mark is recorded and the sequence is not handed out again.
    #[test]
    fn high_water_mark_written_when_an_eviction_takes_the_newest_and_the_append_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = ev(Class::Telemetry, "big");
        big.data = Data::Json(Bytes::from(format!("\"{}\"", "x".repeat(4000))));
        let limits = Limits {
            max_bytes: 2000,
            when_full: QueueFull::DropOldest,
            ..Limits::default()
        };
        {
            let mut s = open(dir.path(), limits);
            let mut t = s.begin().unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            t.commit().unwrap();
            let mut t = s.begin().unwrap();
            assert_eq!(t.append(&big, "src").unwrap(), Appended::Rejected);
            let c = t.commit().unwrap();
            assert_eq!((c.removed.evicted, c.removed.rejected), (1, 1));
            assert_eq!(s.depth(), 0);
        }
        let s = open(dir.path(), limits);
        assert_eq!(s.next_seq(), 2, "sequence 1 is not handed out again");
    }

    #[test]
    fn uncommitted_work_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("q.db"), SyncMode::Full, Limits::default())
            .unwrap()
            .0;
        {
            let mut t = s.begin().unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
        }
        assert_eq!(s.depth(), 0);
        assert_eq!(s.next_seq(), 1);
        assert!(s.lease(Cursor::default(), 10).unwrap().is_empty());
    }

    #[test]
    fn lease_gives_alerts_first_then_telemetry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        for (c, n) in [
            (Class::Telemetry, "t1"),
            (Class::Alert, "a1"),
            (Class::Telemetry, "t2"),
            (Class::Alert, "a2"),
        ] {
            t.append(&ev(c, n), "src").unwrap();
        }
        t.commit().unwrap();
        assert_eq!(subjects(&s), ["a1", "a2", "t1", "t2"]);
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

    #[test]
    fn drop_oldest_evicts_telemetry_before_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(
            dir.path(),
            Limits {
                max_events: 4,
                ..Limits::default()
            },
        );
        let mut t = s.begin().unwrap();
        for (c, n) in [
            (Class::Alert, "a1"),
            (Class::Telemetry, "t1"),
            (Class::Telemetry, "t2"),
            (Class::Alert, "a2"),
        ] {
            t.append(&ev(c, n), "src").unwrap();
        }
        t.append(&ev(Class::Telemetry, "t3"), "src").unwrap();
        t.append(&ev(Class::Alert, "a3"), "src").unwrap();
        let c = t.commit().unwrap();
        assert_eq!(c.removed.evicted, 2);
        assert_eq!(subjects(&s), ["a1", "a2", "a3", "t3"]);
        // Alerts go only once no telemetry is left; a telemetry newcomer never evicts an alert.
        let mut t = s.begin().unwrap();
        t.append(&ev(Class::Alert, "a4"), "src").unwrap();
        t.append(&ev(Class::Alert, "a5"), "src").unwrap();
        let c = t.commit().unwrap();
        assert_eq!(c.removed.evicted, 2);
        assert_eq!(subjects(&s), ["a2", "a3", "a4", "a5"]);
        let mut t = s.begin().unwrap();
        assert_eq!(
            t.append(&ev(Class::Telemetry, "t4"), "src").unwrap(),
            Appended::Rejected
        );
        assert_eq!(t.commit().unwrap().removed.rejected, 1);
        assert_eq!(s.depth(), 4);
    }

    #[test]
    fn drop_newest_rejects_telemetry_but_alerts_push_telemetry_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(
            dir.path(),
            Limits {
                max_events: 3,
                when_full: QueueFull::DropNewest,
                ..Limits::default()
            },
        );
        let mut t = s.begin().unwrap();
        for n in ["t1", "t2", "t3"] {
            t.append(&ev(Class::Telemetry, n), "src").unwrap();
        }
        assert_eq!(
            t.append(&ev(Class::Telemetry, "t4"), "src").unwrap(),
            Appended::Rejected
        );
        assert!(matches!(
            t.append(&ev(Class::Alert, "a1"), "src").unwrap(),
            Appended::Queued { .. }
        ));
        let c = t.commit().unwrap();
        assert_eq!((c.removed.rejected, c.removed.evicted), (1, 1));
        assert_eq!(subjects(&s), ["a1", "t2", "t3"]);
    }

    #[test]
    fn max_bytes_bounds_the_accounted_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(
            dir.path(),
            Limits {
                max_bytes: 20_000,
                ..Limits::default()
            },
        );
        for _ in 0..10 {
            let mut t = s.begin().unwrap();
            for i in 0..50 {
                t.append(&ev(Class::Telemetry, &format!("sensors/{i}")), "src")
                    .unwrap();
            }
            t.commit().unwrap();
            assert!(s.bytes() <= 20_000, "{}", s.bytes());
        }
        let before = s.bytes();
        s.load_counters().unwrap();
        assert_eq!(s.bytes(), before, "incremental accounting matches the file");
    }

    #[test]
    fn expiry_and_keep_acked_replay() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_age: Some(Duration::from_secs(60)),
            keep_acked: Duration::from_secs(3600),
            ..Limits::default()
        };
        let mut s = open(dir.path(), limits);
        let mut old = ev(Class::Telemetry, "old");
        old.time = SystemTime::now() - Duration::from_secs(120);
        let mut t = s.begin().unwrap();
        t.append(&old, "src").unwrap();
        t.append(&ev(Class::Telemetry, "new"), "src").unwrap();
        t.expire(now_us()).unwrap();
        let c = t.commit().unwrap();
        assert_eq!(c.removed.expired, 1);
        assert_eq!(subjects(&s), ["new"]);

        let leased = s.lease(Cursor::default(), 10).unwrap();
        let mut t = s.begin().unwrap();
        t.ack(&[leased[0].pos], now_us()).unwrap();
        t.commit().unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(s.stats().unwrap().kept, 1);
        let kept = s.kept_since(0, Some("new")).unwrap();
        assert_eq!(kept.len(), 1);
        let mut t = s.begin().unwrap();
        t.requeue(&kept).unwrap();
        t.commit().unwrap();
        let again = s
            .lease(
                Cursor {
                    alert: 0,
                    telemetry: leased[0].pos,
                },
                10,
            )
            .unwrap();
        assert_eq!(
            again.len(),
            1,
            "replayed events are leased after the cursor"
        );
        assert_eq!(
            again[0].body, leased[0].body,
            "same envelope: same id and sequence"
        );
        assert!(again[0].pos > leased[0].pos);
    }

    #[test]
    fn corrupt_file_is_quarantined_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let mut s = open(dir.path(), Limits::default());
            let mut t = s.begin().unwrap();
            for _ in 0..500 {
                t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            }
            t.commit().unwrap();
            s.checkpoint().unwrap();
        }
        // Scribble over the middle of the file (the b-tree pages), keeping the header.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 8192] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let (mut s, report) = Store::open(&path, SyncMode::Normal, Limits::default()).unwrap();
        let aside = report.quarantined.expect("quarantined");
        assert!(aside.exists(), "the damaged file is kept");
        assert_eq!(s.depth(), 0);
        let mut t = s.begin().unwrap();
        let Appended::Queued { seq, .. } = t.append(&ev(Class::Telemetry, "a"), "src").unwrap()
        else {
            panic!()
        };
        t.commit().unwrap();
        assert!(
            seq == 1 || seq == 501,
            "numbering restarts only if nothing could be salvaged: {seq}"
        );
    }

    #[test]
    fn the_cli_reads_a_queue_written_before_parking_existed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let mut s = open(dir.path(), Limits::default());
            let mut t = s.begin().unwrap();
            t.append(&ev(Class::Telemetry, "a"), "src").unwrap();
            t.commit().unwrap();
            s.conn.execute_batch("DROP TABLE parked").unwrap();
        }
        let s = Store::open_cli(&path, false).unwrap();
        assert_eq!(s.stats().unwrap().parked, 0);
        assert!(s.parked_page(0, 10).unwrap().is_empty());
        assert_eq!(s.peek(10, None).unwrap().len(), 1);
        drop(s);
        // The CLI's writes (retry, purge --parked) on such a file: the table is added first.
        let mut s = Store::open_cli(&path, true).unwrap();
        assert_eq!(s.purge_parked(None).unwrap(), 0);
        let mut t = s.begin().unwrap();
        assert_eq!(t.unpark(None).unwrap(), 0);
        t.commit().unwrap();
        assert_eq!(s.peek(10, None).unwrap().len(), 1);
    }

    #[test]
    fn parked_events_are_bounded_by_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), Limits::default());
        let big = Bytes::from(vec![b'7'; 1 << 20]);
        let n = PARKED_MAX_BYTES / (1 << 20) + 8;
        let mut t = s.begin().unwrap();
        for i in 0..n {
            let mut e = ev(Class::Telemetry, &format!("s{i}"));
            e.data = Data::Json(big.clone());
            t.append(&e, "src").unwrap();
        }
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        let all: Vec<u64> = (1..=n).collect();
        assert_eq!(t.park(&all, "too big", 0).unwrap(), n);
        let removed = t.commit().unwrap().removed;
        let parked = s.parked_page(0, 1000).unwrap();
        let bytes: usize = parked.iter().map(|(e, _)| e.body.len()).sum();
        assert!(bytes as u64 <= PARKED_MAX_BYTES, "{bytes} bytes parked");
        assert_eq!(removed.evicted + parked.len() as u64, n, "the rest counted");
        // The newest are kept.
        assert_eq!(parked.last().unwrap().0.subject, format!("s{}", n - 1));
    }

    #[test]
    fn parked_events_leave_the_queue_and_come_back_on_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), Limits::default());
        let mut t = s.begin().unwrap();
        for n in ["a", "b", "c"] {
            t.append(&ev(Class::Telemetry, n), "src").unwrap();
        }
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        assert_eq!(t.park(&[2, 9], "bad", 0).unwrap(), 1);
        t.commit().unwrap();
        assert_eq!(subjects(&s), ["a", "c"]);
        let st = s.stats().unwrap();
        assert_eq!((st.depth, st.parked), (2, 1));
        let parked = s.parked_page(0, 10).unwrap();
        assert_eq!(
            (parked[0].0.subject.as_str(), parked[0].1.as_str()),
            ("b", "bad")
        );
        // Bounded: beyond PARKED_MAX the oldest parked go, counted.
        let mut t = s.begin().unwrap();
        for _ in 0..PARKED_MAX {
            t.append(&ev(Class::Telemetry, "x"), "src").unwrap();
        }
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        let first_x = 4;
        let positions: Vec<u64> = (first_x..first_x + PARKED_MAX).collect();
        assert_eq!(t.park(&positions, "flood", 0).unwrap(), PARKED_MAX);
        assert_eq!(t.commit().unwrap().removed.evicted, 1);
        assert_eq!(s.stats().unwrap().parked, PARKED_MAX);
        assert_eq!(
            s.parked_page(0, 1).unwrap()[0].0.subject,
            "x",
            "b went first"
        );
        let mut t = s.begin().unwrap();
        t.unpark(Some("x")).unwrap();
        t.commit().unwrap();
        let mut t = s.begin().unwrap();
        t.ack(
            &(first_x + PARKED_MAX..first_x + 3 * PARKED_MAX).collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        t.commit().unwrap();
        assert_eq!(subjects(&s), ["a", "c"]);
        let mut t = s.begin().unwrap();
        t.park(&[1], "bad", 0).unwrap();
        t.commit().unwrap();
        let parked = s.parked_page(0, 10).unwrap();
        let (n, _) = s.apply(&Request::Retry { filter: None }).unwrap();
        assert_eq!(n, 1);
        assert_eq!(subjects(&s), ["c", "a"]);
        let again = s.lease(Cursor::default(), 10).unwrap();
        assert_eq!(again[1].body, parked[0].0.body, "same envelope");
        assert!(again[1].pos > first_x + PARKED_MAX, "a new position");
        assert_eq!(s.stats().unwrap().parked, 0);
    }

    #[test]
    fn garbage_file_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        std::fs::write(
            &path,
            b"this is not a database at all, just some text that is long enough ........",
        )
        .unwrap();
        let (s, report) = Store::open(&path, SyncMode::Normal, Limits::default()).unwrap();
        assert!(report.quarantined.is_some());
        assert_eq!(s.depth(), 0);
    }
}

/// Model-based property test: random sequences of append / lease / ack / reopen against a
/// simple in-memory model of what the queue must hold.
#[cfg(test)]
mod model {
    use super::tests::ev;
    use super::*;
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
}
