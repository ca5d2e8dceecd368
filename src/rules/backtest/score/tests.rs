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
