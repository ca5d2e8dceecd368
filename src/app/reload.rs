//! SIGHUP: re-read the configuration and reload the rules. Layer: app (it combines the local
//! rules with the fleet's documents, sets the log level and tells systemd; the rules stage
//! only receives the validated result through its [`RulesHandle`]).
//!
//! Invariant: an invalid configuration changes nothing that runs: every error is logged with
//! its key and noted for the status page, and the running rules are kept.

use std::sync::Arc;

use crate::app::fleet::RuleSources;
use crate::app::{logging, systemd};
use crate::core::metrics::Metrics;
use crate::rules::stage::RulesHandle;

/// Reload the rules on every SIGHUP: re-read the configuration (`path`, plus the environment)
/// and apply its rules as the local part of `sources`; if it is invalid, log every error with
/// its key, count the failure and keep the running rules.
pub async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: Option<std::path::PathBuf>,
    handle: RulesHandle,
    metrics: Arc<Metrics>,
    sources: RuleSources,
) {
    while hup.recv().await.is_some() {
        systemd::reloading();
        tracing::info!("SIGHUP: reloading rules");
        match crate::config::Config::load(path.as_deref()) {
            Err(errors) => {
                metrics.rules.reload_failures.inc();
                for e in &errors.0 {
                    tracing::error!(key = %e.key, error = %e.message, "invalid configuration");
                }
                handle.log_reload(
                    errors
                        .0
                        .iter()
                        .map(|e| (e.key.to_string(), e.message.to_string()))
                        .collect(),
                    Vec::new(),
                );
                tracing::error!("{errors}; the running rules are kept");
                systemd::ready("reload rejected: invalid configuration, running rules kept");
            }
            Ok(config) => {
                if let Err(e) = logging::set_level(&config.gateway.log_level) {
                    tracing::warn!(error = %e, "gateway.log_level not applied");
                }
                // Combined with the fleet's documents (crate::app::fleet): local rules first.
                match sources.reload_local(&handle, config.rules).await {
                    Some(kept) => {
                        tracing::info!(kept_state = ?kept, "rules reload applied");
                        handle.log_reload(Vec::new(), kept.clone());
                        systemd::ready("rules reloaded");
                    }
                    None => return,
                }
            }
        }
    }
}
