//! The application: one running gateway, wired from the stages. Layer: above the stages
//! (broker, rules, queue, forwarder), below the commands; it may import every layer below it,
//! never `crate::commands`.
//!
//! - [`gateway`]: startup and shutdown order, the data-dir lock;
//! - [`supervisor`], [`status`]: liveness of the stages, `/healthz`, the systemd watchdog;
//! - [`reload`]: SIGHUP re-reads the configuration and reloads the rules;
//! - [`http`], [`web`]: `/metrics`, `/healthz`, the status page and its API;
//! - [`logging`], [`systemd`]: journald/stderr and sd_notify;
//! - [`fleet`]: rules documents from the cloud broker, combined with the local rules;
//! - [`allocator`]: the allocator setting that keeps large payloads from growing the RSS.

pub mod allocator;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod reload;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod web;
