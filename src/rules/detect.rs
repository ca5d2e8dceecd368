//! Per-sensor anomaly detectors. Each is a small fixed-size state updated per reading (and, for
//! `missing`, per tick); each reports a score in [0, 1] and, when an anomaly starts or ends, a
//! transition. Once started, an alert stays active until its clear condition holds: one start and
//! one clear per episode, never a flood.
//!
//! ## Scores
//! `score` is an anomaly likelihood: 0.5 is the alert threshold, and for `outlier` and
//! `flatline` it is high on the reading where an anomaly starts and falls back afterwards (it is
//! not a flag held through an episode), so "readings with score >= x" counts onsets, not
//! durations.
//!
//! ## Outlier: novelty of surprise (see [`Outlier`])
//! Real series differ wildly (noiseless cycles, square waves, counts with bursts, heavy tails,
//! steps that become the new normal), so no fixed z-score fits them all. The detector asks
//! instead "is this reading more surprising, by a clear factor, than anything this sensor did
//! recently?": each surprise feature is compared with its own recent maximum (an
//! extreme-value baseline that learns each series' normal bursts, cycles and tails), and
//! separately with a noise floor in robust sigmas. An ensemble: the raw score is the largest of
//! nine such feature scores (jump, shift, drift, slow drift, time of day, seasonal drift, hour
//! of week, weekly drift, value histogram).
//!
//! ## Anomaly likelihood (see [`Outlier::likelihood`])
//! The reading's score is the raw score gated by how unusual it is on this series: the short
//! mean of the raw scores against their long mean and standard deviation. On a series whose
//! raw scores are often high (bursty steps, heavy tails, a random walk's drifts) a raw 0.5 is
//! held back; where raw scores are usually near 0, any that reaches 0.5 passes. It only ever
//! lowers the score (so clean signals stay quiet and a stuck sensor is the flatline's).
//!
//! ## Memory: weekly patterns (see `HeldMax`)
//! The maxima of the shift, drift and seasonal features are held, not decayed: a value is
//! remembered for one to two `memory`s (7 days by default), so a weekly pattern's excursions
//! are no news when they come back. The jump's maximum decays (a spike that comes back after
//! some days alerts again), and the largest jump of each weekday of earlier weeks is kept too:
//! a level that steps down every Saturday alerts on the first Saturday only.
//!
//! ## Time of day (seasonal, `seasonal = true`)
//! A sensor's deviation from its long baseline is profiled per hour of the (UTC) day: 24 slots
//! of a time-weighted mean and mean absolute deviation over the last few days, scoring once a
//! slot has been seen on 3 days. A pump running at 3 a.m. when it never did, or not stopping at
//! its usual hour, is out of season though every reading is one it has shown before. The mean
//! of the last ~20 residuals from that profile (the seasonal drift) catches a small shift that
//! lasts (2 sigma) under a daily cycle, where every reading is within the usual range; it
//! learns its maximum from 2 days after the profile first scores (the profile's first days are
//! transients) and scores from 4 days. Both time-of-day features score only while the profile
//! explains some of the sensor's deviation (the mean absolute residual from the profile is
//! below the mean absolute deviation from the baseline): on a series without a daily cycle (a
//! random walk, bursts at random hours) a profile fits noise. Bounded: 288 bytes on the heap per
//! outlier detector (with the weekday jumps), allocated with its first reading.
//!
//! ## Hour of week (see [`Week`])
//! The same deviation is profiled per hour of the (UTC, Monday first) week: 168 slots of a
//! time-weighted mean over about 2 weeks, scoring from a slot's second week, with one robust
//! spread for all slots. A weekday that stays at the weekend's level, or a burst on a weekday
//! the size of the weekly step (no news to the jump's weekday memory), is out of season at its
//! hour of the week. Two features: the reading's residual, and the mean of the last ~20
//! residuals (weekly drift, which a lasting contextual incident builds up); both score only
//! while the weekly profile's mean absolute residual is below 0.8 times the daily profile's on
//! the same readings (a weekly cycle the daily profile does not explain), from 2 days after
//! that comparison starts. Bounded: 896 more bytes on the heap, allocated with the daily
//! profile.
//!
//! ## Value histogram (see [`histogram`], `histogram = true`)
//! The distribution of the last ~50 readings over 7 bins (framed after 300 readings on the long
//! baseline, one mean absolute deviation wide, the outer two open) against the sensor's
//! distribution over ~1,000 readings: the G statistic `2 n KL(p || q)` (relative entropy, Wang
//! et al. 2011, as in NAB's `relativeEntropy`, our own code) is one more surprise feature,
//! against its recent maximum and a chi-square noise floor (22.5, 6 degrees of freedom at
//! 0.999), scoring 1,500 readings after the framing. A sensor flipping between two levels, or
//! whose noise narrows or changes shape with its mean and spread kept, is a new distribution;
//! a shift that lasts empties some bins and fills others some dozen readings before the drift
//! features' means pass their maxima. Not while the value stays put. Bounded: 92 bytes on the
//! heap, evaluated every 4 readings (7 logarithms).
//!
//! ## Flatline: stuck relative to the sensor's own habits
//! A value that stays put is "stuck" only if the sensor used to move: it must have changed at
//! least `min_count` times before, and the run must last `for` and twice its longest earlier run
//! (a square wave's plateaus, a constant series or a count that is 0 every night are its normal).
//! One alert at the onset, score 1 on that reading only.

use crate::config::rules::{DetectorConfig, OutlierSettings};

mod histogram;
#[cfg(test)]
mod tests;

use histogram::Histogram;

/// Smoothing of the fast level (the prediction of the next reading).
const FAST: f64 = 0.3;
/// Smoothing of the short mean (a few readings).
const SHORT: f64 = 0.2;
/// Smoothing of the slow baseline (~50 readings).
const SLOW: f64 = 0.02;
/// Smoothing of the jump feature's mean absolute size (the noise floor).
const SPREAD: f64 = 0.01;
/// After this many identical readings, the first different one re-anchors the levels and is
/// not scored: a stuck or idle stretch says nothing about what comes next (the flatline
/// detector owns the stuck episode, the pump's start after a night off is its normal).
const FLAT_RESET: u32 = 10;
/// A larger surprise raises a feature's maximum by this share of the excess (a soft maximum):
/// one outlier does not blind the detector for the whole `memory`, while recurring events
/// become normal after a few. (Development set: 1.0, a hard maximum, missed level shifts that
/// build up over the short EWMA; 0.3 caught them; 0.1 doubled the false alerts.)
const RISE: f64 = 0.3;
/// Hourly slots of the seasonal profile: one day.
const SLOTS: usize = 24;
const SLOT_SECS: f64 = 3600.0;
/// A slot scores once it has been entered on this many days.
const SEASON_DAYS: u8 = 3;
/// A slot averages about this many of its visits (days).
const SEASON_SPAN: u8 = 3;
/// Floor of the seasonal spread, as a share of the mean deviation from the slow baseline (a
/// noiseless cycle has slots of zero spread).
const SEASON_FLOOR: f64 = 0.1;
/// Smoothing of the medium mean and the long baseline of the drift feature.
const MEDIUM: f64 = 0.05;
const LONG: f64 = 0.005;
/// The drift feature's novelty ratio is `1 + DRIFT_RATIO_SHARE · (ratio - 1)` (1.3 by default).
/// (Development set: 2 caught no SKAB valve incident more; 1.4, 1.3, 1.2 caught 12, 14, 16 of
/// 23 with 15, 19, 30 false alerts, 8, 9, 11 on the generated set.)
const DRIFT_RATIO_SHARE: f64 = 0.7;
/// The seasonal drift feature's novelty ratio is `1 + SDRIFT_RATIO_SHARE · (ratio - 1)`.
const SDRIFT_RATIO_SHARE: f64 = 0.1;
/// Seconds after the profile first scores when the seasonal drift feature's maximum starts to
/// learn, and when the feature scores. The profile's first days are transients (each slot
/// averages its visits, the first ones from a baseline still settling): a maximum learnt then
/// hid a 3-sigma shift for two weeks. (Generated sets: learning from 0, 1, 2, 3 days and
/// scoring from 2, 3, 4, 5 summed 896, 897, 906, 891 over 11 development sets.)
const SDRIFT_LEARN: f64 = 2.0 * 86_400.0;
const SDRIFT_MATURE: f64 = 4.0 * 86_400.0;
/// Smoothing of the slow drift feature's medium mean and long baseline.
const SLOW_MEDIUM: f64 = 0.03;
const SLOW_LONG: f64 = 0.003;
/// Noise floor of the slow drift feature, in robust sigmas. (Development sets: 0.5, 0.7, 1.0
/// summed 897, 896, 880; means over 50/500 and 100/1000 readings 885, 880.)
const SLOW_FLOOR: f64 = 0.7;
/// A weekday's largest jump fades to this share each week (see `Season::weekday_jump`).
const WEEK_FADE: f32 = 0.7;
/// Clipping of the drift features' inputs, in robust sigmas.
const CLIP: f64 = 8.0;
/// Readings are taken in within ±this: no sensor measures more, and the state (some of it in
/// `f32`, differences and multiples of the readings) stays finite. A reading of ±1e308 used to
/// overflow the baselines to infinity and then NaN, and `clamp` with a NaN bound panicked: the
/// rules task died on one reading (outsider try, `huge_readings_neither_panic_nor_score_outside_0_1`).
const VALUE_LIMIT: f64 = 1e30;

/// `x` within `[lo, hi]`, whatever the bounds: unlike `f64::clamp` it never panics (a NaN
/// bound leaves `x` as it is on that side).
fn clip(x: f64, lo: f64, hi: f64) -> f64 {
    x.max(lo).min(hi)
}
/// The drift feature's maximum takes in every reading up to this many.
const SETTLE: u32 = 300;
/// Readings per block of the shift and season features' maxima (see `HeldMax::take`): a
/// reading's value joins them at the end of its pair of readings.
const SHIFT_INTAKE: u32 = 2;
/// Readings per block of the drift features' maxima (see `Outlier::update`).
const BLOCK: u32 = 32;
/// Hour-of-week profile (see [`Week`]): a slot scores from its `WEEK_VISITS`-th week on, its
/// mean averages about `WEEK_SPAN` weeks; the feature scores only while the profile's mean
/// absolute residual is below `WEEK_GAIN` times the daily profile's on the same readings (a
/// weekly cycle the daily profile does not explain) and from `WEEK_MATURE` after that
/// comparison started. (Development sets, sum of 13 scores: gain 0.4, 0.5, 0.6, 0.8, 1.0 gave
/// 1071, 1076, 1082, 1082, 1077 without the maturity; maturity 0, 0.5, 1, 2, 3 days 1085,
/// 1089, 1089, 1090, 1090; 3 visits lost the contextual weekday in the third week.)
const WEEK_SLOTS: usize = 168;
const WEEK_VISITS: u8 = 2;
const WEEK_SPAN: u8 = 2;
const WEEK_GAIN: f32 = 0.8;

const WEEK_MATURE: f64 = 2.0 * 86_400.0;
/// Anomaly likelihood of the raw score (see [`Outlier::likelihood`]): smoothing of its long
/// mean and of its short mean, floor of its standard deviation, and the z at which the gate
/// is 0.5. (Development sets: z 1.5, 2, 3 summed 1068, 1069, 1065 before the weekly profile,
/// 1067.5 without the gate; floors 0.03 to 0.08 the same; long means over ~330 or ~3,300
/// readings 1068, 1068; a short mean over ~5 readings 1055; a boost of the score by the
/// likelihood (alerting on a run of moderately high raw scores) 1061 to 1068.)
const LIKELY_LONG: f64 = 0.001;
const LIKELY_SHORT: f64 = 0.5;
const LIKELY_FLOOR: f64 = 0.05;
const LIKELY_Z: f64 = 2.0;
/// Mean absolute deviation of a normal distribution is 0.7979 sigma.
const MAD_TO_SIGMA: f64 = 1.2533;
/// The episode clears after this many readings below a quarter of the alert level.
const CLEAR_COUNT: u32 = 3;
const CLEAR_SCORE: f64 = 0.25;

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

/// `q^4 / (q^4 + 1)`: 0.5 at q = 1, a likelihood-like squashing of a ratio to its threshold.
fn squash(q: f64) -> f64 {
    let q4 = (q * q) * (q * q);
    if q4.is_finite() {
        q4 / (q4 + 1.0)
    } else {
        1.0
    }
}

/// Outlier detector state (248 bytes, and the 288-byte [`Season`], 896-byte [`Week`] and
/// 92-byte [`Histogram`] on the heap).
///
/// Features of reading `x` at time `t` (levels before the reading is taken in):
/// - jump `j = |x - fast|`, `fast` an EWMA (0.3) of the readings: spikes, steps, noise bursts;
/// - shift `h = |short' - slow|`, `short'` the short EWMA (0.2) including `x`, `slow` an EWMA
///   (0.02): level shifts, drifts, drops that last a few readings;
/// - drift `g = |medium' - long|`, EWMAs 0.05 and 0.005 (running means at first) of the
///   readings clipped to 8 sigma around `fast`: smaller shifts that last; novelty ratio
///   `1 + 0.7 (ratio - 1)`, noise floor 1 sigma;
/// - slow drift `l = |medium_slow' - long_slow|`, EWMAs 0.03 and 0.003 of the same clipped
///   readings: shifts of 1 to 2 sigma that last; same novelty ratio, noise floor 0.7 sigma;
/// - season `e = |d - mean_h| / max(σ_h, σ, 0.1 · mean |d|)`, `d` the reading's deviation from a
///   long baseline (never re-anchored), `mean_h`, `σ_h` its profile in the reading's hour
///   (see [`Season`]); noise floor `threshold`; not scored while the value stays put;
/// - seasonal drift `s = |EWMA_0.05(d - mean_h)|` (residuals clipped to 8 `σ_h`): a small shift
///   that lasts under a daily cycle; novelty ratio `1 + 0.1 (ratio - 1)`, noise floor `σ_h`;
///   its maximum learns once the profile has scored for 2 days, and it scores after 4;
/// - the two time-of-day features score only while the profile's mean absolute residual is
///   below `dev`, the mean absolute deviation from the long baseline (a daily cycle).
/// - hour of week `w = |d - mean_w| / σ_w` (see [`Week`]), noise floor `threshold`, and the
///   weekly drift `|EWMA_0.05(d - mean_w)|` (residuals clipped to 8 `σ_w`), novelty ratio
///   `1 + 0.1 (ratio - 1)`, noise floor `σ_w`; both only where a weekly cycle is found.
/// - value histogram `G = 2 n KL(p || q)`, `p` the distribution of the last ~50 readings over
///   7 fixed bins, `q` that of ~1,000 (see [`histogram`]); noise floor 22.5 (chi-square, 6
///   degrees of freedom, 0.999); from 1,800 readings on.
///
/// Each feature `f` has a maximum `M` of its earlier values: the jump's decays (half-life
/// `memory`, in time) and is at least the largest jump of the same weekday of earlier weeks;
/// the others are held for one to two `memory`s (`HeldMax`, in `f32`), the drift features'
/// taking values in by blocks of 32 readings. Score of a
/// feature: `min(squash(f / (ratio · M)), squash(f / (threshold · σ)))`, with `σ` the robust
/// spread of the jump feature; the raw score is the largest feature score, the reading's score
/// the raw score gated by its likelihood, and 0.5 or more starts an alert. Then `M` takes in `f` (softly, see `RISE`), so an event does not keep
/// alerting and the score falls back. Invariants: `M >= 0`, `σ >= 0`; no
/// alert while `n <= warmup` or while a feature has never been non-zero (no scale to compare).
#[derive(Debug, Clone, Default)]
pub struct Outlier {
    n: u32,
    active: bool,
    calm: u32,
    last_t: f64,
    fast: f64,
    short: f64,
    slow: f64,
    spread: f64,
    max_jump: f64,
    shift_max: HeldMax,
    prev_jump: f64,
    /// Identical readings in a row, and the last reading.
    same: u32,
    last: f64,
    /// Drift feature: medium mean and long baseline, maximum, previous value.
    medium: f64,
    long: f64,
    drift_max: HeldMax,
    /// Slow drift feature: slower medium mean and long baseline, maximum.
    lmed: f64,
    llong: f64,
    ldrift_max: HeldMax,
    /// Seasonal feature: mean absolute deviation from the slow baseline, maximum, previous
    /// value, and the hourly profile (allocated with the first reading, 280 bytes).
    dev: f64,
    /// Long baseline of the seasonal feature, never re-anchored (a pump's start after a night
    /// off is what the profile must see).
    base: f64,
    season_max: HeldMax,
    /// Seasonal drift: medium mean of the profile's residuals, maximum, previous value.
    sdrift: f64,
    sdrift_max: HeldMax,
    /// When the profile first scored (the seasonal drift's maximum learns before it scores).
    sdrift_since: Option<f64>,
    /// When the drift features' current maxima started (see [`HeldMax`]).
    bucket_start: f64,
    season: Option<Box<Season>>,
    /// Likelihood of the raw score (see [`Outlier::likelihood`]): its long mean and mean
    /// square, and its short mean.
    raw_mean: f32,
    raw_sq: f32,
    raw_short: f32,
    /// Relative entropy of the recent value histogram (see [`histogram`]), framed after
    /// `SETTLE` readings.
    hist: Option<Box<Histogram>>,
}

/// The recent maximum of a drift feature: the largest value of the current bucket of time
/// (`memory` long) and of the one before, so a value is remembered between one and two
/// `memory`s. Values are taken in by blocks of `BLOCK` readings (a feature that builds up over
/// a few dozen readings is compared with the maximum from before it), a larger one softly (see
/// `RISE`). Invariant: all fields `>= 0`.
#[derive(Debug, Clone, Copy, Default)]
struct HeldMax {
    cur: f32,
    held: f32,
    /// Largest value of the current block.
    pend: f32,
}

impl HeldMax {
    fn get(&self) -> f64 {
        f64::from(self.cur.max(self.held))
    }

    fn roll(&mut self) {
        self.held = self.cur;
        self.cur = 0.0;
    }

    /// Take in `f`, the value of reading `n`. The largest value of each block of `block`
    /// readings joins the maximum at the block's end (reading `n` of a block of 1 joins before
    /// reading `n + 1` is scored), softly if it is above the current maximum `m`.
    fn take(&mut self, block: u32, n: u32, f: f64, m: f64) {
        self.pend = self.pend.max(f as f32);
        if n.is_multiple_of(block.max(1)) {
            let pend = f64::from(self.pend);
            let v = if pend > m && m > 0.0 {
                m + RISE * (pend - m)
            } else {
                pend
            };
            self.cur = self.cur.max(v as f32);
            self.pend = 0.0;
        }
    }
}

/// Time-of-day profile of a sensor's deviation from its slow baseline: per hourly slot, a
/// time-weighted mean and mean absolute deviation averaging its last few days (`SEASON_SPAN`).
/// Only the deviation is profiled, so a level that drifts or steps is not "out of season".
#[derive(Debug, Clone, Default)]
pub(crate) struct Season {
    mean: [f32; SLOTS],
    mad: [f32; SLOTS],
    /// Days (visits) each slot has seen, saturating.
    visits: [u8; SLOTS],
    /// Slot of the previous reading.
    slot: u8,
    /// Mean absolute residual of the scoring slots (EWMA, `SPREAD`): below the mean absolute
    /// deviation from the baseline when the profile explains some of it.
    resid_dev: f32,
    /// Largest jump of each day of the (UTC) week, Monday first: of the earlier weeks (fading
    /// by `WEEK_FADE` each week) and of this week; and the weekday of the previous reading.
    weekday_jump: [f32; 7],
    weekday_now: [f32; 7],
    weekday: u8,
    week: Option<Box<Week>>,
}

/// Hour-of-week profile of a sensor's deviation from its long baseline (896 bytes on the
/// heap, allocated with the daily profile): per slot a time-weighted mean
/// over about `WEEK_SPAN` weeks, scoring from the slot's `WEEK_VISITS`-th week; its spread is
/// one robust sigma of all slots' residuals. A weekday that looks like a weekend, or a burst on
/// a weekday as large as the weekly step (the jump is no news, the level at that hour of the
/// week is), is out of season here where the daily profile, averaging weekdays and weekends,
/// sees nothing. Invariant: `wres`, `dres >= 0`.
#[derive(Debug, Clone)]
pub(crate) struct Week {
    mean: [f32; WEEK_SLOTS],
    visits: [u8; WEEK_SLOTS],
    slot: u8,
    /// Mean absolute residual from this profile and from the daily one, on the same readings.
    wres: f32,
    dres: f32,
    since: Option<f64>,
    /// The hour-of-week feature's maximum; the weekly drift (medium mean of the residuals) and
    /// its maximum.
    max: HeldMax,
    drift: f32,
    dmax: HeldMax,
}

impl Default for Week {
    fn default() -> Self {
        Week {
            mean: [0.0; WEEK_SLOTS],
            visits: [0; WEEK_SLOTS],
            slot: 0,
            wres: 0.0,
            dres: 0.0,
            since: None,
            max: HeldMax::default(),
            drift: 0.0,
            dmax: HeldMax::default(),
        }
    }
}

/// Takes `|r|` into the mean absolute value `acc` (an EWMA at `SPREAD`, its first value as is).
fn ewma_abs(acc: &mut f32, r: f64) {
    let r = r.abs() as f32;
    *acc += if *acc == 0.0 {
        r
    } else {
        SPREAD as f32 * (r - *acc)
    };
}

impl Week {
    /// Residual of `d` from this hour-of-week's profile and its sigma, and whether the weekly
    /// profile explains the deviation better than the daily one (`daily` residual); `None`
    /// while the slot is new. Then learns `d`.
    fn observe(
        &mut self,
        t: f64,
        dt: f64,
        d: f64,
        daily: Option<f64>,
        floor: f64,
    ) -> Option<(f64, f64, bool)> {
        // 1970-01-01 00:00 was a Thursday: hour 72 of the (Monday first) week.
        let h = ((t / SLOT_SECS).floor() as i64 + 72).rem_euclid(WEEK_SLOTS as i64) as usize;
        if h != usize::from(self.slot) || self.visits[h] == 0 {
            self.visits[h] = self.visits[h].saturating_add(1);
            if self.visits[h] == 1 {
                self.mean[h] = d as f32;
            }
            self.slot = h as u8;
        }
        let resid = d - f64::from(self.mean[h]);
        let out = if self.visits[h] >= WEEK_VISITS {
            if let Some(dr) = daily {
                ewma_abs(&mut self.wres, resid);
                ewma_abs(&mut self.dres, dr);
                self.since.get_or_insert(t);
            }
            let spread = (f64::from(self.wres) * MAD_TO_SIGMA).max(floor);
            let age = self.since.map_or(0.0, |s0| t - s0);
            Some((
                resid,
                spread,
                age >= WEEK_MATURE && self.wres < WEEK_GAIN * self.dres,
            ))
        } else {
            None
        };
        let w = (dt.min(SLOT_SECS / 4.0) / SLOT_SECS) / f64::from(self.visits[h].min(WEEK_SPAN));
        self.mean[h] += (w * resid) as f32;
        out
    }
}

impl Season {
    /// The largest jump of earlier weeks on the weekday of time `t` (a level that steps down
    /// every Saturday is no news on the next Saturday), then takes in `jump`. This week's
    /// jumps count from the next week on: today's are the other maxima's business.
    fn weekday_jump(&mut self, t: f64, jump: f64) -> f64 {
        // 1970-01-01 was a Thursday.
        let day = ((t / 86_400.0).floor() as i64 + 3).rem_euclid(7) as usize;
        if day != usize::from(self.weekday) {
            self.weekday = day as u8;
            self.weekday_jump[day] = self.weekday_now[day].max(WEEK_FADE * self.weekday_jump[day]);
            self.weekday_now[day] = 0.0;
        }
        self.weekday_now[day] = self.weekday_now[day].max(jump as f32);
        f64::from(self.weekday_jump[day])
    }

    /// The residual of deviation `d` at time `t` (`dt` after the previous reading) and the
    /// robust sigma of its slot (floored by `floor`), `None` while the slot is new; then learns
    /// `d`.
    fn observe(&mut self, t: f64, dt: f64, d: f64, floor: f64) -> Option<(f64, f64)> {
        let h = (t.rem_euclid(86_400.0) / SLOT_SECS) as usize % SLOTS;
        if h != usize::from(self.slot) || self.visits[h] == 0 {
            self.visits[h] = self.visits[h].saturating_add(1);
            if self.visits[h] == 1 {
                self.mean[h] = d as f32;
            }
            self.slot = h as u8;
        }
        let (m, s) = (f64::from(self.mean[h]), f64::from(self.mad[h]));
        let resid = d - m;
        let spread = (s * MAD_TO_SIGMA).max(floor);
        let out = (self.visits[h] >= SEASON_DAYS).then_some((resid, spread));
        if out.is_some() {
            ewma_abs(&mut self.resid_dev, resid);
        }
        // Time-weighted: a slot takes in about one hour per visit whatever the sampling rate.
        let w = (dt.min(SLOT_SECS / 4.0) / SLOT_SECS) / f64::from(self.visits[h].min(SEASON_SPAN));
        self.mean[h] += (w * resid) as f32;
        self.mad[h] += (w * (resid.abs() - s)) as f32;
        out
    }
}

impl Outlier {
    /// The anomaly likelihood of raw score `raw` (the largest feature score) as a gate on it:
    /// `squash(z / LIKELY_Z)` with `z` how far the short mean of the raw scores (~2 readings,
    /// this one included) stands above their long mean (~1,000 readings, running at first), in
    /// their long standard deviation (at least `LIKELY_FLOOR`). On a series whose raw scores
    /// are often high (a random walk, bursty steps, heavy tails), a raw 0.5 is no rare event
    /// and the gate stays below it; where they are usually near 0, any raw score that reaches
    /// 0.5 stands out and passes. Then takes `raw` in.
    fn likelihood(&mut self, raw: f64, warmup: u32) -> f64 {
        let short = f64::from(self.raw_short) + LIKELY_SHORT * (raw - f64::from(self.raw_short));
        let mean = f64::from(self.raw_mean);
        let sd = (f64::from(self.raw_sq) - mean * mean)
            .max(0.0)
            .sqrt()
            .max(LIKELY_FLOOR);
        let z = (short - mean) / sd;
        let a = LIKELY_LONG.max(1.0 / f64::from(self.n.saturating_sub(warmup).max(1)));
        self.raw_short = short as f32;
        self.raw_mean += (a * (raw - mean)) as f32;
        self.raw_sq += (a * (raw * raw - f64::from(self.raw_sq))) as f32;
        squash(z.max(0.0) / LIKELY_Z)
    }

    pub fn update(&mut self, s: &OutlierSettings, t: f64, x: f64) -> Verdict {
        if !x.is_finite() {
            return Verdict::default();
        }
        let x = x.clamp(-VALUE_LIMIT, VALUE_LIMIT);
        self.n = self.n.saturating_add(1);
        let after_flat = x != self.last && self.same >= FLAT_RESET;
        self.same = if x == self.last {
            self.same.saturating_add(1)
        } else {
            0
        };
        self.last = x;
        if self.n == 1 {
            self.base = x;
        }
        if self.n == 1 || after_flat {
            (self.fast, self.short, self.slow, self.last_t) = (x, x, x, t);
            (self.medium, self.long) = (x, x);
            (self.lmed, self.llong) = (x, x);
            self.prev_jump = 0.0;
            for m in [
                &mut self.shift_max,
                &mut self.season_max,
                &mut self.drift_max,
                &mut self.ldrift_max,
                &mut self.sdrift_max,
            ] {
                m.pend = 0.0;
            }
            if let Some(w) = self.season.as_mut().and_then(|z| z.week.as_mut()) {
                w.max.pend = 0.0;
                w.dmax.pend = 0.0;
            }
            return Verdict {
                active: self.active,
                ..Verdict::default()
            };
        }
        let dt = (t - self.last_t).max(0.0);
        self.last_t = self.last_t.max(t);
        let decay = if s.memory > 0.0 {
            (-std::f64::consts::LN_2 * dt / s.memory).exp()
        } else {
            0.0
        };
        let pred = self.fast;
        let jump = (x - pred).abs();
        let short = self.short + SHORT * (x - self.short);
        let shift = (short - self.slow).abs();
        // All maxima but the jump's are held a whole `memory` (a weekly pattern's excursions
        // are remembered when they come back), then forgotten; the jump's decays (a spike
        // alerts again when it comes back after some days).
        if t - self.bucket_start >= s.memory || self.n == 2 {
            self.bucket_start = t;
            for m in [
                &mut self.shift_max,
                &mut self.season_max,
                &mut self.drift_max,
                &mut self.ldrift_max,
                &mut self.sdrift_max,
            ] {
                m.roll();
            }
            if let Some(w) = self.season.as_mut().and_then(|z| z.week.as_mut()) {
                w.max.roll();
                w.dmax.roll();
            }
            if let Some(h) = self.hist.as_mut() {
                h.max.roll();
            }
        }
        // The jump's maximum also remembers the same weekday of earlier weeks (see `Season`).
        let weekly = if s.seasonal {
            self.season
                .get_or_insert_with(Box::default)
                .weekday_jump(t, jump)
        } else {
            0.0
        };
        let (m_jump, m_shift) = ((self.max_jump * decay).max(weekly), self.shift_max.get());
        let sigma = self.spread * MAD_TO_SIGMA;
        let warming = self.n <= s.warmup;
        let feature = |f: f64, m: f64| {
            if warming || m <= 0.0 || sigma <= 0.0 {
                return 0.0;
            }
            squash(f / (s.ratio * m)).min(squash(f / (s.threshold * sigma)))
        };
        let score_jump = feature(jump, m_jump);
        let score_shift = feature(shift, m_shift);
        // Drift: a medium mean against a long baseline (small shifts that last). A mean of a few
        // dozen readings has far lighter tails than one reading, so its novelty ratio is
        // smaller, and its noise floor is one sigma.
        // The slower means start as running means (no transient from the first reading).
        let n = self.n;
        let running = |a: f64| a.max(1.0 / f64::from(n));
        // Means of values clipped to 4 sigma around the prediction: one spike moves them little
        // (it is the jump feature's), a shift passes once the fast level follows it.
        let xc = if sigma > 0.0 {
            clip(x, pred - CLIP * sigma, pred + CLIP * sigma)
        } else {
            x
        };
        let medium = self.medium + running(MEDIUM) * (xc - self.medium);
        let drift = (medium - self.long).abs();
        let m_drift = self.drift_max.get();
        let drift_ratio = 1.0 + DRIFT_RATIO_SHARE * (s.ratio - 1.0);
        let score_drift = if warming || m_drift <= 0.0 || sigma <= 0.0 {
            0.0
        } else {
            squash(drift / (drift_ratio * m_drift)).min(squash(drift / sigma))
        };
        // Slow drift: the same over longer means (~33 against ~330 readings) for a shift of 1 to
        // 2 sigma that lasts: a longer mean has less noise, so a lower noise floor (0.7 sigma).
        // Its peak comes later, but a 1.5-sigma shift passes the floor within a few dozen
        // readings, where the drift's 20-reading mean barely reaches its own.
        let lmed = self.lmed + running(SLOW_MEDIUM) * (xc - self.lmed);
        let ldrift = (lmed - self.llong).abs();
        let m_ldrift = self.ldrift_max.get();
        let score_ldrift = if warming || m_ldrift <= 0.0 || sigma <= 0.0 {
            0.0
        } else {
            squash(ldrift / (drift_ratio * m_ldrift)).min(squash(ldrift / (SLOW_FLOOR * sigma)))
        };
        // Season: the deviation from the long baseline against this hour's usual one (not
        // while the value stays put: the flatline detector owns a stuck sensor).
        let d = x - self.base;
        let m_season = self.season_max.get();
        // The time-of-day features score only where the profile explains some of the
        // deviation (a daily cycle): on a random walk or bursts without one, it fits noise.
        let cyclic = self
            .season
            .as_ref()
            .is_some_and(|z| f64::from(z.resid_dev) < self.dev);
        let season = if s.seasonal {
            let floor = sigma.max(SEASON_FLOOR * self.dev);
            self.season
                .get_or_insert_with(Box::default)
                .observe(t, dt, d, floor)
        } else {
            None
        };
        let week = match (&mut self.season, s.seasonal) {
            (Some(z), true) => {
                let floor = sigma.max(SEASON_FLOOR * self.dev);
                z.week.get_or_insert_with(Box::default).observe(
                    t,
                    dt,
                    d,
                    season.map(|(r, _)| r),
                    floor,
                )
            }
            _ => None,
        };
        let sigmas = |(r, spread): (f64, f64)| {
            if spread > 0.0 {
                (r.abs() / spread).min(1e9)
            } else if r == 0.0 {
                0.0
            } else {
                1e9
            }
        };
        let scoring = !warming && self.same < FLAT_RESET;
        let score_season = match season {
            Some(rs) if scoring && m_season > 0.0 && cyclic => {
                let f = sigmas(rs);
                squash(f / (s.ratio * m_season)).min(squash(f / s.threshold))
            }
            _ => 0.0,
        };
        let (m_week, m_wdrift, wdrift) = self
            .season
            .as_ref()
            .and_then(|z| z.week.as_deref())
            .map_or((0.0, 0.0, 0.0), |w| {
                (w.max.get(), w.dmax.get(), f64::from(w.drift))
            });
        let score_week = match week {
            Some((r, spread, true)) if scoring && m_week > 0.0 => {
                let f = sigmas((r, spread));
                squash(f / (s.ratio * m_week)).min(squash(f / s.threshold))
            }
            _ => 0.0,
        };
        // Weekly drift: the medium mean of the hour-of-week profile's residuals (a weekday that
        // looks like a weekend lasts; one reading's residual from an hourly mean is noisy).
        let wresid = week.map_or(0.0, |(r, spread, _)| clip(r, -CLIP * spread, CLIP * spread));
        let wdrift = wdrift + MEDIUM * (wresid - wdrift);
        let score_wdrift = match week {
            Some((_, spread, true)) if scoring && m_wdrift > 0.0 => {
                let f = wdrift.abs();
                let ratio = 1.0 + SDRIFT_RATIO_SHARE * (s.ratio - 1.0);
                squash(f / (ratio * m_wdrift)).min(squash(f / spread.max(f64::MIN_POSITIVE)))
            }
            _ => 0.0,
        };
        // Seasonal drift: the medium mean of the residuals from the time-of-day profile (a small
        // shift that lasts, once the daily cycle is taken out), in raw units.
        // Its maximum learns for `SDRIFT_MATURE` before it scores.
        let sdrift_ratio = 1.0 + SDRIFT_RATIO_SHARE * (s.ratio - 1.0);
        if season.is_some() && self.sdrift_since.is_none() {
            self.sdrift_since = Some(t);
        }
        let sdrift_mature = self
            .sdrift_since
            .is_some_and(|since| t - since >= SDRIFT_MATURE);
        let sdrift_learn = self
            .sdrift_since
            .is_some_and(|since| t - since >= SDRIFT_LEARN);
        let resid = season.map_or(0.0, |(r, spread)| clip(r, -CLIP * spread, CLIP * spread));
        let sdrift = self.sdrift + MEDIUM * (resid - self.sdrift);
        let m_sdrift = self.sdrift_max.get();
        let score_sdrift = match season {
            Some((_, spread)) if scoring && sdrift_mature && m_sdrift > 0.0 && cyclic => {
                let f = sdrift.abs();
                squash(f / (sdrift_ratio * m_sdrift)).min(squash(f / spread.max(f64::MIN_POSITIVE)))
            }
            _ => 0.0,
        };
        // Relative entropy of the recent values' histogram against the remembered ones (a
        // distribution that changes with its mean and spread kept).
        let score_hist = if s.histogram {
            // Bins framed on the long baseline and the mean absolute deviation from it.
            if self.hist.is_none() && self.n >= SETTLE && self.dev > 0.0 {
                self.hist = Some(Box::new(Histogram::new(self.base, self.dev)));
            }
            // Not while the value stays put (the flatline detector's), nor learnt from it.
            match self.hist.as_mut() {
                Some(h) if self.same < FLAT_RESET => h.update(x, scoring, s.ratio),
                _ => 0.0,
            }
        } else {
            0.0
        };
        let score = score_hist
            .max(score_jump)
            .max(score_shift)
            .max(score_drift)
            .max(score_ldrift)
            .max(score_season)
            .max(score_sdrift)
            .max(score_week)
            .max(score_wdrift);
        let raw = score;
        let score = if warming {
            raw
        } else {
            raw.min(self.likelihood(raw, s.warmup))
        };
        let alerting = score >= 0.5;
        // Take the reading in. A feature's maximum takes in the previous reading's value (one
        // reading late: a shift that builds up over a few readings is still compared with the
        // maximum from before it).
        // (The jump's own maximum, without the weekday's: last week's spike on this weekday
        // must not be carried into the coming days.)
        let own = self.max_jump * decay;
        self.max_jump = if own > 0.0 {
            own.max(own + RISE * (self.prev_jump - own))
        } else {
            self.prev_jump
        };
        self.prev_jump = jump;
        self.shift_max.take(SHIFT_INTAKE, self.n, shift, m_shift);
        self.season_max
            .take(SHIFT_INTAKE, self.n, season.map_or(0.0, sigmas), m_season);
        if let Some(w) = self.season.as_mut().and_then(|z| z.week.as_mut()) {
            let f = week.map_or(0.0, |(r, spread, _)| sigmas((r, spread)));
            w.max.take(SHIFT_INTAKE, self.n, f, m_week);
            if week.is_some() {
                w.dmax.take(BLOCK, self.n, wdrift.abs(), m_wdrift);
            }
            w.drift = wdrift as f32;
        }
        // The drift features build up over a few dozen readings: their maxima take them in by
        // blocks of `BLOCK` readings, so a shift that builds up is compared with the maximum
        // from before it, not with its own rise.
        // (Every reading while the series is young: its first cycle keeps setting records.)
        let block = if self.n <= SETTLE { 1 } else { BLOCK };
        self.drift_max.take(block, self.n, drift, m_drift);
        self.ldrift_max.take(block, self.n, ldrift, m_ldrift);
        self.lmed = lmed;
        self.llong += running(SLOW_LONG) * (xc - self.llong);
        if sdrift_learn {
            self.sdrift_max.take(BLOCK, self.n, sdrift.abs(), m_sdrift);
        }
        self.sdrift = sdrift;
        // The noise floor learns from clipped jumps (an outlier moves it by at most 4 sigma).
        let clipped = if sigma > 0.0 {
            jump.min(4.0 * sigma)
        } else {
            jump
        };
        let rate = if self.n <= s.warmup.max(2) {
            1.0 / f64::from(self.n - 1)
        } else {
            SPREAD
        };
        self.spread += rate.max(SPREAD) * (clipped - self.spread);
        self.fast += FAST * (x - self.fast);
        self.short = short;
        self.slow += SLOW * (x - self.slow);
        self.medium = medium;
        self.long += running(LONG) * (xc - self.long);
        self.base += running(LONG) * (x - self.base);
        self.dev += rate.max(SPREAD) * (d.abs() - self.dev);
        let mut transition = None;
        if !self.active && alerting {
            self.active = true;
            self.calm = 0;
            transition = Some(Transition::Start);
        } else if self.active {
            if score < CLEAR_SCORE {
                self.calm += 1;
                if self.calm >= CLEAR_COUNT {
                    self.active = false;
                    transition = Some(Transition::Clear);
                }
            } else {
                self.calm = 0;
            }
        }
        let half = (s.ratio * m_jump).max(s.threshold * sigma);
        Verdict {
            transition,
            score,
            expected: Some(pred),
            band: (!warming).then_some((pred - half, pred + half)),
            active: self.active,
        }
    }
}

/// Stuck-sensor detector state (48 bytes); see the module doc.
#[derive(Debug, Clone, Default)]
pub struct Flatline {
    /// Where the current run started: time and value.
    anchor: Option<(f64, f64)>,
    /// Readings in the current run.
    count: u32,
    /// Times the value changed.
    changes: u32,
    /// Longest earlier run, seconds.
    longest: f64,
    active: bool,
}

impl Flatline {
    pub fn update(
        &mut self,
        epsilon: f64,
        duration: f64,
        min_count: u32,
        t: f64,
        v: f64,
    ) -> Verdict {
        let mut transition = None;
        let mut score = 0.0;
        match self.anchor {
            Some((t0, v0)) if (v - v0).abs() <= epsilon.max(1e-12 * v0.abs()) => {
                self.count = self.count.saturating_add(1);
                let run = t - t0;
                if !self.active
                    && self.count >= min_count
                    && run >= duration
                    && run >= 2.0 * self.longest
                    && self.changes >= min_count
                {
                    self.active = true;
                    score = 1.0;
                    transition = Some(Transition::Start);
                }
            }
            _ => {
                if let Some((t0, _)) = self.anchor {
                    self.changes = self.changes.saturating_add(1);
                    // Every run is learnt, a stuck one too: the same stuck value for a while
                    // is this sensor's habit (a pump that is off 16 hours a day).
                    self.longest = self.longest.max(t - t0);
                }
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
            score,
            expected: None,
            band: self.anchor.map(|(_, v0)| (v0 - epsilon, v0 + epsilon)),
            active: self.active,
        }
    }
}

/// Debounced condition: true for `min` seconds before it starts.
#[derive(Debug, Clone, Default)]
pub struct Debounce {
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

/// The state of one detector for one sensor: only the kind its configuration needs.
#[derive(Debug, Clone, Default)]
pub enum DetectorState {
    /// No reading yet.
    #[default]
    New,
    Debounce {
        debounce: Debounce,
        /// Previous reading (rate of change).
        prev: Option<(f64, f64)>,
    },
    Outlier(Outlier),
    Flatline(Flatline),
    Missing {
        /// Last reading time.
        last_seen: f64,
        active: bool,
    },
}

impl DetectorState {
    pub fn active(&self) -> bool {
        match self {
            DetectorState::New => false,
            DetectorState::Debounce { debounce, .. } => debounce.active,
            DetectorState::Outlier(o) => o.active,
            DetectorState::Flatline(f) => f.active,
            DetectorState::Missing { active, .. } => *active,
        }
    }

    /// The state for `cfg`, made afresh if it is of another kind.
    fn for_config(&mut self, cfg: &DetectorConfig) -> &mut DetectorState {
        let fits = matches!(
            (&*self, cfg),
            (
                DetectorState::Debounce { .. },
                DetectorConfig::Threshold { .. } | DetectorConfig::RateOfChange { .. }
            ) | (DetectorState::Outlier(_), DetectorConfig::Outlier(_))
                | (DetectorState::Flatline(_), DetectorConfig::Flatline { .. })
                | (
                    DetectorState::Missing { .. },
                    DetectorConfig::Missing { .. }
                )
        );
        if !fits {
            *self = match cfg {
                DetectorConfig::Threshold { .. } | DetectorConfig::RateOfChange { .. } => {
                    DetectorState::Debounce {
                        debounce: Debounce::default(),
                        prev: None,
                    }
                }
                DetectorConfig::Outlier(_) => DetectorState::Outlier(Outlier::default()),
                DetectorConfig::Flatline { .. } => DetectorState::Flatline(Flatline::default()),
                DetectorConfig::Missing { .. } => DetectorState::Missing {
                    last_seen: 0.0,
                    active: false,
                },
            };
        }
        self
    }

    /// Update with a reading `v` at `t` (seconds).
    pub fn update(&mut self, cfg: &DetectorConfig, t: f64, v: f64) -> Verdict {
        match (cfg, self.for_config(cfg)) {
            (
                DetectorConfig::Threshold {
                    above,
                    below,
                    hysteresis,
                    min_duration,
                },
                DetectorState::Debounce { debounce, .. },
            ) => {
                let hi = above.unwrap_or(f64::INFINITY);
                let lo = below.unwrap_or(f64::NEG_INFINITY);
                let beyond = v > hi || v < lo;
                let cleared = v <= hi - hysteresis && v >= lo + hysteresis;
                let transition = debounce.step(t, beyond, cleared, min_duration.as_secs_f64());
                Verdict {
                    transition,
                    score: if beyond { 1.0 } else { 0.0 },
                    expected: None,
                    band: Some((lo, hi)),
                    active: debounce.active,
                }
            }
            (
                DetectorConfig::RateOfChange {
                    max_rate,
                    min_duration,
                },
                DetectorState::Debounce { debounce, prev },
            ) => {
                let rate = match *prev {
                    Some((pt, pv)) if t > pt => (v - pv).abs() / (t - pt),
                    Some(_) => return Verdict::default(),
                    None => 0.0,
                };
                *prev = Some((t, v));
                let beyond = rate > *max_rate;
                let transition = debounce.step(t, beyond, !beyond, min_duration.as_secs_f64());
                Verdict {
                    transition,
                    score: rate / (rate + max_rate.max(f64::MIN_POSITIVE)),
                    expected: None,
                    band: Some((-max_rate, *max_rate)),
                    active: debounce.active,
                }
            }
            (DetectorConfig::Outlier(s), DetectorState::Outlier(o)) => o.update(s, t, v),
            (
                DetectorConfig::Flatline {
                    epsilon,
                    duration,
                    min_count,
                },
                DetectorState::Flatline(f),
            ) => f.update(*epsilon, duration.as_secs_f64(), *min_count, t, v),
            (DetectorConfig::Missing { .. }, DetectorState::Missing { last_seen, active }) => {
                *last_seen = t;
                let transition = if *active {
                    *active = false;
                    Some(Transition::Clear)
                } else {
                    None
                };
                Verdict {
                    transition,
                    ..Verdict::default()
                }
            }
            // for_config made the state fit the configuration.
            _ => Verdict::default(),
        }
    }

    /// Timer check (only `missing` acts on it): start when nothing arrived for `after`.
    pub fn tick(&mut self, cfg: &DetectorConfig, now: f64) -> Option<Transition> {
        if let (DetectorConfig::Missing { after }, DetectorState::Missing { last_seen, active }) =
            (cfg, self)
        {
            if !*active && now - *last_seen >= after.as_secs_f64() {
                *active = true;
                return Some(Transition::Start);
            }
        }
        None
    }
}
