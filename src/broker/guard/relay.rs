//! The relay of one admitted connection: the pump from the client to rumqttd (every packet
//! framed and checked: type, topic, ACL, budgets, rate, aliases, QoS 2 of readings) and the
//! pump from rumqttd to the client (through [`Flow`], with the guard's own packets written
//! between whole packets).
//!
//! Invariants:
//! - Only whole packets that passed the checks reach rumqttd, unchanged except where the guard
//!   says so (a reading's QoS, a retain flag over the limits); a refused packet ends the
//!   connection before rumqttd sees it (MQTT 5: after a DISCONNECT with the refusal's code),
//!   so the sensor has no PUBACK for it. A refused SUBSCRIBE is answered with a SUBACK instead.
//! - When the relay ends (the client's DISCONNECT, a close, a refusal) it waits until the link's
//!   adapter has ended the link at the router (the stream closes), so that the next session
//!   with the client id finds this one gone (one session per client id at the router).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};

use crate::broker::fanout::Admit;
use crate::broker::frame::{
    complete_frames, disconnect_expiry, frame_of, has_properties, map_filters, parse_header,
    publish_meta, read_frame, read_frame_within, rewrite_publish, suback_refusal,
    subscribe_filters, unsubscribe_filters, Edit, FrameError, PacketType,
};
use crate::broker::handoff::{Handed, Owed, Publish, OWED_MAX};
use crate::broker::link::Internal;
use crate::broker::refusal::{Refusal, Refused};
use crate::broker::retained::topic_hash;
use crate::core::bucket::TokenBucket;
use crate::core::budget::Charge;
use crate::core::metrics::DropReason;
use crate::core::stamp::Stamp;

use super::connect::Conn;
use super::delivery;
use super::flow::Flow;
use super::limits::{check_topic_name, reserved_allowed, reserved_topic, valid_filter};
use super::{Guard, Io};

/// Longest wait, at the end of a relay, for the link to end at the router (module docs).
pub(super) const LINK_END: Duration = Duration::from_secs(2);

/// Bytes a client may leave untaken (on their way to it) without a charge on
/// `broker.max_buffered_bytes` (1,000 connections: 32 MiB).
pub const PENDING_FREE: usize = 32 * 1024;

/// The most one client may leave untaken (or four of the largest packets, if more): a
/// reader on a loaded Pi falls behind by a few hundred KB in a burst; one that never reads
/// reaches this within a second of traffic.
pub const PENDING_MAX: usize = 1 << 20;

/// Packets relayed together in one write at most (bytes): under load a sensor's publishes and
/// the broker's PUBACKs arrive in bursts, and one write per packet was the relay's main cost.
pub(super) const COALESCE: usize = 64 * 1024;

/// The guard's side of the link to rumqttd's router, for one client.
pub(super) struct ToBroker {
    pub(super) w: WriteHalf<Internal>,
    /// Checked packets not yet written: passed on together while more are already buffered.
    pub(super) out: BytesMut,
    /// Acknowledgements the guard sends on the client's behalf (see [`Flow`]).
    pub(super) ctl: tokio::sync::mpsc::UnboundedReceiver<[u8; 4]>,
}

impl ToBroker {
    /// Write what `out` holds (if anything) and empty it.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.w.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 2 * COALESCE {
                // A large publish passed: do not keep its buffer for the connection's life
                // (1,000 idle connections that each sent one would hold max_payload_size each).
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Run `work` (a read from the client, a pause) while writing what the guard sends rumqttd
    /// itself: acknowledgements (after the client's packets before them, for rumqttd's order).
    pub(super) async fn wait<F: std::future::Future>(
        &mut self,
        work: F,
    ) -> std::io::Result<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                Some(ack) = self.ctl.recv() => {
                    self.out.extend_from_slice(&ack);
                    self.flush().await?;
                }
                r = &mut work => return Ok(r),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn relay<S: Io>(
    client: S,
    mut buf: BytesMut,
    internal: Internal,
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
    let (mut ir, iw) = tokio::io::split(internal);
    let mut to_broker = ToBroker {
        w: iw,
        out: BytesMut::new(),
        ctl: ctl_rx,
    };
    let p = &guard.policy;
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
        // `broker.max_publish_rate`, per connection.
        let mut bucket = TokenBucket::new(p.max_publish_rate);
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
                Some(read_frame_within(&mut cr, &mut buf, p.max_packet, &p.buffered).await)
            } else {
                let read = async {
                    loop {
                        tokio::select! {
                            r = read_frame_within(&mut cr, &mut buf, p.max_packet, &p.buffered) => return Some(r),
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
            // `_held`: the packet's share of broker.max_buffered_bytes, kept while it is
            // (a publish waiting for room in the pipeline holds its bytes).
            let (frame, _held) = match read {
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
                                "publish to {:?}: reserved for the gateway (edgegate/) or the broker ($SYS); no broker.acl pattern names it",
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
                        // The CONNACK said `broker.max_topic_aliases` (MQTT 5 §3.3.2.3.4).
                        let max = p.max_topic_aliases;
                        if a == 0 || a > max {
                            break 'frames refuse(
                                Refusal::TopicAlias,
                                &format_args!(
                                    "topic alias {a} outside 1..={max} (broker.max_topic_aliases)"
                                ),
                            );
                        }
                        conn.aliases
                            .insert(a, bytes::Bytes::copy_from_slice(meta.topic));
                    }
                    meta.topic
                };
                let bytes = topic.len() + meta.payload_len;
                let mut keep_retain = meta.retain;
                if meta.payload_len == 0 && meta.retain {
                    // MQTT's way to clear a retained message (and rumqttd's: it clears on an
                    // empty payload, which only such a publish is once stamped).
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
                if let Err(wait) = bucket.try_take() {
                    guard.metrics.broker_throttled.inc();
                    if iw.flush().await.is_err() {
                        return false;
                    }
                    if iw.wait(tokio::time::sleep(wait)).await.is_err() {
                        return false;
                    }
                    bucket.refill();
                    bucket.take();
                    // Not reading was the guard's doing, not the client's silence.
                    heard = tokio::time::Instant::now();
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
                    // Only what some filter matches (the fan-out mirror knows every filter),
                    // or what rumqttd keeps as retained: anything else would be read, parsed
                    // and dropped by rumqttd, and a large one would leave its read buffer that
                    // size for the connection's life.
                    let admit = (keep_retain || guard.subscribed.load(Ordering::SeqCst))
                        .then(|| guard.fanout.admit(topic, meta.payload_len));
                    match admit {
                        Some(Admit::Refused) => guard.reject(
                            Refusal::FanoutLimit,
                            peer,
                            &format_args!(
                                "rumqttd's filter logs hold broker.max_fanout_bytes ({} bytes): publish to {:?} not passed to local subscribers (it goes upstream)",
                                p.fanout.2,
                                String::from_utf8_lossy(topic)
                            ),
                        ),
                        // Unmatched: relayed only to be kept as the retained message.
                        Some(admit @ (Admit::Counted { .. } | Admit::Unmatched))
                            if keep_retain || admit != Admit::Unmatched =>
                        {
                            let drop = guard.drops_properties(v5, Some(admit), keep_retain, &frame, header_len, meta.topic.len());
                            let edit = Edit {
                                qos: 0,
                                retain: keep_retain,
                                // Without its properties an alias is gone: the full topic.
                                topic: drop.then_some(topic),
                                prefix: &Stamp { qos, origin: flow.origin }.prefix(meta.payload_len, keep_retain),
                                skip: 0,
                                drop_properties: drop,
                            };
                            if rewrite_publish(&frame, header_len, v5, &edit, &mut iw.out).is_none() {
                                // The reading itself goes on; only the local subscribers' copy
                                // is missing (a frame that parsed above always rewrites).
                                guard.metrics.drop_events(
                                    DropReason::LocalPublishFailed,
                                    1,
                                    &"a reading's copy for local subscribers could not be rewritten",
                                );
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                // Not a reading (a `$` topic, or a broker without a pipeline): rumqttd gets it
                // at its QoS and acknowledges it; stamped, a `$` topic under the guard's prefix.
                let inside = delivery::inside(topic);
                let admit = (keep_retain || guard.subscribed.load(Ordering::SeqCst)).then(|| {
                    guard
                        .fanout
                        .admit(inside.as_deref().unwrap_or(topic), meta.payload_len)
                });
                if admit == Some(Admit::Refused) {
                    // rumqttd would hold it for local subscribers beyond the budget, and
                    // nothing else keeps it: not taken (no acknowledgement), like any refusal.
                    break 'frames refuse(
                        Refusal::FanoutLimit,
                        &format_args!(
                            "rumqttd's filter logs hold broker.max_fanout_bytes ({} bytes): publish to {:?} refused",
                            p.fanout.2,
                            String::from_utf8_lossy(topic)
                        ),
                    );
                }
                let drop = guard.drops_properties(
                    v5,
                    admit,
                    keep_retain,
                    &frame,
                    header_len,
                    meta.topic.len(),
                );
                let edit = Edit {
                    qos,
                    retain: keep_retain,
                    topic: inside.as_deref().or(drop.then_some(topic)),
                    prefix: &Stamp {
                        qos,
                        origin: flow.origin,
                    }
                    .prefix(meta.payload_len, keep_retain),
                    skip: 0,
                    drop_properties: drop,
                };
                if rewrite_publish(&frame, header_len, v5, &edit, &mut iw.out).is_none() {
                    break 'frames refuse(Refusal::TopicInvalid, &"PUBLISH could not be relayed");
                }
                continue;
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
                {
                    let mut subs = flow.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
                    for (f, o) in &filters {
                        conn.subscriptions.insert(f.to_vec());
                        // MQTT 5 option bit 2: No Local.
                        subs.subscribe(f, v5 && o & 0x04 != 0);
                        let inside = delivery::inside(f);
                        guard.fanout.add_filter(inside.as_deref().unwrap_or(f), !v5);
                    }
                }
                // Before the SUBSCRIBE goes on: publishes read this flag after it.
                guard.subscribed.store(true, Ordering::SeqCst);
                let dollar = filters.iter().any(|(f, _)| delivery::is_dollar(f));
                if dollar && !relay_filters_inside(&frame, header_len, v5, true, &mut iw.out) {
                    break 'frames refuse(Refusal::Malformed, &"SUBSCRIBE could not be relayed");
                } else if dollar {
                    continue;
                }
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
                if let Some(instead) = flow.client_acked(kind, &frame[header_len..], &ctl_tx) {
                    iw.out.extend_from_slice(&instead);
                    continue;
                }
            } else if kind == PacketType::Unsubscribe {
                if let Some(filters) = unsubscribe_filters(&frame, header_len, v5) {
                    let mut subs = flow.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
                    for f in &filters {
                        conn.subscriptions.remove(*f);
                        subs.unsubscribe(f);
                    }
                    drop(subs);
                    let dollar = filters.iter().any(|f| delivery::is_dollar(f));
                    if dollar && !relay_filters_inside(&frame, header_len, v5, false, &mut iw.out) {
                        break 'frames refuse(
                            Refusal::Malformed,
                            &"UNSUBSCRIBE could not be relayed",
                        );
                    } else if dollar {
                        continue;
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
        // What the client has not taken yet. The guard keeps reading from rumqttd while the
        // client is slow, so that nothing piles up in rumqttd's connection buffers (up to 200
        // publishes read ahead plus their encoded copy, per connection: 50 subscribers that
        // never read took 590 MB). Past [`PENDING_FREE`] it is charged to
        // `broker.max_buffered_bytes`; a client whose backlog passes its own cap, or does
        // not fit in the budget, is disconnected.
        let mut pending = BytesMut::new();
        let mut charged: Vec<Charge> = Vec::new();
        let mut charged_bytes = 0usize;
        loop {
            let (out, last) = tokio::select! {
                w = cw.write(&pending), if !pending.is_empty() => {
                    match w {
                        Ok(n) if n > 0 => {
                            let _ = pending.split_to(n);
                            if pending.len() <= PENDING_FREE {
                                charged.clear();
                                charged_bytes = 0;
                            }
                            continue;
                        }
                        _ => return,
                    }
                }
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
            if pending.is_empty() {
                pending = out;
            } else {
                pending.extend_from_slice(&out);
            }
            if last {
                let _ = cw.write_all(&pending).await;
                return;
            }
            // One client may fall behind by [`PENDING_MAX`] or four of the largest packets
            // (beyond what the kernel holds for it), not by the whole budget: others need
            // theirs.
            let cap = PENDING_MAX.max(4 * p.max_packet);
            if pending.len() > cap {
                guard.reject(
                    Refusal::SlowSubscriber,
                    peer,
                    &format_args!(
                        "{} bytes the client has not taken (more than {cap})",
                        pending.len()
                    ),
                );
                return;
            }
            let over = pending.len().saturating_sub(PENDING_FREE);
            if over > charged_bytes {
                let Some(c) = p.buffered.try_take(over - charged_bytes) else {
                    guard.reject(
                        Refusal::SlowSubscriber,
                        peer,
                        &format_args!(
                            "{} bytes the client has not taken, and broker.max_buffered_bytes ({} bytes) is in use",
                            pending.len(),
                            p.buffered.max()
                        ),
                    );
                    return;
                };
                charged_bytes = over;
                charged.push(c);
            }
        }
    };
    tokio::select! {
        _ = up => {},
        _ = down => {},
    };
    // From here on a newer connection with the client id is no takeover of this one.
    conn.ended = true;
    let _ = cw.shutdown().await;
    // The link ends at the router (by the DISCONNECT passed on, or the adapter's own once the
    // stream is shut): wait for it, so the client id's next session finds this one gone.
    let _ = to_broker.w.shutdown().await;
    guard.await_link_end(&mut ir, &peer).await;
}

/// Append to `out` the SUBSCRIBE (`options`) or UNSUBSCRIBE `frame` as rumqttd gets it: its
/// `$` filters under the guard's prefix (`delivery`). False when it does not parse.
fn relay_filters_inside(
    frame: &[u8],
    header_len: usize,
    v5: bool,
    options: bool,
    out: &mut BytesMut,
) -> bool {
    match map_filters(frame, header_len, v5, options, delivery::inside) {
        Some(mapped) => {
            out.extend_from_slice(&mapped);
            true
        }
        None => false,
    }
}

impl Guard {
    /// Must this MQTT 5 publish lose its properties on its way into rumqttd? It must not reach
    /// a 3.1.1 subscriber with them (rumqttd's 3.1.1 encoder panics on them; the link's
    /// adapter also drops them for a 3.1.1 connection; `Fanout::add_filter`), nor be kept as a retained message a 3.1.1 client may subscribe
    /// to later. `admit`: what the fan-out mirror said of it. Counted when so.
    fn drops_properties(
        &self,
        v5: bool,
        admit: Option<Admit>,
        retain: bool,
        frame: &[u8],
        header_len: usize,
        topic_len: usize,
    ) -> bool {
        let v3 = matches!(admit, Some(Admit::Counted { v3: true }));
        let drop = v5 && (v3 || retain) && has_properties(frame, header_len, topic_len);
        if drop {
            self.metrics.broker_properties_dropped.inc();
        }
        drop
    }

    /// The guard's end of a link is shut: read (and discard) until the adapter closes it
    /// (the router has ended the link). Counted and logged when that takes longer than
    /// [`LINK_END`] (a router stalled by its work).
    pub(super) async fn await_link_end<R: AsyncRead + Unpin>(
        &self,
        conn: &mut R,
        who: &(dyn std::fmt::Display + Sync),
    ) {
        let mut scratch = [0u8; 256];
        let closed = tokio::time::timeout(LINK_END, async {
            while let Ok(n) = conn.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        if closed.is_err() {
            self.metrics.broker_disconnect_unsettled.inc();
            tracing::warn!(client = %who, "rumqttd's router did not end a link within {LINK_END:?}; left it");
        }
    }
}
