//! Store-and-forward queue: the only writer of the SQLite file, on an OS thread of its own.
//!
//! ```text
//! rules ──Append──┐                           ┌──> watch<last committed position> ──> forwarder
//! forwarder ─Ack──┼─> [bounded channel] ─> writer thread (group commit)
//! forwarder ─Lease┘                           ├──> Lease reply (oneshot)
//!                                             └──> tail (committed rows, in memory) ─> forwarder
//! ```
//!
//! The tail ([`tail`]) hands freshly committed rows to the forwarder without a read of the file;
//! the forwarder trusts it only once a lease on its connection caught up with the file.
//!
//! Invariants:
//! - Commands are applied in channel order; a commit group is what arrived while the previous
//!   commit ran (plus at most `queue.commit_delay`, at most `queue.max_batch` events). Appends and
//!   acks share one transaction, acks first (the appends reuse the pages they free): one write
//!   per group, never one per event. Acks that arrive alone wait up to [`ACK_HOLD`] for the
//!   next appends (never while commits fail, nor past a lease or stats request).
//! - An event is visible to leases only after its transaction committed: the forwarder never
//!   sends what could still be lost.
//! - A row leaves `events` only by an Ack (sent by the forwarder after the upstream PUBACK), or by
//!   a limit (evicted, rejected, expired), each counted by reason and logged.
//! - When a commit fails (disk full, I/O error), the group's appends are kept in a bounded memory
//!   buffer and retried (`max_batch` at a time); what does not fit is counted as
//!   `queue_write_failed`. Meanwhile acknowledgements and expiry commit first, in transactions
//!   of their own: removing rows never waits on appends that cannot commit. The handles report
//!   the failure (`commit_error`, for `/healthz`) until a commit succeeds.
//! - The queue never takes the last free bytes of its file system ([`space`]): short of
//!   `queue.min_free` (plus the WAL's allowance), or after the ballast was given back on a full
//!   disk, it grows no further.
//! - A file found corrupt while running is quarantined and replaced, like at startup; positions
//!   and sequences go on after the old file's, pending acks are dropped, and the tail starts a
//!   new epoch (readers start over).
//! - Parked events (see [`store`]) leave the queue only at the forwarder's request (`Park`).

mod checkpoint;
pub mod space;
pub mod store;
pub mod tail;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::config::{MinFree, QueueConfig, SyncMode};
use crate::core::ack::Ticket;
use crate::core::event::Event;
use crate::core::metrics::{DropReason, Metrics};
use crate::core::outlet::{self, Offered, WhenFull};
pub use store::{Cursor, Limits, Request, Stats, Store, StoreError, StoredEvent};
pub use tail::Reader;
use tail::Tail;

enum Command {
    /// An event, with the ticket of the reading it came from when it is that reading's last.
    Append(Event, Option<Ticket>),
    /// A reading that became no event (or whose events were dropped): its PUBACK may go once
    /// everything before it is committed.
    Settle(Ticket),
    Ack(Vec<u64>),
    /// Set these events aside (the forwarder cannot hand them to the upstream), with the reason.
    Park(Vec<u64>, String),
    Lease {
        cursor: Cursor,
        limit: usize,
        /// Rows beyond `want` come only while their envelopes stay within this many bytes.
        want: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Leased>,
    },
    Stats(oneshot::Sender<Stats>),
}

/// Sending side of the queue, cloned by each stage that talks to it.
#[derive(Clone)]
pub struct QueueHandle {
    tx: flume::Sender<Command>,
    committed: watch::Receiver<u64>,
    tail: Arc<Mutex<Tail>>,
    /// Why the last commit failed, while commits fail.
    failing: Arc<Mutex<Option<String>>>,
}

/// What a lease read from the file.
pub struct Leased {
    pub rows: Vec<StoredEvent>,
    /// The last committed position when the rows were read (`None`: the read failed): when
    /// fewer rows than asked for came back, nothing of either class up to here is left after
    /// the cursor.
    pub upto: Option<u64>,
    /// The read stopped at its byte bound (more rows may follow, however few came back).
    pub cut: bool,
}

impl Leased {
    /// Did the read find everything after its cursor (`asked`: the rows it asked for)?
    pub fn complete(&self, asked: usize) -> bool {
        self.rows.len() < asked && !self.cut
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the queue writer has stopped")]
pub struct QueueClosed;

impl QueueHandle {
    /// Append, waiting while the channel is full.
    pub async fn append(&self, event: Event) -> Result<(), QueueClosed> {
        self.append_settling(event, None).await
    }

    /// Append, waiting while the channel is full; `ticket` is settled once the event (and
    /// everything before it) is committed.
    pub async fn append_settling(
        &self,
        event: Event,
        ticket: Option<Ticket>,
    ) -> Result<(), QueueClosed> {
        self.tx
            .send_async(Command::Append(event, ticket))
            .await
            .map_err(|_| QueueClosed)
    }

    /// Append as `pipeline.when_full` says (see `core::outlet`): waiting while the channel is
    /// full, or dropping the event (counted) and handing it back with its ticket.
    pub async fn offer(
        &self,
        when_full: WhenFull,
        event: Event,
        ticket: Option<Ticket>,
        metrics: &Metrics,
    ) -> Offered<(Event, Option<Ticket>)> {
        let offered = outlet::offer(
            &self.tx,
            when_full,
            Command::Append(event, ticket),
            metrics,
            "queue writer",
            |c| match c {
                Command::Append(e, _) => &e.subject,
                _ => "",
            },
        );
        let back = |c| match c {
            Command::Append(e, t) => Some((e, t)),
            _ => None,
        };
        match offered.await {
            Offered::Sent => Offered::Sent,
            Offered::Dropped(c) => back(c).map_or(Offered::Sent, Offered::Dropped),
            Offered::Closed(c) => back(c).map_or(Offered::Sent, Offered::Closed),
        }
    }

    /// Settle `ticket` once everything sent before it is committed (its reading became no
    /// event upstream, or its events were dropped). Waits while the channel is full.
    pub async fn settle(&self, ticket: Ticket) -> Result<(), QueueClosed> {
        self.tx
            .send_async(Command::Settle(ticket))
            .await
            .map_err(|_| QueueClosed)
    }

    /// Acknowledge delivered events (queue positions): removed in the next commit group.
    pub async fn ack(&self, positions: Vec<u64>) -> Result<(), QueueClosed> {
        if positions.is_empty() {
            return Ok(());
        }
        self.tx
            .send_async(Command::Ack(positions))
            .await
            .map_err(|_| QueueClosed)
    }

    /// Set events aside that the upstream can never accept as they are (see `store`'s module
    /// doc): they leave the queue for the `parked` table, listed by `queue stats`/`peek
    /// --parked`, until `queue retry` or `queue purge --parked`.
    pub async fn park(&self, positions: Vec<u64>, reason: String) -> Result<(), QueueClosed> {
        if positions.is_empty() {
            return Ok(());
        }
        self.tx
            .send_async(Command::Park(positions, reason))
            .await
            .map_err(|_| QueueClosed)
    }

    /// Committed events after `cursor`, alerts first, read from the file: `want` of them, and
    /// up to `limit` while their envelopes stay within `max_bytes`.
    async fn lease(
        &self,
        cursor: Cursor,
        want: usize,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Leased, QueueClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Lease {
                cursor,
                limit,
                want,
                max_bytes,
                reply,
            })
            .await
            .map_err(|_| QueueClosed)?;
        rx.await.map_err(|_| QueueClosed)
    }

    /// Up to `limit` committed events after `reader`'s place, alerts first; advances it. From
    /// what the reader read ahead, the in-memory tail of the latest commits when it may answer
    /// (no trip to the writer thread), from the file otherwise, reading ahead (see [`tail`]).
    pub async fn read(
        &self,
        reader: &mut Reader,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, QueueClosed> {
        // Fewer than `limit` must mean nothing more is committed for this reader now (callers
        // take a short read as the end): what was read ahead and ran out is topped up.
        let mut out = Vec::new();
        loop {
            let want = limit - out.len();
            let had_ahead = reader.has_ahead();
            let fresh = match self.tail.lock() {
                Ok(mut t) => reader.from_tail(&mut t, want),
                Err(_) => None,
            };
            match fresh {
                Some(rows) => {
                    let n = rows.len();
                    out.extend(rows);
                    if !(had_ahead && n < want) {
                        return Ok(out);
                    }
                }
                None => {
                    let asked = want.max(tail::READ_AHEAD);
                    let leased = self
                        .lease(reader.cursor(), want, asked, tail::READ_AHEAD_BYTES)
                        .await?;
                    out.extend(reader.from_file(leased, asked, want));
                    return Ok(out);
                }
            }
        }
    }

    pub async fn stats(&self) -> Result<Stats, QueueClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Stats(reply))
            .await
            .map_err(|_| QueueClosed)?;
        rx.await.map_err(|_| QueueClosed)
    }

    /// Why commits fail, while they do (`None` once one succeeds again).
    pub fn commit_error(&self) -> Option<String> {
        self.failing.lock().ok().and_then(|f| f.clone())
    }

    /// Last committed queue position; changes whenever new events become leasable.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// The running writer thread.
pub struct QueueWriter {
    thread: Option<JoinHandle<()>>,
}

impl QueueWriter {
    /// Wait for the thread to commit what it has and exit (all handles must be dropped first).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("queue writer thread panicked");
            }
        }
    }
}

/// Limits from the configuration.
pub fn limits(cfg: &QueueConfig) -> Limits {
    Limits {
        max_events: cfg.max_events,
        max_bytes: cfg.max_bytes,
        max_age: cfg.max_age,
        when_full: cfg.when_full,
        keep_acked: cfg.keep_acked,
    }
}

/// How much of the latest commits is kept in memory for the forwarder (`tail_events` 0: none,
/// for a gateway without an upstream).
pub const TAIL_BYTES: usize = 1 << 20;

/// Start the writer thread on an opened store. `tail_events`: how many freshly committed events
/// are kept in memory for the forwarder (at most [`TAIL_BYTES`] of them).
pub fn start(
    mut store: Store,
    cfg: &QueueConfig,
    path: PathBuf,
    source: String,
    capacity: usize,
    tail_events: usize,
    metrics: Arc<Metrics>,
) -> Result<(QueueHandle, QueueWriter), std::io::Error> {
    let (tx, rx) = flume::bounded(capacity);
    let (committed_tx, committed) = watch::channel(0);
    let tail = Arc::new(Mutex::new(Tail::new(
        store.next_pos(),
        tail_events,
        TAIL_BYTES,
    )));
    metrics.queue_depth.set(store.depth() as i64);
    metrics.queue_bytes.set(store.bytes() as i64);
    metrics.set_last_sequence(store.next_seq().saturating_sub(1));
    let failing = Arc::new(Mutex::new(None));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut ballast = space::Ballast::new(&dir);
    if let Err(e) = ballast.fill() {
        tracing::warn!(error = %e, bytes = space::BALLAST_BYTES, "queue: could not write the space reserve (queue.reserve); a full disk may stop acknowledgements");
    }
    let checkpoints = checkpoint::Checkpoints::start(&mut store, path.clone());
    let writer = Writer {
        store,
        checkpoints,
        dir,
        min_free: cfg.min_free,
        ballast,
        ballast_released: false,
        failing: failing.clone(),
        path,
        sync: cfg.sync,
        rx,
        source,
        commit_delay: cfg.commit_delay,
        max_batch: cfg.max_batch,
        retry: VecDeque::new(),
        owed: Vec::new(),
        bursts: Bursts::default(),
        retry_limit: capacity.max(cfg.max_batch),
        committed: committed_tx,
        tail: tail.clone(),
        tail_keeps: tail_events > 0,
        metrics,
        last_error_log: None,
        last_maintenance: Instant::now(),
    };
    let thread = std::thread::Builder::new()
        .name("edgegate-queue".into())
        .spawn(move || writer.run())?;
    Ok((
        QueueHandle {
            tx,
            committed,
            tail,
            failing,
        },
        QueueWriter {
            thread: Some(thread),
        },
    ))
}

struct Writer {
    store: Store,
    /// When the WAL is checkpointed, and by whom (`checkpoint`).
    checkpoints: checkpoint::Checkpoints,
    /// The directory of the file (its file system is checked against `min_free`).
    dir: PathBuf,
    min_free: MinFree,
    ballast: space::Ballast,
    /// The ballast was given back on a full disk and is not filled again yet.
    ballast_released: bool,
    /// Shared with the handles (health): why commits fail, while they do.
    failing: Arc<Mutex<Option<String>>>,
    path: PathBuf,
    sync: SyncMode,
    rx: flume::Receiver<Command>,
    source: String,
    commit_delay: Duration,
    max_batch: usize,
    /// Appends whose commit failed, oldest first, retried before new ones.
    retry: VecDeque<Event>,
    /// Tickets of readings sorted into groups so far, settled once nothing before them is
    /// left uncommitted (the group committed and the retry buffer empty).
    owed: Vec<Ticket>,
    /// Who sends fast in the group being gathered (see [`BURST`]).
    bursts: Bursts,
    retry_limit: usize,
    committed: watch::Sender<u64>,
    tail: Arc<Mutex<Tail>>,
    /// The tail keeps events (there is an upstream): only then are committed rows copied.
    tail_keeps: bool,
    metrics: Arc<Metrics>,
    last_error_log: Option<Instant>,
    last_maintenance: Instant,
}

const IDLE_TICK: Duration = Duration::from_secs(1);
/// A connection with this many readings waiting in one group is probably a fast sender held
/// by its own in-flight window (paho-mqtt's default is 20 unacknowledged publishes): it sends
/// nothing more until it gets PUBACKs, which wait for this group's commit. Then the group does
/// not wait out `queue.commit_delay` but commits once the input has been quiet for
/// [`BURST_QUIET`]. (Measured with the default 50 ms delay and a window of 20, without it: one
/// connection could publish 400 readings/s at most.) Likewise for a ticket marked eager: its
/// sender publishes one reading at a time, each after the previous PUBACK (without this, 20
/// readings/s at most). Many sensors each sending a little keep the whole delay, which is what
/// saves the SD card.
/// (Committing at once when every such sender had sent as many readings as in the previous
/// group, its window's worth, took one sensor with 100 in flight from ~13.5k to ~24.6k
/// readings/s, but paced sensors met it too: at 1,000 readings/s it wrote 816 instead of 754
/// bytes per event, over the 2x-envelope target, so it was taken out again.)
const BURST: u32 = 8;
/// A group with this many appends commits without waiting out the rest of
/// `queue.commit_delay`: the pages every commit writes whatever its size (file header, pointer
/// map, table root, free-list trunk: ~4 of 512 bytes) are then a small share of what it
/// writes, and waiting longer would add latency for little. So the delay is spent only where
/// it saves the SD card, at low rates (measured, `SCENARIOS=disk bench/run.sh`: at 100
/// readings/s the default 80 ms delay wrote ~580 bytes per event, 50 ms ~850), and many slow
/// sensors together at 1,000/s still commit every ~64 ms.
const GROUP_ENOUGH: usize = 64;
const BURST_QUIET: Duration = Duration::from_millis(2);

/// Who sends fast in the group being gathered (see [`BURST`]).
#[derive(Debug, Default)]
struct Bursts {
    /// Tickets per connection in this group.
    now: std::collections::HashMap<usize, u32>,
    /// Some connection has [`BURST`] tickets in this group, or an eager one came.
    bursting: bool,
}

impl Bursts {
    fn owe(&mut self, connection: usize, eager: bool) {
        let n = self.now.entry(connection).or_default();
        *n += 1;
        self.bursting |= *n >= BURST || eager;
    }

    fn next_group(&mut self) {
        self.now.clear();
        self.bursting = false;
    }
}

/// Longest time acknowledgements wait for appends to share a commit with (see `hold_acks`).
/// A crash loses at most this much of deletions: those events are sent again (same envelope,
/// at-least-once), never lost.
const ACK_HOLD: Duration = Duration::from_secs(1);
const RETRY_TICK: Duration = Duration::from_millis(200);
/// Pages handed back to the file system per maintenance round (512 KiB at 512-byte pages).
const RECLAIM_PAGES: u32 = 1024;
/// Under load, free pages are handed back only while few rows are queued: the vacuum moves live
/// pages from the end of the file, which is cheap for a short queue and very costly behind a
/// large backlog (measured: a 200k-event drain fell from 41k to 5k events/s). Freed pages are
/// reused by new events anyway, so the file stays at its high-water size until then.
const RECLAIM_MAX_DEPTH: u64 = 10_000;
/// Under load, this many free pages stay in the file: the next commit groups fill them again
/// (acknowledged rows free pages all the time). Handing them back only to grow the file again
/// cost writes on every round (the vacuum moves pages and rewrites their pointer-map pages);
/// they go when the queue is idle.
const RECLAIM_KEEP_FREE: u64 = 256;

impl Writer {
    fn run(mut self) {
        let mut appends: Vec<Event> = Vec::new();
        let mut acks: Vec<u64> = Vec::new();
        let mut replies: Vec<Command> = Vec::new();
        let mut checkpointed = true;
        // Since when acknowledgements wait for appends to ride with (see `hold_acks`).
        let mut acks_since: Option<Instant> = None;
        loop {
            let wait = if self.retry.is_empty() {
                IDLE_TICK
            } else if self.last_error_log.is_none() {
                // Commits work again: the rest of the retry buffer goes at once.
                Duration::ZERO
            } else {
                RETRY_TICK
            };
            let wait = acks_since.map_or(wait, |t| wait.min(ACK_HOLD.saturating_sub(t.elapsed())));
            match self.rx.recv_timeout(wait) {
                Ok(first) => {
                    self.sort(first, &mut appends, &mut acks, &mut replies);
                    self.gather(&mut appends, &mut acks, &mut replies);
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            if !acks.is_empty() {
                acks_since.get_or_insert_with(Instant::now);
            }
            let hold = self.hold_acks(&appends, &acks, &replies, acks_since);
            let busy = !hold && (!appends.is_empty() || !acks.is_empty() || !self.retry.is_empty());
            if busy {
                self.commit(&mut appends, &mut acks, false);
                checkpointed = false;
            }
            if acks.is_empty() {
                acks_since = None;
            }
            if self.last_maintenance.elapsed() >= IDLE_TICK {
                // Held acknowledgements mean traffic: not idle (no checkpoint, no full reclaim).
                let idle = !busy && !hold;
                self.maintenance(&mut appends, &mut acks, idle, !checkpointed);
                checkpointed |= idle;
            }
            self.settle_owed(&appends);
            for r in replies.drain(..) {
                self.answer(r);
            }
            self.checkpoints.step(&mut self.store);
        }
        // Channel closed: every sender is gone, commit what is left.
        if !appends.is_empty() || !acks.is_empty() || !self.retry.is_empty() {
            self.commit(&mut appends, &mut acks, false);
        }
        // A commit takes one group of the retry buffer: while commits work (again), the rest
        // follows, group by group, before anything is counted as lost.
        while !self.retry.is_empty() && self.last_error_log.is_none() {
            let before = self.retry.len();
            self.commit(&mut appends, &mut acks, false);
            if self.retry.len() >= before {
                break;
            }
        }
        if !self.retry.is_empty() {
            let n = self.retry.len() as u64;
            self.metrics.drop_events(
                DropReason::Shutdown,
                n,
                &"queue could not commit before shutdown",
            );
        }
        self.settle_owed(&appends);
        let quiet = self.checkpoints.quiet();
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "queue checkpoint at shutdown failed");
        }
        drop(quiet);
        tracing::info!(
            depth = self.store.depth(),
            next_sequence = self.store.next_seq(),
            "queue closed"
        );
    }

    /// Does a group of acknowledgements alone wait for the next appends, to share their
    /// commit? Each commit writes the pages it touches to the WAL; acknowledgements that ride
    /// with appends cost almost nothing (the appends reuse the pages they free, see
    /// `store::Txn`), alone they cost a commit. They wait at most [`ACK_HOLD`], and not at all
    /// while commits fail (removals give space back), when a reply waits (a lease must not see
    /// acknowledged rows again, stats must be current) or when many have gathered.
    fn hold_acks(
        &self,
        appends: &[Event],
        acks: &[u64],
        replies: &[Command],
        since: Option<Instant>,
    ) -> bool {
        !acks.is_empty()
            && appends.is_empty()
            && replies.is_empty()
            && !self.is_failing()
            && acks.len() < self.max_batch * 4
            && since.is_some_and(|t| t.elapsed() < ACK_HOLD)
    }

    fn sort(
        &mut self,
        c: Command,
        appends: &mut Vec<Event>,
        acks: &mut Vec<u64>,
        replies: &mut Vec<Command>,
    ) {
        match c {
            Command::Append(e, ticket) => {
                appends.push(e);
                if let Some(t) = ticket {
                    self.owe(t);
                }
            }
            Command::Settle(ticket) => self.owe(ticket),
            Command::Ack(s) => acks.extend(s),
            Command::Park(positions, reason) => {
                // Rare: on its own, before the group (the forwarder has skipped these already).
                let now = store::now_us();
                let result = (|| {
                    let mut txn = self.store.begin()?;
                    let n = txn.park(&positions, &reason, now)?;
                    txn.commit().map(|c| (n, c))
                })();
                match result {
                    Ok((n, c)) => {
                        self.metrics.events_parked.inc_by(n);
                        self.metrics.drop_events(
                            DropReason::Evicted,
                            c.removed.evicted,
                            &format_args!(
                                "more than {} parked events: the oldest parked deleted",
                                store::PARKED_MAX
                            ),
                        );
                        self.publish_counters();
                        self.reset_tail();
                        tracing::warn!(events = n, position = positions.first(), reason, "set aside: the upstream cannot accept these events as they are (queue peek --parked; queue retry or queue purge --parked)");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "queue: setting events aside failed (they stay queued)")
                    }
                }
            }
            other => replies.push(other),
        }
    }

    /// Settle the tickets sorted so far when every append before them is committed (or was
    /// dropped, counted): none waits in this round's group or in the retry buffer. While
    /// commits fail they wait, and the sensors' PUBACKs with them (their own backpressure).
    fn settle_owed(&mut self, appends: &[Event]) {
        if appends.is_empty() && self.retry.is_empty() {
            self.settle_all();
        }
        // The next group is counted afresh.
        self.bursts.next_group();
    }

    /// Settle every ticket sorted so far (the caller knows nothing before them waits).
    fn settle_all(&mut self) {
        // A connection's tickets are numbered in order and settling one covers the ones before
        // it: only the last of each run needs settling (one wake-up per connection and group,
        // not one per reading).
        let mut owed = self.owed.drain(..).peekable();
        while let Some(t) = owed.next() {
            if owed
                .peek()
                .is_none_or(|next| next.connection() != t.connection())
            {
                t.settle();
            }
        }
    }

    fn owe(&mut self, ticket: Ticket) {
        self.bursts.owe(ticket.connection(), ticket.eager);
        self.owed.push(ticket);
    }

    /// Take what is already waiting (and, with a commit delay, what arrives soon) into the group.
    fn gather(
        &mut self,
        appends: &mut Vec<Event>,
        acks: &mut Vec<u64>,
        replies: &mut Vec<Command>,
    ) {
        let deadline = Instant::now() + self.commit_delay;
        while appends.len() < self.max_batch && acks.len() < self.max_batch * 4 {
            match self.rx.try_recv() {
                Ok(c) => self.sort(c, appends, acks, replies),
                Err(flume::TryRecvError::Empty) => {
                    if self.commit_delay.is_zero()
                        || !replies.is_empty()
                        || appends.len() >= GROUP_ENOUGH
                    {
                        break;
                    }
                    let until = if self.bursts.bursting {
                        deadline.min(Instant::now() + BURST_QUIET)
                    } else {
                        deadline
                    };
                    match self.rx.recv_deadline(until) {
                        Ok(c) => self.sort(c, appends, acks, replies),
                        Err(_) => break,
                    }
                }
                Err(flume::TryRecvError::Disconnected) => break,
            }
        }
    }

    /// Once a second: expiry, CLI requests and external changes, space reclaim.
    /// `idle`: nothing arrived since the last round; `written`: commits since the last
    /// checkpoint (an idle round checkpoints them).
    fn maintenance(
        &mut self,
        appends: &mut Vec<Event>,
        acks: &mut Vec<u64>,
        idle: bool,
        written: bool,
    ) {
        self.last_maintenance = Instant::now();
        let before = self.store.depth();
        match self.store.external_change() {
            Ok(true) => {
                let after = self.store.depth();
                if after < before {
                    tracing::warn!(
                        removed = before - after,
                        "events removed from the queue by another process (queue purge)"
                    );
                }
                self.publish_counters();
                self.reset_tail();
                // Let the forwarder look again (a replay or purge may have changed what is there).
                self.committed.send_modify(|_| {});
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "queue: reading the file's version failed"),
        }
        match self.store.take_requests() {
            Ok(reqs) => {
                for req in reqs {
                    self.apply(&req);
                }
            }
            Err(e) => tracing::warn!(error = %e, "queue: reading replay requests failed"),
        }
        // Expiry runs inside a normal commit group.
        if self.store.limits().max_age.is_some() || !self.store.limits().keep_acked.is_zero() {
            self.commit(appends, acks, true);
        }
        let mut reclaimed = false;
        match self.store.free_pages() {
            Ok(free)
                if free > 0
                    && (idle
                        || (free > RECLAIM_KEEP_FREE
                            && self.store.depth() < RECLAIM_MAX_DEPTH)) =>
            {
                let pages = if idle {
                    RECLAIM_PAGES
                } else {
                    RECLAIM_PAGES.min((free - RECLAIM_KEEP_FREE) as u32)
                };
                match self.store.reclaim(pages) {
                    Ok(()) => reclaimed = true,
                    Err(e) => tracing::warn!(error = %e, "queue: reclaiming free pages failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "queue: reading the free list failed"),
        }
        // The reclaim went through the WAL: checkpoint it too, so the space is given back.
        if idle && (written || reclaimed) {
            let _quiet = self.checkpoints.quiet();
            if let Err(e) = self.store.checkpoint() {
                tracing::debug!(error = %e, "queue checkpoint failed (a reader may hold it)");
            }
        }
    }

    /// A CLI request (replay of kept events, retry of parked ones).
    fn apply(&mut self, req: &Request) {
        match self.store.apply(req) {
            Ok((n, c)) => {
                tracing::info!(events = n, request = ?req, "queued again at the CLI's request (same ids)");
                self.publish_counters();
                self.reset_tail();
                self.committed.send_replace(c.last_pos);
            }
            Err(e) => tracing::error!(error = %e, request = ?req, "queue request failed"),
        }
    }

    /// Rows were removed or inserted out of order: the forwarder must read the file again.
    fn reset_tail(&self) {
        if let Ok(mut t) = self.tail.lock() {
            t.reset(self.store.next_pos());
        }
    }

    fn publish_counters(&self) {
        self.metrics.queue_depth.set(self.store.depth() as i64);
        self.metrics.queue_bytes.set(self.store.bytes() as i64);
    }

    fn commit(&mut self, appends: &mut Vec<Event>, acks: &mut Vec<u64>, mut expire: bool) {
        // While commits fail (a full disk), acknowledgements and expiry do not wait on the
        // appends that cannot commit: they go first, in a transaction of their own. Deleting
        // is what gives the space back; it must never depend on finding space for new rows.
        if self.is_failing() && (!acks.is_empty() || expire) {
            self.commit_removals(acks, expire);
            expire = false;
        }
        if self.retry.is_empty() && appends.is_empty() && acks.is_empty() && !expire {
            return;
        }
        // Behind failed commits, new events wait their turn in the retry buffer, and a group
        // takes at most `max_batch` of it: the WAL holds a whole transaction, and one too large
        // is what a nearly full disk cannot take.
        if !self.retry.is_empty() {
            self.buffer(appends);
        }
        let retried = self.retry.len().min(self.max_batch.max(1));
        // Only appends can grow the queue: a group of acknowledgements needs no statvfs.
        if !appends.is_empty() || !self.retry.is_empty() {
            self.check_space();
        }
        let now = store::now_us();
        let oldest = self.retry.front().or(appends.first()).map(|e| e.time);
        // For the forwarder's tail: (index in retry + appends, seq, pos). Envelopes are built
        // and the events' own strings moved in once the commit succeeded and the sensors'
        // tickets are settled: their PUBACKs do not wait for the tail.
        let mut fresh: Vec<(usize, u64, u64)> = Vec::new();
        let result = (|| {
            let mut txn = self.store.begin()?;
            // Removals first: the appends reuse the pages they free (see `store::Txn`).
            txn.ack(acks, now)?;
            if expire {
                txn.expire(now)?;
            }
            let group = self.retry.iter().take(retried).chain(appends.iter());
            for (i, e) in group.enumerate() {
                let appended = txn.append(e, &self.source)?;
                if let (true, store::Appended::Queued { seq, pos }) = (self.tail_keeps, appended) {
                    fresh.push((i, seq, pos));
                }
            }
            txn.commit()
        })();
        match result {
            Ok(c) => {
                // Counted as committed before any of its PUBACKs goes (the count never trails
                // what the sensors were told), then the tickets settled: nothing waits before
                // them any more. The tail's envelopes are built after that.
                self.metrics.events_committed.inc_by(c.appended);
                if self.retry.len() == retried {
                    self.settle_all();
                }
                let r = c.removed;
                if r.evicted > 0 || r.expired > 0 {
                    // Rows left from the middle of the queue, perhaps from the tail too.
                    self.reset_tail();
                } else if !fresh.is_empty() {
                    // The file holds the envelope's parts (`store::row`); the tail gets the
                    // envelope itself, the same bytes a read of the row gives. Built before the
                    // tail is locked: the forwarder reads it meanwhile.
                    let mut fresh = fresh.into_iter().peekable();
                    let source = &self.source;
                    let events = self
                        .retry
                        .iter_mut()
                        .take(retried)
                        .chain(appends.iter_mut());
                    let committed: Vec<StoredEvent> = events
                        .enumerate()
                        .filter_map(|(i, e)| {
                            let (_, seq, pos) = fresh.next_if(|f| f.0 == i)?;
                            Some(StoredEvent {
                                pos,
                                seq,
                                class: e.class,
                                time_us: store::micros(e.time),
                                body: e.envelope(source, seq),
                                subject: std::mem::take(&mut e.subject),
                                topic: std::mem::take(&mut e.upstream_topic),
                            })
                        })
                        .collect();
                    if let Ok(mut t) = self.tail.lock() {
                        for e in committed {
                            t.push(e);
                        }
                    }
                }
                self.retry.drain(..retried);
                appends.clear();
                acks.clear();
                self.metrics.commits.inc();
                if let Some(t) = oldest {
                    let window = std::time::SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default();
                    self.metrics.commit_latency.observe(window.as_secs_f64());
                }
                self.publish_counters();
                self.metrics.set_last_sequence(c.last_seq);
                self.report_removed(r);
                if c.appended > 0 {
                    self.committed.send_replace(c.last_pos);
                }
                self.set_failing(None);
            }
            Err(e) => {
                self.log_failure(&e, self.retry.len() + appends.len());
                self.set_failing(Some(&e));
                // Nothing of this group is committed. Keep the appends (bounded) for the retry;
                // the acks (and expiry) are committed on their own right away, with the space
                // reserve given back if the disk is full.
                self.buffer(appends);
                if e.is_disk_full() {
                    self.release_ballast();
                }
                if e.is_corruption() {
                    self.recover_from_corruption(acks);
                } else if !acks.is_empty() || expire {
                    self.commit_removals(acks, expire);
                }
            }
        }
    }

    /// Keep events whose commit failed (or waits behind one) for the retry, up to its bound;
    /// what does not fit is counted.
    fn buffer(&mut self, appends: &mut Vec<Event>) {
        for e in appends.drain(..) {
            if self.retry.len() >= self.retry_limit {
                self.metrics.drop_events(
                    DropReason::QueueWriteFailed,
                    1,
                    &"queue commit failing and memory buffer full",
                );
            } else {
                self.retry.push_back(e);
            }
        }
    }

    /// The disk is full: give the space reserve back so removals can commit. Until it is
    /// filled again, the queue grows no further (see `check_space`).
    fn release_ballast(&mut self) {
        if self.ballast.release() {
            tracing::warn!(
                bytes = space::BALLAST_BYTES,
                "queue: disk full; space reserve given back so acknowledgements can commit"
            );
        }
        self.ballast_released = true;
    }

    /// Acknowledgements (and expiry) alone, in a transaction of their own. On a full disk the
    /// space reserve is given back and they are tried once more.
    fn commit_removals(&mut self, acks: &mut Vec<u64>, expire: bool) {
        let now = store::now_us();
        let attempt = |store: &mut Store| {
            let mut txn = store.begin()?;
            txn.ack(acks, now)?;
            if expire {
                txn.expire(now)?;
            }
            txn.commit()
        };
        let mut result = attempt(&mut self.store);
        if matches!(&result, Err(e) if e.is_disk_full()) && self.ballast.present() {
            self.release_ballast();
            result = attempt(&mut self.store);
        }
        match result {
            Ok(c) => {
                acks.clear();
                if c.removed.expired > 0 {
                    self.reset_tail();
                }
                self.publish_counters();
                self.report_removed(c.removed);
            }
            Err(e) => {
                self.log_failure(&e, self.retry.len());
                self.set_failing(Some(&e));
            }
        }
    }

    fn is_failing(&self) -> bool {
        self.last_error_log.is_some() || !self.retry.is_empty()
    }

    fn set_failing(&mut self, e: Option<&StoreError>) {
        if e.is_none() && self.last_error_log.take().is_some() {
            tracing::info!("queue writes recovered");
        }
        if let Ok(mut f) = self.failing.lock() {
            *f = e.map(|e| e.to_string());
        }
    }

    fn log_failure(&mut self, e: &StoreError, buffered: usize) {
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::error!(
                error = %e,
                disk_full = e.is_disk_full(),
                buffered,
                "queue commit failed; keeping events in memory and retrying"
            );
            self.last_error_log = Some(Instant::now());
        }
    }

    /// Count (and log) what a commit removed other than by acknowledgement.
    fn report_removed(&self, r: store::Removed) {
        let why = if self.store.space_capped() {
            "file system short of queue.min_free"
        } else {
            "queue full (queue.max_events/max_bytes)"
        };
        if r.evicted > 0 {
            self.metrics.drop_events(
                DropReason::Evicted,
                r.evicted,
                &format_args!("{why}: oldest telemetry evicted"),
            );
        }
        if r.rejected > 0 {
            self.metrics.drop_events(
                DropReason::Rejected,
                r.rejected,
                &format_args!("{why}: new events rejected"),
            );
        }
        if r.expired > 0 {
            self.metrics
                .drop_events(DropReason::Expired, r.expired, &"older than queue.max_age");
        }
    }

    /// After the space reserve was given back: fill it again once the file system has room for
    /// it twice and `queue.min_free` besides.
    fn refill_ballast(&mut self) {
        if !self.ballast_released {
            return;
        }
        let Ok(s) = space::of(&self.dir) else { return };
        if s.free < space::BALLAST_BYTES * 2 + self.min_free.bytes(s.total) {
            return;
        }
        match self.ballast.fill() {
            Ok(()) => {
                self.ballast_released = false;
                tracing::info!("queue: space reserve filled again");
            }
            Err(e) => tracing::debug!(error = %e, "queue: filling the space reserve failed"),
        }
    }

    /// Before a commit: is the file system short of `queue.min_free`? Then the queue may not
    /// grow (see [`space`]).
    fn check_space(&mut self) {
        self.refill_ballast();
        let short = match space::of(&self.dir) {
            Ok(s) => {
                // The WAL may grow up to its limit before a checkpoint resets it.
                let wal = store::WAL_LIMIT.saturating_sub(self.store.wal_len());
                let min_free = self.min_free.bytes(s.total);
                let reserve = min_free + if min_free > 0 { wal } else { 0 };
                let short = (reserve > 0 && s.free < reserve) || self.ballast_released;
                if short != self.store.space_capped() {
                    if short {
                        tracing::warn!(free = s.free, reserve, depth = self.store.depth(), "queue file system short of queue.min_free: the queue grows no further (oldest telemetry evicted, or new events rejected, as queue.when_full says)");
                    } else {
                        tracing::info!(free = s.free, reserve, "queue file system has room again");
                    }
                }
                short
            }
            Err(e) => {
                tracing::debug!(error = %e, dir = %self.dir.display(), "statvfs of the queue directory failed");
                self.store.space_capped()
            }
        };
        self.store.cap_at_current_size(short);
    }

    /// The file went bad under us: move it aside and continue on a fresh one. Numbering goes
    /// on where the old file stopped, positions as well as sequences: the forwarder's cursor,
    /// its events in flight and any acknowledgement still on its way name positions of the old
    /// file, which must never name a row of the new one. The pending acknowledgements are
    /// dropped (their rows went with the old file), the events left in it are counted
    /// (`quarantined`), and the tail starts a new epoch, so the forwarder's reader starts over.
    fn recover_from_corruption(&mut self, acks: &mut Vec<u64>) {
        let limits = self.store.limits();
        let (next_seq, next_pos, lost) = (
            self.store.next_seq(),
            self.store.next_pos(),
            self.store.depth(),
        );
        // No checkpoint may run on the file while it is moved aside.
        let quiet = self.checkpoints.quiet();
        let reopened = Store::open(&self.path, self.sync, limits);
        drop(quiet);
        match reopened {
            Ok((mut store, report)) => {
                if let Some(aside) = &report.quarantined {
                    tracing::error!(kept_as = %aside.display(), lost, "queue file is corrupt; moved aside, continuing on a fresh queue");
                }
                if let Err(e) = store.continue_after(next_seq, next_pos) {
                    tracing::error!(error = %e, "queue: recording the sequence high-water mark in the fresh file failed");
                }
                self.store = store;
                self.checkpoints.restart(&mut self.store);
                acks.clear();
                self.metrics.drop_events(
                    DropReason::Quarantined,
                    lost,
                    &"queued events left in a corrupt queue file (moved aside, not deleted)",
                );
                self.publish_counters();
                if let Ok(mut t) = self.tail.lock() {
                    t.new_epoch(self.store.next_pos());
                }
                // Let a waiting forwarder look again.
                self.committed.send_modify(|_| {});
            }
            Err(e) => {
                tracing::error!(error = %e, "queue file is corrupt and could not be replaced")
            }
        }
    }

    fn answer(&self, c: Command) {
        match c {
            Command::Lease {
                cursor,
                limit,
                want,
                max_bytes,
                reply,
            } => {
                let upto = Some(self.store.next_pos().saturating_sub(1));
                let leased = match self.store.lease_bounded(cursor, want, limit, max_bytes) {
                    Ok((rows, cut)) => Leased { rows, upto, cut },
                    Err(e) => {
                        tracing::error!(error = %e, "queue read failed");
                        Leased {
                            rows: Vec::new(),
                            upto: None,
                            cut: false,
                        }
                    }
                };
                let _ = reply.send(leased);
            }
            Command::Stats(reply) => match self.store.stats() {
                Ok(s) => {
                    let _ = reply.send(s);
                }
                Err(e) => tracing::error!(error = %e, "queue stats failed"),
            },
            Command::Append(..) | Command::Settle(_) | Command::Ack(_) | Command::Park(..) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::core::event::{Class, Data};
    use store::tests::ev;

    /// A writer on a fresh file in `dir` with `commit_delay`.
    fn writer(
        dir: &std::path::Path,
        commit_delay: Duration,
    ) -> (QueueHandle, QueueWriter, Arc<Metrics>) {
        let mut cfg = Config::defaults().queue;
        cfg.commit_delay = commit_delay;
        let path = dir.join("queue.db");
        let (store, _) = Store::open(&path, SyncMode::Normal, limits(&cfg)).unwrap();
        let metrics = Metrics::new();
        let (q, w) = start(store, &cfg, path, "gw".into(), 1024, 1024, metrics.clone()).unwrap();
        (q, w, metrics)
    }

    /// An event with a reading of about the bench's size (a ~100-byte JSON payload).
    fn reading(n: usize) -> Event {
        let mut e = ev(Class::Telemetry, &format!("sensors/s{}/temp", n % 4));
        e.data = Data::Json(
            format!(
                r#"{{"run":"test","p":{},"n":{n},"ts":1700000000000000,"value":21.5,"unit":"C"}}"#,
                n % 4
            )
            .into_bytes()
            .into(),
        );
        e
    }

    async fn committed_to(q: &QueueHandle, pos: u64) {
        let mut c = q.committed();
        tokio::time::timeout(Duration::from_secs(10), c.wait_for(|p| *p >= pos))
            .await
            .expect("commit in time")
            .expect("writer running");
    }

    /// A read that reaches the end of what was read ahead tops it up: fewer rows than asked
    /// for only at the end of the queue (the held-back scan and the forwarder take a short
    /// read as the end). Envelopes of ~900 bytes: each trip to the file stops at the byte bound
    /// between two reads' worth.
    #[tokio::test]
    async fn reads_are_full_until_the_end_across_what_was_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (q, w, _m) = writer(dir.path(), Duration::ZERO);
        let n = 2000;
        for i in 0..n {
            let mut e = reading(i);
            e.data = Data::Json(
                format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(600))
                    .into_bytes()
                    .into(),
            );
            q.append(e).await.unwrap();
        }
        committed_to(&q, n as u64).await;
        let mut r = Reader::default();
        let mut got = Vec::new();
        loop {
            let rows = q.read(&mut r, 256).await.unwrap();
            let len = rows.len();
            got.extend(rows.into_iter().map(|e| e.pos));
            if len < 256 {
                break;
            }
        }
        assert_eq!(got, (1..=n as u64).collect::<Vec<_>>());
        drop(q);
        w.join();
    }

    /// WAL frames written since the last checkpoint, checkpointing them (another connection).
    fn wal_frames(path: &std::path::Path) -> i64 {
        let c = rusqlite::Connection::open(path).unwrap();
        let frames = c
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
            .unwrap();
        let busy: i64 = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0, "checkpoint blocked");
        frames
    }

    /// A store at `path` whose checkpoints are taken over, the thread working on `thread_path`.
    fn store_with_checkpoints(
        path: &std::path::Path,
        thread_path: PathBuf,
    ) -> (Store, checkpoint::Checkpoints) {
        let cfg = Config::defaults().queue;
        let (mut store, _) = Store::open(path, SyncMode::Normal, limits(&cfg)).unwrap();
        let cp = checkpoint::Checkpoints::start(&mut store, thread_path);
        (store, cp)
    }

    /// `n` single-event commits, each followed by the writer's checkpoint step and then
    /// `pause(checkpoints, frames in the WAL)`: how often the WAL started over, and the largest
    /// its file got.
    fn commits(
        store: &mut Store,
        cp: &mut checkpoint::Checkpoints,
        wal: &std::path::Path,
        n: usize,
        mut pause: impl FnMut(&checkpoint::Checkpoints, u32),
    ) -> (usize, u64) {
        let (mut restarts, mut last, mut largest) = (0, 0, 0);
        for i in 0..n {
            let mut txn = store.begin().unwrap();
            txn.append(&reading(i), "gw").unwrap();
            txn.commit().unwrap();
            cp.step(store);
            let frames = store.wal_frames().unwrap();
            if frames < last {
                restarts += 1;
            }
            last = frames;
            largest = largest.max(std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0));
            pause(cp, frames);
        }
        (restarts, largest)
    }

    /// [`commits`] with no pause.
    fn steady_commits(
        store: &mut Store,
        cp: &mut checkpoint::Checkpoints,
        wal: &std::path::Path,
        n: usize,
    ) -> (usize, u64) {
        commits(store, cp, wal, n, |_, _| {})
    }

    /// Steady commits with no pause (a checkpoint thread alone never catches up with the last
    /// frame, so the WAL could never start over): the writer finishes each checkpoint the
    /// thread started, the WAL starts over again and again, its file stays within
    /// `WAL_LIMIT`, and every event is still there. Without the writer's part the WAL only
    /// grows (tried: 34 MB after this loop, never started over).
    #[test]
    fn under_steady_commits_the_wal_starts_over_and_stays_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let (mut store, mut cp) = store_with_checkpoints(&path, path.clone());
        const N: usize = 30_000;
        let (restarts, largest) =
            steady_commits(&mut store, &mut cp, &dir.path().join("queue.db-wal"), N);
        let (by_writer, by_thread) = cp.counts();
        assert!(restarts >= 3, "the WAL started over {restarts} times");
        assert!(
            by_thread >= 1 && by_writer >= 1,
            "thread {by_thread}, writer {by_writer}"
        );
        assert!(
            largest <= store::WAL_LIMIT,
            "WAL file reached {largest} bytes"
        );
        assert_eq!(store.depth(), N as u64);
        drop(cp);
        let events: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(events, N as i64);
    }

    /// At a low rate (a pause after each request, long enough for the thread's run) the thread
    /// does every checkpoint and the WAL starts over after each, with no checkpoint on the
    /// writer: a request left over from the previous round must not make the writer take the
    /// next one itself (it did, before `step` forgot it when the WAL started over).
    #[test]
    fn at_a_low_rate_the_thread_does_every_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let (mut store, mut cp) = store_with_checkpoints(&path, path.clone());
        let due = store.checkpoint_frames();
        let wal = dir.path().join("queue.db-wal");
        let (restarts, _) = commits(&mut store, &mut cp, &wal, 5_000, |cp, frames| {
            if frames >= due {
                // The pause: until the thread's run is over.
                let runs = cp.counts().1;
                let until = Instant::now() + Duration::from_secs(10);
                while cp.counts().1 == runs && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        assert!(restarts >= 3, "the WAL started over {restarts} times");
        assert_eq!(
            cp.counts().0,
            0,
            "checkpoints on the writer (thread runs: {})",
            cp.counts().1
        );
    }

    /// A checkpoint thread that cannot do its work (here it cannot open the file: it was given
    /// a path that does not exist; in life, out of file descriptors) costs only its log lines:
    /// the writer checkpoints after each failed run, and the WAL stays within its limit.
    #[test]
    fn a_checkpoint_thread_that_fails_leaves_the_wal_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let (mut store, mut cp) = store_with_checkpoints(&path, dir.path().join("no/such.db"));
        let (restarts, largest) = steady_commits(
            &mut store,
            &mut cp,
            &dir.path().join("queue.db-wal"),
            20_000,
        );
        assert!(restarts >= 3, "the WAL started over {restarts} times");
        assert!(
            largest <= store::WAL_LIMIT,
            "WAL file reached {largest} bytes"
        );
        assert!(
            cp.counts().0 >= 3,
            "the writer checkpointed {:?}",
            cp.counts()
        );
    }

    /// Healthy link at a low rate (groups of 5, as the bench's 100 readings/s with a 50 ms
    /// commit delay made): each group commits with the acknowledgements of the one before.
    /// Such a commit writes the pages of the new rows (two or three rows share a page since
    /// rows hold the envelope's parts, `store::row`) and the few pages every commit touches
    /// (file header, pointer map, table root, free-list trunk), not a half-filled last page
    /// again nor a separate commit for the acknowledgements. Measured here: 1 KiB pages with
    /// acks committed on their own ~1,800 B per event; 512-byte pages and acks with the next
    /// group 857 B; rows of parts 536 B.
    #[tokio::test]
    async fn small_groups_with_their_acknowledgements_write_about_one_page_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let (q, w, _) = writer(dir.path(), Duration::from_millis(50));
        const N: usize = 5;
        const ROUNDS: usize = 22;
        let mut frames = 0;
        for round in 0..ROUNDS {
            for i in 0..N {
                q.append(reading(round * N + i)).await.unwrap();
            }
            committed_to(&q, ((round + 1) * N) as u64).await;
            // The first two rounds fill the table to its steady size; the rest is measured.
            if round == 1 {
                wal_frames(&path);
            }
            if round == ROUNDS - 1 {
                frames = wal_frames(&path);
            }
            let done: Vec<u64> = (round * N + 1..=(round + 1) * N)
                .map(|p| p as u64)
                .collect();
            q.ack(done).await.unwrap();
        }
        let page: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        let events = ((ROUNDS - 2) * N) as i64;
        let per_event = frames * (page + 24) / events;
        assert!(
            per_event <= 700,
            "{frames} frames of {page} bytes for {events} events and their acks: {per_event} B/event"
        );
        drop(q);
        w.join();
    }

    /// Many sensors each sending a little (no connection bursting) still commit once a group
    /// holds [`GROUP_ENOUGH`] appends, not after the whole delay (an hour here).
    #[tokio::test]
    async fn a_large_enough_group_does_not_wait_out_the_commit_delay() {
        let dir = tempfile::tempdir().unwrap();
        let (q, w, _) = writer(dir.path(), Duration::from_secs(3600));
        for i in 0..GROUP_ENOUGH {
            q.append(reading(i)).await.unwrap();
        }
        committed_to(&q, GROUP_ENOUGH as u64).await;
        drop(q);
        w.join();
    }

    /// Acknowledgements alone wait (at most `ACK_HOLD`) for appends to share a commit with;
    /// a request for a reply (stats, a lease) commits them first.
    #[tokio::test]
    async fn acknowledgements_alone_wait_for_appends_but_not_for_a_reply() {
        let dir = tempfile::tempdir().unwrap();
        let (q, w, m) = writer(dir.path(), Duration::ZERO);
        for i in 0..5 {
            q.append(reading(i)).await.unwrap();
        }
        committed_to(&q, 5).await;
        let commits = m.commits.get();
        q.ack(vec![1, 2]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(m.commits.get(), commits, "acks alone committed at once");
        assert_eq!(m.queue_depth.get(), 5);
        // Appends take the held acks along: one commit.
        q.append(reading(5)).await.unwrap();
        committed_to(&q, 6).await;
        assert_eq!(m.commits.get(), commits + 1);
        assert_eq!(m.queue_depth.get(), 4);
        // A reply waiting: held acks commit before it is answered.
        q.ack(vec![3]).await.unwrap();
        assert_eq!(q.stats().await.unwrap().depth, 3);
        // And with nothing else coming, acks commit within ACK_HOLD.
        q.ack(vec![4]).await.unwrap();
        let until = Instant::now() + ACK_HOLD * 3;
        while m.queue_depth.get() != 2 {
            assert!(Instant::now() < until, "held acks never committed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(q);
        w.join();
    }

    /// Tickets are settled only after the commit of everything sorted before them, in order;
    /// a lone Settle (a reading that became no event) waits behind earlier appends too.
    #[tokio::test]
    async fn tickets_settle_after_the_commit_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (q, w, m) = writer(dir.path(), Duration::from_millis(300));
        let acks = crate::core::ack::Acks::new();
        q.append_settling(reading(0), Some(acks.ticket()))
            .await
            .unwrap();
        q.settle(acks.ticket()).await.unwrap();
        // Within the commit delay: not committed, nothing settled.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(m.events_committed.get(), 0);
        assert_eq!(acks.settled(), 0, "settled before its commit");
        let until = Instant::now() + Duration::from_secs(5);
        while acks.settled() < 2 {
            assert!(Instant::now() < until, "never settled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(m.events_committed.get(), 1, "settled only after the commit");
        drop(q);
        w.join();
    }

    /// A connection with a burst of readings in the group (a sender held by its own in-flight
    /// window) does not wait out the commit delay; a few readings do.
    #[tokio::test]
    async fn a_burst_from_one_connection_does_not_wait_out_the_commit_delay() {
        let dir = tempfile::tempdir().unwrap();
        let (q, w, _m) = writer(dir.path(), Duration::from_secs(2));
        let settle_time = |n: usize| {
            let q = q.clone();
            async move {
                let acks = crate::core::ack::Acks::new();
                let t0 = Instant::now();
                for i in 0..n {
                    q.append_settling(reading(i), Some(acks.ticket()))
                        .await
                        .unwrap();
                }
                while acks.settled() < n as u64 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                t0.elapsed()
            }
        };
        let burst = settle_time(BURST as usize * 2).await;
        assert!(
            burst < Duration::from_millis(1000),
            "a burst waited {burst:?}"
        );
        let few = settle_time(BURST as usize - 1).await;
        assert!(
            few >= Duration::from_millis(1500),
            "a few readings committed after {few:?}"
        );
        drop(q);
        w.join();
    }
}
