//! [`Flow`]: keep alive, MQTT 5 Maximum Packet Size and Receive Maximum, enforced by the guard
//! between the client and rumqttd (rumqttd ignores them). The invariants are on [`Flow`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;

use crate::broker::frame::{parse_header, publish_pkid, PacketType};
use crate::core::metrics::DropReason;

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
pub(super) struct Flow {
    /// The client's keep alive (seconds; 0: off).
    pub(super) keep_alive: u16,
    pub(super) ping_after: Duration,
    /// PINGREQs the guard sent rumqttd whose PINGRESP has not come back yet.
    pub(super) own_pings: AtomicU32,
    /// The client's Maximum Packet Size (`usize::MAX` when it declared none).
    pub(super) max_packet: usize,
    /// The client's Receive Maximum, when below rumqttd's window (else that window is the
    /// tighter bound and nothing is held).
    pub(super) receive_max: Option<usize>,
    pub(super) state: Mutex<FlowState>,
    /// The client completed a publish while others were held.
    pub(super) released: tokio::sync::Notify,
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
    /// order: (packet id, QoS, who answers).
    pub(super) acks: std::collections::VecDeque<(u16, u8, Owner)>,
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
    pub(super) fn new(
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
    pub(super) fn tracks(&self) -> bool {
        self.max_packet != usize::MAX || self.receive_max.is_some()
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
    /// header), which the relay passes on: the guard's own acknowledgements next in line follow
    /// it (through `ctl`, written after it), and a completed delivery frees a place of the
    /// client's Receive Maximum.
    pub(super) fn client_acked(
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
