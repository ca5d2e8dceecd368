//! [`compile`]: the merged value tree to a validated [`Config`], one section at a time.
//!
//! Invariants:
//! - One error collector for the whole tree: every section adds its errors (each with its
//!   full key) to it, and [`compile`] returns them all or a `Config`, never both.
//! - Sections are compiled in a fixed order (gateway, broker, pipeline, queue, upstream,
//!   metrics, fleet, rules engine), which is the order `check-config` lists errors in; a
//!   section that depends on another (upstream on the gateway id, fleet on upstream) comes
//!   after it.

use std::path::PathBuf;
use std::time::Duration;

use super::fields::{Fields, Table};
use super::{
    default_data_dir, default_gateway_id, Config, ConfigErrors, GatewayConfig, MetricsConfig,
    PipelineConfig, QueueConfig, QueueFull, SyncMode, WhenFull,
};

/// Turn the merged value tree into a validated [`Config`], collecting every error.
pub fn compile(root: &config::Value, source: Option<PathBuf>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut top = Table::root(root, &mut errors);

    let gateway = gateway(&mut top, source.as_deref());
    let broker = super::broker::broker(&mut top);
    let pipeline = pipeline(&mut top);
    let queue = queue(&mut top);
    let upstream = super::upstream::upstream(&mut top, &gateway.id);
    let metrics = metrics(&mut top);

    let fleet = super::fleet::fleet(&mut top, &upstream);
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

/// `[gateway]`.
fn gateway(top: &mut Table<'_, '_>, source: Option<&std::path::Path>) -> GatewayConfig {
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
        data_dir: PathBuf::from(g.string("data_dir", &default_data_dir(source))),
        log_level: g.string("log_level", "info"),
    };
    if gateway.data_dir.as_os_str().is_empty() {
        g.error("data_dir", "must not be empty");
    }
    g.finish();
    gateway
}

/// `[pipeline]`.
fn pipeline(top: &mut Table<'_, '_>) -> PipelineConfig {
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
    pipeline
}

/// `[queue]`.
fn queue(top: &mut Table<'_, '_>) -> QueueConfig {
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
            "80ms",
            Duration::ZERO,
            Duration::from_secs(1),
        ),
        max_batch: q.usize_in("max_batch", 1024, 1, 100_000),
        min_free: q.min_free("min_free", "256MiB"),
    };
    q.finish();
    queue
}

/// `[metrics]`.
fn metrics(top: &mut Table<'_, '_>) -> MetricsConfig {
    let mut m = top.section("metrics");
    let metrics = MetricsConfig {
        listen: m.opt_socket_addr("listen", "127.0.0.1:9883"),
    };
    m.finish();
    metrics
}
