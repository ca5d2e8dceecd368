//! Rule engine through the real path: sensors -> embedded broker -> rules -> local broker and
//! queue -> Mosquitto upstream.

use std::time::Duration;

use crate::util::*;
use edgegate::config::rules::from_toml;

const WAIT: Duration = Duration::from_secs(10);

fn alerts(cloud: &Cloud) -> Vec<(String, serde_json::Value)> {
    cloud
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(t, p)| Some((t.clone(), serde_json::from_slice(p).ok()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_arrive_locally_and_upstream_and_missing_fires_without_input() {
    let cloud_broker = Mosquitto::start();
    let upstream = Cloud::subscribe(cloud_broker.port, "edge/gw1/alerts/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.rules = from_toml(
        r#"
        [rules_engine]
        tick = "100ms"
        [[rules]]
        name = "hot"
        match = "sensors/{device}/temp"
        actions = [
          { type = "forward" },
          { type = "detect", detector = "threshold", above = 50 },
          { type = "detect", detector = "missing", after = "1s" },
        ]
        "#,
    )
    .unwrap();
    let gw = start_gateway(cfg).await;
    let local = Cloud::subscribe(gw.broker_addr.port(), "edgegate/alerts/#").await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    sensor.publish("sensors/boiler/temp", "20").await;
    sensor.publish("sensors/boiler/temp", "60").await;
    // Threshold start, upstream (CloudEvents, alert type) and locally (alert JSON).
    assert!(eventually(WAIT, || !alerts(&upstream).is_empty()).await);
    let (topic, ev) = alerts(&upstream)[0].clone();
    assert_eq!(topic, "edge/gw1/alerts/hot/sensors/boiler/temp");
    assert_eq!(ev["type"], "io.edgegate.alert");
    assert_eq!(ev["data"]["detector"], "threshold");
    assert_eq!(ev["data"]["state"], "start");
    assert_eq!(ev["data"]["value"], 60.0);
    assert!(eventually(WAIT, || !alerts(&local).is_empty()).await);
    let (topic, a) = alerts(&local)[0].clone();
    assert_eq!(topic, "edgegate/alerts/hot/sensors/boiler/temp");
    assert_eq!(a["state"], "start");
    // Nothing more is published: the missing detector fires on the timer.
    assert!(
        eventually(WAIT, || alerts(&upstream)
            .iter()
            .any(
                |(_, e)| e["data"]["detector"] == "missing" && e["data"]["state"] == "start"
            ))
        .await
    );
    // Alerts published locally are not ingested again as readings.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gw.metrics()
            .dropped(edgegate::core::metrics::DropReason::Unrouted),
        0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_state_of_unchanged_rules() {
    let cloud_broker = Mosquitto::start();
    let upstream = Cloud::subscribe(cloud_broker.port, "edge/gw1/alerts/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    let hot = r#"
        [[rules]]
        name = "hot"
        match = "sensors/#"
        actions = [{ type = "detect", detector = "threshold", above = 50 }]
    "#;
    cfg.rules = from_toml(hot).unwrap();
    let gw = start_gateway(cfg.clone()).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    sensor.publish("sensors/a", "60").await;
    assert!(eventually(WAIT, || alerts(&upstream).len() == 1).await);
    cfg.rules = from_toml(&format!(
        "{hot}\n[[rules]]\nname = \"fwd\"\nmatch = \"sensors/#\"\naction = \"forward\"\n"
    ))
    .unwrap();
    let kept = gw.reload_rules(&cfg).await.unwrap();
    assert_eq!(kept, vec!["hot".to_string()]);
    // Still in alarm after the reload: no second start; the clear arrives.
    sensor.publish("sensors/a", "70").await;
    sensor.publish("sensors/a", "10").await;
    assert!(eventually(WAIT, || alerts(&upstream).len() == 2).await);
    assert_eq!(alerts(&upstream)[1].1["data"]["state"], "clear");
    gw.shutdown().await;
}

/// `edgegate backtest --input DIR --labels FILE --json` on the tiny labelled set shipped in
/// tests/backtest/data: a NAB-style `timestamp,value` file with one spike in its window, and a
/// SKAB-style `;`-separated file of two sensors (label columns skipped) with no incident.
#[test]
fn backtest_scores_a_labelled_directory() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/backtest/data");
    let labels = format!("{dir}/labels.json");
    let out = edgegate_ok(
        &["backtest", "--input", dir, "--labels", &labels, "--json"],
        &[],
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(r["series"], 2);
    assert_eq!(r["windows"], 1);
    assert_eq!(r["windows_detected"], 1, "{r}");
    assert_eq!(r["false_alerts"], 0, "{r}");
    // Two sensor columns of 240 rows, plus 300 readings.
    assert_eq!(r["readings"], 780);
    // The spike at row 220 of the window rows 210..=230: sigma(-11/21), normalized.
    let sigma = |y: f64| 2.0 / (1.0 + (5.0 * y).exp()) - 1.0;
    let want = 100.0 * (sigma(-11.0 / 21.0) + 1.0) / (sigma(-1.0) + 1.0);
    let score = r["score"].as_f64().expect("score");
    assert!((score - want).abs() < 1e-6, "{score} != {want}");

    // A CSV without labels is an error, not "no incident".
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(format!("{dir}/temp.csv"), tmp.path().join("other.csv")).expect("copy");
    let out = edgegate_output(
        &[
            "backtest",
            "--input",
            path_str(tmp.path()),
            "--labels",
            &labels,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no labels for other.csv"));
}
