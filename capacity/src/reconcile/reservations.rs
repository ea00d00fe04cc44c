//! The scheduler's placements in flight: claims placed on a node and not
//! provisioned yet reserve their bytes in what is published for the node's
//! segment and the claim's class (see [`crate::in_flight`]). A central
//! instance follows the claims; a per-node instance its node's list (see
//! [`crate::placements`]).

use super::*;

/// How a (node, class) maps to an item now: the node's segment and the
/// class, when it is published for.
fn item_of<'a>(
    segments: &'a Segments,
    classes: &'a BTreeMap<Arc<str>, Arc<Labels>>,
) -> impl Fn(&str, &str) -> Option<WorkItem> + 'a {
    move |node, class| {
        let (class, _) = classes.get_key_value(class)?;
        Some(WorkItem {
            segment: segments.segment_of(node)?.clone(),
            class: class.clone(),
        })
    }
}

impl LoopState {
    /// A claim event: a placement that came, went or was bound refreshes
    /// its item at once (the driver is asked, and what is published is its
    /// value less what is in flight).
    pub(super) fn on_claim(&mut self, event: Event<ClaimObject>) {
        let mut claims = ClaimsOf {
            in_flight: &mut self.in_flight,
            item_of: item_of(&self.segments, &self.classes),
            refresh: Vec::new(),
        };
        let fed = self.feeds.feed("claims", event, &mut claims);
        let refresh = std::mem::take(&mut claims.refresh);
        drop(claims);
        if self.synced {
            self.refresh_placements(&refresh, "placement in flight");
        }
        if matches!(fed, Fed::Listed { .. }) {
            self.synced_sources.insert("claims");
            self.try_initial_sync();
        }
    }

    /// Segments or classes changed: every placement counts for the item
    /// it belongs to now.
    pub(super) fn relocate_placements(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let changed = self.in_flight.relocate(item_of(&self.segments, &self.classes));
        if self.synced {
            self.refresh(&changed, "placements in flight moved");
        }
    }

    /// The driver's value for `item` as published: less what its
    /// placements in flight reserve (those its answer, asked at `asked`
    /// and `fell` below the previous one, covers are released first), with
    /// the reservation behind it.
    pub(super) fn published_value(
        &mut self,
        item: &WorkItem,
        report: CapacityReport,
        asked: Moment,
        fell: i64,
    ) -> Publication {
        self.in_flight.answered(item, asked, fell);
        let value = PublishedCapacity {
            capacity: report.available_capacity,
            maximum_volume_size: report.maximum_volume_size,
        };
        let reserved = self.in_flight.reserved(item);
        Publication {
            value: in_flight::less_reserved(value, reserved),
            reservation: Reservation::of(report.available_capacity, reserved),
        }
    }

    /// An event of this node's placements ConfigMap (per-node mode): what
    /// it lists is reserved; what leaves it is asked for again.
    pub(super) fn on_node_placements(&mut self, event: Event<k8s_openapi::api::core::v1::ConfigMap>) {
        let Some(node) = self.config.node_placements.clone() else {
            return;
        };
        let mut list = NodeListOf {
            in_flight: &mut self.in_flight,
            node: &node,
            map: ObjectKey::namespaced(
                self.config.identity.namespace.clone(),
                crate::placements::config_map_name(&node),
            ),
            item_of: item_of(&self.segments, &self.classes),
            refresh: Vec::new(),
            unreadable: Vec::new(),
            released: None,
        };
        let fed = self.feeds.feed("node placements", event, &mut list);
        let refresh = std::mem::take(&mut list.refresh);
        let unreadable = std::mem::take(&mut list.unreadable);
        let released = list.released.take();
        drop(list);
        if !unreadable.is_empty() {
            warn!(entries = ?volplane_runtime::text::prefix(&format!("{unreadable:?}"), 512),
                  "entries of this node's placements ConfigMap that do not read as `<bytes> <class>` are skipped");
        }
        if self.synced {
            self.refresh_placements(&refresh, "placement in flight on this node");
        }
        if let Some(released) = released {
            self.on_release_mark(released);
        }
        if matches!(fed, Fed::Listed { .. }) {
            self.synced_sources.insert("node placements");
            self.try_initial_sync();
        }
    }

    /// The node's release mark changed (the central controller saw a
    /// bound claim placed here deleted: its volume is about to be): polls
    /// turn fast for a while. The mark found at start is only noted.
    fn on_release_mark(&mut self, released: Option<String>) {
        let changed = released.is_some() && released != self.released;
        self.released = released;
        if changed && self.synced {
            self.poll_fast();
        }
    }
}
