//! Named topic patterns (`sensors/{device}/{metric}`) and topic templates that reuse the names
//! (`site/{device}/{metric}`, plus `{topic}` for the whole topic and `{rule}`).
//!
//! Layer: config (imports `core::topic`): compiled at config load, rendered by the rules stage.

use crate::core::topic;

/// A `match` pattern: an MQTT filter whose `+` levels may be named `{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The plain filter, `{name}` levels as `+`.
    pub filter: String,
    /// Named levels: (name, level index).
    pub names: Vec<(String, usize)>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Names a template or condition may use besides the pattern's own.
pub const RESERVED: [&str; 3] = ["topic", "rule", "time"];

/// Why a `match` pattern or a topic template is refused; each message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("{text:?}: unclosed '{{' in level {level:?}")]
    UnclosedLevel { text: String, level: String },
    #[error("{text:?}: {name:?} is not a name (letters, digits, '_')")]
    NotAName { text: String, name: String },
    #[error("{text:?}: name {name:?} is reserved or repeated")]
    Reserved { text: String, name: String },
    #[error("{text:?}: a {{name}} must be a whole level, as '+' is")]
    PartLevel { text: String },
    /// The filter the pattern stands for is not a valid MQTT filter.
    #[error(transparent)]
    Filter(#[from] topic::FilterError),
    #[error("topic template must not be empty")]
    Empty,
    #[error("{text:?}: a topic must not contain '+' or '#'")]
    Wildcard { text: String },
    #[error("{text:?}: unclosed '{{'")]
    Unclosed { text: String },
    #[error("{text:?}: unknown name {{{name}}}; known: {known}")]
    UnknownName {
        text: String,
        name: String,
        known: String,
    },
    #[error("{text:?}: unmatched '}}'")]
    Unmatched { text: String },
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, TemplateError> {
        let t = || text.to_string();
        let mut names = Vec::new();
        let mut levels = Vec::new();
        for (i, level) in text.split('/').enumerate() {
            if let Some(inner) = level.strip_prefix('{') {
                let Some(name) = inner.strip_suffix('}') else {
                    return Err(TemplateError::UnclosedLevel {
                        text: t(),
                        level: level.to_string(),
                    });
                };
                if !valid_name(name) {
                    return Err(TemplateError::NotAName {
                        text: t(),
                        name: name.to_string(),
                    });
                }
                if RESERVED.contains(&name) || names.iter().any(|(n, _)| n == name) {
                    return Err(TemplateError::Reserved {
                        text: t(),
                        name: name.to_string(),
                    });
                }
                names.push((name.to_string(), i));
                levels.push("+");
            } else if level.contains(['{', '}']) {
                return Err(TemplateError::PartLevel { text: t() });
            } else {
                levels.push(level);
            }
        }
        let filter = levels.join("/");
        topic::validate_filter(&filter).map_err(TemplateError::Filter)?;
        Ok(Pattern { filter, names })
    }

    /// A pattern without names (for built-in rules).
    pub fn literal(filter: &str) -> Pattern {
        Pattern {
            filter: filter.to_string(),
            names: Vec::new(),
        }
    }

    pub fn level_of(&self, name: &str) -> Option<usize> {
        self.names.iter().find(|(n, _)| n == name).map(|(_, l)| *l)
    }
}

/// The `i`-th level of a topic.
pub fn level(topic: &str, i: usize) -> &str {
    topic.split('/').nth(i).unwrap_or("")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Level(usize),
    Topic,
    Rule,
}

/// A topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str, pattern: &Pattern) -> Result<Template, TemplateError> {
        let t = || text.to_string();
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if text.contains(['+', '#']) {
            return Err(TemplateError::Wildcard { text: t() });
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(TemplateError::Unclosed { text: t() });
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "topic" => Part::Topic,
                "rule" => Part::Rule,
                _ => match pattern.level_of(name) {
                    Some(l) => Part::Level(l),
                    None => {
                        let known: Vec<&str> = pattern
                            .names
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .chain(["topic", "rule"])
                            .collect();
                        return Err(TemplateError::UnknownName {
                            text: t(),
                            name: name.to_string(),
                            known: known.join(", "),
                        });
                    }
                },
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::Unmatched { text: t() });
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The text of a template without placeholders.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    pub fn render(&self, topic: &str, rule: &str, prefix: &str) -> String {
        let mut s = String::with_capacity(prefix.len() + topic.len() + 16);
        if !prefix.is_empty() {
            s.push_str(prefix);
            s.push('/');
        }
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Level(i) => s.push_str(level(topic, *i)),
                Part::Topic => s.push_str(topic),
                Part::Rule => s.push_str(rule),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_templates() {
        let p = Pattern::parse("sensors/{device}/{metric}").unwrap();
        assert_eq!(p.filter, "sensors/+/+");
        assert_eq!(p.level_of("metric"), Some(2));
        let t = Template::parse("site/{device}/x/{metric}-{rule}", &p).unwrap();
        assert_eq!(
            t.render("sensors/d1/temp", "r", "edge"),
            "edge/site/d1/x/temp-r"
        );
        assert!(Template::parse("a/{nope}", &p).is_err());
        assert!(Template::parse("a/#", &p).is_err());
        assert!(Pattern::parse("a/{x}y").is_err());
        assert!(Pattern::parse("a/{x}/{x}").is_err());
        assert!(Pattern::parse("a/{topic}").is_err());
        assert!(Pattern::parse("a/#/b").is_err());
        assert_eq!(
            Template::parse("edgegate/out", &p).unwrap().literal(),
            Some("edgegate/out")
        );
    }
}
