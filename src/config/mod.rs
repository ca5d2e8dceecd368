//! Configuration: TOML file plus `EDGEGATE__SECTION__KEY` environment overrides.
//!
//! Loading goes in two steps, so that every problem is reported at once:
//! 1. the `config` crate merges the file and the environment into a loose tree of values;
//! 2. [`compile`] walks that tree key by key into the typed, validated [`Config`], collecting one
//!    [`ConfigError`] per bad or unknown key instead of stopping at the first.
//!
//! Invariant: a [`Config`] value is always valid; the rest of the daemon never re-checks it.

pub mod acl;
pub mod auth;
pub mod condition;
pub(crate) mod fields;
pub mod rules;
mod source;
pub mod template;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::acl::{validate_pattern, Acl, AclRule};
use crate::config::auth::Passwords;
use crate::config::tls::Secret;

use fields::{Fields, Table};
use source::Toml;

/// `pipeline.when_full`: the policy itself is the stages' one outlet (`core::outlet`).
pub use crate::core::outlet::WhenFull;

pub use crate::config::rules::{RuleAction, RuleConfig};

/// The shipped default configuration (`config/edgegate.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../config/edgegate.toml");

/// One problem in the configuration, tied to the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// A single error under `key`.
    pub fn one(key: &str, message: String) -> ConfigErrors {
        ConfigErrors(vec![ConfigError {
            key: key.into(),
            message,
        }])
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} configuration error{}",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub broker: BrokerConfig,
    pub pipeline: PipelineConfig,
    pub queue: QueueConfig,
    pub upstream: UpstreamConfig,
    pub metrics: MetricsConfig,
    pub fleet: FleetConfig,
    pub rules: Vec<RuleConfig>,
    /// The file this configuration came from, if any (for reload and messages).
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Names this gateway in event `source` and the default upstream topic prefix.
    pub id: String,
    /// Directory of the queue database (`queue.db`).
    pub data_dir: PathBuf,
    /// Log filter (`info`, `info,edgegate::forwarder=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener for sensors. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener.
    pub listen_v5: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_payload_size: usize,
    /// Bytes of large packets (over [`crate::broker::guard::BUFFERED_FREE`]) the guard may
    /// hold half-read from clients at once; a client whose packet does not fit waits.
    pub max_buffered_bytes: usize,
    pub connection_timeout: Duration,
    /// Size of one segment of the router's in-memory log per subscription filter.
    pub segment_size: usize,
    /// Number of segments kept; `segment_size * segment_count` is how much the ingest link may
    /// fall behind before readings are skipped (and counted).
    pub segment_count: usize,
    /// Bytes rumqttd's per-filter logs may hold in all, as the guard mirrors them
    /// ([`crate::broker::fanout`]); beyond, local subscribers miss publishes (counted).
    pub max_fanout_bytes: usize,
    /// Optional TLS listener (MQTT 3.1.1 over TLS), terminated by the broker guard.
    pub tls_listen: Option<SocketAddr>,
    /// Server certificate chain and key for `tls_listen` (loaded and checked at compile time).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `broker.password_file`, parsed: users allowed with a password.
    pub passwords: Option<Arc<Passwords>>,
    pub password_file: Option<PathBuf>,
    /// CONNECT without credentials accepted? Default false; without a password file it must be
    /// set (the shipped config sets it for a first run).
    pub allow_anonymous: bool,
    pub max_client_id_length: usize,
    pub max_topic_length: usize,
    /// Distinct publish topics and subscription filters the broker will ever hold state for.
    pub max_topics: usize,
    /// Distinct client ids the broker will ever hold state for.
    pub max_client_ids: usize,
    /// Publishes per second per connection; excess is slowed down (TCP backpressure). 0: off.
    pub max_publish_rate: u32,
    /// `[[broker.acl]]`: per-user topic permissions; `None` = everything allowed.
    pub acl: Option<Arc<Acl>>,
    /// Retained messages rumqttd may hold, in all and per client (count, bytes); over them a
    /// retained publish is passed on without its retain flag.
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
    pub max_retained_per_client: usize,
    pub max_retained_bytes_per_client: usize,
    /// Open connections from one source address.
    pub max_connections_per_address: usize,
    /// Subscription filters one connection may hold at once.
    pub max_subscriptions_per_client: usize,
    /// Distinct subscription filters the broker will ever hold state for.
    pub max_filters: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Capacity of each channel between stages, in events.
    pub channel_capacity: usize,
    pub when_full: WhenFull,
    /// Bytes of payload in the pipeline at most, from the broker's hand-off until committed
    /// (see [`crate::budget`]); when reached, `when_full` decides.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Survives a process crash; a power cut may lose the last commits.
    Normal,
    /// Also survives power loss: one fsync per commit group.
    Full,
}

/// What the queue does when `max_events` or `max_bytes` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Evict the oldest telemetry (alerts only once no telemetry is left).
    DropOldest,
    /// Reject new telemetry; a new alert still evicts the oldest telemetry.
    DropNewest,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub sync: SyncMode,
    /// 0: unbounded.
    pub max_events: u64,
    /// Accounted bytes of queued events; 0: unbounded.
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub when_full: QueueFull,
    /// Keep acknowledged events this long for `queue replay`; zero: delete at once.
    pub keep_acked: Duration,
    /// Longest time the writer waits to grow a commit group after its first event.
    pub commit_delay: Duration,
    /// Largest number of events in one commit group.
    pub max_batch: usize,
    /// Free space the queue never takes from its file system.
    pub min_free: MinFree,
}

/// `queue.min_free`: bytes, or a share of the file system's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    Percent(u8),
}

impl MinFree {
    /// The reserve in bytes on a file system of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => total / 100 * p as u64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `None`: no upstream, events only queue.
    pub url: Option<UpstreamUrl>,
    pub topic_prefix: String,
    pub client_id: String,
    pub keep_alive: Duration,
    /// Events awaiting PUBACK at once (the bound on duplicates after a reconnect); in messages
    /// `inflight / batch_events`, kept below rumqttc's packet-id window.
    pub inflight: usize,
    /// No PUBACK for this long while publishes are in flight: the link is treated as dead.
    pub ack_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_packet_size: usize,
    /// Events per second at most (0: as fast as the upstream accepts).
    pub max_rate: u32,
    /// Telemetry events per upstream message at most (1: one event per message, on its own
    /// topic). Above 1, consecutive telemetry events go out together as a CloudEvents JSON batch
    /// (a JSON array of envelopes) on `batch_topic`; alerts always go alone.
    pub batch_events: usize,
    /// Bytes of envelopes per batch at most (an event larger than this goes as a batch of one).
    pub batch_bytes: usize,
    /// Topic of batches: `{topic_prefix}/batch` unless configured.
    pub batch_topic: String,
    pub protocol: UpstreamProtocol,
    /// MQTT user name upstream, with the password read from `password_file`.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS client configuration for `mqtts://` (CA file or system roots, optional client
    /// certificate); `None` for plain `mqtt://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For messages: which trust anchors and whether a client certificate is used.
    pub tls_summary: Option<String>,
    /// With `fleet.enabled`: the gateway's state topic; the forwarder then never publishes
    /// there or to a fleet document topic (`crate::core::reserved::reserved_topic`).
    pub fleet_state_topic: Option<String>,
}

/// MQTT version spoken upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5: PUBACK reason codes are checked (only a success deletes the event).
    V5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// `[fleet]`: rules documents pushed from the cloud broker (see `crate::app::fleet`).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Subscribe to rules documents upstream and report state (needs `upstream.url`).
    pub enabled: bool,
    /// Groups this gateway belongs to, in the order their documents combine.
    pub groups: Vec<String>,
    /// Topic prefix of a group's document, with `{group}` in it (`fleet/{group}`).
    pub group_prefix: String,
    /// ed25519 public keys; when any is set, only documents signed by one of them apply.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Largest document accepted, in bytes.
    pub max_document_size: usize,
    /// Client id of the fleet's own upstream connection.
    pub client_id: String,
    /// The state is published at least this often (and on every change).
    pub state_interval: Duration,
    /// A new document becomes the last good one once the gateway has run this long with it.
    pub confirm_after: Duration,
    /// Starts with an unconfirmed document, after which it is rolled back.
    pub rollback_after: u32,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `None`: no metrics endpoint.
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Built-in defaults: what `edgegate run` uses without a config file. They are the shipped
    /// `config/edgegate.toml`, compiled in, so the two can never disagree.
    pub fn defaults() -> Config {
        match Self::from_toml(DEFAULT_TOML, None) {
            Ok(c) => c,
            // The shipped file is checked by tests; a failure here is a build defect.
            Err(e) => panic!("built-in default configuration is invalid: {e}"),
        }
    }

    /// Compile TOML text (no environment overrides).
    pub fn from_toml(text: &str, source: Option<PathBuf>) -> Result<Config, ConfigErrors> {
        Self::from_layers(&[text], source)
    }

    /// Compile TOML texts, each layered over the ones before it.
    pub fn from_layers(texts: &[&str], source: Option<PathBuf>) -> Result<Config, ConfigErrors> {
        let texts: Vec<Toml<'_>> = texts.iter().map(|t| Toml::Text(t)).collect();
        let root =
            source::read(&texts, false).map_err(|message| ConfigErrors::one("toml", message))?;
        compile(&root, source)
    }

    /// Load `path` (TOML), apply `EDGEGATE__*` environment overrides, validate.
    /// With no path, the built-in defaults plus the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let file = match path {
            Some(p) if !p.exists() => {
                return Err(ConfigErrors::one(
                    "--config",
                    format!("file {} does not exist", p.display()),
                ))
            }
            Some(p) => Toml::File(p),
            None => Toml::Text(DEFAULT_TOML),
        };
        let root = source::read(&[file], true).map_err(|message| {
            let key = path.map_or_else(|| "environment".into(), |p| p.display().to_string());
            ConfigErrors::one(&key, message)
        })?;
        compile(&root, path.map(Path::to_path_buf))
    }

    /// Path of the queue database.
    pub fn queue_path(&self) -> PathBuf {
        self.gateway.data_dir.join("queue.db")
    }
}

/// Where the queue lives when `gateway.data_dir` is not set: `/var/lib/edgegate` for a
/// configuration installed under `/etc/edgegate` (the Debian package), `./data` otherwise.
fn default_data_dir(source: Option<&Path>) -> String {
    match source {
        Some(p) if p.starts_with("/etc/edgegate") => "/var/lib/edgegate".to_string(),
        _ => "./data".to_string(),
    }
}

fn default_gateway_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        })
        .unwrap_or_else(|| "edgegate".to_string())
}

/// Turn the merged value tree into a validated [`Config`], collecting every error.
pub fn compile(root: &config::Value, source: Option<PathBuf>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut top = Table::root(root, &mut errors);

    let mut g = top.section("gateway");
    let id = g.string("id", &default_gateway_id());
    if id.is_empty() || id.contains(['/', '+', '#', ' ']) {
        g.error(
            "id",
            "must be non-empty and contain no '/', '+', '#' or spaces",
        );
    }
    let gateway = GatewayConfig {
        id: id.clone(),
        data_dir: PathBuf::from(g.string("data_dir", &default_data_dir(source.as_deref()))),
        log_level: g.string("log_level", "info"),
    };
    if gateway.data_dir.as_os_str().is_empty() {
        g.error("data_dir", "must not be empty");
    }
    g.finish();

    let mut b = top.section("broker");
    let broker = BrokerConfig {
        listen: b.socket_addr("listen", "127.0.0.1:1883"),
        listen_v5: b.opt_socket_addr("listen_v5", ""),
        max_connections: b.usize_in("max_connections", 1000, 1, 1_000_000),
        max_payload_size: b.size_in("max_payload_size", 256 * 1024, 16, 256 * 1024 * 1024),
        max_buffered_bytes: b.size_in("max_buffered_bytes", 32 << 20, 64 << 10, 1 << 40),
        connection_timeout: b.duration_in(
            "connection_timeout",
            "5s",
            Duration::from_millis(100),
            Duration::from_secs(60),
        ),
        segment_size: b.size_in("segment_size", 128 * 1024, 1024, 1 << 30),
        segment_count: b.usize_in("segment_count", 8, 1, 1024),
        max_fanout_bytes: b.size_in("max_fanout_bytes", 64 << 20, 64 << 10, 1 << 40),
        tls_listen: b.opt_socket_addr("tls_listen", ""),
        tls: None,
        passwords: None,
        password_file: None,
        allow_anonymous: true,
        max_client_id_length: b.usize_in("max_client_id_length", 128, 1, 65535),
        max_topic_length: b.usize_in("max_topic_length", 512, 1, 65535),
        max_topics: b.usize_in("max_topics", 100_000, 1, 100_000_000),
        max_client_ids: b.usize_in("max_client_ids", 100_000, 1, 100_000_000),
        max_publish_rate: b.usize_in("max_publish_rate", 0, 0, 10_000_000) as u32,
        acl: None,
        max_retained_messages: b.usize_in("max_retained_messages", 1000, 0, 10_000_000),
        max_retained_bytes: b.size_in("max_retained_bytes", 16 << 20, 0, 1 << 40),
        max_retained_per_client: b.usize_in("max_retained_per_client", 100, 0, 10_000_000),
        max_retained_bytes_per_client: b.size_in(
            "max_retained_bytes_per_client",
            1 << 20,
            0,
            1 << 40,
        ),
        max_connections_per_address: b.usize_in("max_connections_per_address", 100, 1, 1_000_000),
        max_subscriptions_per_client: b.usize_in("max_subscriptions_per_client", 100, 1, 1_000_000),
        max_filters: b.usize_in("max_filters", 1000, 1, 10_000_000),
    };
    let mut broker = broker;
    let cert = b.string("tls_cert_file", "");
    let key = b.string("tls_key_file", "");
    match (broker.tls_listen.is_some(), cert.trim(), key.trim()) {
        (false, "", "") => {}
        (false, _, _) => b.error(
            "tls_listen",
            "tls_cert_file/tls_key_file are set but tls_listen is empty",
        ),
        (true, "", _) => b.error("tls_cert_file", "required when broker.tls_listen is set"),
        (true, _, "") => b.error("tls_key_file", "required when broker.tls_listen is set"),
        (true, c, k) => match crate::config::tls::server_config(Path::new(c), Path::new(k)) {
            Ok(t) => broker.tls = Some(t),
            Err(e) => b.error("tls_cert_file", &e),
        },
    }
    let pw = b.string("password_file", "");
    if !pw.trim().is_empty() {
        let path = PathBuf::from(pw.trim());
        match Passwords::load(&path) {
            Ok(p) => broker.passwords = Some(Arc::new(p)),
            Err(e) => b.error("password_file", &e),
        }
        broker.password_file = Some(path);
    }
    // Anonymous access only when explicitly enabled (the shipped config does, for a first run).
    broker.allow_anonymous = b.opt_bool("allow_anonymous").unwrap_or(false);
    if !broker.allow_anonymous && broker.password_file.is_none() {
        b.error(
            "allow_anonymous",
            "is false (the default) and there is no broker.password_file: no sensor could connect; \
             set allow_anonymous = true or a password_file",
        );
    }
    if let Some(items) = b.array("acl") {
        let mut rules = Vec::new();
        for (i, v) in items.iter().enumerate() {
            let mut e = b.element("acl", i, v);
            let user = e.string("user", "*");
            let publish = e.string_list("publish");
            let subscribe = e.string_list("subscribe");
            for (k, list) in [("publish", &publish), ("subscribe", &subscribe)] {
                for p in list {
                    if let Err(m) = validate_pattern(p) {
                        e.error(k, &m);
                    }
                }
            }
            let names_users = user != "*"
                || publish
                    .iter()
                    .chain(&subscribe)
                    .any(|p| p.contains("{username}"));
            if names_users && broker.password_file.is_none() {
                e.error(
                    "user",
                    "user names are only verified with broker.password_file: set it to use per-user ACLs",
                );
            }
            e.finish();
            rules.push(AclRule {
                user,
                publish,
                subscribe,
            });
        }
        broker.acl = Some(Arc::new(Acl { rules }));
    }
    if broker.max_connections < 2 {
        b.error(
            "max_connections",
            "must be at least 2 (one is the gateway's own liveness probe)",
        );
    }
    b.finish();

    let mut p = top.section("pipeline");
    let pipeline = PipelineConfig {
        channel_capacity: p.usize_in("channel_capacity", 4096, 1, 10_000_000),
        when_full: p.choice(
            "when_full",
            "block",
            &[
                ("block", WhenFull::Block),
                ("drop_newest", WhenFull::DropNewest),
            ],
        ),
        max_bytes: p.size_in("max_bytes", 16 << 20, 64 << 10, 1 << 40),
    };
    p.finish();

    let mut q = top.section("queue");
    let queue = QueueConfig {
        sync: q.choice(
            "sync",
            "normal",
            &[("normal", SyncMode::Normal), ("full", SyncMode::Full)],
        ),
        max_events: q.usize_in("max_events", 0, 0, usize::MAX) as u64,
        max_bytes: q.size_in("max_bytes", 1 << 30, 0, usize::MAX) as u64,
        max_age: Some(q.duration_in(
            "max_age",
            "0s",
            Duration::ZERO,
            Duration::from_secs(10 * 365 * 86400),
        ))
        .filter(|d| !d.is_zero()),
        when_full: q.choice(
            "when_full",
            "drop_oldest",
            &[
                ("drop_oldest", QueueFull::DropOldest),
                ("drop_newest", QueueFull::DropNewest),
            ],
        ),
        keep_acked: q.duration_in(
            "keep_acked",
            "0s",
            Duration::ZERO,
            Duration::from_secs(365 * 86400),
        ),
        commit_delay: q.duration_in(
            "commit_delay",
            "50ms",
            Duration::ZERO,
            Duration::from_secs(1),
        ),
        max_batch: q.usize_in("max_batch", 1024, 1, 100_000),
        min_free: q.min_free("min_free", "256MiB"),
    };
    q.finish();

    let mut u = top.section("upstream");
    let url_text = u.string("url", "");
    let url = if url_text.trim().is_empty() {
        None
    } else {
        match parse_upstream_url(&url_text) {
            Ok(url) => Some(url),
            Err(msg) => {
                u.error("url", &msg);
                None
            }
        }
    };
    let upstream = UpstreamConfig {
        url,
        topic_prefix: u
            .string("topic_prefix", &format!("edge/{id}"))
            .trim_end_matches('/')
            .to_string(),
        client_id: u.string("client_id", &format!("edgegate-{id}")),
        keep_alive: u.duration_in(
            "keep_alive",
            "30s",
            Duration::from_secs(5),
            Duration::from_secs(3600),
        ),
        inflight: u.usize_in("inflight", 128, 1, 65_000),
        ack_timeout: u.duration_in(
            "ack_timeout",
            "15s",
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
        reconnect_min: u.duration_in(
            "reconnect_min",
            "250ms",
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        reconnect_max: u.duration_in(
            "reconnect_max",
            "30s",
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        max_packet_size: u.size_in("max_packet_size", 1024 * 1024, 1024, 256 * 1024 * 1024),
        max_rate: u.usize_in("max_rate", 0, 0, 10_000_000) as u32,
        batch_events: u.usize_in("batch_events", 1, 1, 10_000),
        batch_bytes: u.size_in("batch_bytes", 64 * 1024, 256, 256 * 1024 * 1024),
        batch_topic: String::new(),
        protocol: u.choice(
            "protocol",
            "3.1.1",
            &[("3.1.1", UpstreamProtocol::V4), ("5", UpstreamProtocol::V5)],
        ),
        username: None,
        password: None,
        tls: None,
        tls_summary: None,
        fleet_state_topic: None,
    };
    let mut upstream = upstream;
    upstream.batch_topic = u.string("batch_topic", &format!("{}/batch", upstream.topic_prefix));
    if upstream.batch_topic.is_empty() || upstream.batch_topic.contains(['+', '#']) {
        u.error("batch_topic", "must be a topic name without wildcards");
    }
    // Array brackets, commas, and the packet's own header and topic must fit too.
    if upstream.batch_events > 1
        && upstream.batch_bytes + upstream.batch_topic.len() + 64 > upstream.max_packet_size
    {
        u.error(
            "batch_bytes",
            &format!(
                "a batch of {} bytes does not fit in upstream.max_packet_size ({} bytes)",
                upstream.batch_bytes, upstream.max_packet_size
            ),
        );
    }
    let user = u.string("username", "");
    let pw_file = u.string("password_file", "");
    if !user.is_empty() {
        upstream.username = Some(user);
    }
    if !pw_file.trim().is_empty() {
        if upstream.username.is_none() {
            u.error("password_file", "set upstream.username too");
        }
        match std::fs::read_to_string(pw_file.trim()) {
            Ok(t) => {
                upstream.password = Some(Secret::new(t.trim_end_matches(['\n', '\r']).to_string()))
            }
            Err(e) => u.error("password_file", &format!("{}: {e}", pw_file.trim())),
        }
    }
    let ca = u.string("ca_file", "");
    let cert = u.string("cert_file", "");
    let key = u.string("key_file", "");
    let (ca, cert, key) = (ca.trim(), cert.trim(), key.trim());
    let tls_url = upstream.url.as_ref().map(|x| x.tls);
    if tls_url != Some(true) && !(ca.is_empty() && cert.is_empty() && key.is_empty()) {
        u.error(
            "url",
            "upstream.ca_file/cert_file/key_file need an mqtts:// url",
        );
    } else if tls_url == Some(true) {
        let client = match (cert, key) {
            ("", "") => Ok(None),
            ("", _) => Err(("cert_file", "required with upstream.key_file".to_string())),
            (_, "") => Err(("key_file", "required with upstream.cert_file".to_string())),
            (c, k) => Ok(Some((Path::new(c), Path::new(k)))),
        };
        match client {
            Err((k, m)) => u.error(k, &m),
            Ok(client) => {
                let ca_path = (!ca.is_empty()).then(|| Path::new(ca));
                // Check each file on its own first, so the error names the right key.
                let mut file_ok = true;
                if let Some(p) = ca_path {
                    if let Err(e) = crate::config::tls::certs(p) {
                        u.error("ca_file", &e);
                        file_ok = false;
                    }
                }
                if let Some((c, k)) = client {
                    if let Err(e) = crate::config::tls::certs(c) {
                        u.error("cert_file", &e);
                        file_ok = false;
                    }
                    if let Err(e) = crate::config::tls::key(k) {
                        u.error("key_file", &e);
                        file_ok = false;
                    }
                }
                match crate::config::tls::client_config(ca_path, client).filter_ok(file_ok) {
                    Ok(t) => {
                        upstream.tls = Some(t);
                        upstream.tls_summary = Some(format!(
                            "TLS ({}{})",
                            if ca.is_empty() {
                                "system trust store".to_string()
                            } else {
                                format!("CA {ca}")
                            },
                            if client.is_some() {
                                ", client certificate"
                            } else {
                                ""
                            }
                        ));
                    }
                    Err(Some(e)) => u.error(
                        if client.is_some() {
                            "cert_file"
                        } else if ca.is_empty() {
                            "url"
                        } else {
                            "ca_file"
                        },
                        &e,
                    ),
                    Err(None) => {}
                }
            }
        }
    }
    if upstream.reconnect_min > upstream.reconnect_max {
        u.error("reconnect_min", "must not exceed upstream.reconnect_max");
    }
    if upstream.client_id.is_empty() {
        u.error("client_id", "must not be empty");
    }
    if upstream.topic_prefix.contains(['+', '#']) {
        u.error("topic_prefix", "must not contain MQTT wildcards '+' or '#'");
    }
    u.finish();

    let mut m = top.section("metrics");
    let metrics = MetricsConfig {
        listen: m.opt_socket_addr("listen", "127.0.0.1:9883"),
    };
    m.finish();

    let fleet = compile_fleet(&mut top, &upstream);
    let mut upstream = upstream;
    if fleet.enabled {
        upstream.fleet_state_topic =
            Some(crate::core::reserved::state_topic(&upstream.topic_prefix));
    }

    let rules = crate::config::rules::compile(&mut top);
    top.finish();

    if errors.is_empty() {
        Ok(Config {
            gateway,
            broker,
            pipeline,
            queue,
            upstream,
            metrics,
            fleet,
            rules,
            source,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// `[fleet]`, checked against `[upstream]`.
fn compile_fleet(top: &mut Table<'_, '_>, upstream: &UpstreamConfig) -> FleetConfig {
    use base64::Engine as _;
    let mut f = top.section("fleet");
    let enabled = f.opt_bool("enabled").unwrap_or(false);
    let groups = if f.get("groups").is_some() {
        f.string_list("groups")
    } else {
        vec!["all".to_string()]
    };
    let mut seen = std::collections::HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        if g.is_empty() || g.contains(['+', '#', '/', ' ']) || g.chars().any(char::is_control) {
            f.error(
                &format!("groups[{i}]"),
                "a group name must be non-empty, without '/', '+', '#', spaces or control characters",
            );
        } else if !seen.insert(g.as_str()) {
            f.error(
                &format!("groups[{i}]"),
                &format!("group {g:?} is listed twice"),
            );
        }
    }
    let group_prefix = f
        .string("group_prefix", "fleet/{group}")
        .trim_end_matches('/')
        .to_string();
    if !group_prefix.contains("{group}") {
        f.error("group_prefix", "must contain {group}");
    } else if group_prefix.contains(['+', '#']) || group_prefix.starts_with('/') {
        f.error(
            "group_prefix",
            "must be a topic without wildcards and without a leading '/'",
        );
    }
    let mut trusted_keys = Vec::new();
    for (i, k) in f.string_list("trusted_keys").iter().enumerate() {
        match base64::engine::general_purpose::STANDARD
            .decode(k.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        {
            Some(key) => trusted_keys.push(key),
            None => f.error(
                &format!("trusted_keys[{i}]"),
                "expected an ed25519 public key: 32 bytes in base64 (`edgegate fleet keygen` prints one)",
            ),
        }
    }
    let fleet = FleetConfig {
        enabled,
        groups,
        group_prefix,
        trusted_keys,
        max_document_size: f.size_in("max_document_size", 256 * 1024, 1024, 16 * 1024 * 1024),
        client_id: f.string("client_id", &format!("{}-fleet", upstream.client_id)),
        state_interval: f.duration_in(
            "state_interval",
            "60s",
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
        confirm_after: f.duration_in(
            "confirm_after",
            "60s",
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        ),
        rollback_after: f.usize_in("rollback_after", 3, 1, 100) as u32,
    };
    if fleet.enabled && upstream.url.is_none() {
        f.error(
            "enabled",
            "the fleet needs upstream.url (its documents come from there)",
        );
    }
    if fleet.client_id.is_empty() {
        f.error("client_id", "must not be empty");
    } else if fleet.client_id == upstream.client_id {
        f.error(
            "client_id",
            "must differ from upstream.client_id (the broker would close one connection for the other)",
        );
    }
    f.finish();
    fleet
}

/// A result whose error was already reported key by key (`Err(None)`).
trait FilterOk<T> {
    fn filter_ok(self, ok: bool) -> Result<T, Option<String>>;
}

impl<T> FilterOk<T> for Result<T, String> {
    fn filter_ok(self, ok: bool) -> Result<T, Option<String>> {
        match self {
            _ if !ok => Err(None),
            Ok(v) => Ok(v),
            Err(e) => Err(Some(e)),
        }
    }
}

/// `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
pub fn parse_upstream_url(text: &str) -> Result<UpstreamUrl, String> {
    let (tls, rest) = if let Some(r) = text.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!("{text:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "{text:?} must be mqtt[s]://host[:port] (credentials go in their own keys)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        // [ipv6]:port
        let (h, after) = h
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{text:?}: bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{text:?}: unexpected {after:?}")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("{text:?}: bad port {p:?}"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(format!("{text:?} needs a host and a non-zero port"));
    }
    Ok(UpstreamUrl { tls, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of `keys` has an error.
    fn assert_keys(err: &ConfigErrors, keys: &[&str]) {
        let got: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        for k in keys {
            assert!(got.contains(k), "missing {k} in {got:?}");
        }
    }

    /// `text` over a base that enables anonymous access (the only key a sensor-less snippet
    /// would otherwise have to repeat), like the shipped file does.
    fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        from_toml_at(text, None)
    }

    fn from_toml_at(text: &str, source: Option<PathBuf>) -> Result<Config, ConfigErrors> {
        Config::from_layers(&["[broker]\nallow_anonymous = true\n", text], source)
    }

    #[test]
    fn anonymous_access_only_when_enabled() {
        let err = Config::from_toml("", None).unwrap_err();
        assert_eq!(err.0[0].key, "broker.allow_anonymous");
        assert!(
            Config::defaults().broker.allow_anonymous,
            "the shipped file enables it"
        );
    }

    /// One source for the defaults: every value the shipped config/edgegate.toml sets equals
    /// what the code uses when the key is left out, section by section, except the values
    /// the shipped file sets on purpose (listed).
    #[test]
    fn the_shipped_file_sets_every_value_to_the_codes_default() {
        let shipped = Config::defaults();
        let code = from_toml("").unwrap();
        let show = |c: &Config| -> Vec<String> {
            let mut c = c.clone();
            // On purpose: anonymous sensors for a first run (the code refuses to start without
            // either it or a password file; `from_toml` here layers it in), the example rules.
            c.broker.allow_anonymous = false;
            c.rules.clear();
            format!("{c:#?}").lines().map(str::to_string).collect()
        };
        let (a, b) = (show(&shipped), show(&code));
        let differ: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).collect();
        assert!(
            differ.is_empty() && a.len() == b.len(),
            "shipped vs code: {differ:#?}"
        );
        assert!(
            shipped.broker.allow_anonymous,
            "the shipped file enables it"
        );
        // `[rules_engine]` as shipped, as compiled without it, and EngineSettings::default().
        assert_eq!(shipped.rules[0].settings, rules::EngineSettings::default());
        assert_eq!(code.rules[0].settings, rules::EngineSettings::default());
    }

    #[test]
    fn defaults_are_valid_and_sensible() {
        let c = Config::defaults();
        assert_eq!(c.broker.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.gateway.data_dir, PathBuf::from("./data"));
        assert!(c.upstream.url.is_none());
        assert_eq!(c.upstream.topic_prefix, format!("edge/{}", c.gateway.id));
        assert_eq!(
            c.rules.len(),
            1,
            "the shipped rules: forward sensors/# with detectors"
        );
        assert_eq!(c.rules[0].filter, "sensors/#");
    }

    #[test]
    fn broker_limits_are_validated_and_default_as_shipped() {
        let err = from_toml(
            r#"
            [broker]
            max_connections_per_address = 0
            max_subscriptions_per_client = -1
            max_filters = "many"
            max_retained_bytes = "lots"
            max_retained_messages = 1.5
            "#,
        )
        .unwrap_err();
        assert_keys(
            &err,
            &[
                "broker.max_connections_per_address",
                "broker.max_subscriptions_per_client",
                "broker.max_filters",
                "broker.max_retained_bytes",
                "broker.max_retained_messages",
            ],
        );
        // The shipped file and the code agree.
        for b in [Config::defaults().broker, from_toml("").unwrap().broker] {
            assert_eq!(
                (
                    b.max_connections_per_address,
                    b.max_subscriptions_per_client,
                    b.max_filters,
                    b.max_retained_messages,
                    b.max_retained_bytes,
                    b.max_retained_per_client,
                    b.max_retained_bytes_per_client,
                ),
                (100, 100, 1000, 1000, 16 << 20, 100, 1 << 20)
            );
        }
        let c = from_toml("[broker]\nmax_retained_messages = 0\nmax_retained_bytes = \"1MiB\"\n")
            .unwrap();
        assert_eq!(
            (c.broker.max_retained_messages, c.broker.max_retained_bytes),
            (0, 1 << 20)
        );
    }

    #[test]
    fn fleet_settings_are_validated_and_default_as_shipped() {
        let err = from_toml(
            r#"
            [upstream]
            client_id = "same"
            [fleet]
            enabled = true
            groups = ["north", "a/b", "north", ""]
            group_prefix = "fleet/+"
            trusted_keys = ["not a key", "AAAA"]
            max_document_size = "1GiB"
            client_id = "same"
            state_interval = "0s"
            confirm_after = "soon"
            rollback_after = 0
            typo = 1
            "#,
        )
        .unwrap_err();
        assert_keys(
            &err,
            &[
                "fleet.enabled",
                "fleet.groups[1]",
                "fleet.groups[2]",
                "fleet.groups[3]",
                "fleet.group_prefix",
                "fleet.trusted_keys[0]",
                "fleet.trusted_keys[1]",
                "fleet.max_document_size",
                "fleet.client_id",
                "fleet.state_interval",
                "fleet.confirm_after",
                "fleet.rollback_after",
                "fleet.typo",
            ],
        );
        // The shipped file and the code agree.
        for f in [Config::defaults().fleet, from_toml("").unwrap().fleet] {
            assert_eq!(
                (
                    f.enabled,
                    f.groups,
                    f.group_prefix,
                    f.trusted_keys.len(),
                    f.max_document_size,
                    f.state_interval,
                    f.confirm_after,
                    f.rollback_after,
                ),
                (
                    false,
                    vec!["all".to_string()],
                    "fleet/{group}".to_string(),
                    0,
                    256 * 1024,
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                    3
                )
            );
            assert!(f.client_id.ends_with("-fleet"));
        }
        let c = from_toml(
            "[upstream]\nurl = \"mqtt://h\"\n[fleet]\nenabled = true\ntrusted_keys = [\"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\"]\n",
        )
        .unwrap();
        assert_eq!(c.fleet.trusted_keys[0][0], 1);
        assert_eq!(
            c.upstream.fleet_state_topic.as_deref(),
            Some(format!("edge/{}/state", c.gateway.id).as_str())
        );
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let err = from_toml(
            r#"
            [gateway]
            id = "a/b"
            colour = "blue"
            [broker]
            listen = "nowhere"
            password_file = "/nonexistent/passwd"
            [queue]
            sync = "sometimes"
            [upstream]
            url = "http://x"
            ack_timeout = "soon"
            [[rules]]
            name = "r"
            match = "a/#/b"
            "#,
        )
        .unwrap_err();
        assert_keys(
            &err,
            &[
                "gateway.id",
                "gateway.colour",
                "broker.listen",
                "broker.password_file",
                "queue.sync",
                "upstream.url",
                "upstream.ack_timeout",
                "rules[0].match",
            ],
        );
    }

    #[test]
    fn queue_min_free_is_a_size_or_a_percentage() {
        let q = |v: &str| from_toml(&format!("[queue]\nmin_free = {v}")).map(|c| c.queue.min_free);
        assert_eq!(Config::defaults().queue.min_free, MinFree::Bytes(256 << 20));
        assert_eq!(q("\"5%\"").unwrap(), MinFree::Percent(5));
        assert_eq!(q("\"64MiB\"").unwrap(), MinFree::Bytes(64 << 20));
        assert_eq!(q("0").unwrap(), MinFree::Bytes(0));
        assert_eq!(MinFree::Percent(10).bytes(1000), 100);
        for bad in ["\"95%\"", "\"lots\"", "\"-3%\"", "true"] {
            assert_keys(&q(bad).unwrap_err(), &["queue.min_free"]);
        }
    }

    #[test]
    fn data_dir_follows_where_the_config_is_installed() {
        assert_eq!(
            from_toml_at("", Some("/etc/edgegate/edgegate.toml".into()))
                .unwrap()
                .gateway
                .data_dir,
            PathBuf::from("/var/lib/edgegate")
        );
        assert_eq!(
            from_toml_at("", Some("/home/me/e.toml".into()))
                .unwrap()
                .gateway
                .data_dir,
            PathBuf::from("./data")
        );
        let explicit = "[gateway]\ndata_dir = \"/srv/q\"";
        assert_eq!(
            from_toml_at(explicit, Some("/etc/edgegate/edgegate.toml".into()))
                .unwrap()
                .gateway
                .data_dir,
            PathBuf::from("/srv/q")
        );
    }

    #[test]
    fn acl_entries_are_checked_with_their_keys() {
        let err = from_toml(
            r#"
            [[broker.acl]]
            user = "ops"
            subscribe = ["a/#/b"]
            [[broker.acl]]
            publish = ["x/{client_id}/#", 3]
            "#,
        )
        .unwrap_err();
        assert_keys(
            &err,
            &[
                "broker.acl[0].user",
                "broker.acl[0].subscribe",
                "broker.acl[1].publish[1]",
            ],
        );
        let c = from_toml("[[broker.acl]]\npublish = \"sensors/{client_id}/#\"\n").unwrap();
        let acl = c.broker.acl.unwrap();
        assert!(acl.for_client(None, "d1").may_publish("sensors/d1/t"));
        assert!(Config::defaults().broker.acl.is_none());
    }

    #[test]
    fn upstream_tls_and_secret_files_are_checked_under_their_keys() {
        let err = from_toml(
            r#"
            [upstream]
            url = "mqtts://h"
            ca_file = "/nonexistent/ca.pem"
            cert_file = "/nonexistent/c.pem"
            key_file = "/nonexistent/c.key"
            password_file = "/nonexistent/pw"
            "#,
        )
        .unwrap_err();
        assert_keys(
            &err,
            &[
                "upstream.ca_file",
                "upstream.cert_file",
                "upstream.key_file",
                "upstream.password_file",
            ],
        );
        let err = from_toml("[upstream]\nurl = \"mqtt://h\"\nca_file = \"x\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "upstream.url");
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream_url("mqtt://h").unwrap(),
            UpstreamUrl {
                tls: false,
                host: "h".into(),
                port: 1883
            }
        );
        assert_eq!(
            parse_upstream_url("mqtts://h:1").unwrap(),
            UpstreamUrl {
                tls: true,
                host: "h".into(),
                port: 1
            }
        );
        assert_eq!(parse_upstream_url("mqtt://[::1]:2").unwrap().host, "::1");
        assert!(parse_upstream_url("mqtt://u:p@h").is_err());
        assert!(parse_upstream_url("tcp://h").is_err());
        assert!(parse_upstream_url("mqtt://h:x").is_err());
    }

    #[test]
    fn sizes_and_durations_accept_units() {
        let c = from_toml(
            "[broker]\nmax_payload_size = \"64KiB\"\n[upstream]\nack_timeout = \"1m 30s\"",
        )
        .unwrap();
        assert_eq!(c.broker.max_payload_size, 64 * 1024);
        assert_eq!(c.upstream.ack_timeout, Duration::from_secs(90));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// The loader never panics: any text gives a Config or keyed errors (also fuzzed with
        /// `cargo fuzz run config`).
        #[test]
        fn any_text_loads_or_reports(text in r#"[\[\]a-z_=". \n0-9#{}:,]{0,120}"#) {
            if let Err(e) = from_toml(&text) {
                proptest::prop_assert!(!e.0.is_empty());
            }
        }
    }
}
