//! What the status page knows about sensors and alerts, kept by the rules stage itself.
//!
//! Invariants:
//! - The rules stage is the only owner ([`Tap`] lives in the stage task): recording a reading is
//!   a hash lookup and a few stores, with no lock and no channel send. The HTTP side asks for a
//!   snapshot over a bounded channel ([`Request`]), answered between readings.
//! - Bounded: at most the rules engine's `max_sensors` sensors (the least recently seen
//!   sixteenth is evicted when full, like the engine's own table), [`RECENT_ALERTS`] alert
//!   transitions and [`MAX_ACTIVE`] active alerts. Per sensor: [`SensorHistory`] (208 bytes,
//!   checked by a test) plus its topic and the hash table's slot.
//! - The numeric value of an object payload is parsed at most once per second per sensor (a
//!   fast sensor costs a copy of a few bytes per reading, not a JSON parse).
//!
//! Layer: stages (rules): the app's status page (`app::web`) asks it, it never imports the app.

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::IgnoredAny;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::core::decode::Payload;
use crate::core::event::Reading;
use crate::rules::Engine;

/// Points of a sensor's sparkline: one per minute, the last hour.
pub const SPARK_POINTS: usize = 60;
/// Bytes of the last payload kept for display.
pub const PREVIEW_BYTES: usize = 40;
/// Alert starts and clears kept, newest first.
pub const RECENT_ALERTS: usize = 100;
/// Active alerts tracked (rule, detector, sensor); more are counted, not kept.
pub const MAX_ACTIVE: usize = 1000;
/// Rows one `/api/sensors` answer holds at most.
pub const MAX_ROWS: usize = 1000;

/// bfloat16 NaN: a minute without a value.
const NONE16: u16 = 0x7fc0;

fn to_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return NONE16;
    }
    // Round to nearest (ties to even) on the dropped half.
    let b = v.to_bits();
    let round = 0x7fff + ((b >> 16) & 1);
    (b.saturating_add(round) >> 16) as u16
}

fn from_bf16(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

const BINARY: u8 = 1;
const TRUNCATED: u8 = 2;

/// One sensor's state for the page. Fixed size: no allocation per reading.
#[derive(Clone)]
pub struct SensorHistory {
    /// Unix seconds of the last reading.
    last_seen: f64,
    /// Moving average of the gap between readings (seconds); 0 until the second reading.
    interval: f32,
    /// Last numeric value (NaN: none).
    value: f32,
    /// Minute (Unix seconds / 60) of the last reading.
    minute: u32,
    per_min_cur: u32,
    per_min_prev: u32,
    /// Second of the last value extraction.
    sampled: u32,
    total: u64,
    /// Value per minute (the last sampled in that minute) as bfloat16 (the top half of an
    /// `f32`: about 3 significant digits, plenty for a line 24 pixels high), indexed by
    /// minute % 60; [`NONE16`]: no reading that minute.
    spark: [u16; SPARK_POINTS],
    preview_len: u8,
    flags: u8,
    /// Active alerts on this sensor.
    alerts: u16,
    preview: [u8; PREVIEW_BYTES],
}

impl SensorHistory {
    fn new() -> SensorHistory {
        SensorHistory {
            last_seen: 0.0,
            interval: 0.0,
            value: f32::NAN,
            minute: 0,
            per_min_cur: 0,
            per_min_prev: 0,
            sampled: 0,
            total: 0,
            spark: [NONE16; SPARK_POINTS],
            preview_len: 0,
            flags: 0,
            alerts: 0,
            preview: [0; PREVIEW_BYTES],
        }
    }

    fn record(&mut self, t: f64, payload: &Payload) {
        let sec = t.max(0.0) as u64;
        let minute = (sec / 60) as u32;
        if self.total > 0 {
            let gap = (t - self.last_seen).max(0.0) as f32;
            self.interval = if self.total == 1 {
                gap
            } else {
                0.8 * self.interval + 0.2 * gap
            };
        }
        if minute != self.minute {
            self.per_min_prev = if minute == self.minute.wrapping_add(1) {
                self.per_min_cur
            } else {
                0
            };
            self.per_min_cur = 0;
            // Minutes without a reading since the last one get no point.
            let gap = minute.wrapping_sub(self.minute) as usize;
            for k in 1..=gap.min(SPARK_POINTS) {
                let m = self.minute.wrapping_add(k as u32);
                self.spark[m as usize % SPARK_POINTS] = NONE16;
            }
            self.minute = minute;
        }
        self.per_min_cur = self.per_min_cur.saturating_add(1);
        self.total += 1;
        self.last_seen = t;

        let (bytes, binary, number) = match payload {
            Payload::Number { value, json } => (json, false, Some(*value)),
            Payload::Object(b) | Payload::OtherJson(b) => (b, false, None),
            Payload::Opaque(b) => (b, true, None),
        };
        let n = bytes.len().min(PREVIEW_BYTES);
        self.preview[..n].copy_from_slice(&bytes[..n]);
        self.preview_len = n as u8;
        self.flags = if binary { BINARY } else { 0 } | if n < bytes.len() { TRUNCATED } else { 0 };

        let value = match (number, payload) {
            (Some(v), _) => Some(v),
            (None, Payload::Object(b)) if self.sampled != sec as u32 || self.total == 1 => {
                self.sampled = sec as u32;
                first_number(b)
            }
            _ => None,
        };
        if let Some(v) = value {
            self.value = v as f32;
            self.spark[minute as usize % SPARK_POINTS] = to_bf16(v as f32);
        }
    }

    /// The sparkline ending at `now_minute`, oldest first.
    fn sparkline(&self, now_minute: u32) -> Vec<Option<f32>> {
        (0..SPARK_POINTS as u32)
            .rev()
            .map(|back| {
                let m = now_minute.wrapping_sub(back);
                // Points older than the last reading's minute are in the ring; later minutes
                // had no reading; a minute more than an hour before the last is gone.
                if m > self.minute || self.minute - m >= SPARK_POINTS as u32 {
                    None
                } else {
                    let v = from_bf16(self.spark[m as usize % SPARK_POINTS]);
                    (!v.is_nan()).then_some(v)
                }
            })
            .collect()
    }

    fn per_minute(&self, now_minute: u32) -> u32 {
        if self.minute == now_minute {
            self.per_min_prev.max(self.per_min_cur)
        } else if self.minute.wrapping_add(1) == now_minute {
            self.per_min_cur
        } else {
            0
        }
    }

    /// No reading for three of its usual gaps, and at least 10 s (a sensor seen once: 60 s).
    fn stale(&self, age: f64) -> bool {
        let usual = if self.total < 2 {
            20.0
        } else {
            self.interval as f64
        };
        age > (3.0 * usual).max(10.0)
    }

    fn preview_text(&self) -> String {
        let b = &self.preview[..self.preview_len as usize];
        if self.flags & BINARY != 0 {
            return b.iter().map(|c| format!("{c:02x}")).collect();
        }
        match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            // Cut inside a character: keep the valid prefix.
            Err(e) => String::from_utf8_lossy(&b[..e.valid_up_to()]).into_owned(),
        }
    }
}

/// The first numeric top-level member of a JSON object (e.g. `21.5` in `{"t": 21.5}`).
fn first_number(json: &[u8]) -> Option<f64> {
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while m.next_key::<IgnoredAny>()?.is_some() {
                if found.is_none() {
                    found = m.next_value::<Num>()?.0;
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    struct Num(Option<f64>);
    impl<'de> serde::Deserialize<'de> for Num {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Num;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON value")
                }
                fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
                    Ok(Num(Some(v)))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
                    Ok(Num(Some(v as f64)))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                    Ok(Num(Some(v as f64)))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Num, E> {
                    Ok(Num(None))
                }
                fn visit_unit<E>(self) -> Result<Num, E> {
                    Ok(Num(None))
                }
                fn visit_str<E>(self, _: &str) -> Result<Num, E> {
                    Ok(Num(None))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut s: A,
                ) -> Result<Num, A::Error> {
                    while s.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Num(None))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Num, A::Error> {
                    while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Num(None))
                }
            }
            d.deserialize_any(V)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, First)
        .ok()
        .flatten()
}

/// How `/api/sensors` orders its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Topic,
    LastSeen,
    Rate,
    Alerts,
}

/// Which sensors `/api/sensors` returns.
#[derive(Debug, Clone)]
pub struct SensorQuery {
    /// Topics containing this text (ASCII case-insensitive); empty: all.
    pub filter: String,
    pub sort: SortBy,
    pub descending: bool,
    pub offset: usize,
    pub limit: usize,
}

impl Default for SensorQuery {
    fn default() -> Self {
        SensorQuery {
            filter: String::new(),
            sort: SortBy::Topic,
            descending: false,
            offset: 0,
            limit: 200,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SensorRow {
    pub topic: String,
    /// The start of the last payload (hex when binary).
    pub payload: String,
    pub truncated: bool,
    pub binary: bool,
    /// Last numeric value (a number payload, or an object's first numeric member).
    pub value: Option<f32>,
    pub last_seen: String,
    pub age_s: f64,
    pub stale: bool,
    pub per_min: u32,
    pub readings: u64,
    /// Usual gap between readings (seconds).
    pub interval_s: f32,
    /// One point per minute, oldest first, the last ending at the current minute.
    pub spark: Vec<Option<f32>>,
    pub alerts: Vec<ActiveRef>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ActiveRef {
    pub rule: String,
    pub detector: String,
}

#[derive(Debug, Serialize)]
pub struct SensorPage {
    /// Sensors tracked.
    pub total: usize,
    /// Sensors that match the filter.
    pub matched: usize,
    pub max: usize,
    /// Sensors forgotten since start (the table was full).
    pub evicted: u64,
    pub sensors: Vec<SensorRow>,
}

#[derive(Debug, Serialize)]
pub struct AlertPage {
    /// Starts and clears, newest first (each the alert's own JSON document).
    pub recent: Vec<serde_json::Value>,
    /// Alerts started and not cleared.
    pub active: Vec<serde_json::Value>,
    /// Active alerts not kept (more than the tracking limit).
    pub active_untracked: u64,
    pub total_started: u64,
    pub total_cleared: u64,
}

#[derive(Debug, Serialize)]
pub struct RuleRow {
    pub name: String,
    pub in_alarm: u64,
    pub eval_errors: u64,
    pub skipped: u64,
    pub alerts_started: u64,
    pub alerts_cleared: u64,
    pub last_error: Option<String>,
}

/// A question from the HTTP side to the rules stage.
pub enum Request {
    Sensors(SensorQuery, oneshot::Sender<SensorPage>),
    Alerts(oneshot::Sender<AlertPage>),
    Rules(oneshot::Sender<Vec<RuleRow>>),
}

/// Sender side of the snapshot requests (capacity [`REQUESTS`]: a flood of page loads is
/// turned away, never queued up in front of the readings).
pub const REQUESTS: usize = 8;

/// The page's recorder inside the rules stage.
pub struct Tap {
    sensors: HashMap<Box<str>, SensorHistory, ahash::RandomState>,
    evicted: u64,
    recent: VecDeque<serde_json::Value>,
    /// (rule, detector, sensor) -> the alert's start document.
    active: HashMap<(String, String, String), serde_json::Value, ahash::RandomState>,
    active_untracked: u64,
    started: u64,
    cleared: u64,
    /// The last alert document recorded: an alert published locally and forwarded is one alert.
    last_alert: bytes::Bytes,
    scratch: Vec<f64>,
    pub requests: flume::Receiver<Request>,
}

impl Tap {
    pub fn channel() -> (Tap, flume::Sender<Request>) {
        let (tx, rx) = flume::bounded(REQUESTS);
        let tap = Tap {
            sensors: HashMap::default(),
            evicted: 0,
            recent: VecDeque::with_capacity(RECENT_ALERTS),
            active: HashMap::default(),
            active_untracked: 0,
            started: 0,
            cleared: 0,
            last_alert: bytes::Bytes::new(),
            scratch: Vec::new(),
            requests: rx,
        };
        (tap, tx)
    }

    /// Record one reading (the hot path). `max`: the engine's `max_sensors`.
    pub fn reading(&mut self, reading: &Reading, max: usize) {
        let t = crate::rules::secs(reading.received);
        if let Some(h) = self.sensors.get_mut(reading.topic.as_str()) {
            h.record(t, &reading.payload);
            return;
        }
        if self.sensors.len() >= max.max(1) {
            self.evict();
        }
        let mut h = SensorHistory::new();
        h.record(t, &reading.payload);
        self.sensors.insert(reading.topic.as_str().into(), h);
    }

    /// Forget the least recently seen sixteenth (at least one).
    fn evict(&mut self) {
        self.scratch.clear();
        self.scratch
            .extend(self.sensors.values().map(|h| h.last_seen));
        let n = (self.scratch.len() / 16).max(1).min(self.scratch.len());
        if n == 0 {
            return;
        }
        let (_, nth, _) = self.scratch.select_nth_unstable_by(n - 1, f64::total_cmp);
        let threshold = *nth;
        // Ties at the threshold: remove only as many as needed.
        let below = self.scratch.iter().filter(|&&s| s < threshold).count();
        let mut ties = n - below;
        self.sensors.retain(|_, h| {
            if h.last_seen < threshold {
                false
            } else if h.last_seen == threshold && ties > 0 {
                ties -= 1;
                false
            } else {
                true
            }
        });
        self.evicted += n as u64;
        let sensors = &self.sensors;
        self.active
            .retain(|(_, _, sensor), _| sensors.contains_key(sensor.as_str()));
    }

    /// An alert document the rules emitted (published locally and/or forwarded).
    pub fn alert(&mut self, payload: &bytes::Bytes) {
        if *payload == self.last_alert {
            return;
        }
        self.last_alert = payload.clone();
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let field = |k: &str| {
            doc.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let key = (field("rule"), field("detector"), field("sensor"));
        match doc.get("state").and_then(|v| v.as_str()) {
            Some("start") => {
                self.started += 1;
                if !self.active.contains_key(&key) {
                    if self.active.len() >= MAX_ACTIVE {
                        self.active_untracked += 1;
                    } else {
                        if let Some(h) = self.sensors.get_mut(key.2.as_str()) {
                            h.alerts = h.alerts.saturating_add(1);
                        }
                        self.active.insert(key, doc.clone());
                    }
                }
            }
            Some("clear") => {
                self.cleared += 1;
                if self.active.remove(&key).is_some() {
                    if let Some(h) = self.sensors.get_mut(key.2.as_str()) {
                        h.alerts = h.alerts.saturating_sub(1);
                    }
                }
            }
            _ => return,
        }
        if self.recent.len() >= RECENT_ALERTS {
            self.recent.pop_back();
        }
        self.recent.push_front(doc);
    }

    /// Rules were reloaded: a rule that did not keep its state has no active alerts any more.
    pub fn rules_reloaded(&mut self, kept: &[String]) {
        let sensors = &mut self.sensors;
        self.active.retain(|(rule, _, sensor), _| {
            let keep = kept.iter().any(|k| k == rule);
            if !keep {
                if let Some(h) = sensors.get_mut(sensor.as_str()) {
                    h.alerts = h.alerts.saturating_sub(1);
                }
            }
            keep
        });
    }

    /// Answer a request from the HTTP side (called between readings).
    pub fn answer(&self, req: Request, engine: &Engine) {
        match req {
            Request::Sensors(q, reply) => {
                let _ = reply.send(self.sensor_page(&q, engine.settings().max_sensors));
            }
            Request::Alerts(reply) => {
                let _ = reply.send(AlertPage {
                    recent: self.recent.iter().cloned().collect(),
                    active: self.active.values().cloned().collect(),
                    active_untracked: self.active_untracked,
                    total_started: self.started,
                    total_cleared: self.cleared,
                });
            }
            Request::Rules(reply) => {
                let rows = engine
                    .stats()
                    .into_iter()
                    .map(|(name, s, alarms)| RuleRow {
                        name: name.to_string(),
                        in_alarm: alarms,
                        eval_errors: s.eval_errors,
                        skipped: s.skipped,
                        alerts_started: s.alerts_started,
                        alerts_cleared: s.alerts_cleared,
                        last_error: s.last_error.clone(),
                    })
                    .collect();
                let _ = reply.send(rows);
            }
        }
    }

    pub fn sensor_page(&self, q: &SensorQuery, max: usize) -> SensorPage {
        let now = crate::rules::secs(SystemTime::now());
        let now_minute = (now.max(0.0) as u64 / 60) as u32;
        let mut rows: Vec<(&str, &SensorHistory)> = self
            .sensors
            .iter()
            .filter(|(topic, _)| contains_ignore_ascii_case(topic, &q.filter))
            .map(|(t, h)| (&**t, h))
            .collect();
        let matched = rows.len();
        let key = |a: &(&str, &SensorHistory), b: &(&str, &SensorHistory)| {
            let o = match q.sort {
                SortBy::Topic => std::cmp::Ordering::Equal,
                SortBy::LastSeen => a.1.last_seen.total_cmp(&b.1.last_seen),
                SortBy::Rate => a.1.per_minute(now_minute).cmp(&b.1.per_minute(now_minute)),
                SortBy::Alerts => a.1.alerts.cmp(&b.1.alerts),
            };
            let o = if q.descending { o.reverse() } else { o };
            // Ties (and the topic sort) in topic order, which follows `descending` only when
            // it is the sort key.
            o.then_with(|| {
                let t = a.0.cmp(b.0);
                if q.sort == SortBy::Topic && q.descending {
                    t.reverse()
                } else {
                    t
                }
            })
        };
        let end = q
            .offset
            .saturating_add(q.limit.min(MAX_ROWS))
            .min(rows.len());
        let start = q.offset.min(end);
        if end > 0 && end < rows.len() {
            rows.select_nth_unstable_by(end - 1, key);
            rows.truncate(end);
        }
        rows.sort_unstable_by(key);
        let sensors = rows[start..end]
            .iter()
            .map(|(topic, h)| {
                let age = (now - h.last_seen).max(0.0);
                SensorRow {
                    topic: topic.to_string(),
                    payload: h.preview_text(),
                    truncated: h.flags & TRUNCATED != 0,
                    binary: h.flags & BINARY != 0,
                    value: (!h.value.is_nan()).then_some(h.value),
                    last_seen: rfc3339(h.last_seen),
                    age_s: (age * 10.0).round() / 10.0,
                    stale: h.stale(age),
                    per_min: h.per_minute(now_minute),
                    readings: h.total,
                    interval_s: h.interval,
                    spark: h.sparkline(now_minute),
                    alerts: self
                        .active
                        .keys()
                        .filter(|(_, _, s)| h.alerts > 0 && s == topic)
                        .map(|(rule, detector, _)| ActiveRef {
                            rule: rule.clone(),
                            detector: detector.clone(),
                        })
                        .collect(),
                }
            })
            .collect();
        SensorPage {
            total: self.sensors.len(),
            matched,
            max,
            evicted: self.evicted,
            sensors,
        }
    }
}

fn contains_ignore_ascii_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// RFC 3339, whole seconds, UTC.
pub fn rfc3339(unix_secs: f64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(unix_secs.max(0.0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading(topic: &str, t: f64, payload: &str) -> Reading {
        Reading {
            topic: topic.into(),
            received: UNIX_EPOCH + Duration::from_secs_f64(t),
            payload: Payload::decode(bytes::Bytes::copy_from_slice(payload.as_bytes())),
            traceparent: None,
        }
    }

    #[test]
    fn state_per_sensor_is_small() {
        assert_eq!(std::mem::size_of::<SensorHistory>(), 208);
    }

    #[test]
    fn sparkline_rate_and_preview() {
        let mut h = SensorHistory::new();
        let base = 60.0 * 1_000_000.0;
        // Minute 0: three readings; minute 2: one; minute 1 has none.
        h.record(base, &reading("a", base, "1").payload);
        h.record(base + 20.0, &reading("a", base + 20.0, "2").payload);
        h.record(base + 40.0, &reading("a", base + 40.0, "3").payload);
        h.record(
            base + 130.0,
            &reading("a", base + 130.0, r#"{"ok":true,"t":7.5,"u":1}"#).payload,
        );
        let m = (base / 60.0) as u32;
        let s = h.sparkline(m + 2);
        assert_eq!(s.len(), SPARK_POINTS);
        assert_eq!(&s[SPARK_POINTS - 3..], &[Some(3.0), None, Some(7.5)]);
        // bfloat16: about three significant digits.
        for v in [21.37f32, -0.0123, 1013.25, 1e9] {
            let back = from_bf16(to_bf16(v));
            assert!((back - v).abs() <= v.abs() / 256.0, "{v} -> {back}");
        }
        assert!(s[..SPARK_POINTS - 3].iter().all(Option::is_none));
        assert_eq!(h.per_minute(m + 2), 1);
        assert_eq!(h.per_minute(m + 3), 1);
        assert_eq!(h.per_minute(m + 4), 0);
        assert_eq!(h.preview_text(), r#"{"ok":true,"t":7.5,"u":1}"#);
        // An hour later the old points are gone.
        assert!(h.sparkline(m + 2 + 60).iter().all(Option::is_none));
        // Long and binary payloads are cut.
        let long = format!("{{\"v\":\"{}\"}}", "é".repeat(40));
        h.record(base + 131.0, &reading("a", 0.0, &long).payload);
        assert!(h.flags & TRUNCATED != 0);
        assert!(long.starts_with(&h.preview_text()) && h.preview_text().len() <= PREVIEW_BYTES);
        h.record(
            base + 132.0,
            &Payload::decode(bytes::Bytes::from_static(&[0xff, 0x00])),
        );
        assert_eq!(h.preview_text(), "ff00");
    }

    #[test]
    fn bounded_table_evicts_the_least_recently_seen() {
        let (mut tap, _tx) = Tap::channel();
        for i in 0..32 {
            tap.reading(&reading(&format!("s/{i}"), 1000.0 + i as f64, "1"), 32);
        }
        tap.reading(&reading("s/0", 2000.0, "1"), 32);
        tap.reading(&reading("s/new", 2001.0, "1"), 32);
        assert_eq!(tap.sensors.len(), 31);
        assert_eq!(tap.evicted, 2);
        assert!(tap.sensors.contains_key("s/0"));
        assert!(!tap.sensors.contains_key("s/1") && !tap.sensors.contains_key("s/2"));
        // Every sensor seen in the same second: still only a sixteenth goes.
        let (mut tap, _tx) = Tap::channel();
        for i in 0..64 {
            tap.reading(&reading(&format!("s/{i}"), 1000.0, "1"), 64);
        }
        tap.reading(&reading("s/x", 1000.0, "1"), 64);
        assert_eq!(tap.sensors.len(), 61);
    }

    #[test]
    fn query_filters_sorts_and_pages() {
        let (mut tap, _tx) = Tap::channel();
        let now = crate::rules::secs(SystemTime::now());
        for (i, t) in ["b/Temp", "a/temp", "c/hum", "d/TEMP"].iter().enumerate() {
            tap.reading(&reading(t, now - 100.0 + i as f64, "1"), 100);
        }
        let q = SensorQuery {
            filter: "temp".into(),
            ..SensorQuery::default()
        };
        let p = tap.sensor_page(&q, 100);
        let topics: Vec<_> = p.sensors.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!((p.total, p.matched), (4, 3));
        assert_eq!(topics, ["a/temp", "b/Temp", "d/TEMP"]);
        let q = SensorQuery {
            sort: SortBy::LastSeen,
            descending: true,
            offset: 1,
            limit: 2,
            ..SensorQuery::default()
        };
        let p = tap.sensor_page(&q, 100);
        let topics: Vec<_> = p.sensors.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["c/hum", "a/temp"]);
        assert!(p.sensors.iter().all(|r| r.stale));
    }

    #[test]
    fn alerts_start_clear_once_each() {
        let (mut tap, _tx) = Tap::channel();
        tap.reading(&reading("s/1", 1000.0, "1"), 10);
        let start = bytes::Bytes::from_static(
            br#"{"rule":"r","sensor":"s/1","detector":"threshold","state":"start","value":99}"#,
        );
        tap.alert(&start);
        // The same alert seen again (local copy, then upstream): one alert.
        tap.alert(&start.clone());
        assert_eq!((tap.started, tap.active.len()), (1, 1));
        assert_eq!(tap.sensors["s/1"].alerts, 1);
        tap.alert(&bytes::Bytes::from_static(
            br#"{"rule":"r","sensor":"s/1","detector":"threshold","state":"clear","value":1}"#,
        ));
        assert_eq!((tap.cleared, tap.active.len(), tap.recent.len()), (1, 0, 2));
        assert_eq!(tap.sensors["s/1"].alerts, 0);
        assert_eq!(tap.recent[0]["state"], "clear");
        tap.alert(&start);
        tap.rules_reloaded(&[]);
        assert!(tap.active.is_empty());
        assert_eq!(tap.sensors["s/1"].alerts, 0);
    }
}
