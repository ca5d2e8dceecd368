//! Gateway lifecycle: a start that fails leaves nothing behind (issue 18, bug 7), a rules
//! reload that changes the engine's tick applies it and keeps every rule's state (bug 6).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use edgegate::app::gateway::StartError;
use edgegate::Gateway;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(15);

/// Nothing accepts connections on `addr` (the listener is closed, not just idle).
async fn refused(addr: SocketAddr) -> bool {
    // An accept loop aborted a moment ago may still hold its socket briefly.
    eventually(Duration::from_secs(2), || TcpStream::connect(addr).is_err()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_fails_the_start_before_the_broker_listens() {
    edgegate::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = test_config(dir.path(), None);
    let broker_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.broker.listen = broker_addr;
    config.metrics.listen = Some(taken.local_addr().unwrap());
    match Gateway::start(config.clone()).await {
        Err(StartError::Metrics { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started on a taken metrics port"),
    }
    // No sensor can have connected (and been PUBACKed) in between: the broker never listened.
    assert!(
        refused(broker_addr).await,
        "the broker listens after a failed start"
    );
    // The failed start closed the queue and released the data directory: the next start works.
    drop(taken);
    config.metrics.listen = None;
    let gw = start_gateway(config).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_broker_port_stops_every_listener_the_start_opened() {
    edgegate::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = test_config(dir.path(), None);
    let v4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.broker.listen = v4;
    config.broker.listen_v5 = Some(taken.local_addr().unwrap());
    match Gateway::start(config.clone()).await {
        Err(StartError::Broker(e)) => {
            assert!(e.to_string().contains("broker.listen_v5"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started on a taken broker port"),
    }
    assert!(
        refused(v4).await,
        "the MQTT 3.1.1 listener outlived the failed start"
    );
    drop(taken);
    config.broker.listen_v5 = None;
    let gw = start_gateway(config).await;
    gw.shutdown().await;
}

/// Config with the given engine tick: forward, plus a `missing` detector after 1 s.
fn with_tick(dir: &std::path::Path, upstream: &str, tick: &str) -> edgegate::Config {
    let mut cfg = edgegate::Config::from_toml(
        &format!(
            r#"
            [broker]
            allow_anonymous = true
            [rules_engine]
            tick = "{tick}"
            [[rules]]
            name = "beat"
            match = "sensors/#"
            actions = [
              {{ type = "forward" }},
              {{ type = "detect", detector = "missing", after = "1s" }},
            ]
            "#
        ),
        None,
    )
    .unwrap();
    let base = test_config(dir, Some(upstream));
    cfg.gateway = base.gateway;
    cfg.broker.listen = base.broker.listen;
    cfg.metrics.listen = None;
    cfg.upstream = base.upstream;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_tick_applies_it_and_keeps_rule_state() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    // A tick of a minute (the longest allowed): after the first, immediate tick, the missing
    // detector does not run again within this test.
    let gw = start_gateway(with_tick(dir.path(), &cloud_broker.url(), "1m")).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "1").await;
    cloud.wait_for(1, WAIT).await;
    let missing = || {
        cloud
            .envelopes()
            .iter()
            .filter(|(_, e)| e["data"]["detector"] == "missing")
            .count()
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(missing(), 0, "the minute-long tick ran the detector");

    let kept = gw
        .reload_rules(&with_tick(dir.path(), &cloud_broker.url(), "100ms"))
        .await
        .expect("rules stage running");
    assert_eq!(
        kept,
        vec!["beat".to_string()],
        "the tick change reset the rule"
    );
    // The new tick runs the timer: the sensor has been silent for over 1 s.
    assert!(
        eventually(WAIT, || missing() > 0).await,
        "the new tick was never applied"
    );
    drop(sensor);
    gw.shutdown().await;
}
