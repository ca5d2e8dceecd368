//! The gateway's status document, retained on the local broker at [`STATUS_TOPIC`].
//!
//! Invariant: it is published when the gateway's state changes (healthy or not, the problems,
//! the upstream link) and otherwise only every [`STATUS_HEARTBEAT`], so a local app subscribed
//! to `#` is not fed the gateway's own chatter (before, it was republished every 2 s). A late
//! subscriber still gets the last document at once: it is retained. It cannot live under `$SYS`:
//! rumqttd 0.20 refuses every filter that starts with `$` and routes no topic that does
//! (`protocol::matches`, `router::routing::validate_subscription`).

use std::time::{Duration, Instant, SystemTime};

use rumqttd::local::LinkTx;

/// Where the gateway publishes its status (retained) on the local broker.
pub const STATUS_TOPIC: &str = "edgegate/status";

/// Longest time between two status documents while nothing changes.
pub const STATUS_HEARTBEAT: Duration = Duration::from_secs(300);

/// One supervision tick's view of the gateway.
pub struct Snapshot<'a> {
    pub problems: &'a [String],
    pub upstream_configured: bool,
    pub upstream_connected: bool,
    pub queue_depth: u64,
    pub queue_oldest_us: Option<i64>,
    pub readings_total: u64,
    pub forwarded_total: u64,
}

/// What makes a new document worth publishing before the heartbeat: health, the problems
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

/// Publishes the status document on change and as a slow heartbeat.
pub struct StatusPublisher {
    link: Option<LinkTx>,
    last: Option<(State, Instant, u64, u64)>,
    heartbeat: Duration,
}

impl StatusPublisher {
    pub fn new(link: Option<LinkTx>) -> StatusPublisher {
        StatusPublisher {
            link,
            last: None,
            heartbeat: STATUS_HEARTBEAT,
        }
    }

    /// Publish `s` if the state changed or the heartbeat is due. Returns whether it did.
    pub async fn observe(&mut self, s: &Snapshot<'_>) -> bool {
        let state = State::of(s);
        let now = Instant::now();
        let due = match &self.last {
            None => true,
            Some((last, at, _, _)) => *last != state || now.duration_since(*at) >= self.heartbeat,
        };
        if !due {
            return false;
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
            "readings_per_second": s.readings_total.saturating_sub(readings_before) as f64 / secs,
            "forwarded_per_second": s.forwarded_total.saturating_sub(forwarded_before) as f64 / secs,
            "readings_total": s.readings_total,
            "forwarded_total": s.forwarded_total,
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        });
        self.last = Some((state, now, s.readings_total, s.forwarded_total));
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let publish = rumqttd::protocol::Publish::new(
            STATUS_TOPIC.as_bytes().to_vec(),
            doc.to_string().into_bytes(),
            true,
        );
        if let Err(e) = link
            .send(rumqttd::protocol::Packet::Publish(publish, None))
            .await
        {
            tracing::warn!(error = %e, "status publish on the local broker failed");
            self.link = None;
            return false;
        }
        true
    }
}
