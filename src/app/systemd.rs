//! systemd notify protocol: READY=1, STATUS=, WATCHDOG=1. Every call is a no-op outside systemd.
//!
//! Layer: app.

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

pub fn watchdog_ping() {
    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}

/// RELOADING=1 at the start of a configuration reload (SIGHUP); call [`ready`] when done.
pub fn reloading() {
    let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
}

/// Ask systemd for more time before the start or stop timeout fires (e.g. a long queue
/// integrity check at start, a slow final commit on an SD card at stop).
pub fn extend_timeout(by: Duration) {
    // The protocol field is 32 bits of microseconds (about 71 minutes).
    let usec = by.as_micros().min(u32::MAX as u128) as u32;
    let _ = sd_notify::notify(false, &[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Whether systemd started this process with a notification socket (`Type=notify`).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}
