//! edgegate's benchmark tool (not a test: it measures and prints, it asserts nothing).
//!
//!   edgegate-bench queue  [--events N] [--sync normal|full]
//!       commit throughput of the queue writer and bytes written to disk per event
//!   edgegate-bench drain  --upstream mqtt://127.0.0.1:PORT [--events N] [--live RATE]
//!                         [--batch EVENTS] [--inflight EVENTS]
//!       drain rate of an N-event backlog into an upstream broker, with live traffic beside it
//!   edgegate-bench load   --edge HOST:PORT --cloud HOST:PORT [--publishers 4] [--rate R]
//!                         [--seconds S] [--json FILE]
//!       sensors publish QoS 1 JSON readings (~100 B) to an edge broker (edgegate or a Mosquitto
//!       bridge); a cloud subscriber counts unique, duplicate and lost readings and end-to-end
//!       latency. Prints a table and writes JSON.
//!   edgegate-bench floor  --listen HOST:PORT [--no-link]
//!       rumqttd alone, with the gateway's router settings and one in-process link that takes
//!       every publish and does nothing with it (what ingest's link costs, without ingest): the
//!       cost of the broker the gateway is built on, before anything of the gateway's own.
//!       Runs until killed; measure it with `load --pid`.
//!   edgegate-bench soak   --edge HOST:PORT [--edge-v5 HOST:PORT] --cloud HOST:PORT
//!                         --metrics HOST:PORT [--pid PID] [--duration 10m] [--json FILE] ...
//!       every attack of issue 12 at once beside 4 honest sensors (1,000 QoS 1 readings/s), with
//!       an upstream outage: readings PUBACKed but lost, peak RSS, /healthz against delivery,
//!       drops and refusals by reason (edgegate-bench/soak.rs; bench/soak.sh runs it).
//!
//! Every figure in the README's benchmark section comes from these commands (see
//! bench/run.sh for the side-by-side runs).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use edgegate::config::{parse_upstream_url, Config, SyncMode};
use edgegate::core::event::{new_id, Class, Data, Event, TYPE_READING};
use edgegate::core::metrics::Metrics;
use edgegate::queue::{self, Store};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

mod soak;
mod wire;

#[derive(Parser)]
#[command(name = "edgegate-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Queue commit throughput and bytes written per event.
    Queue {
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value = "normal")]
        sync: String,
        /// Where the queue file goes (default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Drain of a backlog into an upstream broker, with live readings published meanwhile.
    Drain {
        #[arg(long)]
        upstream: String,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Live readings per second published to the gateway during the drain.
        #[arg(long, default_value_t = 1000)]
        live: u64,
        /// upstream.batch_events (1: one event per message).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// upstream.inflight (events awaiting PUBACK).
        #[arg(long, default_value_t = 1024)]
        inflight: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Sensors -> edge broker -> cloud broker -> subscriber.
    Load(LoadArgs),
    /// rumqttd alone (the gateway's router settings, no guard), with one counting link.
    Floor {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// No link: rumqttd with nobody subscribed.
        #[arg(long)]
        no_link: bool,
    },
    /// Every attack of issue 12 at once, beside honest sensors and an upstream outage.
    Soak(soak::SoakArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    edgegate::init_crypto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Queue { events, sync, dir } => rt.block_on(bench_queue(events, &sync, dir)),
        Cmd::Drain {
            upstream,
            events,
            live,
            batch,
            inflight,
            json,
        } => rt.block_on(bench_drain(&upstream, events, live, batch, inflight, json)),
        Cmd::Load(args) => rt.block_on(bench_load(args)),
        Cmd::Floor { listen, no_link } => rt.block_on(bench_floor(listen, no_link)),
        Cmd::Soak(args) => rt.block_on(soak::run(args)),
    }
}

/// `floor`: rumqttd with the settings the gateway gives it, a plain listener (no guard) and, unless
/// `no_link`, one in-process link subscribed to `#` like ingest's, which only counts.
async fn bench_floor(listen: std::net::SocketAddr, no_link: bool) -> anyhow::Result<()> {
    use rumqttd::{local::LinkBuilder, protocol::v4::V4, LinkType, Notification, Server};
    let cfg = Config::defaults();
    let (router_cfg, connections) = edgegate::broker::rumqttd_settings(&cfg.broker);
    let router_tx = rumqttd::Router::new(0, router_cfg).spawn();
    let (mut link_tx, mut link_rx, _) = LinkBuilder::new("floor", router_tx.clone())
        .clean_session(true)
        .dynamic_filters(true)
        .build()?;
    if !no_link {
        link_tx.subscribe("#")?;
    }
    let server = rumqttd::ServerSettings {
        name: "floor".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let server = tokio::spawn(async move {
        Server::new(server, router_tx, V4)
            .start(LinkType::Remote)
            .await
    });
    println!("rumqttd listening on {listen} (link: {})", !no_link);
    let mut taken = 0u64;
    loop {
        tokio::select! {
            n = link_rx.next() => match n? {
                Some(Notification::Forward(_)) => taken += 1,
                Some(Notification::Unschedule) => link_rx.wake().await?,
                _ => {}
            },
            r = tokio::signal::ctrl_c() => {
                r?;
                break;
            }
        }
    }
    server.abort();
    println!("link took {taken} publishes");
    Ok(())
}

/// Bytes this process has caused to be written to storage (/proc/self/io `write_bytes`).
fn disk_write_bytes() -> u64 {
    io_write_bytes("/proc/self/io")
}

/// `write_bytes` of a /proc/*/io file (0 when unreadable).
fn io_write_bytes(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("write_bytes: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn reading(i: u64) -> Event {
    let payload = format!(
        r#"{{"sensor":"s{:03}","seq":{i},"value":{:.3},"unit":"C","ts":{}}}"#,
        i % 1000,
        20.0 + (i % 97) as f64 / 10.0,
        now_us()
    );
    Event {
        id: new_id(),
        class: Class::Telemetry,
        kind: TYPE_READING,
        subject: format!("sensors/s{:03}/temp", i % 1000),
        upstream_topic: format!("edge/bench/sensors/s{:03}/temp", i % 1000),
        time: SystemTime::now(),
        data: Data::Json(Bytes::from(payload)),
        traceparent: None,
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn bench_queue(events: u64, sync: &str, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp = tempfile_dir(dir)?;
    let mut cfg = Config::defaults().queue;
    cfg.sync = if sync == "full" {
        SyncMode::Full
    } else {
        SyncMode::Normal
    };
    cfg.max_bytes = 0;
    let path = tmp.join("queue.db");
    let (store, _) = Store::open(&path, cfg.sync, queue::limits(&cfg))?;
    let metrics = Metrics::new();
    let (handle, writer) = queue::start(
        store,
        &cfg,
        path.clone(),
        "edgegate://bench".into(),
        4096,
        0,
        metrics.clone(),
    )?;
    let prepared: Vec<Event> = (0..events).map(reading).collect();
    let payload_bytes: usize = prepared
        .iter()
        .map(|e| match &e.data {
            Data::Json(b) | Data::Binary(b) => b.len(),
        })
        .sum();
    let written0 = disk_write_bytes();
    let t0 = Instant::now();
    for e in prepared {
        handle.append(e).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut committed = handle.committed();
    while metrics.events_committed.get() < events {
        let _ = tokio::time::timeout(Duration::from_millis(100), committed.changed()).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(committed);
    drop(handle);
    tokio::task::spawn_blocking(move || writer.join()).await?;
    let written = disk_write_bytes().saturating_sub(written0);
    let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let commits = metrics.commits.get();
    println!(
        "queue commit benchmark ({sync} sync, {events} events of ~{} B payload)",
        payload_bytes as u64 / events.max(1)
    );
    println!(
        "  throughput            {:>10.0} events/s",
        events as f64 / secs
    );
    println!(
        "  commit groups         {:>10} ({:.0} events per commit)",
        commits,
        events as f64 / commits.max(1) as f64
    );
    println!(
        "  written to disk       {:>10.0} bytes/event (incl. WAL and checkpoint; file {} bytes)",
        written as f64 / events as f64,
        file
    );
    println!(
        "  write amplification   {:>10.2} x the payload",
        written as f64 / payload_bytes.max(1) as f64
    );
    Ok(())
}

fn tempfile_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let d = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("edgegate-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

async fn bench_drain(
    upstream: &str,
    events: u64,
    live: u64,
    batch: usize,
    inflight: usize,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = tempfile_dir(None)?;
    let mut cfg = Config::defaults();
    cfg.gateway.id = "bench".into();
    cfg.gateway.data_dir = dir.clone();
    cfg.broker.listen = "127.0.0.1:0".parse()?;
    cfg.metrics.listen = None;
    cfg.queue.max_bytes = 0;
    cfg.upstream.topic_prefix = "edge/bench".into();
    cfg.upstream.batch_topic = "edge/bench/batch".into();
    cfg.upstream.batch_events = batch.max(1);
    cfg.upstream.inflight = inflight.max(1);
    cfg.rules = vec![edgegate::config::RuleConfig::simple(
        "all",
        "#",
        edgegate::config::RuleAction::Forward,
    )];
    // 1. The backlog, written straight into the queue file.
    {
        let (mut store, _) =
            Store::open(&cfg.queue_path(), cfg.queue.sync, queue::limits(&cfg.queue))?;
        let mut i = 0;
        while i < events {
            let mut t = store.begin()?;
            for _ in 0..10_000.min(events - i) {
                t.append(&reading(i), "edgegate://bench")?;
                i += 1;
            }
            t.commit()?;
        }
        println!(
            "backlog of {events} events written ({} MB)",
            store.bytes() / 1_000_000
        );
    }
    // 2. The gateway with the upstream, and a live sensor.
    cfg.upstream.url = Some(parse_upstream_url(upstream).map_err(anyhow::Error::msg)?);
    let rss0 = rss_kb(std::process::id());
    let gw = edgegate::Gateway::start(cfg).await?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    let sensor = {
        let addr = gw.broker_addr;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut opts = MqttOptions::new("bench-live", addr.ip().to_string(), addr.port());
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut el) = AsyncClient::new(opts, 1000);
            tokio::spawn(async move { while el.poll().await.is_ok() {} });
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / live.max(1)));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && live > 0 {
                tick.tick().await;
                n += 1;
                let p = format!(r#"{{"live":{n},"ts":{}}}"#, now_us());
                if client
                    .publish("sensors/live/v", QoS::AtLeastOnce, false, p)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            n
        })
    };
    // Live latency: a cloud subscriber on the live topic only.
    let cloud = parse_upstream_url(upstream).map_err(anyhow::Error::msg)?;
    let sub = {
        let lat = lat.clone();
        let mut opts = MqttOptions::new(
            format!("bench-drain-sub-{}", std::process::id()),
            cloud.host.clone(),
            cloud.port,
        );
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        client
            .subscribe("edge/bench/sensors/live/#", QoS::AtLeastOnce)
            .await?;
        client
            .subscribe("edge/bench/batch", QoS::AtLeastOnce)
            .await?;
        tokio::spawn(async move {
            let _c = client;
            while let Ok(ev) = el.poll().await {
                if let MqttEvent::Incoming(Packet::Publish(p)) = ev {
                    let now = now_us();
                    let envelopes =
                        edgegate::commands::consumer::envelopes(&p.payload).unwrap_or_default();
                    for v in envelopes {
                        if v["subject"] != "sensors/live/v" {
                            continue;
                        }
                        if let (Some(ts), Ok(mut l)) = (v["data"]["ts"].as_u64(), lat.lock()) {
                            l.push(now.saturating_sub(ts));
                        }
                    }
                }
            }
        })
    };
    let mut peak_rss = 0;
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_rss = peak_rss.max(rss_kb(std::process::id()));
        let forwarded = gw.metrics().events_forwarded.get();
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "  {:>6.1}s  forwarded {forwarded}",
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if forwarded >= events || t0.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let live_sent = sensor.await.unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    sub.abort();
    let forwarded = gw.metrics().events_forwarded.get();
    gw.shutdown().await;
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let pct = |q: f64| percentile_ms(&l, q);
    println!("drain of {events} events with {live} live readings/s beside it (batch_events {batch}, inflight {inflight})");
    println!(
        "  drain rate            {:>10.0} events/s ({:.1} s)",
        events as f64 / secs,
        secs
    );
    println!(
        "  forwarded in all      {:>10} (live sent {live_sent})",
        forwarded
    );
    println!(
        "  live latency ms       p50 {:.2}  p99 {:.2}  max {:.2}  ({} samples)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        l.len()
    );
    println!(
        "  RSS                   {} kB at start, {} kB peak",
        rss0, peak_rss
    );
    if let Some(p) = json {
        let v = serde_json::json!({"events": events, "batch_events": batch, "inflight": inflight, "seconds": secs, "drain_rate": events as f64 / secs,
            "live_rate": live, "live_p50_ms": pct(0.5), "live_p99_ms": pct(0.99), "live_max_ms": pct(1.0), "rss_peak_kb": peak_rss});
        std::fs::write(p, serde_json::to_vec_pretty(&v)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The `q` quantile of sorted latencies in µs, in ms (0 without samples).
fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    let i = ((sorted_us.len() as f64 * q) as usize).min(sorted_us.len().saturating_sub(1));
    sorted_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
}

/// Resident set size of `pid` in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// `load`: sensors -> edge broker -> cloud broker -> subscriber.
#[derive(clap::Args)]
struct LoadArgs {
    #[arg(long)]
    edge: String,
    #[arg(long)]
    cloud: String,
    /// Topic filter the cloud subscriber uses.
    #[arg(long, default_value = "edge/#")]
    filter: String,
    #[arg(long, default_value_t = 4)]
    publishers: u32,
    /// Each publisher's in-flight window: QoS 1 publishes sent and not yet acknowledged
    /// (rumqttc's default is 100). edgegate acknowledges on commit, so at full speed this
    /// window, not the CPU, can set the pace (see the README's benchmark section).
    #[arg(long, default_value_t = 100)]
    window: u16,
    /// Total readings per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Extra seconds to wait for stragglers after publishing ends.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// PID of the edge process, to sample its RSS, CPU and disk writes.
    #[arg(long)]
    pid: Option<u32>,
    /// Run a TCP relay LISTEN:TARGET (ports on 127.0.0.1) for the edge's upstream link, so
    /// the outage below can cut it.
    #[arg(long)]
    relay: Option<String>,
    /// Cut the relayed link this many seconds into the run...
    #[arg(long)]
    outage_start: Option<u64>,
    /// ...for this many seconds.
    #[arg(long, default_value_t = 0)]
    outage_secs: u64,
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Bytes `pid` has caused to be written to storage.
fn pid_write_bytes(pid: u32) -> u64 {
    io_write_bytes(&format!("/proc/{pid}/io"))
}

/// A relay on 127.0.0.1:`listen` to 127.0.0.1:`target` that can be cut (refuses and drops
/// connections while `up` is false).
async fn relay(
    listen: u16,
    target: u16,
    up: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !up.load(Ordering::SeqCst) {
                continue;
            }
            let up = up.clone();
            tokio::spawn(async move {
                let _ = inbound.set_nodelay(true);
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let _ = outbound.set_nodelay(true);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = async { while up.load(Ordering::SeqCst) { tokio::time::sleep(Duration::from_millis(20)).await } } => {}
                }
            });
        }
    }))
}

fn host_port(s: &str) -> anyhow::Result<(String, u16)> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("{s}: expected host:port"))?;
    Ok((h.to_string(), p.parse()?))
}

async fn bench_load(a: LoadArgs) -> anyhow::Result<()> {
    let (edge_host, edge_port) = host_port(&a.edge)?;
    let (cloud_host, cloud_port) = host_port(&a.cloud)?;
    let run = format!("{:x}", now_us());
    let link_up = Arc::new(AtomicBool::new(true));
    let _relay = match &a.relay {
        Some(r) => {
            let (l, t) = r
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--relay LISTEN:TARGET"))?;
            Some(relay(l.parse()?, t.parse()?, link_up.clone()).await?)
        }
        None => None,
    };
    // The cloud subscriber: unique / duplicate by (publisher, n); latency from the payload.
    let seen: Arc<Mutex<HashSet<(u32, u64)>>> = Arc::new(Mutex::new(HashSet::new()));
    let dups = Arc::new(AtomicU64::new(0));
    let window: Arc<Mutex<(u64, u64)>> = Arc::new(Mutex::new((0, 0)));
    let lat: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let sub_task = {
        let window = window.clone();
        let (seen, dups, lat, run) = (seen.clone(), dups.clone(), lat.clone(), run.clone());
        cloud_subscriber(
            (cloud_host, cloud_port),
            format!("bench-cloud-{run}"),
            a.filter.clone(),
            false,
            move |payload, now| {
                for (run_id, publisher, n, ts) in parse_readings(payload) {
                    if run_id != run {
                        continue;
                    }
                    let new = seen
                        .lock()
                        .map(|mut s| s.insert((publisher, n)))
                        .unwrap_or(false);
                    if new {
                        if let Ok(mut l) = lat.lock() {
                            l.push(now.saturating_sub(ts));
                        }
                        // First and last arrival (µs), for the delivered rate.
                        if let Ok(mut w) = window.lock() {
                            w.0 = if w.0 == 0 { now } else { w.0.min(now) };
                            w.1 = w.1.max(now);
                        }
                    } else {
                        dups.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        )
        .await?
    };
    // Publishers.
    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let per_pub_rate = if a.rate == 0 {
        0
    } else {
        (a.rate / a.publishers as u64).max(1)
    };
    let mut pubs = Vec::new();
    let in_flight = a.window.max(1);
    for p in 0..a.publishers {
        let (edge_host, acked, sent, stop, run) = (
            edge_host.clone(),
            acked.clone(),
            sent.clone(),
            stop.clone(),
            run.clone(),
        );
        pubs.push(tokio::spawn(async move {
            let mut opts =
                MqttOptions::new(format!("bench-sensor-{run}-{p}"), edge_host, edge_port);
            opts.set_keep_alive(Duration::from_secs(60))
                .set_inflight(in_flight);
            let (client, mut el) = AsyncClient::new(opts, 1000);
            let acks = acked.clone();
            let poller = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
            let mut tick = (per_pub_rate > 0)
                .then(|| tokio::time::interval(Duration::from_nanos(1_000_000_000 / per_pub_rate)));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                n += 1;
                // ~100 bytes of JSON.
                let payload = format!(
                    r#"{{"run":"{run}","p":{p},"n":{n},"ts":{},"value":{:.3},"unit":"C"}}"#,
                    now_us(),
                    20.0 + (n % 50) as f64 / 10.0
                );
                if client
                    .publish(
                        format!("sensors/bench{p}/temp"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            poller.abort();
        }));
    }
    // Sample the edge process while publishing.
    let t0 = Instant::now();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let (cpu0, mut rss_max, mut rss_sum, mut rss_n) =
        (a.pid.map(cpu_ticks).unwrap_or(0), 0u64, 0u64, 0u64);
    let written0 = a.pid.map(pid_write_bytes).unwrap_or(0);
    let mut outage_rss_max = 0u64;
    let mut outage_end: Option<Instant> = None;
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some((start, len)) = a.outage_start.map(|s| (s, a.outage_secs)) {
            let t = t0.elapsed().as_secs();
            let down = t >= start && t < start + len;
            if down && link_up.swap(false, Ordering::SeqCst) {
                println!("  outage: link down at {t} s");
            }
            if !down && t >= start + len && !link_up.swap(true, Ordering::SeqCst) {
                println!("  outage: link up at {t} s");
                outage_end = Some(Instant::now());
            }
            if down {
                if let Some(pid) = a.pid {
                    outage_rss_max = outage_rss_max.max(rss_kb(pid));
                }
            }
        }
        if let Some(pid) = a.pid {
            let r = rss_kb(pid);
            rss_max = rss_max.max(r);
            rss_sum += r;
            rss_n += 1;
        }
    }
    let cpu_pct = a.pid.map(|pid| {
        (cpu_ticks(pid) - cpu0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0
    });
    stop.store(true, Ordering::Relaxed);
    let publish_secs = t0.elapsed().as_secs_f64();
    for p in pubs {
        let _ = p.await;
    }
    let sent_n = sent.load(Ordering::Relaxed);
    let acked_n = acked.load(Ordering::Relaxed);
    let written = a
        .pid
        .map(pid_write_bytes)
        .unwrap_or(0)
        .saturating_sub(written0);
    // Wait for stragglers: until everything acknowledged by the edge arrived, or `settle`
    // seconds (a bridge may take a while to reconnect: no early exit on a quiet spell).
    let settle_end = Instant::now() + Duration::from_secs(a.settle);
    let mut last_arrival = Instant::now();
    let mut last = 0;
    while Instant::now() < settle_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = seen.lock().map(|s| s.len()).unwrap_or(0);
        if n != last {
            last = n;
            last_arrival = Instant::now();
        }
        if n as u64 >= acked_n {
            break;
        }
    }
    let delivered_at = t0.elapsed().as_secs_f64();
    // Time from the link's return to the last arrival.
    let drain_secs = outage_end.map(|e| last_arrival.saturating_duration_since(e).as_secs_f64());
    sub_task.abort();
    let unique = seen.lock().map(|s| s.len()).unwrap_or(0) as u64;
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let pct = |q: f64| percentile_ms(&l, q);
    // Delivered rate: unique events over the time from the first to the last arrival.
    let (first, last) = window.lock().map(|w| *w).unwrap_or((0, 0));
    let span = ((last.saturating_sub(first)) as f64 / 1e6)
        .max(publish_secs.min(delivered_at) * 0.1)
        .max(1e-3);
    let throughput = unique as f64 / span;
    let lost = acked_n.saturating_sub(unique);
    println!(
        "load {} ({} publishers, {} for {} s)",
        a.label,
        a.publishers,
        if a.rate == 0 {
            "max rate".into()
        } else {
            format!("{}/s", a.rate)
        },
        a.seconds
    );
    // "missing": acknowledged by the edge, not at the cloud by the end of the settle time (lost,
    // or still queued at the edge: the edge's own drop counters tell which).
    println!("  sent {sent_n}, acked by edge {acked_n}, unique at cloud {unique}, duplicates {}, missing at the end {lost}", dups.load(Ordering::Relaxed));
    println!("  delivered             {:>10.0} events/s", throughput);
    println!(
        "  latency ms            p50 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    if let Some(c) = cpu_pct {
        println!("  edge CPU              {:>10.1} % of one core", c);
        println!(
            "  edge RSS              {:>10} kB max, {} kB mean",
            rss_max,
            rss_sum / rss_n.max(1)
        );
    }
    if let Some(p) = a.json {
        let v = serde_json::json!({
            "label": a.label, "publishers": a.publishers, "rate": a.rate, "seconds": a.seconds,
            "sent": sent_n, "acked": acked_n, "unique": unique, "duplicates": dups.load(Ordering::Relaxed), "lost": lost,
            "throughput": throughput, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "cpu_pct": cpu_pct, "rss_max_kb": rss_max, "rss_mean_kb": rss_sum / rss_n.max(1),
            "disk_bytes_per_event": written as f64 / acked_n.max(1) as f64,
            "outage_rss_max_kb": outage_rss_max, "drain_after_outage_s": drain_secs,
        });
        std::fs::write(p, serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}

/// A subscriber on the cloud broker at `host:port`: subscribes to `filter` at QoS 1 whenever it
/// connects without a session (with `persistent`, its session outlives a restart of a broker
/// with persistence, so nothing published meanwhile is missed), and hands each message's payload
/// with its arrival time (µs since the epoch) to `on_message`. Reconnects until aborted; returns
/// once the first SUBACK arrived.
async fn cloud_subscriber(
    (host, port): (String, u16),
    client_id: String,
    filter: String,
    persistent: bool,
    mut on_message: impl FnMut(&[u8], u64) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(1000)
        .set_clean_session(!persistent);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let subscribed = Arc::new(AtomicBool::new(false));
    let task = {
        let subscribed = subscribed.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                        let _ = client.try_subscribe(&filter, QoS::AtLeastOnce);
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        subscribed.store(true, Ordering::SeqCst)
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => on_message(&p.payload, now_us()),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    };
    let t0 = Instant::now();
    while !subscribed.load(Ordering::SeqCst) {
        if t0.elapsed() > Duration::from_secs(10) {
            task.abort();
            anyhow::bail!("the cloud subscriber got no SUBACK within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(task)
}

/// (run, publisher, n, ts) of each reading in a message: bare (Mosquitto bridge), in an
/// envelope, or in a CloudEvents batch of envelopes (edgegate with `upstream.batch_events`).
fn parse_readings(payload: &[u8]) -> Vec<(String, u32, u64, u64)> {
    let Ok(envelopes) = edgegate::commands::consumer::envelopes(payload) else {
        return Vec::new();
    };
    envelopes
        .iter()
        .filter_map(|v| {
            let d = if v.get("specversion").is_some() {
                v.get("data")?
            } else {
                v
            };
            Some((
                d["run"].as_str()?.to_string(),
                d["p"].as_u64()? as u32,
                d["n"].as_u64()?,
                d["ts"].as_u64()?,
            ))
        })
        .collect()
}
