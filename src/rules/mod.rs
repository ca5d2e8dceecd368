//! Rules: what happens to each reading.
//!
//! For now a routing table: each `[[rules]]` entry has a topic filter and an action, `forward`
//! (upstream) or `drop`. Rules are tried in order; every matching `forward` rule routes the
//! reading (at most once), a matching `drop` rule stops the evaluation. A reading no forward
//! rule matches is not forwarded and is counted as `unrouted`.
//!
//! Invariant: [`Engine::process`] is a pure, synchronous function of (engine state, reading) to
//! actions. It does no I/O, so it is tested and benchmarked without a broker or a disk.

pub mod config;
pub mod stage;
pub mod topic;

use crate::config::{RuleAction, RuleConfig};
use crate::event::{new_id, Class, Event, Reading, TYPE_READING};

/// What the rules ask the pipeline to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Commit to the queue and send upstream.
    Forward(Event),
}

/// Why a reading produced no upstream event (for the drop counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forwarded,
    /// A `drop` rule matched; the index of the rule.
    DroppedByRule(usize),
    /// No rule forwarded it.
    Unrouted,
}

#[derive(Debug)]
struct Rule {
    name: String,
    filter: String,
    action: RuleAction,
}

/// Compiled rules and their state.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    topic_prefix: String,
}

impl Engine {
    pub fn new(rules: &[RuleConfig], topic_prefix: &str) -> Engine {
        Engine {
            rules: rules
                .iter()
                .map(|r| Rule {
                    name: r.name.clone(),
                    filter: r.filter.clone(),
                    action: r.action,
                })
                .collect(),
            topic_prefix: topic_prefix.to_string(),
        }
    }

    pub fn rule_name(&self, index: usize) -> &str {
        self.rules
            .get(index)
            .map(|r| r.name.as_str())
            .unwrap_or("?")
    }

    /// Evaluate `reading`, pushing the resulting actions to `out`.
    pub fn process(&mut self, reading: &Reading, out: &mut Vec<Action>) -> Disposition {
        let mut forward = false;
        for (i, rule) in self.rules.iter().enumerate() {
            if !topic::matches(&rule.filter, &reading.topic) {
                continue;
            }
            match rule.action {
                RuleAction::Forward => forward = true,
                RuleAction::Drop => {
                    if !forward {
                        return Disposition::DroppedByRule(i);
                    }
                    break;
                }
            }
        }
        if !forward {
            return Disposition::Unrouted;
        }
        out.push(Action::Forward(Event {
            id: new_id(),
            class: Class::Telemetry,
            kind: TYPE_READING,
            subject: reading.topic.clone(),
            upstream_topic: upstream_topic(&self.topic_prefix, &reading.topic),
            time: reading.received,
            data: reading.payload.to_data(),
            traceparent: reading.traceparent.clone(),
        }));
        Disposition::Forwarded
    }
}

/// `{prefix}/{topic}`; an empty prefix leaves the topic as it is.
pub fn upstream_topic(prefix: &str, topic: &str) -> String {
    if prefix.is_empty() {
        topic.to_string()
    } else {
        let mut s = String::with_capacity(prefix.len() + 1 + topic.len());
        s.push_str(prefix);
        s.push('/');
        s.push_str(topic);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Payload;
    use bytes::Bytes;
    use std::time::SystemTime;

    fn reading(topic: &str) -> Reading {
        Reading {
            topic: topic.into(),
            received: SystemTime::now(),
            payload: Payload::decode(Bytes::from_static(b"1")),
            traceparent: None,
        }
    }

    fn rule(name: &str, filter: &str, action: RuleAction) -> RuleConfig {
        RuleConfig {
            name: name.into(),
            filter: filter.into(),
            action,
        }
    }

    #[test]
    fn routing_table() {
        let mut e = Engine::new(
            &[
                rule("no-debug", "sensors/+/debug", RuleAction::Drop),
                rule("sensors", "sensors/#", RuleAction::Forward),
                rule("all", "#", RuleAction::Forward),
            ],
            "edge/gw1",
        );
        let mut out = Vec::new();
        assert_eq!(
            e.process(&reading("sensors/a/debug"), &mut out),
            Disposition::DroppedByRule(0)
        );
        assert!(out.is_empty());
        assert_eq!(
            e.process(&reading("sensors/a/temp"), &mut out),
            Disposition::Forwarded
        );
        assert_eq!(out.len(), 1, "two matching forward rules forward once");
        let Action::Forward(ev) = &out[0];
        assert_eq!(ev.upstream_topic, "edge/gw1/sensors/a/temp");
        assert_eq!(ev.subject, "sensors/a/temp");
        assert_eq!(ev.class, Class::Telemetry);

        let mut e = Engine::new(&[rule("s", "sensors/#", RuleAction::Forward)], "");
        out.clear();
        assert_eq!(
            e.process(&reading("other/x"), &mut out),
            Disposition::Unrouted
        );
        assert_eq!(
            e.process(&reading("sensors/x"), &mut out),
            Disposition::Forwarded
        );
        let Action::Forward(ev) = &out[0];
        assert_eq!(ev.upstream_topic, "sensors/x");
    }
}
