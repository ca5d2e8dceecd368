//! Shared helpers: real Mosquitto brokers on free ports, the gateway in-process on port 0 with a
//! temp data dir, real MQTT clients as sensors and as the cloud consumer.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgegate::config::{parse_upstream_url, Config};
use edgegate::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// A free port for a process that needs a fixed one (Mosquitto, restarts on the same port).
/// Taken below the kernel's ephemeral range (32768+), so a port-0 listener of another test can
/// never be handed the same port between our probe and Mosquitto's bind; a process-wide
/// counter keeps tests of this binary apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 600) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 12000;
        let port = 20000 + (port - 20000) % 12000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into()))
        .with_test_writer()
        .try_init();
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A real Mosquitto (Debian package) playing the cloud broker.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    persistent: bool,
    /// Extra configuration lines (ACLs...).
    extra: String,
}

impl Mosquitto {
    fn launch(port: u16, persistent: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            persistent,
            extra: extra.to_string(),
        };
        m.restart();
        m
    }

    /// With extra configuration lines.
    pub fn start_with(extra: &str) -> Mosquitto {
        Self::launch(free_port(), false, extra)
    }

    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        Self::launch(port, false, "")
    }

    /// With persistence: sessions and queued messages survive [`Mosquitto::stop`] + restart.
    pub fn start_persistent() -> Mosquitto {
        Self::launch(free_port(), true, "")
    }

    /// SIGTERM (a persistent broker saves its sessions) and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// (Re)start the process on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            // As root Mosquitto would switch to user mosquitto, who cannot write our temp dir.
            format!(
                "persistence true\npersistence_location {}/\nuser root\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_string()
        };
        // Mosquitto wants `per_listener_settings` before any other setting.
        let (head, extra) = match self.extra.strip_prefix("per_listener_settings true\n") {
            Some(rest) => ("per_listener_settings true\n", rest),
            None => ("", self.extra.as_str()),
        };
        std::fs::write(
            &conf,
            format!(
                "{head}listener {} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n{persistence}{extra}\n",
                self.port
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "kill -{sig}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // A SIGSTOPped broker must be continued to die cleanly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.kill();
    }
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

/// A gateway configuration for tests: broker on port 0, data in `data_dir`, no metrics
/// endpoint, the given upstream.
pub fn test_config(data_dir: &Path, upstream: Option<&str>) -> Config {
    let mut c = Config::defaults();
    c.gateway.id = "gw1".into();
    c.gateway.data_dir = data_dir.to_path_buf();
    c.broker.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = None;
    c.upstream.topic_prefix = "edge/gw1".into();
    c.upstream.batch_topic = "edge/gw1/batch".into();
    c.upstream.url = upstream.map(|u| parse_upstream_url(u).expect("url"));
    c.upstream.reconnect_min = Duration::from_millis(50);
    c.upstream.reconnect_max = Duration::from_millis(500);
    // Plain forwarding: the shipped detectors would add alert events to exact counts.
    c.rules = vec![edgegate::config::RuleConfig::simple(
        "all",
        "#",
        edgegate::config::RuleAction::Forward,
    )];
    c
}

/// Run the `edgegate` binary with `args` and extra environment; its output, whatever the status.
pub fn edgegate_output(args: &[&str], env: &[(&str, &OsStr)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgegate"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run edgegate")
}

/// Like [`edgegate_output`], which must succeed; its stdout.
pub fn edgegate_ok(args: &[&str], env: &[(&str, &OsStr)]) -> String {
    let out = edgegate_output(args, env);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A test path as a CLI argument (temporary directories are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Run the `edgegate` binary's CLI (e.g. `queue export`) on the data dir `dir`; its stdout.
pub fn edgegate_cli(dir: &Path, args: &[&str]) -> String {
    edgegate_ok(args, &[("EDGEGATE__GATEWAY__DATA_DIR", dir.as_os_str())])
}

pub async fn start_gateway(config: Config) -> Gateway {
    init_logs();
    edgegate::init_crypto();
    Gateway::start(config).await.expect("gateway starts")
}

/// A sensor: a real MQTT client (rumqttc) connected to the gateway's broker.
pub struct Sensor {
    pub client: AsyncClient,
    acks: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sensor {
    pub async fn connect(addr: SocketAddr, id: &str) -> Sensor {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let acks = Arc::new(Mutex::new(0u64));
        let a = acks.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => *a.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Sensor { client, acks, task }
    }

    /// `n` sensors with client ids `{prefix}-0`, `{prefix}-1`...
    pub async fn connect_many(addr: SocketAddr, prefix: &str, n: usize) -> Vec<Sensor> {
        let mut sensors = Vec::with_capacity(n);
        for s in 0..n {
            sensors.push(Sensor::connect(addr, &format!("{prefix}-{s}")).await);
        }
        sensors
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish request");
    }

    /// PUBACKs received so far.
    pub fn acked(&self) -> u64 {
        *self.acks.lock().unwrap()
    }

    /// Wait until the broker acknowledged `n` publishes in all.
    pub async fn wait_acked(&self, n: u64) {
        let acks = self.acks.clone();
        assert!(
            eventually(Duration::from_secs(20), || *acks.lock().unwrap() >= n).await,
            "sensor got {} of {n} PUBACKs",
            *self.acks.lock().unwrap()
        );
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// (topic, payload) of every message received.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The cloud consumer: subscribes on the upstream broker and keeps every message.
pub struct Cloud {
    pub received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    pub async fn subscribe(port: u16, filter: &str) -> Cloud {
        Self::subscribe_with(port, filter, &format!("cloud-{}", free_port()), true).await
    }

    /// A consumer with a persistent session: what is published while it is away is kept for
    /// it by the broker (and by a persistent broker across restarts).
    /// A persistent cloud broker, already stopped, where this consumer's session (on `edge/#`)
    /// waits: whatever reaches the broker after [`Mosquitto::restart`] is kept for it.
    pub async fn on_a_stopped_broker(client_id: &str) -> (Mosquitto, Cloud) {
        let mut broker = Mosquitto::start_persistent();
        let cloud = Cloud::subscribe_persistent(broker.port, "edge/#", client_id).await;
        broker.stop();
        (broker, cloud)
    }

    pub async fn subscribe_persistent(port: u16, filter: &str, client_id: &str) -> Cloud {
        Self::subscribe_with(port, filter, client_id, false).await
    }

    async fn subscribe_with(port: u16, filter: &str, client_id: &str, clean: bool) -> Cloud {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_clean_session(clean);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut subacked = Some(subacked_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subacked.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        r.lock().unwrap().push((p.topic, p.payload.to_vec()))
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subacked_rx)
            .await
            .expect("SUBACK in time")
            .expect("SUBACK");
        Cloud { received, task }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<(String, Value)> {
        let r = self.received.clone();
        let ok = eventually(timeout, || r.lock().unwrap().len() >= n).await;
        let got = self.envelopes();
        assert!(ok, "cloud received {} of {n} events", got.len());
        got
    }

    /// Every event received so far, batches (JSON arrays) opened, with the topic of the message
    /// that carried it; and how many messages that was.
    pub fn events(&self) -> (Vec<(String, Value)>, usize) {
        let r = self.received.lock().unwrap();
        let mut out = Vec::new();
        for (t, p) in r.iter() {
            for e in edgegate::commands::consumer::envelopes(p).expect("an envelope or a batch") {
                out.push((t.clone(), e));
            }
        }
        (out, r.len())
    }

    /// Everything received so far, parsed as JSON.
    pub fn envelopes(&self) -> Vec<(String, Value)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(t, p)| {
                (
                    t.clone(),
                    serde_json::from_slice(p).expect("envelope is JSON"),
                )
            })
            .collect()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `sequence` of an envelope as a number.
/// The numeric `data` of each envelope.
pub fn values(got: &[(String, Value)]) -> Vec<f64> {
    got.iter()
        .map(|(_, v)| v["data"].as_f64().expect("numeric data"))
        .collect()
}

/// The sequence of each envelope.
pub fn seqs(got: &[(String, Value)]) -> Vec<u64> {
    got.iter().map(|(_, v)| seq(v)).collect()
}

pub fn seq(v: &Value) -> u64 {
    v["sequence"]
        .as_str()
        .expect("sequence is a string")
        .parse()
        .expect("sequence is numeric")
}

/// The real `edgegate` binary as a child process (for tests where the process must die). Its
/// stderr (the log) goes to a file beside the data directory, printed when the test fails.
pub struct Daemon {
    pub broker_port: u16,
    child: Option<Child>,
    data_dir: PathBuf,
    upstream: Option<String>,
    extra_env: Vec<(String, String)>,
    config: Option<PathBuf>,
}

impl Daemon {
    /// Like [`Daemon::spawn`], with `--config FILE`.
    pub fn spawn_with_config(data_dir: &Path, upstream: Option<&str>, config: &Path) -> Daemon {
        let mut d = Daemon {
            broker_port: free_port(),
            child: None,
            data_dir: data_dir.to_path_buf(),
            upstream: upstream.map(str::to_string),
            extra_env: Vec::new(),
            config: Some(config.to_path_buf()),
        };
        d.start();
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// Has the process exited?
    pub fn exited(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_))) | None
        )
    }

    pub fn spawn(data_dir: &Path, upstream: Option<&str>, extra_env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon {
            broker_port: free_port(),
            child: None,
            data_dir: data_dir.to_path_buf(),
            upstream: upstream.map(str::to_string),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),

            config: None,
        };
        d.start();
        d
    }

    pub fn broker_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.broker_port))
    }

    /// Start (again) on the same port and data directory.
    pub fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgegate"));
        cmd.arg("run");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.env("EDGEGATE__GATEWAY__ID", "gw1")
            .env("EDGEGATE__GATEWAY__DATA_DIR", &self.data_dir)
            .env(
                "EDGEGATE__BROKER__LISTEN",
                format!("127.0.0.1:{}", self.broker_port),
            )
            .env("EDGEGATE__METRICS__LISTEN", "")
            .env(
                "EDGEGATE__UPSTREAM__URL",
                self.upstream.as_deref().unwrap_or(""),
            )
            .env("EDGEGATE__UPSTREAM__RECONNECT_MIN", "50ms")
            .env("EDGEGATE__UPSTREAM__RECONNECT_MAX", "500ms")
            .env("RUST_LOG", "info,rumqttd=error")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .map_or_else(|_| Stdio::inherit(), Stdio::from),
            );
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn edgegate"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.broker_port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("edgegate exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "edgegate did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the process's stderr goes (all its runs).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("stderr.log")
    }

    /// SIGKILL: no chance to commit or close anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().ok().and_then(|s| s.code())
    }

    /// `edgegate queue stats --json` on this data directory.
    pub fn queue_stats(&self) -> Value {
        let out = edgegate_cli(
            &self.data_dir,
            &["queue", "stats", "--json", "--interval", "0s"],
        );
        serde_json::from_str(&out).expect("queue stats JSON")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "--- edgegate log ({}, last {} lines) ---\n{}\n--- end of log ---",
                self.log_path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Unique (by id) envelopes, the number of duplicates, and whether sequences are 1..=max with
/// no gap.
pub fn dedup(envelopes: &[(String, Value)]) -> (Vec<Value>, usize, Vec<u64>) {
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::new();
    let mut dups = 0;
    for (_, v) in envelopes {
        if seen.insert(v["id"].as_str().unwrap_or_default().to_string()) {
            unique.push(v.clone());
        } else {
            dups += 1;
        }
    }
    let seqs: std::collections::BTreeSet<u64> = unique.iter().map(seq).collect();
    let max = seqs.iter().next_back().copied().unwrap_or(0);
    let missing = (1..=max).filter(|s| !seqs.contains(s)).collect();
    (unique, dups, missing)
}

/// A link between the gateway and the cloud broker that can be cut: a TCP relay. While down it
/// refuses new connections and cuts the open ones, like a dead uplink; the cloud broker and
/// its subscribers stay up, so nothing the gateway sends after the link returns is missed.
pub struct Link {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn start(target_port: u16, up: bool) -> Link {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind link");
        let port = listener.local_addr().unwrap().port();
        let flag = Arc::new(AtomicBool::new(up));
        let f = flag.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !f.load(Ordering::SeqCst) {
                    continue;
                }
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async { while f.load(Ordering::SeqCst) { tokio::time::sleep(Duration::from_millis(20)).await } } => {}
                    }
                });
            }
        });
        Link {
            port,
            up: flag,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// VmRSS of process `pid` (this process for `None`), in KiB; 0 if unknown.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let pid = pid.map_or("self".to_string(), |p| p.to_string());
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// GET `path` from the gateway's metrics endpoint: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}
