//! How large the WAL is after each commit, told by SQLite's WAL hook, for a writer that takes
//! checkpoints over from SQLite (`queue::checkpoint` has why).
//!
//! Invariants:
//! - Installing the hook replaces SQLite's automatic checkpoint (`wal_autocheckpoint` is itself
//!   a WAL hook): from then on the WAL is checkpointed only when someone asks for it.
//! - The hook only stores a number: it never calls back into SQLite and cannot fail.
//! - The number lives in an `Arc` the `Store` holds beside its connection, declared after it,
//!   so it is dropped after the connection whose hook points at it.
//!
//! rusqlite 0.32 has no safe wrapper for `sqlite3_wal_hook`, hence the two small `unsafe`
//! blocks below; rusqlite re-exports the bundled SQLite's C API as `rusqlite::ffi`.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rusqlite::ffi;

use super::Store;

/// Called by SQLite after each commit on the connection, with the frames now in its WAL.
unsafe extern "C" fn record_frames(
    ctx: *mut c_void,
    _db: *mut ffi::sqlite3,
    _name: *const c_char,
    frames: c_int,
) -> c_int {
    // SAFETY: `ctx` is the `AtomicU32` inside the `Arc` that `Store::wal_frames` holds for as
    // long as the connection is open (see the module doc).
    let counter = unsafe { &*(ctx as *const AtomicU32) };
    counter.store(frames.max(0) as u32, Ordering::Relaxed);
    ffi::SQLITE_OK
}

impl Store {
    /// Take checkpoints over from SQLite: from now on the WAL grows until its owner checkpoints
    /// it (`checkpoint_passive` here, or another connection), and [`Store::wal_frames`] tells
    /// how large it is.
    pub fn manual_checkpoints(&mut self) {
        let counter = Arc::new(AtomicU32::new(0));
        // SAFETY: the connection is open (this store owns it). The pointer stays valid while
        // the hook can be called: the `Arc` is kept in `self.wal_frames`, which is dropped
        // after `self.conn`, and replaced only here, after the hook points at the new one.
        unsafe {
            ffi::sqlite3_wal_hook(
                self.conn.handle(),
                Some(record_frames),
                Arc::as_ptr(&counter) as *mut c_void,
            );
        }
        self.wal_frames = Some(counter);
    }

    /// Frames in the WAL after the last commit, once checkpoints were taken over.
    pub fn wal_frames(&self) -> Option<u32> {
        self.wal_frames.as_ref().map(|c| c.load(Ordering::Relaxed))
    }
}
