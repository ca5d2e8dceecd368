//! Store-and-forward guarantees: outages, crashes, a silent upstream, limits, a full disk, a
//! corrupt file. Real Mosquitto, real files, the real binary where a process must die.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use edgegate::core::metrics::DropReason;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(60);

/// Values per sensor, in arrival order.
fn per_sensor(unique: &[serde_json::Value]) -> HashMap<String, Vec<f64>> {
    let mut m: HashMap<String, Vec<f64>> = HashMap::new();
    for v in unique {
        m.entry(v["subject"].as_str().unwrap().to_string())
            .or_default()
            .push(v["data"].as_f64().unwrap());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_readings_during_an_outage_all_arrive_in_order() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&link.url()))).await;
    let sensors = Sensor::connect_many(gw.broker_addr, "sensor", 4).await;
    for i in 0..2500 {
        for (s, sensor) in sensors.iter().enumerate() {
            sensor
                .publish(&format!("sensors/s{s}/v"), i.to_string())
                .await;
        }
    }
    for s in &sensors {
        s.wait_acked(2500).await;
    }
    let m = gw.metrics().clone();
    assert!(
        eventually(WAIT, || m.events_committed.get() == 10_000).await,
        "committed {}",
        m.events_committed.get()
    );
    assert_eq!(cloud.count(), 0);

    link.set_up(true);
    cloud.wait_for(10_000, WAIT).await;
    assert!(eventually(WAIT, || m.events_forwarded.get() >= 10_000).await);
    let (unique, dups, missing) = dedup(&cloud.envelopes());
    assert_eq!(unique.len(), 10_000);
    assert!(missing.is_empty(), "missing sequences {missing:?}");
    assert_eq!(
        dups as u64,
        m.events_resent.get().min(dups as u64),
        "duplicates only from counted resends"
    );
    for (sensor, values) in per_sensor(&unique) {
        let expected: Vec<f64> = (0..2500).map(|i| i as f64).collect();
        assert_eq!(values, expected, "order of {sensor}");
    }
    assert_eq!(gw.shutdown().await.unwrap().depth, 0);
}

/// Live traffic while the uplink is cut twice: what the forwarder had taken from the queue's
/// in-memory tail and sent into the dead link is sent again from the file after the reconnect.
/// With and without upstream batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_readings_across_link_cuts_all_arrive() {
    for batch in [1, 10] {
        let cloud_broker = Mosquitto::start();
        let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
        let link = Link::start(cloud_broker.port, true).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path(), Some(&link.url()));
        config.upstream.batch_events = batch;
        let gw = start_gateway(config).await;
        assert!(eventually(WAIT, || gw.upstream_connected()).await);
        let sensor = Sensor::connect(gw.broker_addr, "live").await;
        for i in 0..1500u32 {
            sensor.publish("sensors/live/v", i.to_string()).await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if i == 500 || i == 1000 {
                link.set_up(false);
            }
            if i == 700 || i == 1200 {
                link.set_up(true);
            }
        }
        sensor.wait_acked(1500).await;
        let m = gw.metrics().clone();
        assert!(
            eventually(WAIT, || m.events_forwarded.get() >= 1500).await,
            "batch {batch}: forwarded {}",
            m.events_forwarded.get()
        );
        let (unique, _dups, missing) = dedup(&cloud.events().0);
        assert!(missing.is_empty(), "batch {batch}: missing {missing:?}");
        let values: Vec<f64> = {
            let mut v: Vec<(u64, f64)> = unique
                .iter()
                .map(|e| (seq(e), e["data"].as_f64().unwrap()))
                .collect();
            v.sort_by_key(|x| x.0);
            v.into_iter().map(|x| x.1).collect()
        };
        assert_eq!(
            values,
            (0..1500).map(|i| i as f64).collect::<Vec<_>>(),
            "batch {batch}"
        );
        assert!(
            m.upstream_reconnects.get() >= 2,
            "batch {batch}: the link was cut"
        );
        assert_eq!(gw.shutdown().await.unwrap().depth, 0);
    }
}

/// Issue 15: a sensor's PUBACK means "committed to the queue". Four sensors burst 10,000
/// readings into fsync'd commits (slow: the sensors run far ahead of the disk); sampled all the
/// while, the PUBACKs received never outnumber the events committed. (Before, rumqttd PUBACKed
/// on receipt into its memory and the sensors' count ran thousands ahead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_is_sent_only_for_a_committed_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), None);
    config.queue.sync = edgegate::config::SyncMode::Full;
    let gw = start_gateway(config).await;
    let sensors = std::sync::Arc::new(Sensor::connect_many(gw.broker_addr, "burst", 4).await);
    let m = gw.metrics().clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (sensors, m, done) = (sensors.clone(), m.clone(), done.clone());
        tokio::spawn(async move {
            let (mut samples, mut worst) = (0u64, 0i64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // PUBACKs first, then commits: commits only grow, so a PUBACK that came after
                // its commit can never make this negative.
                let acked: u64 = sensors.iter().map(|s| s.acked()).sum();
                let committed = m.events_committed.get();
                worst = worst.max(acked as i64 - committed as i64);
                samples += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            (samples, worst)
        })
    };
    let body = format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(120));
    for _ in 0..2500 {
        for (s, sensor) in sensors.iter().enumerate() {
            sensor
                .publish(&format!("sensors/b{s}/v"), body.clone())
                .await;
        }
    }
    for s in sensors.iter() {
        s.wait_acked(2500).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, worst) = sampler.await.unwrap();
    eprintln!("{samples} samples; PUBACKs ahead of commits at most {worst}");
    assert!(samples > 10, "sampled while the burst ran");
    assert!(
        worst <= 0,
        "a sensor held {worst} PUBACKs for readings not yet committed"
    );
    assert_eq!(m.events_committed.get(), 10_000, "drops {:?}", m.drops());
    gw.shutdown().await;
}

/// A graceful stop while sensors keep publishing flat out: every reading a sensor got a PUBACK
/// for is in the queue afterwards. (The guard must stop relaying before ingest stops taking:
/// rumqttd PUBACKs whatever reaches it, whether or not anyone will read it.)
#[test]
fn a_stop_under_load_keeps_every_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked: Vec<u64> = rt.block_on(async {
        let gw = start_gateway(test_config(dir.path(), None)).await;
        let sensors = Sensor::connect_many(gw.broker_addr, "stop", 4).await;
        let publishers: Vec<_> = sensors
            .iter()
            .enumerate()
            .map(|(s, sensor)| {
                let client = sensor.client.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let topic = format!("sensors/s{s}/v");
                        let qos = rumqttc::QoS::AtLeastOnce;
                        if client
                            .publish(topic, qos, false, i.to_string())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                })
            })
            .collect();
        let total = || sensors.iter().map(|s| s.acked()).sum::<u64>();
        assert!(eventually(WAIT, || total() >= 4000).await);
        // (Before the guard closed its sessions, this never ended: ingest waits for a quiet
        // moment that sensors publishing flat out never gave it.)
        let stop = tokio::time::timeout(Duration::from_secs(30), gw.shutdown()).await;
        assert!(stop.is_ok(), "the stop did not finish within 30 s");
        // Whatever PUBACK is still on its way arrives now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for p in publishers {
            p.abort();
        }
        sensors.iter().map(|s| s.acked()).collect()
    });
    drop(rt);
    let mut queued: HashMap<String, Vec<u64>> = HashMap::new();
    for line in edgegate_cli(dir.path(), &["queue", "export"]).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let subject = v["event"]["subject"].as_str().unwrap().to_string();
        let value = v["event"]["data"].as_f64().unwrap() as u64;
        queued.entry(subject).or_default().push(value);
    }
    for (s, &n) in acked.iter().enumerate() {
        let got = queued
            .remove(&format!("sensors/s{s}/v"))
            .unwrap_or_default();
        let got: std::collections::HashSet<u64> = got.into_iter().collect();
        let missing: Vec<u64> = (0..n).filter(|i| !got.contains(i)).collect();
        assert!(
            missing.is_empty(),
            "sensor {s}: {} of {n} PUBACKed readings are not in the queue (first {:?})",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

/// Issue 15: a PUBACK waits for the commit, so a kill -9 in the middle of a load loses no
/// reading a sensor got a PUBACK for (before: up to the pipeline's buffers, 502 of 20,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_load_loses_no_acknowledged_reading() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    // fsync'd commits: the sensor runs far ahead of the disk, so a lot is on its way when the
    // kill comes.
    let mut daemon = Daemon::spawn(
        dir.path(),
        Some(&cloud_broker.url()),
        &[("EDGEGATE__QUEUE__SYNC", "full")],
    );

    // Publish flat out from one sensor; kill the gateway in the middle.
    let sensor = Sensor::connect(daemon.broker_addr(), "loader").await;
    let publisher = {
        let client = sensor.client.clone();
        tokio::spawn(async move {
            for i in 0..20_000u32 {
                if client
                    .publish(
                        "sensors/load/v",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        i.to_string(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let r = cloud.received.clone();
    assert!(eventually(WAIT, || r.lock().unwrap().len() >= 3000).await);
    daemon.kill9();
    publisher.abort();
    let acked_before_kill = sensor.acked();
    drop(sensor);

    daemon.start();
    // What was committed before the kill: the queue's next sequence (sequences are assigned at
    // commit, gap-free). Nothing publishes after the restart, so every sequence below it must
    // reach the cloud, including the last ones (a gap check below the highest sequence seen
    // would miss losses at the end).
    let committed = daemon.queue_stats()["next_sequence"]
        .as_u64()
        .expect("next_sequence")
        .saturating_sub(1);
    assert!(
        committed >= 3000,
        "only {committed} committed before the kill"
    );
    let arrived_all = eventually(Duration::from_secs(30), || {
        let (u, _, _) = dedup(&cloud.envelopes());
        u.len() as u64 >= committed
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (unique, dups, _) = dedup(&cloud.envelopes());
    let got: std::collections::BTreeSet<u64> = unique.iter().map(seq).collect();
    let missing: Vec<u64> = (1..=committed).filter(|s| !got.contains(s)).collect();
    assert!(
        arrived_all && missing.is_empty(),
        "committed events lost: {} of {committed} (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    // One connection, acknowledged in order: the PUBACKed readings are 0..acked_before_kill.
    let values: std::collections::HashSet<u64> =
        unique.iter().filter_map(|v| v["data"].as_u64()).collect();
    let lost: Vec<u64> = (0..acked_before_kill)
        .filter(|i| !values.contains(i))
        .collect();
    eprintln!(
        "kill -9 during load: {acked_before_kill} readings PUBACKed to the sensor, {committed} committed, {} arrived, {} PUBACKed and lost, {dups} duplicates",
        unique.len(),
        lost.len()
    );
    assert!(
        acked_before_kill > 1000,
        "only {acked_before_kill} PUBACKs before the kill"
    );
    assert!(
        lost.is_empty(),
        "{} PUBACKed readings lost (first {:?})",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_outage_backlog_loses_nothing_committed() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::spawn(dir.path(), Some(&link.url()), &[]);
    let sensor = Sensor::connect(daemon.broker_addr(), "s").await;
    for i in 0..3000 {
        sensor.publish("sensors/a/v", i.to_string()).await;
    }
    sensor.wait_acked(3000).await;
    // Committed: the queue (read by the CLI while the daemon runs) holds all of them.
    let deadline = Instant::now() + WAIT;
    while daemon.queue_stats()["depth"] != 3000 {
        assert!(
            Instant::now() < deadline,
            "backlog not committed: {}",
            daemon.queue_stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sensor);
    daemon.kill9();

    link.set_up(true);
    daemon.start();
    cloud.wait_for(3000, WAIT).await;
    let (unique, _, missing) = dedup(&cloud.envelopes());
    assert_eq!(unique.len(), 3000);
    assert!(missing.is_empty());
    let values: Vec<f64> = unique.iter().map(|v| v["data"].as_f64().unwrap()).collect();
    assert_eq!(
        values,
        (0..3000).map(|i| i as f64).collect::<Vec<_>>(),
        "oldest first"
    );
    let deadline = Instant::now() + WAIT;
    while daemon.queue_stats()["depth"] != 0 {
        assert!(
            Instant::now() < deadline,
            "not drained: {}",
            daemon.queue_stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_detected_within_ack_timeout() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.upstream.ack_timeout = Duration::from_secs(1);
    let gw = start_gateway(cfg).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "0").await;
    cloud.wait_for(1, WAIT).await;

    // The broker stops answering (half-open link): no PUBACK comes back.
    cloud_broker.signal("STOP");
    let stopped = Instant::now();
    for i in 1..=50 {
        sensor.publish("sensors/a/v", i.to_string()).await;
    }
    let m = gw.metrics().clone();
    assert!(
        eventually(Duration::from_secs(10), || m.upstream_reconnects.get() >= 1).await,
        "no reconnect after SIGSTOP"
    );
    let detected = stopped.elapsed();
    eprintln!("silent upstream detected after {detected:?} (ack_timeout 1 s)");
    assert!(
        detected < Duration::from_secs(4),
        "detected after {detected:?}"
    );
    assert!(m.events_forwarded.get() < 51);

    cloud_broker.signal("CONT");
    let got = cloud.wait_for(51, WAIT).await;
    let (unique, _, missing) = dedup(&got);
    assert_eq!(unique.len(), 51);
    assert!(missing.is_empty());
    assert!(eventually(WAIT, || m.events_forwarded.get() >= 51).await);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limits_evict_or_reject_with_counts() {
    use edgegate::config::QueueFull;
    for policy in [QueueFull::DropOldest, QueueFull::DropNewest] {
        let cloud_broker = Mosquitto::start();
        let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
        let link = Link::start(cloud_broker.port, false).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path(), Some(&link.url()));
        cfg.queue.max_events = 100;
        cfg.queue.when_full = policy;
        let gw = start_gateway(cfg).await;
        let sensor = Sensor::connect(gw.broker_addr, "s").await;
        for i in 0..250 {
            sensor.publish("sensors/a/v", i.to_string()).await;
        }
        sensor.wait_acked(250).await;
        let m = gw.metrics().clone();
        let reason = if policy == QueueFull::DropOldest {
            DropReason::Evicted
        } else {
            DropReason::Rejected
        };
        assert!(
            eventually(WAIT, || m.events_committed.get()
                + m.dropped(DropReason::Rejected)
                == 250)
            .await,
            "all 250 accounted for"
        );
        let depth = gw.queue_stats().await.unwrap().depth;
        assert!(depth <= 100, "{policy:?}: depth {depth}");
        assert_eq!(
            depth + m.dropped(reason),
            250,
            "{policy:?}: every event is queued or counted"
        );

        link.set_up(true);
        let got = cloud.wait_for(depth as usize, WAIT).await;
        let values = values(&got);
        match policy {
            QueueFull::DropOldest => assert_eq!(values.last(), Some(&249.0), "newest kept"),
            QueueFull::DropNewest => assert_eq!(values.first(), Some(&0.0), "oldest kept"),
        }
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_queue_file_is_quarantined_and_the_gateway_serves() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("queue.db"), vec![0xA5u8; 64 * 1024]).unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("queue.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        vec![0xA5u8; 64 * 1024]
    );
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "1").await;
    cloud.wait_for(1, WAIT).await;
    gw.shutdown().await;
}

/// A real full disk: a 2 MiB tmpfs as the data directory. Needs root (mount); CI runs as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_survived_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("data");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !matches!(mounted, Ok(s) if s.success()) {
        panic!("this test needs to mount a tmpfs (run as root, as CI does)");
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());

    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let mut cfg = test_config(&mnt, Some(&link.url()));
    cfg.queue.max_bytes = 0; // no budget: let the disk itself fill up
    cfg.queue.min_free = edgegate::config::MinFree::Bytes(0);
    let gw = start_gateway(cfg).await;
    let sensor = std::sync::Arc::new(Sensor::connect(gw.broker_addr, "s").await);
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(900));
    // The publisher waits whenever its window of unacknowledged publishes is full.
    let publisher = {
        let sensor = sensor.clone();
        tokio::spawn(async move {
            for _ in 0..6000 {
                sensor.publish("sensors/big/v", payload.clone()).await;
            }
        })
    };
    let m = gw.metrics().clone();
    // The disk fills: commits fail and the gateway reports it; PUBACKs stop with the commits
    // (a PUBACK means committed), so the sensor keeps what it sent and waits.
    assert!(
        eventually(WAIT, || gw.commit_error().is_some()).await,
        "commits never failed: {} committed",
        m.events_committed.get()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed_when_full = m.events_committed.get();
    assert!(committed_when_full < 6000, "the disk did fill up");
    assert!(
        sensor.acked() <= committed_when_full,
        "{} PUBACKs for {committed_when_full} committed readings",
        sensor.acked()
    );
    // Still serving other sensors: connected, their readings taken, acknowledged once safe.
    let other = Sensor::connect(gw.broker_addr, "other").await;
    other.publish("sensors/other/v", "1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        other.acked(),
        0,
        "a PUBACK for a reading the full disk did not take"
    );

    // Space returns: grow the file system; buffered events commit, the backlog drains.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(grown.success());
    link.set_up(true);
    assert!(
        eventually(WAIT, || m.events_committed.get() > committed_when_full).await,
        "writes recovered"
    );
    other.wait_acked(1).await;
    sensor.wait_acked(6000).await;
    publisher.await.unwrap();
    // The retry buffer commits a group at a time; while the space reserve is given back the
    // queue grows no further (oldest telemetry evicted, counted).
    assert!(
        eventually(WAIT, || m.events_committed.get()
            + m.dropped(DropReason::QueueWriteFailed)
            == 6001)
        .await,
        "every reading committed or counted: {} + {:?}",
        m.events_committed.get(),
        m.drops()
    );
    let dropped = m.dropped(DropReason::QueueWriteFailed);
    let evicted = m.dropped(DropReason::Evicted);
    let committed = m.events_committed.get();
    eprintln!("full disk: {committed_when_full} committed before full, {dropped} dropped (counted), {evicted} evicted, {committed} committed in all");
    let expected = committed - evicted;
    let got = cloud.wait_for(expected as usize, WAIT).await;
    let (unique, _, _) = dedup(&got);
    assert_eq!(unique.len() as u64, expected);
    gw.shutdown().await;
}

#[test]
fn queue_cli_peek_export_purge_replay() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cfg = test_config(dir.path(), None);
        cfg.queue.keep_acked = Duration::from_secs(3600);
        let gw = start_gateway(cfg).await;
        let sensor = Sensor::connect(gw.broker_addr, "s").await;
        for i in 0..5 {
            sensor
                .publish(
                    &format!("sensors/{}/v", if i % 2 == 0 { "a" } else { "b" }),
                    i.to_string(),
                )
                .await;
        }
        sensor.wait_acked(5).await;
        assert!(eventually(WAIT, || gw.metrics().events_committed.get() == 5).await);
        gw.shutdown().await;
    });
    let cli = |args: &[&str]| edgegate_cli(dir.path(), args);
    let peek = cli(&["queue", "peek", "-n", "2", "--topic", "sensors/a/#"]);
    let lines: Vec<serde_json::Value> = peek
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event"]["data"], 0.0);
    assert_eq!(lines[1]["event"]["data"], 2.0);
    assert_eq!(cli(&["queue", "export"]).lines().count(), 5);
    let stats: serde_json::Value =
        serde_json::from_str(&cli(&["queue", "stats", "--json", "--interval", "0s"])).unwrap();
    assert_eq!(stats["depth"], 5);
    assert!(cli(&["queue", "purge", "--topic", "sensors/b/#", "--yes"]).contains("deleted 2"));
    assert_eq!(cli(&["queue", "export"]).lines().count(), 3);
    // Without --yes and without a "y", nothing is deleted.
    edgegate_cli(dir.path(), &["queue", "purge"]);
    assert_eq!(cli(&["queue", "export"]).lines().count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_kept_events_again_with_the_same_ids() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Some(&cloud_broker.url()));
    cfg.queue.keep_acked = Duration::from_secs(3600);
    let gw = start_gateway(cfg).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    for i in 0..3 {
        sensor.publish("sensors/a/v", i.to_string()).await;
    }
    let first = cloud.wait_for(3, WAIT).await;
    assert!(eventually(WAIT, || gw.metrics().events_forwarded.get() == 3).await);
    // The CLI asks the running daemon (it holds the data-dir lock) to replay.
    edgegate_ok(
        &["queue", "replay", "--since", "1h"],
        &[
            ("EDGEGATE__GATEWAY__DATA_DIR", dir.path().as_os_str()),
            ("EDGEGATE__QUEUE__KEEP_ACKED", "1h".as_ref()),
        ],
    );
    let all = cloud.wait_for(6, WAIT).await;
    let ids = |v: &[(String, serde_json::Value)]| {
        v.iter()
            .map(|(_, e)| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&all[3..]),
        ids(&first),
        "replayed with the same ids, in order"
    );
    let (_, dups, missing) = dedup(&all);
    assert_eq!((dups, missing.len()), (3, 0));
    gw.shutdown().await;
}

/// MQTT 5 upstream: events go out, and an event the broker refuses for good (PUBACK reason
/// "not authorized", from a Mosquitto ACL) is not deleted: it is set aside (parked, listed by
/// `queue peek --parked`), counted, and does not hold back the events behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_upstream_checks_puback_reason_codes() {
    // ACL lines before any `user` line apply to anonymous clients: the gateway may write only
    // under edge/gw1/sensors/ok/, the cloud consumer may read everything.
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic write edge/gw1/sensors/ok/#\ntopic read edge/#\n",
    )
    .unwrap();
    // As root Mosquitto would switch to user mosquitto, who cannot read our temp dir.
    let cloud_broker = Mosquitto::start_with(&format!(
        "acl_file {}\nuser root\nlog_dest file {}\nlog_type all",
        acl.display(),
        dir.path().join("mosquitto.log").display()
    ));
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let mut cfg = test_config(&dir.path().join("data"), Some(&cloud_broker.url()));
    cfg.upstream.protocol = edgegate::config::UpstreamProtocol::V5;
    let gw = start_gateway(cfg).await;
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/denied/v", "1").await;
    sensor.publish("sensors/ok/v", "2").await;
    let got = cloud.wait_for(1, WAIT).await;
    assert_eq!(got[0].1["subject"], "sensors/ok/v");
    let m = gw.metrics().clone();
    assert!(
        eventually(WAIT, || m.events_refused.get() >= 1).await,
        "refused PUBACK counted"
    );
    assert!(eventually(WAIT, || m.events_forwarded.get() == 1).await);
    assert!(eventually(WAIT, || m.events_parked.get() == 1).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = gw.queue_stats().await.unwrap();
    assert_eq!(
        (stats.depth, stats.parked),
        (0, 1),
        "the refused event is set aside, not deleted"
    );
    assert_eq!(cloud.count(), 1);
    gw.shutdown().await;
}

/// Issue 18.1: the queue file is found corrupt while the gateway runs, with the forwarder caught
/// up (its cursor at the last position). The fresh file must go on numbering positions after
/// the old one: before, its positions restarted at 1, below the forwarder's cursor, so the tail
/// discarded every new event and nothing more went upstream (and acknowledgements of old
/// positions could delete rows of the new file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_corrupted_while_running_is_replaced_and_forwarding_goes_on() {
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(test_config(dir.path(), Some(&cloud_broker.url()))).await;
    let m = gw.metrics().clone();
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    for i in 0..500 {
        sensor.publish("sensors/a/v", i.to_string()).await;
    }
    cloud.wait_for(500, WAIT).await;
    assert!(eventually(WAIT, || m.events_forwarded.get() == 500).await);
    // Idle: the writer checkpoints, so every page is read from the file itself.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Damage every page but the first (the schema stays readable, the tables do not), and
    // spoil the shared-memory index so the writer's page cache is dropped at its next
    // transaction and the damaged pages are read.
    let db = dir.path().join("queue.db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let mut bytes = std::fs::read(&db).unwrap();
    for b in &mut bytes[1024.min(len)..] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let shm = dir.path().join("queue.db-shm");
    if let Ok(mut s) = std::fs::read(&shm) {
        for b in s.iter_mut().take(136) {
            *b = 0;
        }
        std::fs::write(&shm, &s).unwrap();
    }

    for i in 0..20 {
        sensor.publish("sensors/b/v", i.to_string()).await;
    }
    sensor.wait_acked(520).await;
    let aside = || {
        std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("queue.db.corrupt-")
        })
    };
    assert!(
        eventually(WAIT, aside).await,
        "the corrupt file was moved aside"
    );
    let got = cloud.wait_for(520, WAIT).await;
    let new: std::collections::HashSet<String> = got
        .iter()
        .filter(|(_, e)| e["subject"] == "sensors/b/v")
        .map(|(_, e)| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        new.len(),
        20,
        "every event after the replacement went upstream"
    );
    assert!(eventually(WAIT, || m.events_forwarded.get() == 520).await);
    let stats = gw.queue_stats().await.unwrap();
    assert_eq!(stats.depth, 0);
    assert!(
        stats.next_sequence > 520,
        "sequences go on: {}",
        stats.next_sequence
    );
    gw.shutdown().await;
}

/// Issue 18.4: `queue export` streams the queue a page at a time; all of a long queue comes out,
/// in order (and the peek limit and topic filter still hold across pages).
#[test]
fn queue_export_streams_every_event_in_order() {
    use edgegate::core::event::{Class, Data, Event, TYPE_READING};
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut store, _) = edgegate::queue::Store::open(
            &dir.path().join("queue.db"),
            edgegate::config::SyncMode::Normal,
            edgegate::queue::Limits::default(),
        )
        .unwrap();
        let mut txn = store.begin().unwrap();
        for i in 0..5_500 {
            let subject = format!("sensors/{}/v", if i % 2 == 0 { "a" } else { "b" });
            txn.append(
                &Event {
                    id: edgegate::core::event::new_id(),
                    class: Class::Telemetry,
                    kind: TYPE_READING,
                    upstream_topic: format!("edge/gw1/{subject}"),
                    subject,
                    time: std::time::SystemTime::now(),
                    data: Data::Json(bytes::Bytes::from(i.to_string())),
                    traceparent: None,
                },
                "edgegate://gw1",
            )
            .unwrap();
        }
        txn.commit().unwrap();
    }
    let cli = |args: &[&str]| edgegate_cli(dir.path(), args);
    let seqs = |out: &str| -> Vec<u64> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["sequence"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(
        seqs(&cli(&["queue", "export"])),
        (1..=5_500).collect::<Vec<_>>()
    );
    let odd = seqs(&cli(&["queue", "export", "--topic", "sensors/a/#"]));
    assert_eq!(odd, (1..=5_500).step_by(2).collect::<Vec<_>>());
    let peek = seqs(&cli(&[
        "queue",
        "peek",
        "-n",
        "1500",
        "--topic",
        "sensors/b/#",
    ]));
    assert_eq!(peek, (2..=3_000).step_by(2).collect::<Vec<_>>());
}

/// Issue 18.5: the CLI writes to the queue only holding the data-dir lock the daemon takes. A
/// purge while a gateway runs is refused (exit 75, nothing deleted); while a purge waits for
/// its confirmation, a gateway cannot start on the data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_take_the_data_dir_lock() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut daemon = Daemon::spawn(&data, None, &[]);
    let sensor = Sensor::connect(daemon.broker_addr(), "s").await;
    sensor.publish("sensors/a/v", "1").await;
    sensor.wait_acked(1).await;
    assert!(eventually(WAIT, || daemon.queue_stats()["depth"] == 1).await);
    let out = edgegate_output(
        &["queue", "purge", "--yes"],
        &[("EDGEGATE__GATEWAY__DATA_DIR", data.as_os_str())],
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("running"));
    assert_eq!(daemon.queue_stats()["depth"], 1, "nothing deleted");
    assert_eq!(daemon.terminate(), Some(0));

    // A purge waiting for its "y": the lock is held, a gateway cannot start meanwhile.
    let mut purge = std::process::Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["queue", "purge"])
        .env("EDGEGATE__GATEWAY__DATA_DIR", &data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(WAIT, || edgegate::app::gateway::data_dir_in_use(&data)).await,
        "the CLI holds the lock"
    );
    init_logs();
    edgegate::init_crypto();
    let start = edgegate::Gateway::start(test_config(&data, None)).await;
    assert!(
        matches!(start, Err(edgegate::app::gateway::StartError::InUse(_))),
        "a gateway started while the CLI was writing"
    );
    purge.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let out = purge.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 1"));
    assert!(!edgegate::app::gateway::data_dir_in_use(&data));
}
