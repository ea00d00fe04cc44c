//! PVs of the driver (central mode): a PV created or deleted refreshes the
//! items of its class in the segments its node affinity admits, also when
//! a re-list finds it created or gone meanwhile.

use super::*;

impl LoopState {
    /// A PV event (central mode): a PV of the driver created or deleted
    /// refreshes its items, also when a re-list finds it so.
    pub(super) fn on_volume(&mut self, event: Event<VolumeObject>) {
        let driver = self.config.driver.as_str();
        let event = convert(event, |pv| {
            let placement = model::is_volume_of(&pv, driver).then(|| self.placement(&pv));
            Entry::of(&pv, placement)
        });
        let fed = self.feeds.feed("volumes", event, &mut self.pvs.volumes);
        let changes = self.pvs.volumes.take_changes();
        let away = matches!(fed, Fed::Listing | Fed::Listed { .. });
        if self.synced {
            for change in changes {
                let (items, why) = match (change.before, self.pvs.volumes.get(&change.name)) {
                    (None, Some(now)) if away => (self.placement_items(now), "volume created while the watch was away"),
                    (None, Some(now)) => (self.placement_items(now), "volume created"),
                    (Some(before), None) if away => {
                        (self.placement_items(&before), "volume deleted while the watch was away")
                    }
                    (Some(before), None) => (self.placement_items(&before), "volume deleted"),
                    _ => continue,
                };
                self.refresh(&items, why);
            }
        }
        if matches!(fed, Fed::Listed { .. }) {
            self.synced_sources.insert("volumes");
            self.try_initial_sync();
        }
    }

    /// Where the PV is, as kept to refresh its items later: its class,
    /// and the segments its node affinity names exactly (shared with the
    /// topology index when it has them) or, for other affinities, the terms.
    pub(super) fn placement(&self, pv: &VolumeObject) -> Placement {
        let Some((class, terms)) = model::volume_placement(pv, &self.config.driver) else {
            return Placement::default();
        };
        let class = self
            .classes
            .get_key_value(class)
            .map_or_else(|| Arc::from(class), |(known, _)| known.clone());
        let at = match model::exact_segments(terms) {
            Some(segments) => Where::Segments(segments.into_iter().map(|s| self.segments.shared(s)).collect()),
            None => Where::Terms(terms.into()),
        };
        Placement { class: Some(class), at }
    }

    /// The items a PV at `placement` affects now: its class, if published
    /// for, in the segments it names that exist.
    pub(super) fn placement_items(&self, placement: &Placement) -> Vec<WorkItem> {
        let Some((class, _)) = placement.class.as_ref().and_then(|c| self.classes.get_key_value(c)) else {
            return Vec::new();
        };
        let segments = match &placement.at {
            Where::Segments(segments) => segments.iter().filter(|s| self.segments.contains(s)).cloned().collect(),
            Where::Terms(terms) => self.segments.admitted(terms),
        };
        (segments.into_iter())
            .map(|segment| WorkItem {
                segment,
                class: class.clone(),
            })
            .collect()
    }

    /// Refreshes `items` now, asking the driver (deduplicated by the
    /// queue; a pending publication from the last answer asks instead).
    pub(super) fn refresh(&mut self, items: &[WorkItem], why: &str) {
        let now = Instant::now();
        for item in items {
            debug!(%item, why, "refreshing");
            self.answers.ask(item);
            self.queue.schedule(item.clone(), now);
        }
    }
}

/// Where a PV of the driver is (see [`LoopState::placement`]).
#[derive(Debug, Default)]
pub(super) struct Placement {
    class: Option<Arc<str>>,
    at: Where,
}

#[derive(Debug)]
enum Where {
    /// The segments its affinity names exactly (the usual case: a
    /// provisioner writes single-value `In` terms).
    Segments(Box<[Segment]>),
    /// Any other affinity.
    Terms(Box<[k8s_openapi::api::core::v1::NodeSelectorTerm]>),
}

impl Default for Where {
    fn default() -> Self {
        Self::Segments(Box::default())
    }
}
