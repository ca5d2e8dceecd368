//! Events the upstream can never accept as they are are set aside (parked), counted and listed,
//! and the events behind them go on (issue 12.1, the forwarder's part).

use std::time::{Duration, SystemTime};

use edgegate::config::SyncMode;
use edgegate::core::event::{Class, Data, Event, TYPE_READING};
use edgegate::queue::{Limits, Store};

use crate::util::*;

const WAIT: Duration = Duration::from_secs(30);

fn event(class: Class, subject: &str, upstream_topic: &str) -> Event {
    Event {
        id: edgegate::core::event::new_id(),
        class,
        kind: TYPE_READING,
        subject: subject.into(),
        upstream_topic: upstream_topic.into(),
        time: SystemTime::now(),
        data: Data::Json(bytes::Bytes::from_static(b"1")),
        traceparent: None,
    }
}

/// Queue events in the data dir's queue file before the gateway starts (as a rule with a topic
/// template, or an older gateway without the guard's wildcard check, could have queued them).
fn queue_events(dir: &std::path::Path, events: &[Event]) {
    let (mut store, _) =
        Store::open(&dir.join("queue.db"), SyncMode::Normal, Limits::default()).unwrap();
    let mut txn = store.begin().unwrap();
    for e in events {
        txn.append(e, "edgegate://gw1").unwrap();
    }
    txn.commit().unwrap();
}

/// A wildcard topic (rumqttc refuses it before it gets a packet id), a topic with a NUL and a
/// payload larger than upstream.max_packet_size, among good events and an alert with a
/// wildcard: before, the forwarder failed on the first bad one and reconnected forever, and
/// nothing behind it reached the cloud. Now the good ones arrive in order, the bad ones are
/// parked (counted, listed with their reason by `queue peek --parked`), `queue retry` offers them
/// again (parked again), and `queue purge --parked` deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_upstream_cannot_accept_are_set_aside_and_the_rest_goes_on() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut huge = event(
        Class::Telemetry,
        "sensors/huge/v",
        "edge/gw1/sensors/huge/v",
    );
    huge.data = Data::Json(bytes::Bytes::from(format!("\"{}\"", "x".repeat(2 << 20))));
    queue_events(
        dir.path(),
        &[
            event(Class::Telemetry, "sensors/a/v", "edge/gw1/sensors/a/v"),
            event(Class::Telemetry, "sensors/+/t", "edge/gw1/sensors/+/t"),
            event(Class::Telemetry, "sensors/b/v", "edge/gw1/sensors/b/v"),
            event(Class::Alert, "sensors/#", "edge/gw1/sensors/#"),
            event(Class::Telemetry, "sensors/nul", "edge/gw1/sensors/n\0l"),
            huge,
            event(Class::Telemetry, "sensors/c/v", "edge/gw1/sensors/c/v"),
        ],
    );
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/d/v", "4").await;

    let got = cloud.wait_for(4, WAIT).await;
    let subjects: Vec<&str> = got
        .iter()
        .map(|(_, e)| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects,
        ["sensors/a/v", "sensors/b/v", "sensors/c/v", "sensors/d/v"]
    );
    let m = gw.metrics().clone();
    assert!(
        eventually(WAIT, || m.events_parked.get() == 4).await,
        "parked {}",
        m.events_parked.get()
    );
    let mut stats = gw.queue_stats().await.unwrap();
    for _ in 0..100 {
        if stats.depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = gw.queue_stats().await.unwrap();
    }
    assert_eq!((stats.depth, stats.parked), (0, 4));
    let (code, body) = tokio::task::spawn_blocking({
        let a = gw.metrics_addr.unwrap();
        move || http_get(a, "/metrics")
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("edgegate_events_parked_total 4"), "{body}");
    // Delivery flows: healthy (before, the blocked forwarder reported nothing at all).
    let a = gw.metrics_addr.unwrap();
    let healthy = move || http_get(a, "/healthz").0 == 200;
    assert!(
        tokio::task::spawn_blocking(move || {
            (0..50).any(|_| {
                healthy() || {
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
            })
        })
        .await
        .unwrap(),
        "{:?}",
        http_get(a, "/healthz")
    );

    // Listed (while the gateway runs), with the reason.
    let listed = edgegate_cli(dir.path(), &["queue", "peek", "--parked", "-n", "10"]);
    let lines: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{listed}");
    assert!(lines[0]["parked_because"]
        .as_str()
        .unwrap()
        .contains("wildcard"));
    assert!(lines[2]["parked_because"].as_str().unwrap().contains("NUL"));
    assert!(lines[3]["parked_because"]
        .as_str()
        .unwrap()
        .contains("max_packet_size"));
    assert_eq!(
        edgegate_cli(
            dir.path(),
            &["queue", "export", "--parked", "--topic", "sensors/+/t"]
        )
        .lines()
        .count(),
        1
    );

    // Retried through the running gateway: offered again, set aside again, nothing else harmed.
    edgegate_cli(dir.path(), &["queue", "retry", "--topic", "sensors/+/t"]);
    assert!(eventually(WAIT, || m.events_parked.get() == 5).await);
    sensor.publish("sensors/e/v", "5").await;
    cloud.wait_for(5, WAIT).await;
    gw.shutdown().await;

    // Purged on their own, with the gateway stopped.
    let out = edgegate_cli(dir.path(), &["queue", "purge", "--parked", "--yes"]);
    assert!(out.contains("deleted 4"), "{out}");
    let stats: serde_json::Value = serde_json::from_str(&edgegate_cli(
        dir.path(),
        &["queue", "stats", "--json", "--interval", "0s"],
    ))
    .unwrap();
    assert_eq!(stats["parked"], 0);
}
