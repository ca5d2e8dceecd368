//! The `[[rules]]` part of the configuration: read and validated with every error keyed
//! (`rules[2].actions[0].above`), like the rest of the config.
//!
//! ```toml
//! [rules_engine]              # optional
//! max_sensors = 10000         # per rule: (rule, sensor) states kept, least recently used evicted
//! alert_topic = "edgegate/alerts"
//! tick = "1s"                 # timer resolution of `missing` and window closing
//!
//! [[rules]]
//! name = "temps"
//! match = "sensors/{device}/temp"       # MQTT filter; {name} is a named `+` level
//! when = "value > -50 && device != \"lab\""   # optional evalexpr condition
//! actions = [
//!   { type = "forward", topic = "site/{device}/temp", class = "telemetry" },
//!   { type = "detect", detector = "outlier" },
//! ]
//! ```
//!
//! The original one-action form (`action = "forward"` or `"drop"`) keeps working.
//!
//! Layer: config. The validated types the rules stage runs on (`RuleConfig`, `ActionConfig`,
//! detector settings with their defaults); the stage imports them, never the reverse.

use std::time::Duration;

use config::ValueKind;

use crate::config::fields::{Fields, Table};
use crate::config::source::Toml;
use crate::core::event::Class;

use super::condition::Condition;
use super::template::{Pattern, Template};

/// Default noise floor of the outlier detector, in robust standard deviations of the jump
/// feature (a reading closer than this to its prediction never alerts).
pub const OUTLIER_Z: f64 = 4.0;
/// Default novelty ratio: a surprise must exceed the sensor's recent maximum by this factor.
pub const OUTLIER_RATIO: f64 = 2.0;
/// Default half-life (seconds) of the recent maximum of each surprise feature: 7 days, so a
/// weekly pattern's largest excursions are still remembered when they come back.
pub const OUTLIER_MEMORY_SECS: f64 = 7.0 * 86_400.0;
/// Default readings before the outlier detector may alert.
pub const OUTLIER_WARMUP: u32 = 50;
/// Whether the outlier detector's value-histogram feature is on by default.
pub const OUTLIER_HISTOGRAM: bool = true;

/// Settings of the outlier detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierSettings {
    /// Noise floor in robust sigmas.
    pub threshold: f64,
    /// Novelty ratio over the recent maximum surprise.
    pub ratio: f64,
    /// Half-life of the recent maximum, seconds.
    pub memory: f64,
    pub warmup: u32,
    /// Whether the time-of-day profile scores (see `rules::detect::Outlier`).
    pub seasonal: bool,
    /// Whether the relative entropy of the recent value histogram scores (see
    /// `rules::detect::histogram`).
    pub histogram: bool,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            threshold: OUTLIER_Z,
            ratio: OUTLIER_RATIO,
            memory: OUTLIER_MEMORY_SECS,
            warmup: OUTLIER_WARMUP,
            seasonal: true,
            histogram: OUTLIER_HISTOGRAM,
        }
    }
}

/// The single action of the original form, or a summary of `actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    Forward,
    Drop,
    /// Other actions only (detect, aggregate, publish, ...).
    Other,
}

/// Engine-wide settings (`[rules_engine]`); carried by every rule so that the configuration
/// shape (`rules: Vec<RuleConfig>`) stays as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub max_sensors: usize,
    pub alert_topic: String,
    pub tick: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_sensors: 10_000,
            alert_topic: "edgegate/alerts".into(),
            tick: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleConfig {
    pub name: String,
    /// The plain MQTT filter (`{name}` levels replaced by `+`).
    pub filter: String,
    pub pattern: Pattern,
    pub when: Option<Condition>,
    /// `Forward`/`Drop` for the one-action form; for `actions` the first forward/drop found.
    pub action: RuleAction,
    pub actions: Vec<ActionConfig>,
    pub settings: EngineSettings,
}

impl RuleConfig {
    /// The same rule, whatever the engine-wide settings it carries: a change of
    /// `[rules_engine]` (the tick, the sensor table's size) keeps every rule's state.
    pub fn same_rule(&self, other: &RuleConfig) -> bool {
        let RuleConfig {
            name,
            filter,
            pattern,
            when,
            action,
            actions,
            settings: _,
        } = self;
        *name == other.name
            && *filter == other.filter
            && *pattern == other.pattern
            && *when == other.when
            && *action == other.action
            && *actions == other.actions
    }

    /// A rule with one action, as the original routing table had.
    pub fn simple(name: &str, filter: &str, action: RuleAction) -> RuleConfig {
        let pattern = Pattern::parse(filter).unwrap_or_else(|_| Pattern::literal(filter));
        RuleConfig {
            name: name.into(),
            filter: pattern.filter.clone(),
            pattern,
            when: None,
            action,
            actions: match action {
                RuleAction::Drop => vec![ActionConfig::Drop],
                _ => vec![ActionConfig::Forward {
                    topic: None,
                    class: Class::Telemetry,
                }],
            },
            settings: EngineSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ActionConfig {
    /// Upstream; default topic `{topic_prefix}/{topic}`.
    Forward {
        topic: Option<Template>,
        class: Class,
    },
    /// To the local broker (QoS 0), the reading's payload as is.
    Publish {
        topic: Template,
    },
    Drop,
    /// Let through 1 in `every`, or at most one per `interval` (per sensor); the rule's later
    /// actions see only what passes.
    Sample {
        every: Option<u64>,
        interval: Option<Duration>,
    },
    /// Report by exception (per sensor): passes when `field` moved more than `abs` or `rel`
    /// (relative to the last value passed) or after `max_silence`.
    Deadband {
        field: String,
        abs: Option<f64>,
        rel: Option<f64>,
        max_silence: Option<Duration>,
    },
    Aggregate(AggregateConfig),
    Detect(DetectConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    Count,
    Min,
    Max,
    Mean,
    Stddev,
    Last,
    Rate,
}

impl Stat {
    pub const ALL: [Stat; 7] = [
        Stat::Count,
        Stat::Min,
        Stat::Max,
        Stat::Mean,
        Stat::Stddev,
        Stat::Last,
        Stat::Rate,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stat::Count => "count",
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Mean => "mean",
            Stat::Stddev => "stddev",
            Stat::Last => "last",
            Stat::Rate => "rate",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    pub field: String,
    pub window: Duration,
    /// Sliding windows: one event every `slide` over the last `window`; `None` is tumbling.
    pub slide: Option<Duration>,
    pub stats: Vec<Stat>,
    /// Upstream topic; default `{topic_prefix}/{topic}/aggregate`.
    pub topic: Option<Template>,
    pub class: Class,
    /// Also publish each aggregate to the local broker on this topic.
    pub publish: Option<Template>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DetectConfig {
    pub field: String,
    pub detector: DetectorConfig,
    pub severity: Severity,
    /// Upstream topic of alerts; default `{topic_prefix}/alerts/{rule}/{topic}`.
    pub topic: Option<Template>,
    /// Publish alerts to the local broker under `alert_topic` (default true).
    pub local: bool,
    /// Forward alerts upstream (default true).
    pub upstream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DetectorConfig {
    /// Alert when above `above` (or below `below`) for `min_duration`; clears once back inside
    /// by `hysteresis`.
    Threshold {
        above: Option<f64>,
        below: Option<f64>,
        hysteresis: f64,
        min_duration: Duration,
    },
    /// |dv/dt| per second above `max_rate` between consecutive readings, for `min_duration`.
    RateOfChange {
        max_rate: f64,
        min_duration: Duration,
    },
    /// Self-tuning streaming detector (see `detect::Outlier`): `threshold` is the noise floor in
    /// robust sigmas, `ratio` the factor over the recent largest surprise, `memory` its half-life.
    Outlier(OutlierSettings),
    /// Value within `epsilon` of where it got stuck for `duration` and `min_count` readings.
    Flatline {
        epsilon: f64,
        duration: Duration,
        min_count: u32,
    },
    /// No reading for `after`.
    Missing { after: Duration },
}

impl DetectorConfig {
    pub fn name(&self) -> &'static str {
        match self {
            DetectorConfig::Threshold { .. } => "threshold",
            DetectorConfig::RateOfChange { .. } => "rate_of_change",
            DetectorConfig::Outlier(_) => "outlier",
            DetectorConfig::Flatline { .. } => "flatline",
            DetectorConfig::Missing { .. } => "missing",
        }
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// A number (integer or float) or `None` when absent; an error for anything else.
fn float(t: &mut Table<'_, '_>, key: &str) -> Option<f64> {
    let kind = t.get(key).map(|v| v.kind.clone());
    match kind {
        None | Some(ValueKind::Nil) => None,
        Some(ValueKind::Float(f)) if f.is_finite() => Some(f),
        Some(ValueKind::I64(i)) => Some(i as f64),
        Some(ValueKind::U64(u)) => Some(u as f64),
        Some(ValueKind::String(s)) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Some(f),
            _ => {
                t.error(key, &format!("{s:?} is not a number"));
                None
            }
        },
        Some(_) => {
            t.error(key, "expected a number");
            None
        }
    }
}

fn opt_duration(t: &mut Table<'_, '_>, key: &str, min: Duration) -> Option<Duration> {
    t.get(key)?;
    Some(t.duration_in(key, "0s", min, 365 * DAY))
}

fn class(t: &mut Table<'_, '_>, default: &str) -> Class {
    t.choice(
        "class",
        default,
        &[("telemetry", Class::Telemetry), ("alert", Class::Alert)],
    )
}

fn template(t: &mut Table<'_, '_>, key: &str, pattern: &Pattern) -> Option<Template> {
    t.get(key)?;
    let text = t.string(key, "");
    match Template::parse(&text, pattern) {
        Ok(tpl) => Some(tpl),
        Err(msg) => {
            t.error(key, &msg.to_string());
            None
        }
    }
}

fn non_negative(t: &mut Table<'_, '_>, key: &str, v: Option<f64>) -> Option<f64> {
    match v {
        Some(x) if x < 0.0 => {
            t.error(key, "must not be negative");
            None
        }
        other => other,
    }
}

fn read_action(a: &mut Table<'_, '_>, pattern: &Pattern) -> Option<ActionConfig> {
    let kind = a.required_string("type")?;
    let action = match kind.trim() {
        "forward" => ActionConfig::Forward {
            topic: template(a, "topic", pattern),
            class: class(a, "telemetry"),
        },
        "publish" => {
            let topic = template(a, "topic", pattern);
            if a.get("topic").is_none() {
                a.error("topic", "is required");
            }
            ActionConfig::Publish { topic: topic? }
        }
        "drop" => ActionConfig::Drop,
        "sample" => {
            let every = a
                .get("every")
                .is_some()
                .then(|| a.usize_in("every", 1, 1, 1_000_000_000) as u64);
            let interval = opt_duration(a, "interval", Duration::from_millis(1));
            if every.is_some() == interval.is_some() {
                a.error(
                    "every",
                    "give exactly one of `every` (1 in N) or `interval`",
                );
            }
            ActionConfig::Sample { every, interval }
        }
        "deadband" => {
            let field = a.string("field", "value");
            let abs = float(a, "abs");
            let abs = non_negative(a, "abs", abs);
            let rel = float(a, "rel");
            let rel = non_negative(a, "rel", rel);
            let max_silence = opt_duration(a, "max_silence", Duration::from_millis(1));
            if abs.is_none() && rel.is_none() {
                a.error("abs", "give `abs` and/or `rel`");
            }
            ActionConfig::Deadband {
                field,
                abs,
                rel,
                max_silence,
            }
        }
        "aggregate" => {
            let field = a.string("field", "value");
            let window = a.duration_in("window", "1m", Duration::from_millis(10), 30 * DAY);
            let slide = opt_duration(a, "slide", Duration::from_millis(10));
            if let Some(s) = slide {
                let n = window.as_nanos() / s.as_nanos().max(1);
                if s > window || !window.as_nanos().is_multiple_of(s.as_nanos().max(1)) || n > 1024
                {
                    a.error(
                        "slide",
                        "must divide `window` into at most 1024 equal steps",
                    );
                }
            }
            let stats = match a.get("stats").map(|v| v.kind.clone()) {
                None | Some(ValueKind::Nil) => Stat::ALL.to_vec(),
                Some(ValueKind::Array(items)) => {
                    let mut v = Vec::new();
                    for item in items {
                        let name = item.clone().into_string().unwrap_or_default();
                        match Stat::ALL.iter().find(|s| s.name() == name) {
                            Some(s) => v.push(*s),
                            None => a.error(
                                "stats",
                                &format!(
                                    "{name:?} is not one of count, min, max, mean, stddev, last, rate"
                                ),
                            ),
                        }
                    }
                    v
                }
                Some(_) => {
                    a.error("stats", "expected a list such as [\"mean\", \"max\"]");
                    Vec::new()
                }
            };
            ActionConfig::Aggregate(AggregateConfig {
                field,
                window,
                slide,
                stats,
                topic: template(a, "topic", pattern),
                class: class(a, "telemetry"),
                publish: template(a, "publish", pattern),
            })
        }
        "detect" => {
            let field = a.string("field", "value");
            let name = a.string("detector", "");
            let detector = match name.trim() {
                "threshold" => {
                    let above = float(a, "above");
                    let below = float(a, "below");
                    if above.is_none() && below.is_none() {
                        a.error("above", "give `above` and/or `below`");
                    }
                    if let (Some(hi), Some(lo)) = (above, below) {
                        if lo >= hi {
                            a.error("below", "must be less than `above`");
                        }
                    }
                    let hysteresis = float(a, "hysteresis").unwrap_or(0.0);
                    let hysteresis = non_negative(a, "hysteresis", Some(hysteresis)).unwrap_or(0.0);
                    DetectorConfig::Threshold {
                        above,
                        below,
                        hysteresis,
                        min_duration: a.duration_in("for", "0s", Duration::ZERO, 365 * DAY),
                    }
                }
                "rate_of_change" => {
                    let max_rate = float(a, "max_rate");
                    if max_rate.is_none() {
                        a.error("max_rate", "is required (absolute change per second)");
                    }
                    let max_rate = non_negative(a, "max_rate", max_rate).unwrap_or(0.0);
                    DetectorConfig::RateOfChange {
                        max_rate,
                        min_duration: a.duration_in("for", "0s", Duration::ZERO, 365 * DAY),
                    }
                }
                "outlier" => {
                    let threshold = float(a, "threshold").unwrap_or(OUTLIER_Z);
                    if threshold <= 1.0 {
                        a.error("threshold", "must be greater than 1 (robust sigmas)");
                    }
                    let ratio = float(a, "ratio").unwrap_or(OUTLIER_RATIO);
                    if ratio <= 1.0 {
                        a.error(
                            "ratio",
                            "must be greater than 1 (times the recent largest surprise)",
                        );
                    }
                    let memory =
                        a.duration_in("memory", "7days", Duration::from_secs(1), 365 * DAY);
                    debug_assert_eq!(OUTLIER_MEMORY_SECS, 7.0 * DAY.as_secs_f64());
                    DetectorConfig::Outlier(OutlierSettings {
                        threshold,
                        ratio,
                        memory: memory.as_secs_f64(),
                        warmup: a.usize_in("warmup", OUTLIER_WARMUP as usize, 5, 1_000_000) as u32,
                        seasonal: a.opt_bool("seasonal").unwrap_or(true),
                        histogram: a.opt_bool("histogram").unwrap_or(OUTLIER_HISTOGRAM),
                    })
                }
                "flatline" => {
                    let epsilon = float(a, "epsilon").unwrap_or(0.0);
                    let epsilon = non_negative(a, "epsilon", Some(epsilon)).unwrap_or(0.0);
                    DetectorConfig::Flatline {
                        epsilon,
                        duration: a.duration_in("for", "10m", Duration::from_millis(1), 365 * DAY),
                        min_count: a.usize_in("min_count", 10, 2, 1_000_000) as u32,
                    }
                }
                "missing" => DetectorConfig::Missing {
                    after: a.duration_in("after", "5m", Duration::from_millis(10), 365 * DAY),
                },
                other => {
                    a.error(
                        "detector",
                        &format!(
                            "{other:?} is not one of \"threshold\", \"rate_of_change\", \"outlier\", \"flatline\", \"missing\""
                        ),
                    );
                    return None;
                }
            };
            let severity = a.choice(
                "severity",
                "warning",
                &[
                    ("info", Severity::Info),
                    ("warning", Severity::Warning),
                    ("critical", Severity::Critical),
                ],
            );
            let topic = template(a, "topic", pattern);
            let local = a.string("local", "true");
            let upstream = a.string("upstream", "true");
            let flag = |a: &mut Table<'_, '_>, key: &str, v: &str| match v {
                "true" => true,
                "false" => false,
                _ => {
                    a.error(key, "expected true or false");
                    true
                }
            };
            let local = flag(a, "local", &local);
            let upstream = flag(a, "upstream", &upstream);
            ActionConfig::Detect(DetectConfig {
                field,
                detector,
                severity,
                topic,
                local,
                upstream,
            })
        }
        other => {
            a.error(
                "type",
                &format!(
                    "{other:?} is not one of \"forward\", \"publish\", \"drop\", \"sample\", \"deadband\", \"aggregate\", \"detect\""
                ),
            );
            return None;
        }
    };
    Some(action)
}

/// Read `[rules_engine]` and `[[rules]]`; without any rules, forward everything.
pub(crate) fn compile(top: &mut Table<'_, '_>) -> Vec<RuleConfig> {
    let mut s = top.section("rules_engine");
    // The code's defaults are `EngineSettings::default()` (equal to the shipped file's: tested).
    let d = EngineSettings::default();
    let settings = EngineSettings {
        max_sensors: s.usize_in("max_sensors", d.max_sensors, 1, 10_000_000),
        alert_topic: s
            .string("alert_topic", &d.alert_topic)
            .trim_end_matches('/')
            .to_string(),
        tick: s.duration_in(
            "tick",
            &humantime::format_duration(d.tick).to_string(),
            Duration::from_millis(10),
            Duration::from_secs(60),
        ),
    };
    if settings.alert_topic.is_empty() || settings.alert_topic.contains(['+', '#']) {
        s.error("alert_topic", "must be a topic without wildcards");
    } else if !settings
        .alert_topic
        .starts_with(crate::core::reserved::OWN_PREFIX)
    {
        s.error(
            "alert_topic",
            "must be under \"edgegate/\" so that alerts are not ingested again as readings",
        );
    }
    let rules_dir = Some(std::path::PathBuf::from(s.string("dir", "")));
    s.finish();

    let dir = rules_dir.filter(|d| !d.as_os_str().is_empty());
    let items = top.array("rules");
    if items.is_none() && dir.is_none() {
        let mut r = RuleConfig::simple("forward-all", "#", RuleAction::Forward);
        r.settings = settings;
        return vec![r];
    }
    let mut rules = Vec::new();
    for (i, item) in items.into_iter().flatten().enumerate() {
        rules.extend(compile_rule(top.element("rules", i, item), i, &settings));
    }
    if let Some(dir) = dir {
        load_rules_dir(top, &dir, &settings, &mut rules);
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

/// One `[[rules]]` element.
fn compile_rule(mut r: Table<'_, '_>, i: usize, settings: &EngineSettings) -> Option<RuleConfig> {
    let name = r.string("name", &format!("rule-{}", i + 1));
    if name.is_empty() || name.contains(['/', '+', '#']) {
        r.error("name", "must be non-empty and contain no '/', '+' or '#'");
    }
    let pattern = r
        .required_string("match")
        .and_then(|m| match Pattern::parse(&m) {
            Ok(p) => Some(p),
            Err(msg) => {
                r.error("match", &msg.to_string());
                None
            }
        });
    let when = match r.get("when").is_some() {
        false => None,
        true => {
            let text = r.string("when", "");
            match Condition::parse(&text, pattern.as_ref()) {
                Ok(c) => Some(c),
                Err(msg) => {
                    r.error("when", &msg.to_string());
                    None
                }
            }
        }
    };
    let has_single = r.get("action").is_some();
    let list = r.array("actions");
    let mut action = RuleAction::Other;
    let mut actions = Vec::new();
    match (has_single, list) {
        (true, Some(_)) => r.error("action", "give either `action` or `actions`, not both"),
        (_, None) => {
            action = r.choice(
                "action",
                "forward",
                &[("forward", RuleAction::Forward), ("drop", RuleAction::Drop)],
            );
            actions.push(match action {
                RuleAction::Drop => ActionConfig::Drop,
                _ => ActionConfig::Forward {
                    topic: None,
                    class: Class::Telemetry,
                },
            });
        }
        (false, Some(list)) => {
            if list.is_empty() {
                r.error("actions", "must not be empty");
            }
            let fallback = Pattern::literal("#");
            let p = pattern.as_ref().unwrap_or(&fallback);
            for (j, item) in list.iter().enumerate() {
                let mut a = r.element("actions", j, item);
                let parsed = read_action(&mut a, p);
                a.finish();
                if let Some(parsed) = parsed {
                    if action == RuleAction::Other {
                        match parsed {
                            ActionConfig::Forward { .. } => action = RuleAction::Forward,
                            ActionConfig::Drop => action = RuleAction::Drop,
                            _ => {}
                        }
                    }
                    if let (ActionConfig::Publish { topic }, Some(p)) = (&parsed, &pattern) {
                        if let Some(lit) = topic.literal() {
                            if crate::core::topic::matches(&p.filter, lit) {
                                r.error(
                                    &format!("actions[{j}].topic"),
                                    "publishing to a topic this rule matches would loop",
                                );
                            }
                        }
                    }
                    actions.push(parsed);
                }
            }
        }
    }
    r.finish();
    pattern.map(|pattern| RuleConfig {
        name,
        filter: pattern.filter.clone(),
        pattern,
        when,
        action,
        actions,
        settings: settings.clone(),
    })
}

/// `rules_engine.dir`: every `*.toml` file there (in name order) holds more `[[rules]]`; errors
/// are keyed with the file (`/etc/edgegate/rules.d/pumps.toml: rules[0].match`).
fn load_rules_dir(
    top: &mut Table<'_, '_>,
    dir: &std::path::Path,
    settings: &EngineSettings,
    rules: &mut Vec<RuleConfig>,
) {
    let mut files: Vec<std::path::PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            top.error_at("rules_engine.dir", &format!("{}: {e}", dir.display()));
            return;
        }
    };
    files.sort();
    for path in files {
        let value = match super::source::read(&[Toml::File(&path)], false) {
            Ok(v) => v,
            Err(e) => {
                top.error_at(&path.display().to_string(), &e.to_string());
                continue;
            }
        };
        let (more, errors) = compile_rules_file(&value, settings);
        rules.extend(more);
        for e in errors {
            top.error_at(&format!("{}: {}", path.display(), e.key), &e.message);
        }
    }
}

/// A file of `rules_engine.dir` (or a fleet document): only `[[rules]]`, keyed from its own
/// root (`rules[0].match`); any other key is an error.
fn compile_rules_file(
    value: &config::Value,
    settings: &EngineSettings,
) -> (Vec<RuleConfig>, Vec<crate::config::ConfigError>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let mut file = Table::root(value, &mut errors);
    for (i, item) in file.array("rules").into_iter().flatten().enumerate() {
        rules.extend(compile_rule(file.element("rules", i, item), i, settings));
    }
    file.finish();
    (rules, errors)
}

/// A rules document in the syntax of a `rules_engine.dir` file (a fleet document: see
/// `crate::app::fleet`), validated as `check-config` validates that file: every error with its key
/// (`rules[1].when`), and rule names unique within the document. `settings` are the gateway's
/// `[rules_engine]` settings, which a document cannot change.
pub fn compile_document(
    text: &str,
    settings: &EngineSettings,
) -> Result<Vec<RuleConfig>, crate::config::ConfigErrors> {
    use crate::config::{ConfigError, ConfigErrors};
    let value = super::source::read(&[Toml::Text(text)], false)
        .map_err(|e| ConfigErrors::one("toml", e.to_string()))?;
    let (rules, mut errors) = compile_rules_file(&value, settings);
    let mut seen = std::collections::HashSet::new();
    for (i, r) in rules.iter().enumerate() {
        if !seen.insert(r.name.as_str()) {
            errors.push(ConfigError {
                key: format!("rules[{i}].name"),
                message: format!("duplicate rule name {:?}", r.name),
            });
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Read rules from a TOML text (for tests, the backtest and tools); every error listed.
pub fn from_toml(text: &str) -> Result<Vec<RuleConfig>, crate::config::ConfigErrors> {
    use crate::config::ConfigErrors;
    let root = super::source::read(&[Toml::Text(text)], false)
        .map_err(|e| ConfigErrors::one("toml", e.to_string()))?;
    let mut errors = Vec::new();
    let mut top = Table::root(&root, &mut errors);
    let rules = compile(&mut top);
    top.finish();
    // Only the rules' own keys matter here.
    errors.retain(|e| e.key.starts_with("rules") || e.key == "toml");
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(ConfigErrors(errors))
    }
}
