//! `[fleet]`: fleet management over the upstream connection (groups, trusted keys, limits).
//!
//! Invariants: checked against `[upstream]` (the fleet needs its URL and a client id of its
//! own); every error is reported under its `fleet.*` key; trusted keys come out decoded.

use std::time::Duration;

use super::fields::{Fields, Table};
use super::{FleetConfig, UpstreamConfig};

/// `[fleet]`, checked against `[upstream]`.
pub(super) fn fleet(top: &mut Table<'_, '_>, upstream: &UpstreamConfig) -> FleetConfig {
    use base64::Engine as _;
    let mut f = top.section("fleet");
    let enabled = f.opt_bool("enabled").unwrap_or(false);
    let groups = if f.get("groups").is_some() {
        f.string_list("groups")
    } else {
        vec!["all".to_string()]
    };
    let mut seen = std::collections::HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        if g.is_empty() || g.contains(['+', '#', '/', ' ']) || g.chars().any(char::is_control) {
            f.error(
                &format!("groups[{i}]"),
                "a group name must be non-empty, without '/', '+', '#', spaces or control characters",
            );
        } else if !seen.insert(g.as_str()) {
            f.error(
                &format!("groups[{i}]"),
                &format!("group {g:?} is listed twice"),
            );
        }
    }
    let group_prefix = f
        .string("group_prefix", "fleet/{group}")
        .trim_end_matches('/')
        .to_string();
    if !group_prefix.contains("{group}") {
        f.error("group_prefix", "must contain {group}");
    } else if group_prefix.contains(['+', '#']) || group_prefix.starts_with('/') {
        f.error(
            "group_prefix",
            "must be a topic without wildcards and without a leading '/'",
        );
    }
    let mut trusted_keys = Vec::new();
    for (i, k) in f.string_list("trusted_keys").iter().enumerate() {
        match base64::engine::general_purpose::STANDARD
            .decode(k.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        {
            Some(key) => trusted_keys.push(key),
            None => f.error(
                &format!("trusted_keys[{i}]"),
                "expected an ed25519 public key: 32 bytes in base64 (`edgegate fleet keygen` prints one)",
            ),
        }
    }
    let fleet = FleetConfig {
        enabled,
        groups,
        group_prefix,
        trusted_keys,
        max_document_size: f.size_in("max_document_size", 256 * 1024, 1024, 16 * 1024 * 1024),
        client_id: f.string("client_id", &format!("{}-fleet", upstream.client_id)),
        state_interval: f.duration_in(
            "state_interval",
            "60s",
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
        confirm_after: f.duration_in(
            "confirm_after",
            "60s",
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        ),
        rollback_after: f.usize_in("rollback_after", 3, 1, 100) as u32,
    };
    if fleet.enabled && upstream.url.is_none() {
        f.error(
            "enabled",
            "the fleet needs upstream.url (its documents come from there)",
        );
    }
    if fleet.client_id.is_empty() {
        f.error("client_id", "must not be empty");
    } else if fleet.client_id == upstream.client_id {
        f.error(
            "client_id",
            "must differ from upstream.client_id (the broker would close one connection for the other)",
        );
    }
    f.finish();
    fleet
}
