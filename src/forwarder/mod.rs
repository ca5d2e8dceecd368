//! Upstream forwarder: delivers the queue at-least-once to the cloud MQTT broker (rumqttc).
//!
//! Invariants:
//! - Only committed events are sent, read through a `queue::Reader` per connection: from the
//!   queue's in-memory tail of fresh commits while caught up with the file, from the file
//!   otherwise (at the start of every connection, behind a backlog).
//! - With `upstream.batch_events > 1`, consecutive telemetry events ready at once leave as one
//!   message (a CloudEvents JSON batch); its PUBACK acknowledges all of them, a refusal refuses
//!   all of them. Nothing waits to fill a batch.
//! - An event is acknowledged to the queue (and so deleted) only after the upstream PUBACK for
//!   the packet that carried it.
//! - Each connection gets a fresh rumqttc client and event loop; nothing of rumqttc's in-memory
//!   state is trusted across connections (it drops unacknowledged publishes when the broker
//!   reports no session). After any disconnect the lease cursor goes back to the head of the
//!   queue, so every unacknowledged event is sent again, in order. Duplicates are bounded by
//!   `upstream.inflight` (with batches, up to two batches more) and carry the same `id`.
//! - rumqttc's `publish()` returns no packet id: requests are matched FIFO to
//!   `Outgoing::Publish(pkid)` events, and settled on `PubAck{pkid}`. rumqttc's in-flight limit
//!   is one above our window of messages and its packet ids wrap there; a lease that becomes
//!   more messages than the window (events that cannot share a batch) waits in rumqttc's
//!   request channel. Brokers acknowledge QoS 1 in order (MQTT 3.1.1 4.6), so an id is free
//!   again before it comes round.
//! - No PUBACK for `upstream.ack_timeout` while publishes are in flight: the link is presumed
//!   half-open and is dropped.
//! - An event held back (a transient refusal, see [`held`]) stays queued and is offered again
//!   once due, on the same connection (a scan of the queue from its head for the due positions
//!   the reader has passed) or the next; due positions no longer queued are forgotten, and no
//!   new events are read while [`held::MAX_HELD_BACK`] are held.
//! - The forwarder talks to the upstream only through [`session::UpstreamSession`]: rumqttc in
//!   the daemon, a scripted fake in the unit tests (`machine_tests`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(test)]
mod fake;
mod held;
#[cfg(test)]
mod machine_tests;
pub mod session;

use rand::Rng;
use smallvec::SmallVec;
use tokio::sync::watch;

use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::core::bucket::TokenBucket;
use crate::core::event::Class;
use crate::core::metrics::Metrics;
use crate::queue::{Cursor, QueueClosed, QueueHandle, Reader, StoredEvent};
use held::{HeldBack, MAX_HELD_BACK};
use session::{Connector, Rumqttc, SessionError, Up, UpstreamSession};

/// Status shared with the rest of the daemon (health, systemd STATUS, demo).
#[derive(Debug, Clone, Default)]
pub struct UpstreamStatus {
    pub connected: bool,
    pub last_error: Option<String>,
}

pub struct Forwarder<C: Connector = Rumqttc> {
    connector: C,
    cfg: UpstreamConfig,
    queue: QueueHandle,
    metrics: Arc<Metrics>,
    status: watch::Sender<UpstreamStatus>,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
    /// Highest queue position sent on an earlier connection: leasing it again is a resend.
    sent_high: u64,
    /// Events the upstream refused in a way that may pass (see [`held`]), by queue position,
    /// with the time before which they are not sent again. They stay queued; a refused event
    /// must not hold back the ones behind it. Once due they are offered again, on the same
    /// connection or the next.
    held: HeldBack,
    /// The oldest message in flight when the last connections failed (the positions it
    /// carried), and how many connections in a row.
    failure_head: Option<(Positions, u32)>,
}

/// How long a refused event is held back before it is offered again.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// Why a connection ended.
enum End {
    Shutdown,
    Error(String),
}

impl Forwarder<Rumqttc> {
    /// A forwarder over rumqttc sessions.
    pub fn new(
        cfg: UpstreamConfig,
        queue: QueueHandle,
        metrics: Arc<Metrics>,
        status: watch::Sender<UpstreamStatus>,
        shutdown: watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Forwarder {
        Forwarder::with_connector(
            Rumqttc,
            cfg,
            queue,
            metrics,
            status,
            shutdown,
            drain_timeout,
        )
    }
}

impl<C: Connector> Forwarder<C> {
    /// A forwarder over the sessions `connector` opens.
    pub fn with_connector(
        connector: C,
        cfg: UpstreamConfig,
        queue: QueueHandle,
        metrics: Arc<Metrics>,
        status: watch::Sender<UpstreamStatus>,
        shutdown: watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Forwarder<C> {
        Forwarder {
            connector,
            cfg,
            queue,
            metrics,
            status,
            shutdown,
            drain_timeout,
            sent_high: 0,
            held: HeldBack::new(REFUSED_RETRY),
            failure_head: None,
        }
    }

    /// Hold refused events back for `retry` instead of [`REFUSED_RETRY`] (tests).
    #[cfg(test)]
    fn retry_after(mut self, retry: Duration) -> Self {
        self.held = HeldBack::new(retry);
        self
    }

    pub async fn run(mut self) {
        let Some(url) = self.cfg.url.clone() else {
            return;
        };
        let mut attempt: u32 = 0;
        let mut down_since: Option<Instant> = None;
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            if attempt > 0 {
                self.metrics.upstream_reconnects.inc();
            }
            let started = Instant::now();
            let end = self.connection(&url, &mut down_since).await;
            match end {
                End::Shutdown => {
                    self.set_connected(false, None);
                    break;
                }
                End::Error(e) => {
                    // A connection that worked for a while starts the backoff over.
                    if started.elapsed() > self.cfg.reconnect_max {
                        attempt = 0;
                    }
                    let delay = backoff(self.cfg.reconnect_min, self.cfg.reconnect_max, attempt);
                    if self.status.borrow().connected || attempt == 0 {
                        tracing::warn!(upstream = %url, error = %e, retry_in = ?delay, "upstream connection lost");
                        down_since = Some(Instant::now());
                    } else {
                        tracing::debug!(upstream = %url, error = %e, retry_in = ?delay, attempt, "upstream still unreachable");
                    }
                    self.set_connected(false, Some(e));
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        r = self.shutdown.changed() => if r.is_err() { break },
                    }
                }
            }
        }
        tracing::info!("forwarder stopped");
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        self.metrics.upstream_connected.set(connected as i64);
        self.status.send_modify(|s| {
            s.connected = connected;
            if error.is_some() || connected {
                s.last_error = error;
            }
        });
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&mut self, url: &UpstreamUrl, down_since: &mut Option<Instant>) -> End {
        // `upstream.inflight` bounds events in flight (and so duplicates after a reconnect);
        // with batches, that is fewer messages.
        let messages = self.cfg.inflight.div_ceil(self.cfg.batch_events).max(1);
        let mut window = messages;
        let session = self.connector.open(&self.cfg, url, window);
        let ev_rx = session.events();
        let mut state = Inflight::default();
        // This connection reads the queue from its start again: what was held back and is due
        // is met there and offered again (and positions deleted meanwhile are forgotten).
        self.held.release_due(Instant::now());
        let mut reader = Reader::default();
        let batch_events = self.cfg.batch_events;
        let mut committed = self.queue.committed();
        let mut connected = false;
        let mut draining_since: Option<Instant> = None;
        let mut acks = AckBatch::default();
        let mut tick =
            tokio::time::interval(Duration::from_millis(100).min(self.cfg.ack_timeout / 4));
        let mut caught_up = false;
        // `upstream.max_rate`: one second's worth of events at most in a burst.
        let mut rate = TokenBucket::new(self.cfg.max_rate);

        let end = loop {
            // Lease more when connected, not stopping, and there is room in the window (of
            // messages; a message carries up to `batch_events` events).
            let room = window.saturating_sub(state.len());
            let allowed = rate.available(room.saturating_mul(batch_events));
            let quarter = window.div_ceil(4);
            let may_lease = connected
                && draining_since.is_none()
                && allowed > 0
                && ((room >= quarter && allowed >= quarter.min(rate.burst())) || state.len() == 0);
            // Held-back events that are due go first (they are older); new events are read
            // while not too many are held back (an upstream refusing everything paces us).
            let due = self.held.any_due(Instant::now());
            let fresh = !caught_up && self.held.len() < MAX_HELD_BACK;
            if may_lease && (due || fresh) {
                let rows = if due {
                    let Ok(rows) = self.due_rows(reader.passed(), allowed).await else {
                        break End::Shutdown;
                    };
                    rows
                } else {
                    // Mark the current commit as seen before reading, so a commit that lands
                    // after the read still wakes us.
                    committed.borrow_and_update();
                    let Ok(rows) = self.queue.read(&mut reader, allowed).await else {
                        break End::Shutdown;
                    };
                    caught_up = rows.is_empty();
                    rows
                };
                let mut batch = Batch::default();
                let mut failed = None;
                // Events the upstream can never accept as they are: set aside, not sent.
                let mut unsendable: Vec<(u64, String)> = Vec::new();
                for row in rows {
                    let StoredEvent {
                        pos,
                        class,
                        topic,
                        body,
                        ..
                    } = row;
                    if self.held.holds(pos, Instant::now()) {
                        continue;
                    }
                    self.held.release(pos);
                    let batched = batch_events > 1 && class == Class::Telemetry;
                    let alone = (!batched).then_some(topic.as_str());
                    // In a batch, at least the array's brackets come with it.
                    let payload = body.len() + if batched { 2 } else { 0 };
                    if let Some(why) = unacceptable(alone, payload, &self.cfg) {
                        unsendable.push((pos, why));
                        continue;
                    }
                    if pos <= self.sent_high {
                        self.metrics.events_resent.inc();
                    }
                    rate.take();
                    state.sent_high = state.sent_high.max(pos);
                    if batched {
                        if batch.is_full(body.len(), batch_events, self.cfg.batch_bytes) {
                            if let Err(e) = self.send_batch(&session, &mut state, &mut batch) {
                                failed = Some(e);
                                break;
                            }
                        }
                        batch.add(pos, &body);
                        continue;
                    }
                    // Alerts (and everything without batching) go alone, in lease order.
                    if let Err(e) = self.send_batch(&session, &mut state, &mut batch) {
                        failed = Some(e);
                        break;
                    }
                    if let Err(e) = session.publish(topic, body) {
                        // Refused by the client library before it got a packet id: the
                        // connection ends; if the same event is refused again and again it is
                        // set aside (note_failure_head). (Not when the event loop is gone: its
                        // request channel then refuses every event alike.)
                        if session.alive() {
                            state.refused_request = Some(Positions::from_elem(pos, 1));
                        }
                        failed = Some(e);
                        break;
                    }
                    state.requested.push_back(Positions::from_elem(pos, 1));
                }
                for (why, group) in group_by_reason(unsendable) {
                    tracing::warn!(events = group.len(), position = group.first(), reason = %why, "an event the upstream cannot accept is set aside (queue peek --parked)");
                    if self.queue.park(group, why).await.is_err() {
                        break;
                    }
                }
                if failed.is_none() {
                    if let Err(e) = self.send_batch(&session, &mut state, &mut batch) {
                        failed = Some(e);
                    }
                }
                if let Some(e) = failed {
                    break End::Error(format!("publish request failed: {e}"));
                }
                continue;
            }

            tokio::select! {
                ev = ev_rx.recv_async() => {
                    let Ok(ev) = ev else { break End::Error("event loop ended".into()) };
                    match ev {
                        Ok(Up::Connected { session_present, receive_max }) => {
                            connected = true;
                            caught_up = false;
                            // Below the broker's receive maximum (MQTT 5).
                            window = session::effective_window(messages, receive_max);
                            self.set_connected(true, None);
                            match down_since.take() {
                                Some(t) => tracing::info!(session_present, down_for = ?t.elapsed(), window, "upstream connected again"),
                                None => tracing::info!(session_present, window, "upstream connected"),
                            }
                        }
                        Ok(Up::Sent(pkid)) => {
                            if let Some(pos) = state.requested.pop_front() {
                                if state.by_pkid.insert(pkid, (pos, Instant::now())).is_some() {
                                    break End::Error(format!("packet id {pkid} reused while in flight"));
                                }
                                state.last_progress = Instant::now();
                            }
                        }
                        Ok(Up::Acked { pkid, refused }) => {
                            if let Some((pos, sent)) = state.by_pkid.remove(&pkid) {
                                state.last_progress = Instant::now();
                                match refused {
                                    None => {
                                        self.metrics.ack_latency.observe(sent.elapsed().as_secs_f64());
                                        acks.add(&pos, Instant::now());
                                    }
                                    // MQTT 5 failure reason: not delivered, so not deleted. A
                                    // refusal that will not change by itself (topic, size,
                                    // format, authorization) sets a single event aside; any
                                    // other (quota, broker trouble), or a batch, is held back
                                    // for a while, then sent again.
                                    Some(reason) if pos.len() == 1 && session::refusal_is_final(&reason) => {
                                        tracing::warn!(reason, position = pos.first(), "upstream refused an event for good (PUBACK failure reason); set aside (queue peek --parked)");
                                        self.metrics.events_refused.inc();
                                        if self.queue.park(pos.to_vec(), format!("refused by the upstream: {reason}")).await.is_err() {
                                            break End::Shutdown;
                                        }
                                    }
                                    Some(reason) => {
                                        self.hold_back(&pos);
                                        tracing::warn!(reason, position = pos.first(), events = pos.len(), retry_in = ?REFUSED_RETRY, "upstream refused a message (PUBACK failure reason); its events stay queued");
                                    }
                                }
                            }
                        }
                        Ok(Up::Disconnected | Up::Other) => {}
                        Err(e) => break End::Error(e.to_string()),
                    }
                }
                changed = committed.changed(), if caught_up => {
                    if changed.is_err() {
                        break End::Shutdown;
                    }
                    caught_up = false;
                }
                _ = tokio::time::sleep(rate.next_in()), if connected && (!caught_up || due) && draining_since.is_none() && rate.limited() => {}
                _ = sleep_until(self.held.next_due()), if connected && !due && draining_since.is_none() && self.held.len() > 0 => {}
                _ = tokio::time::sleep(ACK_BATCH_WAIT), if acks.waiting() => {}
                _ = tick.tick() => {
                    if state.len() > 0 && state.last_progress.elapsed() > self.cfg.ack_timeout {
                        break End::Error(format!("no PUBACK for {:?} with {} in flight", self.cfg.ack_timeout, state.len()));
                    }
                }
                _ = self.shutdown.changed(), if draining_since.is_none() => {
                    draining_since = Some(Instant::now());
                }
            }

            // Hand settled events to the queue in batches: each Ack costs a commit (disk
            // writes on an SD card) and PUBACKs arrive one by one. Half a window of events (as
            // the broker's receive maximum allows), or ACK_BATCH_WAIT after the first,
            // whichever comes first. Deleting later is safe: an acknowledged row is never
            // leased again on this connection.
            let half_window = (window * batch_events).min(self.cfg.inflight).div_ceil(2);
            if let Some(ready) = acks.take_ready(half_window, Instant::now()) {
                self.metrics.events_forwarded.inc_by(ready.len() as u64);
                if self.queue.ack(ready).await.is_err() {
                    break End::Shutdown;
                }
            }
            if let Some(since) = draining_since {
                if state.len() == 0 {
                    break End::Shutdown;
                }
                if since.elapsed() >= self.drain_timeout {
                    tracing::warn!(in_flight = state.len(), "shutdown: upstream did not acknowledge everything in time; those events stay queued");
                    break End::Shutdown;
                }
            }
        };
        let acks = acks.take();
        if !acks.is_empty() {
            self.metrics.events_forwarded.inc_by(acks.len() as u64);
            let _ = self.queue.ack(acks).await;
        }
        if matches!(end, End::Shutdown) {
            session.disconnect();
            // Give the DISCONNECT a moment to leave.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Ok(Ok(ev)) = ev_rx.recv_async().await {
                    if matches!(ev, Up::Disconnected) {
                        break;
                    }
                }
            })
            .await;
        }
        drop(session);
        self.sent_high = self.sent_high.max(state.sent_high);
        if matches!(end, End::Error(_)) {
            self.note_failure_head(&state).await;
        }
        end
    }

    /// Some brokers refuse an event by closing the connection (Mosquitto after an MQTT 5 ACL
    /// denial; any broker for a packet over its size limit), often before the PUBACK can be read;
    /// and the client library may refuse a request outright. When connections keep dying with
    /// the same oldest message (or the same refused request), a single event is set aside
    /// (parked: the upstream will never take it as it is), a batch is held back for
    /// [`REFUSED_RETRY`] (which of its events is to blame is unknown), so neither can stall
    /// everything behind it.
    async fn note_failure_head(&mut self, state: &Inflight) {
        // The oldest event on the wire, if it left just before the connection died (a dead or
        // flapping link kills connections long after the send: that is not a refusal).
        let on_wire = state
            .by_pkid
            .values()
            .min_by_key(|(p, _)| p.first().copied())
            .filter(|(_, sent)| sent.elapsed() < POISON_WINDOW)
            .map(|(p, _)| p);
        let Some(head) = state.refused_request.as_ref().or(on_wire) else {
            self.failure_head = None;
            return;
        };
        let count = match &self.failure_head {
            Some((pos, n)) if pos == head => n + 1,
            _ => 1,
        };
        self.failure_head = Some((head.clone(), count));
        if count < POISON_AFTER {
            return;
        }
        self.failure_head = None;
        // A single event is set aside: the upstream will never take it as it is. (A connection
        // that dies just after a send may also die for reasons of its own, such as two gateways
        // sharing a client id; then the oldest events are set aside one by one, each after
        // three deaths in a row, listed and counted, and `queue retry` brings them back.
        // Holding such events back instead would retry Mosquitto's MQTT 5 ACL denial for ever:
        // it sends the refusal and closes at once, and the close often wins the race.)
        if head.len() == 1 {
            let why = if state.refused_request.is_some() {
                format!("refused by the MQTT client library {count} times in a row")
            } else {
                format!("the upstream closed the connection on it {count} times in a row")
            };
            tracing::warn!(position = head.first().copied(), reason = %why, "setting an event aside (queue peek --parked)");
            self.metrics.events_refused.inc();
            let _ = self.queue.park(head.to_vec(), why).await;
        } else {
            // (Not held back already: it was sent on this connection.)
            self.hold_back(head);
            tracing::warn!(position = head.first().copied(), events = head.len(), connections = count, retry_in = ?REFUSED_RETRY, "the upstream drops the connection on these events every time; holding them back (they stay queued)");
        }
    }
}

impl<C: Connector> Forwarder<C> {
    /// Keep these events queued but unsent for [`REFUSED_RETRY`] (counted as refused).
    fn hold_back(&mut self, positions: &[u64]) {
        self.metrics.events_refused.inc_by(positions.len() as u64);
        let now = Instant::now();
        for p in positions {
            self.held.hold(*p, now);
        }
    }

    /// Up to `limit` held-back events that are due, read from the queue: a scan from its head
    /// up to the last due position, taking only the due ones the connection's reader (at
    /// `passed`) has gone past (the others are released: the reader meets them itself). Each
    /// scan takes, releases or forgets at least one due position, so scans never spin. The scan reads what is still
    /// queued below them: events in flight, acknowledged ones not yet deleted, other held-back
    /// ones; a backlog only up to the due positions. Due positions the scan does not meet
    /// were deleted meanwhile (purged, expired, evicted) and are forgotten.
    async fn due_rows(
        &mut self,
        passed: Cursor,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, QueueClosed> {
        let due: HashSet<u64> = self.held.due(Instant::now()).into_iter().collect();
        let Some(last) = due.iter().max().copied() else {
            return Ok(Vec::new());
        };
        // A fresh reader starts at the head and reads the file (it is dropped before the tail
        // could answer it: the tail's events are the connection reader's).
        let mut scan = Reader::default();
        let mut out = Vec::new();
        let mut met = HashSet::new();
        let complete = loop {
            let rows = self.queue.read(&mut scan, DUE_SCAN_PAGE).await?;
            let end = rows.len() < DUE_SCAN_PAGE;
            for row in rows {
                if !due.contains(&row.pos) {
                    continue;
                }
                met.insert(row.pos);
                let reached = match row.class {
                    Class::Alert => passed.alert,
                    Class::Telemetry => passed.telemetry,
                };
                if row.pos > reached {
                    // The reader meets it itself (not held any more, it goes then): kept due
                    // here, every scan would find it again and none would ever read on.
                    self.held.release(row.pos);
                } else if out.len() < limit {
                    self.held.release(row.pos);
                    out.push(row);
                }
            }
            // Alerts come first in a lease: once telemetry is read past `last`, every alert
            // up to it was met too.
            let complete = end || scan.cursor().telemetry >= last;
            if complete || out.len() >= limit {
                break complete;
            }
        };
        if complete {
            for pos in due.difference(&met) {
                self.held.release(*pos);
            }
        }
        out.sort_by_key(|e| e.pos);
        Ok(out)
    }
}

/// Rows per read of a scan for due held-back events.
const DUE_SCAN_PAGE: usize = 256;

/// Sleep until `t` (for ever when `None`).
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Connections that die with the same oldest event in flight before it is held back.
const POISON_AFTER: u32 = 3;
/// ...each within this time of sending it.
const POISON_WINDOW: Duration = Duration::from_secs(1);

/// Why the upstream can never accept this event as it is, if so: checked before it is handed to
/// rumqttc. `topic` is the event's own topic when it goes alone (`None` in a batch, whose topic
/// `check-config` validated); `payload` its envelope's length. What rumqttc 0.25 checks
/// (`valid_topic`: no `+`/`#`; its encoder: the packet within `max_packet_size`) and what MQTT
/// forbids besides (an empty topic, one longer than 65,535 bytes, a NUL in it; the topic is a
/// Rust string, so valid UTF-8).
pub fn unacceptable(topic: Option<&str>, payload: usize, cfg: &UpstreamConfig) -> Option<String> {
    let topic_len = match topic {
        Some(t) => {
            if t.is_empty() {
                return Some("empty topic".into());
            }
            if t.contains(['+', '#']) {
                return Some(format!("wildcard in topic {:?}", truncated(t)));
            }
            if t.contains('\0') {
                return Some(format!("NUL character in topic {:?}", truncated(t)));
            }
            if t.len() > u16::MAX as usize {
                return Some(format!("topic of {} bytes (at most 65535)", t.len()));
            }
            if let Some(state) = &cfg.fleet_state_topic {
                if crate::core::reserved::reserved_topic(t, state) {
                    return Some(format!(
                        "topic {:?} is reserved for fleet documents and state",
                        truncated(t)
                    ));
                }
            }
            t.len()
        }
        None => cfg.batch_topic.len(),
    };
    // Fixed header (1 + up to 4 bytes of remaining length), topic length and topic, packet
    // id, MQTT 5 property length (1 byte, no properties), payload.
    let remaining = 2 + topic_len + 2 + 1 + payload;
    let size = 1 + varint_len(remaining) + remaining;
    (size > cfg.max_packet_size).then(|| {
        format!(
            "a packet of {size} bytes, larger than upstream.max_packet_size ({})",
            cfg.max_packet_size
        )
    })
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The start of a long topic, for a log line or a reason.
fn truncated(t: &str) -> &str {
    let mut end = t.len().min(200);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// Positions grouped by reason, in first-seen order.
fn group_by_reason(items: Vec<(u64, String)>) -> Vec<(String, Vec<u64>)> {
    let mut out: Vec<(String, Vec<u64>)> = Vec::new();
    for (pos, why) in items {
        match out.iter_mut().find(|(w, _)| *w == why) {
            Some((_, v)) => v.push(pos),
            None => out.push((why, vec![pos])),
        }
    }
    out
}

/// Queue positions of the events in one message: one (inline, no allocation per event), or a
/// batch.
type Positions = SmallVec<[u64; 1]>;

/// Publishes of one connection that are not yet acknowledged; each message carries the queue
/// positions of its events (one, or a batch).
struct Inflight {
    /// Messages requested from rumqttc, packet id not yet known (FIFO).
    requested: VecDeque<Positions>,
    /// Sent with a packet id, awaiting PUBACK.
    by_pkid: HashMap<u16, (Positions, Instant)>,
    last_progress: Instant,
    /// Highest queue position requested on this connection.
    sent_high: u64,
    /// A message the client library refused outright (it never got a packet id).
    refused_request: Option<Positions>,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight {
            requested: VecDeque::new(),
            by_pkid: HashMap::new(),
            last_progress: Instant::now(),
            sent_high: 0,
            refused_request: None,
        }
    }
}

impl Inflight {
    /// Messages in flight.
    fn len(&self) -> usize {
        self.requested.len() + self.by_pkid.len()
    }
}

/// Telemetry events gathered into one upstream message: a CloudEvents JSON batch, i.e. a JSON
/// array of the frozen envelopes (each byte for byte as it would go alone).
#[derive(Default)]
struct Batch {
    positions: Vec<u64>,
    payload: Vec<u8>,
}

impl Batch {
    /// Would adding a body of `len` bytes go over either bound?
    fn is_full(&self, len: usize, max_events: usize, max_bytes: usize) -> bool {
        !self.positions.is_empty()
            && (self.positions.len() >= max_events || self.payload.len() + len + 2 > max_bytes)
    }

    fn add(&mut self, pos: u64, body: &[u8]) {
        self.payload.push(if self.positions.is_empty() {
            b'['
        } else {
            b','
        });
        self.payload.extend_from_slice(body);
        self.positions.push(pos);
    }
}

impl<C: Connector> Forwarder<C> {
    /// Publish the gathered batch (if any) on `upstream.batch_topic`.
    fn send_batch(
        &self,
        session: &C::Session,
        state: &mut Inflight,
        batch: &mut Batch,
    ) -> Result<(), SessionError> {
        if batch.positions.is_empty() {
            return Ok(());
        }
        let mut payload = std::mem::take(&mut batch.payload);
        payload.push(b']');
        session.publish(self.cfg.batch_topic.clone(), payload)?;
        let positions = std::mem::take(&mut batch.positions);
        state.requested.push_back(Positions::from_vec(positions));
        Ok(())
    }
}

/// Positions of PUBACKed events, handed to the queue in batches (each Ack costs a commit),
/// in the order their PUBACKs came.
#[derive(Debug, Default)]
struct AckBatch {
    positions: Vec<u64>,
    /// When the oldest of them was PUBACKed.
    since: Option<Instant>,
}

impl AckBatch {
    fn add(&mut self, positions: &[u64], now: Instant) {
        self.positions.extend_from_slice(positions);
        self.since.get_or_insert(now);
    }

    /// Are PUBACKed events waiting to be handed to the queue?
    fn waiting(&self) -> bool {
        self.since.is_some()
    }

    /// The positions to hand over now: once `half_window` of them gathered, or
    /// [`ACK_BATCH_WAIT`] after the first.
    fn take_ready(&mut self, half_window: usize, now: Instant) -> Option<Vec<u64>> {
        let since = self.since?;
        (self.positions.len() >= half_window || now.duration_since(since) >= ACK_BATCH_WAIT)
            .then(|| self.take())
    }

    /// Everything gathered (at the end of a connection).
    fn take(&mut self) -> Vec<u64> {
        self.since = None;
        std::mem::take(&mut self.positions)
    }
}

/// Longest an acknowledged event waits before its Ack goes to the queue (deletes are batched).
/// After a crash, at most this much of acknowledged traffic (plus the in-flight window) is sent
/// again.
const ACK_BATCH_WAIT: Duration = Duration::from_millis(50);

/// Exponential backoff with full jitter, between `min` and `max`.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    if exp <= min {
        return min;
    }
    let jitter = rand::thread_rng().gen_range(min.as_millis() as u64..=exp.as_millis() as u64);
    Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_upstream_can_never_accept() {
        let mut cfg = crate::config::Config::defaults().upstream;
        cfg.max_packet_size = 1024;
        let ok = |t: Option<&str>, n| unacceptable(t, n, &cfg);
        assert_eq!(ok(Some("edge/gw/a"), 10), None);
        for bad in ["", "edge/+/a", "edge/#", "edge/a\0b"] {
            assert!(ok(Some(bad), 10).is_some(), "{bad:?}");
        }
        assert!(ok(Some(&"a".repeat(65_536)), 0).is_some());
        // 1 + 2 (remaining length) + 2 + 9 + 2 + 1 + payload = 1024 at most.
        assert_eq!(ok(Some("edge/gw/a"), 1007), None);
        assert!(ok(Some("edge/gw/a"), 1008)
            .unwrap()
            .contains("max_packet_size"));
        // In a batch the event's own topic does not travel: only the size counts.
        assert_eq!(ok(None, 10), None);
        assert!(ok(None, 2000).is_some());
        assert_eq!(
            group_by_reason(vec![(1, "a".into()), (2, "b".into()), (3, "a".into())]),
            vec![("a".to_string(), vec![1, 3]), ("b".to_string(), vec![2])]
        );
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff(min, max, 0), min);
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            assert!(d >= min && d <= max, "{d:?}");
        }
        // With enough attempts the upper bound is max: some draws exceed min by far.
        assert!((0..100)
            .map(|_| backoff(min, max, 10))
            .any(|d| d > Duration::from_secs(1)));
    }
}
