//! The status page and its JSON API, against a running gateway: the page is opened in a real
//! headless Chromium (Debian package `chromium`, installed by .ci/run) and read through the
//! DevTools protocol while sensors publish, alerts fire and the uplink fails; the API is read
//! with plain HTTP requests.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;
use edgegate::config::rules::from_toml;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// HTTP, by hand: the test sees exactly what goes over the wire.

struct Http {
    status: u16,
    head: String,
    body: String,
}

impl Http {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Http {
    let mut s = TcpStream::connect(addr).await.expect("connect to the page");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Until the body is complete by Content-Length (Chromium's DevTools server keeps the
    // connection open), or the server closes.
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|n| out.len() >= end + 4 + n) {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("answer in time");
    let text = String::from_utf8(out).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Http {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

async fn api(addr: SocketAddr, path: &str) -> Value {
    let r = http(addr, "GET", path, &[]).await;
    assert_eq!(r.status, 200, "{path}: {} {}", r.head, r.body);
    r.json()
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

// ---------------------------------------------------------------------------------------------
// Chromium, driven through the DevTools protocol over a websocket (a minimal client: text
// frames, masked as a client must).

struct Browser {
    child: Child,
    ws: TcpStream,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn chromium_path() -> std::path::PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "chromium not found (/usr/bin/chromium): the status page tests need a real browser; \
         install the Debian package: apt-get install -y chromium (.ci/run does)"
    );
}

/// Chromium in a process group of its own: Debian's `/usr/bin/chromium` is a shell script
/// that starts the browser as a child, so killing the script alone would leave it running.
fn chromium_command(profile: &std::path::Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(chromium_path());
    cmd.process_group(0);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

impl Browser {
    /// Chromium showing `url`, with a DevTools connection to that page.
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = chromium_command(profile.path())
            .args(["--remote-debugging-port=0", "--window-size=1200,1000", url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."; the thread keeps
        // draining its log afterwards so it never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().and_then(|p| p.parse::<u16>().ok()));
                }
            }
        });
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT).ok().flatten())
            .await
            .unwrap()
            .expect("chromium prints its DevTools address");
        let devtools: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + WAIT;
        let ws_url = loop {
            let list = http(devtools, "GET", "/json/list", &[]).await.json();
            let page = list.as_array().and_then(|l| {
                l.iter().find(|t| {
                    t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
                })
            });
            if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                break ws.to_string();
            }
            assert!(Instant::now() < deadline, "no page target: {list}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let path = ws_url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap();
        let mut ws = TcpStream::connect(devtools).await.unwrap();
        ws.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {devtools}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            ws.read_exact(&mut b).await.expect("websocket handshake");
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Browser {
            child,
            ws,
            next_id: 1,
            _profile: profile,
        }
    }

    async fn send(&mut self, text: &str) {
        let p = text.as_bytes();
        let mut frame = vec![0x81u8];
        match p.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.ws.write_all(&frame).await.unwrap();
    }

    /// The next whole text message (continuation frames joined).
    async fn recv(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.ws.read_exact(&mut h).await.expect("DevTools message");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.ws.read_exact(&mut b).await.unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.ws.read_exact(&mut b).await.unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.ws.read_exact(&mut payload).await.unwrap();
            msg.extend_from_slice(&payload);
            if h[0] & 0x80 != 0 {
                return String::from_utf8(msg).expect("UTF-8 message");
            }
        }
    }

    /// Evaluate a JavaScript expression in the page; its value.
    async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let cmd = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": { "expression": expr, "returnByValue": true },
        });
        self.send(&cmd.to_string()).await;
        loop {
            let m: Value = serde_json::from_str(&self.recv().await).unwrap();
            if m["id"] == id {
                if let Some(e) = m["result"].get("exceptionDetails") {
                    return Err(e.to_string());
                }
                return Ok(m["result"]["result"]["value"].clone());
            }
        }
    }

    /// What the page shows, as the user sees it (an error while it is still loading).
    async fn view(&mut self) -> Value {
        self.try_eval(VIEW)
            .await
            .unwrap_or_else(|e| json!({ "error": e }))
    }

    /// Wait until `f(view)` holds; the last view in the panic message otherwise.
    async fn until(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.view().await;
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "page never showed {what}: {v:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the wrapper script and the browser with its helpers.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// The page's visible state: table rows as text, the queue and link figures.
const VIEW: &str = r##"JSON.parse(JSON.stringify({
  updates: Number(document.body.dataset.updates || 0),
  marker: window.__test_marker || null,
  title: document.title,
  health: document.getElementById("health").textContent,
  uplink: document.getElementById("uplink").textContent,
  reasons: document.getElementById("reasons").textContent,
  depth: Number(document.getElementById("q-depth").textContent),
  drain: document.getElementById("q-drain").textContent,
  dropped: document.getElementById("q-dropped").textContent,
  sensors: [...document.querySelectorAll("#sensors tbody tr")].map((tr) => ({
    topic: tr.dataset.topic, stale: tr.classList.contains("stale"),
    alarm: tr.classList.contains("alarm"),
    cells: [...tr.cells].map((c) => c.textContent),
    images: tr.querySelectorAll("img").length,
  })),
  alerts: [...document.querySelectorAll("#alerts tbody tr")].filter((tr) => tr.dataset.rule)
    .map((tr) => ({ rule: tr.dataset.rule, sensor: tr.dataset.sensor, state: tr.dataset.state,
                    cells: [...tr.cells].map((c) => c.textContent) })),
  rules: [...document.querySelectorAll("#rules tbody tr")].map((tr) => tr.cells[0].textContent),
}))"##;

fn page_config(dir: &std::path::Path, upstream: Option<&str>) -> edgegate::config::Config {
    let mut cfg = test_config(dir, upstream);
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg
}

/// `page_config` with one rule: forward, and a threshold alert above `above`.
fn alerting_config(
    dir: &std::path::Path,
    upstream: Option<&str>,
    name: &str,
    filter: &str,
    above: f64,
) -> edgegate::config::Config {
    let mut cfg = page_config(dir, upstream);
    cfg.rules = from_toml(&format!(
        r#"
        [[rules]]
        name = "{name}"
        match = "{filter}"
        actions = [
          {{ type = "forward" }},
          {{ type = "detect", detector = "threshold", above = {above} }},
        ]
        "#
    ))
    .unwrap();
    cfg
}

fn topics(v: &Value) -> Vec<String> {
    v["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["topic"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_sensors_as_they_publish_without_reloading() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(page_config(dir.path(), None)).await;
    let addr = gw.metrics_addr.unwrap();
    let mut b = Browser::open(&format!("http://{addr}/")).await;
    b.until("a first update", |v| v["updates"].as_u64() >= Some(1))
        .await;
    // Marks this page load: a reload would lose it.
    b.eval("window.__test_marker = 'same page'").await;
    let v = b.view().await;
    assert!(v["sensors"].as_array().unwrap().is_empty(), "{v:#}");
    assert_eq!(v["health"], "healthy", "{v:#}");
    assert_eq!(v["uplink"], "none configured");

    let s = Sensor::connect(gw.broker_addr, "page-s1").await;
    // Readings per minute is the larger of this and the last minute's count: two readings on
    // either side of a minute boundary show 1 (seen once in CI).
    let minute = |margin: f64| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        ((t + margin) / 60.0).floor() as u64
    };
    let first_minute = minute(-0.5);
    s.publish("site/boiler-1/temp", r#"{"t": 61.5, "unit": "C"}"#)
        .await;
    let v = b
        .until("the first sensor", |v| topics(v) == ["site/boiler-1/temp"])
        .await;
    let row = &v["sensors"][0]["cells"];
    assert!(row[1].as_str().unwrap().contains(r#""t": 61.5"#), "{row}");
    assert_eq!(row[2], "61.5", "first numeric member as the value: {row}");
    assert_eq!(row[4], "1", "readings per minute: {row}");

    s.publish("site/pump-2/pressure", "2.5").await;
    s.publish("site/boiler-1/temp", r#"{"t": 62}"#).await;
    let same_minute = minute(0.5) == first_minute;
    let v = b
        .until("the second sensor and the new value", |v| {
            topics(v) == ["site/boiler-1/temp", "site/pump-2/pressure"]
                && v["sensors"][0]["cells"][2] == "62"
        })
        .await;
    assert_eq!(v["marker"], "same page", "the page was reloaded: {v:#}");
    let per_minute = &v["sensors"][0]["cells"][4];
    if same_minute {
        assert_eq!(per_minute, "2");
    } else {
        assert!(per_minute == "1" || per_minute == "2", "{per_minute}");
    }

    // Filtering by topic (typed into the box, as a user would).
    b.eval(
        r#"(() => { const f = document.getElementById("filter"); f.value = "PUMP";
                    f.dispatchEvent(new Event("input")); return true; })()"#,
    )
    .await;
    b.until("only the pump", |v| topics(v) == ["site/pump-2/pressure"])
        .await;
    drop(b);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_an_alert_when_one_fires_and_when_it_clears() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = alerting_config(dir.path(), None, "hot", "sensors/{device}/temp", 50.0);
    let gw = start_gateway(cfg).await;
    let addr = gw.metrics_addr.unwrap();
    let mut b = Browser::open(&format!("http://{addr}/")).await;
    let v = b.until("the rules", |v| v["rules"] == json!(["hot"])).await;
    assert!(v["alerts"].as_array().unwrap().is_empty(), "{v:#}");

    let s = Sensor::connect(gw.broker_addr, "page-hot").await;
    s.publish("sensors/b1/temp", "20").await;
    s.publish("sensors/b1/temp", "99").await;
    let v = b
        .until("an alert start", |v| {
            v["alerts"].as_array().unwrap().len() == 1
        })
        .await;
    let a = &v["alerts"][0];
    assert_eq!(
        (&a["rule"], &a["sensor"], &a["state"]),
        (&json!("hot"), &json!("sensors/b1/temp"), &json!("start")),
        "{v:#}"
    );
    assert_eq!(a["cells"][4], "threshold");
    assert_eq!(a["cells"][5], "99");
    let row = v["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["topic"] == "sensors/b1/temp")
        .cloned()
        .unwrap();
    assert!(row["alarm"].as_bool().unwrap(), "sensor row marked: {row}");
    assert!(
        row["cells"][6].as_str().unwrap().contains("hot/threshold"),
        "{row}"
    );

    s.publish("sensors/b1/temp", "21").await;
    let v = b
        .until("the clear", |v| v["alerts"].as_array().unwrap().len() == 2)
        .await;
    assert_eq!(v["alerts"][0]["state"], "clear", "newest first: {v:#}");
    let row = v["sensors"].as_array().unwrap()[0].clone();
    assert!(!row["alarm"].as_bool().unwrap(), "{row}");
    drop(b);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_the_queue_growing_during_an_outage_and_draining_after() {
    let cloud = Mosquitto::start();
    let link = Link::start(cloud.port, true).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(page_config(dir.path(), Some(&link.url()))).await;
    let addr = gw.metrics_addr.unwrap();
    let mut b = Browser::open(&format!("http://{addr}/")).await;
    b.until("the uplink up", |v| v["uplink"] == "connected")
        .await;

    link.set_up(false);
    b.until("the uplink down", |v| v["uplink"] == "down").await;
    let s = Sensor::connect(gw.broker_addr, "page-outage").await;
    for i in 0..50 {
        s.publish("sensors/o1/temp", format!("{i}")).await;
    }
    s.wait_acked(50).await;
    let v = b
        .until("the backlog", |v| v["depth"].as_u64() >= Some(50))
        .await;
    assert_eq!(v["drain"], "not draining", "{v:#}");

    link.set_up(true);
    let v = b
        .until("the backlog drained", |v| {
            v["uplink"] == "connected" && v["depth"] == 0
        })
        .await;
    assert_eq!(v["dropped"], "none", "{v:#}");
    drop(b);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_data_is_shown_as_text_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(page_config(dir.path(), None)).await;
    let addr = gw.metrics_addr.unwrap();
    let mut b = Browser::open(&format!("http://{addr}/")).await;
    b.until("a first update", |v| v["updates"].as_u64() >= Some(1))
        .await;
    let s = Sensor::connect(gw.broker_addr, "page-evil").await;
    let topic = r#"x/<img src=x onerror="document.title='pwned'">"#;
    s.publish(topic, r#"{"v":"<script>document.title='pwned2'</script>"}"#)
        .await;
    let v = b
        .until("the hostile sensor", |v| topics(v) == [topic])
        .await;
    assert_eq!(v["sensors"][0]["cells"][0], topic, "shown as text: {v:#}");
    assert_eq!(v["sensors"][0]["images"], 0, "{v:#}");
    assert_eq!(v["title"], "edgegate", "{v:#}");
    drop(b);
    gw.shutdown().await;
}

/// A screenshot of the page for the README (`EDGEGATE_SCREENSHOT=path`), taken during a real
/// outage with sensors and alerts; without the variable the same run checks the page loads in
/// a phone-sized window (390x844) with the sensors and the alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_renders_in_a_phone_sized_window() {
    let cloud = Mosquitto::start();
    let link = Link::start(cloud.port, true).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = alerting_config(dir.path(), Some(&link.url()), "plant", "plant/#", 80.0);
    let gw = start_gateway(cfg).await;
    let addr = gw.metrics_addr.unwrap();
    let s = Sensor::connect(gw.broker_addr, "page-phone").await;
    for (t, v) in [
        (
            "plant/boiler-1/temperature",
            r#"{"value": 71.2, "unit": "C"}"#,
        ),
        ("plant/pump-2/pressure", "2.46"),
        ("plant/door-3/position", r#"{"open": false, "angle": 0}"#),
    ] {
        s.publish(t, v).await;
    }
    s.publish(
        "plant/boiler-1/temperature",
        r#"{"value": 93.4, "unit": "C"}"#,
    )
    .await;
    link.set_up(false);
    for i in 0..20 {
        s.publish("plant/pump-2/pressure", format!("2.{i}")).await;
    }
    s.wait_acked(24).await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    let profile = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dom = chromium_command(profile.path())
        .args([
            "--window-size=390,844",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("http://{addr}/"))
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("plant/boiler-1/temperature"), "{dom}");
    assert!(dom.contains(r#"data-state="start""#), "{dom}");
    if let Ok(path) = std::env::var("EDGEGATE_SCREENSHOT") {
        for (size, suffix) in [("1200,1000", ""), ("390,844", "-phone")] {
            let file = path.replace(".png", &format!("{suffix}.png"));
            let st = chromium_command(profile.path())
                .args([
                    &format!("--window-size={size}"),
                    "--hide-scrollbars",
                    "--virtual-time-budget=5000",
                    &format!("--screenshot={file}"),
                ])
                .arg(format!("http://{addr}/"))
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
    drop(out);
    link.set_up(true);
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The JSON API directly.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_answers_what_the_page_shows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = alerting_config(dir.path(), None, "hot", "s/#", 50.0);
    let gw = start_gateway(cfg).await;
    let addr = gw.metrics_addr.unwrap();

    let st = api(addr, "/api/status").await;
    assert_eq!(st["gateway"]["id"], "gw1");
    assert_eq!(st["gateway"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["upstream"]["configured"], false);
    assert!(st["health"]["healthy"].is_boolean());

    let s = Sensor::connect(gw.broker_addr, "api-s").await;
    for i in 0..30 {
        s.publish(&format!("s/dev{i:02}/t"), "20").await;
    }
    s.publish("s/dev07/t", "70").await;
    s.wait_acked(31).await;
    let deadline = Instant::now() + WAIT;
    while api(addr, "/api/sensors").await["total"] != 30 {
        assert!(Instant::now() < deadline, "sensors never all seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = api(addr, "/api/sensors?filter=DEV0&limit=3&offset=2").await;
    assert_eq!(
        (p["total"].as_u64(), p["matched"].as_u64()),
        (Some(30), Some(10))
    );
    assert_eq!(topics(&p), ["s/dev02/t", "s/dev03/t", "s/dev04/t"]);
    let row = &p["sensors"][0];
    assert_eq!(row["payload"], "20");
    assert_eq!(row["value"], 20.0);
    assert_eq!(row["spark"].as_array().unwrap().len(), 60);
    assert_eq!(row["spark"][59], 20.0);
    let p = api(addr, "/api/sensors?sort=last_seen&limit=1").await;
    assert_eq!(topics(&p), ["s/dev07/t"], "most recently seen first");
    assert_eq!(p["sensors"][0]["readings"], 2);
    let p = api(addr, "/api/sensors?sort=alerts&limit=1").await;
    assert_eq!(
        p["sensors"][0]["alerts"],
        json!([{ "rule": "hot", "detector": "threshold" }])
    );

    let a = api(addr, "/api/alerts").await;
    assert_eq!(a["total_started"], 1, "{a}");
    assert_eq!(a["recent"][0]["sensor"], "s/dev07/t");
    assert_eq!(a["recent"][0]["value"], 70.0);
    assert_eq!(a["active"].as_array().unwrap().len(), 1);

    let q = api(addr, "/api/queue").await;
    assert_eq!(
        q["depth"], 32,
        "no upstream: the 31 readings and the alert stay queued: {q}"
    );
    assert_eq!(q["alerts"], 1, "{q}");
    assert!(q["oldest_age_s"].is_number(), "{q}");
    assert!(q["drain_s"].is_null(), "nothing drains it: {q}");

    let r = api(addr, "/api/rules").await;
    assert_eq!(r["rules"][0]["name"], "hot");
    assert_eq!(r["rules"][0]["in_alarm"], 1);
    assert!(r["last_reload"].is_null());

    // The page itself: HTML with its script allowed by hash, nothing external.
    let page = http(addr, "GET", "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>edgegate</title>"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(!page.body.contains("http://") || !page.body.contains("src=\"http"));
    assert!(!page.body.contains("https://"), "no external assets");

    // Unknown API paths, other methods.
    assert_eq!(http(addr, "GET", "/api/nope", &[]).await.status, 404);
    assert_eq!(http(addr, "POST", "/api/status", &[]).await.status, 405);
    assert_eq!(http(addr, "DELETE", "/", &[]).await.status, 405);
    drop(s);
    gw.shutdown().await;
}

/// Bound beyond loopback: page and API need the broker's users (HTTP Basic) unless anonymous
/// access is on; /metrics and /healthz stay open as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_page_needs_the_broker_users() {
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("passwd");
    let hash = edgegate::config::auth::hash_password(b"s3cret").unwrap();
    std::fs::write(&pwfile, format!("tech:{hash}\n")).unwrap();
    let passwords = std::sync::Arc::new(edgegate::config::auth::Passwords::load(&pwfile).unwrap());

    let mut cfg = page_config(&dir.path().join("a"), None);
    // Every address: the page is on the LAN (the test still talks to it over 127.0.0.1).
    cfg.metrics.listen = Some("0.0.0.0:0".parse().unwrap());
    cfg.broker.allow_anonymous = false;
    cfg.broker.password_file = Some(pwfile.clone());
    cfg.broker.passwords = Some(passwords.clone());
    let gw = start_gateway(cfg).await;
    let addr: SocketAddr = ([127, 0, 0, 1], gw.metrics_addr.unwrap().port()).into();
    for path in ["/", "/api/status", "/api/sensors"] {
        let r = http(addr, "GET", path, &[]).await;
        assert_eq!(r.status, 401, "{path}: {}", r.head);
        assert!(
            r.header("www-authenticate").unwrap().starts_with("Basic"),
            "{}",
            r.head
        );
        let bad = basic("tech", "guess");
        let r = http(addr, "GET", path, &[("Authorization", &bad)]).await;
        assert_eq!(r.status, 401, "{path}");
        let r = http(
            addr,
            "GET",
            path,
            &[("Authorization", &basic("root", "s3cret"))],
        )
        .await;
        assert_eq!(r.status, 401, "{path}: an unknown user");
        let good = basic("tech", "s3cret");
        let r = http(addr, "GET", path, &[("Authorization", &good)]).await;
        assert_eq!(r.status, 200, "{path}");
    }
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.status, 200);
    let m = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains("edgegate_readings_received_total"));
    // Read-only, even with credentials.
    let good = basic("tech", "s3cret");
    let r = http(addr, "POST", "/api/rules", &[("Authorization", &good)]).await;
    assert_eq!(r.status, 405);
    gw.shutdown().await;

    // No password file and no anonymous access: nobody, and the answer says why.
    let mut cfg = page_config(&dir.path().join("b"), None);
    cfg.metrics.listen = Some("0.0.0.0:0".parse().unwrap());
    cfg.broker.allow_anonymous = false;
    let gw = start_gateway(cfg).await;
    let addr: SocketAddr = ([127, 0, 0, 1], gw.metrics_addr.unwrap().port()).into();
    let r = http(addr, "GET", "/api/status", &[("Authorization", &good)]).await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("password_file"), "{}", r.body);
    gw.shutdown().await;

    // Anonymous access on: open, like the broker.
    let mut cfg = page_config(&dir.path().join("c"), None);
    cfg.metrics.listen = Some("0.0.0.0:0".parse().unwrap());
    cfg.broker.allow_anonymous = true;
    let gw = start_gateway(cfg).await;
    let addr: SocketAddr = ([127, 0, 0, 1], gw.metrics_addr.unwrap().port()).into();
    assert_eq!(http(addr, "GET", "/api/status", &[]).await.status, 200);
    gw.shutdown().await;
}

/// A reload rejected on SIGHUP shows on `/api/rules` with every error and its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_shows_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = dir.path().join("rules.d");
    std::fs::create_dir_all(&rules_dir).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::spawn(
        &dir.path().join("data"),
        None,
        &[
            ("EDGEGATE__METRICS__LISTEN", &listen),
            ("EDGEGATE__RULES_ENGINE__DIR", path_str(&rules_dir)),
        ],
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "daemon's page never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = api(addr, "/api/rules").await;
    assert!(before["last_reload"].is_null(), "{before}");
    let running: Vec<Value> = before["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert!(!running.is_empty(), "{before}");
    std::fs::write(
        rules_dir.join("bad.toml"),
        "[[rules]]\nname = \"bad\"\nmatch = \"a/#/b\"\naction = \"explode\"\n",
    )
    .unwrap();
    let pid = d.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let r = api(addr, "/api/rules").await;
        if !r["last_reload"].is_null() {
            break r;
        }
        assert!(Instant::now() < deadline, "no reload reported: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["last_reload"]["ok"], false, "{r}");
    assert_eq!(r["reload_failures"], 1);
    let errors = r["last_reload"]["errors"].as_array().unwrap();
    assert!(errors.len() >= 2, "{r}");
    assert!(
        errors
            .iter()
            .all(|e| e[1].as_str().is_some_and(|m| !m.is_empty())),
        "{r}"
    );
    let after: Vec<Value> = r["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(after, running, "running rules kept: {r}");
    d.terminate();
}
