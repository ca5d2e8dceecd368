//! Who may read the status page and the JSON API.
//!
//! - Listener on a loopback address: everyone who can reach it (someone on the gateway itself).
//! - Elsewhere (the site LAN): the broker's users, by HTTP Basic against
//!   `broker.password_file` ([`Passwords::verify`], the broker's own check), unless
//!   `broker.allow_anonymous = true`, the same policy as for sensors. Without a password file
//!   and without anonymous access nobody gets in (403, saying why).
//!
//! argon2 costs tens of milliseconds and ~19 MiB per check, and a browser repeats the same
//! credentials on every poll: a successful check is remembered for [`REMEMBER`], keyed by an
//! HMAC (per-process random key) of the header, never the password itself; at most
//! [`VERIFYING`] checks run at once, on blocking threads. `/metrics` and `/healthz` are not
//! covered (scrapers and probes use them as before).
//!
//! Layer: app (the password table is `config::auth`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::Semaphore;

use crate::config::auth::Passwords;

/// How long a verified `Authorization` header is accepted without a new argon2 check.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// Verified headers remembered at most.
const REMEMBERED: usize = 64;
/// Concurrent password checks.
const VERIFYING: usize = 2;
/// Longest `Authorization` header looked at.
const MAX_HEADER: usize = 1024;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("credentials required (the broker's users, HTTP Basic)")]
    NeedCredentials,
    #[error("bad user name or password")]
    BadCredentials,
    #[error("the status page is bound to a non-loopback address but there is no broker.password_file and broker.allow_anonymous is false: nobody can be let in")]
    NoUsers,
}

pub enum Access {
    Open,
    Users(Box<Users>),
    Closed,
}

pub struct Users {
    passwords: Arc<Passwords>,
    key: ring::hmac::Key,
    remembered: Mutex<HashMap<[u8; 32], Instant>>,
    verifying: Arc<Semaphore>,
    last_log: Mutex<(Option<Instant>, u64)>,
    /// argon2 checks run (for tests: remembered headers skip them).
    checks: std::sync::atomic::AtomicU64,
}

impl Access {
    /// The policy for a listener on `listen` with the broker's authentication settings.
    pub fn new(
        listen: SocketAddr,
        allow_anonymous: bool,
        passwords: Option<Arc<Passwords>>,
    ) -> Access {
        if listen.ip().is_loopback() || allow_anonymous {
            return Access::Open;
        }
        let Some(passwords) = passwords else {
            return Access::Closed;
        };
        let rng = ring::rand::SystemRandom::new();
        let key = match ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng) {
            Ok(k) => k,
            // No randomness: refuse everyone rather than remember credentials weakly.
            Err(_) => return Access::Closed,
        };
        Access::Users(Box::new(Users {
            passwords,
            key,
            remembered: Mutex::new(HashMap::new()),
            verifying: Arc::new(Semaphore::new(VERIFYING)),
            last_log: Mutex::new((None, 0)),
            checks: Default::default(),
        }))
    }

    /// Check a request's `Authorization` header.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        match self {
            Access::Open => Ok(()),
            Access::Closed => Err(Denied::NoUsers),
            Access::Users(u) => u.check(authorization).await,
        }
    }
}

impl Users {
    async fn check(&self, header: Option<&[u8]>) -> Result<(), Denied> {
        let header = header.ok_or(Denied::NeedCredentials)?;
        if header.len() > MAX_HEADER {
            return Err(self.refused(Denied::BadCredentials));
        }
        let tag = ring::hmac::sign(&self.key, header);
        let mut id = [0u8; 32];
        id.copy_from_slice(tag.as_ref());
        let now = Instant::now();
        if let Ok(r) = self.remembered.lock() {
            if r.get(&id).is_some_and(|until| *until > now) {
                return Ok(());
            }
        }
        let (user, password) = basic(header).ok_or(Denied::NeedCredentials)?;
        let Ok(_permit) = self.verifying.clone().acquire_owned().await else {
            return Err(Denied::BadCredentials);
        };
        let passwords = self.passwords.clone();
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ok = tokio::task::spawn_blocking(move || passwords.verify(&user, &password))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(self.refused(Denied::BadCredentials));
        }
        if let Ok(mut r) = self.remembered.lock() {
            r.retain(|_, until| *until > now);
            if r.len() >= REMEMBERED {
                // Full of fresh entries: forget the one closest to expiry.
                if let Some(k) = r.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                    r.remove(&k);
                }
            }
            r.insert(id, now + REMEMBER);
        }
        Ok(())
    }

    /// Log refusals, at most one line per 10 s (with the count since the last line).
    fn refused(&self, d: Denied) -> Denied {
        if let Ok(mut l) = self.last_log.lock() {
            l.1 += 1;
            if l.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(refused = l.1, "status page: {d}");
                *l = (Some(Instant::now()), 0);
            }
        }
        d
    }
}

/// `Basic base64(user:password)` -> (user, password).
fn basic(header: &[u8]) -> Option<(String, Vec<u8>)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, creds) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(creds.trim())
        .ok()?;
    let colon = raw.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(raw[..colon].to_vec()).ok()?;
    Some((user, raw[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn policy() {
        let lan: SocketAddr = "0.0.0.0:9883".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9883".parse().unwrap();
        let hash = crate::config::auth::hash_password(b"s3cret").unwrap();
        let pw = Arc::new(Passwords::parse(&format!("tech:{hash}\n")).unwrap());
        assert!(matches!(Access::new(local, false, None), Access::Open));
        assert!(matches!(
            Access::new(lan, true, Some(pw.clone())),
            Access::Open
        ));
        let closed = Access::new(lan, false, None);
        assert_eq!(closed.check(None).await, Err(Denied::NoUsers));
        let users = Access::new(lan, false, Some(pw));
        assert_eq!(users.check(None).await, Err(Denied::NeedCredentials));
        assert_eq!(
            users.check(Some(b"Bearer x")).await,
            Err(Denied::NeedCredentials)
        );
        assert_eq!(
            users.check(Some(&header("tech", "wrong"))).await,
            Err(Denied::BadCredentials)
        );
        assert_eq!(
            users.check(Some(&header("nobody", "s3cret"))).await,
            Err(Denied::BadCredentials)
        );
        assert_eq!(users.check(Some(&header("tech", "s3cret"))).await, Ok(()));
        // Remembered: the second check does not run argon2.
        let checks = |a: &Access| match a {
            Access::Users(u) => u.checks.load(std::sync::atomic::Ordering::Relaxed),
            _ => 0,
        };
        assert_eq!(checks(&users), 3);
        assert_eq!(users.check(Some(&header("tech", "s3cret"))).await, Ok(()));
        assert_eq!(checks(&users), 3);
        // A wrong password is never remembered as right.
        assert_eq!(
            users.check(Some(&header("tech", "s3cret "))).await,
            Err(Denied::BadCredentials)
        );
    }
}
