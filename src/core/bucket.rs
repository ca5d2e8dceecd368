//! The one token bucket: `broker.max_publish_rate` (per sensor connection, in the guard) and
//! `upstream.max_rate` (the forwarder). Layer: core.
//!
//! A bucket holds at most one second's worth of tokens (the burst) and refills continuously at
//! `per_second`; a rate of 0 means no limit. Invariant: over any interval of `t` seconds at
//! most `per_second * t + per_second` tokens are taken (a token taken after a wait may leave the
//! bucket slightly below zero; the debt is paid before the next one).

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `per_second` 0: unlimited.
    pub fn new(per_second: u32) -> TokenBucket {
        TokenBucket {
            per_second: per_second as f64,
            tokens: per_second as f64,
            last: Instant::now(),
        }
    }

    pub fn unlimited(&self) -> bool {
        self.per_second == 0.0
    }

    /// Add the tokens earned since the last refill (at most one second's worth held).
    pub fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.per_second);
        self.last = now;
    }

    /// How many of `want` may be taken now.
    pub fn available(&mut self, want: usize) -> usize {
        if self.unlimited() {
            return want;
        }
        self.refill();
        want.min(self.tokens.max(0.0) as usize)
    }

    /// Take one token (after [`available`](Self::available) said there is one, or after
    /// waiting [`next_in`](Self::next_in)).
    pub fn take(&mut self) {
        if !self.unlimited() {
            self.tokens -= 1.0;
        }
    }

    /// Take one token if there is one now; otherwise the time until there is.
    pub fn try_take(&mut self) -> Result<(), Duration> {
        if self.unlimited() {
            return Ok(());
        }
        self.refill();
        if self.tokens < 1.0 {
            return Err(self.next_in());
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// The most that can be taken at once (one second's worth, at least 1).
    pub fn burst(&self) -> usize {
        if self.unlimited() {
            usize::MAX
        } else {
            (self.per_second as usize).max(1)
        }
    }

    /// Is the limit what holds the taker back right now?
    pub fn limited(&self) -> bool {
        !self.unlimited() && self.tokens < 1.0
    }

    /// Time until the next token (at least 1 ms; an hour when unlimited).
    pub fn next_in(&self) -> Duration {
        if self.unlimited() {
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / self.per_second).max(0.001))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_holds_back() {
        let mut b = TokenBucket::new(0);
        for _ in 0..10_000 {
            assert_eq!(b.try_take(), Ok(()));
        }
        assert_eq!(b.available(7), 7);
        assert!(!b.limited());
        assert_eq!(b.burst(), usize::MAX);
    }

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let mut b = TokenBucket::new(10);
        assert_eq!(b.burst(), 10);
        assert_eq!(b.available(100), 10);
        for _ in 0..10 {
            b.take();
        }
        assert!(b.limited());
        let wait = b.try_take().expect_err("the burst is spent");
        assert!(wait <= Duration::from_millis(100) && wait >= Duration::from_millis(90));
        std::thread::sleep(wait);
        assert_eq!(b.try_take(), Ok(()), "one token after the wait it named");
        assert!(b.limited());
    }

    #[test]
    fn a_slow_taker_never_saves_more_than_one_second() {
        let mut b = TokenBucket::new(1000);
        for _ in 0..1000 {
            b.take();
        }
        std::thread::sleep(Duration::from_millis(30));
        let n = b.available(usize::MAX);
        assert!((25..=1000).contains(&n), "{n}");
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(b.available(usize::MAX), 1000);
    }
}
