//! PVs of the driver (central mode): a PV created or deleted refreshes the
//! items of its class in the segments its node affinity admits, also when
//! a re-list finds it created or gone meanwhile.

use super::*;

impl LoopState {
    pub(super) fn volume_key(&self, pv: &VolumeObject) -> u64 {
        self.pvs
            .hasher
            .hash_one(pv.metadata.name.as_deref().unwrap_or_default())
    }

    pub(super) fn on_volume(&mut self, event: Event<VolumeObject>) {
        let driver = self.config.driver.as_str();
        match event {
            Event::Init => self.pvs.volumes_listing = Some(HashMap::new()),
            Event::InitApply(pv) if model::is_volume_of(&pv, driver) => {
                let (key, placement) = (self.volume_key(&pv), self.placement(&pv));
                if let Some(listing) = &mut self.pvs.volumes_listing {
                    listing.insert(key, placement);
                }
            }
            Event::InitDone => self.volumes_listed(),
            Event::Apply(pv) if model::is_volume_of(&pv, driver) => {
                let placement = self.placement(&pv);
                let items = self.placement_items(&placement);
                let created = self.pvs.volumes.insert(self.volume_key(&pv), placement).is_none();
                if created && self.synced {
                    self.refresh(&items, "volume created");
                }
            }
            Event::Delete(pv) if model::is_volume_of(&pv, driver) => {
                self.pvs.volumes.remove(&self.volume_key(&pv));
                let items = self.placement_items(&self.placement(&pv));
                if self.synced {
                    self.refresh(&items, "volume deleted");
                }
            }
            _ => {}
        }
    }

    /// The PV list ended: PVs created or deleted while the watch was away
    /// refresh their items now, not at the next poll.
    pub(super) fn volumes_listed(&mut self) {
        let listed = self.pvs.volumes_listing.take().unwrap_or_default();
        let previous = std::mem::replace(&mut self.pvs.volumes, listed);
        self.synced_sources.insert("volumes");
        if !self.synced {
            self.try_initial_sync();
            return;
        }
        let created: Vec<WorkItem> = (self.pvs.volumes.iter())
            .filter(|(key, _)| !previous.contains_key(*key))
            .flat_map(|(_, placement)| self.placement_items(placement))
            .collect();
        let deleted: Vec<WorkItem> = (previous.iter())
            .filter(|(key, _)| !self.pvs.volumes.contains_key(*key))
            .flat_map(|(_, placement)| self.placement_items(placement))
            .collect();
        self.refresh(&created, "volume created while the watch was away");
        self.refresh(&deleted, "volume deleted while the watch was away");
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

    /// Refreshes `items` now (deduplicated by the queue).
    pub(super) fn refresh(&mut self, items: &[WorkItem], why: &str) {
        let now = Instant::now();
        for item in items {
            debug!(%item, why, "refreshing");
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
