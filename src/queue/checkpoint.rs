//! WAL checkpoints off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the commit that fills the WAL (about 1 MiB): that
//! commit copies every page the WAL holds into the file and syncs both, and the readings of
//! its group, and all that arrive meanwhile, wait for it. Measured at 1,000 readings/s with
//! `queue.commit_delay = "0ms"` on the 2-core VM: about two commits a second took 2-10 ms
//! instead of ~0.2 ms, and those were the slowest 1 % of readings (p99 3-4 ms; 1.5 ms with
//! no checkpoint at all in the run).
//!
//! So the writer takes checkpoints over (`Store::manual_checkpoints`) and splits them:
//! - once the WAL passes [`Store::checkpoint_frames`], a thread of its own copies what it
//!   holds into the file, on a connection of its own, while the writer goes on committing
//!   (a PASSIVE checkpoint never blocks a writer);
//! - when that run is over, the writer moves the few frames written meanwhile itself, after
//!   its group was settled; the WAL then starts over at its next commit. (A WAL starts over
//!   only when every frame in it was moved, and under steady commits the thread alone never
//!   catches up with the last one.)
//!
//! Invariants:
//! - At most one checkpoint runs at a time (the thread holds `running` while it runs; the
//!   writer takes it for its own).
//! - The WAL stays within [`crate::queue::store::WAL_LIMIT`]: past 1.5 times the threshold the
//!   writer waits for the thread and checkpoints itself, as SQLite would have.
//! - Without the thread (it could not be started), the writer checkpoints itself, as before.
//! - A failed checkpoint loses nothing (the WAL still holds every frame); it is logged and
//!   tried again after another threshold's worth of frames.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use super::store::{self, Store};

/// The thread that copies the WAL into the file.
struct Background {
    ask: Option<flume::Sender<()>>,
    running: Arc<Mutex<()>>,
    finished: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(path: PathBuf) -> std::io::Result<Background> {
        let (ask, asked) = flume::bounded::<()>(1);
        let running = Arc::new(Mutex::new(()));
        let finished = Arc::new(AtomicU64::new(0));
        let (r, f) = (running.clone(), finished.clone());
        let thread = std::thread::Builder::new()
            .name("edgegate-ckpt".into())
            .spawn(move || {
                for () in asked.iter() {
                    let guard = r.lock().unwrap_or_else(|p| p.into_inner());
                    // A connection per run: the writer may have replaced a corrupt file
                    // since, and a checkpoint a second at most costs nothing to open for.
                    let result = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .and_then(|c| store::passive_checkpoint(&c));
                    drop(guard);
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "queue: background checkpoint failed (the writer will checkpoint itself)");
                    }
                    f.fetch_add(1, Ordering::Release);
                }
            })?;
        Ok(Background {
            ask: Some(ask),
            running,
            finished,
            thread: Some(thread),
        })
    }

    fn hold(&self) -> MutexGuard<'_, ()> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.ask.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("queue checkpoint thread panicked");
            }
        }
    }
}

/// The writer's side: when to ask the thread, when to finish a checkpoint itself.
pub(super) struct Checkpoints {
    background: Option<Background>,
    /// WAL frames after which a checkpoint is due (the file's page size is fixed).
    due: u32,
    state: State,
}

#[derive(Default)]
struct State {
    /// `finished` when the thread was asked, while its run is awaited.
    asked: Option<u64>,
    /// The WAL's frames when the writer last moved all it could: nothing is due until the WAL
    /// started over (fewer frames) or grew by another threshold (a reader held it).
    moved_at: Option<u32>,
    /// Checkpoints finished by the writer itself.
    by_writer: u64,
}

impl State {
    /// Checkpoint on the writer's connection (the thread is not running).
    fn finish(&mut self, store: &mut Store, frames: u32) {
        self.asked = None;
        self.moved_at = Some(frames);
        self.by_writer += 1;
        if let Err(e) = store.checkpoint_passive() {
            tracing::warn!(error = %e, frames, "queue checkpoint failed");
        }
    }
}

impl Checkpoints {
    /// Take the store's checkpoints over, with a thread for the file at `path`.
    pub(super) fn start(store: &mut Store, path: PathBuf) -> Checkpoints {
        let background = match Background::spawn(path) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "queue: no checkpoint thread; the writer checkpoints itself");
                None
            }
        };
        Checkpoints {
            background,
            due: take_over(store),
            state: State::default(),
        }
    }

    /// After a commit and its settling: ask for or finish a checkpoint, if one is due.
    pub(super) fn step(&mut self, store: &mut Store) {
        let Some(frames) = store.wal_frames() else {
            return;
        };
        let due = self.due;
        let state = &mut self.state;
        if let Some(at) = state.moved_at {
            if frames >= at && frames - at < due {
                return;
            }
            state.moved_at = None;
        }
        if frames < due {
            // The WAL started over (the thread moved all of it, a commit followed): a run
            // asked for before is done with, whether or not the thread has said so yet.
            state.asked = None;
            return;
        }
        let Some(bg) = &self.background else {
            state.finish(store, frames);
            return;
        };
        let finished = bg.finished.load(Ordering::Acquire);
        match state.asked {
            None => {
                if let Some(ask) = &bg.ask {
                    // Full: a run is asked for already, and will see these frames too.
                    let _ = ask.try_send(());
                }
                state.asked = Some(finished);
            }
            Some(n) if finished > n || frames >= due + due / 2 => {
                let _running = bg.hold();
                state.finish(store, frames);
            }
            Some(_) => {}
        }
    }

    /// Checkpoints finished by the writer itself, and runs of the thread.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (u64, u64) {
        let bg = self.background.as_ref();
        (
            self.state.by_writer,
            bg.map_or(0, |b| b.finished.load(Ordering::Acquire)),
        )
    }

    /// Wait for a running checkpoint, so the caller's own (idle, shutdown) does not collide.
    pub(super) fn quiet(&self) -> Option<MutexGuard<'_, ()>> {
        self.background.as_ref().map(Background::hold)
    }

    /// A new store (the old file was corrupt): take its checkpoints over too.
    pub(super) fn restart(&mut self, store: &mut Store) {
        self.due = take_over(store);
        self.state.asked = None;
        self.state.moved_at = None;
    }
}

/// Take `store`'s checkpoints over from SQLite: the WAL frames after which one is due.
fn take_over(store: &mut Store) -> u32 {
    store.manual_checkpoints();
    store.checkpoint_frames()
}
