//! The scheduler's placements in flight, per node, for per-node
//! instances. Pure: claim events in, one small ConfigMap per node out.
//!
//! A per-node instance must not read claims cluster-wide (the API server
//! would pay it once per node). The one central placements controller
//! watches them instead and keeps, for every node, a ConfigMap
//! `volplane-placements-<node>` listing the claims placed there and not
//! bound yet: key `<namespace>.<name>`, value `<bytes> <class>`. Each
//! per-node instance watches its node's ConfigMap by name (O(1) for the
//! API server) and reserves what it lists; a claim that leaves the list
//! was bound (its volume created: the next answer of the local driver
//! covers it, and the instance asks at once) or given back or deleted
//! (then the next answer frees it too). See [`crate::in_flight`].
//!
//! A bound claim placed on a node that is deleted takes its volume with
//! it a moment later (DeleteVolume by the provisioner): the controller
//! sets the ConfigMap's `volplane.io/released` mark, and the node's
//! instance polls its driver fast for a while, so the freed bytes show at
//! once instead of at the next regular poll.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Map, Value, json};
use volplane_runtime::{Index, Keyed, ObjectKey};

use crate::claim::{ClaimObject, Claimed, claimed};
use crate::in_flight::InFlight;
use crate::model::WorkItem;

pub mod publisher;
pub mod sweep;

/// The annotation naming the node a placements ConfigMap is for.
pub const NODE_ANNOTATION: &str = "volplane.io/node";
/// The annotation marking the last time a bound claim placed on the node
/// was seen deleted (its volume is about to be deleted: the node's
/// instance polls fast for a while).
pub const RELEASED_ANNOTATION: &str = "volplane.io/released";
/// The label of volplane's placements ConfigMaps.
pub const PLACEMENTS_LABEL: &str = "volplane.io/placements";

/// The name of `node`'s placements ConfigMap: `volplane-placements-<node>`,
/// shortened with a hash to a valid object name when too long.
pub fn config_map_name(node: &str) -> String {
    const MAX: usize = 253;
    let full = format!("volplane-placements-{node}");
    if full.len() <= MAX {
        return full;
    }
    let hash = crate::model::short_hash(node);
    let keep = volplane_runtime::text::prefix(&full, MAX - hash.len() - 1);
    format!("{}-{hash}", keep.trim_end_matches(['-', '.']))
}

/// One claim in flight on a node: its class and requested bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placed {
    /// The claim's class.
    pub class: String,
    /// Its requested storage.
    pub bytes: i64,
}

/// The data key of a claim: `<namespace>.<name>` (a namespace has no dot,
/// and a ConfigMap key allows no slash).
pub fn data_key(claim: &ObjectKey) -> String {
    format!("{}.{}", claim.namespace, claim.name)
}

/// A node's placements as its ConfigMap data.
pub fn to_data(placed: &BTreeMap<ObjectKey, Placed>) -> BTreeMap<String, String> {
    (placed.iter())
        .map(|(claim, p)| (data_key(claim), format!("{} {}", p.bytes, p.class)))
        .collect()
}

/// The placements a ConfigMap's data lists, for `node`; entries that do
/// not read as `<bytes> <class>` are skipped (and returned by name, to be
/// reported).
pub fn from_data(node: &str, data: &BTreeMap<String, String>) -> (Vec<(ObjectKey, Claimed)>, Vec<String>) {
    let mut placed = Vec::new();
    let mut bad = Vec::new();
    for (key, value) in data {
        let parsed = (key.split_once('.'))
            .zip(value.split_once(' '))
            .and_then(|((ns, name), (bytes, class))| {
                let bytes = bytes.parse::<i64>().ok().filter(|b| *b > 0)?;
                (!ns.is_empty() && !name.is_empty() && !class.is_empty()).then(|| {
                    let claimed = Claimed::Placed {
                        node: node.to_string(),
                        class: class.to_string(),
                        bytes,
                    };
                    (ObjectKey::namespaced(ns, name), claimed)
                })
            });
        match parsed {
            Some(entry) => placed.push(entry),
            None => bad.push(key.clone()),
        }
    }
    (placed, bad)
}

/// The merge patch that turns the object into `desired`, whichever of
/// `known` it holds (what volplane saw of it, and what it wrote since the
/// watch last delivered it); `None` when none would change.
pub fn data_patch(known: &[&BTreeMap<String, String>], desired: &BTreeMap<String, String>) -> Option<Value> {
    let mut patch = Map::new();
    for (key, value) in desired {
        if known.is_empty() || known.iter().any(|held| held.get(key) != Some(value)) {
            patch.insert(key.clone(), Value::String(value.clone()));
        }
    }
    for key in known.iter().flat_map(|held| held.keys()) {
        if !desired.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    if patch.is_empty() {
        return None;
    }
    Some(json!({ "data": patch }))
}

/// The merge patch that turns the object, whichever of `known` it holds,
/// into `desired`: [`data_patch`] of the data, and the release mark when
/// `desired` sets one the object may not hold yet.
pub fn map_patch(known: &[&KnownMap], desired: &KnownMap) -> Option<Value> {
    let data: Vec<&BTreeMap<String, String>> = known.iter().map(|k| &k.data).collect();
    let mut patch = data_patch(&data, &desired.data);
    let mark = (desired.released.as_ref())
        .filter(|mark| known.is_empty() || known.iter().any(|k| k.released.as_ref() != Some(*mark)));
    if let Some(mark) = mark {
        let patch = patch.get_or_insert_with(|| json!({}));
        patch["metadata"] = json!({ "annotations": { RELEASED_ANNOTATION: mark } });
    }
    patch
}

/// The claims in flight by node, as the central controller follows them,
/// with the nodes whose list changed since they were last taken.
#[derive(Debug, Default)]
pub struct ByNode {
    nodes: HashMap<String, BTreeMap<ObjectKey, Placed>>,
    node_of: HashMap<ObjectKey, String>,
    /// The release mark of each node that had a bound claim deleted,
    /// until its ConfigMap was written with it.
    released: HashMap<String, String>,
    changed: BTreeSet<String>,
}

impl ByNode {
    /// The claims in flight on `node`.
    pub fn on(&self, node: &str) -> Option<&BTreeMap<ObjectKey, Placed>> {
        self.nodes.get(node)
    }

    /// The nodes with claims in flight.
    pub fn nodes(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }

    /// How many claims are in flight.
    pub fn len(&self) -> usize {
        self.node_of.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.node_of.is_empty()
    }

    /// The release mark of `node`, if one was set since the start.
    pub fn released_on(&self, node: &str) -> Option<&String> {
        self.released.get(node)
    }

    /// `node`'s ConfigMap was written with `mark`: the ConfigMap keeps it
    /// from now on (a later mark stays until it is written too).
    pub fn release_written(&mut self, node: &str, mark: Option<&String>) {
        if mark.is_some() && self.released.get(node) == mark {
            self.released.remove(node);
        }
    }

    /// A claim was seen deleted (the watch's last state of it): when it
    /// was bound and placed on a node, that node's release mark becomes
    /// `mark`.
    pub fn deleted(&mut self, claim: &ClaimObject, mark: &str) {
        let node = (claim.metadata.annotations.as_ref())
            .and_then(|a| a.get(crate::claim::SELECTED_NODE))
            .filter(|node| !node.is_empty());
        if let (Some(node), Claimed::Bound) = (node, claimed(claim)) {
            self.released.insert(node.clone(), mark.to_string());
            self.changed.insert(node.clone());
        }
    }

    /// Nodes whose list changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.changed)
    }

    fn remove(&mut self, key: &ObjectKey) {
        let Some(node) = self.node_of.remove(key) else {
            return;
        };
        if let Some(placed) = self.nodes.get_mut(&node) {
            placed.remove(key);
            if placed.is_empty() {
                self.nodes.remove(&node);
            }
        }
        self.changed.insert(node);
    }
}

impl Index<ClaimObject> for ByNode {
    fn apply(&mut self, claim: ClaimObject) {
        let Some(key) = claim.key() else {
            return;
        };
        match claimed(&claim) {
            Claimed::Placed { node, class, bytes } => {
                let placed = Placed { class, bytes };
                if self.nodes.get(&node).and_then(|p| p.get(&key)) == Some(&placed) {
                    return;
                }
                self.remove(&key);
                self.nodes.entry(node.clone()).or_default().insert(key.clone(), placed);
                self.node_of.insert(key, node.clone());
                self.changed.insert(node);
            }
            Claimed::Bound | Claimed::Unplaced => self.remove(&key),
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.remove(key);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.node_of.keys().cloned().collect()
    }
}

/// What the central controller knows of one of its ConfigMaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownMap {
    /// The node it is for.
    pub node: String,
    /// Its data.
    pub data: BTreeMap<String, String>,
    /// Its release mark.
    pub released: Option<String>,
}

impl KnownMap {
    /// What is kept of `map`: `None` without the node annotation.
    pub fn of(map: &ConfigMap) -> Option<Self> {
        let annotations = map.metadata.annotations.as_ref()?;
        Some(Self {
            node: annotations.get(NODE_ANNOTATION)?.clone(),
            data: map.data.clone().unwrap_or_default(),
            released: annotations.get(RELEASED_ANNOTATION).cloned(),
        })
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
        let mark = (map.metadata.annotations.as_ref()).and_then(|a| a.get(RELEASED_ANNOTATION));
        self.released = Some(mark.cloned());
        let data = map.data.unwrap_or_default();
        let (placed, unreadable) = from_data(self.node, &data);
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
