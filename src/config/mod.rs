//! Configuration: TOML file plus `EDGEGATE__SECTION__KEY` environment overrides.
//!
//! Loading goes in two steps, so that every problem is reported at once:
//! 1. the `config` crate merges the file and the environment into a loose tree of values;
//! 2. [`compile`] walks that tree key by key into the typed, validated [`Config`], collecting one
//!    [`ConfigError`] per bad or unknown key instead of stopping at the first.
//!
//! Invariant: a [`Config`] value is always valid; the rest of the daemon never re-checks it.
//!
//! Files: this one holds the typed configuration and the loaders; `compile.rs` the walk
//! (one error collector, sections in a fixed order) and the small sections; `broker.rs`,
//! `upstream.rs` and `fleet.rs` their sections; `fields.rs` the typed key readers; the rules
//! engine's section is `rules.rs`.

pub mod acl;
pub mod auth;
mod broker;
mod compile;
pub mod condition;
pub(crate) mod fields;
mod fleet;
pub mod rules;
mod source;
pub mod template;
pub mod tls;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::acl::Acl;
use crate::config::auth::Passwords;
use crate::config::tls::Secret;

use source::Toml;

/// `pipeline.when_full`: the policy itself is the stages' one outlet (`core::outlet`).
pub use crate::core::outlet::WhenFull;

pub use crate::config::rules::{RuleAction, RuleConfig};
pub use compile::compile;
pub use upstream::{parse_upstream_url, UrlError};

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
    /// MQTT 5 topic aliases one client may set (its CONNACK's Topic Alias Maximum).
    pub max_topic_aliases: u16,
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
    /// (see [`crate::core::budget`]); when reached, `when_full` decides.
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
            source::read(&texts, false).map_err(|e| ConfigErrors::one("toml", e.to_string()))?;
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
        let root = source::read(&[file], true).map_err(|e| {
            let key = path.map_or_else(|| "environment".into(), |p| p.display().to_string());
            ConfigErrors::one(&key, e.to_string())
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
    fn the_outliers_histogram_feature_is_a_switch() {
        let hist = |v: &str| {
            from_toml(&format!(
                "[[rules]]\nname = \"r\"\nmatch = \"s/#\"\nactions = [{{ type = \"detect\", detector = \"outlier\"{v} }}]"
            ))
            .map(|c| match &c.rules[0].actions[..] {
                [rules::ActionConfig::Detect(d)] => match &d.detector {
                    rules::DetectorConfig::Outlier(s) => s.histogram,
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
        };
        assert!(hist("").unwrap());
        assert!(!hist(", histogram = false").unwrap());
        let err = hist(", histogram = 3").unwrap_err();
        assert!(
            err.0.iter().any(|e| e.key.ends_with("histogram")),
            "{err:?}"
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
