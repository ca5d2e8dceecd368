//! The fleet agent: its own upstream connection, documents in, state out.
//!
//! Invariants:
//! - Subscriptions are made on every CONNACK (the session is clean: nothing of an earlier
//!   connection is trusted), so a reconnect always gets the retained documents again; one equal
//!   (by SHA-256) to the document in force changes nothing.
//! - The state is published retained, QoS 1, before subscribing (so a document that kills the
//!   connection cannot hide the state), on every change and every `fleet.state_interval`; the
//!   will (retained) says `"online": false`; a clean stop publishes that itself.
//! - An empty message (the retained document deleted on the broker) changes nothing: the last
//!   good document stays in force. To withdraw a source's rules, push a document without rules.
//! - Documents are handled one at a time in this task; those arriving meanwhile are coalesced
//!   (the latest per topic wins), so a flood costs one check and at most one apply per topic
//!   per round, and a bounded channel paces the connection.
//!
//! Layer: app (it uses the forwarder's session adapter and backoff, the rules stage's handle and
//! the HTTP listener's health).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::document::{self, Policy};
use super::store::{Doc, Store};
use super::{RuleSources, Source};
use crate::app::http::HealthFn;
use crate::config::{Config, ConfigError, UpstreamProtocol, UpstreamUrl};
use crate::forwarder::UpstreamStatus;
use crate::queue::QueueHandle;
use crate::rules::stage::RulesHandle;

/// What happened to documents, for the state.
#[derive(Debug, Default)]
pub struct Report {
    /// Per topic: the document in force.
    pub documents: BTreeMap<String, Value>,
    /// The last document applied: (topic, source, sha256, applied_at).
    pub last_applied: Option<(String, String, String, String)>,
    /// The last document refused.
    pub refused: Option<Value>,
    /// Problems found at start (documents kept that no longer pass, a corrupt journal).
    pub problems: Vec<String>,
}

pub struct Agent {
    pub config: Config,
    pub sources: RuleSources,
    pub rules: RulesHandle,
    pub store: Store,
    pub report: Report,
    pub queue: QueueHandle,
    pub health: HealthFn,
    pub upstream: watch::Receiver<UpstreamStatus>,
    pub shutdown: watch::Receiver<bool>,
}

/// What the connection task hands over.
enum Net {
    Connected,
    Document { topic: String, payload: Bytes },
    Failed(String),
}

/// Either client version; the two have the same methods but no common trait.
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A request the client refused (its event loop gone or its request channel full); the message
/// is the client's. Boxed: the client's error holds the whole request (over 200 bytes).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    V4(Box<rumqttc::ClientError>),
    #[error(transparent)]
    V5(Box<rumqttc::v5::ClientError>),
}

impl From<rumqttc::ClientError> for RequestError {
    fn from(e: rumqttc::ClientError) -> Self {
        RequestError::V4(Box::new(e))
    }
}

impl From<rumqttc::v5::ClientError> for RequestError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        RequestError::V5(Box::new(e))
    }
}

impl Client {
    fn subscribe(&self, topic: &str) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c.try_subscribe(topic, rumqttc::QoS::AtLeastOnce)?,
            Client::V5(c) => c.try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)?,
        }
        Ok(())
    }

    fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), RequestError> {
        match self {
            Client::V4(c) => c.try_publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)?,
            Client::V5(c) => c.try_publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                payload,
            )?,
        }
        Ok(())
    }

    /// Ask for a DISCONNECT; nothing to do if the client refuses (the connection is going).
    fn disconnect(&self) {
        match self {
            Client::V4(c) => {
                let _ = c.try_disconnect();
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

/// How often health and the uplink are looked at for a change.
const HEALTH_POLL: Duration = Duration::from_secs(2);

/// Bytes of a packet beyond its payload we allow for (fixed header, topic, properties).
const PACKET_OVERHEAD: usize = 1024;

/// Largest packet the fleet connection takes in over MQTT 3.1.1 after a document over
/// `fleet.max_document_size` ended it once (see `serve`).
const OVERSIZE_CEILING: usize = 16 * 1024 * 1024;

/// Open the fleet connection; events arrive on `tx` until it fails. `ceiling`: take in packets
/// up to this size, whatever `fleet.max_document_size` (MQTT 3.1.1, after an oversized one).
fn open(
    config: &Config,
    url: &UpstreamUrl,
    will: Vec<u8>,
    tx: flume::Sender<Net>,
    ceiling: Option<usize>,
) -> (Client, JoinHandle<()>) {
    let up = &config.upstream;
    let f = &config.fleet;
    let state = crate::core::reserved::state_topic(&up.topic_prefix);
    let transport = crate::forwarder::session::transport(up, url);
    let password = crate::forwarder::session::password(up);
    let incoming = ceiling
        .unwrap_or(0)
        .max(f.max_document_size + PACKET_OVERHEAD);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(up.ack_timeout.as_secs().clamp(1, 30));
    match up.protocol {
        UpstreamProtocol::V4 => {
            use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
            let mut opts = MqttOptions::new(f.client_id.clone(), url.host.clone(), url.port);
            opts.set_keep_alive(up.keep_alive)
                .set_clean_session(true)
                // MQTT 3.1.1 cannot tell the broker a limit: a larger packet ends the
                // connection (this one only, never the forwarder's).
                .set_max_packet_size(incoming, 256 * 1024)
                .set_last_will(LastWill::new(state, will, QoS::AtLeastOnce, true));
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            if let Some(user) = &up.username {
                opts.set_credentials(user.clone(), password);
            }
            let (client, mut eventloop) = AsyncClient::new(opts, 32);
            eventloop.set_network_options(net);
            let task = tokio::spawn(async move {
                loop {
                    let ev = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => Net::Connected,
                        Ok(Event::Incoming(Packet::Publish(p))) => Net::Document {
                            topic: p.topic,
                            payload: p.payload,
                        },
                        Ok(Event::Incoming(Packet::SubAck(a))) => {
                            if a.return_codes
                                .iter()
                                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            {
                                tracing::warn!("the upstream refused a fleet subscription (ACL?): documents on that topic will not arrive");
                            }
                            continue;
                        }
                        Ok(_) => continue,
                        Err(e) => Net::Failed(e.to_string()),
                    };
                    let failed = matches!(ev, Net::Failed(_));
                    if tx.send_async(ev).await.is_err() || failed {
                        break;
                    }
                }
            });
            (Client::V4(client), task)
        }
        UpstreamProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
            use rumqttc::v5::mqttbytes::QoS;
            use rumqttc::v5::{AsyncClient, Event, MqttOptions};
            let mut opts = MqttOptions::new(f.client_id.clone(), url.host.clone(), url.port);
            opts.set_keep_alive(up.keep_alive)
                .set_clean_start(true)
                // Announced in CONNECT: the broker does not send us larger documents at all.
                .set_max_packet_size(Some(incoming.min(u32::MAX as usize) as u32))
                .set_last_will(LastWill::new(state, will, QoS::AtLeastOnce, true, None))
                .set_network_options(net);
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            if let Some(user) = &up.username {
                opts.set_credentials(user.clone(), password);
            }
            let (client, mut eventloop) = AsyncClient::new(opts, 32);
            let task = tokio::spawn(async move {
                loop {
                    let ev = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => Net::Connected,
                        Ok(Event::Incoming(Packet::Publish(p))) => Net::Document {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                        },
                        Ok(_) => continue,
                        Err(e) => Net::Failed(e.to_string()),
                    };
                    let failed = matches!(ev, Net::Failed(_));
                    if tx.send_async(ev).await.is_err() || failed {
                        break;
                    }
                }
            });
            (Client::V5(client), task)
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn errors_json(errors: &[ConfigError]) -> Value {
    // Bounded: a document with thousands of bad rules must not make a huge state.
    let mut v: Vec<Value> = errors
        .iter()
        .take(50)
        .map(|e| {
            let mut m = e.message.clone();
            if m.len() > 500 {
                let mut cut = 500;
                while !m.is_char_boundary(cut) {
                    cut -= 1;
                }
                m.truncate(cut);
                m.push('…');
            }
            json!({"key": e.key, "message": m})
        })
        .collect();
    if errors.len() > 50 {
        v.push(json!({"key": "document", "message": format!("{} more errors", errors.len() - 50)}));
    }
    Value::Array(v)
}

/// Check the documents kept in `store` for `config` again (keys or rules may have changed since)
/// and preset them in `sources`; what no longer passes is left out and reported.
pub fn load_kept(config: &Config, store: &Store, sources: &RuleSources, report: &mut Report) {
    let policy = policy(config);
    let settings = config
        .rules
        .first()
        .map(|r| r.settings.clone())
        .unwrap_or_default();
    for (topic, source) in super::topics(config) {
        let Some(doc) = store.in_force(&topic) else {
            continue;
        };
        match document::check(&topic, doc.text.as_bytes(), &policy, &settings) {
            Ok(c) => {
                tracing::info!(%topic, sha256 = %doc.sha256, rules = c.rules.len(), "fleet document kept from the last run");
                sources.preset(&topic, c.rules);
                if report
                    .last_applied
                    .as_ref()
                    .is_none_or(|l| l.3 <= doc.applied_at)
                {
                    report.last_applied = Some((
                        topic.clone(),
                        source.to_string(),
                        doc.sha256.clone(),
                        doc.applied_at.clone(),
                    ));
                }
                report.documents.insert(
                    topic.clone(),
                    doc_json(&source, doc, store.confirmed(&topic)),
                );
            }
            Err(errors) => {
                let msg = format!(
                    "the kept document of {topic} ({}) no longer passes and is not applied: {}",
                    doc.sha256,
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                tracing::error!("{msg}");
                report.problems.push(msg);
            }
        }
    }
}

fn doc_json(source: &Source, doc: &Doc, confirmed: bool) -> Value {
    json!({
        "source": source.to_string(),
        "sha256": doc.sha256,
        "applied_at": doc.applied_at,
        "signed": doc.signed_at.is_some(),
        "confirmed": confirmed,
    })
}

pub fn policy(config: &Config) -> Policy {
    Policy {
        max_size: config.fleet.max_document_size,
        trusted_keys: config.fleet.trusted_keys.clone(),
    }
}

impl Agent {
    pub async fn run(mut self) {
        let Some(url) = self.config.upstream.url.clone() else {
            return;
        };
        self.serve(url).await;
        // Only a stop ends `serve`: a clean one, which must not count as a failed run of the
        // documents on trial (three restarts by the operator are no crash loop).
        if let Err(e) = self.store.clean_stop() {
            tracing::warn!(error = %e, "fleet: the clean stop could not be recorded; this run counts towards fleet.rollback_after");
        }
    }

    /// Talk to the cloud broker until the gateway stops.
    async fn serve(&mut self, url: UpstreamUrl) {
        let started = Instant::now();
        let started_at = SystemTime::now();
        let topics = super::topics(&self.config);
        let state_topic = crate::core::reserved::state_topic(&self.config.upstream.topic_prefix);
        // Documents on trial since this start (a kept trial) or their apply.
        let mut trial_since = self.store.on_trial().then(Instant::now);
        let mut attempt: u32 = 0;
        // MQTT 3.1.1 cannot tell the broker a size limit: a retained document over it ends the
        // connection on every reconnect (the state flapping to offline, no new document
        // getting through). After the first such end the connection takes in up to
        // OVERSIZE_CEILING, and the document is refused like any invalid one, with its key.
        let mut ceiling = None;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let (tx, rx) = flume::bounded::<Net>(16);
            let will = serde_json::to_vec(&json!({
                "gateway": self.config.gateway.id,
                "online": false,
                "version": env!("CARGO_PKG_VERSION"),
                "groups": self.config.fleet.groups,
            }))
            .unwrap_or_default();
            let (client, task) = open(&self.config, &url, will, tx, ceiling);
            let mut tick = tokio::time::interval(self.config.fleet.state_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.reset();
            let mut connected_at = None;
            // Health and uplink are watched more often than the state is due: a change is
            // published at once (the first state often says "starting").
            let mut watch = tokio::time::interval(HEALTH_POLL);
            watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = self.vitals();
            let end = loop {
                let confirm_in = trial_since
                    .map(|t| self.config.fleet.confirm_after.saturating_sub(t.elapsed()));
                tokio::select! {
                    ev = rx.recv_async() => match ev {
                        Ok(Net::Connected) => {
                            connected_at = Some(Instant::now());
                            tracing::info!(client_id = %self.config.fleet.client_id, "fleet connection up");
                            let state = self.state(started, started_at, true).await;
                            if let Err(e) = client.publish_retained(&state_topic, state) {
                                tracing::warn!(error = %e, "fleet state not published");
                            }
                            for (t, _) in &topics {
                                if let Err(e) = client.subscribe(t) {
                                    tracing::warn!(topic = %t, error = %e, "fleet subscription not sent");
                                }
                            }
                        }
                        Ok(Net::Document { topic, payload }) => {
                            // The latest per topic of what is waiting.
                            let mut pending: BTreeMap<String, Bytes> = BTreeMap::new();
                            pending.insert(topic, payload);
                            let mut failed = None;
                            while let Ok(more) = rx.try_recv() {
                                match more {
                                    Net::Document { topic, payload } => { pending.insert(topic, payload); }
                                    Net::Connected => {}
                                    Net::Failed(e) => { failed = Some(e); break; }
                                }
                            }
                            let mut changed = false;
                            for (topic, payload) in pending {
                                let Some((_, source)) = topics.iter().find(|(t, _)| *t == topic) else {
                                    continue;
                                };
                                match self.handle(&topic, source, &payload).await {
                                    Handled::Applied => {
                                        trial_since = Some(Instant::now());
                                        changed = true;
                                    }
                                    Handled::Refused => changed = true,
                                    Handled::Same => {}
                                    Handled::Stopped => break,
                                }
                            }
                            if changed {
                                let state = self.state(started, started_at, true).await;
                                let _ = client.publish_retained(&state_topic, state);
                            }
                            if let Some(e) = failed {
                                break Some(e);
                            }
                        }
                        Ok(Net::Failed(e)) => break Some(e),
                        Err(_) => break Some("fleet connection task ended".into()),
                    },
                    _ = watch.tick() => {
                        let now = self.vitals();
                        if now != seen && connected_at.is_some() {
                            seen = now;
                            let state = self.state(started, started_at, true).await;
                            let _ = client.publish_retained(&state_topic, state);
                        }
                    }
                    _ = tick.tick() => {
                        if connected_at.is_some() {
                            let state = self.state(started, started_at, true).await;
                            let _ = client.publish_retained(&state_topic, state);
                        }
                    }
                    _ = sleep_opt(confirm_in), if confirm_in.is_some() => {
                        match self.store.confirm() {
                            Ok(()) => tracing::info!("fleet documents confirmed: the gateway ran fleet.confirm_after with them"),
                            Err(e) => tracing::error!(error = %e, "fleet documents could not be confirmed; they stay on trial"),
                        }
                        trial_since = None;
                        for (t, v) in self.report.documents.iter_mut() {
                            v["confirmed"] = json!(self.store.confirmed(t));
                        }
                        if connected_at.is_some() {
                            let state = self.state(started, started_at, true).await;
                            let _ = client.publish_retained(&state_topic, state);
                        }
                    }
                    _ = self.shutdown.changed() => break None,
                }
            };
            match end {
                None => {
                    // A clean stop: say so (the will fires only on a lost connection).
                    if connected_at.is_some() {
                        let state = self.state(started, started_at, false).await;
                        let _ = client.publish_retained(&state_topic, state);
                        client.disconnect();
                        let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
                    } else {
                        task.abort();
                    }
                    return;
                }
                Some(e) => {
                    task.abort();
                    if connected_at
                        .is_some_and(|t| t.elapsed() > self.config.upstream.reconnect_max)
                    {
                        attempt = 0;
                    }
                    if e.contains("PayloadSizeLimitExceeded") || e.contains("size limit") {
                        let errors = [ConfigError {
                            key: "document".into(),
                            message: format!("a message larger than fleet.max_document_size ({} bytes) ended the fleet connection: {e}", self.config.fleet.max_document_size),
                        }];
                        tracing::error!(error = %e, "a fleet document over fleet.max_document_size ended the fleet connection (MQTT 3.1.1 cannot announce a limit; upstream.protocol = \"5\" can): taking in up to 16 MiB from now on, to refuse it");
                        self.refuse("?", "?", "", &errors);
                        ceiling = Some(OVERSIZE_CEILING);
                        attempt = 0;
                    } else {
                        tracing::warn!(error = %e, "fleet connection lost");
                    }
                    let delay = crate::forwarder::backoff(
                        self.config.upstream.reconnect_min,
                        self.config.upstream.reconnect_max,
                        attempt,
                    );
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// What makes a new state worth publishing before it is due.
    fn vitals(&self) -> (Vec<String>, bool) {
        ((self.health)(), self.upstream.borrow().connected)
    }

    /// One document received on `topic`.
    async fn handle(&mut self, topic: &str, source: &Source, payload: &[u8]) -> Handled {
        if payload.is_empty() {
            tracing::info!(%topic, "the retained fleet document was deleted on the broker; the rules in force stay");
            return Handled::Same;
        }
        let sha = document::sha256_hex(payload);
        let in_force = self.store.in_force(topic).cloned();
        if in_force.as_ref().is_some_and(|d| d.sha256 == sha) {
            return Handled::Same;
        }
        if let Some(r) = self.store.rolled_back(topic, &sha) {
            let errors = [ConfigError {
                key: "document".into(),
                message: format!("rolled back at {}: {}; push a new document", r.at, r.reason),
            }];
            if self
                .report
                .refused
                .as_ref()
                .and_then(|r| r["sha256"].as_str())
                != Some(sha.as_str())
            {
                self.refuse(topic, &source.to_string(), &sha, &errors);
                return Handled::Refused;
            }
            return Handled::Same;
        }
        let settings = self
            .config
            .rules
            .first()
            .map(|r| r.settings.clone())
            .unwrap_or_default();
        let checked = match document::check(topic, payload, &policy(&self.config), &settings) {
            Ok(c) => c,
            Err(errors) => {
                self.refuse(topic, &source.to_string(), &sha, &errors);
                return Handled::Refused;
            }
        };
        if let (Some(new), Some(old)) = (
            checked.signed_at,
            in_force.as_ref().and_then(|d| d.signed_at),
        ) {
            if new <= old {
                let errors = [ConfigError {
                    key: "signature".into(),
                    message: format!("signed at {new} ms, not after the document in force (signed at {old} ms): an older document replayed?"),
                }];
                self.refuse(topic, &source.to_string(), &sha, &errors);
                return Handled::Refused;
            }
        }
        let text = String::from_utf8_lossy(payload).into_owned();
        let doc = Doc {
            text,
            sha256: sha.clone(),
            applied_at: rfc3339(SystemTime::now()),
            signed_at: checked.signed_at,
        };
        if let Err(e) = self.store.apply(topic, doc.clone()) {
            let errors = [ConfigError {
                key: "gateway.data_dir".into(),
                message: format!("the document could not be kept ({e}), so it is not applied"),
            }];
            self.refuse(topic, &source.to_string(), &sha, &errors);
            return Handled::Refused;
        }
        let n = checked.rules.len();
        match self
            .sources
            .set_document(&self.rules, topic, checked.rules)
            .await
        {
            Some(kept) => {
                tracing::info!(%topic, %source, sha256 = %sha, rules = n, kept_state = ?kept, "fleet document applied");
                self.report
                    .documents
                    .insert(topic.to_string(), doc_json(source, &doc, false));
                self.report.last_applied =
                    Some((topic.to_string(), source.to_string(), sha, doc.applied_at));
                Handled::Applied
            }
            None => Handled::Stopped,
        }
    }

    fn refuse(&mut self, topic: &str, source: &str, sha: &str, errors: &[ConfigError]) {
        for e in errors {
            tracing::error!(%topic, sha256 = %sha, key = %e.key, error = %e.message, "fleet document refused; the rules in force stay");
        }
        self.report.refused = Some(json!({
            "topic": topic,
            "source": source,
            "sha256": sha,
            "at": rfc3339(SystemTime::now()),
            "errors": errors_json(errors),
        }));
    }

    /// The state document.
    async fn state(&self, started: Instant, started_at: SystemTime, online: bool) -> Vec<u8> {
        let problems = (self.health)();
        let depth = self.queue.stats().await.ok().map(|s| s.depth);
        let (sha, source, applied_at) = match &self.report.last_applied {
            Some((_, s, h, a)) => (json!(h), json!(s), json!(a)),
            None => (Value::Null, json!("local"), Value::Null),
        };
        let errors = self
            .report
            .refused
            .as_ref()
            .map(|r| r["errors"].clone())
            .unwrap_or(json!([]));
        let v = json!({
            "gateway": self.config.gateway.id,
            "online": online,
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": rfc3339(started_at),
            "uptime_s": started.elapsed().as_secs(),
            "published_at": rfc3339(SystemTime::now()),
            "health": {"ok": problems.is_empty(), "problems": problems},
            "upstream_connected": self.upstream.borrow().connected,
            "queue": {"depth": depth},
            "groups": self.config.fleet.groups,
            "signatures_required": !self.config.fleet.trusted_keys.is_empty(),
            "rules": {
                "sha256": sha,
                "source": source,
                "applied_at": applied_at,
                "errors": errors,
                "count": self.sources.count().await,
                "documents": self.report.documents,
                "refused": self.report.refused,
                "rolled_back": self.store.rollbacks(),
                "problems": self.report.problems,
            },
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

enum Handled {
    Applied,
    Refused,
    Same,
    /// The rules stage has stopped.
    Stopped,
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Everything the gateway needs to start the agent and the engine: the store opened and
/// started (rollbacks done), the kept documents checked and preset in `sources`.
pub fn prepare(
    config: &Config,
    sources: &RuleSources,
) -> Result<(Store, Report), super::store::StoreError> {
    let (mut store, problem) = Store::open(&config.gateway.data_dir)?;
    let mut report = Report::default();
    if let Some(p) = problem {
        tracing::error!("{p}");
        report.problems.push(p);
    }
    for r in store.start(config.fleet.rollback_after)? {
        tracing::error!(topic = %r.topic, sha256 = %r.sha256, reason = %r.reason, "fleet document rolled back");
        report.refused = Some(json!({
            "topic": r.topic,
            "source": super::topics(config).into_iter().find(|(t, _)| *t == r.topic).map(|(_, s)| s.to_string()),
            "sha256": r.sha256,
            "at": r.at,
            "errors": [{"key": "document", "message": format!("rolled back: {}", r.reason)}],
        }));
    }
    load_kept(config, &store, sources, &mut report);
    Ok((store, report))
}
