//! Reserved names: the topics that belong to the gateway itself, not to a sensor.
//!
//! Layer: core (imports nothing from the crate). Invariant: every stage that must keep a
//! sensor's reading off one of these topics asks here, so the broker's hand-off, the rules'
//! `check-config`, the forwarder and the fleet agree on what is reserved.

/// The gateway's own topic namespace: sensors publish there only when an ACL names it, and
/// such a publish is not a reading (counted as `reserved_topic`).
pub const OWN_PREFIX: &str = "edgegate/";

/// The topic of the gateway's own document.
pub fn gateway_topic(topic_prefix: &str) -> String {
    join(topic_prefix, "config/rules")
}

/// The topic of a group's document.
pub fn group_topic(group_prefix: &str, group: &str) -> String {
    join(&group_prefix.replace("{group}", group), "config/rules")
}

/// The gateway's state topic.
pub fn state_topic(topic_prefix: &str) -> String {
    join(topic_prefix, "state")
}

fn join(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

/// Topics the forwarder must not publish to while the fleet is on: the gateway's state topic
/// and any document topic (a topic ending in `config/rules`).
pub fn reserved_topic(topic: &str, state_topic: &str) -> bool {
    topic == state_topic || topic == "config/rules" || topic.ends_with("/config/rules")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_topics() {
        assert!(reserved_topic("edge/gw/state", "edge/gw/state"));
        assert!(reserved_topic("edge/gw/config/rules", "edge/gw/state"));
        assert!(reserved_topic("fleet/all/config/rules", "edge/gw/state"));
        assert!(!reserved_topic("edge/gw/sensors/state", "edge/gw/state"));
        assert!(!reserved_topic("edge/gw/config/rules2", "edge/gw/state"));
        assert_eq!(group_topic("fleet/{group}", "eu"), "fleet/eu/config/rules");
    }
}
