//! Relative entropy of the recent value histogram (the idea of Wang et al. 2011, "Statistical
//! techniques for online anomaly detection in data centers"; our own code): the distribution of
//! the last ~50 readings over a few fixed bins is compared with the sensor's long distribution
//! (~1,000 readings) by the G statistic, `G = 2 n KL(p || q)`. It sees what the level features
//! cannot: a sensor that flips between two levels, or whose noise narrows or changes its
//! shape, with the same mean and spread as before.
//!
//! Unlike NAB's `relativeEntropy` detector, a window that the long distribution does not
//! explain at a chi-square level is not an anomaly by itself: `G` is one more surprise feature
//! of the outlier detector, compared with its own recent maximum (a daily cycle's phases, a
//! bursty series' windows are no news) and with the chi-square level as its noise floor.
//! (Development sets: NAB's rule, a handful of remembered distributions and "no match is an
//! anomaly", gave thousands of false alerts: real windows are autocorrelated, and a series with
//! a cycle or a trend shows a new distribution every few hours.)
//!
//! Invariants: `p` and `q` sum to `p_sum` and `q_sum` (EWMAs of one-hot vectors up to a scale,
//! running means at first; normalized to 1 every `EVERY` readings); the bins are fixed once
//! framed (a shifting frame would make every window new). State: 92 bytes on the heap, allocated when the bins are framed (after `SETTLE` readings).

use super::{squash, HeldMax, BLOCK};

/// Bins: the outer two are open-ended.
const BINS: usize = 7;
/// EWMA rate of the recent histogram: an effective window of `2 / RATE - 1` = 51 readings.
const RATE: f64 = 1.0 / 26.0;
/// EWMA rate of the long histogram (the reference). (Development sets, sum of 13 scores, 1091.2
/// without the feature: 1/100, 1/300, 1/1,000 gave 1091.2, 1091.9, 1092.0 with `MATURE` 1,500;
/// 1/3,300 1087.4 with 600. README, "Fifth round", has the rest.)
const LONG: f64 = 0.001;
/// Noise floor of `G`: chi-square with 6 degrees of freedom at 0.999. (12, 22.5, 40: 1092.0,
/// 1092.0, 1091.7; the novelty ratio decides.)
const LEVEL: f64 = 22.46;
/// Readings after the framing before the feature scores (its maximum learns meanwhile):
/// about 5 days of 5-minute readings. (900: 1091.1, 6 false alerts more, on SKAB's sensors;
/// 3,000: 1091.7 with the reference at 1/300.)
const MATURE: u32 = 1_500;
/// Readings between two evaluations of `G` (every reading: 1092.1 with one false alert more,
/// 7 logarithms more per reading).
const EVERY: u32 = 4;

/// The histogram feature's state (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    /// Bin edges: `centre + (k - 3.5) / inv_width` for `k` in `1..BINS`.
    centre: f32,
    inv_width: f32,
    /// Recent distribution over the bins, and the long one, unnormalized: their sums are
    /// `p_sum`, `q_sum` (a reading adds to one bin instead of decaying all, see `update`).
    p: [f32; BINS],
    q: [f32; BINS],
    p_sum: f32,
    q_sum: f32,
    /// Readings since framed.
    seen: u32,
    /// The score of the last evaluation (held until the next one).
    last: f32,
    /// Recent maximum of `G` (rolled with the detector's other maxima).
    pub(super) max: HeldMax,
}

impl Histogram {
    /// Bins centred on `centre`, `width` wide (the sensor's mean absolute deviation: a two-level
    /// sensor's levels sit in the middle of two bins, normal noise spreads over five).
    pub(super) fn new(centre: f64, width: f64) -> Self {
        Histogram {
            centre: centre as f32,
            inv_width: (1.0 / width) as f32,
            p: [0.0; BINS],
            q: [0.0; BINS],
            p_sum: 0.0,
            q_sum: 0.0,
            seen: 0,
            last: 0.0,
            max: HeldMax::default(),
        }
    }

    fn bin(&self, x: f64) -> usize {
        let k = (x - f64::from(self.centre)) * f64::from(self.inv_width) + BINS as f64 / 2.0;
        // The detector skips non-finite readings; `as` saturates.
        (k.max(0.0) as usize).min(BINS - 1)
    }

    /// Takes `x` in and returns the feature's score in [0, 1]: `G` against `ratio` times its
    /// recent maximum and against `LEVEL`, like the detector's other features; 0 while it
    /// learns or when `scoring` is false (its maximum still learns).
    pub(super) fn update(&mut self, x: f64, scoring: bool, ratio: f64) -> f64 {
        let k = self.bin(x);
        self.seen = self.seen.saturating_add(1);
        // Running means at first (no transient from empty bins), then EWMAs: decaying every bin
        // by `1 - a` and adding `a` to bin `k` is, up to the scale, adding `a / (1 - a)` of the
        // sum to bin `k` (normalized every `EVERY` readings; a running mean's first reading
        // is the whole).
        // With `a = max(1 / seen, rate)`, `a / (1 - a)` is `1 / (seen - 1)` or a constant.
        let seen = self.seen;
        let add = |h: &mut [f32; BINS], sum: &mut f32, rate: f64| {
            let inc = if seen <= 1 || *sum <= 0.0 {
                *h = [0.0; BINS];
                1.0
            } else if f64::from(seen) * rate < 1.0 {
                *sum / (seen - 1) as f32
            } else {
                *sum * (rate / (1.0 - rate)) as f32
            };
            h[k] += inc;
            *sum += inc;
        };
        add(&mut self.p, &mut self.p_sum, RATE);
        add(&mut self.q, &mut self.q_sum, LONG);
        if !self.seen.is_multiple_of(EVERY) {
            return if scoring { f64::from(self.last) } else { 0.0 };
        }
        for (h, sum) in [
            (&mut self.p, &mut self.p_sum),
            (&mut self.q, &mut self.q_sum),
        ] {
            let r = 1.0 / *sum;
            for v in h.iter_mut() {
                *v *= r;
            }
            *sum = 1.0;
        }
        let window = 2.0 / RATE - 1.0;
        if f64::from(self.seen) < window {
            return 0.0;
        }
        // q smoothed by half a reading of the recent window per bin (no bin of probability 0).
        let eps = 0.5 / window;
        let total = 1.0 + BINS as f64 * eps;
        let kl: f64 = self
            .p
            .iter()
            .zip(&self.q)
            .filter(|(&p, _)| p > 1e-6)
            .map(|(&p, &q)| {
                let (p, q) = (f64::from(p), (f64::from(q) + eps) / total);
                p * (p / q).ln()
            })
            .sum();
        let g = 2.0 * window * kl.max(0.0);
        let m = self.max.get();
        let score = if self.seen >= MATURE && m > 0.0 {
            squash(g / (ratio * m)).min(squash(g / LEVEL))
        } else {
            0.0
        };
        // Evaluations come every `EVERY` readings: `seen` is a multiple of the block's.
        self.max.take(BLOCK, self.seen, g, m);
        self.last = if scoring { score as f32 } else { 0.0 };
        f64::from(self.last)
    }
}
