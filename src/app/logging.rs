//! Logging through `tracing`.
//!
//! - Under systemd (stderr is the journal stream named by `JOURNAL_STREAM`), every event goes to
//!   the journal as one structured entry: `PRIORITY`, `MESSAGE`, `TARGET`, `CODE_*`, and one
//!   field per tracing field of the event and of its enclosing spans (`topic` → `TOPIC`,
//!   `event.id` → `EVENT_ID`, `rule` → `RULE`, ...). Sent by systemd-journal-logger's
//!   native-protocol client, so `journalctl -u edgegate -o verbose` and
//!   `journalctl -u edgegate TOPIC=sensors/t1` work.
//! - Otherwise readable lines on stderr (colours only on a terminal).
//!
//! The level comes from `gateway.log_level` (`target=level` directives); `RUST_LOG` overrides
//! it. [`set_level`] changes it at run time (SIGHUP reload). Libraries that log through `log`
//! (rumqttc) are bridged into tracing, so their lines obey the same filter and sinks.
//!
//! Layer: app (the commands set it up too).

use std::fmt::Write as _;
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

type FilterHandle = reload::Handle<Targets, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Stderr,
}

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
/// Returns where the lines go.
pub fn init(level: &str) -> Sink {
    let (filter, handle) = reload::Layer::new(build_filter(level));
    let journal = if systemd_journal_logger::connected_to_journal() {
        JournalLayer::new()
    } else {
        None
    };
    let sink = if journal.is_some() {
        Sink::Journal
    } else {
        Sink::Stderr
    };
    // The journal timestamps every entry itself; on stderr under another supervisor keep them.
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .try_init()
        .is_ok();
    if installed {
        let _ = FILTER.set(handle);
        // `log` records (rumqttc) become tracing events; the filter above then applies.
        let _ = tracing_log::LogTracer::init();
    }
    sink
}

/// Replace the level filter of the running process (e.g. after SIGHUP). `RUST_LOG`, when set,
/// still wins, as at start-up.
pub fn set_level(level: &str) -> Result<(), LevelError> {
    let filter = build_filter(level);
    match FILTER.get() {
        Some(h) => h.reload(filter).map_err(LevelError::Reload),
        None => Err(LevelError::NotInitialised),
    }
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error("logging is not initialised")]
    NotInitialised,
    #[error("{0}")]
    Reload(tracing_subscriber::reload::Error),
}

/// `Targets` (`info,edgegate::forwarder=debug,rumqttd=off`), not `EnvFilter`: the same
/// target=level syntax without span and field filters, and without the regex engine (0.2 MB).
fn build_filter(level: &str) -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<Targets>().ok())
        .or_else(|| with_quiet_deps(level).parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

/// rumqttd logs ordinary disconnects as errors; keep it quiet (we count and log what matters)
/// unless the user's filter names it.
fn with_quiet_deps(level: &str) -> String {
    if level.contains("rumqtt") {
        level.to_string()
    } else {
        format!("{level},rumqttd=off,rumqttc=warn")
    }
}

/// Field name → value, in the order tracing reports them.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.put(field, s);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string());
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = Some(value),
            // Metadata of `log` records bridged by tracing-log: already in TARGET/CODE_*.
            name if name.starts_with("log.") => {}
            name => self.pairs.push((name.to_string(), value)),
        }
    }
}

/// Fields recorded on a span, kept in its extensions for the events inside it.
struct SpanFields(Vec<(String, String)>);

/// A tracing layer that sends each event to the journal through systemd-journal-logger.
pub struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

impl JournalLayer {
    /// `None` when the journal socket cannot be reached.
    pub fn new() -> Option<JournalLayer> {
        let journal = systemd_journal_logger::JournalLog::new()
            .ok()?
            .with_syslog_identifier("edgegate".to_string());
        Some(JournalLayer { journal })
    }
}

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(f.pairs));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let mut f = Fields::default();
        values.record(&mut f);
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(existing) => existing.0.extend(f.pairs),
                None => ext.insert(SpanFields(f.pairs)),
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        // Events bridged from `log` carry their real target and origin in normalized metadata.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut pairs: Vec<(String, String)> = Vec::new();
        // Outermost span first, so an inner span's or the event's own field shows first in
        // `journalctl -o verbose` only when the name repeats (the journal keeps all values).
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(sf) = span.extensions().get::<SpanFields>() {
                    pairs.extend(sf.0.iter().cloned());
                }
            }
        }
        pairs.extend(f.pairs.iter().cloned());
        let kvs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let kvs: &[(&str, &str)] = &kvs;
        // MESSAGE as on stderr: the text, then the event's own fields, so that plain
        // `journalctl -u edgegate` shows the context too; every field is also its own
        // journal field for filtering (`journalctl -u edgegate TOPIC=...`).
        let mut message = f.message.unwrap_or_default();
        for (k, v) in &f.pairs {
            let _ = write!(message, " {k}={v}");
        }
        let target = meta.target();
        // format_args! borrows a temporary: build and send the record in one statement.
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .level(to_log_level(*meta.level()))
                .target(target)
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .args(format_args!("{message}"))
                .build(),
        );
    }
}

/// tracing ERROR..TRACE → journal priorities 3 (err), 4 (warning), 5 (notice), 6 (info),
/// 7 (debug), through systemd-journal-logger's mapping of `log` levels.
fn to_log_level(level: Level) -> log::Level {
    match level {
        Level::ERROR => log::Level::Error,
        Level::WARN => log::Level::Warn,
        Level::INFO => log::Level::Info,
        Level::DEBUG => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_deps_unless_named() {
        assert_eq!(with_quiet_deps("info"), "info,rumqttd=off,rumqttc=warn");
        assert_eq!(with_quiet_deps("debug,rumqttd=info"), "debug,rumqttd=info");
    }

    #[test]
    fn levels_map_to_journal_priorities() {
        assert_eq!(to_log_level(Level::ERROR), log::Level::Error);
        assert_eq!(to_log_level(Level::INFO), log::Level::Info);
        assert_eq!(to_log_level(Level::TRACE), log::Level::Trace);
    }
}
