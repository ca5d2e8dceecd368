//! Topic names the guard must never let reach rumqttd (issue 12.1), the gateway's own namespace
//! (issue 12.2, 18.3) and floods that must never make rumqttd skip a reading it PUBACKed
//! (issue 12.2). Real gateway, real sockets, real Mosquitto upstream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgegate::config::acl::{Acl, AclRule};
use edgegate::core::metrics::DropReason;
use tokio::io::AsyncWriteExt;

use crate::security::*;
use crate::util::*;

/// A PUBLISH with a raw topic and raw MQTT 5 properties (ignored for 3.1.1), QoS 1 with
/// `pkid` (QoS 0 when 0), `retain` flag.
pub(crate) fn publish_raw(
    v5: bool,
    topic: &[u8],
    pkid: u16,
    retain: bool,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(&mut b, topic);
    if pkid > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        b.push(props.len() as u8);
        b.extend_from_slice(props);
    }
    b.extend_from_slice(payload);
    let byte1 = if pkid > 0 { 0x32 } else { 0x30 } | u8::from(retain);
    frame(byte1, &b)
}

/// A CONNECT with a will (QoS 0, not retained) on `will_topic`.
fn connect_with_will(v5: bool, client_id: &str, will_topic: &[u8]) -> Vec<u8> {
    connect_with_will_payload(v5, client_id, will_topic, b"gone")
}

fn connect_with_will_payload(v5: bool, client_id: &str, will_topic: &[u8], will: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(&mut b, b"MQTT");
    b.push(if v5 { 5 } else { 4 });
    b.push(0x02 | 0x04);
    b.extend_from_slice(&30u16.to_be_bytes());
    if v5 {
        b.push(0);
    }
    mqtt_str(&mut b, client_id.as_bytes());
    if v5 {
        b.push(0); // will properties
    }
    mqtt_str(&mut b, will_topic);
    mqtt_str(&mut b, will);
    frame(0x10, &b)
}

/// What the server does with one publish on a fresh connection: its answer packets until it
/// closes (`closed` true) or goes quiet for a second.
async fn answer_to(
    addr: std::net::SocketAddr,
    v5: bool,
    id: &str,
    publish: &[u8],
) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut s = connected(addr, v5, id, None).await;
    s.write_all(publish).await.expect("send publish");
    let mut got = Vec::new();
    while let Some(p) = read_packet(&mut s).await {
        got.push(p);
    }
    let closed = closed_within(&mut s, Duration::from_millis(500)).await;
    (got, closed)
}

/// Issue 12.1: a PUBLISH whose topic MQTT forbids (wildcards, NUL, invalid UTF-8, empty without
/// an alias) is refused before rumqttd sees it, on the 3.1.1 listener (closed, no PUBACK) and on
/// the MQTT 5 listener (DISCONNECT 0x90, then closed); counted; nothing reaches the cloud, and
/// a healthy sensor is served after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_publish_topics_are_refused_on_both_listeners() {
    let (_m, cloud, gw, _d) =
        setup(|c| c.broker.listen_v5 = Some("127.0.0.1:0".parse().unwrap())).await;
    let v5_addr = gw.broker_addr_v5.expect("MQTT 5 listener");
    let bad: [(&[u8], &str); 6] = [
        (b"sensors/+/t", "topic_wildcard"),
        (b"sensors/#", "topic_wildcard"),
        (b"#", "topic_wildcard"),
        (b"sensors/a\0b", "topic_invalid"),
        (b"sensors/\xff\xfe", "topic_invalid"),
        (b"", "topic_invalid"),
    ];
    for (i, (topic, reason)) in bad.iter().enumerate() {
        for v5 in [false, true] {
            let before = gw.metrics().broker_rejected(reason);
            let addr = if v5 { v5_addr } else { gw.broker_addr };
            let (got, closed) = answer_to(
                addr,
                v5,
                &format!("bad-{i}-{v5}"),
                &publish_raw(v5, topic, 7, false, &[], b"21"),
            )
            .await;
            let shown = String::from_utf8_lossy(topic);
            assert!(closed, "{shown:?} (v5 {v5}): connection closed");
            if v5 {
                assert_eq!(
                    got,
                    vec![(0xe0, vec![0x90])],
                    "{shown:?}: DISCONNECT 0x90 (topic name invalid), nothing else"
                );
            } else {
                assert!(got.is_empty(), "{shown:?}: no PUBACK: {got:?}");
            }
            assert_eq!(
                gw.metrics().broker_rejected(reason),
                before + 1,
                "{shown:?} (v5 {v5}) counted as {reason}"
            );
        }
    }
    still_serving(&gw, &cloud, "topics", "sensors/ok/t", 5).await;
    let r = cloud.received.lock().unwrap();
    assert!(
        r.iter().all(|(t, _)| t == "edge/gw1/sensors/ok/t"),
        "only the healthy readings went upstream: {:?}",
        r.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
}

/// Issue 12.1: a will on a wildcard (or NUL) topic is refused at CONNECT: 3.1.1 "not
/// authorized" (it has no better code), MQTT 5 0x90 "topic name invalid".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_will_topics_are_refused_at_connect() {
    let (_m, cloud, gw, _d) =
        setup(|c| c.broker.listen_v5 = Some("127.0.0.1:0".parse().unwrap())).await;
    let v5_addr = gw.broker_addr_v5.expect("MQTT 5 listener");
    for (i, topic) in [&b"sensors/#"[..], b"sensors/+/t", b"a\0b"]
        .iter()
        .enumerate()
    {
        for (v5, addr, code) in [(false, gw.broker_addr, 0x05), (true, v5_addr, 0x90)] {
            let (got, mut s) = exchange(
                addr,
                &connect_with_will(v5, &format!("will-{i}-{v5}"), topic),
                Duration::from_secs(3),
            )
            .await;
            let got = got.unwrap_or_default();
            assert_eq!(got.first(), Some(&0x20), "a CONNACK: {got:?}");
            assert_eq!(got.get(3), Some(&code), "refusal code (v5 {v5}): {got:?}");
            assert!(closed_within(&mut s, Duration::from_secs(3)).await);
        }
    }
    let m = gw.metrics();
    assert_eq!(
        m.broker_rejected("topic_wildcard") + m.broker_rejected("topic_invalid"),
        6
    );
    still_serving(&gw, &cloud, "wills", "sensors/ok/t", 3).await;
}

/// Issue 12.1: an ACL pattern `sensors/{client_id}/#` must not let the *topic*
/// `sensors/{client_id}/#` (or `.../+`) through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_pattern_does_not_admit_a_wildcard_topic() {
    let (_m, cloud, gw, _d) = setup(|c| {
        c.broker.acl = Some(Arc::new(Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["sensors/{client_id}/#".into()],
                subscribe: vec![],
            }],
        }))
    })
    .await;
    for (i, topic) in ["sensors/c1/#", "sensors/c1/+"].iter().enumerate() {
        let (got, closed) = answer_to(
            gw.broker_addr,
            false,
            "c1",
            &publish_raw(false, topic.as_bytes(), 1 + i as u16, false, &[], b"1"),
        )
        .await;
        assert!(closed && got.is_empty(), "{topic}: closed, no PUBACK");
    }
    assert_eq!(gw.metrics().broker_rejected("topic_wildcard"), 2);
    // Its own topic is fine.
    let (got, _) = answer_to(
        gw.broker_addr,
        false,
        "c1",
        &publish_raw(false, b"sensors/c1/t", 3, false, &[], b"1"),
    )
    .await;
    assert_eq!(got.first(), Some(&(0x40, vec![0, 3])), "PUBACK");
    assert!(eventually(WAIT, || arrived(&cloud, "sensors/c1/t") == 1).await);
}

/// Issue 12.2 (a) and 18.3: sensors may not publish into the gateway's own namespace
/// `edgegate/` (nor `$` topics) unless an ACL names it explicitly; one an ACL allows is
/// PUBACKed and then counted as dropped (`reserved_topic`), while the gateway's own output
/// there (its status, retained) is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_into_the_gateways_namespace() {
    // Without an ACL: refused.
    let (_m, cloud, gw, _d) = setup(|_| {}).await;
    for (i, topic) in ["edgegate/alerts/fake", "edgegate/status", "$SYS/x"]
        .iter()
        .enumerate()
    {
        let (got, closed) = answer_to(
            gw.broker_addr,
            false,
            &format!("intruder-{i}"),
            &publish_raw(false, topic.as_bytes(), 1, false, &[], b"{}"),
        )
        .await;
        assert!(closed && got.is_empty(), "{topic}: closed, no PUBACK");
    }
    assert_eq!(gw.metrics().broker_rejected("reserved_topic"), 3);
    // `#` does not name the namespace: still refused.
    drop(gw);
    let (_m2, _cloud2, gw, _d2) = setup(|c| {
        c.broker.acl = Some(Arc::new(Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["#".into()],
                subscribe: vec![],
            }],
        }))
    })
    .await;
    let (got, closed) = answer_to(
        gw.broker_addr,
        false,
        "hash",
        &publish_raw(false, b"edgegate/x/t", 1, false, &[], b"1"),
    )
    .await;
    assert!(closed && got.is_empty(), "`#` does not allow edgegate/");
    drop(gw);
    drop(cloud);

    // An ACL that names it: PUBACKed, then counted as dropped, never forwarded.
    let (_m3, cloud, gw, _d3) = setup(|c| {
        c.broker.acl = Some(Arc::new(Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["sensors/#".into(), "edgegate/x/#".into()],
                subscribe: vec![],
            }],
        }))
    })
    .await;
    let sensor = Sensor::connect(gw.broker_addr, "allowed").await;
    for i in 0..5 {
        sensor.publish("edgegate/x/t", format!("{i}")).await;
    }
    sensor.wait_acked(5).await;
    let m = gw.metrics().clone();
    assert!(
        eventually(WAIT, || m.dropped(DropReason::ReservedTopic) == 5).await,
        "each PUBACKed publish under edgegate/ counted once: {}",
        m.dropped(DropReason::ReservedTopic)
    );
    // The gateway's own status (published under edgegate/ every tick) is not a dropped reading.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(m.dropped(DropReason::ReservedTopic), 5);
    still_serving(&gw, &cloud, "ns", "sensors/ok/t", 3).await;
    assert_eq!(arrived(&cloud, "edgegate/x/t"), 0);
}

/// A small in-memory log (256 KiB: an overflow is quick to reach), and only the honest
/// readings forwarded (the floods are not what is measured).
fn small_log_sensors_forwarded(c: &mut edgegate::Config) {
    c.broker.segment_size = 64 * 1024;
    c.broker.segment_count = 4;
    c.rules = vec![edgegate::config::RuleConfig::simple(
        "sensors",
        "sensors/#",
        edgegate::config::RuleAction::Forward,
    )];
}

/// As [`small_log_sensors_forwarded`], with a slow queue (an fsync per commit, small
/// channels): ingest waits now and then, as on an SD card, the moments when the log fills.
fn slow_queue(c: &mut edgegate::Config) {
    small_log_sensors_forwarded(c);
    c.queue.sync = edgegate::config::SyncMode::Full;
    c.pipeline.channel_capacity = 8;
}

/// Connects as `id`, writes `first`, then `one` over and over (in batches of 100) until
/// `stop`, counting what it wrote in `sent`.
async fn batch_flood(
    addr: std::net::SocketAddr,
    v5: bool,
    id: String,
    first: Vec<u8>,
    one: Vec<u8>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let mut s = connected(addr, v5, &id, None).await;
    if s.write_all(&first).await.is_err() {
        return;
    }
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
    while !stop.load(Ordering::Relaxed) && s.write_all(&batch).await.is_ok() {
        sent.fetch_add(100, Ordering::Relaxed);
    }
}

/// Floods `topic_of(i)` with QoS 0 messages of `size` bytes over a raw socket until `stop`;
/// returns how many it wrote.
async fn flood(
    addr: std::net::SocketAddr,
    id: String,
    topic_of: impl Fn(u64) -> String,
    size: usize,
    retain: bool,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let payload = vec![b'x'; size];
    while !stop.load(Ordering::Relaxed) {
        let (got, mut s) = exchange(addr, &connect_packet(false, &id, None), WAIT).await;
        if got.as_deref().and_then(|g| g.get(3)) != Some(&0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let n = sent.fetch_add(1, Ordering::Relaxed);
            let p = publish_raw(false, topic_of(n).as_bytes(), 0, retain, &[], &payload);
            if s.write_all(&p).await.is_err() {
                break;
            }
        }
    }
}

/// Issue 12.2: QoS 0 floods of ~60 KB messages under `edgegate/` (allowed here by an ACL), on
/// ordinary topics and retained, beside honest sensors publishing QoS 1: rumqttd must never
/// skip a reading (broker_skipped stays 0) and every reading a sensor got a PUBACK for reaches
/// the cloud. A small in-memory log makes an overflow quick to reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_large_messages_never_make_rumqttd_skip_acknowledged_readings() {
    let (_m, cloud, gw, _d) = setup(|c| {
        small_log_sensors_forwarded(c);
        c.broker.acl = Some(Arc::new(Acl {
            rules: vec![AclRule {
                user: "*".into(),
                publish: vec!["sensors/#".into(), "edgegate/x/#".into(), "big/#".into()],
                subscribe: vec![],
            }],
        }));
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for (k, (prefix, retain)) in [("edgegate/x", false), ("edgegate/x", false), ("big", true)]
        .into_iter()
        .enumerate()
    {
        floods.push(tokio::spawn(flood(
            gw.broker_addr,
            format!("flooder-{k}"),
            move |n| format!("{prefix}/{}", n % 16),
            60_000,
            retain,
            stop.clone(),
            sent.clone(),
        )));
    }
    beside_honest_sensors(
        &gw,
        &cloud,
        750,
        "large QoS 0 messages",
        &sent,
        &stop,
        floods,
    )
    .await;
}

/// The sibling through wills: rumqttd publishes a client's will when its connection ends
/// without DISCONNECT, into the ingest link's log, never passing the guard's relay. Clients
/// with 60 KB wills connecting and vanishing beside honest sensors: nothing may be skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_wills_never_make_rumqttd_skip_acknowledged_readings() {
    let (_m, cloud, gw, _d) = setup(slow_queue).await;
    let stop = Arc::new(AtomicBool::new(false));
    let wills = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for k in 0..8 {
        let (stop, wills, addr) = (stop.clone(), wills.clone(), gw.broker_addr);
        floods.push(tokio::spawn(async move {
            let will = vec![b'w'; 60_000];
            while !stop.load(Ordering::Relaxed) {
                let n = wills.fetch_add(1, Ordering::Relaxed);
                let id = format!("vanisher-{k}-{n}");
                let packet = connect_with_will_payload(false, &id, b"big/will", &will);
                // CONNACK, then the connection dies without DISCONNECT: the will fires.
                let _ = exchange(addr, &packet, Duration::from_secs(2)).await;
            }
        }));
    }
    beside_honest_sensors(
        &gw,
        &cloud,
        1500,
        "connections with 60 KB wills",
        &wills,
        &stop,
        floods,
    )
    .await;
}

/// While `floods` run, four honest sensors publish `per_sensor` QoS 1 readings each on
/// `sensors/h{k}/t`; then the floods stop. rumqttd must have skipped nothing, and every reading
/// a sensor got a PUBACK for must reach the cloud.
async fn beside_honest_sensors(
    gw: &edgegate::Gateway,
    cloud: &Cloud,
    per_sensor: u64,
    what: &str,
    flooded: &AtomicU64,
    stop: &AtomicBool,
    floods: Vec<tokio::task::JoinHandle<()>>,
) {
    let sensors = Sensor::connect_many(gw.broker_addr, "honest", 4).await;
    let t0 = Instant::now();
    for i in 0..per_sensor {
        for (k, s) in sensors.iter().enumerate() {
            s.publish(&format!("sensors/h{k}/t"), format!("{i}")).await;
        }
    }
    for s in &sensors {
        s.wait_acked(per_sensor).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
    }
    let m = gw.metrics().clone();
    eprintln!(
        "{} {what} beside {} readings in {:?}; drops {:?}",
        flooded.load(Ordering::Relaxed),
        4 * per_sensor,
        t0.elapsed(),
        m.drops()
    );
    for (k, sensor) in sensors.iter().enumerate() {
        let topic = format!("sensors/h{k}/t");
        let want = sensor.acked() as usize;
        assert!(
            eventually(Duration::from_secs(60), || arrived(cloud, &topic) >= want).await,
            "{topic}: {} of {want} PUBACKed readings reached the cloud",
            arrived(cloud, &topic)
        );
    }
}

/// The sibling through MQTT 5 topic aliases: a publish with an alias carries no topic, but
/// rumqttd logs the full topic it stands for. Long topics behind aliases with 1-byte payloads
/// must count as what lands in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_through_topic_aliases_never_make_rumqttd_skip_acknowledged_readings() {
    let (_m, cloud, gw, _d) = setup(|c| {
        slow_queue(c);
        c.broker.listen_v5 = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let v5_addr = gw.broker_addr_v5.expect("MQTT 5 listener");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for k in 0..2 {
        let topic = format!("long/{k}/{}", "t".repeat(500));
        let alias = [0x23, 0, 1];
        floods.push(tokio::spawn(batch_flood(
            v5_addr,
            true,
            format!("aliaser-{k}"),
            publish_raw(true, topic.as_bytes(), 0, false, &alias, b"1"),
            publish_raw(true, b"", 0, false, &alias, b"1"),
            stop.clone(),
            sent.clone(),
        )));
    }
    beside_honest_sensors(
        &gw,
        &cloud,
        1500,
        "alias publishes of 500-byte topics",
        &sent,
        &stop,
        floods,
    )
    .await;
}

/// The sibling through tiny messages: rumqttd's log charges 4 bytes per message beyond topic
/// and payload; a flood of 1-byte topics with empty payloads is 5 times what it looks like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_tiny_messages_never_make_rumqttd_skip_acknowledged_readings() {
    let (_m, cloud, gw, _d) = setup(slow_queue).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for k in 0..2 {
        floods.push(tokio::spawn(batch_flood(
            gw.broker_addr,
            false,
            format!("tiny-{k}"),
            Vec::new(),
            publish_raw(false, b"z", 0, false, &[], b""),
            stop.clone(),
            sent.clone(),
        )));
    }
    beside_honest_sensors(
        &gw,
        &cloud,
        1500,
        "empty publishes on topic z",
        &sent,
        &stop,
        floods,
    )
    .await;
}
