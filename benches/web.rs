//! What the status page costs the rules stage per reading: the shipped rules alone, then the
//! same with the page's recorder (`rules::history::Tap`) after each reading, over 10,000
//! sensors; and the recorder alone, for number and JSON-object payloads.
//!
//! `cargo bench --bench web` (criterion prints readings/s as elem/s).

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgegate::config::Config;
use edgegate::core::decode::Payload;
use edgegate::core::event::Reading;
use edgegate::rules::history::Tap;
use edgegate::rules::Engine;

const SENSORS: usize = 10_000;

fn readings(object: bool) -> Vec<Reading> {
    (0..SENSORS)
        .map(|i| {
            let v = 20.0 + (i % 50) as f64;
            let text = if object {
                format!(r#"{{"value": {v}, "unit": "C", "battery": 87}}"#)
            } else {
                format!("{v}")
            };
            Reading {
                topic: format!("sensors/site{}/dev{i}/temp", i % 10),
                received: UNIX_EPOCH,
                payload: Payload::decode(Bytes::from(text)),
                traceparent: None,
            }
        })
        .collect()
}

/// Every reading one `step` later than the round before.
fn advance(rs: &mut [Reading], t: &mut f64, step: f64) {
    *t += step;
    for r in rs.iter_mut() {
        r.received = UNIX_EPOCH + Duration::from_secs_f64(*t);
    }
}

fn bench(c: &mut Criterion) {
    let rules = Config::defaults().rules;
    let mut g = c.benchmark_group("web");
    g.throughput(Throughput::Elements(SENSORS as u64));
    for object in [false, true] {
        let kind = if object { "object" } else { "number" };
        let mut rs = readings(object);
        let mut t = 1_700_000_000.0;
        let mut engine = Engine::new(&rules, "edge/bench");
        let (mut tap, _requests) = Tap::channel();
        let mut out = Vec::with_capacity(4096);
        for _ in 0..30 {
            advance(&mut rs, &mut t, 1.0);
            for r in &rs {
                engine.process(r, &mut out);
                tap.reading(r, SENSORS);
            }
            out.clear();
        }
        // Readings 0.1 s apart: a fast sensor, whose object payloads are parsed once a second.
        g.bench_function(format!("shipped rules, {kind} payloads"), |b| {
            b.iter(|| {
                advance(&mut rs, &mut t, 0.1);
                for r in &rs {
                    engine.process(r, &mut out);
                }
                out.clear();
            })
        });
        g.bench_function(
            format!("shipped rules + page recorder, {kind} payloads"),
            |b| {
                b.iter(|| {
                    advance(&mut rs, &mut t, 0.1);
                    for r in &rs {
                        engine.process(r, &mut out);
                        tap.reading(r, SENSORS);
                    }
                    out.clear();
                })
            },
        );
        g.bench_function(format!("page recorder alone, {kind} payloads"), |b| {
            b.iter(|| {
                advance(&mut rs, &mut t, 0.1);
                for r in &rs {
                    tap.reading(r, SENSORS);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
