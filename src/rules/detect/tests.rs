//! Behaviour of the default detectors on clean periodic signals, a stuck sensor and a spike,
//! through the shipped default rules (config/edgegate.toml).

use super::*;
use crate::rules::backtest;

/// (score, alert) per reading of `values` sampled every `step` seconds, default rules.
fn run_defaults(values: &[f64], step: u64) -> Vec<(f64, bool)> {
    let mut csv = String::from("timestamp,value\n");
    for (i, v) in values.iter().enumerate() {
        csv.push_str(&format!("{},{v}\n", 1_700_000_000 + i as u64 * step));
    }
    let mut out = Vec::new();
    backtest::run(
        &backtest::default_rules(),
        "",
        csv.as_bytes(),
        "sensors/x",
        true,
        &mut out,
    )
    .expect("backtest runs");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[2].parse().expect("score"), f[3] == "1")
        })
        .collect()
}

fn alerts(r: &[(f64, bool)]) -> Vec<usize> {
    r.iter()
        .enumerate()
        .filter(|(_, (_, a))| *a)
        .map(|(i, _)| i)
        .collect()
}

/// Uniform noise in [-0.5, 0.5) (xorshift).
fn noise(x: &mut u64) -> f64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
}

/// 30 days at 5-minute readings.
const N: usize = 30 * 288;

#[test]
fn no_alert_on_a_noiseless_daily_sine() {
    let v: Vec<f64> = (0..N)
        .map(|i| 50.0 + 20.0 * (std::f64::consts::TAU * i as f64 / 288.0).sin())
        .collect();
    let r = run_defaults(&v, 300);
    assert_eq!(alerts(&r), Vec::<usize>::new());
    assert!(r.iter().all(|(s, _)| *s < 0.5));
}

#[test]
fn no_alert_on_a_pump_running_8_hours_a_day() {
    // Noiseless square wave (on 3.2 A for 8 h, off 0 A for 16 h), one reading a minute.
    let square: Vec<f64> = (0..20 * 1440)
        .map(|i| if i % 1440 < 480 { 3.2 } else { 0.0 })
        .collect();
    let r = run_defaults(&square, 60);
    assert_eq!(alerts(&r), Vec::<usize>::new());
    assert!(r.iter().all(|(s, _)| *s < 0.5));
    // The same with noise while it runs: its first stops are new (the pump had only ever run
    // with noise), nothing after the second day.
    let mut x = 1u64;
    let noisy: Vec<f64> = square
        .iter()
        .map(|&v| {
            if v > 0.0 {
                v + 0.05 * noise(&mut x)
            } else {
                0.0
            }
        })
        .collect();
    let r = run_defaults(&noisy, 60);
    assert!(alerts(&r).iter().all(|&i| i < 2 * 1440), "{:?}", alerts(&r));
}

#[test]
fn a_stuck_sensor_raises_one_alert_with_a_high_score_at_its_onset_only() {
    // A noisy daily signal, stuck at one value for 12 hours from reading 4000.
    let mut x = 7u64;
    let mut v: Vec<f64> = (0..N)
        .map(|i| {
            20.0 + 5.0 * (std::f64::consts::TAU * i as f64 / 288.0).sin() + 0.3 * noise(&mut x)
        })
        .collect();
    let stuck = v[4000];
    for y in &mut v[4000..4144] {
        *y = stuck;
    }
    let r = run_defaults(&v, 300);
    let a = alerts(&r);
    // flatline for = "30m", min_count = 10: the 10th reading of the run, 45 minutes in.
    assert_eq!(a, vec![4009], "alerts at {a:?}");
    assert!(r[4009].0 >= 0.9, "onset score {}", r[4009].0);
    let high = r.iter().filter(|(s, _)| *s >= 0.5).count();
    assert_eq!(high, 1, "score held high after the onset");
}

#[test]
fn a_spike_alerts_on_its_reading_and_the_score_falls_back() {
    let mut x = 3u64;
    let mut v: Vec<f64> = (0..3000).map(|_| 10.0 + noise(&mut x)).collect();
    v[2000] = 20.0;
    let r = run_defaults(&v, 60);
    assert_eq!(alerts(&r), vec![2000]);
    assert!(r[2000].0 > 0.9);
    assert!(r[2005..].iter().all(|(s, _)| *s < 0.5));
}

#[test]
fn a_constant_series_is_not_stuck() {
    let r = run_defaults(&[42.0; 5000], 300);
    assert_eq!(alerts(&r), Vec::<usize>::new());
}

#[test]
fn per_sensor_state_is_small() {
    // Stated in the module docs and ARCHITECTURE.md.
    println!(
        "Outlier {} B, Flatline {} B, DetectorState {} B",
        std::mem::size_of::<Outlier>(),
        std::mem::size_of::<Flatline>(),
        std::mem::size_of::<DetectorState>()
    );
    assert!(std::mem::size_of::<Outlier>() <= 104);
    assert!(std::mem::size_of::<Flatline>() <= 48);
    assert!(std::mem::size_of::<DetectorState>() <= 112);
}
