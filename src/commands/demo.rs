//! `edgegate demo`: the whole mission on one machine, in about half a minute.
//!
//! Three simulated sensors (one misbehaving) publish to the gateway; a second embedded broker
//! plays the cloud; a cloud consumer prints what arrives and checks ids and sequences; the link
//! between gateway and cloud (a TCP relay) goes down for a while, the backlog grows in the
//! queue, and drains when the link returns. Ends by itself (or on Ctrl-C) with a summary.
//!
//! Layer: commands.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};

use crate::app::gateway::Gateway;
use crate::broker::Broker;
use crate::commands::cli::exit;
use crate::commands::consumer::{envelope_keys, envelopes, Tracker, Verdict};
use crate::config::{parse_upstream_url, Config};

pub fn main(seconds: u64) -> i32 {
    let seconds = seconds.max(10);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgegate demo: cannot start the runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    crate::app::logging::init("error");
    crate::init_crypto();
    match runtime.block_on(demo(Duration::from_secs(seconds))) {
        Ok(true) => exit::OK,
        Ok(false) => exit::SOFTWARE,
        Err(e) => {
            eprintln!("edgegate demo: {e}");
            exit::UNAVAILABLE
        }
    }
}

const DEMO_RULES: &str = r#"
[broker]
allow_anonymous = true

[[rules]]
name = "sensors"
match = "sensors/#"
actions = [
  { type = "forward" },
  { type = "detect", detector = "outlier" },
  { type = "detect", detector = "flatline", for = "4s", min_count = 10 },
]
"#;

/// What the cloud consumer has seen.
#[derive(Default)]
struct CloudView {
    tracker: Tracker,
    alerts: u64,
    opaque: u64,
    printed: u64,
}

async fn demo(total: Duration) -> anyhow::Result<bool> {
    let data_dir = std::env::temp_dir().join(format!("edgegate-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);

    // The cloud: a second embedded broker, reached through a link we can cut.
    let mut cloud_cfg = Config::defaults().broker;
    cloud_cfg.listen = "127.0.0.1:0".parse()?;
    let cloud = Broker::start(&cloud_cfg, crate::core::metrics::Metrics::new()).await?;
    let link_up = Arc::new(AtomicBool::new(true));
    let relay = Relay::start(cloud.addr(), link_up.clone()).await?;

    // The shipped rules, with a flatline window short enough to see within the demo.
    let mut cfg =
        Config::from_toml(DEMO_RULES, None).map_err(|e| anyhow::anyhow!("demo rules: {e}"))?;
    cfg.gateway.id = "demo".into();
    cfg.gateway.data_dir = data_dir.clone();
    cfg.broker.listen = "127.0.0.1:0".parse()?;
    cfg.metrics.listen = Some("127.0.0.1:0".parse()?);
    cfg.upstream.url = Some(parse_upstream_url(&format!("mqtt://{}", relay.addr))?);
    cfg.upstream.topic_prefix = "edge/demo".into();
    cfg.upstream.reconnect_max = Duration::from_secs(2);
    cfg.upstream.ack_timeout = Duration::from_secs(3);
    let gw = Gateway::start(cfg).await?;

    println!("edgegate demo");
    println!(
        "  gateway broker  mqtt://{}   (try: mosquitto_sub -p {} -t 'sensors/#' -v)",
        gw.broker_addr,
        gw.broker_addr.port()
    );
    if let Some(m) = gw.metrics_addr {
        println!("  status page     http://{m}/   (sensors, alerts, queue, uplink; live)");
        println!("  metrics         http://{m}/metrics");
    }
    println!(
        "  cloud broker    mqtt://{}   (the gateway reaches it through a link that will fail)",
        cloud.addr()
    );
    println!("  queue           {}", data_dir.join("queue.db").display());
    println!();

    // The cloud consumer.
    let view = Arc::new(Mutex::new(CloudView::default()));
    let consumer = consume(cloud.addr(), view.clone()).await?;

    // Sensors: two healthy ones and one that misbehaves (spikes, garbage, then stuck).
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut sensors = Vec::new();
    for (i, name) in ["boiler-1", "pump-2", "door-3"].into_iter().enumerate() {
        sensors.push(tokio::spawn(sensor(
            gw.broker_addr,
            name,
            i,
            sent.clone(),
            stop.clone(),
        )));
    }

    let start = Instant::now();
    let outage = (total.mul_f64(0.3), total.mul_f64(0.6));
    let sensors_stop = total.mul_f64(0.8);
    let hard_end = total + Duration::from_secs(15);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut max_backlog = 0u64;
    let mut drain_started: Option<Instant> = None;
    let mut drain_time: Option<Duration> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                println!("\ninterrupted");
                break;
            }
        }
        let t = start.elapsed();
        let down = t >= outage.0 && t < outage.1;
        if down && link_up.swap(false, Ordering::SeqCst) {
            println!("--- {:>3}s  LINK DOWN: the cloud is unreachable; readings keep coming and queue up on disk", t.as_secs());
        }
        if !down && t >= outage.1 && !link_up.swap(true, Ordering::SeqCst) {
            println!("--- {:>3}s  LINK UP: the backlog drains, oldest first, while live readings keep flowing", t.as_secs());
            drain_started = Some(Instant::now());
        }
        if t >= sensors_stop && !stop.swap(true, Ordering::SeqCst) {
            println!(
                "--- {:>3}s  sensors stop; waiting for the last events to arrive",
                t.as_secs()
            );
        }
        let depth = gw.queue_stats().await.map(|s| s.depth).unwrap_or(0);
        max_backlog = max_backlog.max(depth);
        if let (Some(s), None) = (drain_started, drain_time) {
            if depth == 0 {
                drain_time = Some(s.elapsed());
            }
        }
        let (unique, dups, gaps) = {
            let v = view
                .lock()
                .map_err(|_| anyhow::anyhow!("consumer state poisoned"))?;
            let t = v.tracker.totals();
            (t.unique, t.duplicates, t.missing)
        };
        let sent_now = sent.load(Ordering::Relaxed);
        println!(
            "{:>4}s  link {:<4} | sensors sent {:>5} | gateway queue {:>5} | cloud got {:>5} unique, {:>3} duplicates, {:>3} missing sequence numbers",
            t.as_secs(),
            if link_up.load(Ordering::SeqCst) { "up" } else { "DOWN" },
            sent_now,
            depth,
            unique,
            dups,
            gaps
        );
        let done = stop.load(Ordering::SeqCst) && depth == 0 && unique >= sent_now;
        if done || t >= hard_end {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for s in sensors {
        let _ = s.await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = gw.metrics().clone();
    let left = gw.shutdown().await.map(|s| s.depth).unwrap_or(0);
    consumer.abort();
    relay.task.abort();
    let v = view
        .lock()
        .map_err(|_| anyhow::anyhow!("consumer state poisoned"))?;
    let sent = sent.load(Ordering::Relaxed);
    let totals = v.tracker.totals();
    println!();
    println!("summary");
    println!("  readings acknowledged by the gateway to sensors  {sent}");
    println!(
        "  events received by the cloud (unique ids)        {}",
        totals.unique
    );
    println!(
        "  duplicates (same id, dropped by the consumer)    {}",
        totals.duplicates
    );
    println!(
        "  missing sequence numbers                          {}",
        totals.missing
    );
    println!(
        "  opaque payloads forwarded as data_base64          {}",
        v.opaque
    );
    println!(
        "  alerts received by the cloud                      {}",
        v.alerts
    );
    println!("  largest backlog during the outage                {max_backlog}");
    match drain_time {
        Some(d) => println!(
            "  backlog drained in                                {:.1} s",
            d.as_secs_f64()
        ),
        None => println!("  backlog drained in                                - (not drained)"),
    }
    println!(
        "  upstream reconnects                               {}",
        m.upstream_reconnects.get()
    );
    for (reason, n) in m.drops() {
        println!("  dropped ({reason})                                {n}");
    }
    println!("  left in the queue at exit                         {left}");
    let ok = totals.unique.saturating_sub(v.alerts) >= sent && totals.missing == 0 && left == 0;
    println!(
        "{}",
        if ok {
            "nothing lost."
        } else {
            "NOT everything arrived (see above)."
        }
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(ok)
}

/// One simulated sensor, publishing about 10 readings a second (QoS 1).
async fn sensor(
    addr: SocketAddr,
    name: &'static str,
    index: usize,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut opts = MqttOptions::new(name, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let acks = sent.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let topic = match index {
        0 => format!("sensors/{name}/temperature"),
        1 => format!("sensors/{name}/pressure"),
        _ => format!("sensors/{name}/position"),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let t = n as f64 / 10.0;
        let payload: Vec<u8> = match index {
            0 => format!(
                r#"{{"value":{:.2},"unit":"C"}}"#,
                60.0 + 2.0 * (t / 5.0).sin() + jitter(n) * 0.2
            )
            .into_bytes(),
            1 => format!("{:.3}", 2.5 + 0.05 * (t / 3.0).cos() + jitter(n) * 0.01).into_bytes(),
            // The misbehaving one: spikes, a garbage frame now and then, and later stuck.
            _ => {
                if n.is_multiple_of(97) {
                    b"\xffERR#42\x00".to_vec()
                } else if n.is_multiple_of(41) {
                    br#"{"value":999.0}"#.to_vec()
                } else if n > 150 {
                    br#"{"value":12.0}"#.to_vec()
                } else {
                    format!(r#"{{"value":{:.2}}}"#, 12.0 + jitter(n)).into_bytes()
                }
            }
        };
        if client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            break;
        }
    }
    // Let the last PUBACKs arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    poller.abort();
}

/// Deterministic noise in [-1, 1].
fn jitter(n: u64) -> f64 {
    let x = n
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        >> 33;
    (x % 2001) as f64 / 1000.0 - 1.0
}

/// The cloud consumer: dedups by id, tracks sequence gaps, prints a few events.
async fn consume(
    cloud: SocketAddr,
    view: Arc<Mutex<CloudView>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut opts = MqttOptions::new("demo-cloud-consumer", cloud.ip().to_string(), cloud.port());
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe("edge/demo/#", QoS::AtLeastOnce).await?;
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            let ev = match eventloop.poll().await {
                Ok(ev) => ev,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Event::Incoming(Packet::Publish(p)) = ev else {
                continue;
            };
            // One CloudEvent per message, or a batch (upstream.batch_events > 1).
            let Ok(batch) = envelopes(&p.payload) else {
                continue;
            };
            let Ok(mut v) = view.lock() else { return };
            for env in batch {
                let Some((source, id, seq)) = envelope_keys(&env) else {
                    continue;
                };
                if v.tracker.observe(source, id, seq) == Verdict::Duplicate {
                    continue;
                }
                let opaque = env.get("data_base64").is_some();
                if opaque {
                    v.opaque += 1;
                }
                if env["type"] == "io.edgegate.alert" {
                    v.alerts += 1;
                    let d = &env["data"];
                    println!(
                        "        ALERT  {} {} on {}: value {} (expected {}, score {}) [{}]",
                        d["detector"],
                        d["state"],
                        d["sensor"],
                        d["value"],
                        d["expected"],
                        d["score"],
                        d["severity"]
                    );
                } else if v.printed < 3 || (opaque && v.opaque <= 2) {
                    v.printed += 1;
                    println!("        cloud <- {}  {}", p.topic, env);
                }
            }
        }
    }))
}

/// The link between the gateway and the cloud: a TCP relay that can be cut.
struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr, up: Arc<AtomicBool>) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as by a dead link
                }
                let up = up.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async {
                            while up.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        } => {}
                    }
                });
            }
        });
        Ok(Relay { addr, task })
    }
}
