//! `edgegate backtest`: replay a file through the rules and print what they would have done,
//! or score the detectors against labelled incident windows. Layer: commands (reading the
//! arguments and files, exit codes); the replay and the scoring are `rules::backtest`.

use std::io::{BufRead, Write};
use std::path::Path;

use crate::commands::cli::exit;
use crate::config::RuleConfig;
use crate::rules::backtest::{self, score, BacktestError};

/// What `edgegate backtest` was asked to do.
pub struct Options<'a> {
    pub config: Option<&'a std::path::Path>,
    /// A file (`-`: standard input), or with `labels` a directory.
    pub input: &'a std::path::Path,
    pub topic: Option<&'a str>,
    pub scores: bool,
    /// Score every `*.csv` under `input` against these incident windows.
    pub labels: Option<&'a std::path::Path>,
    pub json: bool,
    pub probation: f64,
}

/// The `backtest` command; returns the process exit code.
pub fn main(o: &Options<'_>) -> i32 {
    let (rules, prefix) = match o.config {
        Some(p) => match crate::config::Config::load(Some(p)) {
            Ok(c) => (c.rules, c.upstream.topic_prefix),
            Err(e) => {
                eprintln!("edgegate: {e}");
                return exit::CONFIG;
            }
        },
        None => (backtest::default_rules(), "edge/backtest".to_string()),
    };
    if let Some(labels) = o.labels {
        if !(0.0..1.0).contains(&o.probation) {
            eprintln!("edgegate: --probation must be in [0, 1)");
            return exit::USAGE;
        }
        return labels_main(&rules, o.input, labels, o.json, o.probation);
    }
    if o.json {
        eprintln!("edgegate: --json goes with --labels");
        return exit::USAGE;
    }
    let input = o.input;
    let file: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        match std::fs::File::open(input) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("edgegate: {}: {e}", input.display());
                return exit::NOINPUT;
            }
        }
    };
    let stdout = std::io::stdout();
    let started = std::time::Instant::now();
    match backtest::run(
        &rules,
        &prefix,
        file,
        o.topic.unwrap_or("sensors/backtest/value"),
        o.scores,
        stdout.lock(),
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
            exit::DATAERR
        }
    }
}

/// The `backtest --labels` command; returns the process exit code.
fn labels_main(rules: &[RuleConfig], dir: &Path, labels: &Path, json: bool, probation: f64) -> i32 {
    let labels = match score::read_labels(labels) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edgegate: {e}");
            return match e {
                score::LabelsError::Read(..) => exit::NOINPUT,
                _ => exit::DATAERR,
            };
        }
    };
    let report = match score::evaluate(rules, dir, &labels, probation) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgegate: {e}");
            return match e {
                score::LabelsError::Dir(..) | score::LabelsError::Empty(_) => exit::NOINPUT,
                _ => exit::DATAERR,
            };
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let written = if json {
        serde_json::to_writer(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out))
    } else {
        score::print_text(&report, &mut out)
    };
    match written {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("edgegate: {e}");
            exit::IOERR
        }
    }
}
