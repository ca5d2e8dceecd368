//! The scorer against hand-computed cases.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn alerts(n: usize, at: &[usize]) -> Vec<bool> {
    (0..n).map(|i| at.contains(&i)).collect()
}

#[test]
fn sigma_is_nabs_scaled_sigmoid() {
    assert!(close(sigma(0.0), 0.0));
    // 2 / (1 + e^-5) - 1
    assert!(close(sigma(-1.0), 2.0 / (1.0 + (-5.0f64).exp()) - 1.0));
    assert!((sigma(-1.0) - 0.986_614_298).abs() < 1e-8);
    assert!(close(sigma(3.5), -1.0));
}

#[test]
fn never_alerting_scores_zero_and_a_detection_on_the_first_row_100() {
    let w = [(10, 19)];
    let none = score_rows(&alerts(40, &[]), &w, 0.0);
    assert_eq!(
        (none.windows, none.windows_detected, none.false_alerts),
        (1, 0, 0)
    );
    assert!(close(none.raw, -1.0));
    assert!(close(
        normalized(none.raw, none.null, none.perfect).unwrap(),
        0.0
    ));
    let perfect = score_rows(&alerts(40, &[10]), &w, 0.0);
    assert!(close(
        normalized(perfect.raw, perfect.null, perfect.perfect).unwrap(),
        100.0
    ));
    assert_eq!(perfect.delays, vec![0]);
}

#[test]
fn a_late_detection_a_repeat_and_false_alerts_by_hand() {
    // Window rows 10..=19 (len 10). Detection at 15: y = -(19 - 15 + 1) / 10 = -0.5.
    // The repeat at 17 counts nothing. False alert at 22: y = (22 - 19) / 10 = 0.3, cost
    // 0.11 * sigma(0.3). False alert at 3, before any window: -0.11.
    let s = score_rows(&alerts(40, &[3, 15, 17, 22]), &[(10, 19)], 0.0);
    let want = sigma(-0.5) + 0.11 * sigma(0.3) - 0.11;
    assert!(close(s.raw, want), "{} != {want}", s.raw);
    assert_eq!((s.windows_detected, s.false_alerts), (1, 2));
    assert_eq!(s.delays, vec![5]);
    // sigma(-0.5) = 2 / (1 + e^-2.5) - 1 = 0.848283...; sigma(0.3) = 2 / (1 + e^1.5) - 1
    assert!((sigma(-0.5) - 0.848_283_639_9).abs() < 1e-9);
    let norm = normalized(s.raw, s.null, s.perfect).unwrap();
    assert!(close(norm, 100.0 * (want + 1.0) / (sigma(-1.0) + 1.0)));
}

#[test]
fn probation_rows_count_neither_way_and_missed_windows_cost_one() {
    // 20 rows, probation 0.25: rows 0..5 ignored. Two windows, one missed.
    let s = score_rows(&alerts(20, &[1, 8]), &[(7, 9), (14, 16)], 0.25);
    // Detection at 8 in window 7..=9: y = -(9 - 8 + 1) / 3.
    let want = sigma(-2.0 / 3.0) - 1.0;
    assert!(close(s.raw, want));
    assert_eq!((s.windows_detected, s.false_alerts), (1, 0));
    // Far after a window (y > 3) a false alert costs the full 0.11.
    let far = score_rows(&alerts(60, &[50]), &[(0, 9)], 0.0);
    assert!(close(far.raw, -1.0 - 0.11));
}

#[test]
fn timestamp_windows_map_to_rows_and_overlaps_merge() {
    let t = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
    let times: Vec<_> = (0..10).map(|i| t(i * 10)).collect();
    // [15, 45] covers rows 2..=4; [40, 60] overlaps it; [200, 300] covers no row.
    let w = row_windows(&times, &[(t(15), t(45)), (t(40), t(60)), (t(200), t(300))]);
    assert_eq!(w, vec![(2, 6)]);
}

/// NAB's formats as its repository ships them: data files `timestamp,value` with a header under
/// subdirectories, CRLF line ends and a trailing newline, values in exponent notation, negative
/// and integral; `combined_windows.json` with 6-digit fractions of seconds, `[]` for a series
/// without incident, and (as an editor on Windows saves it) a byte order mark (refused before),
/// as the data file without header may have one too (the csv crate skips it).
#[test]
fn nab_data_and_combined_windows_are_read_as_nab_writes_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("realKnownCause");
    let art = tmp.path().join("artificialNoAnomaly");
    std::fs::create_dir_all(&real).expect("mkdir");
    std::fs::create_dir_all(&art).expect("mkdir");
    let stamp = |i: usize| format!("2014-04-01 {:02}:{:02}:00", i / 60, i % 60);
    // 300 readings around 1.0E-4 (exponent notation, a deterministic wobble), a spike of -0.5
    // at row 220 inside the window rows 210..=230.
    let mut data = String::from("timestamp,value\r\n");
    for i in 0..300 {
        let v = if i == 220 {
            "-0.5".to_string()
        } else {
            format!(
                "{:.2E}",
                1.0e-4 * (1.0 + 0.1 * ((i * 7919 % 13) as f64 - 6.0) / 6.0)
            )
        };
        data.push_str(&format!("{},{v}\r\n", stamp(i)));
    }
    std::fs::write(real.join("nyc_taxi.csv"), data).expect("write");
    // Integers, no header, a byte order mark.
    let mut flat = String::from("\u{feff}");
    for i in 0..300 {
        flat.push_str(&format!("{},{}\n", stamp(i), 10 + i % 3));
    }
    std::fs::write(art.join("art_flat.csv"), flat).expect("write");
    let labels = tmp.path().join("combined_windows.json");
    std::fs::write(
        &labels,
        "\u{feff}{\r\n    \"artificialNoAnomaly/art_flat.csv\": [],\r\n    \"realKnownCause/nyc_taxi.csv\": [\r\n        [\r\n            \"2014-04-01 03:30:00.000000\",\r\n            \"2014-04-01 03:50:00.000000\"\r\n        ]\r\n    ]\r\n}\r\n",
    )
    .expect("write");
    let labels = read_labels(&labels).expect("NAB's labels file");
    let r = evaluate(
        &super::super::default_rules(),
        tmp.path(),
        &labels,
        PROBATION,
    )
    .expect("NAB's data files");
    assert_eq!((r.series, r.windows), (2, 1));
    // Every row a reading: the header is no row, the byte order mark no header.
    assert_eq!(r.readings, 600, "{r:?}");
    let taxi = &r.per_series[1].s;
    assert_eq!(taxi.series, "realKnownCause/nyc_taxi.csv");
    // The spike, written as -0.5 among values like 1.04E-4, is detected where it is.
    assert_eq!(taxi.detections, vec![(210, 220)], "{r:?}");
    assert_eq!(r.false_alerts, 0, "{r:?}");
}
