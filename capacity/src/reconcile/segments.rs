//! Segments and classes as the loop follows them: Node and CSINode
//! events update the topology index (a node that disappears takes its
//! segment's items with it), StorageClasses and the CSIDriver switch items
//! and tracking on or off.

use super::*;

impl LoopState {
    /// A Node event (central mode): its segment may come or go.
    pub(super) fn on_node(&mut self, event: Event<NodeLabels>) {
        let Segments::Central(index) = &mut self.segments else {
            return;
        };
        let mut nodes = NodesOf {
            index,
            applied: Applied::default(),
        };
        let fed = self.feeds.feed("nodes", event, &mut nodes);
        let applied = nodes.applied;
        self.segments_changed(applied);
        if matches!(fed, Fed::Listed { .. }) {
            self.synced_sources.insert("nodes");
            self.try_initial_sync();
        }
    }

    /// A CSINode event (central mode): its node's segment may come or go,
    /// and a topology key never seen before lists the Nodes again.
    pub(super) fn on_csinode(&mut self, event: Event<k8s_openapi::api::storage::v1::CSINode>) {
        let Segments::Central(index) = &mut self.segments else {
            return;
        };
        let mut csinodes = CsiNodesOf {
            index,
            applied: Applied::default(),
        };
        let fed = self.feeds.feed("csinodes", event, &mut csinodes);
        let applied = csinodes.applied;
        if applied.nodes_stale && self.synced_sources.contains("csinodes") {
            info!("a CSINode names a new topology key; listing the Nodes again");
            self.restart_node_watch();
        }
        self.segments_changed(applied);
        if matches!(fed, Fed::Listed { .. }) {
            if self.synced_sources.insert("csinodes") {
                // The keys are known: the Node watch can start.
                self.restart_node_watch();
            }
            self.try_initial_sync();
        }
    }

    pub(super) fn restart_node_watch(&mut self) {
        let keys = match &self.segments {
            Segments::Central(index) => index.keys(),
            Segments::Fixed(_) => return,
        };
        if let Some(sender) = &self.node_keys {
            sender.send_replace(Some(keys));
        }
    }

    /// Segments came or went: their items are scheduled or dropped.
    pub(super) fn segments_changed(&mut self, applied: Applied) {
        if !self.synced {
            return;
        }
        if !applied.added.is_empty() || !applied.removed.is_empty() {
            self.relocate_placements();
        }
        let now = Instant::now();
        let classes: Vec<Arc<str>> = self.classes.keys().cloned().collect();
        for segment in applied.removed {
            for class in &classes {
                self.drop_item(WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                });
            }
        }
        for segment in applied.added {
            for class in &classes {
                let item = WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                };
                debug!(%item, "new work item");
                self.queue.schedule(item, now);
            }
        }
    }

    /// An item is no longer desired: its work stops and its object goes.
    pub(super) fn drop_item(&mut self, item: WorkItem) {
        debug!(%item, "work item gone");
        self.queue.forget(&item);
        self.last_warning.remove(&item);
        self.oversized.remove(&item);
        self.answers.forget(&item);
        self.published.unseen.remove(&item);
        self.published.deferred.remove(&item);
        if let Some(name) = self.published.objects.remove(&item) {
            self.delete(&name);
        }
    }

    /// Follows the enablement switch: says so once per change (log, metric,
    /// events on the owner and the CSIDriver), and returns whether to publish.
    pub(super) fn follow_tracking(&mut self) -> bool {
        let csidriver = self
            .driver_store
            .as_ref()
            .and_then(|store| store.state().into_iter().next());
        let tracking = model::tracking(self.config.enablement, csidriver.as_deref());
        if self.tracking == Some(tracking) {
            return tracking.enabled();
        }
        let first = self.tracking.is_none();
        self.tracking = Some(tracking);
        self.metrics.enabled.set(i64::from(tracking.enabled()));
        let explanation = tracking.explanation(&self.config.driver);
        if tracking.enabled() {
            info!(enablement = ?self.config.enablement, "{explanation}");
        } else {
            warn!(enablement = ?self.config.enablement, "{explanation}");
        }
        // Turning on at startup is the normal case: no event for it.
        if first && tracking.enabled() {
            return true;
        }
        let type_ = if tracking.enabled() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let announcement = Announcement::new(type_, tracking.reason(), "Enablement", explanation);
        let on_driver = csidriver.map(|object| object.object_ref(&()));
        events::publish_in_background(
            &self.recorder,
            &self.leadership,
            &announcement,
            self.config.event_target.clone().into_iter().chain(on_driver),
        );
        tracking.enabled()
    }

    /// Follows the StorageClasses and the enablement switch: items of new
    /// classes are scheduled, items of classes gone (or of every class,
    /// when tracking is switched off) are dropped with their objects.
    pub(super) fn follow_classes(&mut self) {
        let tracked = self.follow_tracking();
        let mut classes: BTreeMap<Arc<str>, Arc<Labels>> = BTreeMap::new();
        if tracked {
            for class in self.class_store.state() {
                let (Some(name), Some(parameters)) = (
                    class.metadata.name.as_deref(),
                    model::capacity_parameters(&class, &self.config.driver, self.config.include_immediate),
                ) else {
                    continue;
                };
                // Keep the shared copies the items already hold.
                let name = self
                    .classes
                    .get_key_value(name)
                    .map_or_else(|| Arc::from(name), |(known, _)| known.clone());
                classes.insert(name, Arc::new(parameters));
            }
        }
        let removed: Vec<Arc<str>> = self
            .classes
            .keys()
            .filter(|c| !classes.contains_key(*c))
            .cloned()
            .collect();
        let added: Vec<Arc<str>> = classes
            .keys()
            .filter(|c| !self.classes.contains_key(*c))
            .cloned()
            .collect();
        self.classes = classes;
        if !added.is_empty() || !removed.is_empty() {
            self.relocate_placements();
        }
        let segments: Vec<Segment> = self.segments.iter().cloned().collect();
        for class in removed {
            for segment in &segments {
                self.drop_item(WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                });
            }
        }
        let now = Instant::now();
        for class in added {
            for segment in &segments {
                self.queue.schedule(
                    WorkItem {
                        segment: segment.clone(),
                        class: class.clone(),
                    },
                    now,
                );
            }
        }
    }
}
