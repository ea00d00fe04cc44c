//! Placements in flight: claims the scheduler has placed on a node
//! (`volume.kubernetes.io/selected-node`) whose volume is not provisioned
//! yet. Pure: claim events in, bytes reserved per item out.
//!
//! kube-scheduler compares each claim with a published object alone and
//! subtracts nothing for the claims it placed a moment ago (KEP-1472 lists
//! that as a non-goal; kubernetes/kubernetes#111755, topolvm/topolvm#117,
//! kubernetes-csi/external-provisioner#697): in a burst, every pod sees the
//! same free space and the driver refuses the ones that do not fit. What
//! volplane publishes for an item is the driver's value less what the
//! item's placements in flight reserve, so the scheduler is never shown
//! more than the driver has left.
//!
//! A claim reserves its requested bytes from the moment it is placed until
//! - it is deleted, or its `selected-node` is removed (the provisioner
//!   gave it back: provisioning failed and the pod is scheduled again); or
//! - it is bound **and** the driver answered a question asked after that:
//!   only then does the driver's own value cover the new volume. Between
//!   the volume's creation and that answer both count, and less is
//!   published for that moment, never more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use volplane_runtime::{Index, Keyed, ObjectKey};

use crate::model::{PublishedCapacity, WorkItem};
use crate::quantity::parse_bytes;

/// The annotation kube-scheduler sets on a claim it placed.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A PersistentVolumeClaim cut to what decides a placement: name,
/// namespace, the `selected-node` annotation (no other), class, requested
/// storage and bound volume.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClaimObject {
    /// Name, namespace and the `selected-node` annotation.
    #[serde(deserialize_with = "claim_metadata")]
    pub metadata: ObjectMeta,
    /// Class, request and volume.
    pub spec: Option<ClaimSpec>,
}

volplane_runtime::slim_resource!(ClaimObject, PersistentVolumeClaim);

/// The part of a claim's spec a placement reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSpec {
    /// `storageClassName`.
    pub storage_class_name: Option<String>,
    /// `volumeName`: set once the claim is bound.
    pub volume_name: Option<String>,
    /// `resources.requests`.
    pub resources: Option<ClaimResources>,
}

/// `spec.resources` of a claim.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClaimResources {
    /// `requests`.
    pub requests: Option<BTreeMap<String, Quantity>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    #[serde(default, deserialize_with = "selected_node_only")]
    annotations: Option<BTreeMap<String, String>>,
}

fn claim_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = ClaimMeta::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        annotations: meta.annotations,
        ..ObjectMeta::default()
    })
}

/// The annotations, of which only `selected-node` is kept (the others are
/// skipped without being allocated).
fn selected_node_only<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct SelectedNode;
    impl<'de> Visitor<'de> for SelectedNode {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == SELECTED_NODE {
                    kept = Some(BTreeMap::from([(key.into_owned(), map.next_value::<String>()?)]));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(kept)
        }
    }
    deserializer.deserialize_any(SelectedNode)
}

/// What a claim says of its placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// Placed on `node`, not bound yet: `bytes` of `class` are in flight.
    Placed {
        /// The selected node.
        node: String,
        /// The claim's class.
        class: String,
        /// Its requested storage.
        bytes: i64,
    },
    /// Bound to a volume.
    Bound,
    /// Not placed (no selected node, no class or no valid request).
    Unplaced,
}

/// What `claim` says of its placement.
pub fn claimed(claim: &ClaimObject) -> Claimed {
    let spec = claim.spec.as_ref();
    if spec
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        return Claimed::Bound;
    }
    let node = (claim.metadata.annotations.as_ref())
        .and_then(|a| a.get(SELECTED_NODE))
        .filter(|node| !node.is_empty());
    let class = spec
        .and_then(|s| s.storage_class_name.as_deref())
        .filter(|c| !c.is_empty());
    let bytes = (spec.and_then(|s| s.resources.as_ref()))
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_bytes(&q.0))
        .filter(|bytes| *bytes > 0);
    match (node, class, bytes) {
        (Some(node), Some(class), Some(bytes)) => Claimed::Placed {
            node: node.clone(),
            class: class.to_string(),
            bytes,
        },
        _ => Claimed::Unplaced,
    }
}

/// The driver's value less what is reserved: never more than the driver
/// has left (a maximum volume size is capped at what is left too, as the
/// scheduler reads the maximum alone when it is set).
pub fn less_reserved(value: PublishedCapacity, reserved: i64) -> PublishedCapacity {
    if reserved <= 0 {
        return value;
    }
    let capacity = value.capacity.saturating_sub(reserved).max(0);
    PublishedCapacity {
        capacity,
        maximum_volume_size: value.maximum_volume_size.map(|maximum| maximum.min(capacity)),
    }
}

/// A moment of the index: an answer to a question asked at or after the
/// moment a claim was seen bound covers the claim.
pub type Moment = u64;

/// A claim held: placed on `node`, for `class`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    node: Arc<str>,
    class: Arc<str>,
    bytes: i64,
    /// The item it counts for, when its node is in a segment of a class
    /// published for.
    item: Option<WorkItem>,
    /// When it was seen bound.
    bound_at: Option<Moment>,
}

/// Bytes reserved for one item, and by which claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Reserved {
    bytes: i64,
    claims: BTreeSet<ObjectKey>,
}

/// The placements in flight, by claim, with what they reserve per item.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    claims: HashMap<ObjectKey, Held>,
    reserved: HashMap<WorkItem, Reserved>,
    now: Moment,
}

impl InFlight {
    /// The current moment: what a question asked now is asked at.
    pub fn now(&self) -> Moment {
        self.now
    }

    /// Bytes reserved for `item`.
    pub fn reserved(&self, item: &WorkItem) -> i64 {
        self.reserved.get(item).map_or(0, |r| r.bytes)
    }

    /// How many claims are held (placed, or bound and not covered yet).
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// How many claims reserve bytes for an item now (a claim of a class
    /// not published for, or on a node in no segment, is held but reserves
    /// nothing).
    pub fn reserving(&self) -> usize {
        self.reserved.values().map(|r| r.claims.len()).sum()
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Every held claim's key.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.claims.keys()
    }

    /// Items with something reserved, and how much.
    pub fn items(&self) -> impl Iterator<Item = (&WorkItem, i64)> {
        self.reserved.iter().map(|(item, r)| (item, r.bytes))
    }

    /// The claim under `key` says `claimed`; `item_of` says which item a
    /// (node, class) counts for now. Returns the items to refresh: those
    /// whose reservation changed, and that of a claim just bound (its
    /// driver's value is asked again, which ends the reservation).
    pub fn apply(
        &mut self,
        key: ObjectKey,
        claimed: Claimed,
        item_of: impl Fn(&str, &str) -> Option<WorkItem>,
    ) -> Vec<WorkItem> {
        self.now += 1;
        match claimed {
            Claimed::Placed { node, class, bytes } => {
                if let Some(held) = self.claims.get(&key)
                    && *held.node == *node
                    && *held.class == *class
                    && held.bytes == bytes
                    && held.bound_at.is_none()
                {
                    return Vec::new();
                }
                let mut refresh = self.release(&key);
                let item = item_of(&node, &class);
                let held = Held {
                    node: node.into(),
                    class: class.into(),
                    bytes,
                    item,
                    bound_at: None,
                };
                refresh.extend(self.hold(key, held));
                refresh
            }
            Claimed::Bound => match self.claims.get_mut(&key) {
                Some(held) if held.bound_at.is_none() => {
                    held.bound_at = Some(self.now);
                    held.item.clone().into_iter().collect()
                }
                _ => Vec::new(),
            },
            Claimed::Unplaced => self.release(&key),
        }
    }

    /// The claim under `key` is gone. Returns the item whose reservation changed.
    pub fn delete(&mut self, key: &ObjectKey) -> Vec<WorkItem> {
        self.now += 1;
        self.release(key)
    }

    /// The driver answered for `item` a question asked at `asked`: the
    /// claims seen bound by then are in its value, and reserve no more.
    pub fn answered(&mut self, item: &WorkItem, asked: Moment) {
        let Some(reserved) = self.reserved.get(item) else {
            return;
        };
        let covered: Vec<ObjectKey> = (reserved.claims.iter())
            .filter(|key| {
                (self.claims.get(*key))
                    .and_then(|held| held.bound_at)
                    .is_some_and(|bound| bound <= asked)
            })
            .cloned()
            .collect();
        for key in covered {
            self.release(&key);
        }
    }

    /// Segments or classes changed: every claim counts again for the item
    /// `item_of` says. Returns the items whose reservation changed.
    pub fn relocate(&mut self, item_of: impl Fn(&str, &str) -> Option<WorkItem>) -> Vec<WorkItem> {
        let before = std::mem::take(&mut self.reserved);
        let claims = std::mem::take(&mut self.claims);
        for (key, mut held) in claims {
            held.item = item_of(&held.node, &held.class);
            self.hold(key, held);
        }
        let mut changed: Vec<WorkItem> = (before.iter())
            .filter(|(item, r)| self.reserved.get(*item).map(|now| now.bytes) != Some(r.bytes))
            .map(|(item, _)| item.clone())
            .collect();
        changed.extend(
            (self.reserved.keys())
                .filter(|item| !before.contains_key(*item))
                .cloned(),
        );
        changed
    }

    fn hold(&mut self, key: ObjectKey, held: Held) -> Option<WorkItem> {
        let item = held.item.clone();
        if let Some(item) = &item {
            let reserved = self.reserved.entry(item.clone()).or_default();
            reserved.bytes = reserved.bytes.saturating_add(held.bytes);
            reserved.claims.insert(key.clone());
        }
        self.claims.insert(key, held);
        item
    }

    fn release(&mut self, key: &ObjectKey) -> Vec<WorkItem> {
        let Some(held) = self.claims.remove(key) else {
            return Vec::new();
        };
        let Some(item) = held.item else {
            return Vec::new();
        };
        if let Some(reserved) = self.reserved.get_mut(&item) {
            reserved.bytes = reserved.bytes.saturating_sub(held.bytes);
            reserved.claims.remove(key);
            if reserved.claims.is_empty() {
                self.reserved.remove(&item);
            }
        }
        vec![item]
    }
}

/// An [`InFlight`] as a claim watch feeds it, with how a (node, class)
/// maps to an item now, gathering the items to refresh.
pub struct ClaimsOf<'a, F> {
    /// The index fed.
    pub in_flight: &'a mut InFlight,
    /// The item a (node, class) counts for.
    pub item_of: F,
    /// Items whose reservation changed, or whose claim was just bound.
    pub refresh: Vec<WorkItem>,
}

impl<F> fmt::Debug for ClaimsOf<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimsOf")
            .field("in_flight", &self.in_flight)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&str, &str) -> Option<WorkItem>> Index<ClaimObject> for ClaimsOf<'_, F> {
    fn apply(&mut self, claim: ClaimObject) {
        if let Some(key) = claim.key() {
            let refresh = self.in_flight.apply(key, claimed(&claim), &self.item_of);
            self.refresh.extend(refresh);
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        let refresh = self.in_flight.delete(key);
        self.refresh.extend(refresh);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.in_flight.keys().cloned().collect()
    }
}

/// An [`InFlight`] as the watch of one node's placements ConfigMap feeds
/// it (per-node mode): the claims it lists are placed on `node`; one that
/// leaves the list was bound, given back or deleted, and is released by
/// the next answer asked after that (asked at once: it is refreshed).
pub struct NodeListOf<'a, F> {
    /// The index fed.
    pub in_flight: &'a mut InFlight,
    /// This node.
    pub node: &'a str,
    /// The key of the node's ConfigMap.
    pub map: ObjectKey,
    /// The item a (node, class) counts for.
    pub item_of: F,
    /// Items to refresh.
    pub refresh: Vec<WorkItem>,
    /// Entries of the list that do not read as placements.
    pub unreadable: Vec<String>,
    /// The ConfigMap's release mark, when an event brought it (inner
    /// `None`: the ConfigMap or its mark is gone).
    pub released: Option<Option<String>>,
}

impl<F> fmt::Debug for NodeListOf<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeListOf")
            .field("node", &self.node)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&str, &str) -> Option<WorkItem>> NodeListOf<'_, F> {
    /// Every held claim not in `listed` has left the list.
    fn left(&mut self, listed: &BTreeSet<ObjectKey>) {
        let gone: Vec<ObjectKey> = self
            .in_flight
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let refresh = self.in_flight.apply(key, Claimed::Bound, &self.item_of);
            self.refresh.extend(refresh);
        }
    }
}

impl<F: Fn(&str, &str) -> Option<WorkItem>> Index<k8s_openapi::api::core::v1::ConfigMap> for NodeListOf<'_, F> {
    fn apply(&mut self, map: k8s_openapi::api::core::v1::ConfigMap) {
        let mark = (map.metadata.annotations.as_ref()).and_then(|a| a.get(crate::placements::RELEASED_ANNOTATION));
        self.released = Some(mark.cloned());
        let data = map.data.unwrap_or_default();
        let (placed, unreadable) = crate::placements::from_data(self.node, &data);
        self.unreadable.extend(unreadable);
        let listed: BTreeSet<ObjectKey> = placed.iter().map(|(key, _)| key.clone()).collect();
        self.left(&listed);
        for (key, claimed) in placed {
            let refresh = self.in_flight.apply(key, claimed, &self.item_of);
            self.refresh.extend(refresh);
        }
    }

    fn delete(&mut self, _key: &ObjectKey) {
        self.released = Some(None);
        self.left(&BTreeSet::new());
    }

    fn keys(&self) -> Vec<ObjectKey> {
        // The one ConfigMap, while it lists something: a re-list that does
        // not bring it deletes it.
        if self.in_flight.is_empty() {
            return Vec::new();
        }
        vec![self.map.clone()]
    }
}

#[cfg(test)]
mod tests;
