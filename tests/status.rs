//! The status document on the local broker (`edgegate/status`): retained, published when the
//! gateway's state changes and as a slow heartbeat, never as chatter that every wildcard
//! subscriber is fed (issue 13, finding 2).

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
async fn status_is_retained_and_a_wildcard_subscriber_is_not_fed_chatter() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), None)).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "1").await;
    sensor.wait_acked(1).await;
    // A late subscriber gets the retained document at once.
    let got = listen(gw.broker_addr.port(), "edgegate/status", 10, Some(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("1 edgegate/status "),
        "retained: {got:?}"
    );
    let s = status(&got[0]);
    assert_eq!(s["healthy"], true);
    assert_eq!(s["upstream_configured"], false);
    assert!(s["queue_depth"].is_u64(), "{s}");
    // A local app on `#`, nothing else publishing, for 7 s (3 supervisor ticks): the retained
    // status once, nothing more (it was republished every 2 s).
    let got = listen(gw.broker_addr.port(), "#", 7, None).await;
    assert_eq!(
        got.len(),
        1,
        "a wildcard subscriber was fed the gateway's chatter: {got:?}"
    );
    drop(sensor);
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
    let connected: Vec<bool> = got
        .iter()
        .map(|l| status(l)["upstream_connected"] == true)
        .collect();
    assert!(
        connected.first() == Some(&true) && connected.contains(&false),
        "the link going down was not published: {got:?}"
    );
    // Only changes: the link stays down (and reconnect attempts fail) after that.
    assert!(connected.len() <= 3, "{got:?}");
    gw.shutdown().await;
}
