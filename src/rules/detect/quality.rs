//! Measured quality of the outlier detector on generated series with injected anomalies.
//!
//! `cargo test --release --lib outlier_quality -- --ignored --nocapture` prints, per anomaly
//! type and per parameter set, recall (share of anomalies alerted inside their window), mean
//! delay (readings from window start to the alert) and precision (alert starts inside windows /
//! all alert starts), over 40 series each.

use super::{Outlier, Params, Transition, OUTLIER_Z, PARAMS};

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    None,
    Spike,
    LevelShift,
    Drift,
    VarianceUp,
    Stuck,
    HeavyTailNoise,
}

const N: usize = 4000;
const AT: usize = 2500;

/// A series (daily cycle of 288 readings, slow drift, noise) and its anomaly window.
fn series(kind: Kind, seed: u64) -> (Vec<f64>, Option<(usize, usize)>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let level = 10.0 + 90.0 * rng.uniform();
    let sigma = 0.2 + 2.0 * rng.uniform();
    let amp = sigma * 8.0 * rng.uniform();
    let mut v: Vec<f64> = (0..N)
        .map(|i| {
            level
                + amp * (std::f64::consts::TAU * i as f64 / 288.0).sin()
                + 0.0005 * sigma * i as f64
                + sigma * rng.normal()
        })
        .collect();
    let window = match kind {
        Kind::None => None,
        Kind::HeavyTailNoise => {
            // Not an anomaly: occasional 4-sigma bumps everywhere (real sensors are not Gaussian).
            for x in v.iter_mut() {
                if rng.uniform() < 0.01 {
                    *x += 4.0 * sigma * rng.normal().signum();
                }
            }
            None
        }
        Kind::Spike => {
            v[AT] += 10.0 * sigma * if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            Some((AT, AT + 5))
        }
        Kind::LevelShift => {
            for x in &mut v[AT..] {
                *x += 6.0 * sigma;
            }
            Some((AT, AT + 150))
        }
        Kind::Drift => {
            for (k, x) in v[AT..].iter_mut().enumerate() {
                *x += 0.05 * sigma * k.min(300) as f64;
            }
            Some((AT, AT + 300))
        }
        Kind::VarianceUp => {
            for x in &mut v[AT..AT + 300] {
                *x += 4.0 * sigma * rng.normal();
            }
            Some((AT, AT + 300))
        }
        Kind::Stuck => {
            let s = v[AT];
            for x in &mut v[AT..AT + 300] {
                *x = s;
            }
            // The window includes the return to normal (the jump back is part of the episode).
            Some((AT, AT + 320))
        }
    };
    (v, window)
}

struct Score {
    detected: usize,
    anomalies: usize,
    delay: usize,
    tp_alerts: usize,
    all_alerts: usize,
}

fn evaluate(kind: Kind, p: &Params, z: f64) -> Score {
    let mut s = Score {
        detected: 0,
        anomalies: 0,
        delay: 0,
        tp_alerts: 0,
        all_alerts: 0,
    };
    for seed in 1..=40 {
        let (v, window) = series(kind, seed);
        let mut d = Outlier::default();
        let mut first = None;
        for (i, x) in v.iter().enumerate() {
            let verdict = d.update_with(p, z, 30, *x);
            if verdict.transition == Some(Transition::Start) {
                s.all_alerts += 1;
                if let Some((a, b)) = window {
                    if i >= a && i < b {
                        s.tp_alerts += 1;
                        first.get_or_insert(i - a);
                    }
                }
            }
        }
        if window.is_some() {
            s.anomalies += 1;
            if let Some(delay) = first {
                s.detected += 1;
                s.delay += delay;
            }
        }
    }
    s
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn outlier_quality() {
    let kinds = [
        Kind::Spike,
        Kind::LevelShift,
        Kind::Drift,
        Kind::VarianceUp,
        Kind::Stuck,
        Kind::None,
        Kind::HeavyTailNoise,
    ];
    let variants = [
        ("default", PARAMS, OUTLIER_Z),
        ("z=5", PARAMS, 5.0),
        ("z=8", PARAMS, 8.0),
        (
            "no trend",
            Params {
                beta: 0.0,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "alpha=0.3",
            Params {
                alpha: 0.3,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "alpha=0.03",
            Params {
                alpha: 0.03,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "gamma=0.005",
            Params {
                gamma: 0.005,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "no clip",
            Params {
                clip: 1e9,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "no sustain",
            Params {
                sustain: 0.0,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "sustain=0.15",
            Params {
                sustain: 0.15,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
        (
            "sustain=0.5",
            Params {
                sustain: 0.5,
                ..PARAMS
            },
            OUTLIER_Z,
        ),
    ];
    for (name, p, z) in variants {
        println!("== {name}");
        let (mut tp, mut all) = (0, 0);
        for kind in kinds {
            let s = evaluate(kind, &p, z);
            tp += s.tp_alerts;
            all += s.all_alerts;
            let recall = if s.anomalies > 0 {
                format!("{:.2}", s.detected as f64 / s.anomalies as f64)
            } else {
                "-".into()
            };
            let delay = if s.detected > 0 {
                format!("{:.1}", s.delay as f64 / s.detected as f64)
            } else {
                "-".into()
            };
            println!(
                "{kind:>15?}: recall {recall:>4}  delay {delay:>5}  alerts {:>4} (in window {:>3})  precision {:.2}",
                s.all_alerts,
                s.tp_alerts,
                if s.all_alerts > 0 { s.tp_alerts as f64 / s.all_alerts as f64 } else { 1.0 }
            );
        }
        println!(
            "   overall precision {:.2}",
            if all > 0 { tp as f64 / all as f64 } else { 1.0 }
        );
    }
}
