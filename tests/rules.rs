//! Rule engine through the real path: sensors -> embedded broker -> rules -> local broker and
//! queue -> Mosquitto upstream.

use std::time::Duration;

use crate::util::*;
use edgegate::rules::config::from_toml;

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
            .dropped(edgegate::ops::metrics::DropReason::Unrouted),
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
