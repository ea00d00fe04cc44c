//! Central mode's segments, kept up to date event by event: a Node or
//! CSINode event costs work for that one node, never a rebuild of every
//! segment (at 5,000 nodes the cluster sends such events all the time).
//! Pure: events in, segment changes out.
//!
//! Per node only what decides its segment is kept: the values of the
//! driver's topology keys among the node's labels, and the keys its CSINode
//! lists for the driver. The key set comes from the CSINodes, so the Node
//! watch starts once they are listed; a key that appears later (a driver
//! upgrade) makes the I/O list the Nodes again ([`Applied::nodes_stale`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::NodeSelectorTerm;
use k8s_openapi::api::storage::v1::CSINode;
use volplane_runtime::{Index, Keyed, ObjectKey};

use crate::model::{self, Labels, Segment};

/// The topology keys whose node labels are kept.
pub type KeySet = Arc<BTreeSet<String>>;

/// A Node as the loop sees it: its name and the labels of the known
/// topology keys.
#[derive(Clone, Debug)]
pub struct NodeLabels {
    /// The node's name.
    pub name: String,
    /// Its labels for the keys in `kept`.
    pub labels: Labels,
    /// The keys the labels were cut to.
    pub kept: KeySet,
}

impl Keyed for NodeLabels {
    fn key(&self) -> Option<ObjectKey> {
        (!self.name.is_empty()).then(|| ObjectKey::cluster(self.name.clone()))
    }
}

/// What one node contributes.
#[derive(Clone, Debug, Default)]
struct NodeTopology {
    /// The node's labels for the keys known when they were stored (`None`:
    /// no Node object seen).
    labels: Option<(Labels, KeySet)>,
    /// The driver's topology keys on the node's CSINode (`None`: its CSINode
    /// does not list the driver with keys).
    keys: Option<Arc<[String]>>,
    /// The segment the node counts for.
    segment: Option<Segment>,
}

/// Segments that came or went with one event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Segments that exist now and did not before.
    pub added: Vec<Segment>,
    /// Segments no node counts for any more.
    pub removed: Vec<Segment>,
    /// The CSINode named a topology key whose node labels were not kept:
    /// list the Nodes again, with [`TopologyIndex::keys`].
    pub nodes_stale: bool,
}

impl Applied {
    /// Adds what another event applied.
    pub fn merge(&mut self, other: Applied) {
        self.added.extend(other.added);
        self.removed.extend(other.removed);
        self.nodes_stale |= other.nodes_stale;
    }
}

/// The Nodes' side of a [`TopologyIndex`], as a watch feeds it, gathering
/// the segments its events made come or go.
#[derive(Debug)]
pub struct NodesOf<'a> {
    /// The index fed.
    pub index: &'a mut TopologyIndex,
    /// What the events applied.
    pub applied: Applied,
}

impl Index<NodeLabels> for NodesOf<'_> {
    fn apply(&mut self, node: NodeLabels) {
        let applied = self.index.apply_node(&node.name, node.labels, node.kept);
        self.applied.merge(applied);
    }

    fn delete(&mut self, key: &ObjectKey) {
        let applied = self.index.delete_node(&key.name);
        self.applied.merge(applied);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.index.node_names().map(ObjectKey::cluster).collect()
    }
}

/// The CSINodes' side of a [`TopologyIndex`], as a watch feeds it.
#[derive(Debug)]
pub struct CsiNodesOf<'a> {
    /// The index fed.
    pub index: &'a mut TopologyIndex,
    /// What the events applied.
    pub applied: Applied,
}

impl Index<CSINode> for CsiNodesOf<'_> {
    fn apply(&mut self, csinode: CSINode) {
        let applied = self.index.apply_csinode(&csinode);
        self.applied.merge(applied);
    }

    fn delete(&mut self, key: &ObjectKey) {
        let applied = self.index.delete_csinode(&key.name);
        self.applied.merge(applied);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.index.csinode_names().map(ObjectKey::cluster).collect()
    }
}

/// The segments of one driver over all nodes, with how many nodes count
/// for each.
#[derive(Clone, Debug, Default)]
pub struct TopologyIndex {
    driver: String,
    keys: KeySet,
    /// Distinct key lists of CSINodes, shared between nodes.
    key_lists: BTreeSet<Arc<[String]>>,
    nodes: HashMap<String, NodeTopology>,
    segments: HashMap<Segment, usize>,
    /// How many segments have each set of keys.
    key_sets: HashMap<Vec<String>, usize>,
}

impl TopologyIndex {
    /// An empty index for `driver`.
    pub fn new(driver: &str) -> Self {
        Self {
            driver: driver.to_string(),
            ..Self::default()
        }
    }

    /// The topology keys any CSINode lists for the driver: the node labels to keep.
    pub fn keys(&self) -> KeySet {
        self.keys.clone()
    }

    /// The current segments.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.keys()
    }

    /// How many segments there are.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Whether some node counts for `segment`.
    pub fn contains(&self, segment: &Segment) -> bool {
        self.segments.contains_key(segment)
    }

    /// The segments a volume with node affinity `terms` may be in. When
    /// every segment has the same keys and the terms name segments with
    /// exactly those keys, they are looked up, not searched for.
    pub fn admitted(&self, terms: &[NodeSelectorTerm]) -> Vec<Segment> {
        if let (Some(exact), [(keys, _)]) = (
            model::exact_segments(terms),
            &self.key_sets.iter().collect::<Vec<_>>()[..],
        ) && exact.iter().all(|s| s.labels().keys().eq(keys.iter()))
        {
            return exact.into_iter().filter(|s| self.contains(s)).collect();
        }
        self.segments().filter(|s| model::admits(terms, s)).cloned().collect()
    }

    /// Names of the nodes that have a Node object in the index.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.labels.is_some())
            .map(|(name, _)| name.as_str())
    }

    /// Names of the nodes whose CSINode is in the index.
    pub fn csinode_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.keys.is_some())
            .map(|(name, _)| name.as_str())
    }

    /// A Node was created or changed; `labels` were filtered to `kept`
    /// (the [`TopologyIndex::keys`] of the watch that delivered it).
    pub fn apply_node(&mut self, name: &str, labels: Labels, kept: KeySet) -> Applied {
        self.update(name, |node| node.labels = Some((labels, kept)))
    }

    /// A Node was deleted.
    pub fn delete_node(&mut self, name: &str) -> Applied {
        self.update(name, |node| node.labels = None)
    }

    /// A CSINode was created or changed.
    pub fn apply_csinode(&mut self, csinode: &CSINode) -> Applied {
        let Some(name) = csinode.metadata.name.as_deref() else {
            return Applied::default();
        };
        let keys: Option<Vec<String>> = csinode
            .spec
            .drivers
            .iter()
            .find(|d| d.name == self.driver)
            .and_then(|d| d.topology_keys.clone())
            .filter(|keys| !keys.is_empty());
        let keys = keys.map(|keys| self.intern(keys));
        let mut nodes_stale = false;
        if let Some(keys) = &keys
            && keys.iter().any(|key| !self.keys.contains(key))
        {
            let mut all = (*self.keys).clone();
            all.extend(keys.iter().cloned());
            self.keys = Arc::new(all);
            nodes_stale = true;
        }
        let mut applied = self.update(name, |node| node.keys = keys);
        applied.nodes_stale = nodes_stale;
        applied
    }

    /// A CSINode was deleted.
    pub fn delete_csinode(&mut self, name: &str) -> Applied {
        self.update(name, |node| node.keys = None)
    }

    fn intern(&mut self, keys: Vec<String>) -> Arc<[String]> {
        let keys: Arc<[String]> = keys.into();
        if let Some(known) = self.key_lists.get(&keys) {
            return known.clone();
        }
        self.key_lists.insert(keys.clone());
        keys
    }

    /// Changes one node and moves it between segments.
    fn update(&mut self, name: &str, change: impl FnOnce(&mut NodeTopology)) -> Applied {
        let mut node = self.nodes.remove(name).unwrap_or_default();
        change(&mut node);
        let before = node.segment.take();
        let after = match segment_of(&node) {
            // Labels stored before a key was known cannot tell: the node
            // stays where it was until its labels come again.
            Placement::Unknown => before.clone(),
            Placement::In(segment) => Some(segment),
            Placement::Nowhere => None,
        };
        let mut applied = Applied::default();
        node.segment = if after == before {
            before
        } else {
            if let Some(old) = before {
                self.leave(old, &mut applied);
            }
            after.map(|new| self.join(new, &mut applied))
        };
        if node.labels.is_some() || node.keys.is_some() {
            self.nodes.insert(name.to_string(), node);
        }
        applied
    }

    /// Counts one more node for `segment`; returns the index's copy, so
    /// that the nodes of one segment share one allocation.
    fn join(&mut self, segment: Segment, applied: &mut Applied) -> Segment {
        if let Some((shared, count)) = self.segments.get_key_value(&segment) {
            let shared = shared.clone();
            let count = *count + 1;
            self.segments.insert(shared.clone(), count);
            return shared;
        }
        self.segments.insert(segment.clone(), 1);
        *self
            .key_sets
            .entry(segment.labels().keys().cloned().collect())
            .or_insert(0) += 1;
        applied.added.push(segment.clone());
        segment
    }

    fn leave(&mut self, segment: Segment, applied: &mut Applied) {
        if let Some(count) = self.segments.get_mut(&segment) {
            *count -= 1;
            if *count == 0 {
                self.segments.remove(&segment);
                let keys: Vec<String> = segment.labels().keys().cloned().collect();
                if let Some(with_keys) = self.key_sets.get_mut(&keys) {
                    *with_keys -= 1;
                    if *with_keys == 0 {
                        self.key_sets.remove(&keys);
                    }
                }
                applied.removed.push(segment);
            }
        }
    }
}

enum Placement {
    In(Segment),
    Nowhere,
    Unknown,
}

/// Where a node belongs: its CSINode's keys with the values of its labels;
/// nowhere without Node, CSINode, or a value for every key.
fn segment_of(node: &NodeTopology) -> Placement {
    let (Some((labels, kept)), Some(keys)) = (&node.labels, &node.keys) else {
        return Placement::Nowhere;
    };
    if keys.iter().any(|key| !kept.contains(key)) {
        return Placement::Unknown;
    }
    match segment_labels(keys, labels) {
        Some(segment) => Placement::In(Segment::new(segment)),
        None => Placement::Nowhere,
    }
}

/// The segment of a node with topology `keys` and `labels`: each key with
/// its label's value, or `None` when a label is missing.
pub fn segment_labels(keys: &[String], labels: &Labels) -> Option<Labels> {
    keys.iter()
        .map(|key| labels.get(key).map(|value| (key.clone(), value.clone())))
        .collect()
}

/// `labels` cut to the `keys` worth keeping.
pub fn kept_labels(labels: Option<&Labels>, keys: &BTreeSet<String>) -> Labels {
    labels
        .into_iter()
        .flatten()
        .filter(|(key, _)| keys.contains(*key))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Where the segments come from.
#[derive(Clone, Debug)]
pub enum Segments {
    /// One fixed segment (per-node mode, or a driver without topology).
    Fixed(Segment),
    /// From Nodes and CSINodes (central mode, driver with topology).
    Central(TopologyIndex),
}

impl Segments {
    /// Every segment.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &Segment> + '_> {
        match self {
            Self::Fixed(segment) => Box::new(std::iter::once(segment)),
            Self::Central(index) => Box::new(index.segments()),
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        match self {
            Self::Fixed(_) => 1,
            Self::Central(index) => index.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `segment` is one of them.
    pub fn contains(&self, segment: &Segment) -> bool {
        match self {
            Self::Fixed(fixed) => fixed == segment,
            Self::Central(index) => index.contains(segment),
        }
    }

    /// The segments a volume with node affinity `terms` may be in.
    pub fn admitted(&self, terms: &[NodeSelectorTerm]) -> Vec<Segment> {
        match self {
            Self::Fixed(segment) => [segment.clone()]
                .into_iter()
                .filter(|s| model::admits(terms, s))
                .collect(),
            Self::Central(index) => index.admitted(terms),
        }
    }

    /// The index's copy of `segment` when there is one (shared allocation).
    pub fn shared(&self, segment: Segment) -> Segment {
        match self {
            Self::Fixed(fixed) if *fixed == segment => fixed.clone(),
            Self::Fixed(_) => segment,
            Self::Central(index) => index.shared(segment),
        }
    }
}

impl Segments {
    /// The segment node `node` counts for (a fixed segment: every node's).
    pub fn segment_of(&self, node: &str) -> Option<&Segment> {
        match self {
            Self::Fixed(segment) => Some(segment),
            Self::Central(index) => index.segment_of(node),
        }
    }
}

impl TopologyIndex {
    /// The segment node `node` counts for, if any.
    pub fn segment_of(&self, node: &str) -> Option<&Segment> {
        self.nodes.get(node).and_then(|n| n.segment.as_ref())
    }

    /// The index's copy of `segment` when a node counts for it.
    pub fn shared(&self, segment: Segment) -> Segment {
        self.segments
            .get_key_value(&segment)
            .map_or(segment, |(known, _)| known.clone())
    }
}

#[cfg(test)]
mod tests;
