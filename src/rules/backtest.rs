//! `edgegate backtest`: recorded readings through the rules, offline, at full speed.
//!
//! Input: CSV read with the `csv` crate (quoted fields, `,` `;` or tab as delimiter, found from
//! the first line), or JSON lines (`{"timestamp": ..., "topic": ..., <fields>}`; the fields
//! other than timestamp and topic are the payload).
//! - Without a header: `timestamp,value[,topic]`.
//! - With a header, columns are found by name: `timestamp`/`time`/`ts`/`datetime`/`date`, and
//!   `topic`. If there is a `value` column, it is the one sensor of the file. Otherwise **every
//!   other column is one sensor** (SKAB's `datetime;Accelerometer1RMS;...;Volume Flow RateRMS`),
//!   on topic `{topic}/{column}`; label columns (`anomaly`, `changepoint`, `label`,
//!   `is_anomaly`) are never fed to the rules. A row of such a file is one instant of one
//!   machine: its score is the highest of its sensors', its alert says whether any of them
//!   started an episode.
//!
//! Timestamps: RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` (UTC), or Unix seconds. A UTF-8 byte order
//! mark at the start of the input is skipped.
//!
//! Output: the events the rules produce, one CloudEvents JSON per line (and local publishes as
//! `{"publish": topic, "payload": ...}`); with `--scores`, one CSV line per row instead:
//! `timestamp,value,score,alert`, where `score` is the highest detector score of the row (an
//! anomaly likelihood in [0, 1], see `rules::detect`) and `alert` is 1 on the row where an alert
//! episode started, 0 otherwise. With `--labels`, the directory mode of [`score`]: every `*.csv`
//! under a directory, scored against labelled incident windows.

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{Action, Engine};
use crate::config::RuleConfig;
use crate::core::decode::Payload;
use crate::core::event::{Reading, TYPE_ALERT};

pub mod score;

/// The rules used without `--config`: those of the shipped `config/edgegate.toml`.
pub fn default_rules() -> Vec<RuleConfig> {
    crate::config::Config::defaults().rules
}

/// Parse a timestamp: RFC 3339, `YYYY-MM-DD HH:MM:SS`, or Unix seconds.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let t = text.trim().trim_matches('"');
    if let Ok(secs) = t.parse::<f64>() {
        // Checked: a huge number (1e20) is no time and must not panic the backtest.
        return Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d));
    }
    humantime::parse_rfc3339_weak(t)
        .or_else(|_| humantime::parse_rfc3339(t))
        .ok()
        .or_else(|| {
            // RFC 3339 with an offset other than Z: humantime takes only Z.
            let (base, off) = t
                .rsplit_once(['+', '-'])
                .filter(|(b, o)| b.len() >= 19 && o.len() == 5 && o.as_bytes()[2] == b':')?;
            let sign = if t.as_bytes()[base.len()] == b'+' {
                -1i64
            } else {
                1
            };
            let h: u64 = off[..2].parse().ok()?;
            let m: u64 = off[3..].parse().ok()?;
            let local = humantime::parse_rfc3339_weak(base).ok()?;
            let shift = Duration::from_secs(h * 3600 + m * 60);
            if sign > 0 {
                Some(local + shift)
            } else {
                local.checked_sub(shift)
            }
        })
}

/// One input row: one or more readings taken at the same time.
pub struct Record {
    pub stamp: String,
    pub time: SystemTime,
    /// The value as written (for `--scores`), and the reading.
    pub readings: Vec<(String, Reading)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("line {line}: {msg}")]
    Input { line: u64, msg: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Columns that label the data rather than measure it: never fed to the rules.
const LABEL_COLUMNS: [&str; 4] = ["anomaly", "changepoint", "label", "is_anomaly"];
const TIME_COLUMNS: [&str; 5] = ["timestamp", "time", "ts", "datetime", "date"];

struct Columns {
    ts: usize,
    /// Column index and topic of each sensor (topic `None`: the row's topic).
    values: Vec<(usize, Option<String>)>,
    topic: Option<usize>,
}

/// A column name as one MQTT topic level: no separators or wildcards.
fn topic_level(name: &str) -> String {
    name.chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect()
}

enum Source<R: BufRead> {
    Csv(csv::Reader<R>, csv::StringRecord),
    Json(std::io::Lines<R>, u64),
}

/// Reads records from CSV or JSON lines.
pub struct Reader<R: BufRead> {
    source: Source<R>,
    columns: Option<Columns>,
    topic: String,
}

/// UTF-8 byte order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// The delimiter of a CSV whose first line is `line`: the most frequent of `,` `;` and tab.
fn sniff_delimiter(line: &[u8]) -> u8 {
    let count = |d: u8| line.iter().filter(|&&b| b == d).count();
    [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|&d| (count(d), d == b','))
        .unwrap_or(b',')
}

impl<R: BufRead> Reader<R> {
    pub fn new(mut input: R, default_topic: &str) -> Result<Self, BacktestError> {
        // A byte order mark is no part of the first line (JSON lines after one were taken for
        // CSV; the csv crate skips one itself).
        if input.fill_buf()?.starts_with(BOM) {
            input.consume(BOM.len());
        }
        // Peek at the first meaningful line (within the buffer) to choose the format.
        let head = input.fill_buf()?;
        let first = head
            .split(|&b| b == b'\n')
            .map(|l| l.trim_ascii())
            .find(|l| !l.is_empty() && !l.starts_with(b"#"))
            .unwrap_or_default();
        let source = if first.starts_with(b"{") {
            Source::Json(input.lines(), 0)
        } else {
            let reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .delimiter(sniff_delimiter(first))
                .flexible(true)
                .trim(csv::Trim::All)
                .comment(Some(b'#'))
                .from_reader(input);
            Source::Csv(reader, csv::StringRecord::new())
        };
        Ok(Reader {
            source,
            columns: None,
            topic: default_topic.to_string(),
        })
    }

    pub fn next_record(&mut self) -> Result<Option<Record>, BacktestError> {
        match &mut self.source {
            Source::Json(lines, line) => loop {
                let Some(text) = lines.next() else {
                    return Ok(None);
                };
                let text = text?;
                *line += 1;
                let text = text.trim();
                if text.is_empty() || text.starts_with('#') {
                    continue;
                }
                return json(text, &self.topic)
                    .map(Some)
                    .map_err(|e| BacktestError::Input {
                        line: *line,
                        msg: e.to_string(),
                    });
            },
            Source::Csv(reader, row) => loop {
                let more = reader.read_record(row).map_err(|e| {
                    let line = e.position().map_or(0, |p| p.line());
                    match e.into_kind() {
                        csv::ErrorKind::Io(io) => BacktestError::Io(io),
                        other => BacktestError::Input {
                            line,
                            msg: format!("{other:?}"),
                        },
                    }
                })?;
                if !more {
                    return Ok(None);
                }
                let line = row.position().map_or(0, |p| p.line());
                let err = |msg: String| BacktestError::Input { line, msg };
                if row.iter().all(str::is_empty) {
                    continue;
                }
                if self.columns.is_none() {
                    let first = row.get(0).unwrap_or_default();
                    if parse_time(first).is_none() {
                        self.columns = Some(header(row, &self.topic));
                        continue;
                    }
                    self.columns = Some(Columns {
                        ts: 0,
                        values: vec![(1, None)],
                        topic: (row.len() > 2).then_some(2),
                    });
                }
                let Some(c) = &self.columns else { continue };
                let Some(ts) = row.get(c.ts) else {
                    return Err(err("too few columns".into()));
                };
                let Some(time) = parse_time(ts) else {
                    return Err(err(format!("{ts:?} is not a timestamp")));
                };
                let row_topic = c
                    .topic
                    .and_then(|i| row.get(i))
                    .filter(|t| !t.is_empty())
                    .unwrap_or(&self.topic);
                let mut readings = Vec::with_capacity(c.values.len());
                for (i, topic) in &c.values {
                    let Some(value) = row.get(*i) else {
                        return Err(err("too few columns".into()));
                    };
                    readings.push((
                        value.to_string(),
                        Reading {
                            topic: topic.clone().unwrap_or_else(|| row_topic.to_string()),
                            received: time,
                            payload: Payload::decode(Bytes::copy_from_slice(value.as_bytes())),
                            traceparent: None,
                        },
                    ));
                }
                return Ok(Some(Record {
                    stamp: ts.to_string(),
                    time,
                    readings,
                }));
            },
        }
    }
}

/// The columns named by a header row.
fn header(row: &csv::StringRecord, topic: &str) -> Columns {
    let names: Vec<String> = row.iter().map(|c| c.to_ascii_lowercase()).collect();
    let find = |set: &[&str]| names.iter().position(|c| set.contains(&c.as_str()));
    let ts = find(&TIME_COLUMNS).unwrap_or(0);
    let topic_col = find(&["topic"]);
    let values = match find(&["value"]) {
        Some(v) => vec![(v, None)],
        None => {
            let cols: Vec<usize> = (0..names.len())
                .filter(|&i| {
                    i != ts && Some(i) != topic_col && !LABEL_COLUMNS.contains(&names[i].as_str())
                })
                .collect();
            if cols.len() == 1 {
                vec![(cols[0], None)]
            } else {
                cols.into_iter()
                    .map(|i| {
                        let name = topic_level(row.get(i).unwrap_or_default());
                        (i, Some(format!("{topic}/{name}")))
                    })
                    .collect()
            }
        }
    };
    Columns {
        ts,
        values,
        topic: topic_col,
    }
}

/// Why a JSON line is not a record (reported as [`BacktestError::Input`] with its line).
#[derive(Debug, thiserror::Error)]
enum JsonLineError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("no timestamp field")]
    NoTimestamp,
    #[error("{0:?} is not a timestamp")]
    BadTimestamp(String),
}

fn json(text: &str, default_topic: &str) -> Result<Record, JsonLineError> {
    let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
    let ts = ["timestamp", "time", "ts"]
        .iter()
        .find_map(|k| obj.remove(*k))
        .ok_or(JsonLineError::NoTimestamp)?;
    let stamp = match &ts {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let time = parse_time(&stamp).ok_or_else(|| JsonLineError::BadTimestamp(stamp.clone()))?;
    let topic = match obj.remove("topic") {
        Some(serde_json::Value::String(s)) => s,
        _ => default_topic.to_string(),
    };
    let payload = match obj.remove("payload") {
        Some(p) => p,
        None => serde_json::Value::Object(obj),
    };
    let value_text = match &payload {
        serde_json::Value::Object(m) => m.get("value").map(|v| v.to_string()).unwrap_or_default(),
        other => other.to_string(),
    };
    let bytes = serde_json::to_vec(&payload)?;
    Ok(Record {
        stamp,
        time,
        readings: vec![(
            value_text,
            Reading {
                topic,
                received: time,
                payload: Payload::decode(Bytes::from(bytes)),
                traceparent: None,
            },
        )],
    })
}

/// Summary of a run.
#[derive(Debug, Default)]
pub struct Summary {
    pub readings: u64,
    pub events: u64,
    pub alerts: u64,
}

/// What the rules said about one input row.
pub struct RowResult<'a> {
    pub record: &'a Record,
    /// Highest detector score of the row's readings.
    pub score: f64,
    /// An alert episode started on this row.
    pub alert: bool,
}

/// Feed `input` through `rules`; `row` sees every row's result and the actions it produced
/// (timers due before the row included), then `None` with the actions of the final timers
/// (windows still open at the end).
pub fn drive<R: BufRead>(
    rules: &[RuleConfig],
    topic_prefix: &str,
    input: R,
    default_topic: &str,
    mut row: impl FnMut(Option<RowResult<'_>>, &mut Vec<Action>) -> Result<(), BacktestError>,
) -> Result<Summary, BacktestError> {
    let mut engine = Engine::new(rules, topic_prefix);
    let tick = engine.settings().tick;
    let mut reader = Reader::new(input, default_topic)?;
    let mut actions = Vec::new();
    let mut summary = Summary::default();
    let mut next_tick: Option<SystemTime> = None;
    let mut last_time = UNIX_EPOCH;
    while let Some(rec) = reader.next_record()? {
        let t = rec.time;
        // Timers between readings (missing, window closing), at most 10,000 per gap.
        let mut nt = next_tick.unwrap_or(t + tick);
        let mut steps = 0;
        while nt <= t && steps < 10_000 {
            engine.tick(nt, &mut actions);
            nt += tick;
            steps += 1;
        }
        if nt <= t {
            nt = t + tick;
        }
        next_tick = Some(nt);
        let before = actions.len();
        let mut score = 0.0f64;
        for (_, reading) in &rec.readings {
            engine.process(reading, &mut actions);
            score = score.max(engine.last_score().0);
            summary.readings += 1;
        }
        last_time = last_time.max(t);
        let alert = actions[before..].iter().any(is_alert_start);
        count(&actions, &mut summary);
        row(
            Some(RowResult {
                record: &rec,
                score,
                alert,
            }),
            &mut actions,
        )?;
        actions.clear();
    }
    // Close open windows.
    engine.tick(last_time + Duration::from_secs(366 * 86_400), &mut actions);
    count(&actions, &mut summary);
    row(None, &mut actions)?;
    Ok(summary)
}

/// Run `input` through `rules`, writing events (or scores) to `out`.
pub fn run<R: BufRead, W: Write>(
    rules: &[RuleConfig],
    topic_prefix: &str,
    input: R,
    default_topic: &str,
    scores: bool,
    out: W,
) -> Result<Summary, BacktestError> {
    let mut out = std::io::BufWriter::new(out);
    if scores {
        writeln!(out, "timestamp,value,score,alert")?;
    }
    let mut events = 0u64;
    let summary = drive(rules, topic_prefix, input, default_topic, |r, actions| {
        if let (true, Some(r)) = (scores, r) {
            let values: Vec<&str> = r.record.readings.iter().map(|(v, _)| v.as_str()).collect();
            writeln!(
                out,
                "{},{},{:.4},{}",
                csv_field(&r.record.stamp),
                csv_field(&values.join(";")),
                r.score,
                u8::from(r.alert)
            )?;
        } else if !scores {
            emit(actions, &mut events, &mut out)?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(summary)
}

/// A CSV field, quoted if it needs to be.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

fn is_alert_start(a: &Action) -> bool {
    match a {
        Action::Forward(e) => e.kind == TYPE_ALERT && is_start(e),
        _ => false,
    }
}

fn is_start(e: &crate::core::event::Event) -> bool {
    match &e.data {
        crate::core::event::Data::Json(b) => {
            serde_json::from_slice::<serde_json::Value>(b)
                .ok()
                .and_then(|v| {
                    v.get("state")
                        .and_then(|s| s.as_str())
                        .map(|s| s == "start")
                })
                == Some(true)
        }
        _ => false,
    }
}

fn count(actions: &[Action], s: &mut Summary) {
    for a in actions {
        if let Action::Forward(_) = a {
            s.events += 1;
            if is_alert_start(a) {
                s.alerts += 1;
            }
        }
    }
}

fn emit<W: Write>(actions: &mut Vec<Action>, n: &mut u64, out: &mut W) -> std::io::Result<()> {
    for a in actions.drain(..) {
        match a {
            Action::Forward(e) => {
                *n += 1;
                out.write_all(&e.envelope("edgegate://backtest", *n))?;
                out.write_all(b"\n")?;
            }
            Action::Publish { topic, payload } => {
                let payload = match serde_json::from_slice::<serde_json::Value>(&payload) {
                    Ok(v) => v,
                    Err(_) => serde_json::Value::String(String::from_utf8_lossy(&payload).into()),
                };
                let line = serde_json::json!({ "publish": topic, "payload": payload });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn timestamps_that_are_no_time_are_refused_not_a_panic() {
        assert_eq!(
            parse_time("1.5"),
            Some(UNIX_EPOCH + Duration::from_millis(1500))
        );
        for bad in ["1e20", "-1", "NaN", "inf", "1e400"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert!(parse_time("2026-12-01 10:00:00").is_some());
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    /// The messages `backtest` prints after `line N: ` for a JSON line that is no record.
    #[test]
    fn refused_lines_say_why() {
        let msg = |text: &str| json(text, "t").err().map(|e| e.to_string());
        assert_eq!(
            msg(r#"{"value": 1}"#).as_deref(),
            Some("no timestamp field")
        );
        assert_eq!(
            msg(r#"{"ts": "soon", "value": 1}"#).as_deref(),
            Some(r#""soon" is not a timestamp"#)
        );
        assert_eq!(
            msg("{").as_deref(),
            Some("EOF while parsing an object at line 1 column 1")
        );
        assert!(msg(r#"{"ts": 1, "value": 1}"#).is_none());
    }

    /// A byte order mark before JSON lines: the csv crate skips one before CSV, JSON lines
    /// were taken for CSV and refused.
    #[test]
    fn json_lines_after_a_byte_order_mark_are_json() {
        let text = "\u{feff}{\"ts\": 1, \"value\": 2.5}\n{\"ts\": 2, \"value\": 3}\n";
        let mut r = Reader::new(text.as_bytes(), "t").expect("reader");
        let first = r.next_record().expect("a record").expect("not the end");
        assert_eq!(first.readings[0].0, "2.5");
        assert!(r.next_record().expect("a record").is_some());
    }
}
