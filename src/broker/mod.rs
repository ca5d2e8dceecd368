//! Embedded MQTT broker (rumqttd 0.20) for sensors and local apps.
//!
//! We use rumqttd's lower-level API rather than `Broker::start()`: the router runs on its own
//! thread (`Router::spawn`), each listener (`Server`) runs as a task on the gateway's runtime
//! (so a bind failure is an error we see, and a panicking connection task takes only itself
//! down), and the gateway's links are built with `LinkBuilder` whenever needed.
//!
//! Sizing (see `broker.segment_size`, `broker.segment_count`): the router keeps, per
//! subscription filter, an in-memory log of about `segment_size × (segment_count + 1)` bytes.
//! The ingest link may fall that far behind before rumqttd skips readings for it; ingest detects
//! every skip from the log offsets and counts it.

pub mod ingest;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{ConnectionSettings, LinkType, RouterConfig, Server, ServerSettings};
use tokio::task::JoinHandle;

use crate::config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker listener {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error("broker link {0}: {1}")]
    Link(String, String),
}

/// rumqttd's router event type is private; we keep its sender only inside this closure.
type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), BrokerError> + Send + Sync;

/// Starts a listener task: (name, address, MQTT 5?).
type ListenerFactory = dyn Fn(&str, SocketAddr, bool) -> JoinHandle<()> + Send + Sync;

/// A running embedded broker.
pub struct Broker {
    links: Arc<LinkFactory>,
    listen: Arc<ListenerFactory>,
    addr: Option<SocketAddr>,
    /// Address of the MQTT 5 listener, when enabled.
    pub addr_v5: Option<SocketAddr>,
    listeners: Vec<JoinHandle<()>>,
}

impl Broker {
    /// Start the router, without listeners: create the gateway's links now, so they are
    /// subscribed before the first sensor can connect (a publish that reaches the router before
    /// a subscription exists is never delivered to it, yet the sensor got its PUBACK).
    pub fn new(cfg: &BrokerConfig) -> Broker {
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections,
            // Per read from a filter log to one QoS 0 subscriber (our links).
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.segment_size,
            max_segment_count: cfg.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = rumqttd::Router::new(0, router_cfg).spawn();
        let settings = ConnectionSettings {
            connection_timeout_ms: cfg.connection_timeout.as_millis().min(u16::MAX as u128) as u16,
            max_payload_size: cfg.max_payload_size,
            // rumqttd reads at most this many packets per batch from one connection.
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let tx = router_tx.clone();
        let links: Arc<LinkFactory> = Arc::new(move |client_id: &str| {
            let (tx, rx, _ack) = LinkBuilder::new(client_id, tx.clone())
                .clean_session(true)
                .dynamic_filters(true)
                .build()
                .map_err(|e| BrokerError::Link(client_id.to_string(), e.to_string()))?;
            Ok((tx, rx))
        });
        let listen: Arc<ListenerFactory> =
            Arc::new(move |name: &str, addr: SocketAddr, v5: bool| {
                let server = ServerSettings {
                    name: name.to_string(),
                    listen: addr,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: settings.clone(),
                };
                let router_tx = router_tx.clone();
                tokio::spawn(async move {
                    let result = if v5 {
                        Server::new(server, router_tx, V5)
                            .start(LinkType::Remote)
                            .await
                    } else {
                        Server::new(server, router_tx, V4)
                            .start(LinkType::Remote)
                            .await
                    };
                    if let Err(e) = result {
                        tracing::error!(%addr, error = %e, "MQTT listener stopped");
                    }
                })
            });
        Broker {
            links,
            listen,
            addr: None,
            addr_v5: None,
            listeners: Vec::new(),
        }
    }

    /// Start the listeners of `cfg`; returns once every listener accepts connections.
    pub async fn listen(&mut self, cfg: &BrokerConfig) -> Result<(), BrokerError> {
        let addr = resolve_port(cfg.listen)?;
        self.listeners.push((self.listen)("v4", addr, false));
        self.addr = Some(addr);
        if let Some(a) = cfg.listen_v5 {
            let a = resolve_port(a)?;
            self.listeners.push((self.listen)("v5", a, true));
            self.addr_v5 = Some(a);
        }
        for a in std::iter::once(addr).chain(self.addr_v5) {
            wait_listening(a, &self.listeners).await?;
        }
        tracing::info!(%addr, v5 = ?self.addr_v5, "broker listening");
        Ok(())
    }

    /// Router and listeners in one go (for a broker without links of its own, like the demo's
    /// cloud).
    pub async fn start(cfg: &BrokerConfig) -> Result<Broker, BrokerError> {
        let mut b = Broker::new(cfg);
        b.listen(cfg).await?;
        Ok(b)
    }

    /// Address of the MQTT 3.1.1 listener (once listening).
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// A new in-process link to the router under `client_id`.
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.links)(client_id)
    }

    /// Stop accepting connections. The router thread itself has no stop API in rumqttd 0.20;
    /// it ends with the process.
    pub fn stop_listeners(&self) {
        for l in &self.listeners {
            l.abort();
        }
    }

    /// Are all listeners still running?
    pub fn listeners_alive(&self) -> bool {
        self.listeners.iter().all(|l| !l.is_finished())
    }
}

/// rumqttd binds the address itself and does not report the port it got: for port 0, find a
/// free port first. (A race with another process taking it in between shows as a bind error.)
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = StdListener::bind(addr).map_err(|e| BrokerError::Listen {
        addr,
        message: e.to_string(),
    })?;
    l.local_addr().map_err(|e| BrokerError::Listen {
        addr,
        message: e.to_string(),
    })
}

/// Wait until `addr` accepts TCP connections, or fail if a listener task ended (bind error).
async fn wait_listening(addr: SocketAddr, listeners: &[JoinHandle<()>]) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        }
    } else {
        addr
    };
    loop {
        if listeners.iter().any(|l| l.is_finished()) {
            return Err(BrokerError::Listen {
                addr,
                message: "could not listen (address in use or not permitted?)".into(),
            });
        }
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BrokerError::Listen {
                addr,
                message: "listener did not come up within 5 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
