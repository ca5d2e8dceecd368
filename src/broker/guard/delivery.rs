//! What a client gets of a message rumqttd forwards it, where rumqttd 0.20 falls short of MQTT:
//! - **QoS**: rumqttd delivers at the subscription's QoS; MQTT at the minimum of that and the
//!   QoS the message was published with (§3.8.4). The publish QoS travels in the message's
//!   [`crate::core::stamp`]; the guard lowers the delivery to it (and answers rumqttd for the
//!   part of the exchange the client no longer takes part in: see `Flow`).
//! - **`$` topics**: rumqttd refuses every filter starting with `$` and matches no topic
//!   starting with `$`. The guard hands rumqttd such topics and filters under
//!   [`DOLLAR_PREFIX`] (`$app/x` becomes `edgegate/$app/x`, where a `$` is an ordinary
//!   character), and back. A client gets a `$` topic only through a filter of its own that
//!   starts with `$` (MQTT §4.7.2: `#` and `+` never match one at the first level).
//! - **No Local** (MQTT 5): the stamp names the publishing client (by client id), and the
//!   guard keeps each client's subscriptions with their No Local option ([`Subscriptions`]).
//!
//! Invariants: a client never sees a stamp or a topic under [`DOLLAR_PREFIX`]; a message is
//! withheld (and acknowledged to rumqttd by the guard) only when MQTT says the client must not
//! get it; what rumqttd sends without a stamp (nothing should) is passed on as it is.

use std::sync::{Arc, Mutex};

use crate::core::topic;

/// Where `$` topics live inside rumqttd (under the gateway's reserved namespace: no client may
/// publish there, see `limits::reserved_topic`).
pub const DOLLAR_PREFIX: &[u8] = b"edgegate/";

/// Topics no client may publish to or subscribe under: the broker's own statistics (`$SYS`).
pub fn broker_topic(topic: &[u8]) -> bool {
    topic == b"$SYS" || topic.starts_with(b"$SYS/")
}

/// Does this topic name or filter need [`to_router`]? (`$share/...` is rumqttd's own shared
/// subscription syntax and goes as it is.)
pub fn is_dollar(name: &[u8]) -> bool {
    name.first() == Some(&b'$') && !name.starts_with(b"$share/")
}

/// A topic name or filter as rumqttd gets it, when that differs from the client's: a `$` one
/// under [`DOLLAR_PREFIX`].
pub fn inside(name: &[u8]) -> Option<Vec<u8>> {
    is_dollar(name).then(|| to_router(name))
}

/// A `$` topic name or filter as rumqttd gets it.
pub fn to_router(name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DOLLAR_PREFIX.len() + name.len());
    v.extend_from_slice(DOLLAR_PREFIX);
    v.extend_from_slice(name);
    v
}

/// The `$` topic a topic from rumqttd stands for, if it is one.
pub fn from_router(topic: &[u8]) -> Option<&[u8]> {
    topic
        .strip_prefix(DOLLAR_PREFIX)
        .filter(|t| t.first() == Some(&b'$'))
}

/// One client's granted subscriptions, as the guard let them through (filters as the client
/// wrote them). Shared by every connection of a kept session (the subscriptions live in
/// rumqttd's session, and so must what the guard knows about them).
#[derive(Default, Debug)]
pub struct Subscriptions {
    /// (filter, No Local).
    filters: Vec<(Vec<u8>, bool)>,
}

/// [`Subscriptions`] as connections share them.
pub type SharedSubscriptions = Arc<Mutex<Subscriptions>>;

impl Subscriptions {
    /// A granted subscription (a second one to the same filter replaces the first, as in MQTT).
    pub fn subscribe(&mut self, filter: &[u8], no_local: bool) {
        match self.filters.iter_mut().find(|(f, _)| f == filter) {
            Some(e) => e.1 = no_local,
            None => self.filters.push((filter.to_vec(), no_local)),
        }
    }

    pub fn unsubscribe(&mut self, filter: &[u8]) {
        self.filters.retain(|(f, _)| f != filter);
    }

    /// Should the client get a message on `topic` (as the client sees it) that it published
    /// itself (`own`)? A `$` topic only through one of its `$` filters; its own message only
    /// through a matching filter without No Local, or when the guard knows of none that
    /// matches (a subscription from before this process: delivered, as rumqttd would).
    pub fn wants(&self, topic: &[u8], own: bool) -> bool {
        let Ok(t) = std::str::from_utf8(topic) else {
            return true;
        };
        let matching = || {
            self.filters
                .iter()
                .filter_map(|(f, nl)| Some((std::str::from_utf8(f).ok()?, *nl)))
                .filter(|(f, _)| topic::matches(f, t))
        };
        if is_dollar(topic) && matching().next().is_none() {
            return false;
        }
        if own && matching().next().is_some() {
            return matching().any(|(_, no_local)| !no_local);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_names_go_under_the_prefix_and_come_back() {
        for name in [&b"$SYS/x"[..], b"$ct-1/x", b"$x/#", b"$+"] {
            assert!(is_dollar(name));
            let inside = to_router(name);
            assert_eq!(
                inside.first(),
                Some(&b'e'),
                "rumqttd never sees a leading $"
            );
            assert_eq!(from_router(&inside), Some(name));
        }
        assert!(!is_dollar(b"$share/g/a/b") && !is_dollar(b"a/$x"));
        assert_eq!(from_router(b"edgegate/alerts/x"), None);
        assert_eq!(from_router(b"sensors/$x"), None);
        assert!(broker_topic(b"$SYS/broker/load") && broker_topic(b"$SYS"));
        assert!(!broker_topic(b"$SYSTEM/x") && !broker_topic(b"$ct/x"));
    }

    #[test]
    fn dollar_topics_only_through_dollar_filters() {
        let mut s = Subscriptions::default();
        s.subscribe(b"#", false);
        s.subscribe(b"+/x", false);
        assert!(!s.wants(b"$ct/x", false), "# and +/x must not match $ct/x");
        assert!(s.wants(b"a/x", false));
        s.subscribe(b"$ct/+", false);
        assert!(s.wants(b"$ct/x", false));
        s.unsubscribe(b"$ct/+");
        assert!(!s.wants(b"$ct/x", false));
    }

    #[test]
    fn no_local_keeps_back_only_what_every_matching_filter_refuses() {
        let mut s = Subscriptions::default();
        s.subscribe(b"a/#", true);
        assert!(
            !s.wants(b"a/b", true),
            "own message, only a No Local filter"
        );
        assert!(s.wants(b"a/b", false), "someone else's message");
        s.subscribe(b"a/b", false);
        assert!(
            s.wants(b"a/b", true),
            "a filter without No Local matches too"
        );
        s.subscribe(b"a/b", true);
        assert!(
            !s.wants(b"a/b", true),
            "resubscribed with No Local: replaced"
        );
        assert!(
            Subscriptions::default().wants(b"a/b", true),
            "no known filter: delivered as rumqttd decided"
        );
    }
}
