//! What the guard bounds and refuses by name: connections (in all and per address), client
//! ids, topic names and filters (syntax, length, the distinct ones rumqttd will hold forever),
//! the reserved namespaces, and retained messages.
//!
//! Invariants:
//! - A count taken by [`Guard::admit`] is given back exactly once, when its [`Admitted`] drops.
//! - A distinct client id, topic or filter is noted once and never forgotten (rumqttd never
//!   frees its state for one): past the cap, only already-known ones pass; a refused SUBSCRIBE
//!   notes none of its filters.
//! - Each refusal is a [`Refused`] carrying its [`Refusal`]; the caller counts it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::broker::refusal::{Refusal, Refused};
use crate::config::acl::Perms;
use crate::core::reserved::OWN_PREFIX;

use super::{delivery, Guard};

/// The gateway's own links use these (the rules, the status page, the guard's wills link), and the ids the guard lends clients that sent
/// an empty one (`connect::AnonIds`); a sensor that takes one would kick a link or a client off.
/// (Only these: another edgegate connecting upstream as `edgegate-{id}` must be let in.)
pub(super) const RESERVED_IDS: [&str; 4] = [
    "edgegate-rules-",
    "edgegate-status-",
    "edgegate-wills-",
    ANON_PREFIX,
];

/// Prefix of the client ids lent to clients that connect with an empty one.
pub(super) const ANON_PREFIX: &str = "edgegate-anon-";

/// Counts an admitted connection (in all and for its source address) until dropped.
pub(super) struct Admitted(pub(super) Arc<Guard>, pub(super) IpAddr);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.broker_connections.dec();
        let mut per = self.0.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}

/// Is this client id acceptable? `Err(reason, detail)`.
pub fn check_client_id(id: &str, max_len: usize) -> Result<(), Refused> {
    if id.len() > max_len {
        return Err(Refused(
            Refusal::ClientId,
            format!(
                "client id of {} bytes (broker.max_client_id_length {max_len})",
                id.len()
            ),
        ));
    }
    if let Some(c) = id.chars().find(|c| "+#/$".contains(*c) || c.is_control()) {
        return Err(Refused(
            Refusal::ClientId,
            format!("client id {id:?} contains {c:?}"),
        ));
    }
    if let Some(p) = RESERVED_IDS.iter().find(|p| id.starts_with(**p)) {
        return Err(Refused(
            Refusal::ReservedClientId,
            format!("client id {id:?} uses the gateway's reserved prefix {p:?}"),
        ));
    }
    Ok(())
}

/// Is `topic` a topic *name* MQTT lets a client publish to (PUBLISH, will)? Wildcards, NUL,
/// invalid UTF-8 and the empty name are refused (an MQTT 5 publish with a topic alias is checked
/// by the caller). Such a topic PUBACKed and queued would block the forwarder, whose client
/// library refuses it (issue 12.1). `Err(reason, detail)`.
pub fn check_topic_name(topic: &[u8]) -> Result<(), Refused> {
    let Ok(t) = std::str::from_utf8(topic) else {
        return Err(Refused(
            Refusal::TopicInvalid,
            format!(
                "topic {:?} is not valid UTF-8",
                String::from_utf8_lossy(topic)
            ),
        ));
    };
    if t.is_empty() {
        return Err(Refused(Refusal::TopicInvalid, "empty topic name".into()));
    }
    if t.contains(['+', '#']) {
        return Err(Refused(
            Refusal::TopicWildcard,
            format!("topic name {t:?} contains a wildcard"),
        ));
    }
    if t.contains('\0') {
        return Err(Refused(
            Refusal::TopicInvalid,
            format!("topic name {t:?} contains NUL"),
        ));
    }
    Ok(())
}

/// Topics sensors may not publish to unless an ACL pattern names them explicitly: the gateway's
/// own namespace (its alerts and status live there; not readings) and the broker's `$SYS`.
/// Other `$` topics are open to clients like any topic (MQTT reserves them for server-specific
/// use; they are never readings and never match `#` or `+` at the first level: `delivery`).
pub fn reserved_topic(topic: &[u8]) -> bool {
    topic.starts_with(OWN_PREFIX.as_bytes()) || delivery::broker_topic(topic)
}

/// May a client with `perms` (no ACL: `None`) publish to the reserved `topic`? Never to where
/// the guard keeps `$` topics inside rumqttd (`delivery::DOLLAR_PREFIX`).
pub(super) fn reserved_allowed(perms: Option<&Perms>, topic: &[u8]) -> bool {
    delivery::from_router(topic).is_none()
        && perms.is_some_and(|p| p.names_explicitly(&String::from_utf8_lossy(topic)))
}

/// Is `filter` a valid MQTT topic filter? (`#` only as the last whole level, `+` only as a
/// whole level, UTF-8 without NUL, not empty.)
pub(super) fn valid_filter(filter: &[u8]) -> bool {
    let Ok(f) = std::str::from_utf8(filter) else {
        return false;
    };
    !f.is_empty() && !f.contains('\0') && crate::core::topic::validate_filter(f).is_ok()
}

impl Guard {
    /// Admit a connection from `ip`: `Err(reason, detail)` over `broker.max_connections` or
    /// `broker.max_connections_per_address`.
    pub(super) fn admit(self: &Arc<Guard>, ip: IpAddr) -> Result<Admitted, Refused> {
        let n = self.active.fetch_add(1, Ordering::SeqCst);
        if n >= self.policy.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused(
                Refusal::ConnectionLimit,
                format!(
                    "broker.max_connections {} reached",
                    self.policy.max_connections
                ),
            ));
        }
        {
            let mut per = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let mine = per.entry(ip).or_default();
            if *mine >= self.policy.max_connections_per_address {
                drop(per);
                self.active.fetch_sub(1, Ordering::SeqCst);
                return Err(Refused(
                    Refusal::AddressLimit,
                    format!(
                        "broker.max_connections_per_address {} reached for {ip}",
                        self.policy.max_connections_per_address
                    ),
                ));
            }
            *mine += 1;
        }
        self.metrics.broker_connections.inc();
        Ok(Admitted(self.clone(), ip))
    }

    /// Remember `key` in a bounded set; false if it is new and the set is full.
    pub(super) fn note(&self, set: &Mutex<HashSet<u64>>, key: &[u8], cap: usize) -> bool {
        let h = self.hasher.hash_one(key);
        let Ok(mut s) = set.lock() else {
            return false;
        };
        if s.contains(&h) {
            return true;
        }
        if s.len() >= cap {
            return false;
        }
        s.insert(h);
        true
    }

    /// Note every key, or none: the first key that would pass `cap` is returned and nothing is
    /// noted (a refused SUBSCRIBE never reaches rumqttd, so its other filters must not use up
    /// the budget).
    pub(super) fn note_all<'k>(
        &self,
        set: &Mutex<HashSet<u64>>,
        keys: impl Iterator<Item = &'k [u8]>,
        cap: usize,
    ) -> Option<&'k [u8]> {
        let keys: Vec<&'k [u8]> = keys.collect();
        let Ok(mut s) = set.lock() else {
            return keys.first().copied();
        };
        let mut new = Vec::new();
        for k in keys {
            let h = self.hasher.hash_one(k);
            if !s.contains(&h) && !new.contains(&h) {
                if s.len() + new.len() >= cap {
                    return Some(k);
                }
                new.push(h);
            }
        }
        s.extend(new);
        None
    }

    /// Distinct topics and filters noted so far (for tests and metrics).
    pub fn topics_noted(&self) -> usize {
        self.topics.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn client_ids_noted(&self) -> usize {
        self.client_ids.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Check a topic name or filter (length, distinct-topic budget).
    pub(super) fn check_topic(&self, topic: &[u8]) -> Result<(), Refused> {
        if topic.len() > self.policy.max_topic_length {
            return Err(Refused(
                Refusal::TopicTooLong,
                format!(
                    "topic of {} bytes (broker.max_topic_length {})",
                    topic.len(),
                    self.policy.max_topic_length
                ),
            ));
        }
        if !self.note(&self.topics, topic, self.policy.max_topics) {
            return Err(Refused(
                Refusal::TopicLimit,
                format!(
                    "new topic {:?} beyond broker.max_topics {}",
                    String::from_utf8_lossy(topic),
                    self.policy.max_topics
                ),
            ));
        }
        Ok(())
    }

    /// Account a retained publish of `bytes` on `topic` by `owner`: false (counted, logged) when
    /// over a bound, and the retain flag must be cleared.
    pub(super) fn keep_retained(
        &self,
        topic: u64,
        owner: u64,
        bytes: usize,
        peer: SocketAddr,
        shown: &[u8],
    ) -> bool {
        let stored = self
            .retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store(&self.policy.retained, topic, owner, bytes);
        match stored {
            Ok(()) => true,
            Err(why) => {
                self.reject(
                    Refusal::RetainedLimit,
                    peer,
                    &format_args!(
                        "retained message on {:?} ({bytes} bytes) beyond {why}: passed on without retain",
                        String::from_utf8_lossy(shown)
                    ),
                );
                false
            }
        }
    }

    /// Retained messages held (messages, bytes), as the guard accounts them.
    pub fn retained_held(&self) -> (usize, usize) {
        self.retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .totals()
    }
}
