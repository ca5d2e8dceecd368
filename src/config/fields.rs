//! Key-by-key reading of a `config::Value` tree that records an error per bad key and goes on,
//! and reports keys nobody asked for (typos) when a table is finished.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use config::{Value, ValueKind};

use super::ConfigError;

/// A table being read: `prefix` is its dotted key ("" for the root, "broker", "rules[2]").
pub(crate) struct Table<'v, 'e> {
    prefix: String,
    map: Option<&'v config::Map<String, Value>>,
    used: BTreeSet<String>,
    errors: &'e mut Vec<ConfigError>,
}

/// Common interface of tables, to keep the readers in one place.
pub(crate) trait Fields {
    fn get(&mut self, key: &str) -> Option<&Value>;
    fn error(&mut self, key: &str, message: &str);

    fn string(&mut self, key: &str, default: &str) -> String {
        match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => default.to_string(),
            Some(ValueKind::String(s)) => s,
            Some(ValueKind::I64(i)) => i.to_string(),
            Some(ValueKind::U64(i)) => i.to_string(),
            Some(ValueKind::Float(f)) => f.to_string(),
            Some(ValueKind::Boolean(b)) => b.to_string(),
            Some(_) => {
                self.error(key, "expected a string");
                default.to_string()
            }
        }
    }

    /// `true`/`false` (or the strings "true"/"false"); `None` when absent.
    fn opt_bool(&mut self, key: &str) -> Option<bool> {
        match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => None,
            Some(ValueKind::Boolean(b)) => Some(b),
            Some(ValueKind::String(s)) if s.trim().eq_ignore_ascii_case("true") => Some(true),
            Some(ValueKind::String(s)) if s.trim().eq_ignore_ascii_case("false") => Some(false),
            Some(_) => {
                self.error(key, "expected true or false");
                None
            }
        }
    }

    /// A list of strings (`["a", "b"]`; a single string counts as a list of one).
    fn string_list(&mut self, key: &str) -> Vec<String> {
        match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => Vec::new(),
            Some(ValueKind::String(s)) => vec![s],
            Some(ValueKind::Array(items)) => {
                let mut out = Vec::new();
                for (i, v) in items.into_iter().enumerate() {
                    match v.kind {
                        ValueKind::String(s) => out.push(s),
                        _ => self.error(&format!("{key}[{i}]"), "expected a string"),
                    }
                }
                out
            }
            Some(_) => {
                self.error(key, "expected a list of strings");
                Vec::new()
            }
        }
    }

    fn required_string(&mut self, key: &str) -> Option<String> {
        if self.get(key).is_none() {
            self.error(key, "is required");
            return None;
        }
        Some(self.string(key, ""))
    }

    fn choice<T: Copy>(&mut self, key: &str, default: &str, options: &[(&str, T)]) -> T {
        let text = self.string(key, default);
        if let Some((_, v)) = options
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
        {
            return *v;
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.error(key, &format!("{text:?} is not one of {}", names.join(", ")));
        options
            .iter()
            .find(|(name, _)| *name == default)
            .map(|(_, v)| *v)
            .unwrap_or(options[0].1)
    }

    fn usize_in(&mut self, key: &str, default: usize, min: usize, max: usize) -> usize {
        let n = match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => return default,
            Some(ValueKind::I64(i)) if i >= 0 => i as u64,
            Some(ValueKind::U64(u)) => u,
            Some(ValueKind::String(s)) => match s.trim().parse::<u64>() {
                Ok(n) => n,
                Err(_) => {
                    self.error(key, &format!("{s:?} is not a whole number"));
                    return default;
                }
            },
            Some(_) => {
                self.error(key, "expected a whole number");
                return default;
            }
        };
        self.check_range(key, n, min, max).unwrap_or(default)
    }

    /// Bytes: an integer, or a string with a unit (`"64KiB"`, `"1MB"`, `"512k"`).
    fn size_in(&mut self, key: &str, default: usize, min: usize, max: usize) -> usize {
        let n = match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => return default,
            Some(ValueKind::I64(i)) if i >= 0 => i as u64,
            Some(ValueKind::U64(u)) => u,
            Some(ValueKind::String(s)) => match parse_size(&s) {
                Some(n) => n,
                None => {
                    self.error(
                        key,
                        &format!("{s:?} is not a size (e.g. 65536, \"64KiB\", \"1MB\")"),
                    );
                    return default;
                }
            },
            Some(_) => {
                self.error(key, "expected a size (e.g. \"64KiB\")");
                return default;
            }
        };
        self.check_range(key, n, min, max).unwrap_or(default)
    }

    /// `queue.min_free`: a size (`"64MiB"`) or a share of the file system (`"10%"`, 0 to 90).
    fn min_free(&mut self, key: &str, default: &str) -> super::MinFree {
        let parse = |t: &str| -> Option<super::MinFree> {
            let t = t.trim();
            match t.strip_suffix('%') {
                Some(p) => p
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 90)
                    .map(super::MinFree::Percent),
                None => parse_size(t).map(super::MinFree::Bytes),
            }
        };
        let fallback = parse(default).unwrap_or(super::MinFree::Bytes(0));
        let text = match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => return fallback,
            Some(ValueKind::String(s)) => s,
            Some(ValueKind::I64(i)) if i >= 0 => i.to_string(),
            Some(ValueKind::U64(u)) => u.to_string(),
            Some(_) => {
                self.error(key, "expected a size (\"64MiB\") or a percentage (\"10%\")");
                return fallback;
            }
        };
        parse(&text).unwrap_or_else(|| {
            self.error(
                key,
                &format!("{text:?} is not a size (\"64MiB\") or a percentage from 0% to 90%"),
            );
            fallback
        })
    }

    fn check_range(&mut self, key: &str, n: u64, min: usize, max: usize) -> Option<usize> {
        if n < min as u64 || n > max as u64 {
            self.error(key, &format!("{n} is out of range {min}..={max}"));
            return None;
        }
        Some(n as usize)
    }

    /// A duration string (`"250ms"`, `"5s"`, `"1m 30s"`, `"7days"`).
    fn duration_in(&mut self, key: &str, default: &str, min: Duration, max: Duration) -> Duration {
        let fallback = humantime::parse_duration(default).unwrap_or(min);
        let text = match self.get(key).map(|v| v.kind.clone()) {
            None | Some(ValueKind::Nil) => return fallback,
            Some(ValueKind::String(s)) => s,
            Some(_) => {
                self.error(
                    key,
                    "expected a duration string such as \"5s\" or \"250ms\"",
                );
                return fallback;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d >= min && d <= max => d,
            Ok(d) => {
                self.error(
                    key,
                    &format!(
                        "{} is out of range {}..={}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                fallback
            }
            Err(e) => {
                self.error(
                    key,
                    &format!("{text:?} is not a duration ({e}); use e.g. \"5s\", \"250ms\""),
                );
                fallback
            }
        }
    }

    fn socket_addr(&mut self, key: &str, default: &str) -> SocketAddr {
        let text = self.string(key, default);
        match text.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                self.error(
                    key,
                    &format!("{text:?} is not host:port with a numeric IP (e.g. \"0.0.0.0:1883\")"),
                );
                default
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
            }
        }
    }

    /// Like [`Fields::socket_addr`]; an empty string means "off".
    fn opt_socket_addr(&mut self, key: &str, default: &str) -> Option<SocketAddr> {
        let text = self.string(key, default);
        if text.trim().is_empty() {
            return None;
        }
        match text.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    key,
                    &format!("{text:?} is not host:port with a numeric IP, or \"\" to disable"),
                );
                None
            }
        }
    }
}

pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl<'v, 'e> Table<'v, 'e> {
    pub(crate) fn root(value: &'v Value, errors: &'e mut Vec<ConfigError>) -> Self {
        let map = match &value.kind {
            ValueKind::Table(m) => Some(m),
            _ => None,
        };
        Table {
            prefix: String::new(),
            map,
            used: BTreeSet::new(),
            errors,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// A sub-table by name; a missing one reads as empty (all defaults).
    pub(crate) fn section<'s>(&'s mut self, name: &str) -> Table<'v, 's> {
        self.used.insert(name.to_string());
        let full = self.key(name);
        let map = match self.map.and_then(|m| m.get(name)).map(|v| &v.kind) {
            None | Some(ValueKind::Nil) => None,
            Some(ValueKind::Table(m)) => Some(m),
            Some(_) => {
                self.errors.push(ConfigError {
                    key: full.clone(),
                    message: "expected a table".into(),
                });
                None
            }
        };
        Table {
            prefix: full,
            map,
            used: BTreeSet::new(),
            errors: self.errors,
        }
    }

    /// An array of tables (`[[name]]`), or `None` when absent.
    pub(crate) fn array(&mut self, name: &str) -> Option<&'v Vec<Value>> {
        self.used.insert(name.to_string());
        match self.map.and_then(|m| m.get(name)).map(|v| &v.kind) {
            None | Some(ValueKind::Nil) => None,
            Some(ValueKind::Array(a)) => Some(a),
            Some(_) => {
                let key = self.key(name);
                self.errors.push(ConfigError {
                    key,
                    message: "expected an array of tables ([[...]])".into(),
                });
                None
            }
        }
    }

    /// Element `i` of the array `name`.
    pub(crate) fn element<'s>(
        &'s mut self,
        name: &str,
        i: usize,
        value: &'v Value,
    ) -> Table<'v, 's> {
        let full = format!("{}[{i}]", self.key(name));
        let map = match &value.kind {
            ValueKind::Table(m) => Some(m),
            _ => {
                self.errors.push(ConfigError {
                    key: full.clone(),
                    message: "expected a table".into(),
                });
                None
            }
        };
        Table {
            prefix: full,
            map,
            used: BTreeSet::new(),
            errors: self.errors,
        }
    }

    pub(crate) fn error_at(&mut self, full_key: &str, message: &str) {
        self.errors.push(ConfigError {
            key: full_key.to_string(),
            message: message.to_string(),
        });
    }

    /// Report keys present in the file or environment that no reader asked for.
    pub(crate) fn finish(self) {
        if let Some(map) = self.map {
            let mut unknown: Vec<&String> =
                map.keys().filter(|k| !self.used.contains(*k)).collect();
            unknown.sort();
            for k in unknown {
                let key = if self.prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.prefix)
                };
                self.errors.push(ConfigError {
                    key,
                    message: "unknown key".into(),
                });
            }
        }
    }
}

impl Fields for Table<'_, '_> {
    fn get(&mut self, key: &str) -> Option<&Value> {
        self.used.insert(key.to_string());
        self.map.and_then(|m| m.get(key))
    }

    fn error(&mut self, key: &str, message: &str) {
        let key = self.key(key);
        self.errors.push(ConfigError {
            key,
            message: message.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("64 k"), Some(65536));
        assert_eq!(parse_size("1MB"), Some(1_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("12parsecs"), None);
    }
}
