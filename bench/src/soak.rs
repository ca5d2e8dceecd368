//! `soak`: every attack of issue 12 at once against a running gateway, beside honest sensors,
//! and what it cost them.
//!
//! Honest sensors (raw MQTT 3.1.1 from 127.0.0.1, QoS 1, each reading numbered per sensor) publish
//! at a fixed total rate for the whole run; every PUBACK is matched to its reading, so the set of
//! readings the gateway acknowledged is known exactly. A cloud subscriber with a persistent
//! session on the upstream broker records every reading that arrives. Beside them, each attack
//! runs from its own loopback source address (127.0.0.11 and up, so per-address limits can tell
//! them from the sensors), each bounded in rate and ending with the run:
//!
//! | attack      | source     | what it does                                                      |
//! |-------------|------------|-------------------------------------------------------------------|
//! | wildcard    | 127.0.0.11 | every 20 s: QoS 1 PUBLISH to `sensors/+/t`, `sensors/#` (3.1.1 and 5); a will on `sensors/#` |
//! | flood       | 127.0.0.12 | two clients, QoS 0 60 KB publishes to `edgegate/x/...`             |
//! | retained    | 127.0.0.13 | one client stores many distinct retained 100 KB messages           |
//! | connflood   | 127.0.0.14 | thousands of connections (CONNECT, then held open) for a while     |
//! | slowloris   | 127.0.0.15 | waves of sockets that send nothing or half a CONNECT               |
//! | subflood    | 127.0.0.16 | thousands of distinct filters, then publishes to new topics        |
//! | traceparent | 127.0.0.17 | MQTT 5 readings with garbage `traceparent` user properties         |
//! | protocol    | 127.0.0.18 | every 30 s: reserved CONNECT flag, reserved SUBSCRIBE bits, `a/#/b`, MQIsdp |
//! | bigflood    | 127.0.0.19 | two clients, QoS 0 250 KB publishes to `sensors/big/...` (readings: into the pipeline) |
//! | halfsent    | 127.20.x.1 | hundreds of connections that each send 90% of a 250 KB publish, then wait |
//! | deaf        | 127.0.0.21 | 50 subscribers to `sensors/#` that never read their socket (reconnect when closed) |
//! | fanout      | 127.0.0.22 | 100 KB publishes spread over the subscription flood's filters (fills rumqttd's per-filter logs) |
//! | outage      | -          | runs `--upstream-stop`, then `--upstream-start` (the upstream broker) |
//!
//! A canary connects from 127.0.0.1 every 2 s (can a new sensor still get in, how fast). Each
//! second the soak samples `/healthz`, the gateway's RSS and the readings that reached the cloud.
//! It measures, it asserts nothing: the report says what happened.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::wire::{self, Connack, Connect};
use crate::{cloud_subscriber, host_port, now_us, parse_readings, percentile_ms};

/// `p` of the readings the traceparent attacker publishes (not an honest sensor).
const TRACEPARENT_P: u32 = 1000;
const VALID_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const ALL_ATTACKS: &str = "wildcard,flood,retained,connflood,slowloris,subflood,traceparent,protocol,bigflood,halfsent,deaf,fanout,outage";

#[derive(clap::Args)]
pub struct SoakArgs {
    /// The gateway's MQTT 3.1.1 listener.
    #[arg(long)]
    edge: String,
    /// The gateway's MQTT 5 listener (broker.listen_v5); without it, the MQTT 5 attacks are skipped.
    #[arg(long)]
    edge_v5: Option<String>,
    /// The upstream (cloud) broker.
    #[arg(long)]
    cloud: String,
    /// Topic filter of the cloud subscriber.
    #[arg(long, default_value = "edge/#")]
    filter: String,
    /// The gateway's metrics listener (metrics.listen): /healthz and /metrics.
    #[arg(long)]
    metrics: String,
    /// PID of the gateway, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// How long sensors publish and attacks run ("10m", "120s").
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Honest sensors.
    #[arg(long, default_value_t = 4)]
    sensors: u32,
    /// Honest readings per second, all sensors together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Attacks to run, comma-separated (default: all).
    #[arg(long, default_value = ALL_ATTACKS)]
    attacks: String,
    /// Seconds into the run when the attacks start.
    #[arg(long, default_value_t = 5)]
    attack_start: u64,
    /// 60 KB publishes per second, per flood client.
    #[arg(long, default_value_t = 200)]
    flood_rate: u64,
    /// Distinct retained 100 KB messages the retained flood stores.
    #[arg(long, default_value_t = 10_000)]
    retained: u64,
    /// Retained messages per second.
    #[arg(long, default_value_t = 200)]
    retained_rate: u64,
    /// Connections the connection flood opens and holds.
    #[arg(long, default_value_t = 3000)]
    conn_flood: u32,
    /// Slowloris sockets per wave (a wave every 90 s).
    #[arg(long, default_value_t = 1200)]
    slowloris: u32,
    /// Subscription filters of the subscription flood.
    #[arg(long, default_value_t = 10_000)]
    sub_filters: u32,
    /// 250 KB publishes per second, per big-flood client.
    #[arg(long, default_value_t = 10)]
    bigflood_rate: u64,
    /// Connections that each hold a half-sent 250 KB publish.
    #[arg(long, default_value_t = 500)]
    halfsent: u32,
    /// Subscribers that never read.
    #[arg(long, default_value_t = 50)]
    deaf: u32,
    /// 100 KB publishes per second over the subscription flood's filters.
    #[arg(long, default_value_t = 50)]
    fanout_rate: u64,
    /// Shell command that stops the upstream broker (the outage)...
    #[arg(long)]
    upstream_stop: Option<String>,
    /// ...and the one that starts it again.
    #[arg(long)]
    upstream_start: Option<String>,
    /// Seconds into the run when the outage starts (default: the middle of the run).
    #[arg(long)]
    outage_at: Option<u64>,
    /// Length of the outage in seconds (at most a third of the run).
    #[arg(long, default_value_t = 60)]
    outage_secs: u64,
    /// After the run, wait at most this many seconds for acknowledged readings to arrive.
    #[arg(long, default_value_t = 90)]
    settle: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Named counters (and maxima) the attacks report into.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, key: impl Into<String>, n: u64) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(key.into()).or_default() += n;
        }
    }
    fn max(&self, key: impl Into<String>, v: u64) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry(key.into()).or_default();
            *e = (*e).max(v);
        }
    }
    fn set(&self, key: impl Into<String>, v: u64) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key.into(), v);
        }
    }
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What everything shares.
struct Soak {
    edge: SocketAddr,
    edge_v5: Option<SocketAddr>,
    run: String,
    t0: Instant,
    /// End of publishing and attacking.
    end: Instant,
    tally: Tally,
    /// The upstream broker is running (false during the outage).
    upstream_up: AtomicBool,
}

impl Soak {
    fn over(&self) -> bool {
        Instant::now() >= self.end
    }
    fn secs(&self) -> u64 {
        self.t0.elapsed().as_secs()
    }
}

/// One honest sensor's readings: the ones it got a PUBACK for.
#[derive(Default)]
struct Sensor {
    acked: Mutex<HashSet<u64>>,
    /// PUBLISH packets written (resends after a lost connection included).
    sent: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
}

/// What reached the cloud.
#[derive(Default)]
struct Cloud {
    /// Per honest sensor, the readings that arrived.
    seen: Mutex<Vec<HashSet<u64>>>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    latency_us: Mutex<Vec<u64>>,
}

pub async fn run(a: SoakArgs) -> anyhow::Result<()> {
    let edge = resolve(&a.edge)?;
    let edge_v5 = a.edge_v5.as_deref().map(resolve).transpose()?;
    let attacks: HashSet<&str> = a.attacks.split(',').map(str::trim).collect();
    for name in &attacks {
        anyhow::ensure!(
            ALL_ATTACKS.split(',').any(|k| k == *name) || name.is_empty(),
            "unknown attack {name:?} (known: {ALL_ATTACKS})"
        );
    }
    let run = format!("{:x}", now_us());
    let t0 = Instant::now();
    let soak = Arc::new(Soak {
        edge,
        edge_v5,
        run: run.clone(),
        t0,
        end: t0 + a.duration,
        tally: Tally::default(),
        upstream_up: AtomicBool::new(true),
    });

    // The cloud subscriber.
    let cloud = Arc::new(Cloud {
        seen: Mutex::new(vec![HashSet::new(); a.sensors as usize]),
        ..Cloud::default()
    });
    let cloud_task = {
        let (cloud, soak, sensors) = (cloud.clone(), soak.clone(), a.sensors);
        cloud_subscriber(
            host_port(&a.cloud)?,
            format!("soak-cloud-{run}"),
            a.filter.clone(),
            true,
            move |payload, now| on_cloud_message(&soak, &cloud, sensors, payload, now),
        )
        .await?
    };

    // Honest sensors.
    let stop_sensors = Arc::new(AtomicBool::new(false));
    let mut sensors = Vec::new();
    let mut sensor_tasks = Vec::new();
    for p in 0..a.sensors {
        let s = Arc::new(Sensor::default());
        sensors.push(s.clone());
        let (soak, stop) = (soak.clone(), stop_sensors.clone());
        let rate = (a.rate / a.sensors.max(1) as u64).max(1);
        sensor_tasks.push(tokio::spawn(async move {
            honest_sensor(&soak, p, rate, &stop, &s).await
        }));
    }

    // Attacks.
    let mut attack_tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)> = Vec::new();
    let start = soak.t0 + Duration::from_secs(a.attack_start);
    macro_rules! attack {
        ($name:literal, $fut:expr) => {
            if attacks.contains($name) {
                let fut = $fut;
                attack_tasks.push((
                    $name,
                    tokio::spawn(async move {
                        tokio::time::sleep_until(start.into()).await;
                        fut.await
                    }),
                ));
            }
        };
    }
    attack!("wildcard", wildcard(soak.clone()));
    attack!("flood", flood(soak.clone(), a.flood_rate));
    attack!(
        "retained",
        retained(soak.clone(), a.retained, a.retained_rate)
    );
    attack!("connflood", conn_flood(soak.clone(), a.conn_flood));
    attack!("slowloris", slowloris(soak.clone(), a.slowloris));
    attack!("subflood", sub_flood(soak.clone(), a.sub_filters));
    attack!("traceparent", traceparent(soak.clone()));
    attack!("protocol", protocol(soak.clone()));
    attack!("bigflood", big_flood(soak.clone(), a.bigflood_rate));
    attack!("halfsent", half_sent(soak.clone(), a.halfsent));
    attack!("deaf", deaf(soak.clone(), a.deaf));
    attack!("fanout", fan_out(soak.clone(), a.fanout_rate));
    let canary_task = tokio::spawn(canary(soak.clone()));
    let mut outage = None;
    if attacks.contains("outage") {
        if let (Some(stop), Some(start)) = (a.upstream_stop.clone(), a.upstream_start.clone()) {
            let len = a.outage_secs.min(a.duration.as_secs() / 3);
            let at = a
                .outage_at
                .unwrap_or(a.duration.as_secs().saturating_sub(len) / 2);
            outage = Some((at, at + len));
            let soak = soak.clone();
            attack_tasks.push((
                "outage",
                tokio::spawn(async move { upstream_outage(&soak, at, len, &stop, &start).await }),
            ));
        } else {
            println!("no --upstream-stop/--upstream-start: no upstream outage");
        }
    }
    println!(
        "soak {run}: {} s, {} sensors at {}/s in all, attacks: {}",
        a.duration.as_secs(),
        a.sensors,
        a.rate,
        attack_tasks
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(",")
    );

    // Sample every second until the end of the run, then through the settle time.
    let metrics_addr = a.metrics.clone();
    let mut samples: Vec<Sample> = Vec::new();
    let mut peak = (0u64, 0u64); // (VmRSS max, VmHWM)
    let mut last_unique = 0;
    let mut last_acked = 0;
    let mut stopped_at: Option<Instant> = None;
    let mut gateway_gone = false;
    let mut quiet_secs = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= soak.end && stopped_at.is_none() {
            stop_sensors.store(true, Ordering::SeqCst);
            stopped_at = Some(now);
            println!(
                "  {:>4}s  publishing and attacks end; settling (at most {} s)",
                soak.secs(),
                a.settle
            );
        }
        let health = http_get(&metrics_addr, "/healthz").await;
        let queued = http_get(&metrics_addr, "/metrics")
            .await
            .and_then(|(_, body)| metric_value(&body, "edgegate_queue_depth"));
        if let Some(pid) = a.pid {
            match proc_status_kb(pid) {
                Some((rss, hwm)) => peak = (peak.0.max(rss), peak.1.max(hwm)),
                None if !gateway_gone => {
                    gateway_gone = true;
                    println!("  {:>4}s  the gateway process is gone", soak.secs());
                }
                None => {}
            }
        }
        let acked: u64 = sensors.iter().map(|s| acked_len(s)).sum();
        let unique = cloud.unique.load(Ordering::Relaxed);
        let sample = Sample {
            t: soak.t0.elapsed().as_secs_f64(),
            healthy: health.as_ref().map(|(code, _)| *code == 200),
            reasons: health.map(|(_, body)| body).unwrap_or_default(),
            upstream_up: soak.upstream_up.load(Ordering::SeqCst),
            delivered: unique - last_unique,
            pending: acked.saturating_sub(unique),
            queued,
            acked: acked - last_acked,
            publishing: stopped_at.is_none(),
        };
        last_unique = unique;
        last_acked = acked;
        if soak.secs().is_multiple_of(10) || samples.is_empty() {
            println!(
                "  {:>4}s  acked {acked:>7}  at cloud {unique:>7}  not there {:>7}  gateway queue {:>7}  healthz {:<5}  upstream {}  RSS {} MB",
                soak.secs(),
                sample.pending,
                queued.map_or("-".to_string(), |q| q.to_string()),
                sample.healthy.map_or("-".to_string(), |h| h.to_string()),
                if sample.upstream_up { "up" } else { "DOWN" },
                a.pid.and_then(proc_status_kb).map_or(0, |(r, _)| r / 1024),
            );
        }
        // Nothing left to deliver: the gateway's queue empty, nothing arriving, upstream up.
        let drained = sample.upstream_up && sample.delivered == 0 && sample.queued == Some(0);
        quiet_secs = if drained { quiet_secs + 1 } else { 0 };
        let all_arrived = sample.pending == 0
            && sensors
                .iter()
                .zip(0..)
                .all(|(s, p)| missing(s, &cloud, p).is_empty());
        samples.push(sample);
        if let Some(at) = stopped_at {
            let sensors_done = sensor_tasks.iter().all(|t| t.is_finished());
            if sensors_done
                && (all_arrived || quiet_secs >= 5 || at.elapsed() >= Duration::from_secs(a.settle))
            {
                break;
            }
        }
    }
    let metrics = http_get(&metrics_addr, "/metrics").await;
    // Attacks end by themselves at the end of the run; one stuck on a socket is cut off here.
    for (name, t) in attack_tasks {
        if !t.is_finished() {
            soak.tally.add(format!("{name}.still_running_at_end"), 1);
            t.abort();
        }
    }
    canary_task.abort();
    cloud_task.abort();

    let report = Report::new(&a, &soak, &sensors, &cloud, &samples, outage, peak, metrics);
    report.print();
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json)?)?;
    }
    Ok(())
}

fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    let (h, p) = host_port(s)?;
    let ip: Ipv4Addr = if h == "localhost" {
        Ipv4Addr::LOCALHOST
    } else {
        h.parse()?
    };
    Ok(SocketAddr::from((ip, p)))
}

fn on_cloud_message(soak: &Soak, cloud: &Cloud, sensors: u32, payload: &[u8], now: u64) {
    let readings = parse_readings(payload);
    for (run, p, n, ts) in &readings {
        if *run != soak.run || *p >= sensors {
            continue;
        }
        let new = cloud
            .seen
            .lock()
            .map(|mut s| s[*p as usize].insert(*n))
            .unwrap_or(false);
        if new {
            cloud.unique.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = cloud.latency_us.lock() {
                l.push(now.saturating_sub(*ts));
            }
        } else {
            cloud.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The traceparent attacker's readings: what became of the garbage.
    if readings
        .iter()
        .any(|r| r.0 == soak.run && r.1 == TRACEPARENT_P)
    {
        for env in edgegate::commands::consumer::envelopes(payload).unwrap_or_default() {
            if env["data"]["p"].as_u64() != Some(TRACEPARENT_P as u64) {
                continue;
            }
            let outcome = match env.get("traceparent").and_then(|t| t.as_str()) {
                None => "absent",
                Some(VALID_TRACEPARENT) => "valid_kept",
                Some(_) => "garbage_forwarded",
            };
            soak.tally.add(format!("traceparent.cloud.{outcome}"), 1);
        }
    }
}

fn acked_len(s: &Sensor) -> u64 {
    s.acked.lock().map(|a| a.len() as u64).unwrap_or(0)
}

/// Readings of sensor `p` that were PUBACKed and have not reached the cloud, sorted.
fn missing(s: &Sensor, cloud: &Cloud, p: usize) -> Vec<u64> {
    let acked = s.acked.lock().map(|a| a.clone()).unwrap_or_default();
    let seen = cloud.seen.lock().map(|c| c[p].clone()).unwrap_or_default();
    let mut m: Vec<u64> = acked.difference(&seen).copied().collect();
    m.sort_unstable();
    m
}

/// Consecutive runs of sorted numbers, as "a-b" (at most `max` of them).
fn ranges(sorted: &[u64], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() && out.len() < max {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Honest sensors

/// Publishes numbered QoS 1 readings at `rate` until `stop`, then waits (at most 10 s) for the
/// PUBACKs of those in flight. After a lost connection it reconnects and sends the readings that
/// were in flight again (like a real sensor), so a reading may arrive twice but none is given up.
async fn honest_sensor(soak: &Soak, p: u32, rate: u64, stop: &AtomicBool, s: &Sensor) {
    const INFLIGHT: usize = 100;
    let client_id = format!("soak-sensor-{}-{p}", soak.run);
    let topic = format!("sensors/soak{p}/temp");
    let mut next_n = 0u64;
    let mut resend: VecDeque<u64> = VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut connected_once = false;
    let connect = Connect::v311(&client_id);
    while !stop.load(Ordering::SeqCst) {
        let (Some(stream), _) =
            wire::open(None, soak.edge, &connect, Duration::from_secs(10)).await
        else {
            s.connect_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if connected_once {
            s.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_once = true;
        let (mut rd, mut wr) = stream.into_split();
        let inflight: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
        let acked_signal = Arc::new(Notify::new());
        let dead = Arc::new(AtomicBool::new(false));
        let reader = {
            let (inflight, acked_signal, dead) =
                (inflight.clone(), acked_signal.clone(), dead.clone());
            // The reader hands the PUBACKed numbers to the sensor, which records them.
            let (tx, rx) = flume::unbounded::<u64>();
            let task = tokio::spawn(async move {
                while let Ok(Some((h, body))) = wire::read_packet(&mut rd, 1 << 20).await {
                    if h >> 4 == wire::PUBACK && body.len() >= 2 {
                        let pkid = u16::from_be_bytes([body[0], body[1]]);
                        let n = inflight.lock().ok().and_then(|mut m| m.remove(&pkid));
                        if let Some(n) = n {
                            let _ = tx.send(n);
                        }
                        acked_signal.notify_one();
                    }
                }
                dead.store(true, Ordering::SeqCst);
                acked_signal.notify_one();
            });
            (task, rx)
        };
        let record_acks = |rx: &flume::Receiver<u64>| {
            if let Ok(mut a) = s.acked.lock() {
                a.extend(rx.try_iter());
            }
        };
        let mut pkid = 0u16;
        let mut last_ping = Instant::now();
        let mut drain_until: Option<Instant> = None;
        loop {
            record_acks(&reader.1);
            if dead.load(Ordering::SeqCst) {
                break;
            }
            let n_inflight = inflight.lock().map(|m| m.len()).unwrap_or(0);
            if stop.load(Ordering::SeqCst) {
                let until = *drain_until.get_or_insert(Instant::now() + Duration::from_secs(10));
                if n_inflight == 0 || Instant::now() >= until {
                    let _ = wr.write_all(&wire::DISCONNECT).await;
                    break;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), acked_signal.notified()).await;
                continue;
            }
            if n_inflight >= INFLIGHT {
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), acked_signal.notified()).await;
                continue;
            }
            tick.tick().await;
            let n = resend.pop_front().unwrap_or_else(|| {
                next_n += 1;
                next_n
            });
            if let Ok(mut m) = inflight.lock() {
                loop {
                    pkid = pkid.checked_add(1).unwrap_or(1);
                    if !m.contains_key(&pkid) {
                        break;
                    }
                }
                m.insert(pkid, n);
            }
            let payload = format!(
                r#"{{"run":"{}","p":{p},"n":{n},"ts":{},"value":{:.3},"unit":"C"}}"#,
                soak.run,
                now_us(),
                20.0 + (n % 50) as f64 / 10.0
            );
            let packet = wire::publish(&topic, payload.as_bytes(), 1, false, pkid, None);
            if wr.write_all(&packet).await.is_err() {
                break;
            }
            s.sent.fetch_add(1, Ordering::Relaxed);
            if last_ping.elapsed() > Duration::from_secs(20) {
                last_ping = Instant::now();
                if wr.write_all(&wire::PINGREQ).await.is_err() {
                    break;
                }
            }
        }
        reader.0.abort();
        let _ = reader.0.await;
        record_acks(&reader.1);
        // What was in flight was not acknowledged: send it again on the next connection.
        let mut lost: Vec<u64> = inflight
            .lock()
            .map(|mut m| m.drain().map(|(_, n)| n).collect())
            .unwrap_or_default();
        lost.sort_unstable();
        resend.extend(lost);
        if !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attacks

fn src(last: u8) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::new(127, 0, 0, last))
}

/// Every 20 s: QoS 1 publishes to wildcard topics and a will on `sensors/#`.
async fn wildcard(soak: Arc<Soak>) {
    let wait = Duration::from_secs(3);
    let mut k = 0;
    while !soak.over() {
        k += 1;
        for topic in ["sensors/+/t", "sensors/#"] {
            let id = format!("soak-wild-{k}");
            let outcome = match wire::open(src(11), soak.edge, &Connect::v311(&id), wait).await {
                (Some(mut s), _) => {
                    let pkt = wire::publish(topic, br#"{"value":1}"#, 1, false, 1, None);
                    let r = match s.write_all(&pkt).await {
                        Ok(()) => wire::expect(&mut s, wire::PUBACK, wait).await,
                        Err(_) => Err("closed".into()),
                    };
                    let _ = s.write_all(&wire::DISCONNECT).await;
                    r.map(|_| "puback".to_string()).unwrap_or_else(|e| e)
                }
                (None, c) => c.name(),
            };
            soak.tally
                .add(format!("wildcard.publish_v311 {topic}: {outcome}"), 1);
            if let Some(v5) = soak.edge_v5 {
                let id = format!("soak-wild5-{k}");
                let outcome = match wire::open(src(11), v5, &Connect::v5(&id), wait).await {
                    (Some(mut s), _) => {
                        let pkt = wire::publish(topic, br#"{"value":1}"#, 1, false, 1, Some(&[]));
                        let r = match s.write_all(&pkt).await {
                            Ok(()) => wire::expect(&mut s, wire::PUBACK, wait).await,
                            Err(_) => Err("closed".into()),
                        };
                        r.map(|_| "puback".to_string()).unwrap_or_else(|e| e)
                    }
                    (None, c) => c.name(),
                };
                soak.tally
                    .add(format!("wildcard.publish_v5 {topic}: {outcome}"), 1);
            }
        }
        // A will on a wildcard topic, then the connection drops without DISCONNECT.
        let id = format!("soak-will-{k}");
        let c = Connect {
            will: Some(("sensors/#", br#"{"value":0}"#, 1)),
            ..Connect::v311(&id)
        };
        let (s, outcome) = wire::open(src(11), soak.edge, &c, wait).await;
        soak.tally
            .add(format!("wildcard.will sensors/#: {}", outcome.name()), 1);
        drop(s);
        sleep_or_end(&soak, Duration::from_secs(20)).await;
    }
}

/// Sleep `d`, or until the end of the run if that comes first.
async fn sleep_or_end(soak: &Soak, d: Duration) {
    let until = (Instant::now() + d).min(soak.end);
    tokio::time::sleep_until(until.into()).await;
}

/// Two clients publishing QoS 0 60 KB messages to `edgegate/x/...` at `rate` each; a client
/// whose connection is closed reconnects after a second.
async fn flood(soak: Arc<Soak>, rate: u64) {
    two_floods(soak, 12, "flood", 60 * 1024, rate, |k, i| {
        format!("edgegate/x/{k}/{}", i % 1000)
    })
    .await
}

/// Two clients (`soak-{name}-{k}`, from 127.0.0.`from`) publishing QoS 0 messages of `size`
/// bytes to `topic(k, i)` at `rate` each.
async fn two_floods(
    soak: Arc<Soak>,
    from: u8,
    name: &'static str,
    size: usize,
    rate: u64,
    topic: fn(u64, u64) -> String,
) {
    let payload = Arc::new(vec![b'x'; size]);
    let clients: Vec<_> = (0..2u64)
        .map(|k| {
            let (soak, payload) = (soak.clone(), payload.clone());
            tokio::spawn(async move {
                let id = format!("soak-{name}-{k}");
                publisher_loop(&soak, src(from), &id, rate, name, |i| {
                    (topic(k, i), payload.clone(), false, false)
                })
                .await;
            })
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
}

/// One client storing `count` distinct retained 100 KB messages at `rate`.
async fn retained(soak: Arc<Soak>, count: u64, rate: u64) {
    let payload = Arc::new(vec![b'r'; 100 * 1024]);
    publisher_loop(&soak, src(13), "soak-retained", rate, "retained", |i| {
        (
            format!("soak/retained/{i}"),
            payload.clone(),
            true,
            i + 1 >= count,
        )
    })
    .await;
}

/// Publish QoS 0 messages from `next(i)` (topic, payload, retain, last) at `rate` until the end of the
/// run or the last one; reconnect a second after the gateway closes the connection. Counts
/// `{name}.sent` and `{name}.closed_by_gateway`.
async fn publisher_loop(
    soak: &Soak,
    from: Option<Ipv4Addr>,
    client_id: &str,
    rate: u64,
    name: &str,
    mut next: impl FnMut(u64) -> (String, Arc<Vec<u8>>, bool, bool),
) {
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    let mut done = false;
    while !soak.over() && !done {
        let (Some(s), outcome) = wire::open(
            from,
            soak.edge,
            &Connect::v311(client_id),
            Duration::from_secs(5),
        )
        .await
        else {
            soak.tally.add(format!("{name}.connect_refused"), 1);
            sleep_or_end(soak, Duration::from_secs(1)).await;
            continue;
        };
        debug_assert_eq!(outcome, Connack::Accepted);
        let (mut rd, mut wr) = s.into_split();
        // Read (and discard) whatever the gateway sends, so that its writes never block.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        while !soak.over() {
            tick.tick().await;
            let (topic, payload, retain, last) = next(i);
            let packet = wire::publish(&topic, &payload, 0, retain, 0, None);
            // A gateway that stops reading (backpressure) is waited for, up to 30 s.
            let write = tokio::time::timeout(Duration::from_secs(30), wr.write_all(&packet));
            match write.await {
                Ok(Ok(())) => {
                    i += 1;
                    soak.tally.add(format!("{name}.sent"), 1);
                }
                _ => {
                    soak.tally.add(format!("{name}.closed_by_gateway"), 1);
                    break;
                }
            }
            if reader.is_finished() {
                soak.tally.add(format!("{name}.closed_by_gateway"), 1);
                break;
            }
            if last {
                done = true;
                break;
            }
        }
        reader.abort();
        if !done {
            sleep_or_end(soak, Duration::from_secs(1)).await;
        }
    }
}

/// Two clients publishing QoS 0 250 KB readings to `sensors/big/...` at `rate` each: readings
/// of the largest size, which the pipeline holds until committed.
async fn big_flood(soak: Arc<Soak>, rate: u64) {
    two_floods(soak, 19, "bigflood", 250 * 1024, rate, |k, i| {
        format!("sensors/big/{k}/{}", i % 10)
    })
    .await
}

/// `count` connections, each sending 90% of a 250 KB publish and then nothing; one whose
/// connection the gateway closes is opened again after 5 s.
async fn half_sent(soak: Arc<Soak>, count: u32) {
    let packet = Arc::new(wire::publish(
        "sensors/half/t",
        &vec![b'h'; 250 * 1024],
        0,
        false,
        0,
        None,
    ));
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (soak, packet) = (soak.clone(), packet.clone());
            tokio::spawn(async move {
                let part = &packet[..packet.len() * 9 / 10];
                while !soak.over() {
                    let id = format!("soak-half-{i}");
                    // Spread over addresses, as many hosts would be (100 per address at most).
                    let from = Some(Ipv4Addr::new(127, 20, (i / 90) as u8, 1));
                    let (Some(mut s), _) = wire::open(
                        from,
                        soak.edge,
                        &Connect::v311(&id),
                        Duration::from_secs(10),
                    )
                    .await
                    else {
                        soak.tally.add("halfsent.connect_refused", 1);
                        sleep_or_end(&soak, Duration::from_secs(5)).await;
                        continue;
                    };
                    if s.write_all(part).await.is_ok() {
                        soak.tally.add("halfsent.holding", 1);
                        let mut buf = [0u8; 256];
                        let closed =
                            async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
                        tokio::select! {
                            _ = closed => soak.tally.add("halfsent.closed_by_gateway", 1),
                            _ = sleep_or_end(&soak, Duration::from_secs(3600)) => {}
                        }
                    }
                    sleep_or_end(&soak, Duration::from_secs(5)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// `count` subscribers to `sensors/#` that never read their socket; one the gateway
/// disconnects comes back after 5 s.
async fn deaf(soak: Arc<Soak>, count: u32) {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let soak = soak.clone();
            tokio::spawn(async move {
                while !soak.over() {
                    let id = format!("soak-deaf-{i}");
                    let (Some(mut s), _) = wire::open(
                        src(21),
                        soak.edge,
                        &Connect::v311(&id),
                        Duration::from_secs(10),
                    )
                    .await
                    else {
                        soak.tally.add("deaf.connect_refused", 1);
                        sleep_or_end(&soak, Duration::from_secs(5)).await;
                        continue;
                    };
                    let sub = wire::subscribe(1, &[("sensors/#".to_string(), 1)], false);
                    if s.write_all(&sub).await.is_err() {
                        continue;
                    }
                    soak.tally.add("deaf.subscribed", 1);
                    // Never read; notice the close only by a write failing.
                    loop {
                        sleep_or_end(&soak, Duration::from_secs(1)).await;
                        if soak.over() {
                            return;
                        }
                        if s.write_all(&[0xc0, 0x00]).await.is_err() {
                            soak.tally.add("deaf.closed_by_gateway", 1);
                            break;
                        }
                    }
                    sleep_or_end(&soak, Duration::from_secs(5)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// 100 KB publishes at `rate` to topics that match the subscription flood's filters, one
/// after the other: every filter's log in rumqttd fills.
async fn fan_out(soak: Arc<Soak>, rate: u64) {
    let payload = Arc::new(vec![b'f'; 100 * 1024]);
    publisher_loop(&soak, src(22), "soak-fanout", rate, "fanout", |i| {
        (
            format!("soak/subs/{}/big", i % 1000),
            payload.clone(),
            false,
            false,
        )
    })
    .await;
}

/// Open `count` connections (each with a CONNECT) and hold the accepted ones for a quarter of
/// the run (at most 60 s, at least 10 s), then close them.
async fn conn_flood(soak: Arc<Soak>, count: u32) {
    let hold = (soak.end.saturating_duration_since(Instant::now()) / 4)
        .clamp(Duration::from_secs(10), Duration::from_secs(60));
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let t = Instant::now();
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (soak, sem) = (soak.clone(), sem.clone());
            tokio::spawn(async move {
                let _permit = sem.acquire().await.ok()?;
                let id = format!("soak-cf-{}-{i}", soak.run);
                // Silent while held: a keep-alive longer than the hold.
                let c = Connect {
                    keep_alive: 300,
                    ..Connect::v311(&id)
                };
                let (s, outcome) =
                    wire::open(src(14), soak.edge, &c, Duration::from_secs(10)).await;
                soak.tally.add(format!("connflood.{}", outcome.name()), 1);
                s
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            held.push(s);
        }
    }
    soak.tally
        .max("connflood.open_ms", t.elapsed().as_millis() as u64);
    println!(
        "  {:>4}s  connection flood: {} of {count} accepted, held for {} s",
        soak.secs(),
        held.len(),
        hold.as_secs()
    );
    tokio::time::sleep(hold).await;
    // Which of them the gateway closed meanwhile.
    let mut closed = 0;
    for s in &held {
        let mut b = [0u8; 64];
        if matches!(
            tokio::time::timeout(Duration::from_millis(1), s.peek(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    soak.tally
        .add("connflood.closed_by_gateway_while_held", closed);
    drop(held);
}

/// Waves (every 90 s) of `count` sockets from one address that send nothing (half) or half a
/// CONNECT (the other half), each kept until the gateway closes it (at most 60 s).
async fn slowloris(soak: Arc<Soak>, count: u32) {
    let partial = Connect::v311("soak-slowloris").encode();
    let mut wave = 0;
    while !soak.over() {
        wave += 1;
        let t = Instant::now();
        let tasks: Vec<_> = (0..count)
            .map(|i| {
                let (soak, partial) = (soak.clone(), partial[..partial.len() / 2].to_vec());
                tokio::spawn(async move {
                    let Ok(mut s) = wire::tcp_from(src(15), soak.edge).await else {
                        soak.tally.add("slowloris.tcp_failed", 1);
                        return None;
                    };
                    if i % 2 == 1 && s.write_all(&partial).await.is_err() {
                        return Some(Duration::ZERO);
                    }
                    let opened = Instant::now();
                    let mut b = [0u8; 64];
                    match tokio::time::timeout(Duration::from_secs(60), s.read(&mut b)).await {
                        Ok(_) => Some(opened.elapsed()),
                        Err(_) => {
                            soak.tally.add("slowloris.open_after_60s", 1);
                            None
                        }
                    }
                })
            })
            .collect();
        let mut closed_after: Vec<u64> = Vec::new();
        for t in tasks {
            if let Ok(Some(d)) = t.await {
                closed_after.push(d.as_micros() as u64);
            }
        }
        closed_after.sort_unstable();
        soak.tally.add("slowloris.sockets", count as u64);
        soak.tally
            .add("slowloris.closed_by_gateway", closed_after.len() as u64);
        soak.tally.max(
            "slowloris.closed_after_ms_p50",
            percentile_ms(&closed_after, 0.5) as u64,
        );
        soak.tally.max(
            "slowloris.closed_after_ms_max",
            percentile_ms(&closed_after, 1.0) as u64,
        );
        println!(
            "  {:>4}s  slowloris wave {wave}: {} of {count} closed by the gateway, p50 after {:.1} s",
            soak.secs(),
            closed_after.len(),
            percentile_ms(&closed_after, 0.5) / 1000.0
        );
        sleep_or_end(&soak, Duration::from_secs(90).saturating_sub(t.elapsed())).await;
    }
}

/// One client subscribes to `filters` distinct filters (100 per SUBSCRIBE), then publishes
/// QoS 0 to a new topic 50 times a second until the end.
async fn sub_flood(soak: Arc<Soak>, filters: u32) {
    let (Some(mut s), outcome) = wire::open(
        src(16),
        soak.edge,
        &Connect::v311("soak-subflood"),
        Duration::from_secs(10),
    )
    .await
    else {
        soak.tally.add("subflood.connect_refused", 1);
        return;
    };
    debug_assert_eq!(outcome, Connack::Accepted);
    let t = Instant::now();
    let mut granted = 0u64;
    let mut refused = 0u64;
    let mut ended = None;
    for (k, chunk) in (0..filters).collect::<Vec<_>>().chunks(100).enumerate() {
        let f: Vec<(String, u8)> = chunk
            .iter()
            .map(|i| (format!("soak/subs/{i}/+"), 0))
            .collect();
        if s.write_all(&wire::subscribe(k as u16 + 1, &f, false))
            .await
            .is_err()
        {
            ended = Some("closed".to_string());
            break;
        }
        match wire::expect(&mut s, wire::SUBACK, Duration::from_secs(60)).await {
            Ok(body) => {
                for code in body.iter().skip(2) {
                    if *code < 0x80 {
                        granted += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
            Err(e) => {
                ended = Some(e);
                break;
            }
        }
    }
    soak.tally.add("subflood.filters_granted", granted);
    soak.tally.add("subflood.filters_refused", refused);
    soak.tally
        .max("subflood.subscribe_ms", t.elapsed().as_millis() as u64);
    if let Some(e) = ended {
        soak.tally.add(format!("subflood.ended_by_gateway: {e}"), 1);
        return;
    }
    println!(
        "  {:>4}s  subscription flood: {granted} filters granted, {refused} refused in {:.1} s",
        soak.secs(),
        t.elapsed().as_secs_f64()
    );
    // Keep reading (SUBACKs, forwarded publishes), then publish to new topics.
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut i = 0u64;
    while !soak.over() && !reader.is_finished() {
        tick.tick().await;
        i += 1;
        let pkt = wire::publish(&format!("soak/subs/{i}/new{i}"), b"1", 0, false, 0, None);
        if wr.write_all(&pkt).await.is_err() {
            break;
        }
        soak.tally.add("subflood.new_topics_published", 1);
    }
    if reader.is_finished() {
        soak.tally.add("subflood.closed_by_gateway", 1);
    }
    reader.abort();
}

/// MQTT 5 readings with garbage (and, for comparison, valid) `traceparent` user properties, 5 a
/// second; the cloud side counts what became of them.
async fn traceparent(soak: Arc<Soak>) {
    let Some(v5) = soak.edge_v5 else { return };
    let long = "0".repeat(4000);
    let garbage = [
        "garbage",
        "00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n{\"injected\":true}",
        "",
        long.as_str(),
    ];
    let mut n = 0u64;
    while !soak.over() {
        let (Some(mut s), _) = wire::open(
            src(17),
            v5,
            &Connect::v5("soak-traceparent"),
            Duration::from_secs(5),
        )
        .await
        else {
            soak.tally.add("traceparent.connect_refused", 1);
            sleep_or_end(&soak, Duration::from_secs(1)).await;
            continue;
        };
        while !soak.over() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            n += 1;
            let tp = if n.is_multiple_of(8) {
                VALID_TRACEPARENT
            } else {
                garbage[n as usize % garbage.len()]
            };
            let payload = format!(
                r#"{{"run":"{}","p":{TRACEPARENT_P},"n":{n},"ts":{},"value":1}}"#,
                soak.run,
                now_us()
            );
            let pkt = wire::publish(
                "sensors/soak-tp/t",
                payload.as_bytes(),
                1,
                false,
                (n % 60000) as u16 + 1,
                Some(&[("traceparent", tp)]),
            );
            if s.write_all(&pkt).await.is_err() {
                soak.tally.add("traceparent.closed_by_gateway", 1);
                break;
            }
            let kind = if tp == VALID_TRACEPARENT {
                "valid"
            } else {
                "garbage"
            };
            match wire::expect(&mut s, wire::PUBACK, Duration::from_secs(5)).await {
                Ok(_) => soak.tally.add(format!("traceparent.{kind}.puback"), 1),
                Err(e) => {
                    soak.tally.add(format!("traceparent.{kind}.{e}"), 1);
                    break;
                }
            }
        }
    }
}

/// Every 30 s, four protocol violations; each outcome is counted ("accepted" is the gap).
async fn protocol(soak: Arc<Soak>) {
    let wait = Duration::from_secs(3);
    let mut k = 0;
    while !soak.over() {
        k += 1;
        // CONNECT with the reserved flag bit set: must be closed.
        let id = format!("soak-proto-flag-{k}");
        let c = Connect {
            reserved_flag: true,
            ..Connect::v311(&id)
        };
        let (_, o) = wire::open(src(18), soak.edge, &c, wait).await;
        soak.tally
            .add(format!("protocol.connect_reserved_flag: {}", o.name()), 1);
        // SUBSCRIBE with reserved option bits (3.1.1: bits 2-7 must be 0), and a filter with '#'
        // not at the end.
        for (probe, filter, opts) in [
            ("subscribe_reserved_bits", "soak/proto/x", 0x04u8),
            ("filter a/#/b", "a/#/b", 0),
        ] {
            let id = format!("soak-proto-sub-{k}");
            let outcome = match wire::open(src(18), soak.edge, &Connect::v311(&id), wait).await {
                (Some(mut s), _) => {
                    let pkt = wire::subscribe(1, &[(filter.to_string(), opts)], false);
                    let r = match s.write_all(&pkt).await {
                        Ok(()) => wire::expect(&mut s, wire::SUBACK, wait).await,
                        Err(_) => Err("closed".into()),
                    };
                    let _ = s.write_all(&wire::DISCONNECT).await;
                    match r {
                        Ok(body) => match body.get(2) {
                            Some(c) if *c < 0x80 => "suback_granted".to_string(),
                            Some(c) => format!("suback_{c:#04x}"),
                            None => "suback_empty".to_string(),
                        },
                        Err(e) => e,
                    }
                }
                (None, c) => c.name(),
            };
            soak.tally.add(format!("protocol.{probe}: {outcome}"), 1);
        }
        // An MQTT 3.1 client: should get CONNACK 0x01 (unacceptable protocol version).
        let id = format!("soak-proto-31-{k}");
        let c = Connect {
            version: wire::Version::V31,
            ..Connect::v311(&id)
        };
        let (_, o) = wire::open(src(18), soak.edge, &c, wait).await;
        soak.tally
            .add(format!("protocol.mqisdp_connect: {}", o.name()), 1);
        sleep_or_end(&soak, Duration::from_secs(30)).await;
    }
}

/// Every 2 s, a new client from the sensors' address: can it connect, and how fast.
async fn canary(soak: Arc<Soak>) {
    let mut k = 0;
    let mut lat = Vec::new();
    loop {
        k += 1;
        let id = format!("soak-canary-{}-{k}", soak.run);
        let t = Instant::now();
        let (s, o) = wire::open(
            None,
            soak.edge,
            &Connect::v311(&id),
            Duration::from_secs(10),
        )
        .await;
        if let Some(mut s) = s {
            let _ = s.write_all(&wire::DISCONNECT).await;
            lat.push(t.elapsed().as_micros() as u64);
            lat.sort_unstable();
            soak.tally.add("canary.connected", 1);
            soak.tally
                .max("canary.connect_ms_max", t.elapsed().as_millis() as u64);
            soak.tally
                .set("canary.connect_ms_p99", percentile_ms(&lat, 0.99) as u64);
        } else {
            soak.tally.add(format!("canary.failed: {}", o.name()), 1);
            println!(
                "  {:>4}s  canary could not connect: {}",
                soak.secs(),
                o.name()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The upstream broker goes away at `at` s for `len` s.
async fn upstream_outage(soak: &Soak, at: u64, len: u64, stop: &str, start: &str) {
    tokio::time::sleep_until((soak.t0 + Duration::from_secs(at)).into()).await;
    soak.upstream_up.store(false, Ordering::SeqCst);
    println!(
        "  {:>4}s  upstream outage: stopping the upstream broker",
        soak.secs()
    );
    shell(soak, "outage.stop", stop).await;
    tokio::time::sleep_until((soak.t0 + Duration::from_secs(at + len)).into()).await;
    shell(soak, "outage.start", start).await;
    soak.upstream_up.store(true, Ordering::SeqCst);
    println!(
        "  {:>4}s  upstream outage: upstream broker started again",
        soak.secs()
    );
}

async fn shell(soak: &Soak, name: &str, cmd: &str) {
    let command = cmd.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .status()
            .is_ok_and(|s| s.success())
    })
    .await
    .unwrap_or(false);
    if !ok {
        soak.tally.add(format!("{name}.command_failed"), 1);
        println!("  {name}: `{cmd}` failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling and the report

struct Sample {
    t: f64,
    /// `None`: /healthz did not answer.
    healthy: Option<bool>,
    /// The /healthz body.
    reasons: String,
    upstream_up: bool,
    /// Honest readings that reached the cloud for the first time in this second.
    delivered: u64,
    /// Honest readings PUBACKed and not (yet) at the cloud.
    pending: u64,
    /// Events in the gateway's queue (edgegate_queue_depth); `None`: /metrics did not answer.
    queued: Option<u64>,
    /// Honest readings PUBACKed in this second.
    acked: u64,
    /// The sensors were publishing.
    publishing: bool,
}

/// GET `path` from `addr` (2 s at most): (status, body).
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let get = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

/// (VmRSS, VmHWM) of `pid` in kB; `None` once the process is gone.
fn proc_status_kb(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Delivery could flow (the upstream is up, the gateway holds events) and no reading arrived.
fn stalled_sample(s: &Sample) -> bool {
    s.upstream_up && s.delivered == 0 && s.queued.is_some_and(|q| q > 0)
}

/// The value of the unlabelled metric `name`.
fn metric_value(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(' ')?;
        v.trim().parse::<f64>().ok().map(|f| f as u64)
    })
}

/// `{reason: count}` of the Prometheus counter family `name` (labelled by `reason`).
fn by_reason(metrics: &str, name: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((reason.to_string(), v as u64))
        })
        .collect()
}

struct Report {
    json: serde_json::Value,
    text: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        a: &SoakArgs,
        soak: &Soak,
        sensors: &[Arc<Sensor>],
        cloud: &Cloud,
        samples: &[Sample],
        outage: Option<(u64, u64)>,
        (rss_max, hwm): (u64, u64),
        metrics: Option<(u16, String)>,
    ) -> Report {
        let mut text = Vec::new();
        let acked: u64 = sensors.iter().map(|s| acked_len(s)).sum();
        let sent: u64 = sensors.iter().map(|s| s.sent.load(Ordering::Relaxed)).sum();
        let unique = cloud.unique.load(Ordering::Relaxed);
        let duplicates = cloud.duplicates.load(Ordering::Relaxed);
        let mut lost_total = 0u64;
        let mut lost = serde_json::Map::new();
        for (p, s) in sensors.iter().enumerate() {
            let m = missing(s, cloud, p);
            lost_total += m.len() as u64;
            if !m.is_empty() {
                let gaps = ranges(&m, 20);
                text.push(format!(
                    "    sensor {p}: {} missing, sequences {}{}",
                    m.len(),
                    gaps.join(" "),
                    if gaps.len() == 20 { " ..." } else { "" }
                ));
                lost.insert(
                    p.to_string(),
                    serde_json::json!({"count": m.len(), "gaps": gaps}),
                );
            }
        }
        let reconnects: u64 = sensors
            .iter()
            .map(|s| s.reconnects.load(Ordering::Relaxed))
            .sum();
        let connect_failures: u64 = sensors
            .iter()
            .map(|s| s.connect_failures.load(Ordering::Relaxed))
            .sum();
        let mut lat = cloud
            .latency_us
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        lat.sort_unstable();

        // /healthz against what delivery could do.
        let flowing: Vec<&Sample> = samples.iter().filter(|s| s.delivered > 0).collect();
        let outage_samples: Vec<&Sample> = samples.iter().filter(|s| !s.upstream_up).collect();
        let stalled: Vec<&Sample> = samples.iter().filter(|s| stalled_sample(s)).collect();
        let frac = |v: &[&Sample], want: bool| -> Option<f64> {
            (!v.is_empty()).then(|| {
                v.iter().filter(|s| s.healthy == Some(want)).count() as f64 / v.len() as f64
            })
        };
        let queue_max = samples.iter().filter_map(|s| s.queued).max().unwrap_or(0);
        let queue_end = samples.last().and_then(|s| s.queued);
        let no_answer = samples.iter().filter(|s| s.healthy.is_none()).count();
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.healthy == Some(false)) {
            let r = serde_json::from_str::<serde_json::Value>(&s.reasons)
                .ok()
                .and_then(|v| v["reasons"].as_array().cloned())
                .unwrap_or_default();
            for r in r {
                // Reasons may carry numbers; keep the first few words as the key.
                let key: String = r
                    .as_str()
                    .unwrap_or("?")
                    .split_whitespace()
                    .take(6)
                    .collect::<Vec<_>>()
                    .join(" ");
                *reasons.entry(key).or_default() += 1;
            }
        }
        // Seconds in which the sensors, publishing, got no PUBACK at all (held back).
        let held: Vec<bool> = samples
            .iter()
            .skip(1)
            .map(|s| s.publishing && s.acked == 0)
            .collect();
        let held_secs = held.iter().filter(|h| **h).count();
        let longest_held = held.split(|h| !*h).map(|run| run.len()).max().unwrap_or(0);
        // Longest run of stalled seconds.
        let mut longest_stall = 0u64;
        let mut cur = 0u64;
        for s in samples {
            if stalled_sample(s) {
                cur += 1;
                longest_stall = longest_stall.max(cur);
            } else {
                cur = 0;
            }
        }

        let (dropped, rejected) = match &metrics {
            Some((200, body)) => (
                by_reason(body, "edgegate_events_dropped_total"),
                by_reason(body, "edgegate_broker_rejected_total"),
            ),
            _ => (BTreeMap::new(), BTreeMap::new()),
        };
        let tally = soak.tally.snapshot();
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |f| format!("{:.1} %", f * 100.0));

        let mut head = vec![
            format!(
                "soak {} ({} s, {} sensors at {}/s, attacks {})",
                soak.run,
                a.duration.as_secs(),
                a.sensors,
                a.rate,
                a.attacks
            ),
            format!("  honest readings       sent {sent} (with resends), PUBACKed {acked}, unique at the cloud {unique}, duplicates {duplicates}"),
            format!("  PUBACKed, never at the cloud: {lost_total}   (must be 0)"),
        ];
        head.append(&mut text);
        let mut text = head;
        let offered = a.rate * a.duration.as_secs();
        text.push(format!(
            "  sensors               PUBACKed {:.0} % of the {offered} readings offered; {held_secs} s without any PUBACK while publishing (longest {longest_held} s); reconnects {reconnects}, failed connects {connect_failures}",
            acked as f64 * 100.0 / offered.max(1) as f64
        ));
        text.push(format!(
            "  latency ms            p50 {:.1}  p99 {:.1}  max {:.1}",
            percentile_ms(&lat, 0.5),
            percentile_ms(&lat, 0.99),
            percentile_ms(&lat, 1.0)
        ));
        text.push(format!(
            "  gateway memory        peak RSS {} MB (VmHWM {} MB){}",
            rss_max / 1024,
            hwm / 1024,
            if a.pid.is_none() { " (no --pid)" } else { "" }
        ));
        text.push(format!(
            "  gateway queue         at most {queue_max} events, {} at the end",
            queue_end.map_or("?".to_string(), |q| q.to_string())
        ));
        text.push(format!(
            "  /healthz              healthy while delivery flowed: {} of {} s; unhealthy during the outage: {} of {} s{}",
            pct(frac(&flowing, true)),
            flowing.len(),
            pct(frac(&outage_samples, false)),
            outage_samples.len(),
            outage.map_or(String::new(), |(s, e)| format!(" ({s}-{e} s)")),
        ));
        text.push(format!(
            "                        stalled (upstream up, events queued, no reading delivered): {} s, longest {} s, unhealthy {}; no answer {} s",
            stalled.len(),
            longest_stall,
            pct(frac(&stalled, false)),
            no_answer
        ));
        for (r, n) in &reasons {
            text.push(format!(
                "                        unhealthy reason {r:?}: {n} s"
            ));
        }
        text.push("  events dropped (edgegate_events_dropped_total)".into());
        for (r, n) in &dropped {
            text.push(format!("    {r:<28} {n}"));
        }
        text.push("  broker refused (edgegate_broker_rejected_total)".into());
        for (r, n) in &rejected {
            text.push(format!("    {r:<28} {n}"));
        }
        if metrics.is_none() {
            text.push("    (/metrics did not answer)".into());
        }
        text.push("  attacks (outcome: count)".into());
        for (k, v) in &tally {
            text.push(format!("    {k:<58} {v}"));
        }
        let json = serde_json::json!({
            "run": soak.run, "duration_s": a.duration.as_secs(), "sensors": a.sensors, "rate": a.rate,
            "attacks": a.attacks,
            "sent": sent, "acked": acked, "unique_at_cloud": unique, "duplicates": duplicates,
            "acked_never_at_cloud": lost_total, "lost_by_sensor": lost,
            "offered": offered, "held_back_s": held_secs, "longest_held_back_s": longest_held,
            "sensor_reconnects": reconnects, "sensor_connect_failures": connect_failures,
            "latency_p50_ms": percentile_ms(&lat, 0.5), "latency_p99_ms": percentile_ms(&lat, 0.99),
            "latency_max_ms": percentile_ms(&lat, 1.0),
            "queue_depth_max": queue_max, "queue_depth_end": queue_end,
            "rss_peak_kb": rss_max, "vm_hwm_kb": hwm,
            "healthz": {
                "flowing_s": flowing.len(), "healthy_while_flowing": frac(&flowing, true),
                "outage": outage, "outage_s": outage_samples.len(),
                "unhealthy_during_outage": frac(&outage_samples, false),
                "stalled_s": stalled.len(), "longest_stall_s": longest_stall,
                "unhealthy_while_stalled": frac(&stalled, false),
                "no_answer_s": no_answer, "unhealthy_reasons": reasons,
                "sample_fields": ["t_s", "healthy", "upstream_up", "delivered", "acked_not_at_cloud", "gateway_queue_depth", "acked"],
                "samples": samples.iter().map(|s| serde_json::json!([
                    (s.t * 10.0).round() / 10.0, s.healthy, s.upstream_up, s.delivered, s.pending, s.queued, s.acked
                ])).collect::<Vec<_>>(),
            },
            "events_dropped": dropped, "broker_rejected": rejected, "attack_outcomes": tally,
        });
        Report { json, text }
    }

    fn print(&self) {
        for l in &self.text {
            println!("{l}");
        }
    }
}
