//! Fleet rules (issue 17): a real Mosquitto as the cloud, two or more gateways, documents
//! pushed with the real `edgegate fleet push` or published raw (as an attacker or a broken
//! cloud job would).

use std::path::Path;
use std::time::Duration;

use crate::util::*;
use edgegate::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Only `sensors/#` is forwarded; replaces the test config's local rule "all" (on `#`).
const SENSORS_ONLY: &str =
    "[[rules]]\nname = \"all\"\nmatch = \"sensors/#\"\naction = \"forward\"\n";

/// Echoes `sensors/{device}` to the local broker as `echo/{device}` (observable offline).
const ECHO: &str = "[[rules]]\nname = \"echo\"\nmatch = \"sensors/{device}\"\nactions = [{ type = \"publish\", topic = \"echo/{device}\" }]\n";

fn sha(b: &[u8]) -> String {
    edgegate::app::fleet::document::sha256_hex(b)
}

/// A gateway `id` on `url` with the fleet on, in `groups`.
fn gw_config(dir: &Path, url: &str, id: &str, groups: &[&str]) -> Config {
    let mut c = test_config(dir, Some(url));
    c.gateway.id = id.into();
    c.upstream.topic_prefix = format!("edge/{id}");
    c.upstream.batch_topic = format!("edge/{id}/batch");
    c.upstream.client_id = format!("edgegate-{id}");
    c.upstream.fleet_state_topic = Some(format!("edge/{id}/state"));
    c.fleet.enabled = true;
    c.fleet.client_id = format!("edgegate-{id}-fleet");
    c.fleet.groups = groups.iter().map(|g| g.to_string()).collect();
    c
}

/// The latest retained/live state of every gateway, as the cloud sees it.
struct States(Cloud);

impl States {
    async fn watch(port: u16) -> States {
        States(Cloud::subscribe(port, "edge/+/state").await)
    }

    fn latest(&self, id: &str) -> Option<Value> {
        let topic = format!("edge/{id}/state");
        self.0
            .received
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(t, _)| *t == topic)
            .and_then(|(_, p)| serde_json::from_slice(p).ok())
    }

    /// Wait for a state of `id` satisfying `f`; panics with the last one.
    async fn wait(&self, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let ok = eventually(WAIT, || self.latest(id).is_some_and(|s| f(&s))).await;
        let last = self.latest(id);
        assert!(ok, "{id}: no state with {what}; last: {last:#?}");
        last.unwrap_or_default()
    }
}

fn doc_sha(state: &Value, topic: &str) -> Option<String> {
    state["rules"]["documents"][topic]["sha256"]
        .as_str()
        .map(str::to_string)
}

fn refused_keys(state: &Value) -> Vec<String> {
    state["rules"]["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["key"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Publish retained, QoS 1, and wait for the PUBACK (as a cloud job would).
async fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut opts = MqttOptions::new(format!("pub-{}", free_port()), "127.0.0.1", port);
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut ev) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("publish: {e}"),
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK for the document");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), ev.poll()).await;
}

/// `edgegate fleet ARGS` (the real binary): exit code, stdout, stderr.
async fn fleet_cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut all = vec!["fleet".to_string()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = edgegate_output(&refs, &[]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn push_args(url: &str, target: &[&str], file: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["push".to_string(), "--upstream".into(), url.into()];
    a.extend(target.iter().map(|s| s.to_string()));
    a.extend(["--timeout".to_string(), "15s".into()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(file.to_str().unwrap().into());
    a
}

/// Readings on `sensors/x` and `other/x`: which reached the cloud as `edge/{id}/...`.
async fn forwarded_after(
    gw: &edgegate::Gateway,
    cloud: &Cloud,
    id: &str,
    tag: &str,
) -> (bool, bool) {
    let s = Sensor::connect(gw.broker_addr, &format!("s-{tag}")).await;
    s.publish(&format!("other/{tag}"), "1").await;
    s.publish(&format!("sensors/{tag}"), "1").await;
    let want = format!("edge/{id}/sensors/{tag}");
    assert!(
        eventually(WAIT, || cloud
            .received
            .lock()
            .unwrap()
            .iter()
            .any(|(t, _)| *t == want))
        .await,
        "sensors/{tag} never reached the cloud"
    );
    // other/ was published first on the same connection: had it been forwarded, it would be here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = format!("edge/{id}/other/{tag}");
    let got_other = cloud
        .received
        .lock()
        .unwrap()
        .iter()
        .any(|(t, _)| *t == other);
    (true, got_other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_one_gateway_applies_there_and_nowhere_else() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let telemetry = Cloud::subscribe(cloud.port, "edge/+/+/+").await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_gateway(gw_config(da.path(), &cloud.url(), "gw-a", &["all"])).await;
    let b = start_gateway(gw_config(db.path(), &cloud.url(), "gw-b", &["all"])).await;
    states.wait("gw-a", "online", |s| s["online"] == true).await;
    let sb = states.wait("gw-b", "online", |s| s["online"] == true).await;
    assert_eq!(sb["rules"]["source"], "local");
    // The first state is published while the gateway is "starting"; its health clearing is
    // published at once, not a state_interval (60 s) later.
    let sb = states
        .wait("gw-b", "healthy", |s| {
            s["health"]["ok"] == true && s["upstream_connected"] == true
        })
        .await;
    assert_eq!(sb["queue"]["depth"], 0);
    assert!(
        sb["version"].is_string() && sb["uptime_s"].is_u64() && sb["health"]["ok"].is_boolean()
    );
    // Before: the local rule forwards everything.
    assert_eq!(
        forwarded_after(&a, &telemetry, "gw-a", "t0").await,
        (true, true)
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, SENSORS_ONLY).unwrap();
    let (code, out, err) =
        fleet_cli(push_args(&cloud.url(), &["--gateway", "gw-a"], &file, &[])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("gw-a: applied"), "{out}");
    assert!(!out.contains("gw-b"), "{out}");
    let s = states
        .wait("gw-a", "the document", |s| {
            doc_sha(s, "edge/gw-a/config/rules") == Some(sha(SENSORS_ONLY.as_bytes()))
        })
        .await;
    assert_eq!(s["rules"]["sha256"], sha(SENSORS_ONLY.as_bytes()));
    assert_eq!(s["rules"]["source"], "gateway");
    assert!(s["rules"]["applied_at"].is_string());
    // After: gw-a forwards only sensors/, gw-b still everything.
    assert_eq!(
        forwarded_after(&a, &telemetry, "gw-a", "t1").await,
        (true, false)
    );
    assert_eq!(
        forwarded_after(&b, &telemetry, "gw-b", "t1").await,
        (true, true)
    );
    assert_eq!(states.latest("gw-b").unwrap()["rules"]["source"], "local");
    // Kept durably in the data dir (a later start finds it).
    let journal = std::fs::read_to_string(da.path().join("fleet/journal.json")).unwrap();
    assert!(journal.contains(&sha(SENSORS_ONLY.as_bytes())));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_document_reaches_its_members_and_combines_in_the_documented_order() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = start_gateway(gw_config(
        da.path(),
        &cloud.url(),
        "gw-a",
        &["all", "north"],
    ))
    .await;
    let b = start_gateway(gw_config(
        db.path(),
        &cloud.url(),
        "gw-b",
        &["all", "north"],
    ))
    .await;
    let c = start_gateway(gw_config(dc.path(), &cloud.url(), "gw-c", &["all"])).await;
    for id in ["gw-a", "gw-b", "gw-c"] {
        states.wait(id, "online", |s| s["online"] == true).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let group = "[[rules]]\nname = \"g1\"\nmatch = \"a/#\"\naction = \"forward\"\n[[rules]]\nname = \"g2\"\nmatch = \"b/#\"\naction = \"forward\"\n";
    let file = dir.path().join("north.toml");
    std::fs::write(&file, group).unwrap();
    let (code, out, err) =
        fleet_cli(push_args(&cloud.url(), &["--group", "north"], &file, &[])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("gw-a: applied") && out.contains("gw-b: applied"),
        "{out}"
    );
    assert!(!out.contains("gw-c"), "gw-c is not in north: {out}");
    let sc = states.latest("gw-c").unwrap();
    assert_eq!(sc["rules"]["documents"], serde_json::json!({}));
    // local "all" + g1 + g2
    states
        .wait("gw-a", "3 rules", |s| {
            s["rules"]["count"] == 3 && doc_sha(s, "fleet/north/config/rules").is_some()
        })
        .await;

    // The gateway's own document overrides the group's g2 by name and adds one.
    let own = "[[rules]]\nname = \"g2\"\nmatch = \"b/+\"\naction = \"drop\"\n[[rules]]\nname = \"mine\"\nmatch = \"c/#\"\naction = \"forward\"\n";
    publish_retained(
        cloud.port,
        "edge/gw-a/config/rules",
        own.as_bytes().to_vec(),
    )
    .await;
    let s = states
        .wait("gw-a", "its own document", |s| {
            doc_sha(s, "edge/gw-a/config/rules").is_some()
        })
        .await;
    assert_eq!(s["rules"]["count"], 4, "all, g1, g2 (the gateway's), mine");
    assert_eq!(s["rules"]["source"], "gateway");

    // The default push (no --group, no --gateway) goes to "all": every gateway.
    let file_all = dir.path().join("all.toml");
    std::fs::write(&file_all, ECHO).unwrap();
    let (code, out, err) = fleet_cli(push_args(&cloud.url(), &[], &file_all, &[])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    for id in ["gw-a", "gw-b", "gw-c"] {
        assert!(out.contains(&format!("{id}: applied")), "{out}");
    }
    states
        .wait("gw-c", "2 rules", |s| s["rules"]["count"] == 2)
        .await;
    for g in [a, b, c] {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_refused_with_their_keys_and_the_rules_in_force_stay() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let telemetry = Cloud::subscribe(cloud.port, "edge/+/+/+").await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_gateway(gw_config(da.path(), &cloud.url(), "gw-a", &["all"])).await;
    let b = start_gateway(gw_config(db.path(), &cloud.url(), "gw-b", &["all"])).await;
    states.wait("gw-b", "online", |s| s["online"] == true).await;
    publish_retained(
        cloud.port,
        "fleet/all/config/rules",
        SENSORS_ONLY.as_bytes().to_vec(),
    )
    .await;
    for id in ["gw-a", "gw-b"] {
        states
            .wait(id, "the good document", |s| {
                doc_sha(s, "fleet/all/config/rules") == Some(sha(SENSORS_ONLY.as_bytes()))
            })
            .await;
    }
    // The CLI refuses an invalid document before publishing anything.
    let bad = "[[rules]]\nname = \"x\"\nmatch = \"a/#/b\"\n[[rules]]\nname = \"y\"\nmatch = \"s\"\nwhen = \"value >\"\ntypo = 1\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, bad).unwrap();
    let (code, _, err) = fleet_cli(push_args(&cloud.url(), &[], &file, &[])).await;
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains("rules[0].match")
            && err.contains("rules[1].when")
            && err.contains("rules[1].typo"),
        "{err}"
    );

    // Published anyway (a broken cloud job): both refuse, keys in the state, rules stay.
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        ("rules", bad.as_bytes().to_vec(), "rules[0].match"),
        ("not UTF-8", vec![0x5b, 0xff, 0xfe, 0x00, 0x80], "document"),
        ("not TOML", b"[[rules]\nname = = 3".to_vec(), "toml"),
        (
            "engine settings",
            b"[rules_engine]\ntick = \"10ms\"\n".to_vec(),
            "rules_engine",
        ),
        (
            "duplicate names",
            format!("{SENSORS_ONLY}{SENSORS_ONLY}").into_bytes(),
            "rules[1].name",
        ),
    ];
    for (what, payload, key) in hostile {
        let h = sha(&payload);
        publish_retained(cloud.port, "fleet/all/config/rules", payload).await;
        for id in ["gw-a", "gw-b"] {
            let s = states
                .wait(id, &format!("refused {what}"), |s| {
                    s["rules"]["refused"]["sha256"] == h.as_str()
                })
                .await;
            assert!(
                refused_keys(&s).iter().any(|k| k == key),
                "{what}: {:?}",
                refused_keys(&s)
            );
            assert_eq!(
                doc_sha(&s, "fleet/all/config/rules"),
                Some(sha(SENSORS_ONLY.as_bytes())),
                "{what}"
            );
        }
    }
    // Still the good rules: only sensors/ forwarded.
    assert_eq!(
        forwarded_after(&a, &telemetry, "gw-a", "t2").await,
        (true, false)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trusted_keys_only_documents_signed_for_that_topic_apply() {
    use base64::Engine as _;
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let keys = tempfile::tempdir().unwrap();
    let (good, evil) = (keys.path().join("good.key"), keys.path().join("evil.key"));
    let (code, public, err) = fleet_cli(vec!["keygen".into(), good.to_str().unwrap().into()]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = fleet_cli(vec!["keygen".into(), evil.to_str().unwrap().into()]).await;
    assert_eq!(code, 0);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&good).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pk: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(public.trim())
        .unwrap()
        .try_into()
        .unwrap();

    // A retained document from an untrusted key already waits when the gateways connect.
    let seed_evil: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(std::fs::read_to_string(&evil).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let evil_doc = edgegate::app::fleet::document::sign(
        &seed_evil,
        "fleet/all/config/rules",
        ECHO.as_bytes(),
        1,
    )
    .unwrap();
    publish_retained(cloud.port, "fleet/all/config/rules", evil_doc.clone()).await;

    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = gw_config(da.path(), &cloud.url(), "gw-a", &["all"]);
    ca.fleet.trusted_keys = vec![pk];
    let mut cb = gw_config(db.path(), &cloud.url(), "gw-b", &["all"]);
    cb.fleet.trusted_keys = vec![pk];
    let a = start_gateway(ca).await;
    let b = start_gateway(cb).await;
    for id in ["gw-a", "gw-b"] {
        let s = states
            .wait(id, "the untrusted document refused", |s| {
                s["rules"]["refused"]["sha256"] == sha(&evil_doc).as_str()
            })
            .await;
        assert_eq!(refused_keys(&s), ["signature"]);
        assert_eq!(s["rules"]["count"], 1, "only the local rule");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, SENSORS_ONLY).unwrap();
    // Unsigned, and signed by the wrong key: refused, reported per gateway by the CLI.
    for extra in [vec![], vec!["--sign", evil.to_str().unwrap()]] {
        let (code, out, err) = fleet_cli(push_args(&cloud.url(), &[], &file, &extra)).await;
        assert_eq!(code, 65, "{out}\n{err}");
        assert!(
            out.contains("gw-a: refused: signature:") && out.contains("gw-b: refused: signature:"),
            "{out}"
        );
    }
    // Signed by the trusted key: applied.
    let (code, out, err) = fleet_cli(push_args(
        &cloud.url(),
        &[],
        &file,
        &["--sign", good.to_str().unwrap()],
    ))
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let applied = states
        .wait("gw-a", "the signed document", |s| {
            doc_sha(s, "fleet/all/config/rules").is_some()
        })
        .await;
    assert_eq!(
        applied["rules"]["documents"]["fleet/all/config/rules"]["signed"],
        true
    );
    let in_force = doc_sha(&applied, "fleet/all/config/rules").unwrap();

    // A validly signed document moved to another topic (gw-b's own) is refused.
    let retained = tokio::task::spawn_blocking({
        let url = cloud.url();
        move || edgegate_ok(&["fleet", "status", "--upstream", &url, "--json"], &[])
    })
    .await
    .unwrap();
    assert!(
        retained.contains("gw-a") && retained.contains("gw-b"),
        "{retained}"
    );
    let seed_good: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(std::fs::read_to_string(&good).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let for_all = edgegate::app::fleet::document::sign(
        &seed_good,
        "fleet/all/config/rules",
        ECHO.as_bytes(),
        5,
    )
    .unwrap();
    publish_retained(cloud.port, "edge/gw-b/config/rules", for_all.clone()).await;
    let s = states
        .wait("gw-b", "a moved document refused", |s| {
            s["rules"]["refused"]["sha256"] == sha(&for_all).as_str()
        })
        .await;
    assert_eq!(refused_keys(&s), ["signature"]);
    // An older signed document for the right topic (a replay) is refused too.
    publish_retained(cloud.port, "fleet/all/config/rules", for_all.clone()).await;
    let s = states
        .wait("gw-a", "a replay refused", |s| {
            s["rules"]["refused"]["sha256"] == sha(&for_all).as_str()
        })
        .await;
    assert_eq!(refused_keys(&s), ["signature"]);
    assert!(
        s["rules"]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("replayed"),
        "{s:#?}"
    );
    assert_eq!(doc_sha(&s, "fleet/all/config/rules"), Some(in_force));
    a.shutdown().await;
    b.shutdown().await;
}

/// A local subscriber on the gateway's broker.
async fn local_echoes(gw: &edgegate::Gateway) -> Cloud {
    Cloud::subscribe(gw.broker_addr.port(), "echo/#").await
}

/// Does the `ECHO` document's rule run: a reading on `sensors/pump` echoed locally?
async fn echo_rule_runs(gw: &edgegate::Gateway) -> bool {
    let echoes = local_echoes(gw).await;
    let s = Sensor::connect(gw.broker_addr, "s1").await;
    s.publish("sensors/pump", "1").await;
    eventually(WAIT, || {
        echoes
            .received
            .lock()
            .unwrap()
            .iter()
            .any(|(t, _)| t == "echo/pump")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_offline_keeps_the_last_good_document() {
    let mut cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_config(dir.path(), &cloud.url(), "gw-a", &["all"])).await;
    publish_retained(
        cloud.port,
        "edge/gw-a/config/rules",
        ECHO.as_bytes().to_vec(),
    )
    .await;
    states
        .wait("gw-a", "the document", |s| {
            doc_sha(s, "edge/gw-a/config/rules").is_some()
        })
        .await;
    // Then an invalid one: refused, and not what is kept.
    publish_retained(
        cloud.port,
        "edge/gw-a/config/rules",
        b"[[rules]]\nmatch = \"a/#/b\"\n".to_vec(),
    )
    .await;
    states
        .wait("gw-a", "the refusal", |s| !refused_keys(s).is_empty())
        .await;
    gw.shutdown().await;
    drop(states);
    cloud.kill();

    // Offline: the cloud is gone, the kept document is in force from the start.
    let gw = start_gateway(gw_config(dir.path(), &cloud.url(), "gw-a", &["all"])).await;
    assert!(
        echo_rule_runs(&gw).await,
        "the kept document's rule did not run"
    );
    assert!(!gw.upstream_connected());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_during_a_disconnect_applies_once_the_link_is_back() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let link = Link::start(cloud.port, true).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_gateway(gw_config(da.path(), &link.url(), "gw-a", &["all"])).await;
    let b = start_gateway(gw_config(db.path(), &cloud.url(), "gw-b", &["all"])).await;
    states.wait("gw-a", "online", |s| s["online"] == true).await;
    states.wait("gw-b", "online", |s| s["online"] == true).await;
    link.set_up(false);
    // The broker sees the connection die (keep alive) and publishes the will.
    states
        .wait("gw-a", "offline (the will)", |s| s["online"] == false)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, ECHO).unwrap();
    let mut args = push_args(&cloud.url(), &[], &file, &[]);
    let t = args.iter().position(|a| a == "15s").unwrap();
    args[t] = "3s".into();
    let (code, out, err) = fleet_cli(args).await;
    assert_eq!(code, 75, "{out}\n{err}");
    assert!(out.contains("gw-b: applied"), "{out}");
    assert!(out.contains("gw-a: not answering (offline)"), "{out}");
    link.set_up(true);
    let s = states
        .wait("gw-a", "the document after reconnecting", |s| {
            s["online"] == true
                && doc_sha(s, "fleet/all/config/rules") == Some(sha(ECHO.as_bytes()))
        })
        .await;
    assert_eq!(s["rules"]["count"], 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_never_stop_telemetry() {
    for protocol in [
        edgegate::config::UpstreamProtocol::V4,
        edgegate::config::UpstreamProtocol::V5,
    ] {
        let cloud = Mosquitto::start();
        let states = States::watch(cloud.port).await;
        let telemetry = Cloud::subscribe(cloud.port, "edge/gw-a/sensors/#").await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = gw_config(dir.path(), &cloud.url(), "gw-a", &["all"]);
        c.upstream.protocol = protocol;
        // A huge document already retained (2 MiB, fleet.max_document_size is 256 KiB).
        publish_retained(cloud.port, "edge/gw-a/config/rules", vec![b'#'; 2 << 20]).await;
        let gw = start_gateway(c).await;
        if protocol == edgegate::config::UpstreamProtocol::V5 {
            // Subscribed before the flood, so every document of it is delivered live.
            states.wait("gw-a", "online", |s| s["online"] == true).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let s = Sensor::connect(gw.broker_addr, "s1").await;
        // A flood of documents: 300 in a row, the last one valid.
        let mut opts = MqttOptions::new("flood", "127.0.0.1", cloud.port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(opts, 400);
        let poll = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        for i in 0..300 {
            let body =
                format!("[[rules]]\nname = \"r{i}\"\nmatch = \"x/{i}\"\naction = \"forward\"\n");
            client
                .publish("fleet/all/config/rules", QoS::AtLeastOnce, true, body)
                .await
                .unwrap();
            if i % 50 == 0 {
                s.publish("sensors/t", i.to_string()).await;
            }
        }
        let last = sha(b"[[rules]]\nname = \"r299\"\nmatch = \"x/299\"\naction = \"forward\"\n");
        // Telemetry flows all along.
        assert!(
            eventually(WAIT, || telemetry.count() >= 6).await,
            "{protocol:?}: telemetry {} of 6",
            telemetry.count()
        );
        // MQTT 5: the broker never sends what exceeds the announced maximum. MQTT 3.1.1: the
        // huge document ends the fleet connection once, after which it is taken in and
        // refused. Either way the flood's last document gets through and applies.
        let st = states
            .wait("gw-a", "the flood's last document", |s| {
                doc_sha(s, "fleet/all/config/rules") == Some(last.clone()) && s["online"] == true
            })
            .await;
        assert_eq!(doc_sha(&st, "edge/gw-a/config/rules"), None);
        // And the gateway stays online: the retained huge document does not end the fleet
        // connection on every reconnect (its will would say offline each time).
        let mut offline = 0;
        for _ in 0..100 {
            if states.latest("gw-a").is_some_and(|s| s["online"] == false) {
                offline += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(offline, 0, "{protocol:?}: the state flapped to offline");
        if protocol == edgegate::config::UpstreamProtocol::V5 {
            let reloads = gw.metrics().rules.reloads.get();
            eprintln!("flood: {reloads} reloads for 300 documents");
            assert!(
                reloads < 300,
                "{reloads} reloads for 300 documents: not coalesced"
            );
        }
        // The rules never took the huge document.
        assert_eq!(
            states
                .latest("gw-a")
                .and_then(|s| doc_sha(&s, "edge/gw-a/config/rules")),
            None
        );
        poll.abort();
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_cannot_reach_the_fleet_topics_through_forwarding() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(gw_config(dir.path(), &cloud.url(), "gw-a", &["all"])).await;
    states.wait("gw-a", "online", |s| s["online"] == true).await;
    let s = Sensor::connect(gw.broker_addr, "s1").await;
    // The local rule forwards `#` to edge/gw-a/{topic}: these would land on the gateway's
    // document and state topics (as CloudEvents envelopes: a document the gateway would take
    // and refuse, and a state that is not one).
    s.publish("config/rules", ECHO).await;
    s.publish("state", "{\"online\": true}").await;
    s.publish("sensors/ok", "1").await;
    let telemetry = Cloud::subscribe(cloud.port, "edge/gw-a/sensors/#").await;
    s.publish("sensors/ok2", "1").await;
    assert!(eventually(WAIT, || telemetry.count() >= 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every message on the state topic is a state; no document was taken (and refused).
    for (_, p) in states.0.received.lock().unwrap().iter() {
        let v: Value = serde_json::from_slice(p).unwrap();
        assert_eq!(v["gateway"], "gw-a", "not a state: {v}");
    }
    let st = states.latest("gw-a").unwrap();
    assert_eq!(st["rules"]["refused"], Value::Null, "{st:#?}");
    assert_eq!(st["rules"]["count"], 1);
    // Set aside instead (queue peek --parked).
    assert_eq!(gw.metrics().events_parked.get(), 2);
    gw.shutdown().await;
}

/// The real binary, killed with SIGKILL as a crash-looping service would die.
fn daemon_config(dir: &Path, confirm_after: &str) -> std::path::PathBuf {
    let path = dir.join("edgegate.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nallow_anonymous = true\n\n[fleet]\nenabled = true\nconfirm_after = \"{confirm_after}\"\nrollback_after = 2\n\n[[rules]]\nname = \"all\"\nmatch = \"#\"\naction = \"forward\"\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_the_gateway_cannot_run_with_is_rolled_back_at_the_next_start() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = daemon_config(dir.path(), "1h");
    let mut d = Daemon::spawn_with_config(&data, Some(&cloud.url()), &cfg);
    states.wait("gw1", "online", |s| s["online"] == true).await;
    // A good document first, confirmed? No: confirm_after is an hour, so none is "good" yet.
    publish_retained(
        cloud.port,
        "edge/gw1/config/rules",
        ECHO.as_bytes().to_vec(),
    )
    .await;
    let h = sha(ECHO.as_bytes());
    let s = states
        .wait("gw1", "the document", |s| {
            doc_sha(s, "edge/gw1/config/rules") == Some(h.clone())
        })
        .await;
    assert_eq!(
        s["rules"]["documents"]["edge/gw1/config/rules"]["confirmed"],
        false
    );
    // It crash-loops: the run that applied it and one more start, each killed.
    d.kill9();
    states
        .wait("gw1", "offline (the will)", |s| s["online"] == false)
        .await;
    d.start();
    states
        .wait("gw1", "online with the document", |s| {
            s["online"] == true && doc_sha(s, "edge/gw1/config/rules") == Some(h.clone())
        })
        .await;
    d.kill9();
    states
        .wait("gw1", "offline again", |s| s["online"] == false)
        .await;
    // The next start rolls it back, says so, and refuses it when the broker delivers it again.
    d.start();
    let s = states
        .wait("gw1", "the rollback", |s| {
            s["online"] == true
                && s["rules"]["rolled_back"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        })
        .await;
    assert_eq!(s["rules"]["rolled_back"][0]["sha256"], h.as_str());
    assert_eq!(s["rules"]["refused"]["sha256"], h.as_str());
    assert_eq!(refused_keys(&s), ["document"]);
    assert_eq!(doc_sha(&s, "edge/gw1/config/rules"), None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = states.latest("gw1").unwrap();
    assert_eq!(
        doc_sha(&s, "edge/gw1/config/rules"),
        None,
        "re-applied: {s:#?}"
    );
    assert_eq!(s["rules"]["count"], 1);
    // A new document applies again.
    publish_retained(
        cloud.port,
        "edge/gw1/config/rules",
        SENSORS_ONLY.as_bytes().to_vec(),
    )
    .await;
    states
        .wait("gw1", "the new document", |s| {
            doc_sha(s, "edge/gw1/config/rules") == Some(sha(SENSORS_ONLY.as_bytes()))
        })
        .await;
    assert_eq!(d.terminate(), Some(0));
    // A clean stop says "offline" itself.
    states
        .wait("gw1", "offline after a clean stop", |s| {
            s["online"] == false && s["rules"]["count"] == 1
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_confirmed_by_running_long_enough_survives_crashes() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = daemon_config(dir.path(), "1s");
    let mut d = Daemon::spawn_with_config(&data, Some(&cloud.url()), &cfg);
    publish_retained(
        cloud.port,
        "edge/gw1/config/rules",
        ECHO.as_bytes().to_vec(),
    )
    .await;
    let h = sha(ECHO.as_bytes());
    states
        .wait("gw1", "the document confirmed", |s| {
            s["rules"]["documents"]["edge/gw1/config/rules"]["confirmed"] == true
        })
        .await;
    for _ in 0..3 {
        d.kill9();
        states
            .wait("gw1", "offline", |s| s["online"] == false)
            .await;
        d.start();
        let s = states.wait("gw1", "online", |s| s["online"] == true).await;
        assert_eq!(doc_sha(&s, "edge/gw1/config/rules"), Some(h.clone()));
        assert!(s["rules"]["rolled_back"]
            .as_array()
            .is_some_and(|a| a.is_empty()));
    }
}

/// The same operations over TLS with per-gateway credentials, and a Mosquitto ACL that lets a
/// gateway read only its own and its groups' documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_per_gateway_credentials_and_acls() {
    let secrets = tempfile::tempdir().unwrap();
    let pki = crate::security::pki(secrets.path());
    let passwd = secrets.path().join("passwd");
    std::fs::write(&passwd, "").unwrap();
    for (user, pw) in [("gw-a", "pa"), ("gw-b", "pb"), ("ops", "po")] {
        let ok = std::process::Command::new("mosquitto_passwd")
            .args(["-b", passwd.to_str().unwrap(), user, pw])
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::write(secrets.path().join(user), format!("{pw}\n")).unwrap();
    }
    let acl = secrets.path().join("acl");
    std::fs::write(
        &acl,
        "user gw-a\ntopic read fleet/all/config/rules\ntopic readwrite edge/gw-a/#\n\n\
         user gw-b\ntopic read fleet/all/config/rules\ntopic read fleet/south/config/rules\ntopic readwrite edge/gw-b/#\n\n\
         user ops\ntopic readwrite #\n",
    )
    .unwrap();
    let tls = free_port();
    let cloud = Mosquitto::start_with(&format!(
        "per_listener_settings true\nlistener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
         allow_anonymous false\npassword_file {}\nacl_file {}\n",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display(),
        passwd.display(),
        acl.display()
    ));
    let states = States::watch(cloud.port).await;
    let url = format!("mqtts://localhost:{tls}");
    let gw = |dir: &Path, id: &str, groups: &[&str]| {
        let mut c = gw_config(dir, &url, id, groups);
        c.upstream.tls = Some(edgegate::config::tls::client_config(Some(&pki.ca), None).unwrap());
        c.upstream.username = Some(id.to_string());
        c.upstream.password = Some(edgegate::config::tls::Secret::new(
            if id == "gw-a" { "pa" } else { "pb" }.into(),
        ));
        c
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // gw-a also asks for "south", which the ACL does not let it read.
    let a = start_gateway(gw(da.path(), "gw-a", &["all", "south"])).await;
    let b = start_gateway(gw(db.path(), "gw-b", &["all", "south"])).await;
    states.wait("gw-a", "online", |s| s["online"] == true).await;
    states.wait("gw-b", "online", |s| s["online"] == true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(&file, ECHO).unwrap();
    let ops = |target: &[&str]| {
        push_args(
            &url,
            target,
            &file,
            &[
                "--username",
                "ops",
                "--password-file",
                secrets.path().join("ops").to_str().unwrap(),
                "--ca-file",
                pki.ca.to_str().unwrap(),
            ],
        )
    };
    let (code, out, err) = fleet_cli(ops(&["--gateway", "gw-b"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("gw-b: applied"), "{out}");
    let (code, out, err) = fleet_cli(ops(&[])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("gw-a: applied") && out.contains("gw-b: applied"),
        "{out}"
    );
    // "south": gw-b reads it, gw-a (denied by the ACL) never gets it and says so by silence.
    std::fs::write(&file, SENSORS_ONLY).unwrap();
    let mut args = ops(&["--group", "south"]);
    let t = args.iter().position(|a| a == "15s").unwrap();
    args[t] = "3s".into();
    let (code, out, err) = fleet_cli(args).await;
    assert_eq!(code, 75, "{out}\n{err}");
    assert!(
        out.contains("gw-b: applied") && out.contains("gw-a: not answering"),
        "{out}"
    );
    let s = states.latest("gw-a").unwrap();
    assert_eq!(doc_sha(&s, "fleet/south/config/rules"), None);
    // Without credentials the CLI gets nothing.
    let (code, _, err) = fleet_cli(vec![
        "status".into(),
        "--upstream".into(),
        url.clone(),
        "--ca-file".into(),
        pki.ca.to_str().unwrap().into(),
    ])
    .await;
    assert_ne!(code, 0, "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_reload_keeps_the_fleet_documents_in_force() {
    let cloud = Mosquitto::start();
    let states = States::watch(cloud.port).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gw_config(dir.path(), &cloud.url(), "gw-a", &["all"]);
    let gw = start_gateway(config.clone()).await;
    publish_retained(
        cloud.port,
        "fleet/all/config/rules",
        ECHO.as_bytes().to_vec(),
    )
    .await;
    states
        .wait("gw-a", "the document", |s| s["rules"]["count"] == 2)
        .await;
    // SIGHUP's path: new local rules, the group's document stays combined with them.
    let mut reloaded = config.clone();
    reloaded.rules.push(edgegate::config::RuleConfig::simple(
        "more",
        "more/#",
        edgegate::config::RuleAction::Forward,
    ));
    let kept = gw.reload_rules(&reloaded).await.unwrap();
    assert!(kept.contains(&"echo".to_string()), "{kept:?}");
    assert!(
        echo_rule_runs(&gw).await,
        "the group's rule is gone after a local reload"
    );
    gw.shutdown().await;
}
