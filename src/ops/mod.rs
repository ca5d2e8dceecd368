//! Operations around the pipeline: metrics and health endpoint, logging, systemd integration.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod status;
pub mod supervisor;
pub mod systemd;
