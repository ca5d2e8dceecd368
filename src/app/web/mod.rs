//! The status page (`GET /`) and its JSON API (`/api/...`), for a technician on site with a
//! browser and no internet: health, uplink, backlog, sensors, alerts, rules.
//!
//! Where the data comes from (read-only, through what the stages already expose):
//! - sensors, alerts, rule counters: the rules stage's [`crate::rules::history::Tap`], asked over a bounded
//!   channel (a full channel answers 503: page loads never queue up in front of readings);
//! - queue: [`QueueHandle::stats`] and the metrics' counters, sampled every
//!   [`SAMPLE_EVERY`] by [`Web::sample`] for the rates and the depth chart (one hour);
//! - upstream: the forwarder's status watch (since when up or down is noted here), reconnects
//!   from the metrics;
//! - health: the problems the supervisor finds for `/healthz`;
//! - the last rules reload: [`ReloadLog`], filled by the SIGHUP handler (`app::reload`).
//!
//! Invariant: nothing here can change the gateway (GET only) and nothing here holds a lock the
//! pipeline takes per reading.
//!
//! Layer: app: reads the stages (rules' `Tap` and reload log, queue stats, forwarder status),
//! never the other way round.

pub mod access;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::config::Config;
use crate::core::metrics::Metrics;
use crate::forwarder::UpstreamStatus;
use crate::queue::QueueHandle;
use crate::rules::stage::ReloadLog;

use crate::rules::history::{Request, SensorQuery, SortBy};
pub use access::Access;

/// The page: one HTML file with its CSS and script, no external assets.
pub const PAGE: &str = include_str!("page.html");

/// The page's Content-Security-Policy: its one inline script by hash (so nothing a sensor sends
/// can run even if it reached the DOM as markup), inline styles, fetches to this listener only.
pub fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(s, _)| s)
            .unwrap_or_default();
        let hash = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
        let hash = base64::engine::general_purpose::STANDARD.encode(hash.as_ref());
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    })
}

/// How often queue figures are sampled for rates and the depth chart.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Depth chart: one point per this many seconds, the last hour.
pub const CHART_STEP_SECS: u64 = 10;
pub const CHART_POINTS: usize = 360;
/// Rates are computed over this window (or since start, if shorter).
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Longest wait for the rules stage or the queue writer to answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(2);

/// The uplink as the page shows it.
#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    since: Option<SystemTime>,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct QueueSamples {
    /// (when, committed total, forwarded total), newest last, [`RATE_WINDOW`] of them.
    recent: VecDeque<(Instant, u64, u64)>,
    /// (Unix seconds, depth), one per [`CHART_STEP_SECS`], newest last.
    chart: VecDeque<(u64, u64)>,
}

/// Everything the page and the API read.
pub struct Web {
    pub gateway_id: String,
    pub upstream_url: Option<String>,
    pub metrics: Arc<Metrics>,
    pub health: super::http::HealthFn,
    pub queue: QueueHandle,
    pub requests: flume::Sender<Request>,
    pub reloads: ReloadLog,
    pub access: Access,
    started: (SystemTime, Instant),
    upstream: Mutex<Option<watch::Receiver<UpstreamStatus>>>,
    link: Mutex<Link>,
    samples: Mutex<QueueSamples>,
}

/// An API answer: status code and JSON text.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// Serialized directly (not through `Value`, which would widen `f32` to long decimals).
    fn ok(body: &impl Serialize) -> Answer {
        match serde_json::to_string(body) {
            Ok(body) => Answer { status: 200, body },
            Err(e) => Answer {
                status: 500,
                body: json!({ "error": e.to_string() }).to_string(),
            },
        }
    }
    fn busy(what: &str) -> Answer {
        Answer {
            status: 503,
            body: json!({ "error": format!("{what} did not answer; try again") }).to_string(),
        }
    }
}

impl Web {
    /// The page for a gateway configured by `config`, served on `bound`.
    pub fn new(
        config: &Config,
        bound: SocketAddr,
        (metrics, health): (Arc<Metrics>, super::http::HealthFn),
        (queue, upstream): (QueueHandle, watch::Receiver<UpstreamStatus>),
        requests: flume::Sender<Request>,
        reloads: ReloadLog,
    ) -> Arc<Web> {
        let access = Access::new(
            bound,
            config.broker.allow_anonymous,
            config.broker.passwords.clone(),
        );
        match &access {
            Access::Open if !bound.ip().is_loopback() => tracing::warn!(
                listen = %bound,
                "status page and API open to the network without a password (broker.allow_anonymous = true)"
            ),
            Access::Closed => tracing::warn!(listen = %bound, "{}", access::Denied::NoUsers),
            _ => {}
        }
        Arc::new(Web {
            gateway_id: config.gateway.id.clone(),
            upstream_url: config.upstream.url.as_ref().map(|u| u.to_string()),
            metrics,
            health,
            queue,
            requests,
            reloads,
            access,
            started: (SystemTime::now(), Instant::now()),
            upstream: Mutex::new(Some(upstream)),
            link: Mutex::new(Link::default()),
            samples: Mutex::new(QueueSamples::default()),
        })
    }

    /// Sample the queue figures and follow the uplink until the task is aborted (runs once:
    /// a second call returns at once).
    pub async fn sample(self: Arc<Web>) {
        let Some(mut upstream) = self.upstream.lock().ok().and_then(|mut u| u.take()) else {
            return;
        };
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            let status = upstream.borrow_and_update().clone();
            if let Ok(mut l) = self.link.lock() {
                if l.since.is_none() || l.connected != status.connected {
                    l.since = Some(SystemTime::now());
                }
                l.connected = status.connected;
                if status.last_error.is_some() {
                    l.last_error = status.last_error;
                }
            }
            tokio::select! {
                _ = tick.tick() => self.sample_queue(),
                r = upstream.changed(), if open => open = r.is_ok(),
            }
        }
    }

    fn sample_queue(&self) {
        let now = Instant::now();
        let m = &self.metrics;
        let Ok(mut s) = self.samples.lock() else {
            return;
        };
        s.recent
            .push_back((now, m.events_committed.get(), m.events_forwarded.get()));
        while s
            .recent
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > RATE_WINDOW + SAMPLE_EVERY)
        {
            s.recent.pop_front();
        }
        let unix = crate::rules::secs(SystemTime::now()).max(0.0) as u64;
        let step = unix / CHART_STEP_SECS * CHART_STEP_SECS;
        let depth = m.queue_depth.get().max(0) as u64;
        match s.chart.back_mut() {
            Some(last) if last.0 == step => last.1 = last.1.max(depth),
            _ => {
                s.chart.push_back((step, depth));
                if s.chart.len() > CHART_POINTS {
                    s.chart.pop_front();
                }
            }
        }
    }

    /// Route an `/api/...` path (query string apart).
    pub async fn api(&self, path: &str, query: &str) -> Option<Answer> {
        Some(match path {
            "/api/status" => Answer::ok(&self.status()),
            "/api/queue" => Answer::ok(&self.queue_json().await),
            "/api/sensors" => {
                let q = parse_sensor_query(query);
                match self.ask(|tx| Request::Sensors(q, tx)).await {
                    Some(page) => Answer::ok(&page),
                    None => Answer::busy("rules stage"),
                }
            }
            "/api/alerts" => match self.ask(Request::Alerts).await {
                Some(page) => Answer::ok(&page),
                None => Answer::busy("rules stage"),
            },
            "/api/rules" => match self.ask(Request::Rules).await {
                Some(rules) => {
                    let reload = self.reloads.lock().ok().and_then(|r| r.clone());
                    Answer::ok(&json!({
                        "rules": rules,
                        "last_reload": reload,
                        "reloads": self.metrics.rules.reloads.get(),
                        "reload_failures": self.metrics.rules.reload_failures.get(),
                    }))
                }
                None => Answer::busy("rules stage"),
            },
            _ => return None,
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.requests.try_send(make(tx)).ok()?;
        tokio::time::timeout(ANSWER_LIMIT, rx).await.ok()?.ok()
    }

    fn status(&self) -> Value {
        let reasons = (self.health)();
        let link = self.link.lock().map(|l| l.clone()).unwrap_or_default();
        let since =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        json!({
            "gateway": {
                "id": self.gateway_id,
                "version": env!("CARGO_PKG_VERSION"),
                "started": since(Some(self.started.0)),
                "uptime_s": self.started.1.elapsed().as_secs(),
            },
            "health": { "healthy": reasons.is_empty(), "reasons": reasons },
            "upstream": {
                "configured": self.upstream_url.is_some(),
                "url": self.upstream_url,
                "connected": link.connected,
                "since": since(link.since),
                "last_error": link.last_error,
                "reconnects": self.metrics.upstream_reconnects.get(),
                "forwarded": self.metrics.events_forwarded.get(),
            },
            "readings": self.metrics.readings_received.get(),
        })
    }

    async fn queue_json(&self) -> Value {
        let m = &self.metrics;
        let stats = tokio::time::timeout(ANSWER_LIMIT, self.queue.stats())
            .await
            .ok()
            .and_then(Result::ok);
        let (depth, bytes, alerts, oldest_us) = match &stats {
            Some(s) => (s.depth, s.bytes, Some(s.alerts), s.oldest_us),
            None => (
                m.queue_depth.get().max(0) as u64,
                m.queue_bytes.get().max(0) as u64,
                None,
                None,
            ),
        };
        let now_us = (crate::rules::secs(SystemTime::now()) * 1e6) as i64;
        let oldest_age = oldest_us.map(|o| ((now_us - o).max(0) as f64 / 1e6).round());
        let (rate_in, rate_out, chart) = match self.samples.lock() {
            Ok(s) => {
                let rates = match (s.recent.front(), s.recent.back()) {
                    (Some(a), Some(b)) if b.0 > a.0 => {
                        let dt = b.0.duration_since(a.0).as_secs_f64();
                        Some((
                            b.1.saturating_sub(a.1) as f64 / dt,
                            b.2.saturating_sub(a.2) as f64 / dt,
                        ))
                    }
                    _ => None,
                };
                let chart: Vec<(u64, u64)> = s.chart.iter().copied().collect();
                (rates.map(|r| r.0), rates.map(|r| r.1), chart)
            }
            Err(_) => (None, None, Vec::new()),
        };
        // Time to drain: the backlog over the net outflow, when it is shrinking.
        let drain_s = match (rate_in, rate_out) {
            (_, _) if depth == 0 => Some(0.0),
            (Some(i), Some(o)) if o > i => Some((depth as f64 / (o - i)).round()),
            _ => None,
        };
        let round = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
        let dropped: serde_json::Map<String, Value> = m
            .drops()
            .into_iter()
            .map(|(r, n)| (r.to_string(), json!(n)))
            .collect();
        json!({
            "depth": depth,
            "bytes": bytes,
            "alerts": alerts,
            "oldest_age_s": oldest_age,
            "in_per_s": round(rate_in),
            "out_per_s": round(rate_out),
            "drain_s": drain_s,
            "committed": m.events_committed.get(),
            "forwarded": m.events_forwarded.get(),
            "dropped": dropped,
            "chart": { "step_s": CHART_STEP_SECS, "points": chart },
        })
    }
}

/// `filter=..&sort=topic|last_seen|rate|alerts&order=asc|desc&offset=N&limit=N`; unknown or
/// malformed parameters fall back to their defaults.
pub fn parse_sensor_query(query: &str) -> SensorQuery {
    let mut q = SensorQuery::default();
    let mut order = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "filter" => q.filter = v.chars().take(256).collect(),
            "sort" => {
                q.sort = match v.as_str() {
                    "last_seen" => SortBy::LastSeen,
                    "rate" => SortBy::Rate,
                    "alerts" => SortBy::Alerts,
                    _ => SortBy::Topic,
                }
            }
            "order" => order = Some(v == "desc"),
            "offset" => q.offset = v.parse().unwrap_or(0),
            "limit" => q.limit = v.parse().unwrap_or(q.limit),
            _ => {}
        }
    }
    // Most recent, busiest, most alerting first unless asked otherwise.
    q.descending = order.unwrap_or(q.sort != SortBy::Topic);
    q
}

/// `%XX` and `+` decoding of a query value; invalid sequences are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_query_parsing() {
        let q = parse_sensor_query("filter=boiler%2F1+x&sort=rate&limit=5&offset=2&junk");
        assert_eq!(q.filter, "boiler/1 x");
        assert_eq!(
            (q.sort, q.descending, q.limit, q.offset),
            (SortBy::Rate, true, 5, 2)
        );
        let q = parse_sensor_query("sort=topic&order=desc&limit=x&filter=%zz%4");
        assert_eq!((q.sort, q.descending, q.limit), (SortBy::Topic, true, 200));
        assert_eq!(q.filter, "%zz%4");
        assert_eq!(parse_sensor_query("").sort, SortBy::Topic);
    }
}
