//! The ephemeral controller's three watches as indexes: pods, claims and
//! (when claims are released) nodes, each fed by its own [`Feed`]. A
//! re-list deletes what vanished meanwhile from every index, and while any
//! watch lists no decision is taken; when the last one ends, every pod is
//! looked at again on the complete view.

use std::sync::Arc;

use kube::runtime::watcher::Event;
use tracing::{info, warn};
use volplane_runtime::{Fed, Feed, Index, ObjectKey};

use super::{Key, LoopState, Signal, node_facts};
use crate::model::{self, SlimClaim, SlimNode, SlimPod};

/// The feeds of the loop's watches.
pub(super) struct Watches {
    pods: Feed,
    claims: Feed,
    /// `None` when claims are never released (no node watch).
    nodes: Option<Feed>,
}

impl Watches {
    pub(super) fn new(watch_nodes: bool) -> Self {
        Self {
            pods: Feed::new("pods"),
            claims: Feed::new("claims"),
            nodes: watch_nodes.then(|| Feed::new("nodes")),
        }
    }

    fn are_current(&self) -> bool {
        self.pods.is_current() && self.claims.is_current() && self.nodes.as_ref().is_none_or(Feed::is_current)
    }

    /// Feeds one signal into `state`'s indexes and tells it whether it may
    /// decide.
    pub(super) fn signal(&mut self, state: &mut LoopState, signal: Signal) {
        match signal {
            Signal::Pod(event) => {
                self.pods.feed(*event, &mut PodIndex(state));
            }
            Signal::Claim(event) => {
                // The deleted claim of an active pod is created again: its
                // controller's name is in the deleted object only.
                let owner = match &*event {
                    Event::Delete(claim) => owner_pod(claim),
                    _ => None,
                };
                let fed = self.claims.feed(*event, &mut ClaimIndex(state));
                if let (Some(owner), Fed::Deleted(key)) = (owner, &fed) {
                    let pod = Key {
                        namespace: state.name(&key.namespace),
                        name: owner.into(),
                    };
                    state.look_at(&pod);
                }
            }
            Signal::Node(event) => {
                if let Some(feed) = &mut self.nodes {
                    feed.feed(*event, &mut NodeIndex(state));
                }
            }
            Signal::WatchFailed { source, error } => {
                warn!(source, %error, "watch failed; retrying with backoff");
                return;
            }
        }
        let current = self.are_current();
        let was_current = std::mem::replace(&mut state.current, current);
        if current && !was_current {
            state.listed_all();
        } else if !current && was_current {
            info!("a watch is re-listing: decisions wait until it ends");
        }
    }
}

/// The name of the pod that controls `claim`, if one does.
fn owner_pod(claim: &SlimClaim) -> Option<String> {
    claim
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == "Pod")
        .map(|r| r.name.clone())
}

impl LoopState {
    /// A pod blocked by a foreign claim of that name looks again.
    fn unblock(&mut self, claim: &Key) {
        if let Some(pod) = self.blocked.remove(claim) {
            self.look_at(&pod);
        }
    }

    fn key_of(&mut self, key: &ObjectKey) -> Key {
        Key {
            namespace: self.name(&key.namespace),
            name: key.name.as_str().into(),
        }
    }

    /// Every watch is current again: the first time ready; every time,
    /// every pod (and every finished pod waiting for its node) decides on
    /// the complete view.
    fn listed_all(&mut self) {
        if self.ready.mark_ready() {
            info!(
                pods = self.pods.len(),
                claims = self.claims.len(),
                "ephemeral controller synced"
            );
        }
        let waiting: Vec<Key> = self.waiting.keys().cloned().collect();
        self.recheck(waiting);
        self.look_at_every_pod();
    }
}

fn object_key(key: &Key) -> ObjectKey {
    ObjectKey::namespaced(&*key.namespace, &*key.name)
}

/// The pods with generic ephemeral volumes, and the claims pods mount by name.
struct PodIndex<'a>(&'a mut LoopState);

impl Index<SlimPod> for PodIndex<'_> {
    fn apply(&mut self, pod: SlimPod) {
        let state = &mut *self.0;
        if let Some((key, refs)) = state.claim_refs(&pod) {
            state.set_claim_refs(&key, refs);
        }
        match state.pod_state(&pod) {
            Some((key, pod_state)) => {
                state.pods.insert(key.clone(), pod_state);
                // It changed: whatever it waited for is decided again.
                state.stop_waiting(&key);
                state.look_at(&key);
            }
            None => {
                if let Some(key) = state.key(&pod.metadata) {
                    state.pods.remove(&key);
                    state.forget(&key);
                }
            }
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        let state = &mut *self.0;
        let key = state.key_of(key);
        state.set_claim_refs(&key, Box::default());
        state.pods.remove(&key);
        state.forget(&key);
    }

    fn is_empty(&self) -> bool {
        self.0.pods.is_empty() && self.0.pod_refs.is_empty()
    }

    fn keys(&self) -> Vec<ObjectKey> {
        // Pods kept for their claims and pods that mount claims by name.
        let mut keys: Vec<ObjectKey> = self.0.pods.keys().map(object_key).collect();
        keys.extend(
            self.0
                .pod_refs
                .keys()
                .filter(|key| !self.0.pods.contains_key(*key))
                .map(object_key),
        );
        keys
    }
}

/// Every claim with the UID of the pod that controls it.
struct ClaimIndex<'a>(&'a mut LoopState);

impl Index<SlimClaim> for ClaimIndex<'_> {
    fn apply(&mut self, claim: SlimClaim) {
        let state = &mut *self.0;
        let Some(key) = state.key(&claim.metadata) else {
            return;
        };
        let owner = model::controlling_pod(&claim.metadata).map(Box::from);
        state.claims.insert(key.clone(), owner);
        // Adopted by someone, or the pod's own: a blocked pod looks again.
        state.unblock(&key);
    }

    fn delete(&mut self, key: &ObjectKey) {
        let state = &mut *self.0;
        let key = state.key_of(key);
        state.claims.remove(&key);
        state.unblock(&key);
    }

    fn is_empty(&self) -> bool {
        self.0.claims.is_empty()
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.0.claims.keys().map(object_key).collect()
    }
}

/// The nodes' Ready condition and volumes in use.
struct NodeIndex<'a>(&'a mut LoopState);

impl Index<SlimNode> for NodeIndex<'_> {
    fn apply(&mut self, node: SlimNode) {
        let state = &mut *self.0;
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        let name = state.name(name);
        let facts = node_facts(&node, state.node_changes + 1);
        let known = state.nodes.get(&name);
        // Only what a release reads counts as a change (heartbeats, labels
        // and images do not).
        if known.is_none_or(|k| k.ready != facts.ready || k.volumes_in_use != facts.volumes_in_use) {
            state.node_changes += 1;
            state.nodes.insert(name.clone(), facts);
            state.node_changed(&name);
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        let state = &mut *self.0;
        let name: Arc<str> = state.name(&key.name);
        state.nodes.remove(&name);
        state.node_changed(&name);
    }

    fn is_empty(&self) -> bool {
        self.0.nodes.is_empty()
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.0.nodes.keys().map(|name| ObjectKey::cluster(&**name)).collect()
    }
}
