//! The queue file itself: its schema and pragmas, opening it (and moving a damaged one aside),
//! the counters loaded from it, and its upkeep (checkpoint, free pages).
//!
//! Invariants:
//! - A file that fails `PRAGMA quick_check` (or that SQLite calls corrupt) is never deleted:
//!   it is renamed `<file>.corrupt-<unix time>` with its WAL and shared memory, and a fresh
//!   file is created whose sequences go on after what could be salvaged from the old one.
//! - Page size and auto-vacuum are set before the first table exists (they only take effect
//!   on a new file); the WAL is checkpointed past [`WAL_CHECKPOINT_BYTES`] and cut back to
//!   [`WAL_LIMIT`].
//! - The in-memory counters are recomputed from the file ([`Store::load_counters`]) whenever
//!   another connection changed it; `next_seq`/`next_pos` never go down.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{Limits, Store, StoreError, ROW_OVERHEAD};
use crate::config::SyncMode;

/// Page size of a new queue file (see `Store::open_checked`).
const PAGE_SIZE: u32 = 512;

/// The WAL is checkpointed once it holds this much.
const WAL_CHECKPOINT_BYTES: i64 = 1 << 20;

/// What the WAL may take: the autocheckpoint threshold ([`WAL_CHECKPOINT_BYTES`]) plus a commit
/// group written before the checkpoint runs (1024 events of a few hundred bytes and their
/// index pages). The space check keeps this much free beside `queue.min_free`.
pub const WAL_LIMIT: u64 = 2 << 20;

pub(super) const SCHEMA: &str = "
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

/// What happened when the queue file was opened.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// A damaged file was moved here and a fresh queue created.
    pub quarantined: Option<PathBuf>,
    pub problem: Option<String>,
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
            // A failed `quick_check` is reported as SQLITE_CORRUPT too (`open_checked`).
            Err(e) if e.is_corruption() => {
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
        conn.pragma_update(None, "wal_autocheckpoint", checkpoint_frames(page_size))
            .map_err(err)?;
        // After a checkpoint, cut a WAL that one large transaction grew back to that size, so
        // it does not keep holding the space (queue::space counts on it).
        conn.pragma_update(None, "journal_size_limit", WAL_LIMIT as i64)
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Store::from_file(conn, path, limits, true)
    }

    /// The store over an open connection, its counters loaded from the file.
    pub(super) fn from_file(
        conn: Connection,
        path: &Path,
        limits: Limits,
        has_parked: bool,
    ) -> Result<Store, StoreError> {
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
            has_parked,
            wal_frames: None,
        };
        store.load_counters()?;
        Ok(store)
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

    /// Size of the WAL file now (0 when there is none).
    pub fn wal_len(&self) -> u64 {
        std::fs::metadata(format!("{}-wal", self.path.display()))
            .map(|m| m.len())
            .unwrap_or(0)
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

    /// Move the WAL content into the main file and cut the WAL to nothing (at shutdown and
    /// when idle).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }

    /// Move what the WAL holds into the main file without waiting for anyone; the next commit
    /// starts the WAL over when all of it was moved.
    pub fn checkpoint_passive(&mut self) -> Result<(), StoreError> {
        passive_checkpoint(&self.conn).map_err(|e| self.err(e))
    }

    /// WAL frames after which a checkpoint is due (about 1 MiB, whatever the page size).
    pub fn checkpoint_frames(&self) -> u32 {
        let page_size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap_or(i64::from(PAGE_SIZE));
        checkpoint_frames(page_size) as u32
    }
}

/// WAL frames in [`WAL_CHECKPOINT_BYTES`] with pages of `page_size` (SQLite's automatic
/// checkpoint at opening, the writer's own once it took them over).
fn checkpoint_frames(page_size: i64) -> i64 {
    WAL_CHECKPOINT_BYTES / page_size.max(512)
}

/// `PRAGMA wal_checkpoint(PASSIVE)` on `conn` (what is left, the WAL still holds).
pub(crate) fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
