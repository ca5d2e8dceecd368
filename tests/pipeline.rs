//! The event path end to end: sensor -> embedded broker -> rules -> queue -> upstream Mosquitto.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_arrive_upstream_as_cloudevents() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;

    let sensor = Sensor::connect(gw.broker_addr, "boiler-1").await;
    sensor
        .publish("sensors/boiler-1/temp", r#"{"t":21.5,"unit":"C"}"#)
        .await;
    sensor.publish("sensors/boiler-1/temp", "22.25").await;
    sensor.publish("sensors/boiler-1/temp", " +7 ").await;

    let got = cloud.wait_for(3, WAIT).await;
    for (topic, _) in &got {
        assert_eq!(topic, "edge/gw1/sensors/boiler-1/temp");
    }
    let first = &got[0].1;
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], "edgegate://gw1");
    assert_eq!(first["type"], "io.edgegate.reading");
    assert_eq!(first["subject"], "sensors/boiler-1/temp");
    assert_eq!(first["datacontenttype"], "application/json");
    assert_eq!(first["data"]["t"], 21.5);
    assert_eq!(first["data"]["unit"], "C");
    let time = first["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok(),
        "RFC 3339 time: {time}"
    );
    assert!(time.contains('.'), "sub-second precision: {time}");
    assert_eq!(got[1].1["data"], 22.25);
    assert_eq!(got[2].1["data"], 7.0);

    let ids: HashSet<&str> = got.iter().map(|(_, v)| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "ids are unique");
    let seqs = seqs(&got);
    assert_eq!(seqs, [1, 2, 3]);

    let stats = gw.queue_stats().await.unwrap();
    assert!(eventually(WAIT, || gw.metrics().events_forwarded.get() == 3).await);
    assert!(stats.depth <= 3);
    let left = gw.shutdown().await.unwrap();
    assert_eq!(left.depth, 0, "acknowledged events are deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_payloads_arrive_as_base64_via_mosquitto_clients() {
    let cloud_broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;

    // The cloud side is mosquitto_sub here, the sensor mosquitto_pub.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-p",
            &cloud_broker.port.to_string(),
            "-t",
            "edge/#",
            "-C",
            "2",
            "-W",
            "20",
            "-q",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bin = dir.path().join("blob.bin");
    std::fs::write(&bin, [0u8, 0x9f, 0x92, 0x96, 0xff]).unwrap();
    let port = gw.broker_addr.port().to_string();
    let status = Command::new("mosquitto_pub")
        .args(["-p", &port, "-q", "1", "-t", "sensors/cam/raw", "-f"])
        .arg(&bin)
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "sensors/cam/state",
            "-m",
            "{not json",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["subject"], "sensors/cam/raw");
    assert_eq!(lines[0]["datacontenttype"], "application/octet-stream");
    assert_eq!(lines[0]["data_base64"], "AJ+Slv8=");
    assert!(lines[0].get("data").is_none());
    assert_eq!(lines[1]["data_base64"], "e25vdCBqc29u");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_queued_while_upstream_is_down_arrive_when_it_starts() {
    // The cloud consumer holds a persistent session on a persistent Mosquitto, which is then
    // stopped: the upstream is down, its process gone.
    let (mut cloud_broker, cloud) = Cloud::on_a_stopped_broker("cloud-consumer").await;

    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    for i in 0..200 {
        sensor
            .publish(&format!("sensors/s{}/v", i % 4), format!("{i}"))
            .await;
    }
    sensor.wait_acked(200).await;
    assert!(eventually(WAIT, || gw.metrics().events_committed.get() == 200).await);
    assert_eq!(gw.queue_stats().await.unwrap().depth, 200);
    assert!(!gw.upstream_connected());
    assert_eq!(cloud.count(), 0);

    // The upstream starts: the backlog goes out, and the consumer gets all of it.
    cloud_broker.restart();
    let got = cloud.wait_for(200, WAIT).await;
    // Each reading once, in order, sequence without gaps.
    let values = values(&got);
    let expected: Vec<f64> = (0..200).map(|i| i as f64).collect();
    assert_eq!(values, expected);
    let seqs = seqs(&got);
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert!(eventually(WAIT, || gw.metrics().events_forwarded.get() == 200).await);
    assert_eq!(gw.shutdown().await.unwrap().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_many_events_per_message_in_order() {
    // A backlog builds while the upstream is down; with batching it leaves in a few messages.
    let (mut cloud_broker, cloud) = Cloud::on_a_stopped_broker("cloud-batches").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&cloud_broker.url()));
    config.upstream.batch_events = 100;
    let gw = start_gateway(config).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    for i in 0..450 {
        sensor
            .publish(&format!("sensors/s{}/v", i % 3), format!("{i}"))
            .await;
    }
    sensor.wait_acked(450).await;
    assert!(eventually(WAIT, || gw.metrics().events_committed.get() == 450).await);
    cloud_broker.restart();
    assert!(eventually(WAIT, || cloud.events().0.len() >= 450).await);
    let (got, messages) = cloud.events();
    assert!(
        (5..=20).contains(&messages),
        "450 events in {messages} messages of at most 100"
    );
    for batch in cloud.received.lock().unwrap().iter() {
        assert_eq!(batch.0, "edge/gw1/batch");
        let n = edgegate::commands::consumer::envelopes(&batch.1)
            .unwrap()
            .len();
        assert!((1..=100).contains(&n), "{n} events in one batch");
    }
    // Each event whole (its own envelope, subject and sequence), once, in queue order.
    let values = values(&got);
    assert_eq!(values, (0..450).map(|i| i as f64).collect::<Vec<_>>());
    let seqs = seqs(&got);
    assert_eq!(seqs, (1..=450).collect::<Vec<_>>());
    assert_eq!(got[4].1["subject"], "sensors/s1/v");
    // Deleted only once acknowledged: every batch's PUBACK released all of its events.
    assert!(eventually(WAIT, || gw.metrics().events_forwarded.get() == 450).await);

    // Live readings do not wait for a batch to fill.
    sensor.publish("sensors/s9/v", "7").await;
    assert!(eventually(WAIT, || cloud.events().0.len() == 451).await);
    let (got, _) = cloud.events();
    assert_eq!(got[450].1["data"], 7.0);
    assert_eq!(gw.shutdown().await.unwrap().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_too_big_to_share_a_batch_still_flow() {
    // Each event fills a batch on its own: a lease of `inflight` events becomes that many
    // messages, far more than the window of inflight / batch_events messages.
    let (mut cloud_broker, cloud) = Cloud::on_a_stopped_broker("cloud-big").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), Some(&cloud_broker.url()));
    config.upstream.batch_events = 20;
    config.upstream.inflight = 40;
    config.upstream.batch_bytes = 1024;
    let gw = start_gateway(config).await;
    let sensor = Sensor::connect(gw.broker_addr, "big").await;
    for i in 0..300 {
        sensor
            .publish(
                "sensors/big/v",
                format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(700)),
            )
            .await;
    }
    sensor.wait_acked(300).await;
    assert!(eventually(WAIT, || gw.metrics().events_committed.get() == 300).await);
    cloud_broker.restart();
    assert!(eventually(WAIT, || gw.upstream_connected()).await);
    let reconnects = gw.metrics().upstream_reconnects.get();
    assert!(
        eventually(WAIT, || gw.metrics().events_forwarded.get() == 300).await,
        "forwarded {} of 300, {} reconnects",
        gw.metrics().events_forwarded.get(),
        gw.metrics().upstream_reconnects.get()
    );
    let (got, messages) = cloud.events();
    assert_eq!(messages, 300, "one event per batch");
    let (unique, _, missing) = dedup(&got);
    assert_eq!(unique.len(), 300);
    assert!(missing.is_empty());
    assert_eq!(
        gw.metrics().upstream_reconnects.get(),
        reconnects,
        "no connection was dropped"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_continues_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // First run: no upstream, three readings queue up.
    let gw = start_gateway(test_config(dir.path(), None)).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    for i in 0..3 {
        sensor.publish("sensors/a/v", format!("{i}")).await;
    }
    sensor.wait_acked(3).await;
    assert!(eventually(WAIT, || gw.metrics().events_committed.get() == 3).await);
    drop(sensor);
    assert_eq!(gw.shutdown().await.unwrap().depth, 3);

    // Second run on the same data dir, now with an upstream.
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    for i in 3..5 {
        sensor.publish("sensors/a/v", format!("{i}")).await;
    }
    let got = cloud.wait_for(5, WAIT).await;
    let seqs = seqs(&got);
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let values = values(&got);
    assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0]);
    assert!(eventually(WAIT, || gw.metrics().events_forwarded.get() == 5).await);
    gw.shutdown().await;

    // Third run: everything was acknowledged and deleted; numbering still goes on.
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    sensor.publish("sensors/a/v", "5").await;
    let got = cloud.wait_for(6, WAIT).await;
    assert_eq!(seq(&got[5].1), 6);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rules_forward_and_drop_with_counts() {
    use edgegate::config::{RuleAction, RuleConfig};
    use edgegate::core::metrics::DropReason;
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.rules = vec![
        RuleConfig::simple("no-debug", "sensors/+/debug", RuleAction::Drop),
        RuleConfig::simple("sensors", "sensors/#", RuleAction::Forward),
    ];
    let gw = start_gateway(cfg).await;
    let sensor = Sensor::connect(gw.broker_addr, "s1").await;
    sensor.publish("sensors/a/debug", "1").await;
    sensor.publish("other/topic", "2").await;
    sensor.publish("sensors/a/temp", "3").await;
    let got = cloud.wait_for(1, WAIT).await;
    assert_eq!(got[0].1["subject"], "sensors/a/temp");
    let m = gw.metrics().clone();
    assert!(
        eventually(WAIT, || m.dropped(DropReason::RuleDrop) == 1
            && m.dropped(DropReason::Unrouted) == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud.count(), 1, "dropped readings are not forwarded");
    gw.shutdown().await;
}

#[test]
fn check_config_lists_every_error_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[gateway]
id = ""
[broker]
listen = "localhost"
[upstream]
url = "http://cloud"
inflight = 0
batch_events = 10
batch_bytes = "4MiB"
batch_topic = "edge/+/batch"
[queue]
sync = "maybe"
[metrics]
listen = "nope"
[[rules]]
match = "a/#/b"
"#,
    )
    .unwrap();
    let out = edgegate_output(&["check-config", "--config", path_str(&bad)], &[]);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "gateway.id",
        "broker.listen",
        "upstream.url",
        "upstream.inflight",
        "upstream.batch_bytes",
        "upstream.batch_topic",
        "queue.sync",
        "metrics.listen",
        "rules[0].match",
    ] {
        assert!(err.contains(&format!("{key}:")), "missing {key} in:\n{err}");
    }

    // The shipped config is valid.
    edgegate_ok(
        &[
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgegate.toml"),
        ],
        &[],
    );

    // Environment overrides use a double underscore and are validated too.
    let out = edgegate_output(
        &["check-config"],
        &[("EDGEGATE__UPSTREAM__ACK_TIMEOUT", "soon".as_ref())],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.ack_timeout:"));
}

/// The real binary: SIGHUP applies a rule change; a broken config is rejected and the running
/// rules stay; the process survives both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_keeps_them_when_the_new_config_is_bad() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("edgegate.toml");
    let forward_all = "[broker]\nallow_anonymous = true\n[[rules]]\nname = \"all\"\nmatch = \"sensors/#\"\naction = \"forward\"\n";
    std::fs::write(&conf, forward_all).unwrap();
    let mut daemon =
        Daemon::spawn_with_config(&dir.path().join("data"), Some(&cloud_broker.url()), &conf);
    let sensor = Sensor::connect(daemon.broker_addr(), "s").await;
    sensor.publish("sensors/x/v", "1").await;
    cloud.wait_for(1, WAIT).await;

    let hup = |pid: u32| {
        Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap()
    };
    std::fs::write(
        &conf,
        format!(
            "[[rules]]\nname = \"no-x\"\nmatch = \"sensors/x/#\"\naction = \"drop\"\n{forward_all}"
        ),
    )
    .unwrap();
    assert!(hup(daemon.pid()).success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    sensor.publish("sensors/x/v", "2").await;
    sensor.publish("sensors/y/v", "3").await;
    let got = cloud.wait_for(2, WAIT).await;
    assert_eq!(
        got[1].1["subject"], "sensors/y/v",
        "the new drop rule applies"
    );

    // A broken file: rejected, the process lives on with the rules it had.
    std::fs::write(&conf, "[[rules]]\nmatch = \"a/#/b\"\n").unwrap();
    assert!(hup(daemon.pid()).success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!daemon.exited(), "a bad reload must not stop the gateway");
    sensor.publish("sensors/x/v", "4").await;
    sensor.publish("sensors/y/v", "5").await;
    let got = cloud.wait_for(3, WAIT).await;
    assert_eq!(got[2].1["data"], 5.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud.count(), 3, "sensors/x is still dropped");
    assert_eq!(daemon.terminate(), Some(0));
}

/// An MQTT 5 sensor on the v5 listener: its reading arrives upstream, and the W3C
/// `traceparent` user property it carried is in the envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_sensor_with_trace_context() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.broker.listen_v5 = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let v5 = gw.broker_addr_v5.expect("v5 listener");

    let mut opts = rumqttc::v5::MqttOptions::new("sensor-v5", "127.0.0.1", v5.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let props = PublishProperties {
        user_properties: vec![("traceparent".into(), trace.into())],
        ..Default::default()
    };
    client
        .publish_with_properties("sensors/v5/temp", QoS5::AtLeastOnce, false, "21.5", props)
        .await
        .unwrap();
    let got = cloud.wait_for(1, WAIT).await;
    assert_eq!(got[0].1["subject"], "sensors/v5/temp");
    assert_eq!(got[0].1["data"], 21.5);
    assert_eq!(got[0].1["traceparent"], trace);
    poller.abort();
    gw.shutdown().await;
}
