//! The gateway's status document on the local broker at [`STATUS_TOPIC`].
//!
//! Invariant: it is published only when the gateway's state changes (healthy or not, the
//! problems, the upstream link), and not retained, so a local app subscribed to `#` or `+/+` is
//! not fed the gateway's own chatter: before, it was republished, retained, every 2 s. Retained
//! it would still reach every wildcard subscriber once, and a client that clears the retained
//! messages it finds (as test suites and some apps do) would publish into `edgegate/`, which the
//! guard refuses. The current state is always at `/healthz` and the status page. It cannot live
//! under `$SYS`: rumqttd 0.20 refuses every filter that starts with `$` and routes no topic that
//! does (`protocol::matches`, `router::routing::validate_subscription`).
//!
//! Layer: app.

use std::time::{Duration, Instant, SystemTime};

use rumqttd::local::LinkTx;

use crate::core::stamp;

/// Where the gateway publishes its status (retained) on the local broker.
pub const STATUS_TOPIC: &str = "edgegate/status";

/// One supervision tick's view of the gateway.
pub struct Snapshot<'a> {
    pub problems: &'a [String],
    pub upstream_configured: bool,
    pub upstream_connected: bool,
    pub queue_depth: u64,
    pub queue_oldest_us: Option<i64>,
    /// Set aside for an operator (`queue peek --parked`); delivery goes on.
    pub queue_parked: u64,
    pub readings_total: u64,
    pub forwarded_total: u64,
}

/// What makes a new document worth publishing: health, the problems
/// (digits left out, so a stall's growing duration is not a change), the upstream link.
#[derive(PartialEq, Eq)]
struct State {
    problems: Vec<String>,
    upstream_connected: bool,
}

impl State {
    fn of(s: &Snapshot<'_>) -> State {
        State {
            problems: s
                .problems
                .iter()
                .map(|p| p.chars().filter(|c| !c.is_ascii_digit()).collect())
                .collect(),
            upstream_connected: s.upstream_connected,
        }
    }
}

/// Publishes the status document when the state changes.
pub struct StatusPublisher {
    link: Option<LinkTx>,
    last: Option<(State, Instant, u64, u64)>,
}

impl StatusPublisher {
    pub fn new(link: Option<LinkTx>) -> StatusPublisher {
        StatusPublisher { link, last: None }
    }

    /// Publish `s` if the state changed since the last document.
    pub async fn observe(&mut self, s: &Snapshot<'_>) {
        let state = State::of(s);
        let now = Instant::now();
        let due = match &self.last {
            None => true,
            Some((last, _, _, _)) => *last != state,
        };
        if !due {
            return;
        }
        let (since, readings_before, forwarded_before) = match &self.last {
            Some((_, at, r, f)) => (now.duration_since(*at), *r, *f),
            None => (Duration::ZERO, s.readings_total, s.forwarded_total),
        };
        let secs = since.as_secs_f64().max(1e-3);
        let doc = serde_json::json!({
            "healthy": s.problems.is_empty(),
            "problems": s.problems,
            "upstream_configured": s.upstream_configured,
            "upstream_connected": s.upstream_connected,
            "queue_depth": s.queue_depth,
            "queue_oldest_us": s.queue_oldest_us,
            "queue_parked": s.queue_parked,
            "readings_per_second": s.readings_total.saturating_sub(readings_before) as f64 / secs,
            "forwarded_per_second": s.forwarded_total.saturating_sub(forwarded_before) as f64 / secs,
            "readings_total": s.readings_total,
            "forwarded_total": s.forwarded_total,
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        });
        self.last = Some((state, now, s.readings_total, s.forwarded_total));
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let publish = rumqttd::protocol::Publish::new(
            STATUS_TOPIC.as_bytes().to_vec(),
            // Stamped like every message in the local broker (`core::stamp`).
            stamp::OWN.prepend(doc.to_string().as_bytes(), false),
            false,
        );
        if let Err(e) = link
            .send(rumqttd::protocol::Packet::Publish(publish, None))
            .await
        {
            tracing::warn!(error = %e, "status publish on the local broker failed");
            self.link = None;
        }
    }
}
