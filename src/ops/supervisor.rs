//! Supervision: a periodic check of every stage that feeds `/healthz`, systemd `STATUS=` and
//! the watchdog (WATCHDOG=1 only while everything is alive).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::broker::Broker;
use crate::forwarder::UpstreamStatus;
use crate::ops::metrics::Metrics;
use crate::ops::systemd;
use crate::queue::QueueHandle;

/// Periodic health check: feeds `/healthz`, systemd `STATUS=` and the watchdog.
pub struct Watched {
    pub broker: Arc<Broker>,
    pub stages: Vec<(&'static str, AbortHandle)>,
    pub queue: QueueHandle,
    pub upstream: watch::Receiver<UpstreamStatus>,
    pub upstream_configured: bool,
    pub problems: Arc<Mutex<Vec<String>>>,
    pub metrics: Arc<Metrics>,
}

impl Watched {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let watchdog = systemd::watchdog_interval();
        let period = watchdog
            .map(|w| (w / 3).min(Duration::from_secs(2)))
            .unwrap_or(Duration::from_secs(2));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let mut problems = Vec::new();
            if !self.broker.listeners_alive() {
                problems.push("broker listener stopped".to_string());
            }
            for (name, h) in &self.stages {
                if h.is_finished() {
                    problems.push(format!("{name} stage stopped"));
                }
            }
            let stats = match tokio::time::timeout(Duration::from_secs(5), self.queue.stats()).await
            {
                Ok(Ok(s)) => Some(s),
                _ => {
                    problems.push("queue writer not responding".to_string());
                    None
                }
            };
            let up = self.upstream.borrow().clone();
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
            systemd::status(&format!(
                "{upstream}; queue {depth} events; {} readings in",
                self.metrics.readings_received.get()
            ));
            if problems.is_empty() {
                systemd::watchdog_ping();
            } else {
                tracing::error!(?problems, "gateway unhealthy");
            }
            if let Ok(mut p) = self.problems.lock() {
                *p = problems;
            }
        }
    }
}
