//! One client's CONNECT: read within `broker.connection_timeout`, checked (protocol level,
//! flags, client id, will, credentials, budgets, ACL), handed to rumqttd's router over an
//! in-process link (without its will, which the guard publishes itself) once the client id's
//! previous session has ended, and relayed after the router's CONNACK.
//!
//! Invariants:
//! - Nothing reaches rumqttd before every check passed; a refused client gets the CONNACK of
//!   its [`Refusal`] (where MQTT has one) and is counted once.
//! - One session per client id at rumqttd at a time ([`Turn`]), with [`TURN_GAP`] between two.
//! - A retained will charged at CONNECT is given back if the session never reaches rumqttd
//!   ([`WillCharge`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::Packet;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::broker::frame::{
    connack_edited, decode, encode, parse_header, read_frame, read_frame_of, FrameError, PacketType,
};
use crate::broker::handoff::Publish;
use crate::broker::link::LinkFailure;
use crate::broker::refusal::{Refusal, Refused};
use crate::broker::retained::topic_hash;
use crate::config::acl::Perms;
use crate::core::metrics::DropReason;
use crate::core::stamp::Stamp;

use super::delivery::{self, SharedSubscriptions};
use super::flow::Flow;
use super::limits::{check_client_id, check_topic_name, reserved_allowed, reserved_topic};
use super::relay::relay;
use super::{Guard, Io};

/// Longest wait for the router's CONNACK on a new link.
pub(super) const INTERNAL_CONNACK: Duration = Duration::from_secs(5);

/// One session per client id at rumqttd's router at a time: a new CONNECT first ends the
/// running session with that id (the MQTT takeover, done by the guard: its will fires, its
/// MQTT 5 session expiry is decided), waits until it is closed, and leaves [`TURN_GAP`]. The
/// router would end an older link with the id by itself, but silently (it drops the link), with
/// none of that. (Before the links, rumqttd's network layer also lost track of its will
/// handlers when connections with one id overlapped, and poisoned its listener.)
pub(super) struct Turn {
    /// Held for the whole life of a session (and while the guard ends a stored one); the time
    /// the last one ended.
    pub(super) lock: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Bumped by each new session: the running one ends when it sees a newer value.
    pub(super) generation: watch::Sender<u64>,
}

/// How long a connection taken over by a newer one with its client id may still be read (what
/// it sent before the newer one connected, such as its DISCONNECT).
pub(super) const TAKEOVER_GRACE: Duration = Duration::from_millis(100);

/// Pause between the end of a session and the next one with the same client id.
pub(super) const TURN_GAP: Duration = Duration::from_millis(50);

/// Longest MQTT 5 Session Expiry Interval the guard times; a session with a longer one (or
/// 0xFFFFFFFF, "never") is kept as long as rumqttd runs.
pub(super) const MAX_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// One client: CONNECT checked, handed to rumqttd's router over a new link, then relayed.
pub(super) async fn session<S: Io>(mut client: S, peer: SocketAddr, v5: bool, guard: Arc<Guard>) {
    let p = &guard.policy;
    let mut buf = BytesMut::with_capacity(1024);
    let first = tokio::time::timeout(
        p.connect_timeout,
        read_frame_of(
            &mut client,
            &mut buf,
            p.max_packet,
            Some(PacketType::Connect),
            Some(&p.buffered),
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
    let Some(Packet::Connect(mut connect, mut props, mut will, mut will_props, login)) =
        decode(v5, &mut frame, p.max_packet)
    else {
        return guard.reject(Refusal::Malformed, peer, &"CONNECT could not be decoded");
    };
    let mut assigned_id = None;
    // Held until the session has ended (dropped with this function's frame).
    let mut _anon_lease: Option<AnonLease> = None;
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
        // MQTT 5 lets a client with an empty id have a session that outlives the connection
        // (an expiry): the guard assigns it an id of its own (returned in the CONNACK).
        if v5 && connect.client_id.is_empty() && expiry > 0 {
            connect.client_id = format!("auto-{}", uuid::Uuid::new_v4().simple());
            assigned_id = Some(connect.client_id.clone());
        }
        if connect.client_id.is_empty() && !connect.clean_session && !v5 {
            // MQTT 3.1.1 §3.1.3.1: CONNACK 0x02.
            let reply = refuse(
                &mut client,
                v5,
                &guard,
                Refusal::ClientId,
                peer,
                &"empty client id with clean session 0",
            );
            return reply.await;
        }
        // Any other empty client id (its session ends with the connection) gets one the guard
        // lends for the connection's life (`AnonIds`): rumqttd keeps state per client id
        // forever, so a fresh id per connection (rumqttd's own choice) used up
        // broker.max_client_ids. MQTT 5 §3.2.2.3.7: it is the Assigned Client Identifier.
        if connect.client_id.is_empty() {
            let lease = guard.lend_anon_id();
            connect.client_id = lease.id();
            // Nothing can be resumed under an id the client did not have, and the session ends
            // with the connection: a clean one at rumqttd, so that no later borrower of the id
            // could ever find a session left behind.
            connect.clean_session = true;
            if v5 {
                assigned_id = Some(connect.client_id.clone());
            }
            _anon_lease = Some(lease);
        }
        let key = connect.client_id.as_bytes().to_vec();
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
        will_inside: None,
        will_delay: will_props
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0),
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
    // The router checks no credentials (the guard did).
    let login = None;
    // MQTT 5 sessions on rumqttd's 3.1.1 ones (module docs): rumqttd keeps a session exactly
    // when it was made with clean session 0, so it gets 0 whenever the MQTT 5 session is to be
    // resumed or kept, and the guard ends it where MQTT 5 says: before the connect (clean start
    // 1 with an expiry), at the end of the connection (expiry 0), after the expiry (a timer).
    let clean_start = connect.clean_session;
    if v5 && !(connect.clean_session && expiry == 0) {
        if connect.clean_session && assigned_id.is_none() {
            if let Err(e) = guard.end_session(&client_id).await {
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
    let subscriptions =
        guard.session_subscriptions(&client_id, clean_start, !connect.clean_session);
    let flow = Flow::new(
        connect.keep_alive,
        props.as_ref(),
        v5,
        owner.max(1),
        subscriptions,
    );
    // No topic aliases from rumqttd: the guard reads (and may change) the topic of every
    // publish it forwards (`delivery`), which an alias would hide.
    if let Some(p) = props.as_mut() {
        p.topic_alias_max = None;
    }
    // The will is published by the guard when it fires (the router has no wills: they lived in
    // rumqttd's network layer): stamped and (a `$` topic) under the guard's prefix like every
    // other publish. Its properties (and the Will Delay Interval, which the guard honours
    // itself) never go to rumqttd: a publish with properties reaching an MQTT 3.1.1
    // subscriber used to kill its connection (rumqttd failure mode 13). The guard's own copy of
    // the will (the reading) is unchanged.
    if let Some(w) = will.take() {
        let stamp = Stamp {
            qos: w.qos as u8,
            origin: owner.max(1),
        };
        let topic = delivery::inside(&w.topic).map_or_else(|| w.topic.clone(), Into::into);
        conn.will_inside = Some((topic, stamp.prepend(&w.message, w.retain).into(), w.retain));
    }
    if will_props.take().is_some() {
        guard.metrics.broker_properties_dropped.inc();
    }
    let Some(out) = encode(v5, Packet::Connect(connect, props, will, will_props, login)) else {
        return guard.reject(Refusal::Malformed, peer, &"CONNECT could not be re-encoded");
    };
    let mut internal = guard.router.open(v5);
    let mut ibuf = BytesMut::with_capacity(256);
    let connack_frame = async {
        internal.write_all(&out).await.map_err(|_| FrameError::Io)?;
        read_frame(&mut internal, &mut ibuf, 1 << 16).await
    };
    // A link the router builds after this gave up is ended by the link's adapter.
    let answer = tokio::time::timeout(INTERNAL_CONNACK, connack_frame).await;
    let buf_down = match answer {
        Ok(Ok(Some(f))) if PacketType::of(f[0]) == Some(PacketType::Connack) => {
            // The session is at the router: its will fires (and is stored) unless a clean
            // DISCONNECT.
            will_charge.charge = None;
            // MQTT 5: the guard's Topic Alias Maximum (`broker.max_topic_aliases`), and the id
            // it assigned.
            let f = match v5
                .then(|| connack_edited(&f, assigned_id.as_deref(), p.max_topic_aliases))
                .flatten()
            {
                Some(c) => BytesMut::from(&c[..]),
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
    // The turn's generation of this session (a newer connection with the id bumps it).
    let will_generation = turn
        .as_ref()
        .zip(my_turn.as_ref())
        .map(|(t, mine)| (t.generation.subscribe(), mine.2));
    match my_turn {
        Some((mut taken, mut generation, gen)) => {
            let taken_over = {
                let relayed = relay(
                    client, buf, internal, buf_down, peer, v5, &guard, &mut conn, &flow,
                );
                tokio::pin!(relayed);
                let newer = tokio::select! {
                    // The relay first: what the client sent before the newer connection (its
                    // DISCONNECT, ending the session) is read before the takeover ends the relay.
                    biased;
                    _ = &mut relayed => false,
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
                if newer {
                    // The client's last packets may be in its socket without the runtime having
                    // seen them yet (a loaded machine: 1 run in 3 with two busy cores): a
                    // moment for the relay to read a DISCONNECT that came first.
                    let _ = tokio::time::timeout(TAKEOVER_GRACE, &mut relayed).await;
                }
                newer
            };
            // An MQTT 5 session the guard keeps the lifetime of (after a takeover of a live
            // connection it is the new connection's).
            let taken_over = taken_over && !conn.ended;
            let mut expires = None;
            match conn.expiry {
                Some(0) if !taken_over => {
                    tokio::time::sleep(TURN_GAP).await;
                    if let Err(e) = guard.end_session(&client_id).await {
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
                guard.expire_later(client_id.clone(), t.clone(), gen, after);
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
    // The will, unless the client left cleanly (after a takeover too: MQTT says so).
    guard.will_fires(&mut conn, will_generation);
}

/// The client ids the guard lends clients that connect with an empty one whose session ends with
/// the connection (`edgegate-anon-N`, the lowest free N): at most as many as there are such
/// sessions connected or ending at once, so
/// rumqttd's per-client-id state and `broker.max_client_ids` stop growing with each such
/// connection. An id goes back only when its session has ended; the next client to get it
/// passes through the id's turn like any reconnecting client.
#[derive(Default)]
pub(super) struct AnonIds {
    free: std::collections::BTreeSet<u32>,
    next: u32,
}

/// One lent id, given back when dropped.
pub(super) struct AnonLease {
    guard: Arc<Guard>,
    n: u32,
}

impl AnonLease {
    pub(super) fn id(&self) -> String {
        format!("{}{}", super::limits::ANON_PREFIX, self.n)
    }
}

impl Drop for AnonLease {
    fn drop(&mut self) {
        let mut ids = self
            .guard
            .anon_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        ids.free.insert(self.n);
    }
}

impl Guard {
    pub(super) fn lend_anon_id(self: &Arc<Guard>) -> AnonLease {
        let mut ids = self.anon_ids.lock().unwrap_or_else(|e| e.into_inner());
        let n = match ids.free.pop_first() {
            Some(n) => n,
            None => {
                ids.next += 1;
                ids.next - 1
            }
        };
        AnonLease {
            guard: self.clone(),
            n,
        }
    }
}

/// A retained will charged to the retained book at CONNECT, taken back when the session is
/// refused before rumqttd has it (the will then never fires: its charge would shrink the
/// budget for good).
pub(super) struct WillCharge {
    pub(super) guard: Arc<Guard>,
    /// (topic hash, owner, bytes); `None` once rumqttd holds the will.
    pub(super) charge: Option<(u64, u64, usize)>,
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
pub(super) fn refuse<'a, S: Io>(
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
pub(super) struct Conn {
    /// Whose retained messages these are (hash of the client id; of a fresh id for an empty one).
    pub(super) owner: u64,
    /// MQTT 5 topic aliases set on this connection: the topic each stands for.
    pub(super) aliases: HashMap<u16, bytes::Bytes>,
    /// Filters subscribed on this connection (for `broker.max_subscriptions_per_client`).
    pub(super) subscriptions: HashSet<Vec<u8>>,
    /// A retained will charged to the retained book at CONNECT: (topic hash, bytes).
    pub(super) retained_will: Option<(u64, usize)>,
    /// The will's topic and payload, handed to the pipeline unless the client leaves cleanly.
    pub(super) will: Option<(bytes::Bytes, bytes::Bytes)>,
    /// The will as rumqttd gets it (topic inside, stamped payload, retain), published by the
    /// guard unless the client leaves cleanly.
    pub(super) will_inside: Option<(bytes::Bytes, bytes::Bytes, bool)>,
    /// MQTT 5 Will Delay Interval (seconds).
    pub(super) will_delay: u32,
    /// A clean DISCONNECT (without MQTT 5's "with will" reason) was passed on.
    pub(super) will_cancelled: bool,
    pub(super) perms: Option<Perms>,
    /// MQTT 5 Session Expiry Interval of a session the guard ends itself (rumqttd keeps it
    /// otherwise); `None`: rumqttd discards the session at the end (clean), or MQTT 3.1.1.
    /// A DISCONNECT may change it.
    pub(super) expiry: Option<u32>,
    /// The Session Expiry Interval of the CONNECT (a DISCONNECT must not raise 0).
    pub(super) connect_expiry: u32,
    /// The connection has ended (the relay is only finishing).
    pub(super) ended: bool,
}

impl Guard {
    /// The subscriptions of `client_id`'s session as the guard knows them (`delivery`): a
    /// session rumqttd keeps after the connection (`kept`) shares them with its next
    /// connection, unless that one starts clean; any other starts (and ends) with none.
    pub(super) fn session_subscriptions(
        &self,
        client_id: &str,
        clean_start: bool,
        kept: bool,
    ) -> SharedSubscriptions {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if clean_start || !kept {
            sessions.remove(client_id);
        }
        if kept {
            sessions.entry(client_id.to_string()).or_default().clone()
        } else {
            SharedSubscriptions::default()
        }
    }

    /// Forget a client id's turn once its gap has passed and no session holds or waits for it
    /// (the entry keeps the end time for the gap).
    pub(super) fn release_turn(self: &Arc<Guard>, client_id: String, turn: Option<Arc<Turn>>) {
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

    /// End the session rumqttd stores for `client_id` (a clean link replaces it). The caller
    /// holds the client id's turn.
    pub(super) async fn end_session(&self, client_id: &str) -> Result<(), LinkFailure> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id);
        self.router.end_session(client_id).await
    }

    /// End `client_id`'s session `after` its connection (generation `gen` of its turn) ended,
    /// unless a newer connection took it up meanwhile (MQTT 5 Session Expiry Interval).
    pub(super) fn expire_later(
        self: &Arc<Guard>,
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
            if let Err(e) = guard.end_session(&client_id).await {
                tracing::warn!(client = %client_id, error = %e, "an expired MQTT 5 session could not be ended at rumqttd: it is kept until the client id connects with clean start 1");
            }
            *taken = Some(Instant::now());
            drop(taken);
            guard.release_turn(client_id, Some(turn));
        });
    }

    /// The session ends without a clean DISCONNECT (or with MQTT 5's "with will"): the guard
    /// publishes the will to local subscribers (stamped, as rumqttd gets every publish) and
    /// hands it to the pipeline as a reading (once; nobody waits for it). With an MQTT 5 Will
    /// Delay Interval (at most the Session Expiry Interval) both wait that long, and a new
    /// connection with the client id meanwhile (`generation`: its turn's, and this session's)
    /// cancels them; so does the gateway stopping.
    pub(super) fn will_fires(
        self: &Arc<Guard>,
        conn: &mut Conn,
        generation: Option<(watch::Receiver<u64>, u64)>,
    ) {
        if conn.will_cancelled {
            return;
        }
        let (reading, inside) = (conn.will.take(), conn.will_inside.take());
        if reading.is_none() && inside.is_none() {
            return;
        }
        let delay = conn.will_delay.min(conn.expiry.unwrap_or(0));
        let guard = self.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            if delay > 0 {
                let after = Duration::from_secs(delay as u64);
                let reconnected = async {
                    match generation {
                        Some((mut g, gen)) => {
                            let _ = g.wait_for(|now| *now != gen).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(after) => {}
                    // MQTT: a new connection of the session cancels a delayed will.
                    _ = reconnected => return,
                    _ = closing.wait_for(|c| *c) => {
                        if reading.is_some() {
                            guard.metrics.drop_events(
                                DropReason::Shutdown,
                                1,
                                &"a delayed will: the gateway stopped before its delay ran out",
                            );
                        }
                        return;
                    }
                }
            }
            if let Some((topic, payload, retain)) = inside {
                if !guard.router.publish(topic, payload, retain).await {
                    guard.metrics.drop_events(
                        DropReason::LocalPublishFailed,
                        1,
                        &"a will for local subscribers: rumqttd's router did not take it",
                    );
                }
            }
            if let (Some((topic, payload)), Some(handoff)) = (reading, guard.handoff()) {
                let will = Publish {
                    topic: &topic,
                    payload: &payload,
                    traceparent: None,
                };
                let _ = handoff.offer(will, None, &guard.metrics).await;
            }
        });
    }
}
