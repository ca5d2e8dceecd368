//! Embedded MQTT broker (rumqttd 0.20) for sensors and local apps.
//!
//! Sensors never reach rumqttd directly: the [`guard`] owns the public listeners (plain MQTT
//! 3.1.1, MQTT 5, TLS), checks every connection and passes what it lets through to rumqttd's
//! router over an in-process link ([`link`]): rumqttd's network layer (its listeners, its
//! per-connection buffers, its keep alive and will handling) is not used at all.
//!
//! We use rumqttd's lower-level API rather than `Broker::start()`: the router runs on its own
//! thread (`Router::spawn`), and every link (the guard's, one per client connection, and the
//! gateway's own) is built with `LinkBuilder`.
//!
//! Readings do not go through rumqttd: the guard hands each sensor publish to the pipeline
//! ([`handoff`]) and acknowledges it once it is committed; rumqttd gets every publish as QoS 0
//! for local subscribers, retained messages and wills (published by the guard). Sizing (see
//! `broker.segment_size`, `broker.segment_count`): the router keeps, per subscription filter of
//! a local subscriber, an in-memory log of about `segment_size × (segment_count + 1)` bytes; a
//! slower subscriber skips.

pub mod fanout;
pub mod frame;
pub mod guard;
pub mod handoff;
pub mod link;
pub mod refusal;
pub mod retained;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, RouterConfig};
use tokio::task::JoinHandle;

use crate::config::BrokerConfig;
use crate::core::metrics::Metrics;
use guard::Guard;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{key} {addr}: {message}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        message: String,
    },
    #[error("broker link {0}: {1}")]
    Link(String, String),
}

/// Longest wait for the guard's sessions to end when the broker stops (they end at their next
/// poll; this only matters for a runtime starved of CPU).
const SESSIONS_END: Duration = Duration::from_secs(2);

/// A public listener (owned by the guard).
struct Public {
    name: &'static str,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// A running embedded broker.
pub struct Broker {
    router: Arc<link::Router>,
    guard: Arc<Guard>,
    publics: Vec<Public>,
    addr: Option<SocketAddr>,
    /// Address of the MQTT 5 listener, when enabled.
    pub addr_v5: Option<SocketAddr>,
    /// Address of the TLS listener, when enabled.
    pub addr_tls: Option<SocketAddr>,
}

/// rumqttd's router and connection settings for `cfg`, without authentication (the gateway adds
/// the guard's secret check; `edgegate-bench floor` runs rumqttd alone with these).
pub fn rumqttd_settings(cfg: &BrokerConfig) -> (RouterConfig, ConnectionSettings) {
    let router_cfg = RouterConfig {
        // The guard enforces broker.max_connections; the router's own limit must never be
        // reached first: room for the gateway's links (its own, the wills link, one ending a
        // stored session) and links still closing.
        max_connections: cfg.max_connections.saturating_mul(2).saturating_add(16),
        // Per read from a filter log to one QoS 0 subscriber (our links).
        max_outgoing_packet_count: 200,
        max_segment_size: cfg.segment_size,
        max_segment_count: cfg.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    // For rumqttd's own listeners, which the gateway does not use (`edgegate-bench floor` runs
    // rumqttd alone with these).
    let settings = ConnectionSettings {
        connection_timeout_ms: cfg.connection_timeout.as_millis().min(u16::MAX as u128) as u16,
        // What the guard adds on the way in (stamp, `$` prefix) must fit too.
        max_payload_size: cfg.max_payload_size + guard::RELAY_GROWTH,
        // rumqttd reads at most this many packets per batch from one connection.
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    (router_cfg, settings)
}

impl Broker {
    /// Start the router, without listeners: create the gateway's links now, so they are
    /// subscribed before the first sensor can connect (a publish that reaches the router before
    /// a subscription exists is never delivered to it, yet the sensor got its PUBACK).
    pub fn new(cfg: &BrokerConfig, metrics: Arc<Metrics>) -> Broker {
        Self::with_links(cfg, metrics, true)
    }

    fn with_links(cfg: &BrokerConfig, metrics: Arc<Metrics>, own_links: bool) -> Broker {
        let (router_cfg, _) = rumqttd_settings(cfg);
        // What the guard adds on the way in (stamp, `$` prefix) must fit too.
        let router = Arc::new(link::Router::spawn(
            router_cfg,
            cfg.max_payload_size + guard::RELAY_GROWTH,
            metrics.clone(),
        ));
        let guard = Guard::new(
            guard::Policy {
                allow_anonymous: cfg.allow_anonymous,
                passwords: cfg.passwords.clone(),
                max_connections: cfg.max_connections,
                connect_timeout: cfg.connection_timeout,
                max_packet: cfg.max_payload_size,
                buffered: crate::core::budget::Budget::new(cfg.max_buffered_bytes),
                fanout: (cfg.segment_size, cfg.segment_count, cfg.max_fanout_bytes),
                max_client_id_length: cfg.max_client_id_length,
                max_topic_length: cfg.max_topic_length,
                max_topic_aliases: cfg.max_topic_aliases,
                max_topics: cfg.max_topics,
                max_client_ids: cfg.max_client_ids,
                max_publish_rate: cfg.max_publish_rate,
                acl: cfg.acl.clone(),
                retained: retained::RetainedLimits {
                    messages: cfg.max_retained_messages,
                    bytes: cfg.max_retained_bytes,
                    per_client: cfg.max_retained_per_client,
                    bytes_per_client: cfg.max_retained_bytes_per_client,
                },
                max_connections_per_address: cfg.max_connections_per_address,
                max_subscriptions_per_client: cfg.max_subscriptions_per_client,
                max_filters: cfg.max_filters,
                reserve_own_prefix: own_links,
            },
            metrics,
            router,
        );
        Broker {
            router: guard.router().clone(),
            guard,
            publics: Vec::new(),
            addr: None,
            addr_v5: None,
            addr_tls: None,
        }
    }

    /// Start the listeners of `cfg`. Every public address is bound before any accept loop
    /// starts, so a taken port fails the start before any sensor could connect.
    pub async fn listen(&mut self, cfg: &BrokerConfig) -> Result<(), BrokerError> {
        let v4 = bind_public("broker.listen", cfg.listen).await?;
        let v5 = match cfg.listen_v5 {
            Some(a) => Some(bind_public("broker.listen_v5", a).await?),
            None => None,
        };
        let tls = match (cfg.tls_listen, &cfg.tls) {
            (Some(a), Some(tls)) => Some((
                bind_public("broker.tls_listen", a).await?,
                tokio_rustls::TlsAcceptor::from(tls.clone()),
            )),
            _ => None,
        };
        self.addr = Some(self.public("v4", v4, false, None));
        if let Some(l) = v5 {
            self.addr_v5 = Some(self.public("v5", l, true, None));
        }
        if let Some((l, acceptor)) = tls {
            self.addr_tls = Some(self.public("tls", l, false, Some(acceptor)));
        }
        tracing::info!(addr = ?self.addr, v5 = ?self.addr_v5, tls = ?self.addr_tls, "broker listening");
        Ok(())
    }

    fn public(
        &mut self,
        name: &'static str,
        (listener, bound): (tokio::net::TcpListener, SocketAddr),
        v5: bool,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> SocketAddr {
        let task = tokio::spawn(guard::accept_loop(listener, tls, v5, self.guard.clone()));
        self.publics.push(Public {
            name,
            addr: bound,
            task,
        });
        bound
    }

    /// Router and listeners in one go (for a broker without links of its own, like the demo's
    /// cloud).
    pub async fn start(cfg: &BrokerConfig, metrics: Arc<Metrics>) -> Result<Broker, BrokerError> {
        let mut b = Broker::with_links(cfg, metrics, false);
        b.listen(cfg).await?;
        Ok(b)
    }

    /// Address of the MQTT 3.1.1 listener (once listening).
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The guard (limits, counters).
    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    /// A new in-process link to the router under `client_id` (blocks until the router
    /// answered).
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        self.router
            .link(client_id)
            .map_err(|e| BrokerError::Link(client_id.to_string(), e.to_string()))
    }

    /// Stop accepting connections and end every open one, so that no reading is handed on
    /// after this returns (what was handed on and not yet acknowledged is sent again by its
    /// sensor after it reconnects). Returns once every
    /// session has ended, or after [`SESSIONS_END`] (then logged). The router thread itself has
    /// no stop API in rumqttd 0.20; it ends with the process.
    pub async fn stop_listeners(&self) {
        for p in &self.publics {
            p.task.abort();
        }
        self.guard.close();
        let deadline = Instant::now() + SESSIONS_END;
        while self.guard.open_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let open = self.guard.open_connections();
        if open > 0 {
            tracing::warn!(
                open,
                "sensor connections still open {SESSIONS_END:?} after the broker began to stop"
            );
        }
    }

    /// Are all listeners still running?
    pub fn listeners_alive(&self) -> bool {
        self.publics.iter().all(|p| !p.task.is_finished())
    }

    /// Liveness check: every public (guard) listener's task runs. (There is no internal
    /// listener to probe any more: the guard reaches the router through in-process links.)
    pub async fn check(&self) -> Vec<String> {
        self.publics
            .iter()
            .filter(|p| p.task.is_finished())
            .map(|p| format!("broker {} listener {} stopped", p.name, p.addr))
            .collect()
    }
}

/// Bind a public listener (`key` names it in the error).
async fn bind_public(
    key: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), BrokerError> {
    let listen_err = |e: std::io::Error| BrokerError::Listen {
        key,
        addr,
        message: e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    Ok((listener, bound))
}
