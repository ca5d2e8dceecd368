//! Metrics of one gateway instance (Prometheus text format on `metrics.listen`), and the
//! rate-limited log line that goes with every drop counter.
//!
//! Invariant: every event that leaves the pipeline other than by an upstream PUBACK goes through
//! [`Metrics::drop_events`], which counts it by reason and logs it.
//!
//! Layer: core: every stage counts here, and the app's supervisor and HTTP listener read it; it
//! imports nothing from the crate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why an event or reading was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A channel between stages was full and `pipeline.when_full = "drop_newest"`.
    ChannelFull,
    /// No rule forwards the reading's topic.
    Unrouted,
    /// A `drop` rule matched.
    RuleDrop,
    /// A sensor published on a topic reserved for the gateway (`edgegate/...`, `$...`).
    ReservedTopic,
    /// The queue could not store the event (I/O error, disk full) and its memory buffer was full.
    QueueWriteFailed,
    /// The gateway stopped before the event could be committed.
    Shutdown,
    /// The queue reached `queue.max_events`/`max_bytes` and evicted old events.
    Evicted,
    /// The queue was full and `queue.when_full = "drop_newest"` turned new events away.
    Rejected,
    /// Older than `queue.max_age`.
    Expired,
    /// A rule's `sample` or `deadband` action held the reading back and no rule forwarded it.
    RuleFiltered,
    /// A rule's `when` condition failed to evaluate (missing field, wrong type) and no rule
    /// forwarded the reading.
    RuleError,
    /// A rule's `publish` (or an alert's local copy) could not be handed to the local broker.
    LocalPublishFailed,
    /// Queued in a file found corrupt while running: the file was moved aside (kept for
    /// inspection), the gateway went on with a fresh one.
    Quarantined,
    /// A message for a local MQTT 5 subscriber was larger than the Maximum Packet Size it
    /// declared: withheld by the broker guard, as MQTT 5 §3.1.2.11.4 requires.
    SubscriberMaxPacket,
    /// A message for a local subscriber that rumqttd's MQTT codec could not encode for its
    /// connection: not sent (that subscriber's copy only).
    SubscriberEncode,
    /// The rules engine panicked on the reading (a bug of ours): that reading is dropped, the
    /// rules task and every other reading go on.
    RulesPanicked,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ChannelFull => "channel_full",
            DropReason::Unrouted => "unrouted",
            DropReason::RuleDrop => "rule_drop",
            DropReason::ReservedTopic => "reserved_topic",
            DropReason::QueueWriteFailed => "queue_write_failed",
            DropReason::Shutdown => "shutdown",
            DropReason::Evicted => "evicted",
            DropReason::Rejected => "rejected",
            DropReason::Expired => "expired",
            DropReason::RuleFiltered => "rule_filtered",
            DropReason::RuleError => "rule_error",
            DropReason::LocalPublishFailed => "local_publish_failed",
            DropReason::Quarantined => "quarantined",
            DropReason::SubscriberMaxPacket => "subscriber_max_packet_size",
            DropReason::SubscriberEncode => "subscriber_encode",
            DropReason::RulesPanicked => "rules_panicked",
        }
    }

    /// Drops a user asked for (configuration) are logged at debug, the rest as warnings.
    fn is_by_config(self) -> bool {
        matches!(
            self,
            DropReason::Unrouted | DropReason::RuleDrop | DropReason::RuleFiltered
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabel {
    pub rule: String,
    /// `start` or `clear`.
    pub state: &'static str,
}

/// The rule engine's metric families (updated by the rules stage).
#[derive(Default)]
pub struct RuleMetrics {
    pub alerts: Family<AlertLabel, Counter>,
    pub in_alarm: Family<RuleLabel, Gauge>,
    pub eval_errors: Family<RuleLabel, Counter>,
    pub skipped: Family<RuleLabel, Counter>,
    pub state_evicted: Counter,
    pub sensors: Gauge,
    pub reloads: Counter,
    pub reload_failures: Counter,
}

/// The counters and gauges of one gateway.
pub struct Metrics {
    registry: Registry,
    pub readings_received: Counter,
    dropped: Family<ReasonLabel, Counter>,
    pub events_committed: Counter,
    pub events_forwarded: Counter,
    pub events_resent: Counter,
    /// Events the upstream refused (PUBACK failure reason, or closing the connection on them):
    /// held back for a while, or set aside (parked); never deleted.
    pub events_refused: Counter,
    /// Events set aside (parked) because the upstream can never accept them as they are.
    pub events_parked: Counter,
    pub commits: Counter,
    pub queue_depth: Gauge,
    pub queue_bytes: Gauge,
    pub upstream_connected: Gauge,
    pub upstream_reconnects: Counter,
    pub ack_latency: Histogram,
    /// Receive-to-commit time of the oldest event of each commit group: the window in which a
    /// reading the broker already PUBACKed can still be lost to a crash.
    pub commit_latency: Histogram,
    pub rules: RuleMetrics,
    /// Connections and packets the broker guard refused, by reason (`broker::refusal::Refusal`).
    broker_rejected: Family<ReasonLabel, Counter>,
    broker_rejected_totals: Mutex<HashMap<&'static str, u64>>,
    broker_reject_log: Mutex<HashMap<&'static str, Instant>>,
    /// Sensor connections open through the guard.
    pub broker_connections: Gauge,
    /// Times a client was slowed down by `broker.max_publish_rate` (nothing is dropped).
    pub broker_throttled: Counter,
    /// MQTT 5 publishes passed to local subscribers without their properties, because an
    /// MQTT 3.1.1 client subscribed to a matching filter (or the message is kept retained).
    pub broker_properties_dropped: Counter,
    /// Times the guard stopped reading from a sensor that owed it too many acknowledgements
    /// (it publishes without reading them; nothing is dropped).
    pub broker_paused: Counter,
    /// Links rumqttd's router did not end within 2 s of the end of their connection (the guard
    /// let go of them; see broker/guard/relay.rs on why it waits).
    pub broker_disconnect_unsettled: Counter,
    /// `traceparent` user properties that were not W3C trace context and were left out of the
    /// event (the reading itself is kept).
    pub traceparent_invalid: Counter,
    /// Totals per reason kept beside the Prometheus family, for tests and summaries.
    drop_totals: Mutex<HashMap<DropReason, u64>>,
    drop_log: Mutex<HashMap<DropReason, (Instant, u64)>>,
    pub last_sequence: AtomicU64,
    pub oldest_queued_us: AtomicI64,
}

const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("edgegate");
        let m = Metrics {
            readings_received: Counter::default(),
            dropped: Family::default(),
            events_committed: Counter::default(),
            events_forwarded: Counter::default(),
            events_resent: Counter::default(),
            events_refused: Counter::default(),
            events_parked: Counter::default(),
            commits: Counter::default(),
            queue_depth: Gauge::default(),
            queue_bytes: Gauge::default(),
            upstream_connected: Gauge::default(),
            upstream_reconnects: Counter::default(),
            ack_latency: Histogram::new(
                [
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]
                .into_iter(),
            ),
            commit_latency: Histogram::new(
                [
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]
                .into_iter(),
            ),
            rules: RuleMetrics::default(),
            broker_rejected: Family::default(),
            broker_rejected_totals: Mutex::new(HashMap::new()),
            broker_reject_log: Mutex::new(HashMap::new()),
            broker_connections: Gauge::default(),
            broker_throttled: Counter::default(),
            broker_properties_dropped: Counter::default(),
            broker_paused: Counter::default(),
            broker_disconnect_unsettled: Counter::default(),
            traceparent_invalid: Counter::default(),
            drop_totals: Mutex::new(HashMap::new()),
            drop_log: Mutex::new(HashMap::new()),
            last_sequence: AtomicU64::new(0),
            oldest_queued_us: AtomicI64::new(0),
            registry: Registry::default(),
        };
        registry.register(
            "readings_received",
            "Publishes received from sensors",
            m.readings_received.clone(),
        );
        registry.register(
            "events_dropped",
            "Readings or events dropped, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "events_committed",
            "Events committed to the queue",
            m.events_committed.clone(),
        );
        registry.register(
            "events_forwarded",
            "Events acknowledged by the upstream broker",
            m.events_forwarded.clone(),
        );
        registry.register(
            "events_resent",
            "Events sent again after a reconnect",
            m.events_resent.clone(),
        );
        registry.register(
            "events_refused",
            "Events the upstream refused (MQTT 5 PUBACK failure reason, or a connection closed on them); held back or set aside, never deleted",
            m.events_refused.clone(),
        );
        registry.register(
            "events_parked",
            "Events set aside because the upstream can never accept them as they are (queue peek --parked)",
            m.events_parked.clone(),
        );
        registry.register(
            "queue_commits",
            "Queue transactions committed",
            m.commits.clone(),
        );
        registry.register("queue_depth", "Events in the queue", m.queue_depth.clone());
        registry.register(
            "queue_bytes",
            "Bytes of event data in the queue",
            m.queue_bytes.clone(),
        );
        registry.register(
            "upstream_connected",
            "1 when connected to the upstream broker",
            m.upstream_connected.clone(),
        );
        registry.register(
            "upstream_reconnects",
            "Upstream connection attempts after the first",
            m.upstream_reconnects.clone(),
        );
        registry.register(
            "upstream_ack_latency_seconds",
            "Time from publish to PUBACK upstream",
            m.ack_latency.clone(),
        );
        registry.register(
            "queue_commit_latency_seconds",
            "From receipt of a reading to the commit of its event (oldest of each commit group): the loss window",
            m.commit_latency.clone(),
        );
        registry.register(
            "broker_rejected",
            "Sensor connections or packets refused by the broker guard, by reason",
            m.broker_rejected.clone(),
        );
        registry.register(
            "broker_connections",
            "Sensor connections open",
            m.broker_connections.clone(),
        );
        registry.register(
            "broker_throttled",
            "Times a sensor was slowed down by broker.max_publish_rate",
            m.broker_throttled.clone(),
        );
        registry.register(
            "broker_properties_dropped",
            "MQTT 5 publishes passed to local subscribers without their properties (an MQTT 3.1.1 client subscribed to a matching filter, or the message is retained)",
            m.broker_properties_dropped.clone(),
        );
        registry.register(
            "broker_paused",
            "Times the broker stopped reading from a sensor until it took the acknowledgements it was owed (backpressure)",
            m.broker_paused.clone(),
        );
        registry.register(
            "broker_disconnect_unsettled",
            "Links the broker's router did not end within 2 s of the end of their connection",
            m.broker_disconnect_unsettled.clone(),
        );
        registry.register(
            "traceparent_invalid",
            "traceparent user properties dropped from readings because they were not W3C trace context",
            m.traceparent_invalid.clone(),
        );
        let r = &m.rules;
        registry.register(
            "rule_alerts",
            "Alert events by rule and state (start, clear)",
            r.alerts.clone(),
        );
        registry.register(
            "rule_detectors_in_alarm",
            "Detector states currently in alarm, by rule",
            r.in_alarm.clone(),
        );
        registry.register(
            "rule_eval_errors",
            "Rule condition evaluation errors (missing field, wrong type), by rule",
            r.eval_errors.clone(),
        );
        registry.register(
            "rule_skipped",
            "Readings a rule's detect/aggregate/deadband action skipped (field absent or not numeric)",
            r.skipped.clone(),
        );
        registry.register(
            "rule_state_evicted",
            "Sensor states evicted because rules_engine.max_sensors was reached",
            r.state_evicted.clone(),
        );
        registry.register(
            "rule_sensors",
            "Sensors tracked by the rule engine",
            r.sensors.clone(),
        );
        registry.register("rule_reloads", "Rule reloads applied", r.reloads.clone());
        registry.register(
            "rule_reload_failures",
            "Rule reloads rejected (invalid configuration)",
            r.reload_failures.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Count `n` dropped events and log it, at most once per reason every 10 s.
    pub fn drop_events(&self, reason: DropReason, n: u64, detail: &dyn std::fmt::Display) {
        if n == 0 {
            return;
        }
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc_by(n);
        if let Ok(mut t) = self.drop_totals.lock() {
            *t.entry(reason).or_default() += n;
        }
        let Ok(mut log) = self.drop_log.lock() else {
            return;
        };
        let now = Instant::now();
        let entry = log
            .entry(reason)
            .or_insert((now - DROP_LOG_INTERVAL * 2, 0));
        entry.1 += n;
        if now.duration_since(entry.0) >= DROP_LOG_INTERVAL {
            let count = std::mem::take(&mut entry.1);
            entry.0 = now;
            if reason.is_by_config() {
                tracing::debug!(reason = reason.as_str(), count, %detail, "events dropped");
            } else {
                tracing::warn!(reason = reason.as_str(), count, %detail, "events dropped");
            }
        }
    }

    /// Count a connection or packet the broker guard refused and log it (`peer`, `detail`), at
    /// most once per reason every 10 s at warning level (the rest at debug).
    pub fn broker_reject(
        &self,
        reason: &'static str,
        peer: &dyn std::fmt::Display,
        detail: &dyn std::fmt::Display,
    ) {
        self.broker_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
        if let Ok(mut t) = self.broker_rejected_totals.lock() {
            *t.entry(reason).or_default() += 1;
        }
        let now = Instant::now();
        let loud = match self.broker_reject_log.lock() {
            Ok(mut log) => {
                let last = log.entry(reason).or_insert(now - DROP_LOG_INTERVAL * 2);
                if now.duration_since(*last) >= DROP_LOG_INTERVAL {
                    *last = now;
                    true
                } else {
                    false
                }
            }
            Err(_) => false,
        };
        if loud {
            tracing::warn!(reason, %peer, %detail, "broker refused a client (further ones for 10 s at debug level)");
        } else {
            tracing::debug!(reason, %peer, %detail, "broker refused a client");
        }
    }

    /// Connections or packets refused by the broker guard for `reason` since start.
    pub fn broker_rejected(&self, reason: &str) -> u64 {
        self.broker_rejected_totals
            .lock()
            .map(|t| t.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Total dropped for `reason` since start.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drop_totals
            .lock()
            .map(|t| t.get(&reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// All drops since start, by reason name.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .drop_totals
            .lock()
            .map(|t| t.iter().map(|(r, n)| (r.as_str(), *n)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn set_last_sequence(&self, seq: u64) {
        self.last_sequence.store(seq, Ordering::Relaxed);
    }
}
