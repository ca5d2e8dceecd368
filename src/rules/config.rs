//! The `[[rules]]` part of the configuration: read and validated with every error keyed
//! (`rules[2].match`), like the rest of the config.

use crate::config::fields::{Fields, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    Forward,
    Drop,
}

#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub name: String,
    pub filter: String,
    pub action: RuleAction,
}

/// Read `[[rules]]`; without any, forward everything.
pub(crate) fn compile(top: &mut Table<'_, '_>) -> Vec<RuleConfig> {
    let Some(items) = top.array("rules") else {
        return vec![RuleConfig {
            name: "forward-all".into(),
            filter: "#".into(),
            action: RuleAction::Forward,
        }];
    };
    let mut rules = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut r = top.element("rules", i, item);
        let name = r.string("name", &format!("rule-{}", i + 1));
        let filter = r.required_string("match");
        if let Some(f) = &filter {
            if let Err(msg) = super::topic::validate_filter(f) {
                r.error("match", &msg);
            }
        }
        let action = r.choice(
            "action",
            "forward",
            &[("forward", RuleAction::Forward), ("drop", RuleAction::Drop)],
        );
        r.finish();
        if let Some(filter) = filter {
            rules.push(RuleConfig {
                name,
                filter,
                action,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, r) in rules.iter().enumerate() {
        if !seen.insert(r.name.clone()) {
            top.error_at(
                &format!("rules[{i}].name"),
                &format!("duplicate rule name {:?}", r.name),
            );
        }
    }
    rules
}
