//! `edgegate fleet push|status|keygen`: the operator's side of fleet rules.
//!
//! `push` checks a document locally exactly as a gateway will (the rules as `check-config`
//! checks a `rules_engine.dir` file; signature made with `--sign`), publishes it retained, QoS
//! 1, and waits for the targets' states: applied (the state lists the document's SHA-256 for its
//! topic), refused (the state's last refusal has its SHA-256, with the errors), or not
//! answering. `status` prints every gateway's retained state.
//!
//! Layer: commands (reserved topics from `core::reserved`, documents from
//! `app::fleet::document`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::app::fleet::document::{self, Policy};
use crate::commands::cli::exit;

/// How to reach the cloud broker and find the gateways.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: String,
    pub username: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
    pub ca_file: Option<std::path::PathBuf>,
    /// The gateways' `upstream.topic_prefix`, with `{id}` for the gateway id.
    pub prefix: String,
    /// `fleet.group_prefix` of the gateways.
    pub group_prefix: String,
}

/// What to push where.
#[derive(Debug, Clone)]
pub struct Push<'a> {
    pub file: &'a Path,
    pub group: Option<&'a str>,
    pub gateway: Option<&'a str>,
    pub sign: Option<&'a Path>,
    pub max_size: usize,
    pub timeout: Duration,
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    crate::init_crypto();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("edgegate: cannot start the runtime: {e}");
            exit::SOFTWARE
        })
}

fn options(up: &Upstream) -> Result<MqttOptions, String> {
    let url = crate::config::parse_upstream_url(&up.url).map_err(|e| e.to_string())?;
    let id = format!("edgegate-fleet-cli-{}", uuid::Uuid::new_v4().simple());
    let mut o = MqttOptions::new(id, url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 * 1024 * 1024 + 1024, 16 * 1024 * 1024 + 1024);
    if url.tls {
        let tls = crate::config::tls::client_config(up.ca_file.as_deref(), None)
            .map_err(|e| e.to_string())?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    } else if up.ca_file.is_some() {
        return Err("--ca-file needs an mqtts:// url".into());
    }
    if let Some(user) = &up.username {
        let pw = match &up.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => String::new(),
        };
        o.set_credentials(user.clone(), pw);
    }
    Ok(o)
}

/// The states' filter: the prefix with `{id}` as `+`, then `/state`.
fn states_filter(prefix: &str) -> String {
    crate::core::reserved::state_topic(&prefix.replace("{id}", "+"))
}

/// Connect, subscribe to the states and collect the retained ones (until `quiet` passes with
/// nothing new after the SUBACK). Returns the client, its event loop and the states by topic.
async fn connect_and_collect(
    up: &Upstream,
    quiet: Duration,
) -> Result<(AsyncClient, rumqttc::EventLoop, BTreeMap<String, Value>), String> {
    let (client, mut ev) = AsyncClient::new(options(up)?, 16);
    let filter = states_filter(&up.prefix);
    let mut states = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut subscribed = false;
    loop {
        let wait = if subscribed {
            quiet
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, ev.poll()).await {
            Err(_) if subscribed => break,
            Err(_) => return Err(format!("no answer from {} in 10 s", up.url)),
            Ok(Err(e)) => return Err(format!("{}: {e}", up.url)),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(filter.clone(), QoS::AtLeastOnce)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                if a.return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    return Err(format!("the broker refused the subscription to {filter}"));
                }
                subscribed = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                    states.insert(p.topic, v);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    Ok((client, ev, states))
}

fn gateway_of(state: &Value, topic: &str) -> String {
    state["gateway"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| topic.trim_end_matches("/state").to_string())
}

/// What a state says about the document `sha` on `topic`.
fn verdict(state: &Value, topic: &str, sha: &str) -> Option<Result<(), String>> {
    let rules = &state["rules"];
    if rules["documents"][topic]["sha256"].as_str() == Some(sha) {
        return Some(Ok(()));
    }
    let refused = &rules["refused"];
    if refused["sha256"].as_str() == Some(sha) && refused["topic"].as_str() == Some(topic) {
        let errors: Vec<String> = refused["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["key"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Some(Err(errors.join("; ")));
    }
    None
}

/// `edgegate fleet push`.
pub fn push(up: &Upstream, p: &Push<'_>) -> i32 {
    let body = match std::fs::read(p.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("edgegate: {}: {e}", p.file.display());
            return exit::NOINPUT;
        }
    };
    let seed = match p.sign.map(read_seed).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgegate: --sign: {e}");
            return exit::NOINPUT;
        }
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let (client, mut ev, states) =
            match connect_and_collect(up, Duration::from_millis(700)).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("edgegate: {e}");
                    return exit::UNAVAILABLE;
                }
            };
        // The document's topic and the gateways expected to answer (by state topic).
        let (topic, targets): (String, Vec<String>) = match (p.gateway, p.group) {
            (Some(id), _) => {
                let found = states
                    .iter()
                    .find(|(_, s)| s["gateway"].as_str() == Some(id))
                    .map(|(t, _)| t.clone());
                let state_topic =
                    found.unwrap_or_else(|| crate::core::reserved::state_topic(&up.prefix.replace("{id}", id)));
                let prefix = state_topic.trim_end_matches("/state").to_string();
                (crate::core::reserved::gateway_topic(&prefix), vec![state_topic])
            }
            (None, group) => {
                let g = group.unwrap_or("all");
                let members = states
                    .iter()
                    .filter(|(_, s)| {
                        s["groups"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(g)))
                    })
                    .map(|(t, _)| t.clone())
                    .collect();
                (crate::core::reserved::group_topic(&up.group_prefix, g), members)
            }
        };
        let payload = match &seed {
            Some(seed) => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                match document::sign(seed, &topic, &body, now) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("edgegate: --sign: {e}");
                        return exit::DATAERR;
                    }
                }
            }
            None => body.clone(),
        };
        // Checked as the gateways will check it (signature apart: they hold the keys).
        let policy = Policy {
            max_size: p.max_size,
            trusted_keys: Vec::new(),
        };
        if let Err(errors) = document::check(&topic, &payload, &policy, &Default::default()) {
            eprintln!("edgegate: {} is not pushed:", p.file.display());
            for e in errors {
                eprintln!("  {e}");
            }
            return exit::DATAERR;
        }
        let sha = document::sha256_hex(&payload);
        if let Err(e) = client
            .publish(topic.clone(), QoS::AtLeastOnce, true, payload)
            .await
        {
            eprintln!("edgegate: publish: {e}");
            return exit::UNAVAILABLE;
        }
        println!("pushed {} to {topic} (sha256 {sha})", p.file.display());
        if targets.is_empty() {
            println!("no gateway has reported a state for this target yet; the document is retained and applies when they connect");
        }
        let mut latest: BTreeMap<String, Value> = states;
        let mut acked = false;
        let deadline = Instant::now() + p.timeout;
        loop {
            let done = acked
                && targets.iter().all(|t| {
                    latest
                        .get(t)
                        .is_some_and(|s| verdict(s, &topic, &sha).is_some())
                });
            if done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ev.poll()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    eprintln!("edgegate: {}: {e}", up.url);
                    break;
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked = true,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        latest.insert(p.topic, v);
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
        if !acked {
            eprintln!("edgegate: the broker did not acknowledge the document");
            return exit::UNAVAILABLE;
        }
        let (mut refused, mut silent) = (0, 0);
        for t in &targets {
            let state = latest.get(t).cloned().unwrap_or(Value::Null);
            let name = gateway_of(&state, t);
            match verdict(&state, &topic, &sha) {
                Some(Ok(())) => println!("{name}: applied"),
                Some(Err(e)) => {
                    refused += 1;
                    println!("{name}: refused: {e}");
                }
                None => {
                    silent += 1;
                    let why = if state["online"].as_bool() == Some(false) {
                        "offline"
                    } else {
                        "no state with this document yet"
                    };
                    println!("{name}: not answering ({why})");
                }
            }
        }
        client.disconnect().await.ok();
        if refused > 0 {
            exit::DATAERR
        } else if silent > 0 {
            exit::TEMPFAIL
        } else {
            exit::OK
        }
    })
}

/// `edgegate fleet status`.
pub fn status(up: &Upstream, json: bool) -> i32 {
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let (client, _ev, states) = match connect_and_collect(up, Duration::from_millis(700)).await
        {
            Ok(x) => x,
            Err(e) => {
                eprintln!("edgegate: {e}");
                return exit::UNAVAILABLE;
            }
        };
        let _ = client.try_disconnect();
        if json {
            let all: Vec<&Value> = states.values().collect();
            println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
            return exit::OK;
        }
        println!(
            "{:<20} {:<7} {:<9} {:<14} {:<18} {:>8}  HEALTH",
            "GATEWAY", "ONLINE", "VERSION", "RULES", "SOURCE", "BACKLOG"
        );
        for (topic, s) in &states {
            let sha = s["rules"]["sha256"]
                .as_str()
                .map_or("-".to_string(), |h| h.chars().take(12).collect());
            let health = if s["health"]["ok"].as_bool() == Some(true) {
                "ok".to_string()
            } else {
                s["health"]["problems"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<20} {:<7} {:<9} {:<14} {:<18} {:>8}  {}",
                gateway_of(s, topic),
                if s["online"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                s["version"].as_str().unwrap_or("-"),
                sha,
                s["rules"]["source"].as_str().unwrap_or("-"),
                s["queue"]["depth"]
                    .as_u64()
                    .map_or("-".to_string(), |d| d.to_string()),
                health
            );
            if let Some(r) = s["rules"]["refused"].as_object() {
                println!(
                    "{:<20} last refused: {} on {} at {}",
                    "",
                    r.get("sha256")
                        .and_then(Value::as_str)
                        .map_or("-".to_string(), |h| h.chars().take(12).collect()),
                    r.get("topic").and_then(Value::as_str).unwrap_or("-"),
                    r.get("at").and_then(Value::as_str).unwrap_or("-"),
                );
            }
        }
        exit::OK
    })
}

/// A signing key file: the 32-byte ed25519 seed in base64 on its first line.
fn read_seed(path: &Path) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            format!(
                "{}: not a key made by `edgegate fleet keygen`",
                path.display()
            )
        })
}

/// `edgegate fleet keygen KEYFILE`: a new signing key (file mode 0600, never overwritten); the
/// public key for `fleet.trusted_keys` on standard output.
pub fn keygen(path: &Path) -> i32 {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut seed).is_err() {
        eprintln!("edgegate: no system randomness");
        return exit::OSERR;
    }
    let Ok(public) = document::public_key(&seed) else {
        return exit::SOFTWARE;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            f.write_all(format!("{}\n", b64.encode(seed)).as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        eprintln!("edgegate: {}: {e}", path.display());
        return exit::CANTCREAT;
    }
    eprintln!(
        "edgegate: signing key written to {} (keep it secret); its public key, for fleet.trusted_keys:",
        path.display()
    );
    println!("{}", b64.encode(public));
    exit::OK
}
