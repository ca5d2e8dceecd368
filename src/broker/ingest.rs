//! Ingest: every sensor publish, taken from the router through an in-process link, decoded
//! into a [`Reading`] and handed to the rules stage.
//!
//! rumqttd 0.20 behaviours designed around here:
//! - The router pauses a link with `Notification::Unschedule` once its buffer fills and never
//!   resumes it on its own: we answer every `Unschedule` with `wake()` (ready).
//! - A link that falls behind the filter's in-memory log is silently moved ahead. Each
//!   forwarded publish carries its log offset, and offsets of one filter are consecutive: a gap
//!   is the number of readings skipped, counted as `broker_skipped` and logged.
//! - The loop does no I/O and never waits on anything but the router and, under
//!   `pipeline.when_full = "block"`, the bounded channel to the rules (backpressure then
//!   accumulates in the router's log, where skips are counted as above).
//! - The bytes taken from the link are counted for the guard, which stops reading from sensors
//!   while the router's log holds more than half its size for us (see [`super::pressure`]).
//!
//! Topics under `edgegate/` are the gateway's own output (alerts, status) and are not readings.
//! The guard refuses sensor publishes there unless an ACL names the namespace; one it let
//! through was PUBACKed, so it is counted as dropped (`reserved_topic`) and logged, while the
//! gateway's own output is skipped silently (the guard's notes tell them apart, see
//! [`super::pressure`]).
//! - A `traceparent` user property goes into the event only in W3C form
//!   ([`valid_traceparent`]); anything else is left out and counted
//!   (`edgegate_traceparent_invalid_total`), the reading kept.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttd::local::LinkRx;
use rumqttd::Notification;
use tokio::sync::watch;

use crate::broker::pressure::{self, Pressure};
use crate::config::WhenFull;
use crate::decode::Payload;
use crate::event::Reading;
use crate::ops::metrics::{DropReason, Metrics};

/// Shutting down: quiet this long with nothing relayed left untaken, and the drain is over.
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...or quiet this long while the counts say something relayed was not taken (a publish
/// rumqttd refused, a packet cut off when the guard closed: the counts are not exact).
const DRAIN_UNCOUNTED: Duration = Duration::from_secs(1);

/// The gateway's own topic namespace.
pub const OWN_PREFIX: &str = "edgegate/";

pub struct Ingest {
    pub link: LinkRx,
    pub out: flume::Sender<Reading>,
    pub when_full: WhenFull,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    /// Shared with the guard, which pauses sensors while we are behind (see [`pressure`]).
    pub pressure: Option<Arc<Pressure>>,
}

/// Why ingest stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestEnd {
    Shutdown,
    /// The router dropped our link (e.g. a client connected with its id).
    LinkLost(String),
    /// The rules stage is gone.
    Downstream,
}

/// W3C trace context (version 00 form, which later versions extend): `vv-{32 hex}-{16 hex}-ff`,
/// lowercase hex, trace id and parent id not all zeros, version not `ff`. Anything else would
/// be copied into every event of the reading unchecked.
pub fn valid_traceparent(tp: &str) -> bool {
    fn hex(s: &str, n: usize) -> bool {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let mut parts = tp.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    // Version 00 has exactly four fields; a later version may append more.
    let rest_ok = version != "00" || parts.next().is_none();
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && rest_ok
}

impl Ingest {
    pub async fn run(mut self) -> IngestEnd {
        let mut next_offset: Option<u64> = None;
        let mut draining = false;
        // Idle detection for the guard's backpressure without a timer per reading: a tick every
        // SETTLE_AFTER; two ticks without a reading between them settle the counts.
        let mut idle_tick = tokio::time::interval(pressure::SETTLE_AFTER);
        // Not `Burst`: ticks missed while ingest waited for the rules stage must not fire back
        // to back and pass for quiet (they settled the counts while the log was full).
        idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When ingest last took something from its link or finished handing it on.
        let mut busy = tokio::time::Instant::now();
        loop {
            let n = if draining {
                // Shutting down: the guard's sessions have ended; take what the router still
                // holds for us (already PUBACKed to sensors) until all that the guard relayed
                // has been taken and it has been quiet for a moment.
                let left = self.pressure.as_ref().map_or(0, |p| p.backlog());
                let quiet = if left == 0 {
                    DRAIN_IDLE
                } else {
                    DRAIN_UNCOUNTED
                };
                match tokio::time::timeout(quiet, self.link.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        if left > 0 {
                            tracing::info!(
                                bytes = left,
                                "ingest stopped with relayed bytes not seen on its link (refused by rumqttd or cut off at the close)"
                            );
                        }
                        return IngestEnd::Shutdown;
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    _ = self.shutdown.changed() => {
                        draining = true;
                        continue;
                    }
                    n = self.link.next() => n,
                    // Idle: nothing relayed can still be in the router for us.
                    _ = idle_tick.tick(), if self.pressure.is_some() => {
                        if let (true, Some(p)) = (busy.elapsed() >= pressure::SETTLE_AFTER, &self.pressure) {
                            p.settle();
                        }
                        continue;
                    }
                }
            };
            busy = tokio::time::Instant::now();
            let notification = match n {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => return IngestEnd::LinkLost(e.to_string()),
            };
            match notification {
                Notification::Forward(f) => {
                    if let Some((_, offset)) = f.cursor {
                        if let Some(expected) = next_offset {
                            if offset > expected {
                                self.metrics.drop_events(
                                    DropReason::BrokerSkipped,
                                    offset - expected,
                                    &"ingest fell behind the broker's in-memory log; raise broker.segment_size/segment_count or pipeline.channel_capacity",
                                );
                            }
                        }
                        next_offset = Some(offset + 1);
                    }
                    let topic = match std::str::from_utf8(&f.publish.topic) {
                        Ok(t) => t.to_string(),
                        Err(_) => String::from_utf8_lossy(&f.publish.topic).into_owned(),
                    };
                    let bytes = pressure::log_bytes(f.publish.topic.len(), f.publish.payload.len());
                    if topic.starts_with(OWN_PREFIX) {
                        if let Some(p) = &self.pressure {
                            if p.take_reserved(topic.as_bytes()) {
                                p.consumed(bytes);
                                self.metrics.drop_events(
                                    DropReason::ReservedTopic,
                                    1,
                                    &format_args!("a sensor published to {topic:?}, in the gateway's own namespace (allowed by broker.acl): not a reading"),
                                );
                            }
                        }
                        continue;
                    }
                    if let Some(p) = &self.pressure {
                        p.consumed(bytes);
                    }
                    self.metrics.readings_received.inc();
                    let traceparent = f.properties.as_ref().and_then(|p| {
                        p.user_properties
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
                            .map(|(_, v)| v.clone())
                    });
                    let traceparent = match traceparent {
                        Some(tp) if !valid_traceparent(&tp) => {
                            self.metrics.traceparent_invalid.inc();
                            tracing::debug!(%topic, traceparent = %tp.escape_debug(), "traceparent is not W3C trace context: left out");
                            None
                        }
                        tp => tp,
                    };
                    let reading = Reading {
                        topic,
                        received: SystemTime::now(),
                        payload: Payload::decode(f.publish.payload),
                        traceparent,
                    };
                    if !self.send(reading).await {
                        return IngestEnd::Downstream;
                    }
                    busy = tokio::time::Instant::now();
                }
                Notification::Unschedule => {
                    if let Err(e) = self.link.wake().await {
                        return IngestEnd::LinkLost(e.to_string());
                    }
                }
                Notification::Disconnect(..) => {
                    return IngestEnd::LinkLost("router disconnected the ingest link".into())
                }
                _ => {}
            }
        }
    }

    async fn send(&self, reading: Reading) -> bool {
        match self.when_full {
            WhenFull::Block => self.out.send_async(reading).await.is_ok(),
            WhenFull::DropNewest => match self.out.try_send(reading) {
                Ok(()) => true,
                Err(flume::TrySendError::Full(r)) => {
                    self.metrics.drop_events(
                        DropReason::ChannelFull,
                        1,
                        &format_args!("rules stage busy; dropped reading on {}", r.topic),
                    );
                    true
                }
                Err(flume::TrySendError::Disconnected(_)) => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_traceparent;

    #[test]
    fn traceparents() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1z",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }
}
