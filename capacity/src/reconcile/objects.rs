//! volplane's published objects: the watch's view of them, the re-list
//! that maps them onto the items (re-created, adopted, duplicates
//! deleted), and volplane's own writes on their way through the watch.

use super::*;

impl LoopState {
    /// An object as the watch delivered it, with its item sharing the
    /// loop's copies of segment and class.
    pub(super) fn stored(&self, object: &CapacityObject) -> Stored {
        let item = model::item_of(object).map(|item| WorkItem {
            class: self
                .classes
                .get_key_value(&*item.class)
                .map_or(item.class, |(known, _)| known.clone()),
            segment: self.segments.shared(item.segment),
        });
        Stored {
            item,
            object: KnownObject::of(object, &self.config.identity),
        }
    }

    pub(super) fn on_capacity(&mut self, event: Event<CapacityObject>) {
        // As it was when deleted (the watch's last word on it).
        let deleted = match &event {
            Event::Delete(object) => Some(self.stored(object)),
            _ => None,
        };
        let event = convert(event, |object| Entry::of(&object, Some(self.stored(&object))));
        let fed = self.feeds.feed("capacities", event, &mut self.published.store);
        let changes = self.published.store.take_changes();
        match fed {
            Fed::Applied(key) => {
                // An object just taken over from csi-provisioner may arrive
                // here before its watch says it left.
                if self.adoption.incumbents.take(&key.name).is_some() {
                    self.index_incumbents();
                }
                let synced = self.synced;
                for change in changes.into_iter().filter(|_| synced) {
                    if let Some(now) = self.published.store.get(&change.name).cloned() {
                        self.on_object(&change.name, change.before.as_ref(), &now);
                    }
                }
            }
            Fed::Deleted(key) => {
                if let Some(deleted) = deleted.filter(|_| self.synced) {
                    self.on_object_deleted(&key.name, &deleted);
                }
            }
            Fed::Listing => {
                for change in changes {
                    let now = self.published.store.get(&change.name);
                    if let (Some(before), Some(now)) = (&change.before, now)
                        && model::changed_by_others(&before.object, &now.object)
                    {
                        self.published.changed_while_away.insert(change.name);
                    }
                }
            }
            Fed::Listed { .. } => {
                let changed = std::mem::take(&mut self.published.changed_while_away);
                self.synced_sources.insert("capacities");
                if self.synced {
                    self.resync_objects(&changed);
                } else {
                    self.try_initial_sync();
                }
            }
            Fed::Unnamed => {}
        }
    }

    /// After the capacity watch (re-)listed: the listed objects are mapped
    /// onto the items by [`model::reconcile_objects`]; what vanished
    /// meanwhile is re-created, what appeared is adopted or deleted, what
    /// someone else `changed` meanwhile (by name) is refreshed.
    pub(super) fn resync_objects(&mut self, changed: &HashSet<String>) {
        let now = Instant::now();
        self.keep_unseen_writes(now);
        // Deletes in flight stay; those whose object is gone are done.
        let store = &self.published.store;
        self.published.deleting.retain(|name| store.contains_key(name));
        let listed = self
            .published
            .store
            .iter()
            .filter(|(name, _)| !self.published.deleting.contains(*name))
            .map(|(name, stored)| Existing {
                name,
                item: stored.item.as_ref(),
                created: stored.object.created.as_ref(),
            });
        let plan = model::reconcile_objects(self.desired_items(), |item| self.desired(item), listed);
        for name in &plan.delete {
            self.delete(name);
        }
        let known = std::mem::take(&mut self.published.objects);
        for (item, name) in plan.adopt {
            let refresh = match known.get(&item) {
                Some(was) if *was == name => changed.contains(&name),
                _ => {
                    debug!(%item, %name, "adopting object");
                    true
                }
            };
            if refresh && !self.queue.is_in_flight(&item) {
                self.queue.schedule(item.clone(), now);
            }
            self.published.objects.insert(item, name);
        }
        for item in plan.missing {
            if let Some(unseen) = self
                .published
                .unseen
                .get(&item)
                .filter(|u| !self.published.store.contains_key(&u.name))
            {
                // Created after the list's snapshot: not missing, no second object.
                self.published.objects.insert(item, unseen.name.clone());
                continue;
            }
            if known.contains_key(&item) {
                info!(%item, "object deleted by someone else; re-creating");
            }
            self.queue.schedule(item, now);
        }
    }

    /// After a list: writes it shows are seen; the others were made after
    /// its snapshot and arrive through the watch next. Refreshes that
    /// waited for a seen write run now.
    fn keep_unseen_writes(&mut self, now: Instant) {
        let store = &self.published.store;
        self.published.unseen.retain(|_, unseen| {
            store
                .get(&unseen.name)
                .is_none_or(|s| s.object.version != unseen.version)
        });
        let unseen = &self.published.unseen;
        let due: Vec<WorkItem> = self
            .published
            .deferred
            .iter()
            .filter(|i| !unseen.contains_key(*i))
            .cloned()
            .collect();
        for item in due {
            self.published.deferred.remove(&item);
            self.queue.schedule(item, now);
        }
    }

    /// The watch delivered object `name` (`previous`: how it was before).
    /// Our own writes are recognised by their version; until ours arrives,
    /// what comes before it is not taken for someone else's change.
    pub(super) fn on_object(&mut self, name: &str, previous: Option<&Stored>, now: &Stored) {
        if self.published.deleting.contains(name) {
            return;
        }
        let Some(item) = now.item.clone().filter(|item| self.desired(item)) else {
            self.delete(name);
            return;
        };
        let awaited = self
            .published
            .unseen
            .get(&item)
            .is_some_and(|unseen| unseen.name == name);
        if self
            .published
            .unseen
            .get(&item)
            .is_some_and(|unseen| unseen.name == name && unseen.version == now.object.version)
        {
            self.write_seen(&item);
        }
        match self.published.objects.get(&item) {
            Some(known) if known == name => {
                let changed = !awaited && previous.is_none_or(|p| model::changed_by_others(&p.object, &now.object));
                if changed && !self.queue.is_pending(&item) {
                    debug!(%item, %name, "object changed by someone else; refreshing");
                    self.queue.schedule(item, Instant::now());
                }
            }
            Some(_) => {
                debug!(%item, %name, "duplicate object");
                self.delete(name);
            }
            None => {
                self.published.objects.insert(item.clone(), name.to_string());
                // An item in flight is usually creating this very object:
                // its result arrives next, no second run needed.
                if !awaited && !self.queue.is_in_flight(&item) {
                    debug!(%item, %name, "adopting object");
                    self.queue.schedule(item, Instant::now());
                }
            }
        }
    }

    /// The watch delivered our write for `item` (or it was deleted): a
    /// refresh that waited for it runs now.
    pub(super) fn write_seen(&mut self, item: &WorkItem) {
        self.published.unseen.remove(item);
        if self.published.deferred.remove(item) {
            self.queue.schedule(item.clone(), Instant::now());
        }
    }

    /// Whether `item`'s last write is still on its way through the watch
    /// (a refresh now would write from a stale version). A write unseen for
    /// [`UNSEEN_LIMIT`] is given up on.
    pub(super) fn awaits_watch(&mut self, item: &WorkItem, now: Instant) -> bool {
        match self.published.unseen.get(item) {
            Some(unseen) if now.duration_since(unseen.at) < UNSEEN_LIMIT => true,
            Some(unseen) => {
                warn!(%item, name = %unseen.name, "the watch has not delivered volplane's own write; refreshing anyway");
                self.published.unseen.remove(item);
                false
            }
            None => false,
        }
    }

    pub(super) fn on_object_deleted(&mut self, name: &str, stored: &Stored) {
        self.published.deleting.remove(name);
        let Some(item) = stored.item.clone() else {
            return;
        };
        if self
            .published
            .unseen
            .get(&item)
            .is_some_and(|unseen| unseen.name == name)
        {
            self.write_seen(&item);
        }
        if self.published.objects.get(&item).is_some_and(|known| known == name) {
            self.published.objects.remove(&item);
            if self.desired(&item) {
                info!(%item, %name, "object deleted by someone else; re-creating");
                self.queue.schedule(item, Instant::now());
            }
        }
    }

    pub(super) fn delete(&mut self, name: &str) {
        // A follower leaves it to the leader (or to itself once it leads).
        if name.is_empty() || !self.leading || !self.published.deleting.insert(name.to_string()) {
            return;
        }
        let api = self.api.clone();
        let leadership = self.leadership.clone();
        let metrics = self.metrics.clone();
        let uid = self
            .published
            .store
            .get(name)
            .or_else(|| self.adoption.incumbents.get(name))
            .and_then(|s| s.object.uid.clone());
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name = name.to_string();
        info!(%name, "deleting obsolete CSIStorageCapacity");
        self.tasks.push(
            async move {
                let result = delete_with_retries(&api, &name, &params, &leadership, &metrics).await;
                Done::Deleted(name, result)
            }
            .boxed(),
        );
    }
}

/// Deletes object `name` under `params`' preconditions, up to five
/// attempts; gone already, or replaced by another object of the name, is done.
async fn delete_with_retries(
    api: &Api<CapacityObject>,
    name: &str,
    params: &DeleteParams,
    leadership: &Leadership,
    metrics: &CapacityMetrics,
) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let Ok(deleted) = leadership.guard(api.delete(name, params)).await else {
            return Err(Error::NotLeader(volplane_runtime::NotLeader));
        };
        match deleted {
            Ok(_) => {
                metrics.wrote("delete");
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return Ok(()),
            Err(error) if attempt >= 5 => {
                return Err(Error::Write {
                    verb: "delete",
                    source: error,
                });
            }
            Err(error) => {
                warn!(%name, %error, attempt, "delete failed; retrying");
                tokio::time::sleep(DELETE_RETRY.delay(attempt)).await;
            }
        }
    }
}
