//! `edgegate backtest --input DIR --labels FILE [--json]`: every `*.csv` under DIR (each file
//! one series; a file of several sensor columns is one machine, see [`super`]) run through the
//! rules with fresh state, its alerts scored against labelled incident windows.
//!
//! FILE is a JSON object mapping each file's path relative to DIR (`/`-separated) to a list of
//! `[start, end]` timestamp pairs, the incident windows (both ends included). A CSV file absent
//! from FILE is an error (a typo must not score as "no incident").
//!
//! ## The score (NAB's, standard profile)
//!
//! Detections are the rows whose `alert` is 1 (an alert episode started). Rows in the first
//! `probation` share of a series (default 0.15, as NAB) are the detectors' learning time:
//! detections there count neither way. With window `w` covering rows `a..=b` (length
//! `len = b - a + 1`) and `σ(y) = 2 / (1 + e^(5y)) - 1` (σ(y) = -1 for y > 3):
//! - the first detection at row `i` inside `w` scores `A_TP · σ(-(b - i + 1) / len)`: from
//!   0.987 at the window's first row down to 0 past its end; later detections in the same
//!   window count nothing;
//! - a detection outside every window scores `A_FP · σ((i - b') / len')` where `b'`, `len'` are
//!   the end and length of the last window before it (a detection just after a window costs
//!   little, one far after it costs `A_FP`), or `-A_FP` when no window precedes it;
//! - each window without a detection scores `-A_FN`.
//!
//! Weights: `A_TP = 1`, `A_FP = 0.11`, `A_FN = 1`. Raw scores add up over series; the
//! reported score is normalized: `100 · (raw - null) / (perfect - null)` where `null =
//! -A_FN · windows` (never alerting: 0) and `perfect = A_TP · σ(-1) · windows` (every window
//! detected on its first row, no false alert: 100). A series without windows has no score of its
//! own (its false alerts lower the total).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::{drive, parse_time, BacktestError};
use crate::config::RuleConfig;

pub const A_TP: f64 = 1.0;
pub const A_FP: f64 = 0.11;
pub const A_FN: f64 = 1.0;
/// NAB's probationary share of each series.
pub const PROBATION: f64 = 0.15;

/// NAB's scaled sigmoid of a relative position.
pub fn sigma(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// The scoring of one series.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SeriesScore {
    pub series: String,
    pub readings: u64,
    pub rows: usize,
    pub windows: usize,
    pub windows_detected: usize,
    /// Detections outside every window (after the probation).
    pub false_alerts: usize,
    /// Rows from each detected window's start to its first detection.
    pub delays: Vec<usize>,
    /// Seconds from each detected window's start to its first detection.
    pub delay_secs: Vec<f64>,
    /// (window's first row, detection row) of each detected window.
    #[serde(skip)]
    pub detections: Vec<(usize, usize)>,
    pub raw: f64,
    pub null: f64,
    pub perfect: f64,
}

/// Score one series: `alerts[i]` whether row `i` started an alert, `windows` as row index ranges
/// (inclusive, sorted, not overlapping).
pub fn score_rows(alerts: &[bool], windows: &[(usize, usize)], probation: f64) -> SeriesScore {
    let n = alerts.len();
    let skip = (probation * n as f64).floor() as usize;
    let mut s = SeriesScore {
        rows: n,
        windows: windows.len(),
        null: -A_FN * windows.len() as f64,
        perfect: A_TP * sigma(-1.0) * windows.len() as f64,
        ..SeriesScore::default()
    };
    let mut detected = vec![false; windows.len()];
    for i in (skip..n).filter(|&i| alerts[i]) {
        let inside = windows.iter().position(|&(a, b)| a <= i && i <= b);
        if let Some(w) = inside {
            if !detected[w] {
                detected[w] = true;
                let (a, b) = windows[w];
                let len = (b - a + 1) as f64;
                s.raw += A_TP * sigma(-((b - i + 1) as f64) / len);
                s.delays.push(i - a);
                s.detections.push((a, i));
            }
            continue;
        }
        s.false_alerts += 1;
        // The last window ending before i, if any.
        s.raw += match windows.iter().rev().find(|&&(_, b)| b < i) {
            Some(&(a, b)) => A_FP * sigma((i - b) as f64 / (b - a + 1) as f64),
            None => -A_FP,
        };
    }
    s.windows_detected = detected.iter().filter(|&&d| d).count();
    s.raw -= A_FN * (windows.len() - s.windows_detected) as f64;
    s
}

/// Normalized score: 0 = never alerting, 100 = perfect; `None` without windows.
pub fn normalized(raw: f64, null: f64, perfect: f64) -> Option<f64> {
    (perfect > null).then(|| 100.0 * (raw - null) / (perfect - null))
}

/// Row index ranges of timestamp windows over rows at `times` (sorted ascending).
fn row_windows(times: &[SystemTime], windows: &[(SystemTime, SystemTime)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = windows
        .iter()
        .filter_map(|&(start, end)| {
            let a = times.partition_point(|&t| t < start);
            let b = times.partition_point(|&t| t <= end);
            (b > a).then(|| (a, b - 1))
        })
        .collect();
    out.sort_unstable();
    // Overlapping windows become one.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(out.len());
    for (a, b) in out {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Json(PathBuf, serde_json::Error),
    #[error("{file}: {series}: {msg}")]
    Window {
        file: PathBuf,
        series: String,
        msg: String,
    },
    #[error("{0}: no labels for {1} (give it [] if it has no incident)")]
    Unlabelled(PathBuf, String),
    #[error("{0}: no *.csv file under it")]
    Empty(PathBuf),
    #[error("{path}: {source}")]
    Series { path: String, source: BacktestError },
    #[error("{0}: {1}")]
    Dir(PathBuf, std::io::Error),
}

pub type Labels = BTreeMap<String, Vec<(SystemTime, SystemTime)>>;

/// Read a labels file.
pub fn read_labels(file: &Path) -> Result<Labels, LabelsError> {
    let text = std::fs::read_to_string(file).map_err(|e| LabelsError::Read(file.into(), e))?;
    // A byte order mark (an editor on Windows writes one) is no JSON.
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(text.strip_prefix('\u{feff}').unwrap_or(&text))
            .map_err(|e| LabelsError::Json(file.into(), e))?;
    let mut out = Labels::new();
    for (series, windows) in raw {
        let mut parsed = Vec::with_capacity(windows.len());
        for (a, b) in windows {
            let bad = |msg: String| LabelsError::Window {
                file: file.into(),
                series: series.clone(),
                msg,
            };
            let start = parse_time(&a).ok_or_else(|| bad(format!("{a:?} is not a timestamp")))?;
            let end = parse_time(&b).ok_or_else(|| bad(format!("{b:?} is not a timestamp")))?;
            if end < start {
                return Err(bad(format!("window [{a:?}, {b:?}] ends before it starts")));
            }
            parsed.push((start, end));
        }
        out.insert(series.replace('\\', "/"), parsed);
    }
    Ok(out)
}

/// Every `*.csv` under `dir`, as paths relative to it with `/` separators, sorted.
fn csv_files(dir: &Path) -> Result<Vec<String>, LabelsError> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| LabelsError::Dir(d.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LabelsError::Dir(d.clone(), e))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| LabelsError::Dir(path.clone(), e))?;
            if kind.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
            {
                if let Ok(rel) = path.strip_prefix(dir) {
                    let parts: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    found.insert(parts.join("/"));
                }
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// The totals of a directory run (the `--json` object).
#[derive(Debug, Serialize)]
pub struct Report {
    pub series: usize,
    pub readings: u64,
    pub rows: usize,
    pub windows: usize,
    pub windows_detected: usize,
    pub false_alerts: usize,
    pub false_alerts_per_1000: f64,
    pub mean_delay_readings: Option<f64>,
    pub mean_delay_secs: Option<f64>,
    pub probation: f64,
    /// `None` (null) when no series has a window.
    pub score: Option<f64>,
    pub per_series: Vec<SeriesReport>,
}

#[derive(Debug, Serialize)]
pub struct SeriesReport {
    #[serde(flatten)]
    pub s: SeriesScore,
    pub score: Option<f64>,
}

/// Run every CSV under `dir` through `rules` and score it against `labels`.
pub fn evaluate(
    rules: &[RuleConfig],
    dir: &Path,
    labels: &Labels,
    probation: f64,
) -> Result<Report, LabelsError> {
    let files = csv_files(dir)?;
    if files.is_empty() {
        return Err(LabelsError::Empty(dir.into()));
    }
    let mut per_series = Vec::with_capacity(files.len());
    for rel in &files {
        let Some(windows) = labels.get(rel) else {
            return Err(LabelsError::Unlabelled(dir.into(), rel.clone()));
        };
        let series_err = |source| LabelsError::Series {
            path: rel.clone(),
            source,
        };
        let file =
            std::fs::File::open(dir.join(rel)).map_err(|e| series_err(BacktestError::Io(e)))?;
        let topic = format!(
            "sensors/backtest/{}",
            super::topic_level(rel.trim_end_matches(".csv"))
        );
        let (mut times, mut alerts) = (Vec::new(), Vec::new());
        let summary = drive(
            rules,
            "edge/backtest",
            std::io::BufReader::new(file),
            &topic,
            |r, _| {
                if let Some(r) = r {
                    times.push(r.record.time);
                    alerts.push(r.alert);
                }
                Ok(())
            },
        )
        .map_err(series_err)?;
        // Rows out of time order: windows are found on the sorted times, alerts keep their row.
        let mut sorted = times;
        sorted.sort_unstable();
        let mut s = score_rows(&alerts, &row_windows(&sorted, windows), probation);
        s.series = rel.clone();
        s.readings = summary.readings;
        let secs = |i: usize| sorted.get(i).map_or(0.0, |&t| crate::rules::secs(t));
        s.delay_secs = s
            .detections
            .iter()
            .map(|&(a, i)| secs(i) - secs(a))
            .collect();
        let score = normalized(s.raw, s.null, s.perfect);
        per_series.push(SeriesReport { s, score });
    }
    let sum = |f: &dyn Fn(&SeriesScore) -> f64| per_series.iter().map(|r| f(&r.s)).sum::<f64>();
    let (raw, null, perfect) = (sum(&|s| s.raw), sum(&|s| s.null), sum(&|s| s.perfect));
    let rows: usize = per_series.iter().map(|r| r.s.rows).sum();
    let false_alerts: usize = per_series.iter().map(|r| r.s.false_alerts).sum();
    let delays: Vec<f64> = per_series
        .iter()
        .flat_map(|r| r.s.delays.iter().map(|&d| d as f64))
        .collect();
    let delay_secs: Vec<f64> = per_series
        .iter()
        .flat_map(|r| r.s.delay_secs.clone())
        .collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Ok(Report {
        series: per_series.len(),
        readings: per_series.iter().map(|r| r.s.readings).sum(),
        rows,
        windows: per_series.iter().map(|r| r.s.windows).sum(),
        windows_detected: per_series.iter().map(|r| r.s.windows_detected).sum(),
        false_alerts,
        false_alerts_per_1000: 1000.0 * false_alerts as f64 / rows.max(1) as f64,
        mean_delay_readings: mean(&delays),
        mean_delay_secs: mean(&delay_secs),
        probation,
        score: normalized(raw, null, perfect),
        per_series,
    })
}

/// Plain-text report: one line per series, then the total.
pub fn print_text(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<40} {:>8} {:>7} {:>8} {:>9} {:>6} {:>8} {:>7}",
        "series", "readings", "windows", "detected", "delay", "false", "false/1k", "score"
    )?;
    let delay = |d: &[usize]| {
        if d.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", d.iter().sum::<usize>() as f64 / d.len() as f64)
        }
    };
    for s in &r.per_series {
        writeln!(
            out,
            "{:<40} {:>8} {:>7} {:>8} {:>9} {:>6} {:>8.2} {:>7}",
            s.s.series,
            s.s.readings,
            s.s.windows,
            s.s.windows_detected,
            delay(&s.s.delays),
            s.s.false_alerts,
            1000.0 * s.s.false_alerts as f64 / s.s.rows.max(1) as f64,
            s.score.map_or("-".into(), |v| format!("{v:.1}")),
        )?;
    }
    writeln!(
        out,
        "{:<40} {:>8} {:>7} {:>8} {:>9} {:>6} {:>8.2} {:>7}",
        format!("TOTAL ({} series)", r.series),
        r.readings,
        r.windows,
        r.windows_detected,
        r.mean_delay_readings
            .map_or("-".into(), |d| format!("{d:.0}")),
        r.false_alerts,
        r.false_alerts_per_1000,
        r.score.map_or("-".into(), |v| format!("{v:.1}"))
    )?;
    writeln!(
        out,
        "delay: rows from a window's start to its first alert (mean); probation {:.0}% of each series; score: NAB standard profile, 0 = never alert, 100 = perfect",
        100.0 * r.probation
    )
}

#[cfg(test)]
mod tests;
