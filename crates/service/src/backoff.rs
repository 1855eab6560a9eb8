//! The one retry delay policy.
//!
//! Every retry loop in the workspace (consumers' negative acks, study-completion's re-checks,
//! multipart parts, superdataset pushes) takes its pause from a [`Backoff`]: it grows from
//! `first` (doubling, or by `first` each attempt) up to `max`, optionally with random jitter so
//! that parallel retries do not fall in step.

use std::hash::{BuildHasher as _, Hasher as _};
use std::time::Duration;

/// How the delay grows from one attempt to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// `first`, `2·first`, `4·first`, …
    Doubling,
    /// `first`, `2·first`, `3·first`, …
    Linear,
}

/// A retry delay policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry.
    pub first: Duration,
    /// The largest delay (before jitter).
    pub max: Duration,
    /// How it grows.
    pub growth: Growth,
    /// Up to this fraction of the delay is added at random (0: none).
    pub jitter: f64,
}

impl Backoff {
    /// `first`, doubling per attempt up to `max`, no jitter.
    pub const fn doubling(first: Duration, max: Duration) -> Self {
        Self { first, max, growth: Growth::Doubling, jitter: 0.0 }
    }

    /// `first`, growing by `first` per attempt up to `max`, no jitter.
    pub const fn linear(first: Duration, max: Duration) -> Self {
        Self { first, max, growth: Growth::Linear, jitter: 0.0 }
    }

    /// The same policy with up to `fraction` of each delay added at random.
    pub const fn with_jitter(self, fraction: f64) -> Self {
        Self { jitter: fraction, ..self }
    }

    /// The delay before retry number `attempt` (1 for the first retry; 0 counts as 1), without jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        let n = attempt.max(1);
        let grown = match self.growth {
            Growth::Doubling => self.first.saturating_mul(1u32 << (n - 1).min(31)),
            Growth::Linear => self.first.saturating_mul(n),
        };
        grown.min(self.max)
    }

    /// The delay before retry number `attempt`, jitter included.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base(attempt);
        if self.jitter <= 0.0 {
            return base;
        }
        let span = base.mul_f64(self.jitter.min(1.0));
        let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        base + Duration::from_nanos(random() % nanos.saturating_add(1))
    }

    /// Sleeps [`Backoff::delay`] for `attempt`.
    pub async fn sleep(&self, attempt: u32) {
        tokio::time::sleep(self.delay(attempt)).await;
    }
}

/// A random number from the standard library's per-process random hash keys.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_or_grows_linearly_up_to_the_cap() {
        let b = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(60));
        let secs: Vec<u64> = (1..=9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
        let l = Backoff::linear(Duration::from_millis(25), Duration::from_millis(225));
        let ms: Vec<u128> = (1..=10).map(|n| l.delay(n).as_millis()).collect();
        assert_eq!(ms, [25, 50, 75, 100, 125, 150, 175, 200, 225, 225]);
    }

    #[test]
    fn jitter_adds_at_most_its_fraction() {
        let b = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(16)).with_jitter(0.25);
        for n in 1..=8 {
            let (d, base) = (b.delay(n), b.base(n));
            assert!(d >= base && d <= base + base / 4, "{n}: {d:?}");
        }
    }
}
