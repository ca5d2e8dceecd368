//! The status document on the local broker (`edgegate/status`): published when the gateway's
//! state changes, never as chatter that every wildcard subscriber is fed (issue 13, finding 2).

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// `mosquitto_sub` (a client we did not write) on the local broker for `secs` seconds, with
/// its default options; every message as `retain-flag topic payload`.
async fn listen(port: u16, filter: &str, secs: u32, count: Option<u32>) -> Vec<String> {
    let (filter, secs) = (filter.to_string(), secs.to_string());
    let out = tokio::task::spawn_blocking(move || {
        let mut args = vec!["-p".to_string(), port.to_string(), "-t".into(), filter];
        args.extend(["-W".into(), secs, "-F".into(), "%r %t %p".into()]);
        if let Some(c) = count {
            args.extend(["-C".into(), c.to_string()]);
        }
        Command::new("mosquitto_sub").args(&args).output()
    })
    .await
    .expect("join")
    .expect("mosquitto_sub runs (package mosquitto-clients)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn status(line: &str) -> serde_json::Value {
    let json = line.splitn(3, ' ').nth(2).expect("'%r %t %p' output");
    serde_json::from_str(json).expect("status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_subscriber_is_not_fed_the_gateways_chatter() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), None)).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "1").await;
    sensor.wait_acked(1).await;
    drop(sensor);
    // A local app on `#` and one on `+/+`, nothing else publishing, for 7 s (3 supervisor
    // ticks): nothing at all (the status was republished, retained, every 2 s).
    let port = gw.broker_addr.port();
    let plus = tokio::spawn(async move { listen(port, "+/+", 7, None).await });
    let all = listen(port, "#", 7, None).await;
    let plus = plus.await.unwrap();
    assert!(
        all.is_empty() && plus.is_empty(),
        "wildcard subscribers were fed the gateway's chatter: {all:?} {plus:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_are_published_when_they_happen() {
    let mut cloud = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud.url()))).await;
    assert!(eventually(Duration::from_secs(15), || gw.upstream_connected()).await);
    let port = gw.broker_addr.port();
    let watcher = tokio::spawn(async move { listen(port, "edgegate/status", 15, None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cloud.stop();
    let got = watcher.await.unwrap();
    // Not retained: a subscriber sees the changes that happen while it listens.
    assert!(
        got.iter().all(|l| l.starts_with("0 edgegate/status ")),
        "{got:?}"
    );
    let down: Vec<serde_json::Value> = got.iter().map(|l| status(l)).collect();
    assert!(
        down.iter()
            .any(|s| s["upstream_connected"] == false && s["upstream_configured"] == true),
        "the link going down was not published: {got:?}"
    );
    // Only changes: the link stays down (and reconnect attempts fail) after that.
    assert!(got.len() <= 2, "{got:?}");
    gw.shutdown().await;
}

/// `/healthz` is true while delivery flows and false while it cannot: the upstream unreachable
/// for longer than a reconnect (issue 12's soak requirement). The watchdog is still pinged then
/// (a restart would not bring the uplink back); that side is in app::supervisor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_when_the_upstream_is_unreachable() {
    let mut cloud = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud.url()));
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let addr = gw.metrics_addr.expect("metrics endpoint");
    let health = move || http_get(addr, "/healthz");
    let healthy = move || health().0 == 200;
    assert!(
        eventually(Duration::from_secs(15), healthy).await,
        "{:?}",
        health()
    );
    cloud.stop();
    // The grace (10 s) plus a supervisor tick or two.
    assert!(
        eventually(Duration::from_secs(20), move || !healthy()).await,
        "still healthy with the upstream gone"
    );
    let (code, body) = health();
    assert_eq!(code, 503);
    assert!(body.contains("upstream unreachable"), "{body}");
    cloud.restart();
    assert!(
        eventually(Duration::from_secs(20), healthy).await,
        "not healthy again after the upstream returned: {:?}",
        health()
    );
    gw.shutdown().await;
}
