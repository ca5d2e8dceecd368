//! Supervision: a periodic check of every stage that feeds `/healthz`, systemd `STATUS=` and
//! the watchdog. WATCHDOG=1 is sent only while the pipeline makes progress, so a wedged stage
//! stops the pings and systemd restarts the service (`WatchdogSec=`).
//!
//! What counts as "making progress", each check using only what the stages already expose:
//! - broker: every public listener task runs (the guard reaches rumqttd's router through
//!   in-process links: there is no internal listener to probe);
//! - ingest, rules, forwarder: their tasks have not ended (the forwarder ends at once, by design,
//!   when no upstream is configured);
//! - queue writer: answers a stats request within [`QUEUE_REPLY_LIMIT`] (the request waits
//!   behind the appends in the writer's channel, so a stuck writer cannot answer);
//! - rules stage and queue writer together: readings keep arriving but for
//!   [`COMMIT_STALL_LIMIT`] not one event was committed or dropped (every reading leaves the
//!   rules stage as a committed event or a counted drop);
//! - forwarder, while connected: events are queued but for [`FORWARD_STALL_LIMIT`] not one was
//!   acknowledged (a healthy forwarder either gets acks or drops the link after
//!   `upstream.ack_timeout` and reports itself disconnected).
//!
//! Besides, the gateway is *degraded* while delivery cannot flow: the queue's commits fail (a
//! full disk, an I/O error) or the upstream has been unreachable for [`UPSTREAM_DOWN_GRACE`].
//! `/healthz` answers 503 with the reason, systemd's `STATUS=` and the status page show it, but
//! the watchdog is still pinged: a restart cures neither, and a restart during failing commits
//! would lose the readings the writer holds for its retry.
//!
//! Layer: app: it watches the stages through what they expose (handles, metrics in
//! `core::metrics`); no stage imports it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::app::status::{Snapshot, StatusPublisher};
use crate::app::systemd;
use crate::broker::Broker;
use crate::core::metrics::Metrics;
use crate::forwarder::UpstreamStatus;
use crate::queue::QueueHandle;

/// Longest wait for the queue writer to answer a stats request.
pub const QUEUE_REPLY_LIMIT: Duration = Duration::from_secs(5);
/// Readings arriving with nothing committed or dropped for this long: rules or writer wedged.
pub const COMMIT_STALL_LIMIT: Duration = Duration::from_secs(60);
/// Connected, events queued, no acknowledgement for this long: forwarder wedged.
pub const FORWARD_STALL_LIMIT: Duration = Duration::from_secs(120);
/// The upstream unreachable for this long: `/healthz` reports that delivery cannot flow
/// (shorter outages are reconnects; the forwarder's first retries come within a second).
pub const UPSTREAM_DOWN_GRACE: Duration = Duration::from_secs(10);

/// Periodic health check: feeds `/healthz`, systemd `STATUS=` and the watchdog.
pub struct Watched {
    pub broker: Arc<Broker>,
    pub stages: Vec<(&'static str, AbortHandle)>,
    pub queue: QueueHandle,
    pub upstream: watch::Receiver<UpstreamStatus>,
    pub upstream_configured: bool,
    pub problems: Arc<Mutex<Vec<String>>>,
    pub metrics: Arc<Metrics>,
    /// Publishes the gateway's status, retained, on the local broker.
    pub status_link: Option<rumqttd::local::LinkTx>,
}

impl Watched {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut status = StatusPublisher::new(self.status_link.take());
        let watchdog = systemd::watchdog_interval();
        let period = watchdog
            .map(|w| (w / 3).min(Duration::from_secs(2)))
            .unwrap_or(Duration::from_secs(2));
        if let Some(w) = watchdog {
            tracing::info!(
                watchdog_ms = w.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        let mut tick = tokio::time::interval(period);
        let mut commits = StallDetector::new(COMMIT_STALL_LIMIT);
        let mut forwards = StallDetector::new(FORWARD_STALL_LIMIT);
        let mut last_pinged = true;
        let mut upstream_down_since: Option<Instant> = None;
        let mut was_degraded = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let mut problems = Vec::new();
            // A real CONNECT/CONNACK through every plain listener; a listener that stopped
            // answering is restarted by the check itself (see Broker::check).
            problems.extend(self.broker.check().await);
            for (name, h) in &self.stages {
                // Without an upstream the forwarder has nothing to do and returns at once.
                let idle_by_design = *name == "forwarder" && !self.upstream_configured;
                if h.is_finished() && !idle_by_design {
                    problems.push(format!("{name} stage stopped"));
                }
            }
            let stats = match tokio::time::timeout(QUEUE_REPLY_LIMIT, self.queue.stats()).await {
                Ok(Ok(s)) => Some(s),
                _ => {
                    problems.push("queue writer not responding".to_string());
                    None
                }
            };
            // Degraded, not wedged: `/healthz` says so, but the watchdog is still pinged, since
            // a restart cures neither and would lose what the writer holds for a retry.
            let mut degraded = Vec::new();
            let commit_error = self.queue.commit_error();
            if let Some(e) = &commit_error {
                degraded.push(format!("queue commits failing: {e}"));
            }
            let up = self.upstream.borrow().clone();
            let now = Instant::now();
            if !self.upstream_configured || up.connected {
                upstream_down_since = None;
            } else {
                let since = *upstream_down_since.get_or_insert(now);
                let down = now.duration_since(since);
                if down >= UPSTREAM_DOWN_GRACE {
                    degraded.push(format!(
                        "upstream unreachable for {}s ({}): events wait in the queue",
                        down.as_secs(),
                        up.last_error.as_deref().unwrap_or("connecting")
                    ));
                }
            }

            // Readings in, but nothing out of the rules stage into the queue (or dropped).
            let dropped: u64 = self.metrics.drops().iter().map(|(_, n)| n).sum();
            let out = self.metrics.events_committed.get() + dropped;
            let readings = self.metrics.readings_received.get();
            if let Some(stalled) = commits.observe_input(out, readings, now) {
                // While commits fail (reported as degraded above), readings wait in the
                // writer's retry buffer: a restart would lose them, so this is no reason to
                // withhold the watchdog.
                let list = if commit_error.is_some() {
                    &mut degraded
                } else {
                    &mut problems
                };
                list.push(format!(
                    "readings arrive but nothing was committed or dropped for {}s (rules stage or queue writer wedged)",
                    stalled.as_secs()
                ));
            }

            // Connected with a backlog, but no acknowledgements.
            let backlog = stats.as_ref().map(|s| s.depth > 0).unwrap_or(false);
            let forwarding = self.upstream_configured && up.connected && backlog;
            if let Some(stalled) =
                forwards.observe(self.metrics.events_forwarded.get(), forwarding, now)
            {
                problems.push(format!(
                    "upstream connected, events queued, none acknowledged for {}s (forwarder wedged)",
                    stalled.as_secs()
                ));
            }

            let upstream = if !self.upstream_configured {
                "no upstream".to_string()
            } else if up.connected {
                "upstream connected".to_string()
            } else {
                format!(
                    "upstream disconnected ({})",
                    up.last_error.as_deref().unwrap_or("connecting")
                )
            };
            let depth = stats.as_ref().map(|s| s.depth).unwrap_or(0);
            let wedged = !problems.is_empty();
            if !degraded.is_empty() && !was_degraded {
                tracing::warn!(
                    problems = degraded.join("; "),
                    "gateway degraded (reported by /healthz; the watchdog is still pinged)"
                );
            }
            was_degraded = !degraded.is_empty();
            let wedged_problems = problems.join("; ");
            problems.extend(degraded);
            let healthy = problems.is_empty();
            let forwarded = self.metrics.events_forwarded.get();
            status
                .observe(&Snapshot {
                    problems: &problems,
                    upstream_configured: self.upstream_configured,
                    upstream_connected: up.connected,
                    queue_depth: depth,
                    queue_oldest_us: stats.as_ref().and_then(|s| s.oldest_us),
                    queue_parked: stats.as_ref().map(|s| s.parked).unwrap_or(0),
                    readings_total: readings,
                    forwarded_total: forwarded,
                })
                .await;
            systemd::status(&format!(
                "{}{upstream}; queue {depth} events; {} readings in; {} forwarded",
                if healthy { "" } else { "UNHEALTHY; " },
                readings,
                forwarded
            ));
            if !wedged {
                systemd::watchdog_ping();
                if !last_pinged {
                    tracing::info!("gateway making progress again");
                }
            } else {
                tracing::error!(
                    problems = wedged_problems,
                    watchdog = watchdog.is_some(),
                    "gateway unhealthy: watchdog pings withheld"
                );
            }
            last_pinged = !wedged;
            if let Ok(mut p) = self.problems.lock() {
                *p = problems;
            }
        }
    }
}

/// Tracks a progress counter and reports how long it has stood still while work was pending.
#[derive(Debug)]
struct StallDetector {
    limit: Duration,
    last: u64,
    /// Since when work has been pending without the counter moving.
    waiting_since: Option<Instant>,
    /// Value of an input counter when the progress counter last moved ([`Self::observe_input`]).
    input_mark: u64,
}

impl StallDetector {
    fn new(limit: Duration) -> StallDetector {
        StallDetector {
            limit,
            last: 0,
            waiting_since: None,
            input_mark: 0,
        }
    }

    /// Record the counter's value. `pending`: there is work that should move it. Returns the
    /// length of the stall once it reaches the limit.
    fn observe(&mut self, value: u64, pending: bool, now: Instant) -> Option<Duration> {
        if value != self.last || !pending {
            self.last = value;
            self.waiting_since = None;
            return None;
        }
        let since = *self.waiting_since.get_or_insert(now);
        let stalled = now.duration_since(since);
        (stalled >= self.limit).then_some(stalled)
    }

    /// As [`Self::observe`], with work pending when an input counter grew since the progress
    /// counter last moved.
    fn observe_input(&mut self, value: u64, input: u64, now: Instant) -> Option<Duration> {
        if value != self.last {
            self.input_mark = input;
        }
        let pending = input > self.input_mark;
        self.observe(value, pending, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn idle_is_not_a_stall() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(Duration::from_secs(10));
        for s in 0..100 {
            assert_eq!(d.observe(0, false, at(t0, s)), None);
        }
    }

    #[test]
    fn progress_is_not_a_stall() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(Duration::from_secs(10));
        for s in 0..100 {
            assert_eq!(d.observe(s, true, at(t0, s)), None);
        }
    }

    #[test]
    fn pending_work_without_progress_is_a_stall_after_the_limit() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(Duration::from_secs(10));
        assert_eq!(d.observe(5, false, t0), None);
        // Work appears at t0+100: the clock starts then, not at the last movement.
        assert_eq!(d.observe(5, true, at(t0, 100)), None);
        assert_eq!(d.observe(5, true, at(t0, 105)), None);
        assert_eq!(
            d.observe(5, true, at(t0, 111)),
            Some(Duration::from_secs(11))
        );
        // Progress clears it.
        assert_eq!(d.observe(6, true, at(t0, 112)), None);
        assert_eq!(d.observe(6, true, at(t0, 115)), None);
    }

    #[test]
    fn input_without_output_is_a_stall() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(Duration::from_secs(10));
        // 3 readings in, 3 committed: fine, however long it stays so.
        assert_eq!(d.observe_input(3, 3, t0), None);
        assert_eq!(d.observe_input(3, 3, at(t0, 60)), None);
        // A reading arrives and nothing comes out.
        assert_eq!(d.observe_input(3, 4, at(t0, 61)), None);
        assert_eq!(d.observe_input(3, 9, at(t0, 70)), None);
        assert!(d.observe_input(3, 9, at(t0, 71)).is_some());
        // Output moves: cleared, and the new mark is the input seen then.
        assert_eq!(d.observe_input(9, 9, at(t0, 72)), None);
        assert_eq!(d.observe_input(9, 9, at(t0, 200)), None);
    }
}
