//! Upstream forwarder: delivers the queue at-least-once to the cloud MQTT broker (rumqttc).
//!
//! Invariants:
//! - Only committed events are sent (leased from the queue after their commit).
//! - An event is acknowledged to the queue (and so deleted) only after the upstream PUBACK for
//!   the packet that carried it.
//! - Each connection gets a fresh rumqttc client and event loop; nothing of rumqttc's in-memory
//!   state is trusted across connections (it drops unacknowledged publishes when the broker
//!   reports no session). After any disconnect the lease cursor goes back to the head of the
//!   queue, so every unacknowledged event is sent again, in order. Duplicates are bounded by
//!   `upstream.inflight` and carry the same `id`.
//! - rumqttc's `publish()` returns no packet id: requests are matched FIFO to
//!   `Outgoing::Publish(pkid)` events, and settled on `PubAck{pkid}`. In flight is kept strictly
//!   below rumqttc's packet-id window, so ids never collide.
//! - No PUBACK for `upstream.ack_timeout` while publishes are in flight: the link is presumed
//!   half-open and is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, MqttOptions, Outgoing, Packet, QoS, Transport,
};
use tokio::sync::watch;

use crate::config::UpstreamConfig;
use crate::ops::metrics::Metrics;
use crate::queue::{Cursor, QueueHandle, StoredEvent};

/// Status shared with the rest of the daemon (health, systemd STATUS, demo).
#[derive(Debug, Clone, Default)]
pub struct UpstreamStatus {
    pub connected: bool,
    pub last_error: Option<String>,
}

pub struct Forwarder {
    cfg: UpstreamConfig,
    queue: QueueHandle,
    metrics: Arc<Metrics>,
    status: watch::Sender<UpstreamStatus>,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
    /// Highest queue position sent on an earlier connection: leasing it again is a resend.
    sent_high: u64,
}

/// Why a connection ended.
enum End {
    Shutdown,
    Error(String),
}

impl Forwarder {
    pub fn new(
        cfg: UpstreamConfig,
        queue: QueueHandle,
        metrics: Arc<Metrics>,
        status: watch::Sender<UpstreamStatus>,
        shutdown: watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Forwarder {
        Forwarder {
            cfg,
            queue,
            metrics,
            status,
            shutdown,
            drain_timeout,
            sent_high: 0,
        }
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
            let mut opts = MqttOptions::new(self.cfg.client_id.clone(), url.host.clone(), url.port);
            opts.set_keep_alive(self.cfg.keep_alive)
                .set_clean_session(true)
                .set_max_packet_size(self.cfg.max_packet_size, self.cfg.max_packet_size)
                .set_inflight(window_to_rumqttc(self.cfg.inflight))
                .set_request_channel_capacity(self.cfg.inflight * 2 + 16);
            if let Some(tls) = &self.cfg.tls {
                // CA file or system roots, optional client certificate (config::compile).
                opts.set_transport(Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            } else if url.tls {
                opts.set_transport(Transport::tls_with_default_config());
            }
            if let Some(user) = &self.cfg.username {
                let password = self.cfg.password.as_ref().map(|p| p.expose()).unwrap_or("");
                opts.set_credentials(user.clone(), password);
            }
            let started = Instant::now();
            let end = self.connection(opts, &mut down_since).await;
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
    async fn connection(&mut self, opts: MqttOptions, down_since: &mut Option<Instant>) -> End {
        let window = self.cfg.inflight;
        let (client, mut eventloop) = AsyncClient::new(opts, window * 2 + 16);
        // Small packets, many in flight: without TCP_NODELAY, Nagle's algorithm and the peer's
        // delayed ACKs stall the window (measured: drain at 4k events/s instead of tens of k).
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(self.cfg.ack_timeout.as_secs().clamp(1, 30));
        eventloop.set_network_options(net);
        // The event loop runs in its own task: `poll()` is not cancel-safe, and a select! here
        // could drop a half-written packet.
        let (ev_tx, ev_rx) = flume::bounded::<Result<MqttEvent, ConnectionError>>(window * 2 + 16);
        let poller = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let failed = ev.is_err();
                if ev_tx.send_async(ev).await.is_err() || failed {
                    break;
                }
            }
        });
        let mut state = Inflight::default();
        let mut cursor = Cursor::default();
        let mut committed = self.queue.committed();
        let mut connected = false;
        let mut draining_since: Option<Instant> = None;
        let mut acks: Vec<u64> = Vec::new();
        let mut acks_since: Option<Instant> = None;
        let mut tick =
            tokio::time::interval(Duration::from_millis(100).min(self.cfg.ack_timeout / 4));
        let mut caught_up = false;
        let mut rate = RateLimit::new(self.cfg.max_rate);

        let end = loop {
            // Lease more when connected, not stopping, and there is room in the window.
            let room = window.saturating_sub(state.len());
            let allowed = rate.available(room);
            if connected
                && draining_since.is_none()
                && !caught_up
                && allowed > 0
                && (allowed >= window.div_ceil(4).min(rate.burst()) || state.len() == 0)
            {
                let room = allowed;
                // Mark the current commit as seen before reading, so a commit that lands
                // after the read still wakes us.
                committed.borrow_and_update();
                let Ok(rows) = self.queue.lease(cursor, room).await else {
                    break End::Shutdown;
                };
                caught_up = rows.is_empty();
                let mut failed = None;
                for row in rows {
                    cursor.advance(&row);
                    let StoredEvent {
                        pos, topic, body, ..
                    } = row;
                    if pos <= self.sent_high {
                        self.metrics.events_resent.inc();
                    }
                    if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, body) {
                        failed = Some(e);
                        break;
                    }
                    state.requested.push_back(pos);
                    rate.take();
                    state.sent_high = state.sent_high.max(pos);
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
                        Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                            connected = true;
                            caught_up = false;
                            self.set_connected(true, None);
                            match down_since.take() {
                                Some(t) => tracing::info!(session_present = ack.session_present, down_for = ?t.elapsed(), "upstream connected again"),
                                None => tracing::info!(session_present = ack.session_present, "upstream connected"),
                            }
                        }
                        Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(pos) = state.requested.pop_front() {
                                if state.by_pkid.insert(pkid, (pos, Instant::now())).is_some() {
                                    break End::Error(format!("packet id {pkid} reused while in flight"));
                                }
                                state.last_progress = Instant::now();
                            }
                        }
                        Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                            if let Some((pos, sent)) = state.by_pkid.remove(&ack.pkid) {
                                self.metrics.ack_latency.observe(sent.elapsed().as_secs_f64());
                                acks.push(pos);
                                acks_since.get_or_insert_with(Instant::now);
                                state.last_progress = Instant::now();
                            }
                        }
                        Ok(_) => {}
                        Err(e) => break End::Error(e.to_string()),
                    }
                }
                changed = committed.changed(), if caught_up => {
                    if changed.is_err() {
                        break End::Shutdown;
                    }
                    caught_up = false;
                }
                _ = tokio::time::sleep(rate.next_in()), if connected && !caught_up && draining_since.is_none() && rate.limited() => {}
                _ = tokio::time::sleep(ACK_BATCH_WAIT), if acks_since.is_some() => {}
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
            // writes on an SD card) and PUBACKs arrive one by one. Half a window, or
            // ACK_BATCH_WAIT after the first, whichever comes first. Deleting later is safe:
            // an acknowledged row is never leased again on this connection.
            if let Some(since) = acks_since {
                if acks.len() >= window.div_ceil(2) || since.elapsed() >= ACK_BATCH_WAIT {
                    self.metrics.events_forwarded.inc_by(acks.len() as u64);
                    acks_since = None;
                    if self.queue.ack(std::mem::take(&mut acks)).await.is_err() {
                        break End::Shutdown;
                    }
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
        if !acks.is_empty() {
            self.metrics.events_forwarded.inc_by(acks.len() as u64);
            let _ = self.queue.ack(acks).await;
        }
        if matches!(end, End::Shutdown) {
            let _ = client.try_disconnect();
            // Give the DISCONNECT a moment to leave.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Ok(Ok(ev)) = ev_rx.recv_async().await {
                    if matches!(ev, MqttEvent::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        poller.abort();
        self.sent_high = self.sent_high.max(state.sent_high);
        end
    }
}

/// Publishes of one connection that are not yet acknowledged.
struct Inflight {
    /// Queue positions requested from rumqttc, packet id not yet known (FIFO).
    requested: VecDeque<u64>,
    /// Sent with a packet id, awaiting PUBACK.
    by_pkid: HashMap<u16, (u64, Instant)>,
    last_progress: Instant,
    /// Highest queue position requested on this connection.
    sent_high: u64,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight {
            requested: VecDeque::new(),
            by_pkid: HashMap::new(),
            last_progress: Instant::now(),
            sent_high: 0,
        }
    }
}

impl Inflight {
    fn len(&self) -> usize {
        self.requested.len() + self.by_pkid.len()
    }
}

/// Longest an acknowledged event waits before its Ack goes to the queue (deletes are batched).
/// After a crash, at most this much of acknowledged traffic (plus the in-flight window) is sent
/// again.
const ACK_BATCH_WAIT: Duration = Duration::from_millis(50);

/// `upstream.max_rate`: a token bucket of one second's worth of events.
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second: per_second as f64,
            tokens: per_second as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.per_second);
        self.last = now;
    }

    /// How many of `want` may be sent now.
    fn available(&mut self, want: usize) -> usize {
        if self.per_second == 0.0 {
            return want;
        }
        self.refill();
        want.min(self.tokens as usize)
    }

    fn take(&mut self) {
        if self.per_second > 0.0 {
            self.tokens -= 1.0;
        }
    }

    fn burst(&self) -> usize {
        if self.per_second == 0.0 {
            usize::MAX
        } else {
            (self.per_second as usize).max(1)
        }
    }

    /// Is the limit what holds us back right now?
    fn limited(&self) -> bool {
        self.per_second > 0.0 && self.tokens < 1.0
    }

    /// Time until the next token.
    fn next_in(&self) -> Duration {
        if self.per_second == 0.0 {
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / self.per_second).max(0.001))
    }
}

/// rumqttc numbers packets 1..=inflight and wraps: one more id than our window means an id is
/// never reused while its packet is still in flight.
fn window_to_rumqttc(window: usize) -> u16 {
    (window + 1).min(u16::MAX as usize) as u16
}

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

    #[test]
    fn window_leaves_a_spare_packet_id() {
        assert_eq!(window_to_rumqttc(64), 65);
        assert_eq!(window_to_rumqttc(100_000), u16::MAX);
    }
}
