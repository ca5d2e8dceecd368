//! Wiring of the stages, startup order, supervision and shutdown.
//!
//! ```text
//! sensors ─MQTT─> broker guard ─[readings + tickets]─> rules ─[Append]─> queue writer (SQLite
//!     thread) <─[Lease/Ack]─ forwarder ─MQTT QoS1─> upstream
//!   (the guard also relays every publish to rumqttd, as QoS 0, for local subscribers; a
//!    sensor's PUBACK waits for its reading's commit: src/core/ack.rs)
//! ```
//!
//! Startup: queue (open, integrity), broker (listening), stages, metrics endpoint; only then is
//! the gateway ready. Shutdown goes from the edge inwards: stop accepting sensors and end their
//! sessions (readings not yet acknowledged are sent again by their sensors later), let the
//! rules hand everything to the queue, let the forwarder wait for in-flight PUBACKs (up to a
//! deadline), commit, close the file.
//!
//! Layer: app: it may import every stage, config and core; nothing below imports it (the CLI
//! above does, for the data-dir lock).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::fleet::RuleSources;
use crate::app::web::Web;
use crate::app::{http, supervisor, systemd};
use crate::broker::handoff::Handoff;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::core::metrics::Metrics;
use crate::forwarder::{Forwarder, UpstreamStatus};
use crate::queue::{self, QueueHandle, QueueWriter, Stats, Store, StoreError};
use crate::rules::history::Tap;
use crate::rules::stage::{RulesHandle, RulesStage};
use crate::rules::Engine;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Queue(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("metrics.listen {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gateway.data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway.data_dir {0} is in use by another running edgegate")]
    InUse(PathBuf),
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("fleet documents: {0}")]
    Fleet(#[from] crate::app::fleet::store::StoreError),
}

/// How long shutdown waits for in-flight upstream acknowledgements.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the rules stage to hand on what it holds.
const RULES_DRAIN: Duration = Duration::from_secs(10);

/// A running gateway.
pub struct Gateway {
    pub broker_addr: SocketAddr,
    pub broker_addr_v5: Option<SocketAddr>,
    pub broker_addr_tls: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    shutdown_tx: watch::Sender<bool>,
    rules: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    supervisor: JoinHandle<()>,
    http: Option<JoinHandle<()>>,
    writer: QueueWriter,
    queue: QueueHandle,
    broker: Arc<Broker>,
    upstream: watch::Receiver<UpstreamStatus>,
    rules_handle: RulesHandle,
    /// Every source of rules (local, fleet documents), combined on each reload.
    sources: RuleSources,
    /// The fleet agent (`fleet.enabled`).
    fleet: Option<JoinHandle<()>>,
    /// Held while running: one gateway per data directory; the CLI sees the daemon is up.
    _lock: std::fs::File,
}

/// Lock `{data_dir}/edgegate.lock` exclusively (released when the file is closed): held by a
/// running gateway, and by the CLI while it writes to the queue itself.
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("edgegate.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::InUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartError::DataDir { path, source }),
    }
}

/// Is a gateway running on `data_dir` (holding its lock)?
pub fn data_dir_in_use(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("edgegate.lock"))
    else {
        return false;
    };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// The broker and the gateway's own links to it, listening.
struct Started {
    broker: Arc<Broker>,
    rules_link: rumqttd::local::LinkTx,
    status_link: Option<rumqttd::local::LinkTx>,
}

/// Start the broker: readings go to `handoff` from the first connection on, and every
/// in-process link is built before the listeners open.
async fn start_broker(
    config: &Config,
    metrics: Arc<Metrics>,
    handoff: Handoff,
) -> Result<Started, StartError> {
    if config.broker.allow_anonymous && config.broker.password_file.is_some() {
        tracing::warn!("broker.allow_anonymous = true with a broker.password_file: clients without credentials are let in");
    }
    let mut broker = Broker::new(&config.broker, metrics.clone());
    broker.guard().set_handoff(handoff);
    // Every in-process link is built before the listeners open, while nothing else talks
    // to rumqttd's router: no connection slot a link takes was ever a remote client's, so
    // no late report about such a client can end a link (broker/guard/mod.rs, on DISCONNECT);
    // built after, the rules link once failed with "Channel recv error". And if one cannot
    // be built, the start fails before any sensor got a PUBACK.
    // The rules stage publishes derived events and alerts on its own local link.
    let (rules_link, _) =
        broker.link(&format!("edgegate-rules-{}", uuid::Uuid::new_v4().simple()))?;
    let status_link = match broker.link(&format!(
        "edgegate-status-{}",
        uuid::Uuid::new_v4().simple()
    )) {
        Ok((tx, _rx)) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no status link: edgegate/status will not be published");
            None
        }
    };
    broker.listen(&config.broker).await?;
    let broker = Arc::new(broker);
    Ok(Started {
        broker,
        rules_link,
        status_link,
    })
}

impl Gateway {
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let metrics = Metrics::new();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);

        // 0. The data directory's lock, then every address we serve on that is not the
        // broker's (the broker binds all of its own in `listen` before starting any): a taken
        // port fails the start before any sensor could get a PUBACK.
        let lock = lock_data_dir(&config.gateway.data_dir)?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                http::bind(addr)
                    .await
                    .map_err(|source| StartError::Metrics { addr, source })?,
            ),
            None => None,
        };

        // 0b. Fleet documents kept from the last run (rolled back first if they kept the
        // gateway from running): combined with the local rules before the engine starts.
        let fleet_topics: Vec<String> = if config.fleet.enabled {
            crate::app::fleet::topics(&config)
                .into_iter()
                .map(|(t, _)| t)
                .collect()
        } else {
            Vec::new()
        };
        let sources = RuleSources::new(config.rules.clone(), &fleet_topics);
        let fleet_store = if config.fleet.enabled {
            Some(crate::app::fleet::agent::prepare(&config, &sources)?)
        } else {
            None
        };

        // 1. Queue.
        let path = config.queue_path();
        let (sync, limits) = (config.queue.sync, queue::limits(&config.queue));
        let open_path = path.clone();
        let (store, report) =
            tokio::task::spawn_blocking(move || Store::open(&open_path, sync, limits))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
        if let Some(aside) = &report.quarantined {
            tracing::error!(
                path = %path.display(),
                kept_as = %aside.display(),
                problem = report.problem.as_deref().unwrap_or("integrity check failed"),
                "queue file is corrupt: moved aside for inspection, started a fresh queue"
            );
        }
        tracing::info!(path = %path.display(), depth = store.depth(), next_sequence = store.next_seq(), "queue open");
        let source = format!("edgegate://{}", config.gateway.id);
        let capacity = config.pipeline.channel_capacity;
        // Freshly committed events kept in memory for the forwarder: a few windows' worth.
        let tail_events = match config.upstream.url {
            Some(_) => (config.upstream.inflight * 4).clamp(1024, 65_536),
            None => 0,
        };
        let (queue, writer) = queue::start(
            store,
            &config.queue,
            path,
            source,
            capacity,
            tail_events,
            metrics.clone(),
        )?;

        // 2. Broker, handing readings to the rules stage's channel. If this fails, the writer
        // (already running) commits what it has and closes the file before the error is
        // returned.
        let (readings_tx, readings_rx) = flume::bounded(capacity);
        let handoff = Handoff {
            tx: readings_tx,
            when_full: config.pipeline.when_full,
            budget: crate::core::budget::Budget::new(config.pipeline.max_bytes),
        };
        let broker = match start_broker(&config, metrics.clone(), handoff).await {
            Ok(b) => b,
            Err(e) => {
                drop(queue);
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                return Err(e);
            }
        };
        let Started {
            broker,
            rules_link,
            status_link,
        } = broker;

        // 3. Stages.
        let (rules_handle, reload_rx) = RulesHandle::channel();
        // The status page's recorder lives in the rules stage (no lock per reading).
        let (tap, page_requests) = match metrics_listener {
            Some(_) => {
                let (tap, tx) = Tap::channel();
                (Some(tap), Some(tx))
            }
            None => (None, None),
        };
        let rules = tokio::spawn(
            RulesStage {
                engine: Engine::new(&sources.combined_now(), &config.upstream.topic_prefix),
                input: readings_rx,
                queue: queue.clone(),
                when_full: config.pipeline.when_full,
                metrics: metrics.clone(),
                local: Some(rules_link),
                reload: reload_rx,
                tap,
            }
            .run(),
        );
        let (status_tx, upstream) = watch::channel(UpstreamStatus::default());
        let forwarder = tokio::spawn(
            Forwarder::new(
                config.upstream.clone(),
                queue.clone(),
                metrics.clone(),
                status_tx,
                shutdown_rx.clone(),
                DRAIN_TIMEOUT,
            )
            .run(),
        );
        if let Some(url) = &config.upstream.url {
            tracing::info!(upstream = %url, topic_prefix = %config.upstream.topic_prefix, "forwarding upstream");
        } else {
            tracing::info!("no upstream configured: events are queued only");
        }

        // 4. Supervision and the metrics endpoint.
        let problems: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec!["starting".into()]));
        let fleet = fleet_store.map(|(store, report)| {
            let p = problems.clone();
            tokio::spawn(
                crate::app::fleet::agent::Agent {
                    config: config.clone(),
                    sources: sources.clone(),
                    rules: rules_handle.clone(),
                    store,
                    report,
                    queue: queue.clone(),
                    health: Arc::new(move || p.lock().map(|v| v.clone()).unwrap_or_default()),
                    upstream: upstream.clone(),
                    shutdown: shutdown_rx.clone(),
                }
                .run(),
            )
        });
        let watched = supervisor::Watched {
            broker: broker.clone(),
            stages: vec![
                ("rules", rules.abort_handle()),
                ("forwarder", forwarder.abort_handle()),
            ],
            queue: queue.clone(),
            upstream: upstream.clone(),
            upstream_configured: config.upstream.url.is_some(),
            problems: problems.clone(),
            metrics: metrics.clone(),
            status_link,
        };
        let supervisor = tokio::spawn(watched.run(shutdown_rx));
        let (metrics_addr, http) = match metrics_listener {
            Some((listener, bound)) => {
                let p = problems.clone();
                let health: http::HealthFn =
                    Arc::new(move || p.lock().map(|v| v.clone()).unwrap_or_default());
                let web = page_requests.map(|requests| {
                    Web::new(
                        &config,
                        bound,
                        (metrics.clone(), health.clone()),
                        (queue.clone(), upstream.clone()),
                        requests,
                        rules_handle.reloads.clone(),
                    )
                });
                let routes = http::Routes {
                    metrics: metrics.clone(),
                    health,
                    web,
                };
                (Some(bound), Some(http::serve(listener, routes)))
            }
            None => (None, None),
        };

        Ok(Gateway {
            broker_addr: broker.addr(),
            broker_addr_v5: broker.addr_v5,
            broker_addr_tls: broker.addr_tls,
            metrics_addr,
            metrics,
            shutdown_tx,
            rules,
            forwarder,
            supervisor,
            http,
            writer,
            queue,
            broker,
            upstream,
            rules_handle,
            sources,
            fleet,
            _lock: lock,
        })
    }

    /// Replace the running rules (from an already validated configuration); rules whose
    /// configuration is unchanged keep their state. Returns their names, or `None` if the rules
    /// stage has stopped.
    pub async fn reload_rules(&self, config: &Config) -> Option<Vec<String>> {
        self.sources
            .reload_local(&self.rules_handle, config.rules.clone())
            .await
    }

    /// Every source of rules (for reloading them from another task, e.g. on SIGHUP).
    pub fn rule_sources(&self) -> RuleSources {
        self.sources.clone()
    }

    /// A handle for reloading rules from another task (e.g. on SIGHUP).
    pub fn rules_handle(&self) -> RulesHandle {
        self.rules_handle.clone()
    }

    /// The embedded broker (guard counters, links).
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Why queue commits fail, while they do (a full disk, an I/O error).
    pub fn commit_error(&self) -> Option<String> {
        self.queue.commit_error()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn upstream_connected(&self) -> bool {
        self.upstream.borrow().connected
    }

    pub async fn queue_stats(&self) -> Option<Stats> {
        self.queue.stats().await.ok()
    }

    /// Stop from the edge inwards; returns the queue depth left for the next start.
    pub async fn shutdown(self) -> Option<Stats> {
        systemd::stopping();
        tracing::info!("shutting down");
        // Its health checks would report the listeners closed below as a failure.
        self.supervisor.abort();
        self.broker.stop_listeners().await;
        let _ = self.shutdown_tx.send(true);
        if let Some(f) = self.fleet {
            // It says "offline" and leaves (bounded inside; this is a fallback).
            let abort = f.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), f)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // The readings channel closes once the guard and every ended session let go of it;
        // the rules stage then hands on what it holds and stops. A session that did not end
        // (stop_listeners warned) would keep it open: stop the stage after a while then (what
        // it did not take was not acknowledged to any sensor).
        self.broker.guard().end_handoff();
        let mut rules = self.rules;
        match tokio::time::timeout(RULES_DRAIN, &mut rules).await {
            Ok(Err(e)) => tracing::error!(error = %e, "rules task failed"),
            Ok(Ok(())) => {}
            Err(_) => {
                tracing::warn!("the rules stage did not finish {RULES_DRAIN:?} after the sessions ended: stopped (unacknowledged readings are sent again by their sensors)");
                rules.abort();
            }
        }
        if let Err(e) = self.forwarder.await {
            tracing::error!(error = %e, "forwarder task failed");
        }
        if let Some(h) = self.http {
            h.abort();
        }
        let stats = self.queue.stats().await.ok();
        drop(self.queue);
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        if let Some(s) = &stats {
            tracing::info!(queued = s.depth, "stopped");
        }
        stats
    }
}

/// Run until `shutdown` resolves, then stop gracefully.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Option<Stats>, StartError> {
    // Listen for SIGHUP before anything else: its default action would end the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let source = config.source.clone();
    let gw = Gateway::start(config).await?;
    systemd::ready(&format!("listening on {}", gw.broker_addr));
    let reload = hup.map(|hup| {
        tokio::spawn(crate::app::reload::reload_on_sighup(
            hup,
            source,
            gw.rules_handle(),
            gw.metrics().clone(),
            gw.rule_sources(),
        ))
    });
    shutdown.await;
    if let Some(r) = reload {
        r.abort();
    }
    Ok(gw.shutdown().await)
}
