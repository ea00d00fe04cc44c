//! Other controllers' objects: csi-provisioner's, taken over behind the
//! adoption gate (or given back while it still runs), and foreign ones,
//! reported once and never touched.

use super::*;

impl LoopState {
    /// A takeover write of csi-provisioner's object `name` for `item` ended:
    /// the canary's interval starts when it landed, a failed one waits a
    /// full interval again; landed after the gate closed, it is given back.
    pub(super) fn adopted(&mut self, item: &WorkItem, name: &str, result: std::result::Result<(), &Error>) {
        let Some(gate) = &mut self.adoption.gate else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(()) if gate.may_adopt(item) => gate.canary_written(item, now),
            // The gate closed meanwhile: if csi-provisioner's object stands
            // for the pair again, the pair keeps that one alone.
            Ok(()) => {
                if self.adoption.incumbent_items.contains_key(item) {
                    self.delete(name);
                }
            }
            Err(_) if matches!(gate.stage(), Stage::Canary { item: canary, .. } if canary == item) => {
                gate.restart(now);
            }
            Err(_) => {}
        }
    }

    /// An event of the objects for the driver that neither volplane nor
    /// csi-provisioner maintains: each is said once, never touched.
    pub(super) fn on_foreign(&mut self, event: Event<CapacityObject>) {
        if let Event::Apply(object) | Event::InitApply(object) = &event
            && let Some(name) = object.metadata.name.as_deref()
            && !self.adoption.foreign.contains_key(name)
        {
            self.report_foreign(name, object);
        }
        let event = convert(event, |object| Entry::of(&object, Some(())));
        self.feeds.feed("foreign capacities", event, &mut self.adoption.foreign);
        self.adoption.foreign.take_changes();
        self.metrics
            .foreign_objects
            .set(i64::try_from(self.adoption.foreign.len()).unwrap_or(i64::MAX));
    }

    pub(super) fn report_foreign(&self, name: &str, object: &CapacityObject) {
        let managed_by = object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(model::MANAGED_BY_LABEL))
            .map_or_else(|| "nobody (no managed-by label)".to_string(), |m| format!("{m:?}"));
        let note = volplane_runtime::text::event_note(&format!(
            "CSIStorageCapacity {}/{name} for driver {} (class {:?}) is maintained by {managed_by}: volplane \
             leaves it alone, and kube-scheduler reads it beside volplane's objects; delete it if it is stale",
            self.config.identity.namespace, self.config.driver, object.storage_class_name
        ));
        warn!(object = %name, %managed_by, "{note}");
        if let Some(target) = self.config.event_target.clone() {
            let announcement = Announcement::warning("ForeignCapacityObject", "AdoptCapacity", note);
            events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
        }
    }

    /// An event of csi-provisioner's objects for the driver.
    pub(super) fn on_incumbent(&mut self, event: Event<CapacityObject>) {
        let event = convert(event, |object| Entry::of(&object, Some(self.stored(&object))));
        let fed = self.feeds.feed("incumbents", event, &mut self.adoption.incumbents);
        let written = self.incumbent_changes_by_others();
        match fed {
            Fed::Applied(key) if self.published.store.contains_key(&key.name) => {
                // Ours already (taken over); this watch is behind.
                self.adoption.incumbents.take(&key.name);
                self.index_incumbents();
            }
            Fed::Applied(key) => {
                self.index_incumbents();
                if written {
                    let item = (self.adoption.incumbents.get(&key.name)).and_then(|stored| stored.item.clone());
                    self.incumbent_written(item.as_ref());
                }
                if self.synced {
                    self.adopt_open();
                }
            }
            // Adopted (its labels are volplane's now) or deleted.
            Fed::Deleted(_) => self.index_incumbents(),
            Fed::Listing => self.adoption.written_while_away |= written,
            Fed::Listed { first, .. } => self.incumbents_listed(first),
            Fed::Unnamed => {}
        }
    }

    /// Whether the incumbents' changes just fed include a write (a creation,
    /// or a new version) by someone other than volplane's value writes.
    fn incumbent_changes_by_others(&mut self) -> bool {
        let changes = self.adoption.incumbents.take_changes();
        let incumbents = &self.adoption.incumbents;
        let versions: Vec<(String, Option<String>)> = (changes.iter())
            .filter_map(|change: &Change<Stored>| {
                let now = incumbents.get(&change.name)?;
                let written = (change.before.as_ref()).is_none_or(|before| before.object.version != now.object.version);
                written.then(|| (change.name.clone(), now.object.version.clone()))
            })
            .collect();
        if self.adoption.incumbents.is_empty() {
            self.adoption.values.forget_versions();
        }
        let values = &mut self.adoption.values;
        let by_others = (versions.iter()).filter(|(name, version)| values.written_by_others(name, version.as_ref()));
        by_others.count() > 0
    }

    /// A value write into csi-provisioner's object for `item` ended: its
    /// version is remembered, a write of theirs seen meanwhile counts as
    /// theirs, and nothing of the object is recorded as volplane's.
    pub(super) fn value_written(
        &mut self,
        item: &WorkItem,
        result: Result<(Option<Written>, PublishedCapacity)>,
    ) -> Result<(Option<Written>, PublishedCapacity)> {
        let version = (result.as_ref().ok())
            .and_then(|(written, _)| written.as_ref())
            .and_then(|written| written.version.clone());
        let Some(others) = self.adoption.values.write_ended(item, version) else {
            return result;
        };
        if others {
            self.incumbent_written(Some(item));
        }
        result.map(|(_, value)| (None, value))
    }

    /// The incumbents' watch (re-)listed: one written while the watch was
    /// away counts as if seen written.
    fn incumbents_listed(&mut self, first: bool) {
        let written = std::mem::take(&mut self.adoption.written_while_away);
        self.index_incumbents();
        self.synced_sources.insert("incumbents");
        if !first && written {
            self.incumbent_written(None);
        }
        if self.synced {
            self.adopt_open();
        } else {
            self.try_initial_sync();
        }
    }

    pub(super) fn index_incumbents(&mut self) {
        let mut index: HashMap<WorkItem, String> = HashMap::new();
        for (name, stored) in &self.adoption.incumbents {
            if let Some(item) = &stored.item {
                // The oldest stands for the item, as with volplane's own.
                let keep = index.get(item).is_none_or(|other| {
                    self.adoption
                        .incumbents
                        .get(other)
                        .and_then(|o| o.object.created.as_ref())
                        > stored.object.created.as_ref()
                });
                if keep {
                    index.insert(item.clone(), name.clone());
                }
            }
        }
        self.adoption.incumbent_items = index;
    }

    /// Someone else wrote one of csi-provisioner's objects (for `item`):
    /// during a canary or after the gate opened, that is csi-provisioner
    /// still at work. The pair gets its one object back (volplane's copy
    /// goes, theirs stays), and it is said once.
    pub(super) fn incumbent_written(&mut self, item: Option<&WorkItem>) {
        let Some(gate) = &mut self.adoption.gate else {
            return;
        };
        let now = Instant::now();
        let canary = match gate.stage() {
            Stage::Canary { item, .. } => Some(item.clone()),
            _ => None,
        };
        let still_running = gate.appeared(now) == Appeared::StillRunning;
        // Every pair csi-provisioner writes for gets its object alone: the
        // canary's, and any written while the gate is not open.
        for item in canary.iter().chain(item) {
            self.give_back(item);
        }
        if !still_running {
            return;
        }
        self.metrics.incumbent_running.set(1);
        if self.adoption.incumbent_reported {
            return;
        }
        self.adoption.incumbent_reported = true;
        let note = format!(
            "csi-provisioner still maintains the CSIStorageCapacity objects of driver {} (it wrote one while \
             volplane was taking them over): volplane leaves them alone and tries again once they have been quiet \
             for a poll interval; switch its capacity tracking off (--enable-capacity=false)",
            self.config.driver
        );
        warn!(driver = %self.config.driver, "{note}");
        if let Some(target) = self.config.event_target.clone() {
            let announcement = Announcement::warning("IncumbentStillRunning", "AdoptCapacity", note);
            events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
        }
    }

    /// While csi-provisioner's object stands for `item`, volplane's copy of
    /// the pair (as the watch has it, or just written) goes.
    pub(super) fn give_back(&mut self, item: &WorkItem) {
        if !self.adoption.incumbent_items.contains_key(item) {
            return;
        }
        let ours = self
            .published
            .objects
            .get(item)
            .cloned()
            .or_else(|| self.published.unseen.get(item).map(|unseen| unseen.name.clone()))
            .or_else(|| self.adoption.adopting.get(item).cloned());
        if let Some(ours) = ours {
            self.delete(&ours);
        }
    }

    /// Moves the takeover of csi-provisioner's objects on: a canary once
    /// they have been quiet, all of them once the canary stood.
    pub(super) fn follow_gate(&mut self) {
        if !self.may_decide() || !self.leading {
            return;
        }
        let now = Instant::now();
        let Some(gate) = &mut self.adoption.gate else {
            return;
        };
        if gate.tick(now) {
            info!(
                objects = self.adoption.incumbents.len(),
                "csi-provisioner's objects are quiet and the canary stood: adopting all"
            );
            self.metrics.incumbent_running.set(0);
            self.adoption.incumbent_reported = false;
            self.adopt_open();
            return;
        }
        if !gate.canary_due(now) {
            return;
        }
        if self.adoption.incumbents.is_empty() {
            // Nothing to take over.
            gate.open();
            return;
        }
        // The canary: an object to take over, else one to delete (obsolete,
        // or a duplicate of volplane's) — csi-provisioner re-creates either.
        let adoptable = self
            .adoption
            .incumbent_items
            .iter()
            .filter(|(item, _)| !self.published.objects.contains_key(*item) && self.desired(item))
            .map(|(item, name)| (name, item))
            .min()
            .map(|(_, item)| item.clone());
        let obsolete = self
            .adoption
            .incumbents
            .iter()
            .filter_map(|(name, stored)| Some((name, stored.item.as_ref()?)))
            .min()
            .map(|(name, item)| (name.clone(), item.clone()));
        let Some(gate) = &mut self.adoption.gate else {
            return;
        };
        match (adoptable, obsolete) {
            (Some(item), _) => {
                info!(%item, "csi-provisioner's objects have been quiet for a poll interval: adopting one first");
                gate.start_canary(item.clone(), now);
                self.queue.schedule(item, now);
            }
            (None, Some((name, item))) => {
                info!(%item, %name, "csi-provisioner's objects have been quiet for a poll interval: deleting one obsolete first");
                gate.start_canary(item, now);
                self.delete(&name);
            }
            (None, None) => gate.open(),
        }
    }

    /// While the gate is open: every incumbent object standing for an item
    /// without one of volplane's is adopted (its item refreshed now); those
    /// standing for nothing volplane publishes, or duplicating its objects,
    /// are deleted.
    pub(super) fn adopt_open(&mut self) {
        if !self.may_decide() || !self.leading || !self.adoption.gate.as_ref().is_some_and(Gate::may_delete) {
            return;
        }
        let now = Instant::now();
        let mut obsolete = Vec::new();
        for (name, stored) in self
            .adoption
            .incumbents
            .iter()
            .filter(|(name, _)| !self.published.store.contains_key(name))
        {
            let standing = stored.item.as_ref().filter(|item| {
                self.desired(item)
                    && !self.published.objects.contains_key(*item)
                    && self.adoption.incumbent_items.get(*item) == Some(name)
            });
            match standing {
                Some(item) => {
                    if !self.queue.is_pending(item) && !self.queue.is_in_flight(item) {
                        self.queue.schedule(item.clone(), now);
                    }
                }
                None => obsolete.push(name.clone()),
            }
        }
        for name in obsolete {
            self.delete(&name);
        }
    }
}
