//! `[broker]`: listeners and per-client limits, the TLS listener's files, who may connect
//! (password file, anonymous access) and the access control list.
//!
//! Invariants: every check reports under its own `broker.*` key (an ACL entry under
//! `broker.acl[i].*`) and the checks run in a fixed order, so `check-config` lists errors in
//! the order of the file's sections; a `BrokerConfig` that comes out has loaded its TLS
//! material and password file, never just their paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::fields::{Fields, Table};
use super::BrokerConfig;
use crate::config::acl::{validate_pattern, Acl, AclRule};
use crate::config::auth::Passwords;

/// `[broker]`.
pub(super) fn broker(top: &mut Table<'_, '_>) -> BrokerConfig {
    let mut b = top.section("broker");
    let mut broker = limits(&mut b);
    tls(&mut b, &mut broker);
    access(&mut b, &mut broker);
    acl(&mut b, &mut broker);
    if broker.max_connections < 1 {
        b.error("max_connections", "must be at least 1");
    }
    b.finish();
    broker
}

/// Listeners and limits (all with their defaults; TLS, access and ACL filled in after).
fn limits(b: &mut Table<'_, '_>) -> BrokerConfig {
    BrokerConfig {
        listen: b.socket_addr("listen", "127.0.0.1:1883"),
        listen_v5: b.opt_socket_addr("listen_v5", ""),
        max_connections: b.usize_in("max_connections", 1000, 1, 1_000_000),
        max_payload_size: b.size_in("max_payload_size", 256 * 1024, 16, 256 * 1024 * 1024),
        max_buffered_bytes: b.size_in("max_buffered_bytes", 32 << 20, 64 << 10, 1 << 40),
        connection_timeout: b.duration_in(
            "connection_timeout",
            "5s",
            Duration::from_millis(100),
            Duration::from_secs(60),
        ),
        segment_size: b.size_in("segment_size", 128 * 1024, 1024, 1 << 30),
        segment_count: b.usize_in("segment_count", 8, 1, 1024),
        max_fanout_bytes: b.size_in("max_fanout_bytes", 64 << 20, 64 << 10, 1 << 40),
        tls_listen: b.opt_socket_addr("tls_listen", ""),
        tls: None,
        passwords: None,
        password_file: None,
        allow_anonymous: true,
        max_client_id_length: b.usize_in("max_client_id_length", 128, 1, 65535),
        max_topic_length: b.usize_in("max_topic_length", 512, 1, 65535),
        max_topic_aliases: b.usize_in("max_topic_aliases", 64, 0, 4096) as u16,
        max_topics: b.usize_in("max_topics", 100_000, 1, 100_000_000),
        max_client_ids: b.usize_in("max_client_ids", 100_000, 1, 100_000_000),
        max_publish_rate: b.usize_in("max_publish_rate", 0, 0, 10_000_000) as u32,
        acl: None,
        max_retained_messages: b.usize_in("max_retained_messages", 1000, 0, 10_000_000),
        max_retained_bytes: b.size_in("max_retained_bytes", 16 << 20, 0, 1 << 40),
        max_retained_per_client: b.usize_in("max_retained_per_client", 100, 0, 10_000_000),
        max_retained_bytes_per_client: b.size_in(
            "max_retained_bytes_per_client",
            1 << 20,
            0,
            1 << 40,
        ),
        max_connections_per_address: b.usize_in("max_connections_per_address", 100, 1, 1_000_000),
        max_subscriptions_per_client: b.usize_in("max_subscriptions_per_client", 100, 1, 1_000_000),
        max_filters: b.usize_in("max_filters", 1000, 1, 10_000_000),
    }
}

/// The TLS listener needs both files, and the files need the listener.
fn tls(b: &mut Table<'_, '_>, broker: &mut BrokerConfig) {
    let cert = b.string("tls_cert_file", "");
    let key = b.string("tls_key_file", "");
    match (broker.tls_listen.is_some(), cert.trim(), key.trim()) {
        (false, "", "") => {}
        (false, _, _) => b.error(
            "tls_listen",
            "tls_cert_file/tls_key_file are set but tls_listen is empty",
        ),
        (true, "", _) => b.error("tls_cert_file", "required when broker.tls_listen is set"),
        (true, _, "") => b.error("tls_key_file", "required when broker.tls_listen is set"),
        (true, c, k) => match crate::config::tls::server_config(Path::new(c), Path::new(k)) {
            Ok(t) => broker.tls = Some(t),
            Err(e) => b.error("tls_cert_file", &e.to_string()),
        },
    }
}

/// The password file, and anonymous access only when explicitly enabled.
fn access(b: &mut Table<'_, '_>, broker: &mut BrokerConfig) {
    let pw = b.string("password_file", "");
    if !pw.trim().is_empty() {
        let path = PathBuf::from(pw.trim());
        match Passwords::load(&path) {
            Ok(p) => broker.passwords = Some(Arc::new(p)),
            Err(e) => b.error("password_file", &e.to_string()),
        }
        broker.password_file = Some(path);
    }
    // Anonymous access only when explicitly enabled (the shipped config does, for a first run).
    broker.allow_anonymous = b.opt_bool("allow_anonymous").unwrap_or(false);
    if !broker.allow_anonymous && broker.password_file.is_none() {
        b.error(
            "allow_anonymous",
            "is false (the default) and there is no broker.password_file: no sensor could connect; \
             set allow_anonymous = true or a password_file",
        );
    }
}

/// `broker.acl`: each entry's patterns are valid, and naming users needs a password file.
fn acl(b: &mut Table<'_, '_>, broker: &mut BrokerConfig) {
    if let Some(items) = b.array("acl") {
        let mut rules = Vec::new();
        for (i, v) in items.iter().enumerate() {
            let mut e = b.element("acl", i, v);
            let user = e.string("user", "*");
            let publish = e.string_list("publish");
            let subscribe = e.string_list("subscribe");
            for (k, list) in [("publish", &publish), ("subscribe", &subscribe)] {
                for p in list {
                    if let Err(m) = validate_pattern(p) {
                        e.error(k, &m.to_string());
                    }
                }
            }
            let names_users = user != "*"
                || publish
                    .iter()
                    .chain(&subscribe)
                    .any(|p| p.contains("{username}"));
            if names_users && broker.password_file.is_none() {
                e.error(
                    "user",
                    "user names are only verified with broker.password_file: set it to use per-user ACLs",
                );
            }
            e.finish();
            rules.push(AclRule {
                user,
                publish,
                subscribe,
            });
        }
        broker.acl = Some(Arc::new(Acl { rules }));
    }
}
