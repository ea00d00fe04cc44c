//! The exponential backoff of every retry the controllers schedule
//! themselves (watches use kube-runtime's own).

use std::time::Duration;

/// Exponential backoff: `base`, doubling per failure, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` failures in a row (1 = first; 0 is
    /// treated as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exponent).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_to_the_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(5),
        };
        let delays: Vec<u128> = [0, 1, 2, 3, 4, 5, 40, u32::MAX]
            .into_iter()
            .map(|n| backoff.delay(n).as_millis())
            .collect();
        assert_eq!(delays, [500, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }

    #[test]
    fn never_overflows() {
        let backoff = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(backoff.delay(u32::MAX), Duration::MAX);
    }
}
