//! The work queue of the hand-written controllers: items keyed by value,
//! so repeats merge; at most one run per item at a time; per-item
//! exponential backoff; polls spread over the interval. Pure: time comes in
//! as arguments.
//!
//! kube-runtime's own runner (which has the in-flight exclusion) is private
//! to its `Controller`, which also keeps every object it reconciles; the
//! capacity controller's items are (segment, class) values and the
//! ephemeral controller keeps a few bytes per pod, so the queue lives here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// A delay queue of distinct items with in-flight tracking.
#[derive(Debug)]
pub struct WorkQueue<T> {
    due: BTreeSet<(Instant, T)>,
    when: HashMap<T, Instant>,
    in_flight: HashSet<T>,
    after_flight: HashMap<T, Instant>,
    failures: HashMap<T, u32>,
}

impl<T> Default for WorkQueue<T> {
    fn default() -> Self {
        Self {
            due: BTreeSet::new(),
            when: HashMap::new(),
            in_flight: HashSet::new(),
            after_flight: HashMap::new(),
            failures: HashMap::new(),
        }
    }
}

impl<T: Ord + Hash + Clone> WorkQueue<T> {
    /// Asks for `item` to run at `at`. A pending item keeps the earlier time;
    /// an item being worked on runs again after it finishes.
    pub fn schedule(&mut self, item: T, at: Instant) {
        if self.in_flight.contains(&item) {
            let slot = self.after_flight.entry(item).or_insert(at);
            *slot = (*slot).min(at);
            return;
        }
        match self.when.get(&item) {
            Some(existing) if *existing <= at => {}
            Some(existing) => {
                self.due.remove(&(*existing, item.clone()));
                self.due.insert((at, item.clone()));
                self.when.insert(item, at);
            }
            None => {
                self.due.insert((at, item.clone()));
                self.when.insert(item, at);
            }
        }
    }

    /// Drops everything about `item` (it is no longer wanted). A run in
    /// flight still finishes, but is not repeated.
    pub fn forget(&mut self, item: &T) {
        if let Some(at) = self.when.remove(item) {
            self.due.remove(&(at, item.clone()));
        }
        self.after_flight.remove(item);
        self.failures.remove(item);
    }

    /// The earliest pending item due at or before `now`, now marked in flight.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        let (at, item) = self.due.first().cloned()?;
        if at > now {
            return None;
        }
        self.due.remove(&(at, item.clone()));
        self.when.remove(&item);
        self.in_flight.insert(item.clone());
        Some(item)
    }

    /// When the next pending item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Marks a run finished; a request made during the run is now pending.
    pub fn finish(&mut self, item: &T) {
        self.in_flight.remove(item);
        if let Some(at) = self.after_flight.remove(item) {
            self.schedule(item.clone(), at);
        }
    }

    /// Clears the item's backoff after a success.
    pub fn succeeded(&mut self, item: &T) {
        self.failures.remove(item);
    }

    /// Counts a failure; returns how many in a row, for [`crate::Backoff::delay`].
    pub fn failed(&mut self, item: &T) -> u32 {
        let failures = self.failures.entry(item.clone()).or_insert(0);
        *failures += 1;
        *failures
    }

    /// Whether `item` is pending (not counting in-flight runs).
    pub fn is_pending(&self, item: &T) -> bool {
        self.when.contains_key(item)
    }

    /// Whether `item` is being worked on.
    pub fn is_in_flight(&self, item: &T) -> bool {
        self.in_flight.contains(item)
    }

    /// Pending items.
    pub fn pending(&self) -> usize {
        self.due.len()
    }

    /// Items being worked on.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The next poll of an item with `phase` after a run finished at `now`: the
/// first of its slots (`start + phase + k·interval`) at least half an
/// interval away, so every item polls once per interval, spread out, and an
/// immediate refresh does not cause a second poll right after.
pub fn next_poll(now: Instant, start: Instant, interval: Duration, phase: Duration) -> Instant {
    let earliest = now + interval / 2;
    let first = start + phase;
    if earliest <= first || interval.is_zero() {
        return first.max(earliest);
    }
    let behind = earliest.duration_since(first).as_nanos();
    let step = interval.as_nanos();
    let slots = behind.div_ceil(step);
    first + Duration::from_nanos(u64::try_from(slots * step).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use crate::Backoff;
    use crate::phase::phase;
    use proptest::prelude::*;

    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn repeats_merge_and_the_earliest_time_wins() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", at(t0, 100));
        q.schedule("a", at(t0, 50));
        q.schedule("a", at(t0, 200));
        q.schedule("b", at(t0, 70));
        assert_eq!(q.pending(), 2);
        assert_eq!(q.next_due(), Some(at(t0, 50)));
        assert_eq!(q.pop_due(at(t0, 49)), None);
        assert_eq!(q.pop_due(at(t0, 100)), Some("a"));
        assert_eq!(q.pop_due(at(t0, 100)), Some("b"));
        assert_eq!(q.pop_due(at(t0, 100)), None);
    }

    #[test]
    fn an_item_in_flight_is_not_handed_out_twice_but_runs_again_after() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", t0);
        assert_eq!(q.pop_due(t0), Some("a"));
        q.schedule("a", t0);
        q.schedule("a", t0);
        assert_eq!(q.pop_due(t0), None, "in flight");
        assert_eq!(q.in_flight(), 1);
        q.finish(&"a");
        assert_eq!(q.pop_due(t0), Some("a"), "requested during the run");
        q.finish(&"a");
        assert_eq!(q.pop_due(at(t0, 10_000)), None);
    }

    #[test]
    fn forgotten_items_do_not_run_or_rerun() {
        let t0 = Instant::now();
        let mut q = WorkQueue::default();
        q.schedule("a", t0);
        q.schedule("b", t0);
        assert_eq!(q.pop_due(t0), Some("a"));
        q.schedule("a", t0);
        q.forget(&"a");
        q.forget(&"b");
        q.finish(&"a");
        assert_eq!(q.pop_due(t0), None);
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_success_clears_it() {
        let backoff = Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(5),
        };
        let mut q: WorkQueue<&str> = WorkQueue::default();
        let delays: Vec<Duration> = (0..6).map(|_| backoff.delay(q.failed(&"a"))).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000].map(Duration::from_millis));
        q.succeeded(&"a");
        assert_eq!(backoff.delay(q.failed(&"a")), Duration::from_millis(500));
    }

    #[test]
    fn polls_of_many_items_spread_over_the_interval() {
        let start = Instant::now();
        let interval = Duration::from_secs(60);
        let mut buckets = [0u32; 6];
        for i in 0..600 {
            let p = phase(&format!("item-{i}"), interval);
            let next = next_poll(start, start, interval, p);
            let offset = next.duration_since(start).as_secs();
            buckets[usize::try_from(offset / 10).unwrap_or(0) % 6] += 1;
        }
        // No ten-second bucket holds more than twice its fair share.
        assert!(buckets.iter().all(|b| *b <= 200), "{buckets:?}");
    }

    proptest! {
        #[test]
        fn next_poll_is_half_to_one_and_a_half_intervals_away_on_the_item_grid(
            now_ms in 0u64..10_000_000,
            interval_ms in 1u64..600_000,
            phase_frac in 0.0f64..1.0,
        ) {
            let start = Instant::now();
            let interval = Duration::from_millis(interval_ms);
            let phase = interval.mul_f64(phase_frac);
            let now = start + Duration::from_millis(now_ms);
            let next = next_poll(now, start, interval, phase);
            prop_assert!(next >= now + interval / 2);
            prop_assert!(next < now + interval / 2 + interval + Duration::from_nanos(1));
            let offset = next.duration_since(start + phase).as_nanos();
            prop_assert_eq!(offset % interval.as_nanos(), 0);
        }
    }
}
