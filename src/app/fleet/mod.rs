//! Fleet rules: rules documents pushed from the cloud broker to many gateways, safely.
//!
//! Each gateway with `fleet.enabled` holds its own upstream connection ([`agent`], client id
//! `fleet.client_id`, beside the forwarder's), subscribes QoS 1 to its documents — the
//! gateway's `{upstream.topic_prefix}/config/rules` and `{group_prefix}/config/rules` of each of
//! `fleet.groups` — and reports on `{upstream.topic_prefix}/state` (retained JSON, a will for
//! offline). The contract for the cloud side is in the README ("Fleet rules").
//!
//! Invariants:
//! - A document is applied only after it passed every check ([`document::check`]: size, UTF-8,
//!   signature when `fleet.trusted_keys` is set, the rules as `check-config` checks a
//!   `rules_engine.dir` file) and was written to the data directory ([`store`]); otherwise it is
//!   refused, reported with its keys, and the rules in force stay as they are.
//! - Rules reach the rules stage only through [`RuleSources`], which holds every source (local
//!   configuration, groups, the gateway's own document) and sends their combination through
//!   the same reload as SIGHUP (rules whose configuration did not change keep their state).
//!   Combination order: local rules, then each group's document in the order of
//!   `fleet.groups`, then the gateway's document; a rule whose name an earlier source used
//!   replaces that rule in its place (so a gateway can override a group's rule), new names are
//!   appended.
//! - Only the latest document per topic matters: documents waiting while one is applied are
//!   coalesced, so a flood costs at most one apply per topic per round.
//! - The fleet's connection is its own: an oversized or hostile document can end that
//!   connection, never the forwarder's (telemetry keeps flowing).
//! - With the fleet on, the forwarder never publishes to the gateway's state topic or to any
//!   `.../config/rules` topic ([`crate::core::reserved::reserved_topic`]): a sensor cannot reach them through a
//!   forwarding rule.
//!
//! Layer: app. The topics it owns (documents, state) are named in `core::reserved`, so that
//! config and the forwarder can keep readings off them without importing the app.

pub mod agent;
pub mod document;
pub mod store;

use std::sync::Arc;

use crate::config::{Config, RuleConfig};
use crate::core::reserved::{gateway_topic, group_topic};
use crate::rules::stage::RulesHandle;

/// Where a document comes from, in combination order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Group(String),
    Gateway,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Group(g) => write!(f, "group:{g}"),
            Source::Gateway => write!(f, "gateway"),
        }
    }
}

/// The documents' topics of a configuration, in combination order, with their sources.
pub fn topics(config: &Config) -> Vec<(String, Source)> {
    let mut t: Vec<(String, Source)> = config
        .fleet
        .groups
        .iter()
        .map(|g| {
            (
                group_topic(&config.fleet.group_prefix, g),
                Source::Group(g.clone()),
            )
        })
        .collect();
    t.push((
        gateway_topic(&config.upstream.topic_prefix),
        Source::Gateway,
    ));
    t
}

/// Local rules, then each document's in order; a name used before is replaced in its place.
pub fn combine<'a>(
    local: &[RuleConfig],
    documents: impl IntoIterator<Item = &'a [RuleConfig]>,
) -> Vec<RuleConfig> {
    let mut out: Vec<RuleConfig> = local.to_vec();
    let settings = local.first().map(|r| r.settings.clone());
    for doc in documents {
        for r in doc {
            let mut r = r.clone();
            if let Some(s) = &settings {
                r.settings = s.clone();
            }
            match out.iter_mut().find(|o| o.name == r.name) {
                Some(slot) => *slot = r,
                None => out.push(r),
            }
        }
    }
    out
}

struct Sources {
    local: Vec<RuleConfig>,
    /// In combination order: (topic, rules of its document in force, if any).
    documents: Vec<(String, Option<Vec<RuleConfig>>)>,
}

impl Sources {
    fn combined(&self) -> Vec<RuleConfig> {
        combine(
            &self.local,
            self.documents.iter().filter_map(|(_, d)| d.as_deref()),
        )
    }
}

/// Every source of rules, combined and sent to the rules stage as one reload. SIGHUP replaces
/// the local part, the fleet agent a document; one at a time (a lock held across the reload).
#[derive(Clone)]
pub struct RuleSources {
    inner: Arc<tokio::sync::Mutex<Sources>>,
}

impl RuleSources {
    /// `topics`: the documents' topics in combination order (empty without the fleet).
    pub fn new(local: Vec<RuleConfig>, topics: &[String]) -> RuleSources {
        RuleSources {
            inner: Arc::new(tokio::sync::Mutex::new(Sources {
                local,
                documents: topics.iter().map(|t| (t.clone(), None)).collect(),
            })),
        }
    }

    /// Set a document's rules without reloading (at start, before the stage runs).
    pub fn preset(&self, topic: &str, rules: Vec<RuleConfig>) {
        if let Ok(mut s) = self.inner.try_lock() {
            if let Some(d) = s.documents.iter_mut().find(|(t, _)| t == topic) {
                d.1 = Some(rules);
            }
        }
    }

    /// The combination as it stands (for the engine at start).
    pub fn combined_now(&self) -> Vec<RuleConfig> {
        match self.inner.try_lock() {
            Ok(s) => s.combined(),
            Err(_) => Vec::new(),
        }
    }

    /// How many rules are in force.
    pub async fn count(&self) -> usize {
        self.inner.lock().await.combined().len()
    }

    /// Replace the local rules (SIGHUP) and reload; `None` if the stage has stopped.
    pub async fn reload_local(
        &self,
        handle: &RulesHandle,
        local: Vec<RuleConfig>,
    ) -> Option<Vec<String>> {
        let mut s = self.inner.lock().await;
        s.local = local;
        handle.reload(s.combined()).await
    }

    /// Replace one document's rules and reload; `None` if the stage has stopped (the change is
    /// then not kept).
    pub async fn set_document(
        &self,
        handle: &RulesHandle,
        topic: &str,
        rules: Vec<RuleConfig>,
    ) -> Option<Vec<String>> {
        let mut s = self.inner.lock().await;
        let i = s.documents.iter().position(|(t, _)| t == topic)?;
        let old = s.documents[i].1.replace(rules);
        let kept = handle.reload(s.combined()).await;
        if kept.is_none() {
            s.documents[i].1 = old;
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleAction;

    fn names(r: &[RuleConfig]) -> Vec<&str> {
        r.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn later_sources_replace_by_name_in_place_and_append_new_names() {
        let local = vec![
            RuleConfig::simple("a", "x/#", RuleAction::Forward),
            RuleConfig::simple("b", "y/#", RuleAction::Forward),
        ];
        let group = vec![
            RuleConfig::simple("b", "y/+", RuleAction::Drop),
            RuleConfig::simple("g", "g/#", RuleAction::Forward),
        ];
        let gateway = vec![
            RuleConfig::simple("g", "g/+", RuleAction::Drop),
            RuleConfig::simple("z", "z", RuleAction::Forward),
        ];
        let c = combine(&local, [group.as_slice(), gateway.as_slice()]);
        assert_eq!(names(&c), ["a", "b", "g", "z"]);
        assert_eq!(c[1].filter, "y/+");
        assert_eq!(c[2].filter, "g/+");
    }
}
