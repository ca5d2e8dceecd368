//! The SQLite file behind the queue: schema, appends, acks, leases, limits, stats.
//!
//! Tables:
//! - `events`: one row per queued event. `pos` is the queue position (commit order, what the
//!   forwarder leases and acknowledges by); `seq` is the event's CloudEvents `sequence`; `body`
//!   holds the parts the envelope is made of (`row.rs`), from which a read builds the same
//!   envelope again, so a resend is byte-for-byte the first send.
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
//!
//! The store is split by concern:
//! - `schema.rs`: the file, its schema and pragmas, opening and quarantine of a damaged file,
//!   the counters loaded from it, checkpoint and free pages;
//! - `wal.rs`: the WAL's size as SQLite reports it after each commit, for the writer that
//!   takes checkpoints over (`queue::checkpoint`);
//! - `write.rs`: the writer's transaction ([`Txn`]): append, ack, expiry, eviction, space cap;
//! - `read.rs`: leases for the tail, pages for an export, stats;
//! - `row.rs`: the stored form of an event (the `body` column) and its envelope;
//! - `parked.rs`: events set aside and queued again;
//! - `admin.rs`: the CLI's side: opening beside the daemon, purge, requests (replay, retry).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};

use crate::config::QueueFull;
use crate::core::event::Class;

mod admin;
mod parked;
mod read;
pub mod row;
mod schema;
mod wal;
mod write;

pub use admin::Request;
pub use parked::{PARKED_MAX, PARKED_MAX_BYTES};
pub(crate) use schema::passive_checkpoint;
pub use schema::{OpenReport, WAL_LIMIT};
pub use write::{Appended, Txn, SPACE_CAP_FLOOR};

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
    /// With checkpoints taken over by the writer (`Store::manual_checkpoints`): the frames in
    /// the WAL after the last commit, kept by SQLite's WAL hook. Declared after `conn`, so it
    /// outlives the connection whose hook points at it.
    wal_frames: Option<std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

pub fn now_us() -> i64 {
    micros(SystemTime::now())
}

pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let seq = r.get::<_, i64>(1)? as u64;
    let time_us = r.get(3)?;
    let subject: String = r.get(4)?;
    let body = row::envelope(r.get(6)?, seq, time_us, &subject);
    Ok(StoredEvent {
        pos: r.get::<_, i64>(0)? as u64,
        seq,
        class: Class::from_i64(r.get(2)?),
        time_us,
        subject,
        topic: r.get(5)?,
        body,
    })
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

impl Store {
    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
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
}

#[cfg(test)]
pub(crate) mod tests;

/// Model-based property test: random sequences of append / lease / ack / reopen against a
/// simple in-memory model of what the queue must hold.
#[cfg(test)]
mod model;
