//! Commands other than `run`: `check-config`, `queue ...`, `passwd`. Each returns a sysexits code.
//!
//! Layer: commands: the top; it may import every layer (it takes the app's data-dir lock before
//! writing the queue), and nothing imports it but `main` and the other commands (for [`exit`]).

use std::path::Path;

use crate::config::Config;
use std::time::{Duration, Instant};

use crate::queue::{Request, Store, StoreError, StoredEvent};

/// sysexits(3) codes.
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 64;
    pub const DATAERR: i32 = 65;
    pub const NOINPUT: i32 = 66;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    pub const OSERR: i32 = 71;
    pub const CANTCREAT: i32 = 73;
    pub const IOERR: i32 = 74;
    pub const TEMPFAIL: i32 = 75;
    pub const NOPERM: i32 = 77;
    pub const CONFIG: i32 = 78;
}

/// The exit code for a failed start (the message, printed by the caller, names the key or path).
pub fn start_error_code(e: &crate::app::gateway::StartError) -> i32 {
    use crate::app::gateway::StartError;
    match e {
        StartError::Queue(_) => exit::IOERR,
        StartError::DataDir { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            exit::NOPERM
        }
        StartError::DataDir { .. } => exit::CANTCREAT,
        StartError::InUse(_) => exit::TEMPFAIL,
        StartError::Thread(_) => exit::OSERR,
        StartError::Broker(_) | StartError::Metrics { .. } => exit::UNAVAILABLE,
        StartError::Fleet(_) => exit::CANTCREAT,
    }
}

/// `edgegate passwd FILE USER`: password from the first line of standard input.
pub fn passwd(file: &Path, user: &str) -> i32 {
    let stdin = std::io::stdin();
    match crate::config::auth::set_password(file, user, &mut stdin.lock()) {
        Ok(()) => {
            eprintln!("edgegate: password of {user:?} set in {}", file.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("edgegate: passwd: {e}");
            if e.is_usage() {
                exit::USAGE
            } else {
                exit::CANTCREAT
            }
        }
    }
}

/// Load the configuration or print every error (one line each, with its key) and return the
/// exit code.
pub fn load_config(path: Option<&Path>) -> Result<Config, i32> {
    Config::load(path).map_err(|errors| {
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults + environment".into());
        eprintln!("edgegate: invalid configuration ({origin}):");
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        eprintln!("{} error(s)", errors.0.len());
        exit::CONFIG
    })
}

pub fn check_config(path: Option<&Path>) -> i32 {
    match load_config(path) {
        Ok(c) => {
            // Never a secret: user names and file paths only.
            let mut upstream = c
                .upstream
                .url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_else(|| "none (queue only)".into());
            if let Some(t) = &c.upstream.tls_summary {
                upstream.push_str(&format!(" {t}"));
            }
            if let Some(u) = &c.upstream.username {
                upstream.push_str(&format!(" user {u:?}"));
            }
            let mut broker = c.broker.listen.to_string();
            if let Some(a) = c.broker.tls_listen {
                broker.push_str(&format!(" + TLS {a}"));
            }
            match &c.broker.passwords {
                Some(p) => broker.push_str(&format!(" ({} user(s)", p.len())),
                None => broker.push_str(" (no password file"),
            }
            broker.push_str(if c.broker.allow_anonymous {
                ", anonymous allowed)"
            } else {
                ", anonymous refused)"
            });
            let fleet = if c.fleet.enabled {
                format!(
                    "on (groups {}; {})",
                    c.fleet.groups.join(", "),
                    match c.fleet.trusted_keys.len() {
                        0 => "unsigned documents accepted".to_string(),
                        n => format!("signed by one of {n} key(s) only"),
                    }
                )
            } else {
                "off".to_string()
            };
            println!(
                "configuration OK: gateway {} | broker {} | data {} | upstream {} | {} rule(s) | fleet {}",
                c.gateway.id,
                broker,
                c.gateway.data_dir.display(),
                upstream,
                c.rules.len(),
                fleet
            );
            exit::OK
        }
        Err(code) => code,
    }
}

/// Open the queue of `path`'s configuration for reading (works while the daemon runs).
fn open_queue(path: Option<&Path>) -> Result<(Config, Store), i32> {
    let cfg = load_config(path)?;
    let store = open_queue_of(&cfg, false)?;
    Ok((cfg, store))
}

/// The queue opened for writing by the CLI itself, with the data-dir lock the daemon takes,
/// held until the returned lock is dropped: a daemon that starts meanwhile finds the data dir
/// in use (and the CLI never writes under a running daemon, the only writer of `events`).
/// `Err(None)` when a daemon holds the lock.
fn lock_queue(cfg: &Config) -> Result<(std::fs::File, Store), Option<i32>> {
    let lock = match crate::app::gateway::lock_data_dir(&cfg.gateway.data_dir) {
        Ok(l) => l,
        Err(crate::app::gateway::StartError::InUse(_)) => return Err(None),
        Err(e) => {
            eprintln!("edgegate: {e}");
            return Err(Some(start_error_code(&e)));
        }
    };
    let store = open_queue_of(cfg, true).map_err(Some)?;
    Ok((lock, store))
}

fn in_use(cfg: &Config, what: &str) -> i32 {
    eprintln!(
        "edgegate: the gateway is running on {} (it holds the data-dir lock); stop it to {what}",
        cfg.gateway.data_dir.display()
    );
    exit::TEMPFAIL
}

fn open_queue_of(cfg: &Config, write: bool) -> Result<Store, i32> {
    let db = cfg.queue_path();
    if !db.exists() {
        eprintln!(
            "edgegate: no queue at {} (has the gateway run with this data_dir?)",
            db.display()
        );
        return Err(exit::NOINPUT);
    }
    Store::open_cli(&db, write).map_err(|e| {
        eprintln!("edgegate: {e}");
        exit::IOERR
    })
}

fn now_us() -> i64 {
    crate::queue::store::now_us()
}

/// `queue stats`: depth, bytes, oldest age, and rates measured over `interval`.
pub fn queue_stats(path: Option<&Path>, json: bool, interval: Duration) -> i32 {
    let (cfg, mut store) = match open_queue(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let first = match store.stats() {
        Ok(s) => s,
        Err(e) => return io_error(e),
    };
    let t0 = Instant::now();
    let mut second = first.clone();
    if !interval.is_zero() {
        std::thread::sleep(interval);
        match store.load_counters().and_then(|_| store.stats()) {
            Ok(s) => second = s,
            Err(e) => return io_error(e),
        }
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let in_rate = (second.next_sequence.saturating_sub(first.next_sequence)) as f64 / secs;
    let out_rate = (in_rate - (second.depth as f64 - first.depth as f64) / secs).max(0.0);
    let eta = if second.depth == 0 {
        Some(0.0)
    } else if out_rate > 0.0 && out_rate > in_rate {
        Some(second.depth as f64 / (out_rate - in_rate))
    } else {
        None
    };
    let oldest_age_s = second
        .oldest_us
        .map(|t| ((now_us() - t).max(0) as f64) / 1e6);
    let db = cfg.queue_path();
    if json {
        let v = serde_json::json!({
            "path": db.display().to_string(),
            "depth": second.depth,
            "bytes": second.bytes,
            "alerts": second.alerts,
            "kept_for_replay": second.kept,
            "parked": second.parked,
            "oldest_age_seconds": oldest_age_s,
            "next_sequence": second.next_sequence,
            "in_per_second": in_rate,
            "out_per_second": out_rate,
            "drain_seconds": eta,
        });
        println!("{v}");
    } else {
        println!("queue          {}", db.display());
        println!(
            "depth          {} events ({} alerts), {} bytes",
            second.depth, second.alerts, second.bytes
        );
        match oldest_age_s {
            Some(a) => println!(
                "oldest         {} ago",
                humantime::format_duration(Duration::from_secs(a as u64))
            ),
            None => println!("oldest         -"),
        }
        println!("rates          in {in_rate:.1}/s, out {out_rate:.1}/s (over {secs:.1} s)");
        match eta {
            Some(e) => println!(
                "drains in      {}",
                humantime::format_duration(Duration::from_secs(e.ceil() as u64))
            ),
            None => {
                println!("drains in      never at these rates (not sending faster than it fills)")
            }
        }
        println!("kept (replay)  {}", second.kept);
        println!(
            "parked         {} (set aside: the upstream cannot accept them; queue peek --parked)",
            second.parked
        );
        println!("next sequence  {}", second.next_sequence);
    }
    exit::OK
}

fn io_error(e: StoreError) -> i32 {
    eprintln!("edgegate: {e}");
    exit::IOERR
}

/// One stored event as a JSON line: the envelope plus where it sits in the queue.
fn event_json(e: &StoredEvent) -> serde_json::Value {
    let envelope = serde_json::from_slice::<serde_json::Value>(&e.body).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&e.body).into_owned())
    });
    serde_json::json!({
        "position": e.pos,
        "sequence": e.seq,
        "class": e.class.name(),
        "topic": e.topic,
        "event": envelope,
    })
}

/// `queue peek`: the oldest `n` events (optionally of one topic filter; of the parked ones
/// with `parked`), one JSON line each.
pub fn queue_peek(path: Option<&Path>, n: usize, filter: Option<&str>, parked: bool) -> i32 {
    if let Some(code) = bad_filter(filter) {
        return code;
    }
    let (_, store) = match open_queue(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut left = n;
    let mut print = |line: serde_json::Value| {
        use std::io::Write;
        // A closed pipe (`| head`) ends the listing.
        let more = writeln!(out, "{line}").is_ok();
        left = left.saturating_sub(1);
        more && left > 0
    };
    if n == 0 {
        return exit::OK;
    }
    let result = if parked {
        store.each_parked(filter, |e, reason| {
            let mut v = event_json(&e);
            v["parked_because"] = reason.into();
            print(v)
        })
    } else {
        store.each(filter, |e| print(event_json(&e)))
    };
    drop(out);
    match result {
        Ok(()) => exit::OK,
        Err(e) => io_error(e),
    }
}

/// `queue export`: every queued (or parked) event, one JSON line each (for a support ticket or a
/// replay). Streamed a page at a time: memory stays constant however long the queue.
pub fn queue_export(path: Option<&Path>, filter: Option<&str>, parked: bool) -> i32 {
    queue_peek(path, usize::MAX, filter, parked)
}

/// `queue purge`: delete queued events (older than a duration, of a topic filter).
pub fn queue_purge(
    path: Option<&Path>,
    older_than: Option<Duration>,
    filter: Option<&str>,
    parked: bool,
    yes: bool,
) -> i32 {
    if let Some(code) = bad_filter(filter) {
        return code;
    }
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Held until the purge is done (and while it asks for confirmation).
    let (_lock, mut store) = match lock_queue(&cfg) {
        Ok(x) => x,
        Err(None) => return in_use(&cfg, "purge its queue"),
        Err(Some(code)) => return code,
    };
    let before = older_than.map(|d| now_us() - d.as_micros() as i64);
    let what = match (older_than, filter) {
        _ if parked => format!(
            "parked events{}",
            filter.map(|f| format!(" on {f}")).unwrap_or_default()
        ),
        (None, None) => "ALL queued events".to_string(),
        (Some(d), None) => format!("queued events older than {}", humantime::format_duration(d)),
        (None, Some(f)) => format!("queued events on {f}"),
        (Some(d), Some(f)) => format!(
            "queued events on {f} older than {}",
            humantime::format_duration(d)
        ),
    };
    if !yes {
        eprint!("Delete {what}? They will never reach the upstream. [y/N] ");
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).is_err()
            || !matches!(answer.trim(), "y" | "Y" | "yes")
        {
            eprintln!("nothing deleted");
            return exit::OK;
        }
    }
    let result = if parked {
        store.purge_parked(filter)
    } else {
        store.purge(before, filter)
    };
    match result {
        Ok(n) => {
            println!("deleted {n} event(s)");
            exit::OK
        }
        Err(e) => io_error(e),
    }
}

/// `queue replay`: send kept (acknowledged) events upstream again, same ids and sequences.
pub fn queue_replay(path: Option<&Path>, since: &str, filter: Option<&str>) -> i32 {
    if let Some(code) = bad_filter(filter) {
        return code;
    }
    let since_us = match parse_since(since) {
        Some(t) => t,
        None => {
            eprintln!("edgegate: --since {since:?}: give an RFC 3339 time (2026-11-26T10:00:00Z) or a duration ago (2h)");
            return exit::USAGE;
        }
    };
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cfg.queue.keep_acked.is_zero() {
        eprintln!("edgegate: queue.keep_acked is 0: acknowledged events are not kept, there is nothing to replay");
        return exit::CONFIG;
    }
    let req = Request::Replay {
        since_us,
        filter: filter.map(str::to_string),
    };
    queue_request(&cfg, &req, |store| {
        store.kept_since(since_us, filter).map(|v| v.len() as u64)
    })
}

/// `queue retry`: queue parked events again (same ids), e.g. after the upstream's limits or
/// ACL were changed.
pub fn queue_retry(path: Option<&Path>, filter: Option<&str>) -> i32 {
    if let Some(code) = bad_filter(filter) {
        return code;
    }
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::Retry {
        filter: filter.map(str::to_string),
    };
    queue_request(&cfg, &req, |store| {
        let mut n = 0;
        store
            .each_parked(filter, |_, _| {
                n += 1;
                true
            })
            .map(|()| n)
    })
}

/// Carry out `req`: by the running daemon (asked through the file; `count` says how many events
/// it concerns), or, with no daemon, here, holding the data-dir lock. Either way by
/// [`Store::apply`].
fn queue_request(
    cfg: &Config,
    req: &Request,
    count: impl FnOnce(&Store) -> Result<u64, StoreError>,
) -> i32 {
    match lock_queue(cfg) {
        Ok((_lock, mut store)) => match store.apply(req) {
            Ok((n, _)) => {
                println!("queued {n} event(s) again; they are sent when the gateway runs");
                exit::OK
            }
            Err(e) => io_error(e),
        },
        Err(Some(code)) => code,
        Err(None) => {
            // The daemon runs: it is the only writer of the queue; ask it.
            let mut store = match open_queue_of(cfg, true) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let n = match count(&store) {
                Ok(n) => n,
                Err(e) => return io_error(e),
            };
            if let Err(e) = store.request(req) {
                return io_error(e);
            }
            println!(
                "asked the running gateway to queue {n} event(s) again; it does so within a second"
            );
            exit::OK
        }
    }
}

fn bad_filter(filter: Option<&str>) -> Option<i32> {
    let f = filter?;
    match crate::core::topic::validate_filter(f) {
        Ok(()) => None,
        Err(e) => {
            eprintln!("edgegate: --topic: {e}");
            Some(exit::USAGE)
        }
    }
}

/// An RFC 3339 time, or a duration meaning "that long ago".
fn parse_since(text: &str) -> Option<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_micros() as i64);
    }
    humantime::parse_duration(text)
        .ok()
        .map(|d| now_us() - d.as_micros() as i64)
}
