//! Rule engine throughput: 20 rules (drop, deadband+forward, sample+forward, conditions,
//! threshold, rate of change, outlier, flatline, missing, tumbling and sliding windows) over
//! 1,000 sensors, numeric readings, one core.
//!
//! `cargo bench --bench rules` (criterion prints the throughput in readings/s as elem/s).
//! Before timing, a counting allocator reports heap allocations per reading in the steady state.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// Counts allocations (the system allocator does the work).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`/`dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgegate::config::rules::from_toml;
use edgegate::core::decode::Payload;
use edgegate::core::event::Reading;
use edgegate::rules::Engine;

const RULES: &str = r#"
[rules_engine]
max_sensors = 2000

[[rules]]
name = "no-debug"
match = "sensors/+/+/debug"
action = "drop"

[[rules]]
name = "report-by-exception"
match = "sensors/#"
actions = [{ type = "deadband", abs = 0.5, max_silence = "5m" }, { type = "forward" }]

[[rules]]
name = "outlier"
match = "sensors/#"
actions = [{ type = "detect", detector = "outlier" }]

[[rules]]
name = "flatline"
match = "sensors/#"
actions = [{ type = "detect", detector = "flatline", for = "10m" }]

[[rules]]
name = "hot"
match = "sensors/{site}/{device}/temp"
actions = [{ type = "detect", detector = "threshold", above = 80, hysteresis = 2, for = "30s" }]

[[rules]]
name = "jumps"
match = "sensors/#"
actions = [{ type = "detect", detector = "rate_of_change", max_rate = 100 }]

[[rules]]
name = "silent"
match = "sensors/#"
actions = [{ type = "detect", detector = "missing", after = "5m" }]

[[rules]]
name = "minute"
match = "sensors/#"
actions = [{ type = "aggregate", window = "1m" }]

[[rules]]
name = "five-minutes-sliding"
match = "sensors/#"
actions = [{ type = "aggregate", window = "5m", slide = "1m", stats = ["mean", "max"] }]

[[rules]]
name = "sampled"
match = "sensors/{site}/#"
actions = [{ type = "sample", every = 100 }, { type = "forward", topic = "sampled/{site}/{topic}" }]

[[rules]]
name = "very-high"
match = "sensors/{site}/{device}/{metric}"
when = "value > 1000 && site != \"s0\""
actions = [{ type = "publish", topic = "edgegate/high/{device}" }]

[[rules]]
name = "site3-threshold"
match = "sensors/s3/#"
actions = [{ type = "detect", detector = "threshold", below = -20 }]

[[rules]]
name = "site4-outlier"
match = "sensors/s4/+/temp"
actions = [{ type = "detect", detector = "outlier", threshold = 5 }]

[[rules]]
name = "site5-deadband"
match = "sensors/s5/#"
actions = [{ type = "deadband", rel = 0.05 }, { type = "publish", topic = "edgegate/s5/{topic}" }]

[[rules]]
name = "site6-rate"
match = "sensors/s6/#"
actions = [{ type = "detect", detector = "rate_of_change", max_rate = 10, for = "1m" }]

[[rules]]
name = "other-1"
match = "plant/+/pressure"
action = "forward"

[[rules]]
name = "other-2"
match = "plant/#"
actions = [{ type = "detect", detector = "outlier" }]

[[rules]]
name = "other-3"
match = "meters/{id}/energy"
actions = [{ type = "aggregate", window = "15m" }]

[[rules]]
name = "other-4"
match = "status/#"
action = "drop"

[[rules]]
name = "other-5"
match = "$SYS/#"
action = "drop"
"#;

struct Feed {
    readings: Vec<Reading>,
    t: f64,
    rng: u64,
}

impl Feed {
    fn new(sensors: usize) -> Feed {
        let metrics = ["temp", "humidity", "pressure", "flow"];
        let readings = (0..sensors)
            .map(|i| Reading {
                topic: format!("sensors/s{}/dev{i}/{}", i % 10, metrics[i % 4]),
                received: UNIX_EPOCH,
                payload: Payload::decode(Bytes::from_static(b"0")),
                traceparent: None,
            })
            .collect();
        Feed {
            readings,
            t: 1_700_000_000.0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Next round: every sensor one reading, one second later (values: level + noise).
    fn round(&mut self) {
        self.t += 1.0;
        let received = UNIX_EPOCH + Duration::from_secs_f64(self.t);
        for (i, r) in self.readings.iter_mut().enumerate() {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let noise = (self.rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let value = 20.0 + (i % 50) as f64 + noise;
            r.received = received;
            r.payload = Payload::Number {
                value,
                json: Bytes::new(),
            };
        }
    }
}

fn bench(c: &mut Criterion) {
    let rules = from_toml(RULES).expect("benchmark rules are valid");
    assert_eq!(rules.len(), 20);
    let mut engine = Engine::new(&rules, "edge/bench");
    let mut feed = Feed::new(1000);
    let mut out = Vec::with_capacity(4096);
    // Warm up: every sensor known, detectors past their warm-up, windows allocated.
    for _ in 0..120 {
        feed.round();
        for r in &feed.readings {
            engine.process(r, &mut out);
        }
        out.clear();
    }
    // Steady-state allocations: 100 rounds after the warm-up, split by whether the reading
    // produced an action (an upstream event or a local publish must allocate its payload).
    let (mut quiet_allocs, mut quiet_n, mut acting_allocs, mut acting_n) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..100 {
        feed.round();
        for r in &feed.readings {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            engine.process(r, &mut out);
            let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
            if out.is_empty() {
                quiet_allocs += n;
                quiet_n += 1;
            } else {
                acting_allocs += n;
                acting_n += 1;
            }
            out.clear();
        }
    }
    println!(
        "allocations per reading in the steady state: {:.3} for readings without an action ({quiet_n} readings), \
         {:.1} for readings with one ({acting_n} readings: events, alerts, publishes)",
        quiet_allocs as f64 / quiet_n.max(1) as f64,
        acting_allocs as f64 / acting_n.max(1) as f64
    );
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(feed.readings.len() as u64));
    g.bench_function("20 rules x 1000 sensors", |b| {
        b.iter(|| {
            feed.round();
            for r in &feed.readings {
                engine.process(r, &mut out);
            }
            out.clear();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
