//! A scripted upstream for the forwarder's unit tests: each connection the forwarder opens hands
//! the test a [`Peer`], which plays rumqttc and the broker together (thin-edge.io's simulated
//! peers are the model). The test sees each publish request, gives it a packet id, and answers
//! with PUBACKs (MQTT 5 reason codes included), errors, or a dead connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::session::{Connector, SessionError, Up, UpstreamSession};
use crate::config::{UpstreamConfig, UpstreamUrl};

/// How long a peer waits for what a test expects before failing it.
pub const WAIT: Duration = Duration::from_secs(5);

/// Opens fake sessions; the test gets their peers from [`FakeConnector::new`]'s receiver.
pub struct FakeConnector {
    peers: flume::Sender<Peer>,
    /// Publish requests on a topic containing this are refused (the library's `try_publish`
    /// failing before a packet id), on every connection.
    pub refuse_topic: Arc<Mutex<Option<String>>>,
}

impl FakeConnector {
    pub fn new() -> (FakeConnector, flume::Receiver<Peer>) {
        let (peers, rx) = flume::unbounded();
        (
            FakeConnector {
                peers,
                refuse_topic: Arc::default(),
            },
            rx,
        )
    }
}

pub struct FakeSession {
    requests: flume::Sender<(String, Vec<u8>)>,
    events: flume::Receiver<Result<Up, SessionError>>,
    alive: Arc<AtomicBool>,
    refuse_topic: Arc<Mutex<Option<String>>>,
}

impl Connector for FakeConnector {
    type Session = FakeSession;
    fn open(&mut self, _: &UpstreamConfig, _: &UpstreamUrl, window: usize) -> FakeSession {
        let (requests, requested) = flume::unbounded();
        let (events_tx, events) = flume::unbounded();
        let alive = Arc::new(AtomicBool::new(true));
        let _ = self.peers.send(Peer {
            requested,
            events: events_tx,
            alive: alive.clone(),
            ids: super::session::packet_ids(window),
            next_id: 0,
        });
        FakeSession {
            requests,
            events,
            alive,
            refuse_topic: self.refuse_topic.clone(),
        }
    }
}

impl UpstreamSession for FakeSession {
    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), SessionError> {
        if !self.alive() {
            return Err(SessionError::Refused("event loop gone".into()));
        }
        if let Some(bad) = self.refuse_topic.lock().unwrap().as_deref() {
            if topic.contains(bad) {
                return Err(SessionError::Refused(format!("invalid topic {topic}")));
            }
        }
        self.requests
            .send((topic, payload))
            .map_err(|_| SessionError::Refused("peer gone".into()))
    }

    fn disconnect(&self) {}

    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn events(&self) -> flume::Receiver<Result<Up, SessionError>> {
        self.events.clone()
    }
}

/// One publish that left, as the broker saw it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub pkid: u16,
    pub topic: String,
    /// The `subject` of each event it carries (one, or a batch's).
    pub subjects: Vec<String>,
}

/// The test's end of one connection.
pub struct Peer {
    requested: flume::Receiver<(String, Vec<u8>)>,
    events: flume::Sender<Result<Up, SessionError>>,
    alive: Arc<AtomicBool>,
    /// rumqttc numbers packets 1..=ids and wraps.
    ids: u16,
    next_id: u16,
}

impl Peer {
    fn up(&self, up: Up) {
        let _ = self.events.send(Ok(up));
    }

    /// CONNACK (MQTT 3.1.1, or MQTT 5 with a receive maximum).
    pub fn connack(&self, receive_max: Option<u16>) {
        self.up(Up::Connected {
            session_present: false,
            receive_max,
        });
    }

    /// The next publish request leaves: it gets the next packet id (`Outgoing::Publish`).
    pub async fn send(&mut self) -> Msg {
        let (topic, payload) = tokio::time::timeout(WAIT, self.requested.recv_async())
            .await
            .expect("a publish request in time")
            .expect("the session is open");
        self.next_id = self.next_id % self.ids + 1;
        self.up(Up::Sent(self.next_id));
        Msg {
            pkid: self.next_id,
            topic,
            subjects: subjects(&payload),
        }
    }

    /// The next `n` publish requests leave.
    pub async fn send_n(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.send().await);
        }
        out
    }

    /// Subjects of the publish requests made within `d` (they do not leave).
    pub async fn requests_within(&self, d: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let end = tokio::time::Instant::now() + d;
        while let Ok(Ok((_, payload))) =
            tokio::time::timeout_at(end, self.requested.recv_async()).await
        {
            out.extend(subjects(&payload));
        }
        out
    }

    pub fn puback(&self, pkid: u16) {
        self.up(Up::Acked {
            pkid,
            refused: None,
        });
    }

    /// An MQTT 5 PUBACK with a failure reason (as the real session names it).
    pub fn puback_refused(&self, pkid: u16, reason: &str) {
        self.up(Up::Acked {
            pkid,
            refused: Some(reason.into()),
        });
    }

    /// The connection dies (the event loop reports an error and ends).
    pub fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = self
            .events
            .send(Err(SessionError::Connection("connection reset".into())));
    }
}

fn subjects(payload: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("a JSON envelope");
    let one = |e: &serde_json::Value| e["subject"].as_str().unwrap_or_default().to_string();
    match &v {
        serde_json::Value::Array(a) => a.iter().map(one).collect(),
        e => vec![one(e)],
    }
}
