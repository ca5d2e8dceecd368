//! The rules stage task: readings in, actions out (to the queue and the local broker), a timer
//! for `missing` detectors and windows, and rule reloads.
//!
//! Invariant: every reading leaves this stage as at least one queued event, or as a counted
//! drop (`unrouted`, `rule_drop`, `rule_filtered`, `rule_error`, `channel_full`). Its ticket
//! (the sensor's PUBACK, see [`crate::core::ack`]) rides on its last event to the queue, or, when it
//! became no event, follows on its own (`Settle`), behind everything sent before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use rumqttd::local::LinkTx;
use serde::Serialize;

use crate::config::{RuleConfig, WhenFull};
use crate::core::ack::{Inbound, Ticket};
use crate::core::event::{Reading, TYPE_ALERT};
use crate::core::metrics::{AlertLabel, DropReason, Metrics, RuleLabel};
use crate::core::outlet::Offered;
use crate::core::stamp;
use crate::queue::QueueHandle;

use super::{Action, Disposition, Engine};

/// A request to replace the rules (already validated); answered with the names of the rules
/// that kept their state.
pub struct Reload {
    pub rules: Vec<RuleConfig>,
    pub done: Option<tokio::sync::oneshot::Sender<Vec<String>>>,
}

/// The outcome of the last rules reload (SIGHUP), for `/api/rules`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub time: String,
    pub ok: bool,
    /// `(key, message)` of every configuration error; empty when applied.
    pub errors: Vec<(String, String)>,
    /// Rules that kept their state.
    pub kept: Vec<String>,
}

/// Shared slot for the last reload's outcome (written on SIGHUP, read by the page).
pub type ReloadLog = Arc<Mutex<Option<ReloadReport>>>;

/// Handle to send reloads to a running stage.
#[derive(Clone)]
pub struct RulesHandle {
    tx: flume::Sender<Reload>,
    /// The outcome of the last SIGHUP reload, for the status page.
    pub reloads: ReloadLog,
}

impl RulesHandle {
    pub fn channel() -> (RulesHandle, flume::Receiver<Reload>) {
        let (tx, rx) = flume::bounded(4);
        let reloads = Default::default();
        (RulesHandle { tx, reloads }, rx)
    }

    /// Note the outcome of a reload for the status page.
    pub fn log_reload(&self, errors: Vec<(String, String)>, kept: Vec<String>) {
        if let Ok(mut r) = self.reloads.lock() {
            *r = Some(ReloadReport {
                time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                ok: errors.is_empty(),
                errors,
                kept,
            });
        }
    }

    /// Replace the running rules; returns the rules whose state survived, or `None` if the
    /// stage has stopped.
    pub async fn reload(&self, rules: Vec<RuleConfig>) -> Option<Vec<String>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send_async(Reload {
                rules,
                done: Some(done),
            })
            .await
            .ok()?;
        rx.await.ok()
    }
}

pub struct RulesStage {
    pub engine: Engine,
    pub input: flume::Receiver<Inbound>,
    pub queue: QueueHandle,
    pub when_full: WhenFull,
    pub metrics: Arc<Metrics>,
    /// Link to the local broker for `publish` actions and alerts (`None`: not published).
    pub local: Option<LinkTx>,
    pub reload: flume::Receiver<Reload>,
    /// The status page's view of sensors and alerts (`None`: no page).
    pub tap: Option<super::history::Tap>,
}

/// The timer of `missing` detectors and windows; a late tick is not made up for.
fn ticker(period: std::time::Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Counters already reported to the metrics, per rule name.
#[derive(Default)]
struct Reported {
    per_rule: HashMap<String, [u64; 4]>,
    evicted: u64,
}

impl RulesStage {
    /// Runs until the ingest side closes the channel and everything received is handed on.
    pub async fn run(mut self) {
        let mut actions = Vec::new();
        let mut ticker = ticker(self.engine.settings().tick);
        let mut reported = Reported::default();
        let mut reload_open = true;
        let requests = self.tap.as_ref().map(|t| t.requests.clone());
        let mut requests_open = requests.is_some();
        loop {
            tokio::select! {
                r = self.input.recv_async() => {
                    let Ok((reading, ticket)) = r else { break };
                    // A reading with W3C trace context gets a span carrying it, so the log
                    // lines about it (rule errors, drops) can be joined to the sensor's trace.
                    let span = reading.traceparent.as_deref().map(|tp| {
                        tracing::info_span!("reading", topic = %reading.topic, traceparent = %tp).entered()
                    });
                    match guarded(|| self.engine.process(&reading, &mut actions)) {
                        Some(d) => self.count(d, &reading),
                        None => {
                            // What the engine did before it panicked is not acted on.
                            actions.clear();
                            self.metrics.drop_events(
                                DropReason::RulesPanicked,
                                1,
                                &format_args!("the rules engine panicked on a reading of {} (a bug: please report it with this log)", reading.topic),
                            );
                        }
                    }
                    drop(span);
                    if let Some(tap) = &mut self.tap {
                        tap.reading(&reading, self.engine.settings().max_sensors);
                    }
                    self.perform(&mut actions, ticket).await;
                }
                _ = ticker.tick() => {
                    if guarded(|| self.engine.tick(SystemTime::now(), &mut actions)).is_none() {
                        actions.clear();
                        tracing::error!("the rules engine panicked on its timer tick (a bug: please report it with this log); the next tick tries again");
                    }
                    self.perform(&mut actions, None).await;
                    self.report(&mut reported);
                }
                r = self.reload.recv_async(), if reload_open => match r {
                    Ok(req) => {
                        let tick = self.engine.settings().tick;
                        let kept = self.engine.reload(&req.rules);
                        if self.engine.settings().tick != tick {
                            ticker = self::ticker(self.engine.settings().tick);
                            tracing::info!(tick = ?self.engine.settings().tick, "rules_engine.tick applied");
                        }
                        self.metrics.rules.reloads.inc();
                        if let Some(tap) = &mut self.tap {
                            tap.rules_reloaded(&kept);
                        }
                        tracing::info!(rules = req.rules.len(), kept_state = ?kept, "rules reloaded");
                        if let Some(done) = req.done {
                            let _ = done.send(kept);
                        }
                    }
                    Err(_) => reload_open = false,
                },
                r = async { requests.as_ref()?.recv_async().await.ok() }, if requests_open => match (r, &self.tap) {
                    (Some(req), Some(tap)) => tap.answer(req, &self.engine),
                    _ => requests_open = false,
                },
            }
        }
        self.report(&mut reported);
    }

    fn count(&self, d: Disposition, reading: &Reading) {
        match d {
            Disposition::Forwarded => {}
            Disposition::DroppedByRule(i) => {
                let rule = self.engine.rule_name(i);
                self.metrics.drop_events(
                    DropReason::RuleDrop,
                    1,
                    &format_args!("rule {rule:?} dropped {}", reading.topic),
                );
            }
            Disposition::Filtered(i) => {
                let rule = self.engine.rule_name(i);
                self.metrics.drop_events(
                    DropReason::RuleFiltered,
                    1,
                    &format_args!(
                        "rule {rule:?} held back {} (sample/deadband)",
                        reading.topic
                    ),
                );
            }
            Disposition::EvalError(i) => {
                let rule = self.engine.rule_name(i);
                let err = self
                    .engine
                    .stats()
                    .get(i)
                    .and_then(|s| s.1.last_error.clone())
                    .unwrap_or_default();
                self.metrics.drop_events(
                    DropReason::RuleError,
                    1,
                    &format_args!("rule {rule:?} on {}: {err}", reading.topic),
                );
            }
            Disposition::Unrouted => {
                self.metrics.drop_events(
                    DropReason::Unrouted,
                    1,
                    &format_args!("no rule forwards {}", reading.topic),
                );
            }
        }
    }

    /// Push rule counters into the metrics (deltas since the last report).
    fn report(&self, reported: &mut Reported) {
        let r = &self.metrics.rules;
        for (name, stats, alarms) in self.engine.stats() {
            let label = RuleLabel { rule: name.into() };
            r.in_alarm.get_or_create(&label).set(alarms as i64);
            let prev = reported.per_rule.entry(name.to_string()).or_default();
            let now = [
                stats.eval_errors,
                stats.skipped,
                stats.alerts_started,
                stats.alerts_cleared,
            ];
            // Counters restart when a rule changes: report only growth.
            let d: Vec<u64> = now
                .iter()
                .zip(prev.iter())
                .map(|(n, p)| n.saturating_sub(*p))
                .collect();
            r.eval_errors.get_or_create(&label).inc_by(d[0]);
            r.skipped.get_or_create(&label).inc_by(d[1]);
            for (state, n) in [("start", d[2]), ("clear", d[3])] {
                r.alerts
                    .get_or_create(&AlertLabel {
                        rule: name.into(),
                        state,
                    })
                    .inc_by(n);
            }
            *prev = now;
        }
        let ev = self.engine.evicted();
        r.state_evicted.inc_by(ev.saturating_sub(reported.evicted));
        reported.evicted = ev;
        r.sensors.set(self.engine.sensors() as i64);
    }

    /// Carry out `actions`; `ticket` (of the reading they came from) goes with the last event
    /// queued, or on its own after them.
    async fn perform(&mut self, actions: &mut Vec<Action>, mut ticket: Option<Ticket>) {
        let last_forward = actions
            .iter()
            .rposition(|a| matches!(a, Action::Forward(_)));
        for (i, action) in actions.drain(..).enumerate() {
            if let Some(tap) = &mut self.tap {
                match &action {
                    Action::Forward(e) if e.kind == TYPE_ALERT => {
                        if let crate::core::event::Data::Json(b) = &e.data {
                            tap.alert(b);
                        }
                    }
                    Action::Publish { topic, payload }
                        if topic
                            .strip_prefix(self.engine.settings().alert_topic.as_str())
                            .is_some_and(|rest| rest.starts_with('/')) =>
                    {
                        tap.alert(payload)
                    }
                    _ => {}
                }
            }
            match action {
                Action::Forward(event) => {
                    let rides = if Some(i) == last_forward {
                        ticket.take()
                    } else {
                        None
                    };
                    let offered = self
                        .queue
                        .offer(self.when_full, event, rides, &self.metrics);
                    match offered.await {
                        Offered::Sent => {}
                        // Counted by the outlet; its ticket is still settled in order, behind
                        // what went before it.
                        Offered::Dropped((_, t)) => ticket = ticket.or(t),
                        Offered::Closed(_) => self.metrics.drop_events(
                            DropReason::Shutdown,
                            1,
                            &"queue writer stopped",
                        ),
                    }
                }
                Action::Publish { topic, payload } => {
                    // Bytes: kept for the message without copying the topic per publish.
                    let topic = Bytes::from(topic);
                    // Stamped like every message in the local broker (`core::stamp`).
                    let sent = match &mut self.local {
                        Some(link) => link
                            .try_publish(topic.clone(), stamp::OWN.prepend(&payload, false))
                            .map_err(|e| e.to_string()),
                        None => Err("no local link".to_string()),
                    };
                    if let Err(e) = sent {
                        self.metrics.drop_events(
                            DropReason::LocalPublishFailed,
                            1,
                            &format_args!(
                                "local publish on {} failed: {e}",
                                String::from_utf8_lossy(&topic)
                            ),
                        );
                    }
                }
            }
        }
        if let Some(t) = ticket {
            // The reading became no event upstream (or its last was dropped): its PUBACK
            // goes once everything before it is committed. A stopped writer: no PUBACK; the
            // sensor sends it again after it reconnects.
            let _ = self.queue.settle(t).await;
        }
    }
}

/// Runs `f`; a panic inside it (a bug of ours in a rule or detector) is caught and reported as
/// `None`, so it costs the reading (or tick) at hand, not the rules task: without this, one
/// bad reading would end the task, and every sensor's readings would wait in the hand-off
/// channel until the watchdog restarted the gateway (and again at the next such reading).
/// Unwinding is the release profile's setting (Cargo.toml). The engine's state for that
/// sensor may be left half updated; it is bounded like any other and is relearnt.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

#[cfg(test)]
mod tests {
    use super::guarded;

    /// The defence itself: a panic inside is caught and reported, a value passes through.
    #[test]
    fn a_panic_inside_is_caught_and_reported_as_none() {
        assert_eq!(guarded(|| 7), Some(7));
        let mut state = vec![1];
        let r: Option<()> = guarded(|| {
            state.push(2);
            panic!("a detector bug");
        });
        assert_eq!(r, None);
        assert_eq!(
            state,
            vec![1, 2],
            "the caller keeps its (partly updated) state"
        );
    }
}
