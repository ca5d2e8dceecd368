//! Rules: what happens to each reading.
//!
//! Each `[[rules]]` entry has a `match` pattern (an MQTT filter whose levels may be named), an
//! optional `when` condition and a list of actions (see [`config`]). Rules are tried in order;
//! a matching rule runs its actions in order:
//! - `forward` routes the reading upstream (at most once per upstream topic);
//! - `publish` sends it to the local broker;
//! - `drop` stops the evaluation (the reading is dropped unless already forwarded);
//! - `sample` and `deadband` let only some readings through to the rule's later actions;
//! - `aggregate` feeds per-sensor windows that emit one event per window;
//! - `detect` feeds per-sensor detectors that emit alert start/clear events.
//!
//! A reading no forward action routes is not forwarded and is counted (`unrouted`, or the
//! reason of the first rule that stopped it: drop, filter, evaluation error).
//!
//! Invariant: [`Engine::process`] and [`Engine::tick`] are pure, synchronous functions of
//! (engine state, reading or time) to actions. They do no I/O, so they are tested and
//! benchmarked without a broker or a disk; the stage performs the actions.

pub mod backtest;
pub mod detect;
pub mod history;
mod sensors;
pub mod stage;
pub mod window;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::rules::{ActionConfig, AggregateConfig, DetectConfig, EngineSettings};
use crate::config::RuleConfig;
use crate::core::event::{
    new_id, Class, Data, Event, Reading, TYPE_AGGREGATE, TYPE_ALERT, TYPE_READING,
};
use detect::{DetectorState, Transition, Verdict};
use sensors::{mask_bit, Sensors, States};
use window::{Closed, WindowState};

/// What the rules ask the pipeline to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Commit to the queue and send upstream.
    Forward(Event),
    /// Publish to the local broker (QoS 0, not retained).
    Publish { topic: String, payload: Bytes },
}

/// Why a reading produced no upstream event (for the drop counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forwarded,
    /// A `drop` rule matched; the index of the rule.
    DroppedByRule(usize),
    /// A `sample` or `deadband` action held it back and no rule forwarded it.
    Filtered(usize),
    /// The rule's `when` failed to evaluate (missing field, wrong type) and no rule forwarded it.
    EvalError(usize),
    /// No rule forwarded it.
    Unrouted,
}

/// Counters of one rule since the engine started (or since the rule was last changed).
#[derive(Debug, Clone, Default)]
pub struct RuleStats {
    /// `when` evaluation errors.
    pub eval_errors: u64,
    /// Readings a detect/aggregate/deadband action skipped: field absent or not numeric.
    pub skipped: u64,
    pub alerts_started: u64,
    pub alerts_cleared: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Sample {
    count: u64,
    last: Option<f64>,
}

#[derive(Debug, Default)]
struct Deadband {
    last: Option<(f64, f64)>,
}

#[derive(Debug)]
enum Runtime {
    None,
    Sample(States<Sample>),
    Deadband(States<Deadband>),
    Window(States<WindowState>),
    Detect(States<DetectorState>),
}

struct Rule {
    cfg: RuleConfig,
    scratch: crate::config::condition::Scratch,
    /// One per action, same order.
    state: Vec<Runtime>,
    stats: RuleStats,
}

impl Rule {
    fn new(cfg: &RuleConfig) -> Rule {
        Rule {
            state: cfg
                .actions
                .iter()
                .map(|a| match a {
                    ActionConfig::Sample { .. } => Runtime::Sample(States::default()),
                    ActionConfig::Deadband { .. } => Runtime::Deadband(States::default()),
                    ActionConfig::Aggregate(_) => Runtime::Window(States::default()),
                    ActionConfig::Detect(_) => Runtime::Detect(States::default()),
                    _ => Runtime::None,
                })
                .collect(),
            cfg: cfg.clone(),
            scratch: crate::config::condition::Scratch::default(),
            stats: RuleStats::default(),
        }
    }
}

/// Compiled rules and their state.
pub struct Engine {
    rules: Vec<Rule>,
    filters: Vec<String>,
    topic_prefix: String,
    settings: EngineSettings,
    sensors: Sensors,
    forwarded: Vec<String>,
    closed: Vec<Closed>,
    /// Strongest detector score of the last reading, and whether any detector was in alarm.
    last_score: f64,
    last_alarm: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.cfg.name).collect::<Vec<_>>(),
            )
            .field("sensors", &self.sensors.live())
            .finish()
    }
}

/// Seconds since the Unix epoch.
pub fn secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn system_time(s: f64) -> SystemTime {
    if s >= 0.0 {
        UNIX_EPOCH + Duration::from_secs_f64(s)
    } else {
        UNIX_EPOCH
    }
}

fn filters_of(rules: &[Rule]) -> Vec<String> {
    rules.iter().map(|r| r.cfg.filter.clone()).collect()
}

impl Engine {
    pub fn new(rules: &[RuleConfig], topic_prefix: &str) -> Engine {
        let settings = rules
            .first()
            .map(|r| r.settings.clone())
            .unwrap_or_default();
        let rules: Vec<Rule> = rules.iter().map(Rule::new).collect();
        Engine {
            filters: filters_of(&rules),
            rules,
            topic_prefix: topic_prefix.to_string(),
            sensors: Sensors::new(settings.max_sensors),
            settings,
            forwarded: Vec::new(),
            closed: Vec::new(),
            last_score: 0.0,
            last_alarm: false,
        }
    }

    /// Replace the rules; a rule whose name and configuration are unchanged keeps its state and
    /// counters. Returns the names of the rules that kept their state.
    pub fn reload(&mut self, rules: &[RuleConfig]) -> Vec<String> {
        let mut old: Vec<Option<Rule>> = std::mem::take(&mut self.rules)
            .into_iter()
            .map(Some)
            .collect();
        let mut kept = Vec::new();
        let mut new = Vec::with_capacity(rules.len());
        for cfg in rules {
            let prev = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| o.cfg.same_rule(cfg)))
                .and_then(Option::take);
            match prev {
                Some(r) => {
                    // Same rule; the engine-wide settings are the engine's (below).
                    kept.push(cfg.name.clone());
                    new.push(r);
                }
                None => new.push(Rule::new(cfg)),
            }
        }
        self.rules = new;
        if let Some(s) = rules.first().map(|r| r.settings.clone()) {
            self.sensors.max = s.max_sensors.max(1);
            self.settings = s;
        }
        self.filters = filters_of(&self.rules);
        self.sensors.remask(&self.filters);
        kept
    }

    pub fn rule_name(&self, index: usize) -> &str {
        self.rules
            .get(index)
            .map(|r| r.cfg.name.as_str())
            .unwrap_or("?")
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Per-rule counters, in rule order, with the number of detectors in alarm.
    pub fn stats(&self) -> Vec<(&str, &RuleStats, u64)> {
        self.rules
            .iter()
            .map(|r| {
                let mut alarms = 0;
                for st in &r.state {
                    if let Runtime::Detect(s) = st {
                        for (id, (gen, d)) in s.v.iter().enumerate() {
                            if d.active() && self.live(id as u32, *gen) {
                                alarms += 1;
                            }
                        }
                    }
                }
                (r.cfg.name.as_str(), &r.stats, alarms)
            })
            .collect()
    }

    /// Sensor states evicted since start (`max_sensors` reached).
    pub fn evicted(&self) -> u64 {
        self.sensors.evicted
    }

    /// Sensors currently tracked.
    pub fn sensors(&self) -> usize {
        self.sensors.live()
    }

    /// Strongest detector score for the last reading processed, and whether any detector of a
    /// matching rule was in alarm after it (for the backtest's `--scores`).
    pub fn last_score(&self) -> (f64, bool) {
        (self.last_score, self.last_alarm)
    }

    fn live(&self, id: u32, gen: u32) -> bool {
        self.sensors
            .slots
            .get(id as usize)
            .is_some_and(|s| s.live && s.gen == gen)
    }

    /// Evaluate `reading` (its `received` time is the clock), pushing actions to `out`.
    pub fn process(&mut self, reading: &Reading, out: &mut Vec<Action>) -> Disposition {
        let t = secs(reading.received);
        let id = self.sensors.slot(&reading.topic, &self.filters);
        let slot = &self.sensors.slots[id as usize];
        let gen = slot.gen;
        self.forwarded.clear();
        self.last_score = 0.0;
        self.last_alarm = false;
        let mut forwarded = false;
        let mut held: Option<Disposition> = None;
        let ctx = Ctx {
            prefix: &self.topic_prefix,
            alert_topic: &self.settings.alert_topic,
        };
        for (i, rule) in self.rules.iter_mut().enumerate() {
            if !mask_bit(&slot.mask, i) {
                continue;
            }
            if let Some(cond) = &rule.cfg.when {
                match cond.eval(reading, t, &mut rule.scratch) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        rule.stats.eval_errors += 1;
                        rule.stats.last_error = Some(e.to_string());
                        held.get_or_insert(Disposition::EvalError(i));
                        continue;
                    }
                }
            }
            let name = rule.cfg.name.as_str();
            for (action, state) in rule.cfg.actions.iter().zip(rule.state.iter_mut()) {
                match (action, state) {
                    (ActionConfig::Forward { topic, class }, _) => {
                        let upstream = match topic {
                            Some(tpl) => tpl.render(&reading.topic, name, &self.topic_prefix),
                            None => upstream_topic(&self.topic_prefix, &reading.topic),
                        };
                        if self.forwarded.contains(&upstream) {
                            continue;
                        }
                        out.push(Action::Forward(Event {
                            id: new_id(),
                            class: *class,
                            kind: TYPE_READING,
                            subject: reading.topic.clone(),
                            upstream_topic: upstream.clone(),
                            time: reading.received,
                            data: Data::from(&reading.payload),
                            traceparent: reading.traceparent.clone(),
                        }));
                        self.forwarded.push(upstream);
                        forwarded = true;
                    }
                    (ActionConfig::Publish { topic }, _) => {
                        let payload = match Data::from(&reading.payload) {
                            Data::Json(b) | Data::Binary(b) => b,
                        };
                        out.push(Action::Publish {
                            topic: topic.render(&reading.topic, name, ""),
                            payload,
                        });
                    }
                    (ActionConfig::Drop, _) => {
                        return if forwarded {
                            Disposition::Forwarded
                        } else {
                            Disposition::DroppedByRule(i)
                        };
                    }
                    (ActionConfig::Sample { every, interval }, Runtime::Sample(st)) => {
                        let s = st.get(id, gen);
                        let pass = match (every, interval) {
                            (Some(n), _) => {
                                s.count += 1;
                                (s.count - 1) % n == 0
                            }
                            (None, Some(iv)) => match s.last {
                                Some(last) if t - last < iv.as_secs_f64() => false,
                                _ => {
                                    s.last = Some(t);
                                    true
                                }
                            },
                            (None, None) => true,
                        };
                        if !pass {
                            held.get_or_insert(Disposition::Filtered(i));
                            break;
                        }
                    }
                    (
                        ActionConfig::Deadband {
                            field,
                            abs,
                            rel,
                            max_silence,
                        },
                        Runtime::Deadband(st),
                    ) => {
                        let Some(v) = reading.payload.field_f64(field) else {
                            rule.stats.skipped += 1;
                            held.get_or_insert(Disposition::Filtered(i));
                            break;
                        };
                        let s = st.get(id, gen);
                        let pass = match s.last {
                            None => true,
                            Some((lt, lv)) => {
                                let d = (v - lv).abs();
                                abs.is_some_and(|a| d > a)
                                    || rel.is_some_and(|r| d > r * lv.abs())
                                    || max_silence.is_some_and(|m| t - lt >= m.as_secs_f64())
                            }
                        };
                        if !pass {
                            held.get_or_insert(Disposition::Filtered(i));
                            break;
                        }
                        s.last = Some((t, v));
                    }
                    (ActionConfig::Aggregate(cfg), Runtime::Window(st)) => {
                        let Some(v) = reading.payload.field_f64(&cfg.field) else {
                            rule.stats.skipped += 1;
                            continue;
                        };
                        let closed = &mut self.closed;
                        closed.clear();
                        st.get(id, gen).add(cfg, t, v, &mut |c| closed.push(c));
                        for c in closed.iter() {
                            ctx.aggregate(name, cfg, &reading.topic, c, out);
                        }
                    }
                    (ActionConfig::Detect(cfg), Runtime::Detect(st)) => {
                        let Some(v) = reading.payload.field_f64(&cfg.field) else {
                            rule.stats.skipped += 1;
                            continue;
                        };
                        let verdict = st.get(id, gen).update(&cfg.detector, t, v);
                        self.last_score = self.last_score.max(verdict.score);
                        self.last_alarm |= verdict.active;
                        if let Some(tr) = verdict.transition {
                            match tr {
                                Transition::Start => rule.stats.alerts_started += 1,
                                Transition::Clear => rule.stats.alerts_cleared += 1,
                            }
                            ctx.alert(
                                name,
                                cfg,
                                &reading.topic,
                                reading.received,
                                Some(v),
                                &verdict,
                                tr,
                                reading.traceparent.as_deref(),
                                out,
                            );
                        }
                    }
                    // Action and state kinds always correspond (built together in Rule::new).
                    _ => {}
                }
            }
        }
        if forwarded {
            Disposition::Forwarded
        } else {
            held.unwrap_or(Disposition::Unrouted)
        }
    }

    /// Timers: `missing` detectors and windows that ended without a reading after them.
    pub fn tick(&mut self, now: SystemTime, out: &mut Vec<Action>) {
        let t = secs(now);
        let ctx = Ctx {
            prefix: &self.topic_prefix,
            alert_topic: &self.settings.alert_topic,
        };
        let sensors = &self.sensors;
        for rule in self.rules.iter_mut() {
            let name = rule.cfg.name.as_str();
            for (action, state) in rule.cfg.actions.iter().zip(rule.state.iter_mut()) {
                match (action, state) {
                    (ActionConfig::Detect(cfg), Runtime::Detect(st)) => {
                        for (id, (gen, d)) in st.v.iter_mut().enumerate() {
                            let Some(slot) = sensors.slots.get(id) else {
                                continue;
                            };
                            if !slot.live || slot.gen != *gen {
                                continue;
                            }
                            if let Some(tr) = d.tick(&cfg.detector, t) {
                                rule.stats.alerts_started += 1;
                                let verdict = Verdict {
                                    transition: Some(tr),
                                    score: 1.0,
                                    active: true,
                                    ..Verdict::default()
                                };
                                ctx.alert(
                                    name,
                                    cfg,
                                    sensors.topic(id as u32),
                                    now,
                                    None,
                                    &verdict,
                                    tr,
                                    None,
                                    out,
                                );
                            }
                        }
                    }
                    (ActionConfig::Aggregate(cfg), Runtime::Window(st)) => {
                        for (id, (gen, w)) in st.v.iter_mut().enumerate() {
                            let Some(slot) = sensors.slots.get(id) else {
                                continue;
                            };
                            if !slot.live || slot.gen != *gen {
                                continue;
                            }
                            let closed = &mut self.closed;
                            closed.clear();
                            w.advance(cfg, t, &mut |c| closed.push(c));
                            for c in closed.iter() {
                                ctx.aggregate(name, cfg, sensors.topic(id as u32), c, out);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What event construction needs from the engine.
struct Ctx<'a> {
    prefix: &'a str,
    alert_topic: &'a str,
}

fn num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

impl Ctx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn alert(
        &self,
        rule: &str,
        cfg: &DetectConfig,
        sensor: &str,
        time: SystemTime,
        value: Option<f64>,
        verdict: &Verdict,
        tr: Transition,
        traceparent: Option<&str>,
        out: &mut Vec<Action>,
    ) {
        let data = serde_json::json!({
            "rule": rule,
            "sensor": sensor,
            "detector": cfg.detector.name(),
            "field": cfg.field,
            "state": match tr { Transition::Start => "start", Transition::Clear => "clear" },
            "value": value.map(num),
            "expected": verdict.expected.map(num),
            "band": verdict.band.map(|(lo, hi)| [num(lo), num(hi)]),
            "score": num((verdict.score * 1e4).round() / 1e4),
            "severity": cfg.severity.name(),
            "time": humantime::format_rfc3339_micros(time).to_string(),
        });
        let bytes = Bytes::from(serde_json::to_vec(&data).unwrap_or_default());
        if cfg.local {
            out.push(Action::Publish {
                topic: format!("{}/{rule}/{sensor}", self.alert_topic),
                payload: bytes.clone(),
            });
        }
        if cfg.upstream {
            let upstream_topic = match &cfg.topic {
                Some(tpl) => tpl.render(sensor, rule, self.prefix),
                None => upstream_topic(self.prefix, &format!("alerts/{rule}/{sensor}")),
            };
            out.push(Action::Forward(Event {
                id: new_id(),
                class: Class::Alert,
                kind: TYPE_ALERT,
                subject: sensor.to_string(),
                upstream_topic,
                time,
                data: Data::Json(bytes),
                // The reading that raised it carries the trace on (W3C trace context).
                traceparent: traceparent.map(str::to_string),
            }));
        }
    }

    fn aggregate(
        &self,
        rule: &str,
        cfg: &AggregateConfig,
        sensor: &str,
        c: &Closed,
        out: &mut Vec<Action>,
    ) {
        let mut m = serde_json::Map::new();
        m.insert("rule".into(), rule.into());
        m.insert("sensor".into(), sensor.into());
        m.insert("field".into(), cfg.field.clone().into());
        m.insert(
            "window_start".into(),
            humantime::format_rfc3339_millis(system_time(c.start))
                .to_string()
                .into(),
        );
        m.insert(
            "window_end".into(),
            humantime::format_rfc3339_millis(system_time(c.end))
                .to_string()
                .into(),
        );
        for s in &cfg.stats {
            m.insert(s.name().into(), num(c.acc.stat(*s)));
        }
        let bytes = Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
        if let Some(tpl) = &cfg.publish {
            out.push(Action::Publish {
                topic: tpl.render(sensor, rule, ""),
                payload: bytes.clone(),
            });
        }
        let upstream_topic = match &cfg.topic {
            Some(tpl) => tpl.render(sensor, rule, self.prefix),
            None => upstream_topic(self.prefix, &format!("{sensor}/aggregate")),
        };
        out.push(Action::Forward(Event {
            id: new_id(),
            class: cfg.class,
            kind: TYPE_AGGREGATE,
            subject: sensor.to_string(),
            upstream_topic,
            time: system_time(c.end),
            data: Data::Json(bytes),
            traceparent: None,
        }));
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
mod tests;
