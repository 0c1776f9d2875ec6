//! Token buckets and reconnect backoff: the pacing every component shares (the bridge's
//! replay lane, device rate limits in the front end, OTA chunk serving, serial reopen and
//! fetch retries).
//!
//! A leaf: it imports nothing from the crate. Pure arithmetic over `Instant`s passed in, so
//! tests need no clock.

use std::time::{Duration, Instant};

/// A token bucket; `rate == 0` means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second, bursting up to a tenth of a second's worth (at least 1).
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate as f64;
        let burst = (rate / 10.0).max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// `rate` tokens per second, bursting up to `burst` (at least 1).
    pub fn with_burst(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let burst = (burst as f64).max(1.0);
        TokenBucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// How long until `n` tokens can be taken (zero: now). Takes nothing.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        if self.rate == 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        // A request larger than the burst is allowed once the bucket is full; it drives the
        // bucket negative, which delays the next one accordingly.
        let need = (n as f64).min(self.burst);
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate)
        }
    }

    /// Takes `n` tokens (call after `wait_for` returned zero).
    pub fn take(&mut self, n: u64) {
        if self.rate != 0.0 {
            self.tokens -= n as f64;
        }
    }
}

/// Exponential reconnect backoff with jitter: the n-th delay is uniform in
/// `[d/2, d]` with `d = min(max, min * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        let d = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        d.mul_f64(jitter)
    }

    /// After a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let now = Instant::now();
        let mut b = TokenBucket::new(0, now);
        for _ in 0..1000 {
            assert_eq!(b.wait_for(1_000_000, now), Duration::ZERO);
            b.take(1_000_000);
        }
    }

    #[test]
    fn rate_is_held() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        // Simulate 10 s of sending as fast as allowed.
        let mut now = t0;
        let mut sent = 0;
        while now < t0 + Duration::from_secs(10) {
            let w = b.wait_for(1, now);
            if w.is_zero() {
                b.take(1);
                sent += 1;
            } else {
                now += w;
            }
        }
        assert!((995..=1011).contains(&sent), "sent {sent}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
