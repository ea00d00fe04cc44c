//! The node watcher: a node not Ready for the threshold gets one
//! NodeFailed event per PVC its pods use, its return one NodeRecovered, its
//! deletion nothing but the annotations cleared. Nodes and pods are
//! indexes fed by their watches; the watcher judges only while both are
//! current, so a re-list never makes a node look deleted or a volume look
//! unused.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use tokio::time::Instant;
use tracing::{info, warn};
use volplane_runtime::{Feed, Index, ObjectKey};

use crate::model::{self, NodeVerdict, Watched};
use crate::pods::Pods;
use crate::volumes::Volumes;

/// How long node and pod changes gather before the node watcher looks.
const CHECK_DELAY: Duration = Duration::from_millis(500);

/// What the node watcher says about a volume.
pub(crate) enum NodeNote {
    /// `node` failed: NodeFailed, and the annotation names it.
    Failed { node: String, note: String },
    /// Its node is Ready again: NodeRecovered, and the annotation goes.
    Recovered { note: String },
    /// Its failed node was deleted: the annotation goes, no event.
    Forgotten,
}

/// The nodes by name, trimmed to their Ready condition.
#[derive(Default)]
pub(crate) struct Nodes(BTreeMap<String, Node>);

impl Index<Node> for Nodes {
    fn apply(&mut self, node: Node) {
        if let Some(name) = node.metadata.name.clone() {
            self.0.insert(name, model::trim_node(node));
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.0.remove(&key.name);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.0.keys().map(ObjectKey::cluster).collect()
    }
}

/// The node watcher's state: its indexes and what it announced.
pub(crate) struct NodeWatcher {
    threshold: Duration,
    pub(crate) nodes: Nodes,
    pub(crate) node_feed: Feed,
    pub(crate) pods: Pods,
    pub(crate) pod_feed: Feed,
    /// Failed nodes with the volumes (and pods) announced for them.
    failed: BTreeMap<String, BTreeMap<Watched, BTreeSet<String>>>,
    /// Rebuild `failed` from the annotations before the next check (at
    /// start and on every new term: another replica may have announced
    /// failures meanwhile).
    reseed: bool,
    next_check: Option<Instant>,
}

impl NodeWatcher {
    pub(crate) fn new(threshold: Duration) -> Self {
        Self {
            threshold,
            nodes: Nodes::default(),
            node_feed: Feed::new("nodes"),
            pods: Pods::default(),
            pod_feed: Feed::new("pods"),
            failed: BTreeMap::new(),
            reseed: true,
            next_check: None,
        }
    }

    /// Whether both indexes are complete views.
    pub(crate) fn is_current(&self) -> bool {
        self.node_feed.is_current() && self.pod_feed.is_current()
    }

    /// Nodes or pods changed: look again soon. One look covers every change
    /// of the last [`CHECK_DELAY`], so a busy cluster costs at most one scan
    /// per that delay.
    pub(crate) fn changed(&mut self) {
        let soon = Instant::now() + CHECK_DELAY;
        self.next_check = Some(self.next_check.map_or(soon, |at| at.min(soon)));
    }

    /// A new term: judge from the annotations again, now.
    pub(crate) fn new_term(&mut self) {
        self.reseed = true;
        self.next_check = Some(Instant::now());
    }

    /// When the next check is due (only while the indexes are current).
    pub(crate) fn due(&self) -> Option<Instant> {
        self.next_check.filter(|_| self.is_current())
    }

    /// How many nodes are announced failed.
    pub(crate) fn failed_nodes(&self) -> usize {
        self.failed.len()
    }

    /// Checks every node if a check is due; returns the notes to publish.
    pub(crate) fn check_if_due(&mut self, volumes: &Volumes, now: Instant) -> Vec<(Watched, NodeNote)> {
        if self.due().is_none_or(|at| at > now) {
            return Vec::new();
        }
        self.next_check = None;
        self.check(volumes, SystemTime::now())
    }

    fn check(&mut self, volumes: &Volumes, now: SystemTime) -> Vec<(Watched, NodeNote)> {
        if std::mem::take(&mut self.reseed) {
            self.reseed_from_annotations(volumes);
        }
        let mut wake: Option<SystemTime> = None;
        let mut failed = Vec::new();
        let mut healthy = Vec::new();
        for (name, node) in &self.nodes.0 {
            match model::node_verdict(node, self.threshold, now) {
                NodeVerdict::Failed { since } => failed.push((name.clone(), since)),
                NodeVerdict::Suspect { fails_at } => wake = Some(wake.map_or(fails_at, |w| w.min(fails_at))),
                NodeVerdict::Healthy => healthy.push(name.clone()),
            }
        }
        if let Some(at) = wake {
            let wait = at.duration_since(now).unwrap_or_default();
            self.next_check = Some(Instant::now() + wait + Duration::from_millis(10));
        }
        let mut notes = self.forget_deleted_nodes();
        for (node, since) in failed {
            notes.extend(self.node_failed(node, since, volumes));
        }
        for node in healthy {
            notes.extend(self.node_recovered(&node));
        }
        notes
    }

    /// After a restart or a new term: the failed nodes the PV annotations name.
    fn reseed_from_annotations(&mut self, volumes: &Volumes) {
        self.failed.clear();
        for (volume, node) in volumes.node_failures() {
            self.failed
                .entry(node.clone())
                .or_default()
                .insert(volume.clone(), BTreeSet::new());
        }
    }

    /// A failed node that was deleted: its annotations go, no event.
    fn forget_deleted_nodes(&mut self) -> Vec<(Watched, NodeNote)> {
        let present: HashSet<&String> = self.nodes.0.keys().collect();
        let gone: Vec<String> = self.failed.keys().filter(|n| !present.contains(n)).cloned().collect();
        let mut notes = Vec::new();
        for node in gone {
            info!(%node, "failed node deleted; no recovery to report");
            for volume in self.failed.remove(&node).unwrap_or_default().into_keys() {
                notes.push((volume, NodeNote::Forgotten));
            }
        }
        notes
    }

    /// `node` has failed since `since`: NodeFailed for each volume its pods
    /// use that was not announced yet.
    fn node_failed(&mut self, node: String, since: SystemTime, volumes: &Volumes) -> Vec<(Watched, NodeNote)> {
        let by_claim: BTreeMap<(String, String), Watched> = volumes
            .all()
            .map(|w| ((w.namespace.clone(), w.claim.clone()), w.clone()))
            .collect();
        let on_node = model::volumes_on_node(&node, self.pods.all(), &by_claim);
        let known = self.failed.remove(&node);
        if known.is_none() {
            warn!(%node, volumes = on_node.len(), "node failed");
        }
        // Volumes announced before keep their pods; volumes that turned up
        // since (a pod index catching up) are announced now.
        let mut announced = known.unwrap_or_default();
        let mut notes = Vec::new();
        for (volume, pods) in on_node {
            if announced.contains_key(&volume) {
                continue;
            }
            let note = model::node_failed_note(&node, since, &pods);
            let failed = NodeNote::Failed {
                node: node.clone(),
                note,
            };
            notes.push((volume.clone(), failed));
            announced.insert(volume, pods);
        }
        self.failed.insert(node, announced);
        notes
    }

    /// `node` is Ready again: NodeRecovered for each volume announced failed.
    fn node_recovered(&mut self, node: &str) -> Vec<(Watched, NodeNote)> {
        let Some(volumes) = self.failed.remove(node) else {
            return Vec::new();
        };
        info!(%node, volumes = volumes.len(), "node recovered");
        let note = format!("node {node} is Ready again");
        volumes
            .into_keys()
            .map(|volume| (volume, NodeNote::Recovered { note: note.clone() }))
            .collect()
    }
}
