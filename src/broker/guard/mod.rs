//! The broker guard: the only sockets sensors reach. It accepts connections itself, checks them,
//! and passes what it lets through to rumqttd's router over an in-process link per connection
//! ([`crate::broker::link`]): rumqttd has no listener at all.
//!
//! Why (rumqttd 0.20, read in its source):
//! - rumqttd's network layer had hazards of its own (a refused CONNECT that poisons a listener's
//!   will-handler mutex, the TLS handshake inline in its accept loop, `unreachable!()` on packets
//!   a client must never send, a session ended twice after a DISCONNECT, per-connection buffers
//!   that never shrink): it is not used. The guard terminates TLS itself, in the connection's
//!   own task, with `broker.connection_timeout`, and frames every packet from a client (closing
//!   the connection on a type a client must never send);
//! - client ids starting with `edgegate-` are the gateway's own (in-process links): refused;
//! - rumqttd keeps state per client id and per topic/filter forever: the guard caps the number
//!   of distinct ones (`broker.max_client_ids`, `broker.max_topics`) and their lengths;
//! - rumqttd's router keeps MQTT 5 sessions by the 3.1.1 rules (ignoring the Session Expiry
//!   Interval), ignores the client's Maximum Packet Size and Receive Maximum, and closes a link
//!   on an acknowledgement out of order: the guard supplies each (see `Flow` and `session`),
//!   so that what a client sees is MQTT 3.1.1/5 and what rumqttd sees is what it can take;
//!   keep alive and wills are the guard's entirely (the router has neither: they lived in
//!   rumqttd's network layer); a will fires when a connection ends without a clean DISCONNECT
//!   and is published by the guard ([`crate::broker::link::Router::publish`]);
//! - rumqttd delivers at the subscription's QoS whatever the publish QoS, cannot route `$`
//!   topics at all and ignores No Local: every message the guard (or the gateway) puts into
//!   rumqttd carries a [`crate::core::stamp`] (publish QoS, publishing client), `$` topics and
//!   filters go in under a prefix, and the guard makes each forwarded message what MQTT says the
//!   client gets (`delivery`).
//!
//! Everything refused is counted in `edgegate_broker_rejected_total{reason}` and logged
//! (rate-limited). Nothing a client sent is dropped silently: a refused publish closes the
//! connection before rumqttd sees it, so the sensor has no PUBACK for it.
//!
//! Files: this one holds the [`Policy`], the shared [`Guard`] state and the accept loop;
//! `connect.rs` a client's CONNECT, `relay.rs` the two pumps of an admitted connection,
//! `flow.rs` what the guard enforces towards the client (keep alive, MQTT 5 flow control),
//! `delivery.rs` which forwarded messages a client gets and how (QoS, `$` topics, No Local),
//! `limits.rs` the budgets and name checks. The framing is [`crate::broker::frame`], the
//! reasons for a refusal [`crate::broker::refusal`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::broker::link::Router;

use crate::broker::fanout::Fanout;
use crate::broker::handoff::Handoff;
use crate::broker::refusal::{Refusal, Refused};
use crate::broker::retained::{RetainedBook, RetainedLimits};
use crate::config::acl::Acl;
use crate::config::auth::Passwords;
use crate::core::budget::Budget;
use crate::core::metrics::Metrics;

mod connect;
mod delivery;
mod flow;
mod limits;
mod relay;
#[cfg(test)]
mod tests;

use connect::{session, Turn};

pub use limits::{check_client_id, check_topic_name, reserved_topic};

/// Bytes the guard may add to a publish on its way into rumqttd (its stamp; a `$` topic's
/// prefix): rumqttd's own packet limit is `broker.max_payload_size` plus this, or it would close
/// the relay on the largest publishes a client may send.
pub const RELAY_GROWTH: usize = crate::core::stamp::LEN + delivery::DOLLAR_PREFIX.len();

/// Client ids with this prefix belong to the gateway itself.
pub const RESERVED_PREFIX: &str = "edgegate-";

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
    /// `broker.max_buffered_bytes`: large packets being read from clients and what clients
    /// have not taken yet, all connections together.
    pub buffered: Arc<Budget>,
    /// rumqttd's segment size and count, and `broker.max_fanout_bytes` ([`Fanout`]).
    pub fanout: (usize, usize, usize),
    pub max_client_id_length: usize,
    pub max_topic_length: usize,
    /// MQTT 5 topic aliases per connection (the CONNACK's Topic Alias Maximum).
    pub max_topic_aliases: u16,
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
    /// rumqttd's router: a link per connection, wills, ending stored sessions.
    router: Arc<Router>,
    active: AtomicUsize,
    /// Set when the gateway stops: every session ends at once, relaying nothing more.
    closing: watch::Sender<bool>,
    auth_slots: Semaphore,
    hasher: ahash::RandomState,
    topics: Mutex<HashSet<u64>>,
    client_ids: Mutex<HashSet<u64>>,
    /// Distinct subscription filters relayed to rumqttd.
    filters: Mutex<HashSet<u64>>,
    /// rumqttd's filter logs, mirrored (their memory bound).
    fanout: Fanout,
    /// A client subscribed to something since the start. Until then no one can receive a
    /// publish from rumqttd, and readings are not relayed to it at all (only retained ones).
    subscribed: std::sync::atomic::AtomicBool,
    retained: Mutex<RetainedBook>,
    /// Open connections per source address.
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// One live session per client id at rumqttd (see [`Turn`]).
    turns: Mutex<HashMap<String, Arc<Turn>>>,
    /// The subscriptions of each session rumqttd keeps beyond its connection (clean session
    /// 0), by client id (at most `broker.max_client_ids`): `delivery` needs them on every
    /// connection of the session.
    sessions: Mutex<HashMap<String, delivery::SharedSubscriptions>>,
    /// Client ids lent to clients that connect with an empty one (`connect::AnonIds`).
    anon_ids: Mutex<connect::AnonIds>,
    pub metrics: Arc<Metrics>,
    /// Where readings go (`None`: a broker without a pipeline, like the demo's cloud, where
    /// rumqttd acknowledges publishes itself). Taken away at shutdown.
    handoff: Mutex<Option<Handoff>>,
}

/// Any stream the guard can relay (TCP, TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Accept loop of one public listener. Never blocks on a client: each connection (TLS
/// handshake, CONNECT, relay) runs in its own task.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    v5: bool,
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
                            Ok(Ok(s)) => session(s, peer, v5, guard).await,
                            Ok(Err(e)) => guard.reject(Refusal::TlsHandshake, peer, &e),
                            Err(_) => guard.reject(
                                Refusal::TlsHandshakeTimeout,
                                peer,
                                &"no TLS handshake within broker.connection_timeout",
                            ),
                        }
                    }
                    None => session(stream, peer, v5, guard).await,
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

impl Guard {
    pub fn new(policy: Policy, metrics: Arc<Metrics>, router: Arc<Router>) -> Arc<Guard> {
        let (segment_size, segment_count, fanout_bytes) = policy.fanout;
        Arc::new(Guard {
            policy,
            router,
            active: AtomicUsize::new(0),
            closing: watch::Sender::new(false),
            auth_slots: Semaphore::new(AUTH_SLOTS),
            hasher: ahash::RandomState::new(),
            topics: Mutex::new(HashSet::new()),
            client_ids: Mutex::new(HashSet::new()),
            filters: Mutex::new(HashSet::new()),
            fanout: Fanout::new(segment_size, segment_count, fanout_bytes),
            subscribed: std::sync::atomic::AtomicBool::new(false),
            retained: Mutex::new(RetainedBook::default()),
            per_address: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            anon_ids: Mutex::new(connect::AnonIds::default()),
            metrics,
            handoff: Mutex::new(None),
        })
    }

    /// rumqttd's router, as the guard and the gateway reach it.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
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

    fn reject(&self, reason: Refusal, peer: SocketAddr, detail: &dyn std::fmt::Display) {
        self.metrics.broker_reject(reason.label(), &peer, detail);
    }
}
