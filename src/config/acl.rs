//! Per-user topic ACLs (`[[broker.acl]]`), enforced by the broker guard on every PUBLISH,
//! SUBSCRIBE and will message (rumqttd 0.20 has no ACL hook).
//!
//! With no `[[broker.acl]]` entry everything is allowed. With at least one, a client may publish
//! to a topic only if a `publish` pattern of an entry that applies to it matches, and subscribe
//! to a filter only if a `subscribe` pattern covers it (every topic the filter can match is
//! matched by the pattern). `{username}` and `{client_id}` in patterns are replaced per
//! connection; an entry applies to `user = "*"` (everyone) or to that user name.
//!
//! Layer: config (imports `core::topic`: a pattern is a filter, and
//! [`crate::core::topic::covers`] is the one matcher). Checked at config load; the guard only
//! asks [`Perms`].

use crate::core::topic::{covers, matches, validate_filter, FilterError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// `*` or a user name.
    pub user: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    pub rules: Vec<AclRule>,
}

/// What one connection may do.
#[derive(Debug, Clone, Default)]
pub struct Perms {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// Why an ACL pattern is refused; each message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{pattern:?}: only {{username}} and {{client_id}} can be substituted")]
    Placeholder { pattern: String },
    /// The pattern, placeholders standing for one level, is not a valid filter (the message
    /// quotes that filter).
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// Check a pattern as a filter, placeholders standing for one level.
pub fn validate_pattern(p: &str) -> Result<(), PatternError> {
    let probe = p.replace("{username}", "u").replace("{client_id}", "c");
    if probe.contains(['{', '}']) {
        return Err(PatternError::Placeholder { pattern: p.into() });
    }
    Ok(validate_filter(&probe)?)
}

/// A value substituted into a pattern must be one plain level.
fn plain_level(v: &str) -> bool {
    !v.is_empty() && !v.contains(['+', '#', '/', '\0'])
}

impl Acl {
    /// The permissions of a client (`username` `None` without credentials).
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> Perms {
        let mut perms = Perms::default();
        for r in &self.rules {
            if r.user != "*" && Some(r.user.as_str()) != username {
                continue;
            }
            let subst = |p: &String| -> Option<String> {
                let mut out = p.clone();
                if out.contains("{username}") {
                    out = out.replace("{username}", username.filter(|u| plain_level(u))?);
                }
                if out.contains("{client_id}") {
                    if !plain_level(client_id) {
                        return None;
                    }
                    out = out.replace("{client_id}", client_id);
                }
                Some(out)
            };
            perms.publish.extend(r.publish.iter().filter_map(subst));
            perms.subscribe.extend(r.subscribe.iter().filter_map(subst));
        }
        perms
    }
}

impl Perms {
    /// A topic *name* only: a topic with a wildcard is never allowed (a pattern
    /// `sensors/{client_id}/#` must not let the topic `sensors/c1/#` through).
    pub fn may_publish(&self, topic: &str) -> bool {
        !topic.contains(['+', '#']) && self.publish.iter().any(|p| matches(p, topic))
    }

    /// Does a publish pattern allow `topic` with a literal first level? The gateway's reserved
    /// namespaces (`edgegate/`, `$`) are open to a client only through a pattern that names
    /// them, never through `#` or `+/...`.
    pub fn names_explicitly(&self, topic: &str) -> bool {
        !topic.contains(['+', '#'])
            && self
                .publish
                .iter()
                .any(|p| !p.starts_with(['+', '#']) && matches(p, topic))
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        // A shared subscription `$share/{group}/{filter}` is about `filter`.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map(|(_, f)| f).unwrap_or(""),
            None => filter,
        };
        self.subscribe.iter().any(|p| covers(p, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        Acl {
            rules: vec![
                AclRule {
                    user: "*".into(),
                    publish: vec!["sensors/{client_id}/#".into()],
                    subscribe: vec!["edgegate/alerts/#".into()],
                },
                AclRule {
                    user: "ops".into(),
                    publish: vec![],
                    subscribe: vec!["sensors/+/temp".into(), "home/{username}/#".into()],
                },
            ],
        }
    }

    #[test]
    fn substitution_and_matching() {
        let p = acl().for_client(Some("ops"), "dev1");
        assert!(p.may_publish("sensors/dev1/t"));
        assert!(!p.may_publish("sensors/dev2/t"));
        assert!(p.may_subscribe("edgegate/alerts/#"));
        assert!(p.may_subscribe("sensors/+/temp"));
        assert!(p.may_subscribe("sensors/x/temp"));
        assert!(!p.may_subscribe("sensors/#"));
        assert!(!p.may_subscribe("sensors/+/+"));
        assert!(p.may_subscribe("home/ops/+"));
        assert!(p.may_subscribe("$share/g/sensors/a/temp"));
        assert!(
            !p.may_publish("sensors/dev1/#"),
            "a wildcard topic is no topic name"
        );
        assert!(!p.may_publish("sensors/dev1/+"));
        assert!(!p.names_explicitly("edgegate/x"));
        let anon = acl().for_client(None, "dev2");
        assert!(anon.may_publish("sensors/dev2/x"));
        assert!(!anon.may_subscribe("sensors/x/temp"));
    }

    #[test]
    fn wildcards_in_names_grant_nothing() {
        let a = Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["u/{username}/#".into()],
                subscribe: vec!["u/{username}".into()],
            }],
        };
        let p = a.for_client(Some("#"), "c");
        assert!(!p.may_publish("u/x/y"));
        assert!(!p.may_subscribe("u/#"));
        assert!(a.for_client(None, "c").publish.is_empty());
    }

    #[test]
    fn reserved_namespaces_need_a_pattern_that_names_them() {
        let a = Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["#".into(), "edgegate/in/+".into(), "$local/#".into()],
                subscribe: vec![],
            }],
        };
        let p = a.for_client(None, "c");
        assert!(p.may_publish("edgegate/x"), "`#` matches it...");
        assert!(!p.names_explicitly("edgegate/x"), "...but does not name it");
        assert!(p.names_explicitly("edgegate/in/t"));
        assert!(p.names_explicitly("$local/a"));
        assert!(!p.names_explicitly("$SYS/a"));
    }

    #[test]
    fn patterns() {
        assert!(validate_pattern("a/{username}/#").is_ok());
        assert!(validate_pattern("a/{user}/#").is_err());
        assert!(validate_pattern("a/#/b").is_err());
        let msg = |p: &str| validate_pattern(p).unwrap_err().to_string();
        assert_eq!(
            msg("a/{user}/#"),
            r#""a/{user}/#": only {username} and {client_id} can be substituted"#
        );
        // A filter error quotes the pattern with its placeholders replaced, as before.
        assert_eq!(
            msg("{client_id}/#/b"),
            r#""c/#/b": '#' must be a whole level and the last one"#
        );
    }
}
