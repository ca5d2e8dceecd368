//! Operations around the pipeline: metrics, the HTTP listener (metrics, health, status page),
//! logging, systemd integration.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod web;
