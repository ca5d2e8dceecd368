//! The queue on a small, real file system (a tmpfs mounted for the test): what happens when the
//! queue itself fills the disk, or something else does. Mounting needs root; CI runs as root,
//! elsewhere these tests print why they did not run and pass.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(60);

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (with a message saying why) when it cannot be mounted: not root.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: this test mounts a {size} tmpfs and needs root (CI runs as root)");
            return None;
        }
        Some(Tmpfs { _dir: dir, path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Free bytes of the file system holding `p` (as `df` shows them).
fn free_bytes(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

/// Wait (up to [`WAIT`]) for the queue to be empty; the depth left.
async fn drained(gw: &edgegate::Gateway) -> u64 {
    let mut depth = u64::MAX;
    for _ in 0..(WAIT.as_millis() / 200) {
        depth = gw.queue_stats().await.map(|s| s.depth).unwrap_or(u64::MAX);
        if depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    depth
}

async fn healthy(addr: SocketAddr) -> (bool, String) {
    let (code, body) = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
        .await
        .unwrap();
    (code == 200, body)
}

/// Issue 12.3: the data dir on a 5 MiB tmpfs, the upstream down, 60,000 readings at about
/// 3,000/s, then the upstream back. Before the fix the queue took the last free bytes, its
/// acknowledgements could never commit (they shared a transaction with the appends that kept
/// failing), so the backlog was resent on every connection, never deleted, and new readings were
/// dropped for good. Now the queue stops growing short of `queue.min_free`, so the backlog drains
/// and the space comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_fills_its_disk_drains_and_gives_the_space_back() {
    let Some(fs) = Tmpfs::mount("5m") else { return };
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let mut cfg = test_config(&fs.path, Some(&link.url()));
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let http = gw.metrics_addr.unwrap();
    let m = gw.metrics().clone();
    let free_at_start = free_bytes(&fs.path);

    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    let total = 60_000u64;
    let started = std::time::Instant::now();
    for i in 0..total {
        sensor
            .publish("sensors/a/v", format!("{{\"v\":{i},\"unit\":\"C\"}}"))
            .await;
        if i % 300 == 299 {
            // About 3,000 readings a second.
            let due = Duration::from_millis((i + 1) / 3);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    sensor.wait_acked(total).await;
    let dropped_all =
        |m: &edgegate::core::metrics::Metrics| -> u64 { m.drops().iter().map(|(_, n)| n).sum() };
    // Every reading is committed, counted as dropped, or (at most a channel's worth) waits in
    // memory for a commit.
    let buffered = 2 * edgegate::config::Config::defaults()
        .pipeline
        .channel_capacity as u64;
    assert!(
        eventually(WAIT, || m.events_committed.get()
            + dropped_all(&m)
            + buffered
            >= total)
        .await,
        "committed {} dropped {:?}",
        m.events_committed.get(),
        m.drops()
    );
    let depth = gw.queue_stats().await.unwrap().depth;
    eprintln!(
        "outage: {depth} queued, {} committed, drops {:?}, free {} of {free_at_start} bytes",
        m.events_committed.get(),
        m.drops(),
        free_bytes(&fs.path)
    );
    assert!(depth > 1000, "the queue filled up to its disk: {depth}");

    link.set_up(true);
    // The backlog drains: every queued event arrives and leaves the queue.
    let left = drained(&gw).await;
    let drained = left == 0;
    let (unique, dups, _) = dedup(&cloud.wait_for(depth as usize, WAIT).await);
    eprintln!(
        "after the outage: {left} left, {} unique upstream, {dups} duplicates, forwarded {}",
        unique.len(),
        m.events_forwarded.get()
    );
    assert!(
        drained,
        "the queue still holds {left} events after they were delivered"
    );
    assert!(unique.len() as u64 >= depth, "every queued event arrived");
    assert!(
        dups as u64 <= depth / 2,
        "the backlog is not resent again and again: {dups} duplicates"
    );

    // The space comes back and new readings go through, none dropped.
    assert!(
        eventually(WAIT, || free_bytes(&fs.path) > free_at_start / 2).await,
        "space given back: {} of {free_at_start} bytes free",
        free_bytes(&fs.path)
    );
    let dropped_before = dropped_all(&m);
    let forwarded_before = m.events_forwarded.get();
    for i in 0..100 {
        sensor.publish("sensors/b/v", i.to_string()).await;
    }
    assert!(
        eventually(WAIT, || m.events_forwarded.get() >= forwarded_before + 100).await,
        "new readings reach the upstream"
    );
    assert_eq!(dropped_all(&m), dropped_before, "no new reading dropped");
    // Healthy again at the supervisor's next tick (it reported the outage, issue 12's soak).
    let deadline = std::time::Instant::now() + WAIT;
    while !healthy(http).await.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            healthy(http).await.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.shutdown().await;
}

/// Something else fills the disk while a backlog waits and readings keep coming: the queue's
/// commits meet a full disk. Its acknowledgements still commit (they do not wait on the appends
/// that cannot, and the space reserve is given back for them), so the backlog drains and is not
/// resent on every connection; every reading is delivered or counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_commit_on_a_disk_another_program_filled() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let mut cfg = test_config(&fs.path, Some(&link.url()));
    // No reserve: the commits themselves must meet the full disk.
    cfg.queue.min_free = edgegate::config::MinFree::Bytes(0);
    let gw = start_gateway(cfg).await;
    let m = gw.metrics().clone();
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    for i in 0..2000 {
        sensor.publish("sensors/a/v", i.to_string()).await;
    }
    sensor.wait_acked(2000).await;
    assert!(eventually(WAIT, || m.events_committed.get() == 2000).await);

    // Another program takes every free byte.
    fill(&fs.path.join("filler"));
    assert_eq!(free_bytes(&fs.path), 0);
    // Readings keep coming: their commits meet the full disk.
    for i in 0..200 {
        sensor.publish("sensors/c/v", i.to_string()).await;
    }
    sensor.wait_acked(2200).await;
    assert!(gw.queue_stats().await.is_some(), "the writer answers");

    // The upstream returns while the disk is still full: the acknowledgements commit.
    link.set_up(true);
    let depth = drained(&gw).await;
    let dropped: u64 = m.drops().iter().map(|(_, n)| n).sum();
    let (unique, dups, _) = dedup(&cloud.events().0);
    eprintln!(
        "full disk: {} delivered, {dups} duplicates, drops {:?}, {depth} left",
        unique.len(),
        m.drops()
    );
    assert_eq!(depth, 0, "acknowledged on a full disk");
    assert!(
        dups < 1000,
        "the backlog is not resent on every connection: {dups}"
    );
    assert_eq!(
        unique.len() as u64 + dropped,
        2200,
        "every reading delivered or counted"
    );
    gw.shutdown().await;
}

/// While the queue's commits fail, /healthz says so (503, "queue commits failing"); once they
/// succeed again, it is healthy and what waited in memory is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_unhealthy_while_queue_commits_fail() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let mut cfg = test_config(&fs.path, None);
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = start_gateway(cfg).await;
    let http = gw.metrics_addr.unwrap();
    let m = gw.metrics().clone();
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    sensor.publish("sensors/a/v", "1").await;
    assert!(eventually(WAIT, || m.events_committed.get() == 1).await);
    assert!(eventually(WAIT, || block_on_healthy(http)).await);

    // Another program keeps taking every byte that comes free (the reserve too).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filler = {
        let (stop, dir) = (stop.clone(), fs.path.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                fill(&dir.join(format!("filler-{n}")));
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut unhealthy = String::new();
    for i in 0..100 {
        sensor.publish("sensors/a/v", i.to_string()).await;
        let (ok, body) = healthy(http).await;
        if !ok && body.contains("queue commits failing") {
            unhealthy = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !unhealthy.is_empty(),
        "/healthz reports the failing commits: {:?}",
        healthy(http).await
    );

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    filler.join().unwrap();
    for f in std::fs::read_dir(&fs.path).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("filler-") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let committed = m.events_committed.get();
    assert!(
        eventually(WAIT, || m.events_committed.get() > committed).await,
        "what waited in memory is committed"
    );
    let mut ok = false;
    for _ in 0..100 {
        if healthy(http).await.0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "healthy again: {:?}", healthy(http).await);
    gw.shutdown().await;
}

fn block_on_healthy(addr: SocketAddr) -> bool {
    http_get(addr, "/healthz").0 == 200
}

/// Write zeros to `path` until the file system is full.
fn fill(path: &Path) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", path.display()))
        .stderr(std::process::Stdio::null())
        .status();
}

/// The same after a restart: a gateway stopped with its queue at the edge of a small file
/// system starts again, drains the backlog once the upstream is back, and takes new readings.
/// Before, the disk stayed full across the restart and nothing was ever deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drains_after_a_restart() {
    let Some(fs) = Tmpfs::mount("5m") else { return };
    let cloud_broker = Mosquitto::start();
    let cloud = Cloud::subscribe(cloud_broker.port, "edge/#").await;
    let link = Link::start(cloud_broker.port, false).await;
    let cfg = test_config(&fs.path, Some(&link.url()));
    let gw = start_gateway(cfg.clone()).await;
    let m = gw.metrics().clone();
    let sensor = Sensor::connect(gw.broker_addr, "s").await;
    let total = 20_000u64;
    for i in 0..total {
        sensor
            .publish("sensors/a/v", format!("{{\"v\":{i},\"unit\":\"C\"}}"))
            .await;
    }
    sensor.wait_acked(total).await;
    let buffered = 2 * cfg.pipeline.channel_capacity as u64;
    assert!(
        eventually(WAIT, || {
            m.events_committed.get() + m.drops().iter().map(|(_, n)| n).sum::<u64>() + buffered
                >= total
        })
        .await
    );
    drop(sensor);
    let depth = gw.shutdown().await.map(|s| s.depth).unwrap_or(0);
    assert!(depth > 1000, "the queue filled up to its disk: {depth}");
    eprintln!("stopped with {depth} queued, {} free", free_bytes(&fs.path));

    link.set_up(true);
    let gw = start_gateway(cfg).await;
    let m = gw.metrics().clone();
    let left = drained(&gw).await;
    assert_eq!(left, 0, "the backlog drained after the restart");
    let (unique, _, _) = dedup(&cloud.wait_for(depth as usize, WAIT).await);
    assert!(unique.len() as u64 >= depth);
    let sensor = Sensor::connect(gw.broker_addr, "s2").await;
    for i in 0..100 {
        sensor.publish("sensors/b/v", i.to_string()).await;
    }
    assert!(
        eventually(WAIT, || m.events_forwarded.get() >= depth + 100).await,
        "new readings reach the upstream: {}",
        m.events_forwarded.get()
    );
    assert!(m.drops().is_empty(), "nothing dropped: {:?}", m.drops());
    gw.shutdown().await;
}
