//! Per-sensor aggregation windows aligned on the clock: tumbling (`window`) or sliding
//! (`window` every `slide`), kept as a ring of panes of length `slide` so that a reading costs
//! O(1) and a window O(panes).

use crate::config::rules::{AggregateConfig, Stat};

#[derive(Debug, Clone, Copy)]
pub struct Acc {
    pub n: u64,
    mean: f64,
    m2: f64,
    pub min: f64,
    pub max: f64,
    first: (f64, f64),
    pub last: (f64, f64),
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first: (0.0, 0.0),
            last: (0.0, 0.0),
        }
    }
}

impl Acc {
    fn add(&mut self, t: f64, v: f64) {
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if self.n == 1 {
            self.first = (t, v);
        }
        self.last = (t, v);
    }

    /// Combine two accumulators (Chan et al. parallel variance); `other` is later in time.
    fn merge(&mut self, o: &Acc) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *o;
            return;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        self.mean += d * o.n as f64 / n as f64;
        self.m2 += o.m2 + d * d * self.n as f64 * o.n as f64 / n as f64;
        self.n = n;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.last = o.last;
    }

    pub fn stat(&self, s: Stat) -> f64 {
        match s {
            Stat::Count => self.n as f64,
            Stat::Min => self.min,
            Stat::Max => self.max,
            Stat::Mean => self.mean,
            Stat::Stddev => {
                if self.n > 1 {
                    (self.m2 / (self.n - 1) as f64).max(0.0).sqrt()
                } else {
                    0.0
                }
            }
            Stat::Last => self.last.1,
            Stat::Rate => {
                let dt = self.last.0 - self.first.0;
                if dt > 0.0 {
                    (self.last.1 - self.first.1) / dt
                } else {
                    0.0
                }
            }
        }
    }
}

/// One closed window.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub start: f64,
    pub end: f64,
    pub acc: Acc,
}

#[derive(Debug, Clone, Default)]
pub struct WindowState {
    panes: Vec<Acc>,
    /// Start of the current pane (seconds), `None` before the first reading.
    pane_start: Option<f64>,
    cur: usize,
}

fn geometry(cfg: &AggregateConfig) -> (f64, usize) {
    let slide = cfg.slide.unwrap_or(cfg.window).as_secs_f64();
    let panes = (cfg.window.as_secs_f64() / slide).round().max(1.0) as usize;
    (slide, panes)
}

impl WindowState {
    /// Close every pane that ended at or before `now`, emitting windows with data.
    pub fn advance(&mut self, cfg: &AggregateConfig, now: f64, out: &mut impl FnMut(Closed)) {
        let (slide, panes) = geometry(cfg);
        let Some(mut start) = self.pane_start else {
            return;
        };
        let mut steps = 0;
        while now >= start + slide {
            let end = start + slide;
            let mut acc = Acc::default();
            for k in 1..=panes {
                acc.merge(&self.panes[(self.cur + k) % panes]);
            }
            if acc.n > 0 {
                out(Closed {
                    start: end - slide * panes as f64,
                    end,
                    acc,
                });
            }
            self.cur = (self.cur + 1) % panes;
            self.panes[self.cur] = Acc::default();
            start = end;
            steps += 1;
            if steps >= panes {
                // Everything older has left the window: jump to the pane holding `now`.
                start = (now / slide).floor() * slide;
                break;
            }
        }
        self.pane_start = Some(start);
    }

    pub fn add(&mut self, cfg: &AggregateConfig, t: f64, v: f64, out: &mut impl FnMut(Closed)) {
        let (slide, panes) = geometry(cfg);
        if self.pane_start.is_none() {
            self.panes = vec![Acc::default(); panes];
            self.cur = 0;
            self.pane_start = Some((t / slide).floor() * slide);
        }
        self.advance(cfg, t, out);
        // Late readings (before the current pane) go into the current pane.
        self.panes[self.cur].add(t, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(window: u64, slide: Option<u64>) -> AggregateConfig {
        AggregateConfig {
            field: "value".into(),
            window: Duration::from_secs(window),
            slide: slide.map(Duration::from_secs),
            stats: Stat::ALL.to_vec(),
            topic: None,
            class: crate::core::event::Class::Telemetry,
            publish: None,
        }
    }

    #[test]
    fn tumbling_and_sliding() {
        let c = cfg(10, None);
        let mut w = WindowState::default();
        let mut got = Vec::new();
        for t in 0..25 {
            w.add(&c, 100.0 + t as f64, t as f64, &mut |x| got.push(x));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].start, 100.0);
        assert_eq!(got[0].acc.n, 10);
        assert_eq!(got[0].acc.stat(Stat::Mean), 4.5);
        assert_eq!(got[0].acc.stat(Stat::Rate), 1.0);
        assert_eq!(got[1].acc.stat(Stat::Min), 10.0);
        assert!((got[0].acc.stat(Stat::Stddev) - 3.02765).abs() < 1e-4);
        w.advance(&c, 131.0, &mut |x| got.push(x));
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].acc.n, 5);

        let c = cfg(10, Some(5));
        let mut w = WindowState::default();
        let mut got = Vec::new();
        for t in 0..20 {
            w.add(&c, t as f64, 1.0, &mut |x| got.push(x));
        }
        // Windows ending at 5, 10, 15 (the first covers only [0,5) of data).
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].acc.n, 10);
        assert_eq!((got[1].start, got[1].end), (0.0, 10.0));
        assert_eq!(got[2].acc.n, 10);
    }
}
