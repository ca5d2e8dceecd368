//! Store-and-forward queue: the only owner of the SQLite file, on an OS thread of its own.
//!
//! ```text
//! rules ──Append──┐                          ┌──> watch<last committed seq> ──> forwarder
//! forwarder ─Ack──┼─> [bounded channel] ─> writer thread (group commit)
//! forwarder ─Lease┘                          └──> Lease reply (oneshot)
//! ```
//!
//! Invariants:
//! - Commands are applied in channel order; a commit group is what arrived while the previous
//!   commit ran (plus at most `queue.commit_delay`, at most `queue.max_batch` events). Appends and
//!   acks share one transaction: one write per group, never one per event.
//! - An event is visible to leases only after its transaction committed: the forwarder never
//!   sends what could still be lost.
//! - A row is deleted only by an Ack, which the forwarder sends only after the upstream PUBACK.
//! - When a commit fails (disk full, I/O error), the appends of that group are kept in a bounded
//!   memory buffer and retried; what does not fit is counted as `queue_write_failed`.

pub mod store;

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::config::QueueConfig;
use crate::event::Event;
use crate::ops::metrics::{DropReason, Metrics};
pub use store::{Cursor, Stats, Store, StoreError, StoredEvent};

enum Command {
    Append(Event),
    Ack(Vec<u64>),
    Lease {
        cursor: Cursor,
        limit: usize,
        reply: oneshot::Sender<Vec<StoredEvent>>,
    },
    Stats(oneshot::Sender<Stats>),
}

/// Sending side of the queue, cloned by each stage that talks to it.
#[derive(Clone)]
pub struct QueueHandle {
    tx: flume::Sender<Command>,
    committed: watch::Receiver<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("the queue writer has stopped")]
pub struct QueueClosed;

/// Outcome of a non-waiting append.
pub enum TryAppend {
    Sent,
    Full(Event),
    Closed,
}

impl QueueHandle {
    /// Append, waiting while the channel is full.
    pub async fn append(&self, event: Event) -> Result<(), QueueClosed> {
        self.tx
            .send_async(Command::Append(event))
            .await
            .map_err(|_| QueueClosed)
    }

    pub fn try_append(&self, event: Event) -> TryAppend {
        match self.tx.try_send(Command::Append(event)) {
            Ok(()) => TryAppend::Sent,
            Err(flume::TrySendError::Full(Command::Append(e))) => TryAppend::Full(e),
            Err(_) => TryAppend::Closed,
        }
    }

    /// Acknowledge delivered events: they are deleted in the next commit group.
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<(), QueueClosed> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.tx
            .send_async(Command::Ack(seqs))
            .await
            .map_err(|_| QueueClosed)
    }

    /// Committed events after `cursor`, alerts first.
    pub async fn lease(
        &self,
        cursor: Cursor,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, QueueClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Lease {
                cursor,
                limit,
                reply,
            })
            .await
            .map_err(|_| QueueClosed)?;
        rx.await.map_err(|_| QueueClosed)
    }

    pub async fn stats(&self) -> Result<Stats, QueueClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Stats(reply))
            .await
            .map_err(|_| QueueClosed)?;
        rx.await.map_err(|_| QueueClosed)
    }

    /// Last committed sequence; changes after each commit that appended.
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

/// Open the queue file and start its writer thread.
pub fn start(
    store: Store,
    cfg: &QueueConfig,
    source: String,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> Result<(QueueHandle, QueueWriter), std::io::Error> {
    let (tx, rx) = flume::bounded(capacity);
    let last = store.next_seq().saturating_sub(1);
    let (committed_tx, committed) = watch::channel(last);
    metrics.queue_depth.set(store.depth() as i64);
    metrics.queue_bytes.set(store.bytes() as i64);
    metrics.set_last_sequence(last);
    let writer = Writer {
        store,
        rx,
        source,
        commit_delay: cfg.commit_delay,
        max_batch: cfg.max_batch,
        retry: VecDeque::new(),
        retry_limit: capacity.max(cfg.max_batch),
        committed: committed_tx,
        metrics,
        last_error_log: None,
    };
    let thread = std::thread::Builder::new()
        .name("edgegate-queue".into())
        .spawn(move || writer.run())?;
    Ok((
        QueueHandle { tx, committed },
        QueueWriter {
            thread: Some(thread),
        },
    ))
}

struct Writer {
    store: Store,
    rx: flume::Receiver<Command>,
    source: String,
    commit_delay: Duration,
    max_batch: usize,
    /// Appends whose commit failed, oldest first, retried before new ones.
    retry: VecDeque<Event>,
    retry_limit: usize,
    committed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    last_error_log: Option<Instant>,
}

const IDLE_TICK: Duration = Duration::from_secs(1);

impl Writer {
    fn run(mut self) {
        let mut appends: Vec<Event> = Vec::new();
        let mut acks: Vec<u64> = Vec::new();
        let mut replies: Vec<Command> = Vec::new();
        let mut idle_since = Instant::now();
        let mut reclaimed = true;
        loop {
            let first = match self.rx.recv_timeout(if self.retry.is_empty() {
                IDLE_TICK
            } else {
                Duration::from_millis(200)
            }) {
                Ok(c) => Some(c),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            if let Some(first) = first {
                self.sort(first, &mut appends, &mut acks, &mut replies);
                self.gather(&mut appends, &mut acks, &mut replies);
            }
            if !appends.is_empty() || !acks.is_empty() || !self.retry.is_empty() {
                self.commit(&mut appends, &mut acks);
                idle_since = Instant::now();
                reclaimed = false;
            } else if !reclaimed && idle_since.elapsed() >= IDLE_TICK {
                // Quiet for a while: give freed pages back and fold the WAL in.
                if let Err(e) = self
                    .store
                    .reclaim(1000)
                    .and_then(|_| self.store.checkpoint())
                {
                    tracing::warn!(error = %e, "queue maintenance failed");
                }
                reclaimed = true;
            }
            for r in replies.drain(..) {
                self.answer(r);
            }
        }
        // Channel closed: every sender is gone, commit what is left.
        if !appends.is_empty() || !acks.is_empty() || !self.retry.is_empty() {
            self.commit(&mut appends, &mut acks);
        }
        if !self.retry.is_empty() {
            let n = self.retry.len() as u64;
            self.metrics.drop_events(
                DropReason::Shutdown,
                n,
                &"queue could not commit before shutdown",
            );
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "queue checkpoint at shutdown failed");
        }
        tracing::info!(
            depth = self.store.depth(),
            next_sequence = self.store.next_seq(),
            "queue closed"
        );
    }

    fn sort(
        &self,
        c: Command,
        appends: &mut Vec<Event>,
        acks: &mut Vec<u64>,
        replies: &mut Vec<Command>,
    ) {
        match c {
            Command::Append(e) => appends.push(e),
            Command::Ack(s) => acks.extend(s),
            other => replies.push(other),
        }
    }

    /// Take what is already waiting (and, with a commit delay, what arrives soon) into the group.
    fn gather(&self, appends: &mut Vec<Event>, acks: &mut Vec<u64>, replies: &mut Vec<Command>) {
        let deadline = Instant::now() + self.commit_delay;
        while appends.len() < self.max_batch && acks.len() < self.max_batch * 4 {
            match self.rx.try_recv() {
                Ok(c) => self.sort(c, appends, acks, replies),
                Err(flume::TryRecvError::Empty) => {
                    if self.commit_delay.is_zero() || !replies.is_empty() {
                        break;
                    }
                    match self.rx.recv_deadline(deadline) {
                        Ok(c) => self.sort(c, appends, acks, replies),
                        Err(_) => break,
                    }
                }
                Err(flume::TryRecvError::Disconnected) => break,
            }
        }
    }

    fn commit(&mut self, appends: &mut Vec<Event>, acks: &mut Vec<u64>) {
        let retry_n = self.retry.len();
        let result = (|| {
            let mut txn = self.store.begin()?;
            for e in self.retry.iter().chain(appends.iter()) {
                txn.append(e, &self.source)?;
            }
            txn.ack(acks)?;
            txn.commit()
        })();
        match result {
            Ok(last) => {
                let added = (retry_n + appends.len()) as u64;
                self.retry.clear();
                appends.clear();
                acks.clear();
                self.metrics.commits.inc();
                self.metrics.events_committed.inc_by(added);
                self.metrics.queue_depth.set(self.store.depth() as i64);
                self.metrics.queue_bytes.set(self.store.bytes() as i64);
                self.metrics.set_last_sequence(last);
                if added > 0 {
                    self.committed.send_replace(last);
                }
                if self.last_error_log.take().is_some() {
                    tracing::info!("queue writes recovered");
                }
            }
            Err(e) => {
                // Nothing of this group is committed. Keep the appends (bounded) and the acks for
                // the retry.
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    tracing::error!(error = %e, buffered = self.retry.len() + appends.len(), "queue commit failed; buffering in memory and retrying");
                    self.last_error_log = Some(Instant::now());
                }
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
        }
    }

    fn answer(&self, c: Command) {
        match c {
            Command::Lease {
                cursor,
                limit,
                reply,
            } => {
                let rows = match self.store.lease(cursor, limit) {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::error!(error = %e, "queue read failed");
                        Vec::new()
                    }
                };
                let _ = reply.send(rows);
            }
            Command::Stats(reply) => match self.store.stats() {
                Ok(s) => {
                    let _ = reply.send(s);
                }
                Err(e) => tracing::error!(error = %e, "queue stats failed"),
            },
            Command::Append(_) | Command::Ack(_) => {}
        }
    }
}
