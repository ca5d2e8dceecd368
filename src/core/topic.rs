//! MQTT topic filters: validation and matching (MQTT 3.1.1 §4.7). Layer: core.
//!
//! Invariant: this is the one place a filter is matched: the rules' patterns, the sensor
//! table, the queue's `--topic` filters and the broker's ACLs all ask [`matches()`] (a topic
//! name) or [`covers`] (a filter under another filter), and [`matches()`] is [`covers`] of a
//! topic name, so a topic an ACL lets a client subscribe to is matched the same way.

/// Why a topic filter is refused; each message quotes the filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("topic filter must not be empty")]
    Empty,
    #[error("{filter:?}: '#' must be a whole level and the last one")]
    MultiLevel { filter: String },
    #[error("{filter:?}: '+' must be a whole level")]
    SingleLevel { filter: String },
}

/// Check a subscription-style filter: `#` only as the whole last level, `+` only as a whole level.
pub fn validate_filter(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(FilterError::MultiLevel {
                filter: filter.into(),
            });
        }
        if level.contains('+') && *level != "+" {
            return Err(FilterError::SingleLevel {
                filter: filter.into(),
            });
        }
    }
    Ok(())
}

/// Does `topic` (a topic name, no wildcards) match `filter`? Wildcards at the first level do
/// not match `$`-topics.
pub fn matches(filter: &str, topic: &str) -> bool {
    covers(filter, topic)
}

/// Does `pattern` match every topic `filter` can match? (A topic name is a filter that
/// matches itself only, so this is also [`matches()`].)
pub fn covers(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && (pattern.starts_with('+') || pattern.starts_with('#')) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(a), Some(b)) if a == b && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(matches("#", "a/b"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn covering() {
        assert!(covers("#", "a/+/b"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/#"));
    }

    #[test]
    fn validation() {
        assert!(validate_filter("a/+/#").is_ok());
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b#").is_err());
        assert!(validate_filter("a/b+").is_err());
        assert!(validate_filter("").is_err());
    }

    /// The messages `check-config`, `--topic` and the rule patterns print.
    #[test]
    fn messages() {
        let msg = |f: &str| validate_filter(f).unwrap_err().to_string();
        assert_eq!(msg(""), "topic filter must not be empty");
        assert_eq!(
            msg("a/#/b"),
            r#""a/#/b": '#' must be a whole level and the last one"#
        );
        assert_eq!(msg("a/b+"), r#""a/b+": '+' must be a whole level"#);
    }
}
