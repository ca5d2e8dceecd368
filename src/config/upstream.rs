//! `[upstream]`: the cloud broker's URL, identity, timing, batching, credentials and TLS.
//!
//! Invariants: every check reports under its own `upstream.*` key (a TLS file problem under
//! the key of the file that has it), in a fixed order; an `UpstreamConfig` that comes out has
//! read its password file and built its TLS client configuration; a batch always fits in
//! `upstream.max_packet_size`.

use std::path::Path;
use std::time::Duration;

use super::fields::{Fields, Table};
use super::{UpstreamConfig, UpstreamProtocol, UpstreamUrl};
use crate::config::tls::Secret;

/// `[upstream]`; `id` is the gateway's (the default topic prefix and client id carry it).
pub(super) fn upstream(top: &mut Table<'_, '_>, id: &str) -> UpstreamConfig {
    let mut u = top.section("upstream");
    let url_text = u.string("url", "");
    let url = if url_text.trim().is_empty() {
        None
    } else {
        match parse_upstream_url(&url_text) {
            Ok(url) => Some(url),
            Err(msg) => {
                u.error("url", &msg.to_string());
                None
            }
        }
    };
    let upstream = UpstreamConfig {
        url,
        topic_prefix: u
            .string("topic_prefix", &format!("edge/{id}"))
            .trim_end_matches('/')
            .to_string(),
        client_id: u.string("client_id", &format!("edgegate-{id}")),
        keep_alive: u.duration_in(
            "keep_alive",
            "30s",
            Duration::from_secs(5),
            Duration::from_secs(3600),
        ),
        inflight: u.usize_in("inflight", 1024, 1, 65_000),
        ack_timeout: u.duration_in(
            "ack_timeout",
            "15s",
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
        reconnect_min: u.duration_in(
            "reconnect_min",
            "250ms",
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        reconnect_max: u.duration_in(
            "reconnect_max",
            "30s",
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ),
        max_packet_size: u.size_in("max_packet_size", 1024 * 1024, 1024, 256 * 1024 * 1024),
        max_rate: u.usize_in("max_rate", 0, 0, 10_000_000) as u32,
        batch_events: u.usize_in("batch_events", 1, 1, 10_000),
        batch_bytes: u.size_in("batch_bytes", 64 * 1024, 256, 256 * 1024 * 1024),
        batch_topic: String::new(),
        protocol: u.choice(
            "protocol",
            "3.1.1",
            &[("3.1.1", UpstreamProtocol::V4), ("5", UpstreamProtocol::V5)],
        ),
        username: None,
        password: None,
        tls: None,
        tls_summary: None,
        fleet_state_topic: None,
    };
    let mut upstream = upstream;
    upstream.batch_topic = u.string("batch_topic", &format!("{}/batch", upstream.topic_prefix));
    if upstream.batch_topic.is_empty() || upstream.batch_topic.contains(['+', '#']) {
        u.error("batch_topic", "must be a topic name without wildcards");
    }
    // Array brackets, commas, and the packet's own header and topic must fit too.
    if upstream.batch_events > 1
        && upstream.batch_bytes + upstream.batch_topic.len() + 64 > upstream.max_packet_size
    {
        u.error(
            "batch_bytes",
            &format!(
                "a batch of {} bytes does not fit in upstream.max_packet_size ({} bytes)",
                upstream.batch_bytes, upstream.max_packet_size
            ),
        );
    }
    credentials(&mut u, &mut upstream);
    tls(&mut u, &mut upstream);
    if upstream.reconnect_min > upstream.reconnect_max {
        u.error("reconnect_min", "must not exceed upstream.reconnect_max");
    }
    if upstream.client_id.is_empty() {
        u.error("client_id", "must not be empty");
    }
    if upstream.topic_prefix.contains(['+', '#']) {
        u.error("topic_prefix", "must not contain MQTT wildcards '+' or '#'");
    }
    u.finish();
    upstream
}

/// `username` and `password_file` (read here, so a missing file is a config error).
fn credentials(u: &mut Table<'_, '_>, upstream: &mut UpstreamConfig) {
    let user = u.string("username", "");
    let pw_file = u.string("password_file", "");
    if !user.is_empty() {
        upstream.username = Some(user);
    }
    if !pw_file.trim().is_empty() {
        if upstream.username.is_none() {
            u.error("password_file", "set upstream.username too");
        }
        match std::fs::read_to_string(pw_file.trim()) {
            Ok(t) => {
                upstream.password = Some(Secret::new(t.trim_end_matches(['\n', '\r']).to_string()))
            }
            Err(e) => u.error("password_file", &format!("{}: {e}", pw_file.trim())),
        }
    }
}

/// `ca_file`, `cert_file`, `key_file`: only with an `mqtts://` URL; each file is checked on
/// its own first, so the error names the right key.
fn tls(u: &mut Table<'_, '_>, upstream: &mut UpstreamConfig) {
    let ca = u.string("ca_file", "");
    let cert = u.string("cert_file", "");
    let key = u.string("key_file", "");
    let (ca, cert, key) = (ca.trim(), cert.trim(), key.trim());
    let tls_url = upstream.url.as_ref().map(|x| x.tls);
    if tls_url != Some(true) && !(ca.is_empty() && cert.is_empty() && key.is_empty()) {
        u.error(
            "url",
            "upstream.ca_file/cert_file/key_file need an mqtts:// url",
        );
    } else if tls_url == Some(true) {
        let client = match (cert, key) {
            ("", "") => Ok(None),
            ("", _) => Err(("cert_file", "required with upstream.key_file".to_string())),
            (_, "") => Err(("key_file", "required with upstream.cert_file".to_string())),
            (c, k) => Ok(Some((Path::new(c), Path::new(k)))),
        };
        match client {
            Err((k, m)) => u.error(k, &m),
            Ok(client) => {
                let ca_path = (!ca.is_empty()).then(|| Path::new(ca));
                // Check each file on its own first, so the error names the right key.
                let mut file_ok = true;
                if let Some(p) = ca_path {
                    if let Err(e) = crate::config::tls::certs(p) {
                        u.error("ca_file", &e.to_string());
                        file_ok = false;
                    }
                }
                if let Some((c, k)) = client {
                    if let Err(e) = crate::config::tls::certs(c) {
                        u.error("cert_file", &e.to_string());
                        file_ok = false;
                    }
                    if let Err(e) = crate::config::tls::key(k) {
                        u.error("key_file", &e.to_string());
                        file_ok = false;
                    }
                }
                match crate::config::tls::client_config(ca_path, client).filter_ok(file_ok) {
                    Ok(t) => {
                        upstream.tls = Some(t);
                        upstream.tls_summary = Some(format!(
                            "TLS ({}{})",
                            if ca.is_empty() {
                                "system trust store".to_string()
                            } else {
                                format!("CA {ca}")
                            },
                            if client.is_some() {
                                ", client certificate"
                            } else {
                                ""
                            }
                        ));
                    }
                    Err(Some(e)) => u.error(
                        if client.is_some() {
                            "cert_file"
                        } else if ca.is_empty() {
                            "url"
                        } else {
                            "ca_file"
                        },
                        &e.to_string(),
                    ),
                    Err(None) => {}
                }
            }
        }
    }
}

/// A result whose error was already reported key by key (`Err(None)`).
trait FilterOk<T, E> {
    fn filter_ok(self, ok: bool) -> Result<T, Option<E>>;
}

impl<T, E> FilterOk<T, E> for Result<T, E> {
    fn filter_ok(self, ok: bool) -> Result<T, Option<E>> {
        match self {
            _ if !ok => Err(None),
            Ok(v) => Ok(v),
            Err(e) => Err(Some(e)),
        }
    }
}

/// Why an upstream URL is refused (each message quotes the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{text:?} must start with mqtt:// or mqtts://")]
    Scheme { text: String },
    #[error("{text:?} must be mqtt[s]://host[:port] (credentials go in their own keys)")]
    Shape { text: String },
    #[error("{text:?}: unclosed '['")]
    UnclosedBracket { text: String },
    #[error("{text:?}: bad port {port:?}")]
    BadPort { text: String, port: String },
    #[error("{text:?}: unexpected {after:?}")]
    Unexpected { text: String, after: String },
    #[error("{text:?} needs a host and a non-zero port")]
    NoHost { text: String },
}

/// `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
pub fn parse_upstream_url(text: &str) -> Result<UpstreamUrl, UrlError> {
    let owned = || text.to_string();
    let bad_port = |p: &str| UrlError::BadPort {
        text: owned(),
        port: p.to_string(),
    };
    let (tls, rest) = if let Some(r) = text.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(UrlError::Scheme { text: owned() });
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(UrlError::Shape { text: owned() });
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        // [ipv6]:port
        let (h, after) = h
            .split_once(']')
            .ok_or_else(|| UrlError::UnclosedBracket { text: owned() })?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| bad_port(p))?,
            None if after.is_empty() => default_port,
            None => {
                return Err(UrlError::Unexpected {
                    text: owned(),
                    after: after.to_string(),
                })
            }
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| bad_port(p))?),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(UrlError::NoHost { text: owned() });
    }
    Ok(UpstreamUrl { tls, host, port })
}
