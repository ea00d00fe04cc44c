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
                let (key, items) = (self.volume_key(&pv), self.volume_items(&pv));
                if let Some(listing) = &mut self.pvs.volumes_listing {
                    listing.insert(key, items);
                }
            }
            Event::InitDone => self.volumes_listed(),
            Event::Apply(pv) if model::is_volume_of(&pv, driver) => {
                let items = self.volume_items(&pv);
                let created = self.pvs.volumes.insert(self.volume_key(&pv), items.clone()).is_none();
                if created && self.synced {
                    self.refresh(&items, "volume created");
                }
            }
            Event::Delete(pv) if model::is_volume_of(&pv, driver) => {
                let known = self
                    .pvs
                    .volumes
                    .remove(&self.volume_key(&pv))
                    .filter(|items| !items.is_empty());
                let items = known.unwrap_or_else(|| self.volume_items(&pv));
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
            .flat_map(|(_, items)| items.iter().cloned())
            .collect();
        let deleted: Vec<WorkItem> = (previous.iter())
            .filter(|(key, _)| !self.pvs.volumes.contains_key(*key))
            .flat_map(|(_, items)| items.iter().cloned())
            .collect();
        self.refresh(&created, "volume created while the watch was away");
        self.refresh(&deleted, "volume deleted while the watch was away");
    }

    /// The items of the PV's class in the segments its node affinity admits.
    pub(super) fn volume_items(&self, pv: &VolumeObject) -> Box<[WorkItem]> {
        let Some((class, terms)) = model::volume_placement(pv, &self.config.driver) else {
            return Box::default();
        };
        let Some((class, _)) = self.classes.get_key_value(class) else {
            return Box::default();
        };
        (self.segments.admitted(terms).into_iter())
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
