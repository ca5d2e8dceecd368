//! One upstream MQTT session (rumqttc), MQTT 3.1.1 or 5, behind the same small interface.
//!
//! The forwarder only needs: publish QoS 1 (no packet id returned), the events CONNACK,
//! `Outgoing::Publish(pkid)` and PUBACK (with MQTT 5, whether its reason code is a success), and
//! DISCONNECT. Each session owns a fresh rumqttc client and event loop; the event loop runs in
//! its own task (`poll()` is not cancel-safe) and hands converted events over a channel.
//!
//! The forwarder sees a session only through [`UpstreamSession`] (opened by a [`Connector`]):
//! [`Rumqttc`] opens the real ones; the forwarder's unit tests open a scripted fake, so its state
//! machine (packet-id matching, refusals, dying connections, batched acks) runs without a broker.

use rumqttc::Transport;
use tokio::task::JoinHandle;

use crate::config::{UpstreamConfig, UpstreamProtocol, UpstreamUrl};

/// What the forwarder hears from a session.
#[derive(Debug)]
pub enum Up {
    /// CONNACK; with MQTT 5, the broker's receive maximum.
    Connected {
        session_present: bool,
        receive_max: Option<u16>,
    },
    /// A publish request left with this packet id (requests leave in the order they were made).
    Sent(u16),
    /// PUBACK; `refused` holds an MQTT 5 failure reason code.
    Acked {
        pkid: u16,
        refused: Option<String>,
    },
    /// The DISCONNECT we asked for left.
    Disconnected,
    Other,
}

/// Why a session refused a request or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The client library refused a publish request before it got a packet id.
    #[error("{0}")]
    Refused(String),
    /// The connection failed or ended (the session is over).
    #[error("{0}")]
    Connection(String),
}

/// What the forwarder needs of one upstream connection. Contract (what rumqttc gives and the
/// forwarder relies on):
/// - `publish` queues a QoS 1 publish without waiting; it returns no packet id. Requests leave
///   in the order they were made, each reported as [`Up::Sent`] with its packet id, and settled
///   by [`Up::Acked`] with the same id.
/// - `events` yields [`Up`]s in order; an `Err` ends the session (nothing follows it).
/// - `alive` is false once the session's event loop has ended (its requests are then all
///   refused alike, which says nothing about any one of them).
pub trait UpstreamSession: Send + Sync {
    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), SessionError>;
    /// Ask for a DISCONNECT (reported as [`Up::Disconnected`] once it left).
    fn disconnect(&self);
    fn alive(&self) -> bool;
    fn events(&self) -> flume::Receiver<Result<Up, SessionError>>;
}

/// Opens one session per connection (nothing of a session is reused by the next).
pub trait Connector: Send {
    type Session: UpstreamSession;
    /// Open a session; the connection is made in the background (reported as
    /// [`Up::Connected`]). `window`: messages the forwarder keeps in flight at most.
    fn open(&mut self, cfg: &UpstreamConfig, url: &UpstreamUrl, window: usize) -> Self::Session;
}

/// The real sessions: rumqttc's MQTT 3.1.1 or 5 client, as `upstream.protocol` says.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rumqttc;

impl Connector for Rumqttc {
    type Session = Session;
    fn open(&mut self, cfg: &UpstreamConfig, url: &UpstreamUrl, window: usize) -> Session {
        Session::open(cfg, url, window)
    }
}

impl UpstreamSession for Session {
    fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), SessionError> {
        (self.publish)(topic, payload)
    }

    fn disconnect(&self) {
        (self.disconnect)()
    }

    fn alive(&self) -> bool {
        !self.poller.is_finished()
    }

    fn events(&self) -> flume::Receiver<Result<Up, SessionError>> {
        self.events.clone()
    }
}

/// The publish and disconnect closures over a rumqttc client of either version (the two clients
/// have the same methods but no common trait).
macro_rules! session_over {
    ($client:expr, $qos:expr, $events:expr, $poller:expr) => {{
        let client = $client;
        let c = client.clone();
        Session {
            publish: Box::new(move |topic, payload| {
                client
                    .try_publish(topic, $qos, false, payload)
                    .map_err(|e| SessionError::Refused(e.to_string()))
            }),
            disconnect: Box::new(move || {
                let _ = c.try_disconnect();
            }),
            events: $events,
            poller: $poller,
        }
    }};
}

/// Returns [`SessionError::Refused`] with the client's message: the two versions' `ClientError`s
/// have no common type, and each holds the whole refused request (its payload), which a
/// [`SessionError`] (cloned, compared, also made by the test session) should not keep.
type PublishFn = Box<dyn Fn(String, Vec<u8>) -> Result<(), SessionError> + Send + Sync>;

/// A rumqttc session. `publish` queues a QoS 1 publish (never waits; the request channel holds
/// what one lease can turn into).
pub struct Session {
    publish: PublishFn,
    disconnect: Box<dyn Fn() + Send + Sync>,
    events: flume::Receiver<Result<Up, SessionError>>,
    poller: JoinHandle<()>,
}

impl Session {
    /// Open a session (the connection is made by the event loop task).
    pub fn open(cfg: &UpstreamConfig, url: &UpstreamUrl, window: usize) -> Session {
        // A lease takes up to window x batch_events events; when they do not share batches
        // (alerts, events near batch_bytes) that is as many messages, which wait here for
        // rumqttc's in-flight limit (the window) rather than fail the connection.
        let cap = window.saturating_mul(cfg.batch_events.max(2)) + 16;
        let (tx, events) = flume::bounded::<Result<Up, SessionError>>(cap);
        let mut net = rumqttc::NetworkOptions::new();
        // Small packets, many in flight: without TCP_NODELAY, Nagle's algorithm and the peer's
        // delayed ACKs stall the window (measured: drain at 4k events/s instead of tens of k).
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(cfg.ack_timeout.as_secs().clamp(1, 30));
        let transport = transport(cfg, url);
        let password = password(cfg);
        let ids = packet_ids(window);
        match cfg.protocol {
            UpstreamProtocol::V4 => {
                use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
                let mut opts = MqttOptions::new(cfg.client_id.clone(), url.host.clone(), url.port);
                opts.set_keep_alive(cfg.keep_alive)
                    .set_clean_session(true)
                    .set_max_packet_size(cfg.max_packet_size, cfg.max_packet_size)
                    .set_inflight(ids);
                if let Some(t) = transport {
                    opts.set_transport(t);
                }
                if let Some(user) = &cfg.username {
                    opts.set_credentials(user.clone(), password);
                }
                let (client, mut eventloop) = AsyncClient::new(opts, cap);
                eventloop.set_network_options(net);
                let poller = tokio::spawn(async move {
                    loop {
                        let ev = eventloop.poll().await.map(|ev| match ev {
                            Event::Incoming(Packet::ConnAck(a)) => Up::Connected {
                                session_present: a.session_present,
                                receive_max: None,
                            },
                            Event::Outgoing(Outgoing::Publish(pkid)) => Up::Sent(pkid),
                            Event::Incoming(Packet::PubAck(a)) => Up::Acked {
                                pkid: a.pkid,
                                refused: None,
                            },
                            Event::Outgoing(Outgoing::Disconnect) => Up::Disconnected,
                            _ => Up::Other,
                        });
                        if !forward(&tx, ev.map_err(|e| SessionError::Connection(e.to_string())))
                            .await
                        {
                            break;
                        }
                    }
                });
                session_over!(client, QoS::AtLeastOnce, events, poller)
            }
            UpstreamProtocol::V5 => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::{AsyncClient, Event, MqttOptions};
                use rumqttc::Outgoing;
                let mut opts = MqttOptions::new(cfg.client_id.clone(), url.host.clone(), url.port);
                opts.set_keep_alive(cfg.keep_alive)
                    .set_clean_start(true)
                    .set_max_packet_size(Some(cfg.max_packet_size.min(u32::MAX as usize) as u32))
                    .set_outgoing_inflight_upper_limit(ids)
                    .set_network_options(net);
                if let Some(t) = transport {
                    opts.set_transport(t);
                }
                if let Some(user) = &cfg.username {
                    opts.set_credentials(user.clone(), password);
                }
                let (client, mut eventloop) = AsyncClient::new(opts, cap);
                let poller = tokio::spawn(async move {
                    loop {
                        let ev = eventloop.poll().await.map(|ev| match ev {
                            Event::Incoming(Packet::ConnAck(a)) => Up::Connected {
                                session_present: a.session_present,
                                receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
                            },
                            Event::Outgoing(Outgoing::Publish(pkid)) => Up::Sent(pkid),
                            Event::Incoming(Packet::PubAck(a)) => Up::Acked {
                                pkid: a.pkid,
                                refused: match a.reason {
                                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                                        None
                                    }
                                    other => Some(format!("{other:?}")),
                                },
                            },
                            Event::Outgoing(Outgoing::Disconnect) => Up::Disconnected,
                            _ => Up::Other,
                        });
                        if !forward(&tx, ev.map_err(|e| SessionError::Connection(e.to_string())))
                            .await
                        {
                            break;
                        }
                    }
                });
                session_over!(client, QoS::AtLeastOnce, events, poller)
            }
        }
    }
}

/// The transport `upstream` asks for: TLS with the CA file or system roots and an optional
/// client certificate (config::compile), or plain TCP (`None`). Shared with the fleet's
/// connection.
pub fn transport(cfg: &UpstreamConfig, url: &UpstreamUrl) -> Option<Transport> {
    match (&cfg.tls, url.tls) {
        (Some(tls), _) => Some(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        )),
        (None, true) => Some(Transport::tls_with_default_config()),
        (None, false) => None,
    }
}

/// The upstream password ("" without one).
pub fn password(cfg: &UpstreamConfig) -> String {
    cfg.password
        .as_ref()
        .map(|p| p.expose().to_string())
        .unwrap_or_default()
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Hand one event to the forwarder; false when the session should end (an error, or nobody
/// listens any more).
async fn forward(
    tx: &flume::Sender<Result<Up, SessionError>>,
    ev: Result<Up, SessionError>,
) -> bool {
    let failed = ev.is_err();
    tx.send_async(ev).await.is_ok() && !failed
}

/// Is an MQTT 5 PUBACK failure reason (as `Up::Acked` reports it) one that sending the same
/// event again cannot change? Quota and broker trouble may pass; a bad topic, a packet too
/// large, a payload in the wrong format or a denied topic stay as they are.
pub fn refusal_is_final(reason: &str) -> bool {
    matches!(
        reason,
        "NotAuthorized" | "TopicNameInvalid" | "PayloadFormatInvalid"
    )
}

/// rumqttc numbers packets 1..=N and wraps: one more id than our window means an id is never
/// reused while its packet is still in flight.
pub fn packet_ids(window: usize) -> u16 {
    (window + 1).min(u16::MAX as usize) as u16
}

/// The window to use once the broker told its receive maximum (MQTT 5): below it, so packet
/// ids (which rumqttc wraps at the smaller of the two) never collide.
pub fn effective_window(configured: usize, receive_max: Option<u16>) -> usize {
    match receive_max {
        Some(r) if r > 1 => configured.min(r as usize - 1),
        Some(_) => 1,
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(packet_ids(64), 65);
        assert_eq!(packet_ids(100_000), u16::MAX);
        assert_eq!(effective_window(128, None), 128);
        assert_eq!(effective_window(128, Some(20)), 19);
        assert_eq!(effective_window(10, Some(65535)), 10);
        assert_eq!(effective_window(10, Some(1)), 1);
    }
}
