//! Logging: readable lines on stderr; the level comes from `gateway.log_level`, and `RUST_LOG`
//! overrides it.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(with_quiet_deps(level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!under_journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
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
