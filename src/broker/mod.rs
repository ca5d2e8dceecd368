//! Embedded MQTT broker (rumqttd 0.20) for sensors and local apps.
//!
//! Sensors never reach rumqttd directly: the [`guard`] owns the public listeners (plain MQTT
//! 3.1.1, MQTT 5, TLS), checks every connection and relays it to rumqttd listeners bound to
//! 127.0.0.1 that accept only the guard's per-process secret. A liveness probe (a real
//! CONNECT/CONNACK through the guard, [`Broker::check`]) restarts an internal listener that
//! stops answering (rumqttd 0.20 can poison one, see `guard`).
//!
//! We use rumqttd's lower-level API rather than `Broker::start()`: the router runs on its own
//! thread (`Router::spawn`), each listener (`Server`) runs as a task on the gateway's runtime
//! (so a bind failure is an error we see, and a panicking connection task takes only itself
//! down), and the gateway's links are built with `LinkBuilder` whenever needed.
//!
//! Readings do not go through rumqttd: the guard hands each sensor publish to the pipeline
//! ([`handoff`]) and acknowledges it once it is committed; rumqttd gets every publish as QoS 0
//! for local subscribers, retained messages and wills. Sizing (see `broker.segment_size`,
//! `broker.segment_count`): the router keeps, per subscription filter of a local subscriber, an
//! in-memory log of about `segment_size × (segment_count + 1)` bytes; a slower subscriber skips.

pub mod fanout;
pub mod frame;
pub mod guard;
pub mod handoff;
pub mod refusal;
pub mod retained;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{ConnectionSettings, LinkType, RouterConfig, Server, ServerSettings};
use tokio::sync::watch;
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

/// rumqttd's router event type is private; we keep its sender only inside this closure.
type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), BrokerError> + Send + Sync;

/// Starts an internal rumqttd listener task: (name, address, MQTT 5?).
type ListenerFactory = dyn Fn(&str, SocketAddr, bool) -> JoinHandle<()> + Send + Sync;

/// Probe timeout: a healthy listener answers a CONNECT in milliseconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Ports tried for an internal listener before giving up.
const INTERNAL_PORT_ATTEMPTS: u32 = 5;

/// Longest wait for the guard's sessions to end when the broker stops (they end at their next
/// poll; this only matters for a runtime starved of CPU).
const SESSIONS_END: Duration = Duration::from_secs(2);

/// An internal rumqttd listener (127.0.0.1, guard's secret only) behind a public one.
struct Internal {
    name: &'static str,
    v5: bool,
    /// Where the guard relays to; changes when the listener is restarted.
    target: watch::Sender<SocketAddr>,
    task: Mutex<JoinHandle<()>>,
}

/// A public listener (owned by the guard).
struct Public {
    name: &'static str,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// A running embedded broker.
pub struct Broker {
    links: Arc<LinkFactory>,
    listen: Arc<ListenerFactory>,
    guard: Arc<Guard>,
    internals: Vec<Internal>,
    /// One liveness check at a time: two that found the same listener dead would each start a
    /// replacement, and the guard could be left relaying to the one the other aborted.
    checking: tokio::sync::Mutex<()>,
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
        // The guard enforces broker.max_connections; the router's own limit (whose refusal
        // path poisons a listener in rumqttd 0.20) must never be reached first: room for the
        // gateway's links, the probe and connections still closing.
        max_connections: cfg.max_connections.saturating_mul(2).saturating_add(16),
        // Per read from a filter log to one QoS 0 subscriber (our links).
        max_outgoing_packet_count: 200,
        max_segment_size: cfg.segment_size,
        max_segment_count: cfg.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let settings = ConnectionSettings {
        // The guard already enforced broker.connection_timeout; the CONNECT it relays
        // arrives at once.
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
        );
        let (router_cfg, mut settings) = rumqttd_settings(cfg);
        let router_tx = rumqttd::Router::new(0, router_cfg).spawn();
        let g = guard.clone();
        settings.set_auth_handler(move |_client_id, _user, password: String| {
            let ok = g.internal_password_ok(&password);
            async move { ok }
        });
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
                        tracing::error!(%addr, error = %e, "internal MQTT listener stopped");
                    }
                })
            });
        Broker {
            links,
            listen,
            guard,
            internals: Vec::new(),
            checking: tokio::sync::Mutex::new(()),
            publics: Vec::new(),
            addr: None,
            addr_v5: None,
            addr_tls: None,
        }
    }

    /// Start an internal rumqttd listener on a free loopback port.
    async fn spawn_internal(
        &self,
        name: &str,
        v5: bool,
    ) -> Result<(SocketAddr, JoinHandle<()>), BrokerError> {
        // The port is free when picked, but another process (or another gateway in the same
        // test binary) may bind it before rumqttd does: then pick another.
        let mut attempt = 1;
        loop {
            let addr = resolve_port(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let task = (self.listen)(name, addr, v5);
            match wait_listening(addr, &task).await {
                Ok(()) => return Ok((addr, task)),
                Err(e) if attempt < INTERNAL_PORT_ATTEMPTS => {
                    task.abort();
                    tracing::debug!(listener = name, %addr, error = %e, "internal listener port taken; picking another");
                    attempt += 1;
                }
                Err(e) => {
                    task.abort();
                    return Err(e);
                }
            }
        }
    }

    /// Start the listeners of `cfg`; returns once every listener accepts connections. Every
    /// public address is bound before anything starts, so a taken port fails the start before
    /// any sensor could connect; on any failure, whatever this started is stopped again.
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
        let started = self.start_listeners(v4, v5, tls).await;
        if started.is_err() {
            self.abort_listeners();
        }
        started
    }

    async fn start_listeners(
        &mut self,
        v4: (tokio::net::TcpListener, SocketAddr),
        v5: Option<(tokio::net::TcpListener, SocketAddr)>,
        tls: Option<(
            (tokio::net::TcpListener, SocketAddr),
            tokio_rustls::TlsAcceptor,
        )>,
    ) -> Result<(), BrokerError> {
        let (a4, t4) = self.spawn_internal("v4", false).await?;
        let (tx4, rx4) = watch::channel(a4);
        self.internals.push(Internal {
            name: "v4",
            v5: false,
            target: tx4,
            task: Mutex::new(t4),
        });
        let rx5 = match v5 {
            Some(_) => {
                let (a5, t5) = self.spawn_internal("v5", true).await?;
                let (tx5, rx5) = watch::channel(a5);
                self.internals.push(Internal {
                    name: "v5",
                    v5: true,
                    target: tx5,
                    task: Mutex::new(t5),
                });
                Some(rx5)
            }
            None => None,
        };
        self.addr = Some(self.public("v4", v4, false, None, rx4.clone()));
        if let (Some(l), Some(rx5)) = (v5, rx5) {
            self.addr_v5 = Some(self.public("v5", l, true, None, rx5));
        }
        if let Some((l, acceptor)) = tls {
            self.addr_tls = Some(self.public("tls", l, false, Some(acceptor), rx4));
        }
        tracing::info!(addr = ?self.addr, v5 = ?self.addr_v5, tls = ?self.addr_tls, "broker listening");
        Ok(())
    }

    /// Stop the internal listeners started so far (a failed start: only starting one can fail,
    /// and it comes before any accept loop is spawned).
    fn abort_listeners(&mut self) {
        for i in self.internals.drain(..) {
            if let Ok(t) = i.task.lock() {
                t.abort();
            }
        }
    }

    fn public(
        &mut self,
        name: &'static str,
        (listener, bound): (tokio::net::TcpListener, SocketAddr),
        v5: bool,
        tls: Option<tokio_rustls::TlsAcceptor>,
        target: watch::Receiver<SocketAddr>,
    ) -> SocketAddr {
        let task = tokio::spawn(guard::accept_loop(
            listener,
            tls,
            v5,
            target,
            self.guard.clone(),
        ));
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

    /// Current address of the internal (loopback, secret-protected) listener for MQTT 3.1.1
    /// or 5. For tests that show what the guard prevents.
    #[doc(hidden)]
    pub fn internal_addr(&self, v5: bool) -> Option<SocketAddr> {
        self.internals
            .iter()
            .find(|i| i.v5 == v5)
            .map(|i| *i.target.borrow())
    }

    /// A new in-process link to the router under `client_id`.
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.links)(client_id)
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
        for i in &self.internals {
            if let Ok(t) = i.task.lock() {
                t.abort();
            }
        }
    }

    /// Are all listeners still running?
    pub fn listeners_alive(&self) -> bool {
        self.publics.iter().all(|p| !p.task.is_finished())
            && self
                .internals
                .iter()
                .all(|i| i.task.lock().map(|t| !t.is_finished()).unwrap_or(false))
    }

    /// Liveness check: every public (guard) listener's task runs, and a real CONNECT to each
    /// internal rumqttd listener gets a CONNACK. An internal listener that fails the probe is
    /// replaced by a fresh one (open connections stay on the old one, new ones go to the new
    /// one); returns the problems that remain.
    pub async fn check(&self) -> Vec<String> {
        let _one_at_a_time = self.checking.lock().await;
        let mut problems = Vec::new();
        for p in &self.publics {
            if p.task.is_finished() {
                problems.push(format!("broker {} listener {} stopped", p.name, p.addr));
            }
        }
        for internal in &self.internals {
            let target = *internal.target.borrow();
            let Err(first) = guard::probe(target, internal.v5, &self.guard, PROBE_TIMEOUT).await
            else {
                continue;
            };
            // Once more before restarting: rumqttd may close a probe while it still tears down
            // the previous one with the same client id (seen under load), and a restart makes
            // CONNECTs racing with it fail.
            tracing::debug!(listener = internal.name, error = %first, "broker liveness probe failed once; trying again");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Err(e) = guard::probe(target, internal.v5, &self.guard, PROBE_TIMEOUT).await else {
                continue;
            };
            self.guard.metrics.broker_probe_failures.inc();
            tracing::error!(listener = internal.name, addr = %target, error = %e, "broker liveness probe failed: restarting the internal listener");
            match self.spawn_internal(internal.name, internal.v5).await {
                Ok((addr, task)) => {
                    if let Ok(mut t) = internal.task.lock() {
                        t.abort();
                        *t = task;
                    }
                    internal.target.send_replace(addr);
                    self.guard.metrics.broker_listener_restarts.inc();
                }
                Err(e) => problems.push(format!("broker {}: restart failed: {e}", internal.name)),
            }
            let target = *internal.target.borrow();
            if let Err(e) = guard::probe(target, internal.v5, &self.guard, PROBE_TIMEOUT).await {
                problems.push(format!(
                    "broker {} listener fails its liveness probe: {e}",
                    internal.name
                ));
            } else {
                tracing::warn!(
                    listener = internal.name,
                    "broker listener answers again after restart"
                );
            }
        }
        problems
    }
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        }
    } else {
        addr
    }
}

/// rumqttd binds the address itself and does not report the port it got: for port 0, find a
/// free port first. (A race with another process taking it in between shows as a bind error.)
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = StdListener::bind(addr).map_err(|e| BrokerError::Listen {
        key: "internal listener",
        addr,
        message: e.to_string(),
    })?;
    l.local_addr().map_err(|e| BrokerError::Listen {
        key: "internal listener",
        addr,
        message: e.to_string(),
    })
}

/// Wait until `addr` accepts TCP connections, or fail if a listener task ended (bind error).
async fn wait_listening(addr: SocketAddr, listener: &JoinHandle<()>) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = loopback(addr);
    let failed = || BrokerError::Listen {
        key: "internal listener",
        addr,
        message: "could not listen (address in use or not permitted?)".into(),
    };
    loop {
        if listener.is_finished() {
            return Err(failed());
        }
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            // Someone listens there; make sure it is ours (a failed bind ends the task at once).
            tokio::time::sleep(Duration::from_millis(20)).await;
            if listener.is_finished() {
                return Err(failed());
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BrokerError::Listen {
                key: "internal listener",
                addr,
                message: "listener did not come up within 5 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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
