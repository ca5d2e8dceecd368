//! Per-sensor anomaly detectors. Each is a small fixed-size state updated per reading (and, for
//! `missing`, per tick); each reports a score in [0, 1] and, when the anomaly starts or ends, a
//! transition. Once started, an alert stays active until its clear condition holds: one start and
//! one clear per episode, never a flood.

use super::config::DetectorConfig;

#[cfg(test)]
mod quality;

/// Default alert threshold of the outlier detector, in robust standard deviations.
pub const OUTLIER_Z: f64 = 6.0;

/// Outlier detector constants (chosen by measurement, see `quality::outlier_quality`).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Level smoothing.
    pub alpha: f64,
    /// Trend smoothing (fraction of the level correction).
    pub beta: f64,
    /// Spread smoothing.
    pub gamma: f64,
    /// Residuals beyond `clip` sigmas update the baseline as `clip` sigmas.
    pub clip: f64,
    /// Weight of the sustained-shift EWMA (0: off).
    pub sustain: f64,
}

pub const PARAMS: Params = Params {
    alpha: 0.1,
    beta: 0.02,
    gamma: 0.02,
    clip: 3.0,
    sustain: 0.3,
};
const CLEAR_Z_RATIO: f64 = 0.5; // clear below threshold * ratio ...
const CLEAR_COUNT: u32 = 3; // ... for this many consecutive readings
/// Mean absolute deviation of a normal distribution is 0.7979 sigma.
const MAD_TO_SIGMA: f64 = 1.2533;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Start,
    Clear,
}

/// What a detector says about one reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verdict {
    pub transition: Option<Transition>,
    pub score: f64,
    pub expected: Option<f64>,
    pub band: Option<(f64, f64)>,
    /// Whether the detector is in alarm after this reading.
    pub active: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Outlier {
    n: u32,
    level: f64,
    trend: f64,
    /// Running mean absolute residual (robust: residuals are clipped before they enter).
    spread: f64,
    slow_spread: f64,
    /// EWMA of the standardised residual (sustained shifts).
    zbar: f64,
    active: bool,
    calm: u32,
}

impl Outlier {
    pub fn update(&mut self, threshold: f64, warmup: u32, v: f64) -> Verdict {
        self.update_with(&PARAMS, threshold, warmup, v)
    }

    pub fn update_with(&mut self, p: &Params, threshold: f64, warmup: u32, v: f64) -> Verdict {
        let (alpha, beta, gamma, clip) = (p.alpha, p.beta, p.gamma, p.clip);
        self.n = self.n.saturating_add(1);
        if self.n == 1 {
            self.level = v;
            return Verdict::default();
        }
        let pred = self.level + self.trend;
        let r = v - pred;
        let floor = 1e-9 + 1e-6 * self.level.abs();
        let sigma = (self.spread.max(0.5 * self.slow_spread) * MAD_TO_SIGMA).max(floor);
        let z = r.abs() / sigma;
        let warming = self.n <= warmup;
        // Warm-up: plain running means, so the first readings set the baseline quickly.
        let a = if warming {
            (1.0 / self.n as f64).max(alpha)
        } else {
            alpha
        };
        let g = if warming {
            (1.0 / (self.n - 1) as f64).max(gamma)
        } else {
            gamma
        };
        let rc = if warming {
            r
        } else {
            r.clamp(-clip * sigma, clip * sigma)
        };
        self.level = pred + a * rc;
        if !warming {
            self.trend += beta * a * rc;
        }
        self.spread += g * (rc.abs() - self.spread);
        // A slow copy of the spread floors the fast one at half its size: a stuck or unusually
        // quiet stretch does not make the next normal noise look anomalous.
        self.slow_spread += g * 0.1 * (rc.abs() - self.slow_spread);
        if warming {
            self.slow_spread = self.spread;
        }
        // Sustained shifts: a short EWMA of the standardised residual, scaled to unit variance
        // (the EWMA of iid N(0,1) with weight w has variance w / (2 - w)).
        let zs = (r / sigma).clamp(-2.0 * threshold, 2.0 * threshold);
        self.zbar += p.sustain * (zs - self.zbar);
        let zbar = self.zbar.abs() / (p.sustain / (2.0 - p.sustain)).sqrt();
        let z = if p.sustain > 0.0 { z.max(zbar) } else { z };
        let band = (pred - threshold * sigma, pred + threshold * sigma);
        if warming {
            return Verdict {
                expected: Some(pred),
                band: Some(band),
                ..Verdict::default()
            };
        }
        let score = z * z / (z * z + threshold * threshold);
        let mut transition = None;
        if !self.active && z >= threshold {
            self.active = true;
            self.calm = 0;
            transition = Some(Transition::Start);
        } else if self.active {
            if z < threshold * CLEAR_Z_RATIO {
                self.calm += 1;
                if self.calm >= CLEAR_COUNT {
                    self.active = false;
                    transition = Some(Transition::Clear);
                }
            } else {
                self.calm = 0;
            }
        }
        Verdict {
            transition,
            score,
            expected: Some(pred),
            band: Some(band),
            active: self.active,
        }
    }
}

/// Debounced condition: true for `min` seconds before it starts.
#[derive(Debug, Clone, Default)]
struct Debounce {
    pending_since: Option<f64>,
    active: bool,
}

impl Debounce {
    fn step(&mut self, t: f64, beyond: bool, cleared: bool, min: f64) -> Option<Transition> {
        if self.active {
            if cleared {
                self.active = false;
                self.pending_since = None;
                return Some(Transition::Clear);
            }
            return None;
        }
        if beyond {
            let since = *self.pending_since.get_or_insert(t);
            if t - since >= min {
                self.active = true;
                return Some(Transition::Start);
            }
        } else {
            self.pending_since = None;
        }
        None
    }
}

/// The state of one detector for one sensor.
#[derive(Debug, Clone, Default)]
pub struct DetectorState {
    debounce: Debounce,
    outlier: Outlier,
    prev: Option<(f64, f64)>,
    anchor: Option<(f64, f64)>,
    count: u32,
    /// Last reading time (for `missing`).
    pub last_seen: f64,
    pub seen: bool,
    active: bool,
}

impl DetectorState {
    pub fn active(&self) -> bool {
        self.active || self.debounce.active || self.outlier.active
    }

    /// Update with a reading `v` at `t` (seconds).
    pub fn update(&mut self, cfg: &DetectorConfig, t: f64, v: f64) -> Verdict {
        self.last_seen = t;
        self.seen = true;
        match cfg {
            DetectorConfig::Threshold {
                above,
                below,
                hysteresis,
                min_duration,
            } => {
                let hi = above.unwrap_or(f64::INFINITY);
                let lo = below.unwrap_or(f64::NEG_INFINITY);
                let beyond = v > hi || v < lo;
                let cleared = v <= hi - hysteresis && v >= lo + hysteresis;
                let transition = self
                    .debounce
                    .step(t, beyond, cleared, min_duration.as_secs_f64());
                Verdict {
                    transition,
                    score: if beyond { 1.0 } else { 0.0 },
                    expected: None,
                    band: Some((lo, hi)),
                    active: self.debounce.active,
                }
            }
            DetectorConfig::RateOfChange {
                max_rate,
                min_duration,
            } => {
                let rate = match self.prev {
                    Some((pt, pv)) if t > pt => (v - pv).abs() / (t - pt),
                    Some(_) => return Verdict::default(),
                    None => 0.0,
                };
                self.prev = Some((t, v));
                let beyond = rate > *max_rate;
                let transition = self
                    .debounce
                    .step(t, beyond, !beyond, min_duration.as_secs_f64());
                Verdict {
                    transition,
                    score: rate / (rate + max_rate.max(f64::MIN_POSITIVE)),
                    expected: None,
                    band: Some((-max_rate, *max_rate)),
                    active: self.debounce.active,
                }
            }
            DetectorConfig::Outlier { threshold, warmup } => {
                self.outlier.update(*threshold, *warmup, v)
            }
            DetectorConfig::Flatline {
                epsilon,
                duration,
                min_count,
            } => {
                let mut transition = None;
                match self.anchor {
                    Some((t0, v0)) if (v - v0).abs() <= epsilon.max(1e-12 * v0.abs()) => {
                        self.count = self.count.saturating_add(1);
                        if !self.active
                            && t - t0 >= duration.as_secs_f64()
                            && self.count >= *min_count
                        {
                            self.active = true;
                            transition = Some(Transition::Start);
                        }
                    }
                    _ => {
                        if self.active {
                            self.active = false;
                            transition = Some(Transition::Clear);
                        }
                        self.anchor = Some((t, v));
                        self.count = 1;
                    }
                }
                Verdict {
                    transition,
                    score: if self.active { 1.0 } else { 0.0 },
                    expected: None,
                    band: self.anchor.map(|(_, v0)| (v0 - epsilon, v0 + epsilon)),
                    active: self.active,
                }
            }
            DetectorConfig::Missing { .. } => {
                let transition = if self.active {
                    self.active = false;
                    Some(Transition::Clear)
                } else {
                    None
                };
                Verdict {
                    transition,
                    ..Verdict::default()
                }
            }
        }
    }

    /// Timer check (only `missing` acts on it): start when nothing arrived for `after`.
    pub fn tick(&mut self, cfg: &DetectorConfig, now: f64) -> Option<Transition> {
        if let DetectorConfig::Missing { after } = cfg {
            if self.seen && !self.active && now - self.last_seen >= after.as_secs_f64() {
                self.active = true;
                return Some(Transition::Start);
            }
        }
        None
    }
}
