//! `edgegate backtest`: recorded readings through the rules, offline, at full speed.
//!
//! Input: CSV (`timestamp,value[,topic]`, header optional; with a header the columns are found
//! by name: `timestamp`/`time`/`ts`, `value`, `topic`) or JSON lines (`{"timestamp": ...,
//! "topic": ..., <fields>}`; the fields other than timestamp and topic are the payload).
//! Timestamps: RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` (UTC), or Unix seconds.
//!
//! Output: the events the rules produce, one CloudEvents JSON per line (and local publishes as
//! `{"publish": topic, "payload": ...}`); with `--scores`, one CSV line per reading instead:
//! `timestamp,value,score,alert` (`alert` = 1 where an alert started on that reading).

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{Action, Engine};
use crate::config::RuleConfig;
use crate::decode::Payload;
use crate::event::{Reading, TYPE_ALERT};

/// The rules used without `--config`: those of the shipped `config/edgegate.toml`.
pub fn default_rules() -> Vec<RuleConfig> {
    crate::config::Config::defaults().rules
}

/// Parse a timestamp: RFC 3339, `YYYY-MM-DD HH:MM:SS`, or Unix seconds.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let t = text.trim().trim_matches('"');
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(UNIX_EPOCH + Duration::from_secs_f64(secs));
        }
        return None;
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

/// One input record.
pub struct Record {
    pub stamp: String,
    pub value_text: String,
    pub reading: Reading,
}

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("line {line}: {msg}")]
    Input { line: usize, msg: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Columns {
    ts: usize,
    value: usize,
    topic: Option<usize>,
}

/// Reads records from CSV or JSON lines.
pub struct Reader<R> {
    lines: std::io::Lines<R>,
    line: usize,
    columns: Option<Columns>,
    topic: String,
}

impl<R: BufRead> Reader<R> {
    pub fn new(input: R, default_topic: &str) -> Self {
        Reader {
            lines: input.lines(),
            line: 0,
            columns: None,
            topic: default_topic.to_string(),
        }
    }

    fn err(&self, msg: impl Into<String>) -> BacktestError {
        BacktestError::Input {
            line: self.line,
            msg: msg.into(),
        }
    }

    pub fn next_record(&mut self) -> Result<Option<Record>, BacktestError> {
        loop {
            let Some(line) = self.lines.next() else {
                return Ok(None);
            };
            let line = line?;
            self.line += 1;
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            if text.starts_with('{') {
                return self.json(text).map(Some);
            }
            let cells: Vec<&str> = text
                .split(',')
                .map(|c| c.trim().trim_matches('"'))
                .collect();
            if self.columns.is_none() {
                if parse_time(cells[0]).is_none() {
                    let find = |names: &[&str]| {
                        cells
                            .iter()
                            .position(|c| names.contains(&c.to_ascii_lowercase().as_str()))
                    };
                    let ts = find(&["timestamp", "time", "ts"]).unwrap_or(0);
                    let value = find(&["value"]).unwrap_or(1);
                    let topic = find(&["topic"]);
                    self.columns = Some(Columns { ts, value, topic });
                    continue;
                }
                self.columns = Some(Columns {
                    ts: 0,
                    value: 1,
                    topic: (cells.len() > 2).then_some(2),
                });
            }
            let Some(c) = &self.columns else { continue };
            let (Some(ts), Some(value)) = (cells.get(c.ts), cells.get(c.value)) else {
                return Err(self.err("too few columns"));
            };
            let Some(time) = parse_time(ts) else {
                return Err(self.err(format!("{ts:?} is not a timestamp")));
            };
            let topic = c
                .topic
                .and_then(|i| cells.get(i))
                .filter(|t| !t.is_empty())
                .map(|t| t.to_string())
                .unwrap_or_else(|| self.topic.clone());
            return Ok(Some(Record {
                stamp: ts.to_string(),
                value_text: value.to_string(),
                reading: Reading {
                    topic,
                    received: time,
                    payload: Payload::decode(Bytes::copy_from_slice(value.as_bytes())),
                    traceparent: None,
                },
            }));
        }
    }

    fn json(&self, text: &str) -> Result<Record, BacktestError> {
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| self.err(e.to_string()))?;
        let ts = ["timestamp", "time", "ts"]
            .iter()
            .find_map(|k| obj.remove(*k))
            .ok_or_else(|| self.err("no timestamp field"))?;
        let stamp = match &ts {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let time =
            parse_time(&stamp).ok_or_else(|| self.err(format!("{stamp:?} is not a timestamp")))?;
        let topic = match obj.remove("topic") {
            Some(serde_json::Value::String(s)) => s,
            _ => self.topic.clone(),
        };
        let payload = match obj.remove("payload") {
            Some(p) => p,
            None => serde_json::Value::Object(obj),
        };
        let value_text = match &payload {
            serde_json::Value::Object(m) => {
                m.get("value").map(|v| v.to_string()).unwrap_or_default()
            }
            other => other.to_string(),
        };
        let bytes = serde_json::to_vec(&payload).map_err(|e| self.err(e.to_string()))?;
        Ok(Record {
            stamp,
            value_text,
            reading: Reading {
                topic,
                received: time,
                payload: Payload::decode(Bytes::from(bytes)),
                traceparent: None,
            },
        })
    }
}

/// Summary of a run.
#[derive(Debug, Default)]
pub struct Summary {
    pub readings: u64,
    pub events: u64,
    pub alerts: u64,
}

/// Run `input` through `rules`, writing events (or scores) to `out`.
pub fn run<R: BufRead, W: Write>(
    rules: &[RuleConfig],
    topic_prefix: &str,
    input: R,
    default_topic: &str,
    scores: bool,
    mut out: W,
) -> Result<Summary, BacktestError> {
    let mut engine = Engine::new(rules, topic_prefix);
    let tick = engine.settings().tick;
    let mut reader = Reader::new(input, default_topic);
    let mut actions = Vec::new();
    let mut summary = Summary::default();
    let mut next_tick: Option<SystemTime> = None;
    let mut last_time = UNIX_EPOCH;
    if scores {
        writeln!(out, "timestamp,value,score,alert")?;
    }
    while let Some(rec) = reader.next_record()? {
        let t = rec.reading.received;
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
        if !scores {
            emit(&mut actions, &mut summary, &mut out)?;
        } else {
            count(&mut actions, &mut summary);
        }
        engine.process(&rec.reading, &mut actions);
        summary.readings += 1;
        last_time = last_time.max(t);
        let (score, _) = engine.last_score();
        let started = actions.iter().any(|a| match a {
            Action::Forward(e) => e.kind == TYPE_ALERT && is_start(e),
            _ => false,
        });
        if scores {
            writeln!(
                out,
                "{},{},{:.4},{}",
                rec.stamp,
                rec.value_text,
                score,
                u8::from(started)
            )?;
            count(&mut actions, &mut summary);
        } else {
            emit(&mut actions, &mut summary, &mut out)?;
        }
    }
    // Close open windows.
    engine.tick(last_time + Duration::from_secs(366 * 86_400), &mut actions);
    if scores {
        count(&mut actions, &mut summary);
    } else {
        emit(&mut actions, &mut summary, &mut out)?;
    }
    out.flush()?;
    Ok(summary)
}

fn is_start(e: &crate::event::Event) -> bool {
    match &e.data {
        crate::event::Data::Json(b) => {
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

fn count(actions: &mut Vec<Action>, s: &mut Summary) {
    for a in actions.drain(..) {
        if let Action::Forward(e) = a {
            s.events += 1;
            if e.kind == TYPE_ALERT && is_start(&e) {
                s.alerts += 1;
            }
        }
    }
}

fn emit<W: Write>(actions: &mut Vec<Action>, s: &mut Summary, out: &mut W) -> std::io::Result<()> {
    for a in actions.drain(..) {
        match a {
            Action::Forward(e) => {
                s.events += 1;
                if e.kind == TYPE_ALERT && is_start(&e) {
                    s.alerts += 1;
                }
                out.write_all(&e.envelope("edgegate://backtest", s.events))?;
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

/// The `backtest` command; returns the process exit code.
pub fn main(
    config: Option<&std::path::Path>,
    input: &std::path::Path,
    topic: Option<&str>,
    scores: bool,
) -> i32 {
    let (rules, prefix) = match config {
        Some(p) => match crate::config::Config::load(Some(p)) {
            Ok(c) => (c.rules, c.upstream.topic_prefix),
            Err(e) => {
                eprintln!("edgegate: {e}");
                return crate::cli::exit::CONFIG;
            }
        },
        None => (default_rules(), "edge/backtest".to_string()),
    };
    let file: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        match std::fs::File::open(input) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("edgegate: {}: {e}", input.display());
                return crate::cli::exit::NOINPUT;
            }
        }
    };
    let stdout = std::io::stdout();
    let out = std::io::BufWriter::new(stdout.lock());
    let started = std::time::Instant::now();
    match run(
        &rules,
        &prefix,
        file,
        topic.unwrap_or("sensors/backtest/value"),
        scores,
        out,
    ) {
        Ok(s) => {
            eprintln!(
                "backtest: {} readings, {} events, {} alerts in {:.2?}",
                s.readings,
                s.events,
                s.alerts,
                started.elapsed()
            );
            0
        }
        Err(BacktestError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("edgegate: {}: {e}", input.display());
            crate::cli::exit::DATAERR
        }
    }
}
