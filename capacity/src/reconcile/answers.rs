//! The driver's last answer per item: how old each published value is,
//! publishing a lower value at once from the last answer when a new
//! placement reserves more (no driver call on the scheduler's path), and
//! the short window of fast polls after a volume of this node was
//! released (per-node mode; see [`crate::placements`]).

use super::*;

/// How often an item is asked while a released volume's deletion is
/// expected (per-node mode).
pub(super) const FAST_POLL: Duration = Duration::from_millis(250);

/// How long polls stay fast after the last release.
pub(super) const FAST_WINDOW: Duration = Duration::from_secs(30);

/// How often an object is written for a change of its reservation alone.
pub(super) const RESERVATION_EVERY: Duration = Duration::from_secs(1);

/// How often the age gauge is computed again.
const AGE_EVERY: Duration = Duration::from_secs(1);

/// The driver's last answer for an item.
#[derive(Clone, Copy, Debug)]
pub(super) struct Answer {
    report: CapacityReport,
    /// The moment of the placements it was asked at.
    asked: Moment,
    /// When it came.
    at: Instant,
    /// When the item's object was last written.
    written: Option<Instant>,
    /// What the item's last run published (written, or found so).
    published: Option<PublishedCapacity>,
}

/// The last answers, and what follows from them.
#[derive(Debug, Default)]
pub(super) struct Answers {
    last: HashMap<WorkItem, Answer>,
    /// Items to publish from their last answer at their next run.
    from_last: HashSet<WorkItem>,
    /// Until when polls are fast (a volume of this node was released).
    fast_until: Option<Instant>,
    /// When the age gauge was last computed.
    aged_at: Option<Instant>,
    /// Since when this replica leads: older answers count from then (the
    /// previous leader refreshed the objects meanwhile).
    leading_since: Option<Instant>,
}

impl Answers {
    /// Whether polls are fast now.
    pub(super) fn fast(&self, now: Instant) -> bool {
        self.fast_until.is_some_and(|until| now < until)
    }

    /// The object of `item` is being written now.
    pub(super) fn wrote(&mut self, item: &WorkItem) {
        if let Some(answer) = self.last.get_mut(item) {
            answer.written = Some(Instant::now());
        }
    }

    /// `item` is to ask the driver, not publish from its last answer.
    pub(super) fn ask(&mut self, item: &WorkItem) {
        self.from_last.remove(item);
    }

    /// `item` is no longer desired.
    pub(super) fn forget(&mut self, item: &WorkItem) {
        self.last.remove(item);
        self.from_last.remove(item);
    }

    /// A run of `item` ended with `value` published.
    pub(super) fn published(&mut self, item: &WorkItem, value: PublishedCapacity) {
        if let Some(answer) = self.last.get_mut(item) {
            answer.published = Some(value);
        }
    }
}

impl LoopState {
    /// The driver answered `report` for `item`, asked at `asked`. Returns
    /// how far its value fell below the previous answer (0 when it rose or
    /// there was none).
    pub(super) fn remember_answer(&mut self, item: &WorkItem, report: CapacityReport, asked: Moment) -> i64 {
        let before = self.answers.last.get(item);
        let fell = before.map_or(0, |answer| {
            (answer
                .report
                .available_capacity
                .saturating_sub(report.available_capacity))
            .max(0)
        });
        let answer = Answer {
            report,
            asked,
            at: Instant::now(),
            written: before.and_then(|answer| answer.written),
            published: before.and_then(|answer| answer.published),
        };
        self.answers.last.insert(item.clone(), answer);
        fell
    }

    /// What to write into `known` for `item`: `publication`, except that a
    /// change of the reservation alone (the value stays) waits until the
    /// object was last written [`RESERVATION_EVERY`] ago, so that a burst
    /// of placements binding does not double the writes; the item runs
    /// again when that change is due (returned).
    pub(super) fn reservation_due(
        &self,
        item: &WorkItem,
        known: &KnownObject,
        publication: Publication,
    ) -> (Publication, Option<Instant>) {
        let unchanged = known.reservation == publication.reservation;
        let due = (self.answers.last.get(item).and_then(|answer| answer.written))
            .map(|at| at + RESERVATION_EVERY)
            .filter(|due| *due > Instant::now());
        match due {
            Some(due) if !unchanged && !model::needs_update(known, publication.value) => {
                let waiting = Publication {
                    reservation: known.reservation,
                    ..publication
                };
                (waiting, Some(due))
            }
            _ => (publication, None),
        }
    }

    /// Placements changed for `items`: those whose value published from
    /// the last answer would be lower than what is published now are
    /// published so at once, without asking the driver (the last answer
    /// less every reservation standing is never more than the driver has
    /// left, as far as placements tell); the others ask the driver. An
    /// item asked to ask the driver meanwhile ([`LoopState::refresh`])
    /// asks it.
    pub(super) fn refresh_placements(&mut self, items: &[WorkItem], why: &str) {
        let now = Instant::now();
        for item in items {
            if self.lowers(item) {
                debug!(%item, why, "publishing from the driver's last answer");
                self.answers.from_last.insert(item.clone());
                self.queue.schedule(item.clone(), now);
            } else {
                self.refresh(std::slice::from_ref(item), why);
            }
        }
    }

    /// Whether the last answer for `item` less its reservations standing
    /// is below what is published now.
    fn lowers(&self, item: &WorkItem) -> bool {
        self.answers.last.get(item).is_some_and(|answer| {
            let value = PublishedCapacity {
                capacity: answer.report.available_capacity,
                maximum_volume_size: answer.report.maximum_volume_size,
            };
            let now = in_flight::less_reserved(value, self.in_flight.reserved(item));
            self.published_now(item)
                .is_some_and(|published| now.capacity < published.capacity)
        })
    }

    /// What is published for `item` now: as the watch last delivered it,
    /// or, while volplane's own write is still on its way, what it wrote.
    fn published_now(&self, item: &WorkItem) -> Option<PublishedCapacity> {
        let seen = || {
            let name = self.published.objects.get(item)?;
            self.published.store.get(name)?.object.published
        };
        let written = || self.answers.last.get(item)?.published;
        if self.published.unseen.contains_key(item) {
            written().or_else(seen)
        } else {
            seen().or_else(written)
        }
    }

    /// A due `item` marked to publish from its last answer does so
    /// (returns true); any other asks the driver.
    pub(super) fn publish_from_last(&mut self, item: &WorkItem) -> bool {
        if !self.answers.from_last.remove(item) {
            return false;
        }
        let Some(answer) = self.answers.last.get(item).copied() else {
            return false;
        };
        self.answered(item.clone(), answer.report, answer.asked, 0);
        if answer.at.elapsed() >= self.config.poll_interval {
            // Placements coming steadily never postpone the regular poll.
            self.queue.schedule(item.clone(), Instant::now());
        }
        true
    }

    /// A volume of this node was released: every item is asked at once,
    /// and every [`FAST_POLL`] for [`FAST_WINDOW`], so that its deletion
    /// shows within a fraction of a second.
    pub(super) fn poll_fast(&mut self) {
        self.answers.fast_until = Some(Instant::now() + FAST_WINDOW);
        let items: Vec<WorkItem> = self.desired_items().collect();
        self.refresh(&items, "a volume of this node was released");
    }

    /// When the age gauge is due again (the loop wakes for it even when
    /// nothing else is due, so the age keeps growing while the driver does
    /// not answer or nothing is polled).
    pub(super) fn age_due(&self) -> Option<Instant> {
        let aged_at = self.answers.aged_at.filter(|_| !self.answers.last.is_empty())?;
        Some(aged_at + AGE_EVERY)
    }

    /// This replica starts (`Some`) or stops leading: ages count from then.
    pub(super) fn lead_from(&mut self, since: Option<Instant>) {
        self.answers.leading_since = since;
    }

    /// `volplane_capacity_oldest_value_age_seconds`: how long ago the
    /// driver gave the oldest value standing for a desired item (at most
    /// once a second); 0 while another replica leads.
    pub(super) fn update_age(&mut self) {
        let now = Instant::now();
        if self.answers.aged_at.is_some_and(|at| now < at + AGE_EVERY) {
            return;
        }
        self.answers.aged_at = Some(now);
        // A replica that does not lead asks nothing: what it published is
        // another replica's to refresh, and its own age says nothing.
        let oldest = self
            .answers
            .last
            .values()
            .map(|answer| answer.at)
            .min()
            .filter(|_| self.leading)
            .map(|at| self.answers.leading_since.map_or(at, |since| at.max(since)));
        let age = oldest.map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        self.metrics.oldest_value_age.set(age);
    }
}
