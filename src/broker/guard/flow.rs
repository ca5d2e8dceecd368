//! [`Flow`]: keep alive, MQTT 5 Maximum Packet Size and Receive Maximum, enforced by the guard
//! between the client and rumqttd (rumqttd ignores them), and every forwarded message made what
//! MQTT says the client gets (`delivery`: stamp removed, QoS lowered to the publish QoS, `$`
//! topics, No Local). The invariants are on [`Flow`].

use std::net::SocketAddr;

use std::sync::Mutex;

use bytes::BytesMut;

use crate::broker::frame::{parse_header, publish_meta, rewrite_publish, Edit, PacketType};
use crate::core::metrics::DropReason;
use crate::core::stamp;

use super::delivery::{self, SharedSubscriptions};
use super::Guard;

/// rumqttd 0.20's outgoing window: unacknowledged QoS 1/2 publishes it sends one connection
/// at most (`MAX_INFLIGHT` in `router/iobufs.rs`).
pub(super) const RUMQTTD_OUTGOING_WINDOW: usize = 100;

/// Bytes of publishes the guard holds for one client (Receive Maximum) before it stops reading
/// from rumqttd for it (rumqttd then waits on that connection alone; it keeps the messages in its
/// log anyway). Without it, a client that never completes a delivery could make the guard hold
/// rumqttd's whole window of 100 messages of up to `broker.max_payload_size` each.
pub(super) const HELD_BYTES: usize = 256 * 1024;

/// What the guard does on one connection for the client, between it and rumqttd:
/// - keep alive: the client's own is enforced by the guard (rumqttd's router has no keep alive:
///   it lived in its network layer, which refused keep alive 0);
/// - MQTT 5 Maximum Packet Size: a PUBLISH larger than the client allows is withheld (counted
///   in `subscriber_max_packet_size`) and acknowledged to rumqttd on the client's behalf (QoS 1:
///   PUBACK; QoS 2: PUBREC, then PUBCOMP for rumqttd's PUBREL), as if delivered (§3.1.2.11.4);
/// - MQTT 5 Receive Maximum: QoS 1/2 PUBLISHes beyond the client's quota wait here, in order,
///   until it completes earlier ones (§4.9);
/// - every PUBLISH loses its stamp and gets the lower of its publish QoS and rumqttd's (the
///   subscription's); the guard answers rumqttd for a delivery the client gets at QoS 0 (as for
///   one withheld), and for one it gets at QoS 1 where rumqttd sent QoS 2 it turns the client's
///   PUBACK into the PUBREC rumqttd waits for and answers rumqttd's PUBREL itself; a `$` topic
///   or the client's own message (No Local) that the client's subscriptions do not take is
///   withheld and answered by the guard (`delivery`).
///
/// rumqttd takes acknowledgements only in the order it sent the publishes (one out of order
/// closes the connection: `register_ack`/`register_pubcomp` in its `router/iobufs.rs`), so the
/// guard keeps rumqttd's two queues of unfinished deliveries, `acks` (PUBACK/PUBREC due) and
/// `comps` (PUBCOMP due), and sends its own acknowledgement only when every earlier one has been
/// sent. Invariants: a packet the client gets is a whole packet rumqttd sent, in rumqttd's
/// order (QoS 0 may pass held ones, as MQTT allows), a PUBLISH changed only as `delivery`
/// says; what is held or queued is
/// bounded by rumqttd's outgoing window (100 unacknowledged publishes per connection); `state`
/// is never locked across an await.
pub(super) struct Flow {
    /// The client's keep alive (seconds; 0: off).
    pub(super) keep_alive: u16,
    /// The client's Maximum Packet Size (`usize::MAX` when it declared none).
    pub(super) max_packet: usize,
    /// The client's Receive Maximum, when below rumqttd's window (else that window is the
    /// tighter bound and nothing is held).
    pub(super) receive_max: Option<usize>,
    pub(super) state: Mutex<FlowState>,
    /// The client completed a publish while others were held.
    pub(super) released: tokio::sync::Notify,
    /// MQTT 5 connection (PUBLISH properties).
    pub(super) v5: bool,
    /// This client in the stamps of its own publishes.
    pub(super) origin: u64,
    /// The client's subscriptions (its session's).
    pub(super) subscriptions: SharedSubscriptions,
}

/// Who answers a delivery rumqttd is waiting on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Owner {
    /// Sent to the client, which answers it.
    Client,
    /// Held back by the client's Receive Maximum; the client answers it once sent.
    Held,
    /// Withheld (too large for the client): the guard answers it.
    Guard,
}

#[derive(Default)]
pub(super) struct FlowState {
    /// QoS 1/2 publishes rumqttd sent, whose PUBACK (QoS 1) / PUBREC (QoS 2) is due, in its
    /// order: (packet id, QoS, who answers, the QoS the client got it with).
    pub(super) acks: std::collections::VecDeque<(u16, u8, Owner, u8)>,
    /// QoS 2 deliveries whose PUBCOMP is due, in rumqttd's order: (packet id, who answers, its
    /// PUBREL has come).
    pub(super) comps: std::collections::VecDeque<(u16, Owner, bool)>,
    /// Publishes held back by the client's Receive Maximum (the `Held` entries, same order).
    pub(super) held: std::collections::VecDeque<BytesMut>,
    /// Their bytes.
    pub(super) held_bytes: usize,
    /// Deliveries sent to the client and not completed (its Receive Maximum quota).
    pub(super) in_flight: usize,
}

impl FlowState {
    /// Send the guard's acknowledgements that are next in rumqttd's order.
    pub(super) fn settle(&mut self, ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>) {
        let send = |byte1: u8, id: u16| {
            let [hi, lo] = id.to_be_bytes();
            // The relay towards rumqttd is gone only when the connection ends.
            let _ = ctl.send([byte1, 0x02, hi, lo]);
        };
        loop {
            if let Some(&(id, qos, Owner::Guard, _)) = self.acks.front() {
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
    pub(super) fn new(
        keep_alive: u16,
        props: Option<&rumqttd::protocol::ConnectProperties>,
        v5: bool,
        origin: u64,
        subscriptions: SharedSubscriptions,
    ) -> Flow {
        Flow {
            keep_alive,
            max_packet: props
                .and_then(|p| p.max_packet_size)
                .map_or(usize::MAX, |m| m as usize),
            receive_max: props
                .and_then(|p| p.receive_maximum)
                .map(usize::from)
                .filter(|&m| m < RUMQTTD_OUTGOING_WINDOW),
            state: Mutex::new(FlowState::default()),
            released: tokio::sync::Notify::new(),
            v5,
            origin,
            subscriptions,
        }
    }

    pub(super) fn holds(&self) -> bool {
        self.receive_max.is_some()
    }

    /// Holding [`HELD_BYTES`] or more: read nothing more from rumqttd until the client
    /// completes a delivery.
    pub(super) fn full(&self) -> bool {
        self.holds() && self.state().held_bytes >= HELD_BYTES
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whole packets from rumqttd on their way to the client: those the client gets.
    pub(super) fn to_client(
        &self,
        chunk: BytesMut,
        ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>,
        guard: &Guard,
        peer: SocketAddr,
    ) -> BytesMut {
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
                Some(PacketType::Publish) => {
                    let Some(meta) = publish_meta(f, hl, self.v5) else {
                        // Not one the guard can read: as rumqttd sent it.
                        out.extend_from_slice(f);
                        continue;
                    };
                    let qos = meta.qos;
                    let payload = &f[f.len() - meta.payload_len..];
                    let (stamp, skip) = match stamp::split(payload) {
                        Some((s, _)) => (s, stamp::LEN),
                        None => (
                            stamp::Stamp {
                                qos,
                                origin: stamp::GATEWAY,
                            },
                            0,
                        ),
                    };
                    let dollar = delivery::from_router(meta.topic);
                    let own = stamp.origin == self.origin && stamp.origin != stamp::GATEWAY;
                    // Only a `$` topic or the client's own message can be unwanted: no lock and
                    // no filter scan for the rest.
                    let wanted = (dollar.is_none() && !own)
                        || self
                            .subscriptions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .wants(dollar.unwrap_or(meta.topic), own);
                    let client_qos = stamp.qos.min(qos);
                    // Written straight into `out` (no copy per message), taken back out when
                    // it is withheld or held.
                    let start = out.len();
                    let edit = Edit {
                        qos: client_qos,
                        retain: meta.retain,
                        topic: dollar,
                        skip,
                        ..Edit::default()
                    };
                    if rewrite_publish(f, hl, self.v5, &edit, &mut out).is_none() {
                        out.extend_from_slice(f);
                    }
                    let len = out.len() - start;
                    let too_large = wanted && len > self.max_packet;
                    if too_large {
                        guard.metrics.drop_events(
                            DropReason::SubscriberMaxPacket,
                            1,
                            &format_args!(
                                "a {len} byte QoS {client_qos} message for {peer}, whose MQTT 5 Maximum Packet Size is {}",
                                self.max_packet
                            ),
                        );
                    }
                    let withheld = !wanted || too_large;
                    if withheld {
                        out.truncate(start);
                    }
                    let Some(id) = meta.pkid else {
                        continue;
                    };
                    let owner = if withheld || client_qos == 0 {
                        // Not the client's to answer (withheld, or delivered at QoS 0).
                        Owner::Guard
                    } else if self
                        .receive_max
                        .is_some_and(|max| st.in_flight >= max || !st.held.is_empty())
                    {
                        Owner::Held
                    } else {
                        Owner::Client
                    };
                    st.acks.push_back((id, qos, owner, client_qos));
                    match owner {
                        Owner::Guard => st.settle(ctl),
                        Owner::Held => {
                            let g = out.split_off(start);
                            st.held_bytes += g.len();
                            st.held.push_back(g);
                        }
                        Owner::Client => st.in_flight += 1,
                    }
                    continue;
                }
                Some(PacketType::Pubrel) => {
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
    pub(super) fn release(&self) -> BytesMut {
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
    /// header), which the relay passes on, or what it returns in its place (the PUBREC rumqttd
    /// waits for, where the client got at QoS 1 what rumqttd sent at QoS 2): the guard's own
    /// acknowledgements next in line follow it (through `ctl`, written after it), and a
    /// completed delivery frees a place of the client's Receive Maximum.
    pub(super) fn client_acked(
        &self,
        kind: PacketType,
        body: &[u8],
        ctl: &tokio::sync::mpsc::UnboundedSender<[u8; 4]>,
    ) -> Option<[u8; 4]> {
        let id = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))?;
        let mut st = self.state();
        let before = st.in_flight;
        let mut instead = None;
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
            let (_, qos, _, client_qos) = st.acks[i];
            st.acks.remove(i);
            if kind == PacketType::Puback && qos == 2 && client_qos == 1 {
                // Delivered as QoS 1: its PUBACK completes it for the client, and rumqttd gets
                // the PUBREC it waits for; its PUBREL the guard answers.
                let [hi, lo] = id.to_be_bytes();
                instead = Some([PacketType::Pubrec.byte1(), 0x02, hi, lo]);
                st.comps.push_back((id, Owner::Guard, false));
                st.in_flight = st.in_flight.saturating_sub(1);
            } else if kind == PacketType::Pubrec && qos == 2 {
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
        instead
    }
}
