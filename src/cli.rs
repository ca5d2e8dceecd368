//! Commands other than `run`: `check-config`, `queue stats`. Each returns a sysexits code.

use std::path::Path;

use crate::config::Config;
use crate::queue::Store;

/// sysexits(3) codes.
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 64;
    pub const DATAERR: i32 = 65;
    pub const NOINPUT: i32 = 66;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    pub const IOERR: i32 = 74;
    pub const CONFIG: i32 = 78;
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
            let upstream = c
                .upstream
                .url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_else(|| "none (queue only)".into());
            println!(
                "configuration OK: gateway {} | broker {} | data {} | upstream {} | {} rule(s)",
                c.gateway.id,
                c.broker.listen,
                c.gateway.data_dir.display(),
                upstream,
                c.rules.len()
            );
            exit::OK
        }
        Err(code) => code,
    }
}

pub fn queue_stats(path: Option<&Path>, json: bool) -> i32 {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = cfg.queue_path();
    if !db.exists() {
        eprintln!(
            "edgegate: no queue at {} (has the gateway run with this data_dir?)",
            db.display()
        );
        return exit::NOINPUT;
    }
    let stats = match Store::open_cli(&db, false).and_then(|s| s.stats()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgegate: {e}");
            return exit::IOERR;
        }
    };
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let oldest_age_s = stats.oldest_us.map(|t| ((now_us - t).max(0) as f64) / 1e6);
    if json {
        let v = serde_json::json!({
            "path": db.display().to_string(),
            "depth": stats.depth,
            "bytes": stats.bytes,
            "alerts": stats.alerts,
            "oldest_age_seconds": oldest_age_s,
            "next_sequence": stats.next_sequence,
        });
        println!("{v}");
    } else {
        println!("queue         {}", db.display());
        println!(
            "depth         {} events ({} alerts)",
            stats.depth, stats.alerts
        );
        println!("bytes         {}", stats.bytes);
        match oldest_age_s {
            Some(a) => println!(
                "oldest        {}",
                humantime::format_duration(std::time::Duration::from_secs(a as u64))
            ),
            None => println!("oldest        -"),
        }
        println!("next sequence {}", stats.next_sequence);
    }
    exit::OK
}
