//! The broker guard: the only sockets sensors reach. It accepts connections itself, checks them,
//! and relays what it lets through to rumqttd's listeners, which listen on 127.0.0.1 only and
//! accept nothing without the guard's per-process secret.
//!
//! Why (rumqttd 0.20, read in its source and reproduced against the internal listener in
//! tests/security.rs):
//! - a CONNECT the router refuses (client id with `+ # / $`, more than `max_connections`) leaves a
//!   will handler with a dead channel; the same client id connecting again panics while the
//!   will-handler mutex is held, poisoning it: every later connection on that listener dies.
//!   A connection task that dies after CONNECT (below) leaves the same trap. The guard refuses
//!   such client ids and excess connections before rumqttd sees them, waits for rumqttd's CONNACK
//!   before it lets a client go, and a liveness probe restarts a listener that stops answering;
//! - the TLS handshake runs inline in rumqttd's accept loop without a timeout: the guard
//!   terminates TLS itself, in the connection's own task, with `broker.connection_timeout`;
//! - packets a client must never send (CONNACK, SUBACK, UNSUBACK, PINGRESP, AUTH, a second
//!   CONNECT, reserved types) reach `unreachable!()` in rumqttd's decoders: the guard frames
//!   every packet from a client and closes the connection on one of those;
//! - client ids starting with `edgegate-` are the gateway's own (in-process links): refused;
//! - rumqttd keeps state per client id and per topic/filter forever: the guard caps the number
//!   of distinct ones (`broker.max_client_ids`, `broker.max_topics`) and their lengths;
//! - a DISCONNECT followed at once by the socket closing makes rumqttd disconnect the session
//!   twice: the router frees its connection slot on the DISCONNECT, and the connection task,
//!   reading the close, reports a disconnect for that slot again. The router hands a freed slot
//!   to the next connection (a sensor, or one of the gateway's links), which that second report
//!   then ends; a sensor on a clean session loses whatever it had not been PUBACKed. So after a
//!   client's DISCONNECT (and the probe's own) the guard keeps the internal connection open
//!   until rumqttd has closed it, which it does without a second report;
//! - rumqttd refuses keep alive 0, refuses an MQTT 5 empty client id with clean start 0, keeps
//!   MQTT 5 sessions by the 3.1.1 rules (ignoring the Session Expiry Interval), ignores the
//!   client's Maximum Packet Size and Receive Maximum, and closes a link on an acknowledgement
//!   out of order: the guard supplies each (see `Flow` and `session`), so that what a client
//!   sees is MQTT 3.1.1/5 and what rumqttd sees is what it can take.
//!
//! Everything refused is counted in `edgegate_broker_rejected_total{reason}` and logged
//! (rate-limited). Nothing a client sent is dropped silently: a refused publish closes the
//! connection before rumqttd sees it, so the sensor has no PUBACK for it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::{Login, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::broker::acl::{Acl, Perms};
use crate::broker::auth::Passwords;
use crate::broker::frame::{
    complete_frames, connack_assigning, decode, disconnect_expiry, encode, frame_of, parse_header,
    publish_meta, publish_pkid, qos0_frame, read_frame, read_frame_of, suback_refusal,
    subscribe_filters, unsubscribe_filters, FrameError, PacketType, PINGREQ,
};
use crate::broker::handoff::{Handed, Handoff, Owed, Publish, OWED_MAX, OWN_PREFIX};
use crate::broker::refusal::{Refusal, Refused};
use crate::broker::retained::{topic_hash, RetainedBook, RetainedLimits};
use crate::ops::metrics::{DropReason, Metrics};

/// Client ids with this prefix belong to the gateway itself.
pub const RESERVED_PREFIX: &str = "edgegate-";
/// The gateway's own links and probe use these; a sensor that takes one would kick a link off.
/// (Only these: another edgegate connecting upstream as `edgegate-{id}` must be let in.)
const RESERVED_IDS: [&str; 3] = ["edgegate-rules-", "edgegate-status-", "edgegate-probe-"];
/// Keep alive (seconds) the guard gives rumqttd for every connection it relays, whatever the
/// client's own (which the guard enforces itself; see `Flow`): rumqttd refuses keep alive 0,
/// which MQTT says turns keep alive off. The guard pings rumqttd after half of it without a write.
pub const INTERNAL_KEEP_ALIVE: u16 = 60;
/// Longest wait for rumqttd's CONNACK on the internal connection.
const INTERNAL_CONNACK: Duration = Duration::from_secs(5);
/// Longest wait, after a DISCONNECT, for rumqttd to close the internal connection (module docs).
const DISCONNECT_SETTLE: Duration = Duration::from_secs(2);
/// Concurrent argon2 verifications (each ~20 MiB and tens of ms): a password-guessing flood
/// cannot take every core.
const AUTH_SLOTS: usize = 2;

/// What the guard enforces.
pub struct Policy {
    pub allow_anonymous: bool,
    pub passwords: Option<Arc<Passwords>>,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub max_packet: usize,
    pub max_client_id_length: usize,
    pub max_topic_length: usize,
    pub max_topics: usize,
    pub max_client_ids: usize,
    pub max_publish_rate: u32,
    pub acl: Option<Arc<Acl>>,
    /// Retained messages rumqttd may hold (see [`crate::broker::retained`]).
    pub retained: RetainedLimits,
    /// Open connections from one source address.
    pub max_connections_per_address: usize,
    /// Filters one connection may hold subscribed at once.
    pub max_subscriptions_per_client: usize,
    /// Distinct subscription filters rumqttd will ever hold (it never frees one; each new topic
    /// is matched against all of them, each new filter against every topic seen).
    pub max_filters: usize,
    /// Refuse client ids with the gateway's own prefix (off for a broker without links of its
    /// own, like the demo's cloud, where the gateway itself connects as `edgegate-{id}`).
    pub reserve_own_prefix: bool,
}

/// State shared by every listener of one broker.
pub struct Guard {
    pub policy: Policy,
    /// Credential of the guard towards rumqttd's internal listeners (and of the probe).
    secret: String,
    /// Prefix of the probe's client ids (reserved, so no sensor can take one). Each probe
    /// connects with an id of its own: rumqttd 0.20 panics, poisoning the listener, when a
    /// client id reconnects while its previous connection is still being torn down, and a probe
    /// retried 100 ms after a failure (or one that timed out half-way) did exactly that. With a
    /// clean session rumqttd keeps nothing per id once the connection has ended.
    pub probe_id: String,
    probes: AtomicU64,
    active: AtomicUsize,
    /// Set when the gateway stops: every session ends at once, relaying nothing more.
    closing: watch::Sender<bool>,
    auth_slots: Semaphore,
    hasher: ahash::RandomState,
    topics: Mutex<HashSet<u64>>,
    client_ids: Mutex<HashSet<u64>>,
    /// Distinct subscription filters relayed to rumqttd.
    filters: Mutex<HashSet<u64>>,
    /// A client subscribed to something since the start. Until then no one can receive a
    /// publish from rumqttd, and readings are not relayed to it at all (only retained ones).
    subscribed: std::sync::atomic::AtomicBool,
    retained: Mutex<RetainedBook>,
    /// Open connections per source address.
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// One live session per client id at rumqttd (see [`Turn`]).
    turns: Mutex<HashMap<String, Arc<Turn>>>,
    pub metrics: Arc<Metrics>,
    /// Where readings go (`None`: a broker without a pipeline, like the demo's cloud, where
    /// rumqttd acknowledges publishes itself). Taken away at shutdown.
    handoff: Mutex<Option<Handoff>>,
    /// Keep alive given to rumqttd ([`INTERNAL_KEEP_ALIVE`]; shorter only in tests).
    internal_keep_alive: AtomicU16,
}

/// rumqttd 0.20 loses track of its will handlers when connections with the same client id
/// overlap or follow each other within moments (a takeover, a client reconnecting in a loop): a
/// handler with a dead receiver stays behind and the next CONNECT with that id panics while the
/// handler mutex is held (failure mode 1 again; seen under churn in tests/security.rs). So the
/// guard hands rumqttd one session per client id at a time: a new CONNECT first ends the
/// running session with that id (the MQTT takeover, done by the guard), waits until it is
/// closed, and leaves rumqttd [`TURN_GAP`] to finish its bookkeeping.
struct Turn {
    /// Held for the whole life of a session (and while the guard ends a stored one); the time
    /// the last one ended.
    lock: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Bumped by each new session: the running one ends when it sees a newer value.
    generation: watch::Sender<u64>,
}

/// Pause between the end of a session and the next one with the same client id.
const TURN_GAP: Duration = Duration::from_millis(50);

/// Longest MQTT 5 Session Expiry Interval the guard times; a session with a longer one (or
/// 0xFFFFFFFF, "never") is kept as long as rumqttd runs.
const MAX_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Counts an admitted connection (in all and for its source address) until dropped.
struct Admitted(Arc<Guard>, IpAddr);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.broker_connections.dec();
        let mut per = self.0.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}

/// Any stream the guard can relay (TCP, TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Packets relayed together in one write at most (bytes): under load a sensor's publishes and
/// the broker's PUBACKs arrive in bursts, and one write per packet was the relay's main cost.
const COALESCE: usize = 64 * 1024;

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Is this client id acceptable? `Err(reason, detail)`.
pub fn check_client_id(id: &str, max_len: usize) -> Result<(), Refused> {
    if id.len() > max_len {
        return Err(Refused(
            Refusal::ClientId,
            format!(
                "client id of {} bytes (broker.max_client_id_length {max_len})",
                id.len()
            ),
        ));
    }
    if let Some(c) = id.chars().find(|c| "+#/$".contains(*c) || c.is_control()) {
        return Err(Refused(
            Refusal::ClientId,
            format!("client id {id:?} contains {c:?}"),
        ));
    }
    if let Some(p) = RESERVED_IDS.iter().find(|p| id.starts_with(**p)) {
        return Err(Refused(
            Refusal::ReservedClientId,
            format!("client id {id:?} uses the gateway's reserved prefix {p:?}"),
        ));
    }
    Ok(())
}

/// Is `topic` a topic *name* MQTT lets a client publish to (PUBLISH, will)? Wildcards, NUL,
/// invalid UTF-8 and the empty name are refused (an MQTT 5 publish with a topic alias is checked
/// by the caller). Such a topic PUBACKed and queued would block the forwarder, whose client
/// library refuses it (issue 12.1). `Err(reason, detail)`.
pub fn check_topic_name(topic: &[u8]) -> Result<(), Refused> {
    let Ok(t) = std::str::from_utf8(topic) else {
        return Err(Refused(
            Refusal::TopicInvalid,
            format!(
                "topic {:?} is not valid UTF-8",
                String::from_utf8_lossy(topic)
            ),
        ));
    };
    if t.is_empty() {
        return Err(Refused(Refusal::TopicInvalid, "empty topic name".into()));
    }
    if t.contains(['+', '#']) {
        return Err(Refused(
            Refusal::TopicWildcard,
            format!("topic name {t:?} contains a wildcard"),
        ));
    }
    if t.contains('\0') {
        return Err(Refused(
            Refusal::TopicInvalid,
            format!("topic name {t:?} contains NUL"),
        ));
    }
    Ok(())
}

/// Topics sensors may not publish to unless an ACL pattern names them explicitly: the gateway's
/// own namespace (its alerts and status live there; not readings) and
/// `$` topics (reserved by MQTT for the server; they reach no reader of ours).
pub fn reserved_topic(topic: &[u8]) -> bool {
    topic.starts_with(OWN_PREFIX.as_bytes()) || topic.first() == Some(&b'$')
}

/// May a client with `perms` (no ACL: `None`) publish to the reserved `topic`?
fn reserved_allowed(perms: Option<&Perms>, topic: &[u8]) -> bool {
    perms.is_some_and(|p| p.names_explicitly(&String::from_utf8_lossy(topic)))
}

impl Guard {
    pub fn new(policy: Policy, metrics: Arc<Metrics>) -> Arc<Guard> {
        Arc::new(Guard {
            policy,
            secret: uuid::Uuid::new_v4().simple().to_string(),
            probe_id: format!("{RESERVED_PREFIX}probe-{}", uuid::Uuid::new_v4().simple()),
            probes: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            closing: watch::Sender::new(false),
            auth_slots: Semaphore::new(AUTH_SLOTS),
            hasher: ahash::RandomState::new(),
            topics: Mutex::new(HashSet::new()),
            client_ids: Mutex::new(HashSet::new()),
            filters: Mutex::new(HashSet::new()),
            subscribed: std::sync::atomic::AtomicBool::new(false),
            retained: Mutex::new(RetainedBook::default()),
            per_address: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            metrics,
            handoff: Mutex::new(None),
            internal_keep_alive: AtomicU16::new(INTERNAL_KEEP_ALIVE),
        })
    }

    /// For tests that show the guard keeps rumqttd's side of a connection alive: a shorter
    /// keep alive towards rumqttd for connections made from now on. Not part of the API.
    #[doc(hidden)]
    pub fn set_internal_keep_alive_for_tests(&self, secs: u16) {
        self.internal_keep_alive
            .store(secs.max(1), Ordering::Relaxed);
    }

    /// The credential rumqttd's internal listeners require (constant-time comparison).
    pub fn internal_password_ok(&self, password: &str) -> bool {
        ct_eq(password.as_bytes(), self.secret.as_bytes())
    }

    /// For tests that attack rumqttd's internal listener directly (to show what the guard
    /// prevents). Not part of the API.
    #[doc(hidden)]
    pub fn secret_for_tests(&self) -> &str {
        &self.secret
    }

    /// Hand readings to the pipeline from now on (connections made after this call).
    pub fn set_handoff(&self, handoff: Handoff) {
        *self.handoff.lock().unwrap_or_else(|e| e.into_inner()) = Some(handoff);
    }

    /// Let go of the pipeline (shutdown, after the sessions ended): its channel closes once
    /// the last session's copy is gone.
    pub fn end_handoff(&self) {
        self.handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn handoff(&self) -> Option<Handoff> {
        self.handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stop relaying: every open session ends (sensor and broker sides closed) without passing
    /// on anything more. Readings handed on before stay in the pipeline; those not yet
    /// acknowledged are sent again by their sensors after they reconnect.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Connections admitted and not yet ended.
    pub fn open_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Admit a connection from `ip`: `Err(reason, detail)` over `broker.max_connections` or
    /// `broker.max_connections_per_address`.
    fn admit(self: &Arc<Guard>, ip: IpAddr) -> Result<Admitted, Refused> {
        let n = self.active.fetch_add(1, Ordering::SeqCst);
        if n >= self.policy.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused(
                Refusal::ConnectionLimit,
                format!(
                    "broker.max_connections {} reached",
                    self.policy.max_connections
                ),
            ));
        }
        {
            let mut per = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let mine = per.entry(ip).or_default();
            if *mine >= self.policy.max_connections_per_address {
                drop(per);
                self.active.fetch_sub(1, Ordering::SeqCst);
                return Err(Refused(
                    Refusal::AddressLimit,
                    format!(
                        "broker.max_connections_per_address {} reached for {ip}",
                        self.policy.max_connections_per_address
                    ),
                ));
            }
            *mine += 1;
        }
        self.metrics.broker_connections.inc();
        Ok(Admitted(self.clone(), ip))
    }

    /// Remember `key` in a bounded set; false if it is new and the set is full.
    fn note(&self, set: &Mutex<HashSet<u64>>, key: &[u8], cap: usize) -> bool {
        let h = self.hasher.hash_one(key);
        let Ok(mut s) = set.lock() else {
            return false;
        };
        if s.contains(&h) {
            return true;
        }
        if s.len() >= cap {
            return false;
        }
        s.insert(h);
        true
    }

    /// Note every key, or none: the first key that would pass `cap` is returned and nothing is
    /// noted (a refused SUBSCRIBE never reaches rumqttd, so its other filters must not use up
    /// the budget).
    fn note_all<'k>(
        &self,
        set: &Mutex<HashSet<u64>>,
        keys: impl Iterator<Item = &'k [u8]>,
        cap: usize,
    ) -> Option<&'k [u8]> {
        let keys: Vec<&'k [u8]> = keys.collect();
        let Ok(mut s) = set.lock() else {
            return keys.first().copied();
        };
        let mut new = Vec::new();
        for k in keys {
            let h = self.hasher.hash_one(k);
            if !s.contains(&h) && !new.contains(&h) {
                if s.len() + new.len() >= cap {
                    return Some(k);
                }
                new.push(h);
            }
        }
        s.extend(new);
        None
    }

    /// Forget a client id's turn once its gap has passed and no session holds or waits for it
    /// (the entry keeps the end time for the gap).
    fn release_turn(self: &Arc<Guard>, client_id: String, turn: Option<Arc<Turn>>) {
        let Some(turn) = turn else { return };
        let guard = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TURN_GAP).await;
            let mut turns = guard.turns.lock().unwrap_or_else(|e| e.into_inner());
            // Only the map's reference and ours left: nobody holds or waits for it.
            if Arc::strong_count(&turn) == 2
                && turns.get(&client_id).is_some_and(|t| Arc::ptr_eq(t, &turn))
            {
                turns.remove(&client_id);
            }
        });
    }

    /// End the session rumqttd stores for `client_id` (a clean connect discards it). The caller
    /// holds the client id's turn.
    async fn end_session(
        &self,
        target: SocketAddr,
        v5: bool,
        client_id: &str,
    ) -> Result<(), String> {
        let who = format!("ending the session of {client_id:?}");
        visit(
            target,
            v5,
            self,
            client_id.to_string(),
            INTERNAL_CONNACK,
            &who,
        )
        .await
    }

    /// End `client_id`'s session `after` its connection (generation `gen` of its turn) ended,
    /// unless a newer connection took it up meanwhile (MQTT 5 Session Expiry Interval).
    fn expire_later(
        self: &Arc<Guard>,
        targets: watch::Receiver<SocketAddr>,
        v5: bool,
        client_id: String,
        turn: Arc<Turn>,
        gen: u64,
        after: Duration,
    ) {
        if after > MAX_EXPIRY {
            return;
        }
        let guard = self.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            if *turn.generation.borrow() != gen {
                return;
            }
            let mut taken = turn.lock.clone().lock_owned().await;
            // A connection that came meanwhile bumped the generation before waiting its turn.
            if *turn.generation.borrow() != gen {
                return;
            }
            if let Some(ended) = *taken {
                let since = ended.elapsed();
                if since < TURN_GAP {
                    tokio::time::sleep(TURN_GAP - since).await;
                }
            }
            let target = *targets.borrow();
            if let Err(e) = guard.end_session(target, v5, &client_id).await {
                tracing::warn!(client = %client_id, error = %e, "an expired MQTT 5 session could not be ended at rumqttd: it is kept until the client id connects with clean start 1");
            }
            *taken = Some(Instant::now());
            drop(taken);
            guard.release_turn(client_id, Some(turn));
        });
    }

    /// Distinct topics and filters noted so far (for tests and metrics).
    pub fn topics_noted(&self) -> usize {
        self.topics.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn client_ids_noted(&self) -> usize {
        self.client_ids.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn reject(&self, reason: Refusal, peer: SocketAddr, detail: &dyn std::fmt::Display) {
        self.metrics.broker_reject(reason.label(), &peer, detail);
    }

    /// A DISCONNECT was written to rumqttd on `conn`: read (and discard) until rumqttd closes
    /// it, since closing first would make it end a session twice (module docs). Counted and
    /// logged when rumqttd has not closed it within [`DISCONNECT_SETTLE`].
    async fn await_close_after_disconnect<R: AsyncRead + Unpin>(
        &self,
        conn: &mut R,
        who: &(dyn std::fmt::Display + Sync),
    ) {
        let mut scratch = [0u8; 256];
        let closed = tokio::time::timeout(DISCONNECT_SETTLE, async {
            while let Ok(n) = conn.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        if closed.is_err() {
            self.metrics.broker_disconnect_unsettled.inc();
            tracing::warn!(client = %who, "rumqttd did not close a session within {DISCONNECT_SETTLE:?} of its DISCONNECT; closed it");
        }
    }

    /// Check a topic name or filter (length, distinct-topic budget).
    fn check_topic(&self, topic: &[u8]) -> Result<(), Refused> {
        if topic.len() > self.policy.max_topic_length {
            return Err(Refused(
                Refusal::TopicTooLong,
                format!(
                    "topic of {} bytes (broker.max_topic_length {})",
                    topic.len(),
                    self.policy.max_topic_length
                ),
            ));
        }
        if !self.note(&self.topics, topic, self.policy.max_topics) {
            return Err(Refused(
                Refusal::TopicLimit,
                format!(
                    "new topic {:?} beyond broker.max_topics {}",
                    String::from_utf8_lossy(topic),
                    self.policy.max_topics
                ),
            ));
        }
        Ok(())
    }
}

/// Accept loop of one public listener. Never blocks on a client: each connection (TLS
/// handshake, CONNECT, relay) runs in its own task.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    v5: bool,
    target: watch::Receiver<SocketAddr>,
    guard: Arc<Guard>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "broker accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let admitted = match guard.admit(peer.ip()) {
            Ok(a) => a,
            Err(Refused(reason, detail)) => {
                guard.reject(reason, peer, &detail);
                if tls.is_none() {
                    tokio::spawn(async move {
                        let mut s = stream;
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            s.write_all(&reason.connack(v5)),
                        )
                        .await;
                    });
                }
                continue;
            }
        };
        let guard = guard.clone();
        let tls = tls.clone();
        let targets = target.clone();
        let mut closing = guard.closing.subscribe();
        tokio::spawn(async move {
            let _admitted = admitted;
            let work = async move {
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            guard.policy.connect_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => session(s, peer, v5, targets, guard).await,
                            Ok(Err(e)) => guard.reject(Refusal::TlsHandshake, peer, &e),
                            Err(_) => guard.reject(
                                Refusal::TlsHandshakeTimeout,
                                peer,
                                &"no TLS handshake within broker.connection_timeout",
                            ),
                        }
                    }
                    None => session(stream, peer, v5, targets, guard).await,
                }
            };
            // Stopping: the session is dropped wherever it is. A packet cut off in the middle
            // of its write to rumqttd is incomplete there and never PUBACKed; the sensor sends
            // it again after it reconnects.
            tokio::select! {
                _ = work => {}
                _ = closing.wait_for(|c| *c) => {}
            }
        });
    }
}

/// One client: CONNECT checked, handed to rumqttd with the internal credential, then relayed.
async fn session<S: Io>(
    mut client: S,
    peer: SocketAddr,
    v5: bool,
    targets: watch::Receiver<SocketAddr>,
    guard: Arc<Guard>,
) {
    let target = *targets.borrow();
    let p = &guard.policy;
    let mut buf = BytesMut::with_capacity(1024);
    let first = tokio::time::timeout(
        p.connect_timeout,
        read_frame_of(
            &mut client,
            &mut buf,
            p.max_packet,
            Some(PacketType::Connect),
        ),
    )
    .await;
    let mut frame = match first {
        Err(_) => {
            return guard.reject(
                Refusal::ConnectTimeout,
                peer,
                &"no complete CONNECT within broker.connection_timeout",
            )
        }
        Ok(Ok(None)) | Ok(Err(FrameError::Io)) => return,
        Ok(Err(FrameError::Unexpected(t))) => {
            return guard.reject(
                Refusal::NotConnect,
                peer,
                &format_args!("packet type {t} before CONNECT"),
            )
        }
        Ok(Err(FrameError::Malformed)) => {
            return guard.reject(
                Refusal::Malformed,
                peer,
                &"bad remaining length before CONNECT",
            )
        }
        Ok(Err(FrameError::Oversize(n))) => {
            return guard.reject(
                Refusal::Oversize,
                peer,
                &format_args!("first packet of {n} bytes (broker.max_payload_size)"),
            )
        }
        Ok(Ok(Some(f))) => f,
    };
    if PacketType::of(frame[0]) != Some(PacketType::Connect) {
        return guard.reject(
            Refusal::NotConnect,
            peer,
            &format_args!("packet type {} before CONNECT", frame[0] >> 4),
        );
    }
    // Protocol name and level, and the connect flags, which rumqttd's decoder does not check.
    let header_len = parse_header(&frame).ok().flatten().map_or(2, |h| h.1);
    let body = frame.get(header_len..).unwrap_or_default();
    let name_len = body
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let (name, level, flags) = (
        body.get(2..2 + name_len).unwrap_or_default(),
        body.get(2 + name_len).copied(),
        body.get(3 + name_len).copied(),
    );
    if name == b"MQIsdp" || (name == b"MQTT" && level != Some(if v5 { 5 } else { 4 })) {
        let reply = refuse(
            &mut client,
            v5,
            &guard,
            Refusal::ProtocolVersion,
            peer,
            &format_args!(
                "protocol {:?} level {level:?}: this listener speaks MQTT {}",
                String::from_utf8_lossy(name),
                if v5 { "5" } else { "3.1.1" }
            ),
        );
        return reply.await;
    }
    if flags.is_some_and(|f| f & 1 == 1) {
        // MQTT 3.1.1 3.1.2.3 / 5 3.1.2.3: the server must close the connection.
        return guard.reject(
            Refusal::Protocol,
            peer,
            &"CONNECT with the reserved flag set",
        );
    }
    let Some(Packet::Connect(mut connect, props, mut will, will_props, login)) =
        decode(v5, &mut frame, p.max_packet)
    else {
        return guard.reject(Refusal::Malformed, peer, &"CONNECT could not be decoded");
    };
    let mut assigned_id = None;
    // MQTT 5 Session Expiry Interval (0: the session ends with the connection).
    let expiry = match (&props, v5) {
        (Some(p), true) => p.session_expiry_interval.unwrap_or(0),
        _ => 0,
    };
    {
        if let Err(Refused(reason, detail)) =
            check_client_id(&connect.client_id, p.max_client_id_length).or_else(|e| {
                if e.0 == Refusal::ReservedClientId && !p.reserve_own_prefix {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        {
            let reply = refuse(&mut client, v5, &guard, reason, peer, &detail);
            return reply.await;
        }
        if props
            .as_ref()
            .is_some_and(|p| p.receive_maximum == Some(0) || p.max_packet_size == Some(0))
        {
            // MQTT 5 §3.1.2.11.3/4: a protocol error.
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::Protocol,
                peer,
                &"CONNECT with Receive Maximum or Maximum Packet Size 0",
            );
            return reply.await;
        }
        if let Some(w) = &will {
            if let Err(Refused(reason, detail)) =
                check_topic_name(&w.topic).and_then(|()| guard.check_topic(&w.topic))
            {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    reason,
                    peer,
                    &format_args!("will: {detail}"),
                );
                return reply.await;
            }
        }
        match (&login, &p.passwords) {
            (None, _) if !p.allow_anonymous => {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    Refusal::Anonymous,
                    peer,
                    &format_args!(
                        "client {:?} without credentials (broker.allow_anonymous = false)",
                        connect.client_id
                    ),
                );
                return reply.await;
            }
            (Some(l), Some(passwords)) => {
                let ok = match tokio::time::timeout(p.connect_timeout, guard.auth_slots.acquire())
                    .await
                {
                    Ok(Ok(_permit)) => {
                        let (pw, user, pass) =
                            (passwords.clone(), l.username.clone(), l.password.clone());
                        tokio::task::spawn_blocking(move || pw.verify(&user, pass.as_bytes()))
                            .await
                            .unwrap_or(false)
                    }
                    _ => false,
                };
                if !ok {
                    let reply = refuse(
                        &mut client,
                        v5,
                        &guard,
                        Refusal::Auth,
                        peer,
                        &format_args!("bad user name or password for user {:?}", l.username),
                    );
                    return reply.await;
                }
            }
            (Some(_), None) if !p.allow_anonymous => {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    Refusal::Auth,
                    peer,
                    &"credentials given but no broker.password_file",
                );
                return reply.await;
            }
            _ => {}
        }
        // MQTT 5 lets a client with an empty id have a session (clean start 0, or an expiry);
        // rumqttd refuses clean start 0 (0x85) and discards a clean session at the end, so the
        // guard assigns the id (returned in the CONNACK). Otherwise rumqttd assigns one.
        if v5 && connect.client_id.is_empty() && (!connect.clean_session || expiry > 0) {
            connect.client_id = format!("auto-{}", uuid::Uuid::new_v4().simple());
            assigned_id = Some(connect.client_id.clone());
        }
        // Empty client ids get a fresh id (and session state) from rumqttd each time.
        let key = if connect.client_id.is_empty() {
            uuid::Uuid::new_v4().as_bytes().to_vec()
        } else {
            connect.client_id.as_bytes().to_vec()
        };
        if !guard.note(&guard.client_ids, &key, p.max_client_ids) {
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::ClientIdLimit,
                peer,
                &format_args!(
                    "new client id beyond broker.max_client_ids {}",
                    p.max_client_ids
                ),
            );
            return reply.await;
        }
    }
    // ACLs: user names count only when verified against the password file.
    let verified_user = login
        .as_ref()
        .filter(|_| p.passwords.is_some())
        .map(|l| l.username.as_str());
    let perms = p
        .acl
        .as_ref()
        .map(|acl| acl.for_client(verified_user, &connect.client_id));
    if let (Some(perms), Some(w)) = (&perms, &will) {
        let topic = String::from_utf8_lossy(&w.topic);
        if !perms.may_publish(&topic) {
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::AclPublish,
                peer,
                &format_args!("will topic {topic:?} not allowed by broker.acl"),
            );
            return reply.await;
        }
    }
    let client_id = connect.client_id.clone();
    let owner = if client_id.is_empty() {
        topic_hash(uuid::Uuid::new_v4().as_bytes())
    } else {
        topic_hash(client_id.as_bytes())
    };
    let mut retained_will = None;
    let mut will_reading = None;
    if let Some(w) = will.as_mut() {
        if reserved_topic(&w.topic) && !reserved_allowed(perms.as_ref(), &w.topic) {
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::ReservedTopic,
                peer,
                &format_args!(
                    "will topic {:?}: reserved for the gateway (edgegate/) or the broker ($)",
                    String::from_utf8_lossy(&w.topic)
                ),
            );
            return reply.await;
        }
        // A retained will is stored when it fires: charged now, released by a clean DISCONNECT.
        if w.retain && !w.message.is_empty() {
            let hash = topic_hash(&w.topic);
            let bytes = w.topic.len() + w.message.len();
            if guard.keep_retained(hash, owner, bytes, peer, &w.topic) {
                retained_will = Some((hash, bytes));
            } else {
                w.retain = false;
            }
        }
        will_reading = Some((w.topic.clone(), w.message.clone()));
    }
    let mut conn = Conn {
        owner,
        aliases: HashMap::new(),
        subscriptions: HashSet::new(),
        retained_will,
        will: will_reading,
        will_cancelled: false,
        perms,
        expiry: None,
        connect_expiry: expiry,
        ended: false,
    };
    // Until rumqttd has the session (its CONNACK), a refusal takes the will's charge back.
    let mut will_charge = WillCharge {
        guard: guard.clone(),
        charge: conn
            .retained_will
            .map(|(topic, bytes)| (topic, conn.owner, bytes)),
    };
    // One session per client id at rumqttd (empty ids get a fresh id from rumqttd).
    let turn = (!client_id.is_empty()).then(|| {
        let mut turns = guard.turns.lock().unwrap_or_else(|e| e.into_inner());
        turns
            .entry(client_id.clone())
            .or_insert_with(|| {
                Arc::new(Turn {
                    lock: Arc::new(tokio::sync::Mutex::new(None)),
                    generation: watch::channel(0).0,
                })
            })
            .clone()
    });
    let mut my_turn = None;
    if let Some(t) = &turn {
        let mut gen = 0;
        t.generation.send_modify(|g| {
            *g += 1;
            gen = *g;
        });
        let taken = match tokio::time::timeout(INTERNAL_CONNACK, t.lock.clone().lock_owned()).await
        {
            Ok(l) => l,
            Err(_) => {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    Refusal::TakeoverTimeout,
                    peer,
                    &format_args!("previous session of {client_id:?} did not end"),
                );
                return reply.await;
            }
        };
        if let Some(ended) = *taken {
            let since = ended.elapsed();
            if since < TURN_GAP {
                tokio::time::sleep(TURN_GAP - since).await;
            }
        }
        my_turn = Some((taken, t.generation.subscribe(), gen));
    }
    let login = Some(Login {
        username: login.map(|l| l.username).unwrap_or_default(),
        password: guard.secret.clone(),
    });
    // MQTT 5 sessions on rumqttd's 3.1.1 ones (module docs): rumqttd keeps a session exactly
    // when it was made with clean session 0, so it gets 0 whenever the MQTT 5 session is to be
    // resumed or kept, and the guard ends it where MQTT 5 says: before the connect (clean start
    // 1 with an expiry), at the end of the connection (expiry 0), after the expiry (a timer).
    if v5 && !(connect.clean_session && expiry == 0) {
        if connect.clean_session && assigned_id.is_none() {
            if let Err(e) = guard.end_session(target, v5, &client_id).await {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    Refusal::SessionReset,
                    peer,
                    &format_args!("the stored session of {client_id:?} could not be ended: {e}"),
                );
                return reply.await;
            }
            tokio::time::sleep(TURN_GAP).await;
        }
        connect.clean_session = false;
        conn.expiry = Some(expiry);
    }
    let internal_keep_alive = guard.internal_keep_alive.load(Ordering::Relaxed);
    let flow = Flow::new(connect.keep_alive, props.as_ref(), internal_keep_alive);
    connect.keep_alive = internal_keep_alive;
    let Some(out) = encode(v5, Packet::Connect(connect, props, will, will_props, login)) else {
        return guard.reject(Refusal::Malformed, peer, &"CONNECT could not be re-encoded");
    };
    let mut internal =
        match tokio::time::timeout(INTERNAL_CONNACK, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => {
                let reply = refuse(
                    &mut client,
                    v5,
                    &guard,
                    Refusal::BrokerUnavailable,
                    peer,
                    &format_args!("internal listener {target} not reachable"),
                );
                return reply.await;
            }
        };
    let _ = internal.set_nodelay(true);
    let mut ibuf = BytesMut::with_capacity(256);
    // Wait for rumqttd's CONNACK before anything else can happen on this connection: a client
    // that vanishes right after CONNECT must not make rumqttd fail half-way (see module docs).
    let connack_frame = async {
        internal.write_all(&out).await.map_err(|_| FrameError::Io)?;
        read_frame(&mut internal, &mut ibuf, 1 << 16).await
    };
    let buf_down = match tokio::time::timeout(INTERNAL_CONNACK, connack_frame).await {
        Ok(Ok(Some(f))) if PacketType::of(f[0]) == Some(PacketType::Connack) => {
            // rumqttd holds the will now: it fires (and is stored) unless a clean DISCONNECT.
            will_charge.charge = None;
            let f = match &assigned_id {
                Some(id) => match connack_assigning(&f, id) {
                    Some(c) => BytesMut::from(&c[..]),
                    None => f,
                },
                None => f,
            };
            if client.write_all(&f).await.is_err() {
                return;
            }
            // What rumqttd sent behind its CONNACK goes through the relay's checks.
            ibuf
        }
        _ => {
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::BrokerRefused,
                peer,
                &format_args!("rumqttd did not accept client {client_id:?}"),
            );
            return reply.await;
        }
    };
    match my_turn {
        Some((mut taken, mut generation, gen)) => {
            let taken_over = tokio::select! {
                // The relay first: what the client sent before the newer connection (its
                // DISCONNECT, ending the session) is read before the takeover ends the relay.
                biased;
                _ = relay(client, buf, internal, buf_down, peer, v5, &guard, &mut conn, &flow) => false,
                // A newer session with this client id: the takeover.
                _ = async {
                    loop {
                        if *generation.borrow_and_update() != gen {
                            return;
                        }
                        if generation.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                } => true,
            };
            // An MQTT 5 session the guard keeps the lifetime of (after a takeover of a live
            // connection it is the new connection's).
            let taken_over = taken_over && !conn.ended;
            let mut expires = None;
            match conn.expiry {
                Some(0) if !taken_over => {
                    tokio::time::sleep(TURN_GAP).await;
                    if let Err(e) = guard.end_session(target, v5, &client_id).await {
                        tracing::warn!(client = %client_id, error = %e, "an MQTT 5 session with expiry 0 could not be ended at rumqttd: it is kept until the client id connects with clean start 1");
                    }
                }
                Some(secs) if !taken_over && secs != u32::MAX => {
                    expires = Some(Duration::from_secs(secs as u64));
                }
                _ => {}
            }
            *taken = Some(Instant::now());
            drop(taken);
            if let (Some(after), Some(t)) = (expires, &turn) {
                guard.expire_later(targets, v5, client_id.clone(), t.clone(), gen, after);
            }
            guard.release_turn(client_id, turn);
        }
        None => {
            relay(
                client, buf, internal, buf_down, peer, v5, &guard, &mut conn, &flow,
            )
            .await
        }
    }
    // After a takeover the relay was dropped before it could count the will.
    guard.will_fires(&mut conn).await;
}

/// A retained will charged to the retained book at CONNECT, taken back when the session is
/// refused before rumqttd has it (the will then never fires: its charge would shrink the
/// budget for good).
struct WillCharge {
    guard: Arc<Guard>,
    /// (topic hash, owner, bytes); `None` once rumqttd holds the will.
    charge: Option<(u64, u64, usize)>,
}

impl Drop for WillCharge {
    fn drop(&mut self) {
        if let Some((topic, owner, bytes)) = self.charge.take() {
            self.guard
                .retained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_if(topic, owner, bytes);
        }
    }
}

/// Count and log a refusal, then tell the client (CONNACK with the refusal's code) and let the
/// connection close.
fn refuse<'a, S: Io>(
    client: &'a mut S,
    v5: bool,
    guard: &Guard,
    reason: Refusal,
    peer: SocketAddr,
    detail: &dyn std::fmt::Display,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    guard.reject(reason, peer, detail);
    let bytes = reason.connack(v5);
    async move {
        let _ = client.write_all(&bytes).await;
    }
}

/// What the guard knows of one connection's session.
struct Conn {
    /// Whose retained messages these are (hash of the client id; of a fresh id for an empty one).
    owner: u64,
    /// MQTT 5 topic aliases set on this connection: the topic each stands for.
    aliases: HashMap<u16, bytes::Bytes>,
    /// Filters subscribed on this connection (for `broker.max_subscriptions_per_client`).
    subscriptions: HashSet<Vec<u8>>,
    /// A retained will charged to the retained book at CONNECT: (topic hash, bytes).
    retained_will: Option<(u64, usize)>,
    /// The will's topic and payload, published by rumqttd (and handed to the pipeline) unless
    /// the client leaves cleanly.
    will: Option<(bytes::Bytes, bytes::Bytes)>,
    /// A clean DISCONNECT (without MQTT 5's "with will" reason) was passed on.
    will_cancelled: bool,
    perms: Option<Perms>,
    /// MQTT 5 Session Expiry Interval of a session the guard ends itself (rumqttd keeps it
    /// otherwise); `None`: rumqttd discards the session at the end (clean), or MQTT 3.1.1.
    /// A DISCONNECT may change it.
    expiry: Option<u32>,
    /// The Session Expiry Interval of the CONNECT (a DISCONNECT must not raise 0).
    connect_expiry: u32,
    /// The connection has ended (the relay is only finishing).
    ended: bool,
}

/// rumqttd 0.20's largest topic alias (`TOPIC_ALIAS_MAX`, advertised in its CONNACK).
const TOPIC_ALIAS_MAX: u16 = 4096;

/// Is `filter` a valid MQTT topic filter? (`#` only as the last whole level, `+` only as a
/// whole level, UTF-8 without NUL, not empty.)
fn valid_filter(filter: &[u8]) -> bool {
    let Ok(f) = std::str::from_utf8(filter) else {
        return false;
    };
    !f.is_empty() && !f.contains('\0') && crate::rules::topic::validate_filter(f).is_ok()
}

impl Guard {
    /// Account a retained publish of `bytes` on `topic` by `owner`: false (counted, logged) when
    /// over a bound, and the retain flag must be cleared.
    fn keep_retained(
        &self,
        topic: u64,
        owner: u64,
        bytes: usize,
        peer: SocketAddr,
        shown: &[u8],
    ) -> bool {
        let stored = self
            .retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store(&self.policy.retained, topic, owner, bytes);
        match stored {
            Ok(()) => true,
            Err(why) => {
                self.reject(
                    Refusal::RetainedLimit,
                    peer,
                    &format_args!(
                        "retained message on {:?} ({bytes} bytes) beyond {why}: passed on without retain",
                        String::from_utf8_lossy(shown)
                    ),
                );
                false
            }
        }
    }

    /// The session ends without a clean DISCONNECT: rumqttd publishes the will to local
    /// subscribers, and it goes to the pipeline as a reading (once; nobody waits for it).
    async fn will_fires(&self, conn: &mut Conn) {
        if conn.will_cancelled {
            return;
        }
        let (Some((topic, payload)), Some(handoff)) = (conn.will.take(), self.handoff()) else {
            return;
        };
        let will = Publish {
            topic: &topic,
            payload: &payload,
            traceparent: None,
        };
        let _ = handoff.offer(will, None, &self.metrics).await;
    }

    /// Retained messages held (messages, bytes), as the guard accounts them.
    pub fn retained_held(&self) -> (usize, usize) {
        self.retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .totals()
    }
}

/// rumqttd 0.20's outgoing window: unacknowledged QoS 1/2 publishes it sends one connection
/// at most (`MAX_INFLIGHT` in `router/iobufs.rs`).
const RUMQTTD_OUTGOING_WINDOW: usize = 100;

/// Bytes of publishes the guard holds for one client (Receive Maximum) before it stops reading
/// from rumqttd for it (rumqttd then waits on that connection alone; it keeps the messages in its
/// log anyway). Without it, a client that never completes a delivery could make the guard hold
/// rumqttd's whole window of 100 messages of up to `broker.max_payload_size` each.
const HELD_BYTES: usize = 256 * 1024;

/// What the guard does on one connection for the client, between it and rumqttd:
/// - keep alive: the client's own is enforced by the guard (rumqttd is given
///   [`Guard::internal_keep_alive`] instead, so that keep alive 0, which rumqttd refuses, can be
///   accepted), and the guard pings rumqttd when it has written nothing to it for `ping_after`;
///   the PINGRESPs answering those pings are kept from the client;
/// - MQTT 5 Maximum Packet Size: a PUBLISH larger than the client allows is withheld (counted
///   in `subscriber_max_packet_size`) and acknowledged to rumqttd on the client's behalf (QoS 1:
///   PUBACK; QoS 2: PUBREC, then PUBCOMP for rumqttd's PUBREL), as if delivered (§3.1.2.11.4);
/// - MQTT 5 Receive Maximum: QoS 1/2 PUBLISHes beyond the client's quota wait here, in order,
///   until it completes earlier ones (§4.9).
///
/// rumqttd takes acknowledgements only in the order it sent the publishes (one out of order
/// closes the connection: `register_ack`/`register_pubcomp` in its `router/iobufs.rs`), so the
/// guard keeps rumqttd's two queues of unfinished deliveries, `acks` (PUBACK/PUBREC due) and
/// `comps` (PUBCOMP due), and sends its own acknowledgement only when every earlier one has been
/// sent. Invariants: a packet the client gets is a whole packet rumqttd sent, unchanged and in
/// rumqttd's order (QoS 0 may pass held ones, as MQTT allows); what is held or queued is
/// bounded by rumqttd's outgoing window (100 unacknowledged publishes per connection); `state`
/// is never locked across an await.
struct Flow {
    /// The client's keep alive (seconds; 0: off).
    keep_alive: u16,
    ping_after: Duration,
    /// PINGREQs the guard sent rumqttd whose PINGRESP has not come back yet.
    own_pings: AtomicU32,
    /// The client's Maximum Packet Size (`usize::MAX` when it declared none).
    max_packet: usize,
    /// The client's Receive Maximum, when below rumqttd's window (else that window is the
    /// tighter bound and nothing is held).
    receive_max: Option<usize>,
    state: Mutex<FlowState>,
    /// The client completed a publish while others were held.
    released: tokio::sync::Notify,
}

/// Who answers a delivery rumqttd is waiting on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Owner {
    /// Sent to the client, which answers it.
    Client,
    /// Held back by the client's Receive Maximum; the client answers it once sent.
    Held,
    /// Withheld (too large for the client): the guard answers it.
    Guard,
}

#[derive(Default)]
struct FlowState {
    /// QoS 1/2 publishes rumqttd sent, whose PUBACK (QoS 1) / PUBREC (QoS 2) is due, in its
    /// order: (packet id, QoS, who answers).
    acks: std::collections::VecDeque<(u16, u8, Owner)>,
    /// QoS 2 deliveries whose PUBCOMP is due, in rumqttd's order: (packet id, who answers, its
    /// PUBREL has come).
    comps: std::collections::VecDeque<(u16, Owner, bool)>,
    /// Publishes held back by the client's Receive Maximum (the `Held` entries, same order).
    held: std::collections::VecDeque<BytesMut>,
    /// Their bytes.
    held_bytes: usize,
    /// Deliveries sent to the client and not completed (its Receive Maximum quota).
    in_flight: usize,
}

impl FlowState {
    /// Send the guard's acknowledgements that are next in rumqttd's order.
    fn settle(&mut self, ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>) {
        let send = |byte1: u8, id: u16| {
            let [hi, lo] = id.to_be_bytes();
            // The relay towards rumqttd is gone only when the connection ends.
            let _ = ctl.send([byte1, 0x02, hi, lo]);
        };
        loop {
            if let Some(&(id, qos, Owner::Guard)) = self.acks.front() {
                self.acks.pop_front();
                if qos == 1 {
                    send(PacketType::Puback.byte1(), id);
                } else {
                    send(PacketType::Pubrec.byte1(), id);
                    self.comps.push_back((id, Owner::Guard, false));
                }
                continue;
            }
            if let Some(&(id, Owner::Guard, true)) = self.comps.front() {
                self.comps.pop_front();
                send(PacketType::Pubcomp.byte1(), id);
                continue;
            }
            return;
        }
    }
}

impl Flow {
    fn new(
        keep_alive: u16,
        props: Option<&rumqttd::protocol::ConnectProperties>,
        internal_keep_alive: u16,
    ) -> Flow {
        Flow {
            keep_alive,
            ping_after: Duration::from_secs(internal_keep_alive.max(1) as u64) / 2,
            own_pings: AtomicU32::new(0),
            max_packet: props
                .and_then(|p| p.max_packet_size)
                .map_or(usize::MAX, |m| m as usize),
            receive_max: props
                .and_then(|p| p.receive_maximum)
                .map(usize::from)
                .filter(|&m| m < RUMQTTD_OUTGOING_WINDOW),
            state: Mutex::new(FlowState::default()),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Does the guard follow this connection's deliveries?
    fn tracks(&self) -> bool {
        self.max_packet != usize::MAX || self.receive_max.is_some()
    }

    fn holds(&self) -> bool {
        self.receive_max.is_some()
    }

    /// Holding [`HELD_BYTES`] or more: read nothing more from rumqttd until the client
    /// completes a delivery.
    fn full(&self) -> bool {
        self.holds() && self.state().held_bytes >= HELD_BYTES
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whole packets from rumqttd on their way to the client: those the client gets.
    fn to_client(
        &self,
        chunk: BytesMut,
        ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>,
        guard: &Guard,
        peer: SocketAddr,
    ) -> BytesMut {
        if self.own_pings.load(Ordering::SeqCst) == 0 && !self.tracks() {
            return chunk;
        }
        let mut st = self.state();
        let mut out = BytesMut::with_capacity(chunk.len());
        let mut at = 0;
        while at < chunk.len() {
            let rest = &chunk[at..];
            let Ok(Some((byte1, hl, rl))) = parse_header(rest) else {
                out.extend_from_slice(rest);
                break;
            };
            let f = &rest[..(hl + rl).min(rest.len())];
            at += f.len();
            match PacketType::of(byte1) {
                Some(PacketType::Pingresp) => {
                    let own = self
                        .own_pings
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if own {
                        continue;
                    }
                }
                Some(PacketType::Publish) if self.tracks() => {
                    let qos = (byte1 >> 1) & 3;
                    let pkid = (qos > 0).then(|| publish_pkid(f, hl)).flatten();
                    let too_large = f.len() > self.max_packet;
                    if too_large {
                        guard.metrics.drop_events(
                            DropReason::SubscriberMaxPacket,
                            1,
                            &format_args!(
                                "a {} byte QoS {qos} message for {peer}, whose MQTT 5 Maximum Packet Size is {}",
                                f.len(),
                                self.max_packet
                            ),
                        );
                    }
                    let Some(id) = pkid else {
                        if too_large {
                            continue;
                        }
                        out.extend_from_slice(f);
                        continue;
                    };
                    let owner = if too_large {
                        Owner::Guard
                    } else if self
                        .receive_max
                        .is_some_and(|max| st.in_flight >= max || !st.held.is_empty())
                    {
                        Owner::Held
                    } else {
                        Owner::Client
                    };
                    st.acks.push_back((id, qos, owner));
                    match owner {
                        Owner::Guard => st.settle(ctl),
                        Owner::Held => {
                            st.held_bytes += f.len();
                            st.held.push_back(BytesMut::from(f));
                        }
                        Owner::Client => {
                            st.in_flight += 1;
                            out.extend_from_slice(f);
                        }
                    }
                    continue;
                }
                Some(PacketType::Pubrel) if self.tracks() => {
                    let id = f.get(hl..hl + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                    let mine = id.and_then(|id| st.comps.iter().position(|c| c.0 == id));
                    match mine.map(|i| (i, st.comps[i].1)) {
                        Some((i, Owner::Guard)) => {
                            st.comps[i].2 = true;
                            st.settle(ctl);
                            continue;
                        }
                        Some(_) => {}
                        None => {
                            // A QoS 2 delivery from an earlier connection of the session: the
                            // client owes its PUBCOMP, and it counts until then.
                            if let Some(id) = id {
                                st.comps.push_back((id, Owner::Client, true));
                                st.in_flight += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
            out.extend_from_slice(f);
        }
        out
    }

    /// Held publishes the client's quota now admits, in order.
    fn release(&self) -> BytesMut {
        let mut out = BytesMut::new();
        let Some(max) = self.receive_max else {
            return out;
        };
        let mut st = self.state();
        while st.in_flight < max {
            let Some(f) = st.held.pop_front() else { break };
            st.held_bytes -= f.len();
            if let Some(e) = st.acks.iter_mut().find(|e| e.2 == Owner::Held) {
                e.2 = Owner::Client;
            }
            st.in_flight += 1;
            out.extend_from_slice(&f);
        }
        out
    }

    /// The client sent PUBACK (4), PUBREC (5) or PUBCOMP (7) with this `body` (after the fixed
    /// header), which the relay passes on: the guard's own acknowledgements next in line follow
    /// it (through `ctl`, written after it), and a completed delivery frees a place of the
    /// client's Receive Maximum.
    fn client_acked(
        &self,
        kind: PacketType,
        body: &[u8],
        ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>,
    ) {
        if !self.tracks() {
            return;
        }
        let Some(id) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return;
        };
        let mut st = self.state();
        let before = st.in_flight;
        if kind == PacketType::Pubcomp {
            if let Some(i) = st
                .comps
                .iter()
                .position(|c| c.0 == id && c.1 == Owner::Client)
            {
                st.comps.remove(i);
                st.in_flight = st.in_flight.saturating_sub(1);
            }
        } else if let Some(i) = st
            .acks
            .iter()
            .position(|a| a.0 == id && a.2 == Owner::Client)
        {
            let qos = st.acks[i].1;
            st.acks.remove(i);
            if kind == PacketType::Pubrec && qos == 2 {
                // rumqttd answers any PUBREC with a PUBREL and waits for the PUBCOMP.
                st.comps.push_back((id, Owner::Client, false));
            } else {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
        }
        st.settle(ctl);
        let freed = st.in_flight < before && !st.held.is_empty();
        drop(st);
        if freed {
            self.released.notify_one();
        }
    }
}

/// The guard's side of the internal connection to rumqttd, for one client.
struct ToBroker<'a> {
    w: tokio::net::tcp::OwnedWriteHalf,
    /// Checked packets not yet written: passed on together while more are already buffered.
    out: BytesMut,
    /// Acknowledgements the guard sends on the client's behalf (see [`Flow`]).
    ctl: tokio::sync::mpsc::UnboundedReceiver<[u8; 4]>,
    last_write: tokio::time::Instant,
    ping_after: Duration,
    /// Fires at the earliest when a ping may be due; re-armed only when it fires (one timer
    /// operation per `ping_after`, not one per packet).
    ping: std::pin::Pin<Box<tokio::time::Sleep>>,
    own_pings: &'a AtomicU32,
}

impl ToBroker<'_> {
    /// Write what `out` holds (if anything) and empty it.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.w.write_all(&self.out).await?;
            self.out.clear();
            self.last_write = tokio::time::Instant::now();
        }
        Ok(())
    }

    /// Run `work` (a read from the client, a pause) while writing what the guard sends rumqttd
    /// itself: acknowledgements (after the client's packets before them, for rumqttd's order)
    /// and, after `ping_after` without any write, a PINGREQ (rumqttd closes a connection silent
    /// for 1.5 x its keep alive).
    async fn wait<F: std::future::Future>(&mut self, work: F) -> std::io::Result<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                Some(ack) = self.ctl.recv() => {
                    self.out.extend_from_slice(&ack);
                    self.flush().await?;
                }
                _ = &mut self.ping => {
                    if tokio::time::Instant::now() >= self.last_write + self.ping_after {
                        self.own_pings.fetch_add(1, Ordering::SeqCst);
                        self.out.extend_from_slice(&PINGREQ);
                        self.flush().await?;
                    }
                    let next = self.last_write + self.ping_after;
                    self.ping.as_mut().reset(next);
                }
                r = &mut work => return Ok(r),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay<S: Io>(
    client: S,
    mut buf: BytesMut,
    internal: TcpStream,
    mut ibuf: BytesMut,
    peer: SocketAddr,
    v5: bool,
    guard: &Guard,
    conn: &mut Conn,
    flow: &Flow,
) {
    let (mut cr, mut cw) = tokio::io::split(client);
    // Packets the guard answers itself (SUBACK for a refused SUBSCRIBE; the MQTT 5 DISCONNECT
    // of a refusal, after which the connection ends: `true`), written between the broker's
    // packets.
    let (inject_tx, mut inject_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, bool)>(8);
    // Packets the guard sends rumqttd on the client's behalf (acknowledgements of publishes it
    // withheld from the client). Unbounded, so that the relay towards the client never waits
    // on the relay towards rumqttd (which may be waiting on rumqttd, which may be waiting for
    // us to read): bounded by rumqttd's outgoing window of 100 unacknowledged publishes.
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel::<[u8; 4]>();
    let (mut ir, iw) = internal.into_split();
    let mut to_broker = ToBroker {
        w: iw,
        out: BytesMut::new(),
        ctl: ctl_rx,
        last_write: tokio::time::Instant::now(),
        ping_after: flow.ping_after,
        ping: Box::pin(tokio::time::sleep(flow.ping_after)),
        own_pings: &flow.own_pings,
    };
    let p = &guard.policy;
    let rate = p.max_publish_rate as f64;
    // Readings go to the pipeline and are acknowledged from here (see `handoff`); without a
    // pipeline rumqttd acknowledges what it gets.
    let handoff = guard.handoff();
    let owed = handoff.as_ref().map(|_| Owed::default());
    // The client's keep alive, enforced here (rumqttd sees the guard's own): one and a half
    // times it without a packet from the client ends the connection (MQTT 3.1.2.10).
    let silence =
        (flow.keep_alive > 0).then(|| Duration::from_millis(1500 * flow.keep_alive as u64));
    // Ends when either side closes; true when the client's DISCONNECT was passed on.
    let up = async {
        let iw = &mut to_broker;
        let mut disconnect = false;
        let mut tokens = rate;
        let mut last = Instant::now();
        let mut heard = tokio::time::Instant::now();
        let mut quiet = Box::pin(tokio::time::sleep(silence.unwrap_or_default()));
        let refused: Option<Refusal> = 'frames: loop {
            let buffered = complete_frames(&buf, p.max_packet, 1) > 0;
            if (iw.out.len() >= COALESCE || !buffered) && iw.flush().await.is_err() {
                return false;
            }
            let refuse = |reason: Refusal, detail: &dyn std::fmt::Display| {
                guard.reject(reason, peer, detail);
                Some(reason)
            };
            let read = if buffered {
                // A whole packet is buffered already (a burst): no waiting, so no timers;
                // the guard's own acknowledgements go behind what is checked so far.
                while let Ok(ack) = iw.ctl.try_recv() {
                    iw.out.extend_from_slice(&ack);
                }
                Some(read_frame(&mut cr, &mut buf, p.max_packet).await)
            } else {
                let read = async {
                    loop {
                        tokio::select! {
                            r = read_frame(&mut cr, &mut buf, p.max_packet) => return Some(r),
                            _ = &mut quiet, if silence.is_some() => {
                                // Re-armed only when it fires (not one timer per packet).
                                let due = heard + silence.unwrap_or_default();
                                if tokio::time::Instant::now() >= due {
                                    return None;
                                }
                                quiet.as_mut().reset(due);
                            }
                        }
                    }
                };
                let Ok(read) = iw.wait(read).await else {
                    return false;
                };
                read
            };
            let Some(read) = read else {
                let ka = flow.keep_alive;
                break 'frames refuse(
                    Refusal::KeepAliveTimeout,
                    &format_args!("no packet within 1.5 x the client's keep alive of {ka} s"),
                );
            };
            heard = tokio::time::Instant::now();
            let mut frame = match read {
                Ok(Some(f)) => f,
                Ok(None) | Err(FrameError::Io) | Err(FrameError::Unexpected(_)) => {
                    break 'frames None
                }
                Err(FrameError::Malformed) => {
                    break 'frames refuse(Refusal::Malformed, &"bad remaining length")
                }
                Err(FrameError::Oversize(n)) => {
                    break 'frames refuse(
                        Refusal::Oversize,
                        &format_args!(
                            "packet of {n} bytes (broker.max_payload_size {})",
                            p.max_packet
                        ),
                    )
                }
            };
            let Some(kind) = PacketType::of(frame[0]).filter(|k| k.from_client()) else {
                let kind = frame[0] >> 4;
                break 'frames refuse(
                    Refusal::Protocol,
                    &format_args!("packet type {kind} is not one a client may send"),
                );
            };
            let header_len = parse_header(&frame)
                .ok()
                .flatten()
                .map(|h| h.1)
                .unwrap_or(2);
            if kind == PacketType::Publish {
                let Some(meta) = publish_meta(&frame, header_len, v5) else {
                    break 'frames refuse(Refusal::Malformed, &"PUBLISH could not be parsed");
                };
                // The topic this publish goes to: its own, or the one its MQTT 5 alias stands for.
                let topic: &[u8] = if meta.topic.is_empty() && v5 {
                    let Some(alias) = meta.alias.and_then(|a| conn.aliases.get(&a)) else {
                        break 'frames refuse(
                            Refusal::TopicInvalid,
                            &"PUBLISH without a topic name or a known topic alias",
                        );
                    };
                    if conn.perms.is_some() {
                        break 'frames refuse(
                            Refusal::AclPublish,
                            &"MQTT 5 topic alias without a topic: not supported with broker.acl",
                        );
                    }
                    &alias[..]
                } else {
                    if let Err(Refused(reason, detail)) = check_topic_name(meta.topic) {
                        break 'frames refuse(reason, &detail);
                    }
                    if let Err(Refused(reason, detail)) = guard.check_topic(meta.topic) {
                        break 'frames refuse(reason, &detail);
                    }
                    if reserved_topic(meta.topic)
                        && !reserved_allowed(conn.perms.as_ref(), meta.topic)
                    {
                        break 'frames refuse(
                            Refusal::ReservedTopic,
                            &format_args!(
                                "publish to {:?}: reserved for the gateway (edgegate/) or the broker ($); no broker.acl pattern names it",
                                String::from_utf8_lossy(meta.topic)
                            ),
                        );
                    }
                    if let Some(perms) = &conn.perms {
                        let t = String::from_utf8_lossy(meta.topic);
                        if !perms.may_publish(&t) {
                            // Closing is MQTT's way to refuse a publish (3.1.1 has no negative
                            // PUBACK): the sensor gets no PUBACK, nothing is lost silently.
                            break 'frames refuse(
                                Refusal::AclPublish,
                                &format_args!("publish to {t:?} not allowed by broker.acl"),
                            );
                        }
                    }
                    if let Some(a) = meta.alias {
                        if a == 0 || a > TOPIC_ALIAS_MAX {
                            break 'frames refuse(
                                Refusal::TopicAlias,
                                &format_args!("topic alias {a} outside 1..={TOPIC_ALIAS_MAX}"),
                            );
                        }
                        conn.aliases
                            .insert(a, bytes::Bytes::copy_from_slice(meta.topic));
                    }
                    meta.topic
                };
                let bytes = topic.len() + meta.payload_len;
                let mut keep_retain = meta.retain;
                if meta.payload_len == 0 {
                    // rumqttd drops a topic's retained message on any empty publish to it.
                    guard
                        .retained
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear(topic_hash(topic));
                } else if meta.retain
                    && !guard.keep_retained(topic_hash(topic), conn.owner, bytes, peer, topic)
                {
                    keep_retain = false;
                }
                if rate > 0.0 {
                    let now = Instant::now();
                    tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
                    last = now;
                    if tokens < 1.0 {
                        guard.metrics.broker_throttled.inc();
                        if iw.flush().await.is_err() {
                            return false;
                        }
                        let wait = (1.0 - tokens) / rate;
                        let pause = tokio::time::sleep(Duration::from_secs_f64(wait));
                        if iw.wait(pause).await.is_err() {
                            return false;
                        }
                        tokens = 1.0;
                        last = Instant::now();
                        // Not reading was the guard's doing, not the client's silence.
                        heard = tokio::time::Instant::now();
                    }
                    tokens -= 1.0;
                }
                let (qos, pkid) = (meta.qos, meta.pkid.unwrap_or(0));
                let payload_at = frame.len() - meta.payload_len;
                if let (Some(handoff), Some(owed), false) =
                    (&handoff, &owed, topic.first() == Some(&b'$'))
                {
                    // A reading: into the pipeline; rumqttd gets it as QoS 0 (local
                    // subscribers, retained), and the guard acknowledges it once it is safe.
                    if qos == 2 && !owed.qos2_new(pkid) {
                        // A retransmission before PUBREL: not a new reading, not relayed
                        // again; PUBREC (again) behind what is owed.
                        owed.owe(pkid, true, owed.acks.issued());
                        continue;
                    }
                    if qos > 0 && owed.len() >= OWED_MAX {
                        // The client does not take its acknowledgements: wait until it did.
                        guard.metrics.broker_paused.inc();
                        if iw.flush().await.is_err() {
                            return false;
                        }
                        while owed.len() >= OWED_MAX {
                            if iw.wait(owed.room.notified()).await.is_err() {
                                return false;
                            }
                        }
                        heard = tokio::time::Instant::now();
                    }
                    let reading = Publish {
                        topic,
                        payload: &frame[payload_at..],
                        traceparent: meta.traceparent,
                    };
                    let acks = (qos > 0).then_some(owed);
                    if handoff.tx.is_full() && iw.flush().await.is_err() {
                        return false;
                    }
                    match iw.wait(handoff.offer(reading, acks, &guard.metrics)).await {
                        Err(_) => return false,
                        // Stopping: no acknowledgement; the sensor sends it again.
                        Ok(Handed::Closed) => break 'frames None,
                        Ok(_) if qos > 0 => owed.owe(pkid, qos == 2, owed.acks.issued()),
                        Ok(_) => {}
                    }
                    // rumqttd only fans out to local subscribers (and keeps retained messages):
                    // before anyone subscribed, the relay would be work for nothing.
                    if keep_retain || guard.subscribed.load(Ordering::SeqCst) {
                        qos0_frame(
                            &frame,
                            header_len,
                            meta.topic.len(),
                            keep_retain,
                            &mut iw.out,
                        );
                    }
                    continue;
                }
                if !keep_retain {
                    frame[0] &= !1;
                }
            } else if kind == PacketType::Subscribe {
                if frame[0] & 0x0f != 0x02 {
                    break 'frames refuse(
                        Refusal::Protocol,
                        &"SUBSCRIBE with reserved header flags",
                    );
                }
                let Some(filters) = subscribe_filters(&frame, header_len, v5) else {
                    break 'frames refuse(Refusal::Malformed, &"SUBSCRIBE could not be parsed");
                };
                if filters.is_empty() {
                    break 'frames refuse(Refusal::Protocol, &"SUBSCRIBE without a filter");
                }
                // Reserved option bits (3.1.1: all but the QoS; 5: the top two), QoS 3 and
                // retain handling 3 are malformed: close.
                if let Some((f, o)) = filters.iter().find(|(_, o)| {
                    let reserved = if v5 { 0xc0 } else { 0xfc };
                    o & reserved != 0 || o & 3 == 3 || (v5 && (o >> 4) & 3 == 3)
                }) {
                    break 'frames refuse(
                        Refusal::Protocol,
                        &format_args!(
                            "SUBSCRIBE to {:?} with reserved option bits {o:#04x}",
                            String::from_utf8_lossy(f)
                        ),
                    );
                }
                for (f, _) in &filters {
                    if let Err(Refused(reason, detail)) = guard.check_topic(f) {
                        break 'frames refuse(reason, &detail);
                    }
                }
                // A SUBSCRIBE with a filter that cannot be granted is refused whole, with a
                // failure code for every filter; it never reaches rumqttd.
                let refusal = if let Some((f, _)) = filters.iter().find(|(f, _)| !valid_filter(f)) {
                    Some((
                        Refusal::FilterInvalid,
                        format!("invalid topic filter {:?}", String::from_utf8_lossy(f)),
                    ))
                } else if let Some((f, _)) = conn.perms.as_ref().and_then(|perms| {
                    filters
                        .iter()
                        .find(|(f, _)| !perms.may_subscribe(&String::from_utf8_lossy(f)))
                }) {
                    Some((
                        Refusal::AclSubscribe,
                        format!(
                            "subscription to {:?} not allowed by broker.acl",
                            String::from_utf8_lossy(f)
                        ),
                    ))
                } else if conn.subscriptions.len()
                    + filters
                        .iter()
                        .filter(|(f, _)| !conn.subscriptions.contains(*f))
                        .count()
                    > p.max_subscriptions_per_client
                {
                    Some((
                        Refusal::SubscriptionLimit,
                        format!(
                            "more than broker.max_subscriptions_per_client {} filters",
                            p.max_subscriptions_per_client
                        ),
                    ))
                } else {
                    // Last: only a SUBSCRIBE that goes through notes its filters.
                    guard
                        .note_all(
                            &guard.filters,
                            filters.iter().map(|(f, _)| *f),
                            p.max_filters,
                        )
                        .map(|f| {
                            (
                                Refusal::FilterLimit,
                                format!(
                                    "new filter {:?} beyond broker.max_filters {}",
                                    String::from_utf8_lossy(f),
                                    p.max_filters
                                ),
                            )
                        })
                };
                if let Some((reason, detail)) = refusal {
                    guard.reject(reason, peer, &detail);
                    let code = reason.suback_code(v5);
                    let suback = suback_refusal(&frame, header_len, v5, code, filters.len());
                    if inject_tx.send((suback, false)).await.is_err() {
                        break 'frames None;
                    }
                    continue;
                }
                for (f, _) in &filters {
                    conn.subscriptions.insert(f.to_vec());
                }
                // Before the SUBSCRIBE goes on: publishes read this flag after it.
                guard.subscribed.store(true, Ordering::SeqCst);
            } else if kind == PacketType::Pubrel {
                // PUBREL of a QoS 2 reading the guard acknowledged itself: PUBCOMP from here
                // (rumqttd never saw it as QoS 2).
                let pkid = frame
                    .get(header_len..header_len + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]));
                if let (Some(owed), Some(pkid)) = (&owed, pkid) {
                    if owed.qos2_release(pkid) {
                        let [hi, lo] = pkid.to_be_bytes();
                        if inject_tx
                            .send((vec![PacketType::Pubcomp.byte1(), 2, hi, lo], false))
                            .await
                            .is_err()
                        {
                            break 'frames None;
                        }
                        continue;
                    }
                }
            } else if matches!(
                kind,
                PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp
            ) {
                // The client's PUBACK / PUBREC / PUBCOMP: its Receive Maximum quota.
                flow.client_acked(kind, &frame[header_len..], &ctl_tx);
            } else if kind == PacketType::Unsubscribe {
                if let Some(filters) = unsubscribe_filters(&frame, header_len, v5) {
                    for f in filters {
                        conn.subscriptions.remove(f);
                    }
                }
            } else if kind == PacketType::Disconnect {
                if v5 {
                    match disconnect_expiry(&frame[header_len..]) {
                        None => {
                            break 'frames refuse(
                                Refusal::Malformed,
                                &"DISCONNECT could not be parsed",
                            )
                        }
                        Some(Some(e)) if e != 0 && conn.connect_expiry == 0 => {
                            // MQTT 5 §3.14.2.2.2: a protocol error; the will fires.
                            break 'frames refuse(
                                Refusal::Protocol,
                                &"DISCONNECT with a Session Expiry Interval after CONNECT had 0",
                            );
                        }
                        Some(Some(e)) => {
                            if let Some(x) = conn.expiry.as_mut() {
                                *x = e;
                            }
                        }
                        Some(None) => {}
                    }
                }
                // The client's last packet: nothing after it is read. A will does not fire
                // after it (unless an MQTT 5 client asks for it, reason 0x04).
                let with_will = v5 && frame.get(header_len) == Some(&0x04);
                conn.will_cancelled = !with_will;
                if let (Some((topic, bytes)), false) = (conn.retained_will, with_will) {
                    guard
                        .retained
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .release_if(topic, conn.owner, bytes);
                }
                iw.out.extend_from_slice(&frame);
                disconnect = true;
                break 'frames None;
            }
            iw.out.extend_from_slice(&frame);
        };
        // What passed the checks before the connection ended (or before a refused packet)
        // still goes on, as it would have one packet at a time.
        let flushed = iw.flush().await.is_ok();
        if let (Some(reason), true) = (refused, v5) {
            // MQTT 5 says why: a DISCONNECT with the reason, after which the relay ends.
            let d = frame_of(PacketType::Disconnect.byte1(), &[reason.disconnect_code()]);
            if inject_tx.send((d, true)).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        flushed && disconnect
    };
    let down = async {
        // Framed, so that injected packets go between the broker's packets, never inside one.
        ibuf.reserve(8192);
        loop {
            let (out, last) = tokio::select! {
                f = read_frame(&mut ir, &mut ibuf, 1 << 28), if !flow.full() => match f {
                    Ok(Some(mut f)) => {
                        // And every whole packet behind it, in one write.
                        let more = complete_frames(&ibuf, 1 << 28, COALESCE);
                        if more > 0 {
                            f.extend_from_slice(&ibuf.split_to(more));
                        }
                        (flow.to_client(f, &ctl_tx, guard, peer), false)
                    }
                    _ => return,
                },
                // The client acknowledged publishes: some held back may go now.
                _ = flow.released.notified(), if flow.holds() => (flow.release(), false),
                // Readings were committed: their acknowledgements are due.
                _ = async { owed.as_ref()?.acks.changed().await; Some(()) }, if owed.is_some() => {
                    (owed.as_ref().map(Owed::due).unwrap_or_default(), false)
                }
                Some((b, last)) = inject_rx.recv() => (BytesMut::from(&b[..]), last),
            };
            if (!out.is_empty() && cw.write_all(&out).await.is_err()) || last {
                return;
            }
        }
    };
    let disconnected = tokio::select! {
        d = up => d,
        _ = down => false,
    };
    // From here on a newer connection with the client id is no takeover of this one.
    conn.ended = true;
    if disconnected {
        guard.await_close_after_disconnect(&mut ir, &peer).await;
    }
    // The will fires (rumqttd publishes it when the internal connection closes): the reading.
    guard.will_fires(conn).await;
    let _ = to_broker.w.shutdown().await;
    let _ = cw.shutdown().await;
}

/// Liveness probe: a real CONNECT/CONNACK (and DISCONNECT) against rumqttd's internal listener
/// at `addr`, as the gateway's probe client. It does not go through the public listener, so a
/// flood of connections that fills `broker.max_connections` cannot make it fail.
pub async fn probe(
    addr: SocketAddr,
    v5: bool,
    guard: &Guard,
    timeout: Duration,
) -> Result<(), String> {
    let id = format!(
        "{}-{}",
        guard.probe_id,
        guard.probes.fetch_add(1, Ordering::Relaxed)
    );
    visit(addr, v5, guard, id, timeout, &"the liveness probe").await
}

/// A clean CONNECT/CONNACK and DISCONNECT as `client_id` on rumqttd's internal listener at
/// `addr` (the probe; ending a stored session: a clean connect discards it).
async fn visit(
    addr: SocketAddr,
    v5: bool,
    guard: &Guard,
    client_id: String,
    timeout: Duration,
    who: &(dyn std::fmt::Display + Sync),
) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connect = rumqttd::protocol::Connect {
            keep_alive: 10,
            client_id,
            clean_session: true,
        };
        let login = Some(Login {
            username: String::new(),
            password: guard.secret.clone(),
        });
        let out = encode(v5, Packet::Connect(connect, None, None, None, login))
            .ok_or("could not encode CONNECT")?;
        s.write_all(&out)
            .await
            .map_err(|e| format!("send CONNECT: {e}"))?;
        let mut buf = BytesMut::new();
        let f = read_frame(&mut s, &mut buf, 1 << 16)
            .await
            .map_err(|e| format!("reading CONNACK: {e:?}"))?
            .ok_or("connection closed without CONNACK")?;
        if PacketType::of(f[0]) != Some(PacketType::Connack) || f.get(3).copied() != Some(0) {
            return Err(format!("refused: {:02x?}", &f[..f.len().min(5)]));
        }
        Ok(s)
    };
    let mut s = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no CONNACK within {timeout:?}")),
    };
    // Answered. Leave as a client should, and as the guard does (module docs).
    if s.write_all(&[0xe0, 0x00]).await.is_ok() {
        guard.await_close_after_disconnect(&mut s, who).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anonymous_guard() -> Arc<Guard> {
        Guard::new(
            Policy {
                allow_anonymous: true,
                passwords: None,
                max_connections: 10,
                connect_timeout: Duration::from_secs(5),
                max_packet: 1 << 16,
                max_client_id_length: 64,
                max_topic_length: 256,
                max_topics: 100,
                max_client_ids: 100,
                max_publish_rate: 0,
                acl: None,
                retained: RetainedLimits {
                    messages: 10,
                    bytes: 1 << 16,
                    per_client: 10,
                    bytes_per_client: 1 << 16,
                },
                max_connections_per_address: 10,
                max_subscriptions_per_client: 10,
                max_filters: 100,
                reserve_own_prefix: true,
            },
            Metrics::new(),
        )
    }

    /// rumqttd's side of the race (module docs) is timing inside its connection task, so it is
    /// played here by a plain socket standing in for the internal listener: after a client's
    /// DISCONNECT, the guard must leave the internal connection open until that side closes it,
    /// however quickly the client itself goes.
    #[tokio::test]
    async fn after_disconnect_the_broker_closes_first() {
        let guard = anonymous_guard();
        let internal = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_target_tx, target) = watch::channel(internal.local_addr().unwrap());
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let public_addr = public.local_addr().unwrap();
        tokio::spawn(accept_loop(public, None, false, target, guard.clone()));

        let mut client = TcpStream::connect(public_addr).await.unwrap();
        let connect = encode(
            false,
            Packet::Connect(
                rumqttd::protocol::Connect {
                    keep_alive: 30,
                    client_id: "leaver".into(),
                    clean_session: true,
                },
                None,
                None,
                None,
                None,
            ),
        )
        .unwrap();
        client.write_all(&connect).await.unwrap();
        let (mut broker, _) = internal.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let f = read_frame(&mut broker, &mut buf, 1 << 16)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f[0] >> 4, 1, "CONNECT relayed");
        broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

        // The client leaves the way most do: DISCONNECT and close, in one go.
        client.write_all(&[0xe0, 0x00]).await.unwrap();
        drop(client);
        let f = read_frame(&mut broker, &mut buf, 1 << 16)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&f[..], &[0xe0, 0x00], "DISCONNECT relayed");
        let mut rest = [0u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(300), broker.read(&mut rest)).await;
        assert!(
            early.is_err(),
            "the guard closed the internal connection before the broker did: {early:?}"
        );
        // The broker ends the session and closes: the guard lets go at once.
        let ended = Instant::now();
        drop(broker);
        while guard.open_connections() > 0 {
            assert!(
                ended.elapsed() < Duration::from_secs(1),
                "session still open"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn topic_names_and_filters() {
        assert!(check_topic_name(b"sensors/a/t").is_ok());
        for (bad, reason) in [
            (&b"sensors/+"[..], "topic_wildcard"),
            (b"#", "topic_wildcard"),
            (b"a/b#", "topic_wildcard"),
            (b"", "topic_invalid"),
            (b"a\0b", "topic_invalid"),
            (b"a/\xc3", "topic_invalid"),
        ] {
            assert_eq!(
                check_topic_name(bad).unwrap_err().0.label(),
                reason,
                "{bad:?}"
            );
        }
        assert!(reserved_topic(b"edgegate/x") && reserved_topic(b"$SYS/x"));
        assert!(!reserved_topic(b"edgegatex/y"));
        for good in [&b"a/+/b"[..], b"#", b"+", b"a/#", b"$share/g/a/+"] {
            assert!(valid_filter(good), "{good:?}");
        }
        for bad in [&b"a/#/b"[..], b"a+/b", b"a/b#", b"", b"a\0", b"\xff"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn client_ids() {
        assert!(check_client_id("boiler-1", 128).is_ok());
        assert!(check_client_id("", 128).is_ok());
        for bad in ["a/b", "a+b", "a#", "$sys", "x\u{0}y"] {
            assert_eq!(
                check_client_id(bad, 128).unwrap_err().0.label(),
                "client_id",
                "{bad}"
            );
        }
        assert_eq!(
            check_client_id("edgegate-rules-0", 128)
                .unwrap_err()
                .0
                .label(),
            "reserved_client_id"
        );
        assert!(
            check_client_id("edgegate-plant-7", 128).is_ok(),
            "a downstream edgegate's upstream id"
        );
        assert!(check_client_id(&"x".repeat(129), 128).is_err());
    }

    #[test]
    fn a_refused_sessions_retained_will_gives_its_charge_back() {
        let g = anonymous_guard();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(g.keep_retained(7, 1, 100, peer, b"w/t"));
        assert_eq!(g.retained_held(), (1, 100));
        // Refused before rumqttd had the session: the charge goes back.
        drop(WillCharge {
            guard: g.clone(),
            charge: Some((7, 1, 100)),
        });
        assert_eq!(g.retained_held(), (0, 0));
        // Accepted (disarmed): the charge stays until the will fires or a clean DISCONNECT.
        assert!(g.keep_retained(7, 1, 100, peer, b"w/t"));
        drop(WillCharge {
            guard: g.clone(),
            charge: None,
        });
        assert_eq!(g.retained_held(), (1, 100));
    }

    #[test]
    fn a_refused_subscribe_uses_none_of_the_filter_budget() {
        let g = anonymous_guard();
        let set = Mutex::new(HashSet::new());
        let keys = |v: &[&'static str]| v.iter().map(|k| k.as_bytes()).collect::<Vec<_>>();
        assert_eq!(g.note_all(&set, keys(&["x"]).into_iter(), 3), None);
        // Three new filters where two are left: refused whole, nothing noted.
        assert_eq!(
            g.note_all(&set, keys(&["a", "b", "c"]).into_iter(), 3),
            Some(&b"c"[..])
        );
        assert_eq!(set.lock().unwrap().len(), 1);
        // Known filters and repeats cost nothing; the two left are still there.
        assert_eq!(
            g.note_all(&set, keys(&["x", "y", "y", "z"]).into_iter(), 3),
            None
        );
        assert_eq!(set.lock().unwrap().len(), 3);
        assert_eq!(
            g.note_all(&set, keys(&["w"]).into_iter(), 3),
            Some(&b"w"[..])
        );
    }
}
