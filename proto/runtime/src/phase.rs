//! Periodic checks of many items (capacity polls, health checks) spread
//! over their interval: each item keeps a stable offset, the same in every
//! process and every restart, so replicas and restarts poll at the same
//! moments and a burst of items does not poll all at once.

use std::time::Duration;

/// A stable offset of the item called `key` within `interval` (FNV-1a of
/// the key's bytes, modulo the interval).
pub fn phase(key: &str, interval: Duration) -> Duration {
    let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX).max(1);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_nanos(hash % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_spread_within_the_interval_and_are_stable() {
        let interval = Duration::from_secs(60);
        let phases: Vec<Duration> = (0..1000).map(|i| phase(&format!("pv-{i}"), interval)).collect();
        assert!(phases.iter().all(|p| *p < interval));
        assert_eq!(phase("pv-7", interval), phases[7], "the same key, the same phase");
        // Spread: every sixth of the interval holds some phases.
        for sixth in 0..6 {
            let (from, to) = (interval * sixth / 6, interval * (sixth + 1) / 6);
            assert!(
                phases.iter().filter(|p| **p >= from && **p < to).count() > 100,
                "sixth {sixth} is nearly empty"
            );
        }
        // Known value: the same in every process, build and restart.
        assert_eq!(
            phase("", Duration::from_nanos(1000)),
            Duration::from_nanos(0xcbf2_9ce4_8422_2325 % 1000)
        );
    }

    #[test]
    fn a_zero_interval_gives_zero() {
        assert_eq!(phase("anything", Duration::ZERO), Duration::ZERO);
    }
}
