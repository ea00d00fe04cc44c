//! Finished pods whose claims wait: for their node (Ready, the volume no
//! longer in `status.volumesInUse`), for the release delay, or for other
//! pods that mount a claim by name.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use super::{FinishedPod, Key, LoopState, PodState, Timing, epoch_seconds, gauge_value};
use crate::model::{self, Need, SlimPod};
use crate::release::{self, ReleaseMode, Verdict};

impl LoopState {
    /// Pod `key` no longer waits for its node or a claim's other users.
    pub(super) fn stop_waiting(&mut self, key: &Key) {
        self.waiting.remove(key);
        self.waiting_on_claim.retain(|_, pod| pod != key);
        self.count_waiting();
    }

    pub(super) fn count_waiting(&self) {
        let pods: HashSet<&Key> = self.waiting.keys().chain(self.waiting_on_claim.values()).collect();
        self.metrics.releases_waiting.set(gauge_value(pods.len()));
    }

    /// Finished pod `key` waits until its node changes.
    pub(super) fn wait_for_node(&mut self, key: Key, node: Arc<str>) {
        self.waiting.insert(key, node);
        self.count_waiting();
    }

    /// The claims `pod` mounts by name, when claims are released at all.
    pub(super) fn claim_refs(&mut self, pod: &SlimPod) -> Option<(Key, Box<[Box<str>]>)> {
        if self.config.release == ReleaseMode::Never {
            return None;
        }
        let refs = model::claims_in_use(pod).into_iter().map(Box::from).collect();
        Some((self.key(&pod.metadata)?, refs))
    }

    pub(super) fn claim_key(pod: &Key, claim: &str) -> Key {
        Key {
            namespace: pod.namespace.clone(),
            name: claim.into(),
        }
    }

    /// Pod `key` now mounts `refs` by name; a claim it no longer uses and
    /// nobody else does lets the finished pod waiting for it go on.
    pub(super) fn set_claim_refs(&mut self, key: &Key, refs: Box<[Box<str>]>) {
        let old = if refs.is_empty() {
            self.pod_refs.remove(key)
        } else {
            self.pod_refs.insert(key.clone(), refs.clone())
        };
        for claim in old.iter().flatten() {
            let claim = Self::claim_key(key, claim);
            if let Some(users) = self.claim_users.get_mut(&claim) {
                users.remove(key);
                if users.is_empty() {
                    self.claim_users.remove(&claim);
                    if let Some(pod) = self.waiting_on_claim.remove(&claim) {
                        self.count_waiting();
                        self.look_at(&pod);
                    }
                }
            }
        }
        for claim in refs.iter() {
            self.claim_users
                .entry(Self::claim_key(key, claim))
                .or_default()
                .insert(key.clone());
        }
    }

    /// The pods waiting for node `name` decide again.
    pub(super) fn node_changed(&mut self, name: &Arc<str>) {
        let waiting: Vec<Key> = self
            .waiting
            .iter()
            .filter(|(_, node)| *node == name)
            .map(|(pod, _)| pod.clone())
            .collect();
        self.recheck(waiting);
    }

    pub(super) fn recheck(&mut self, pods: Vec<Key>) {
        for pod in pods {
            self.waiting.remove(&pod);
            self.look_at(&pod);
        }
        self.count_waiting();
    }

    /// Whether finished pod `key` may give its claims back now; if not, it
    /// waits for its node or is queued for when it may.
    pub(super) fn release_timing(&mut self, key: &Key, finished: &FinishedPod) -> Timing {
        let node = match &finished.node {
            None => None,
            Some(name) => Some((name.clone(), self.nodes.get(name).cloned())),
        };
        let view = match &node {
            None => release::NodeView::NotBound,
            Some((_, None)) => release::NodeView::Gone,
            Some((_, Some(facts))) => release::NodeView::Known(facts),
        };
        let now = epoch_seconds();
        let delay = i64::try_from(self.config.release_delay.as_secs()).unwrap_or(i64::MAX);
        match release::timing(&finished.facts, view, now, finished.first_seen, delay) {
            Verdict::Release => Timing::Now {
                node: node.and_then(|(_, facts)| facts),
            },
            Verdict::NotBefore(due) => {
                let wait = Duration::from_secs(u64::try_from(due - now).unwrap_or(0));
                self.queue.schedule(key.clone(), Instant::now() + wait);
                Timing::Later
            }
            Verdict::WaitForNode(why) => {
                if let Some((name, _)) = node {
                    if !self.waiting.contains_key(key) {
                        info!(pod = %key, node = %name, why, "claims of a finished pod wait for its node");
                    }
                    self.wait_for_node(key.clone(), name);
                }
                Timing::Later
            }
        }
    }

    /// Of the claims finished pod `key` would release, those that a pod
    /// which has not finished mounts by name wait for it; the others go.
    pub(super) fn not_in_use(&mut self, key: &Key, state: &PodState, needs: Vec<(usize, Need)>) -> Vec<(usize, Need)> {
        let mut free = Vec::with_capacity(needs.len());
        for (i, need) in needs {
            let claim = Self::claim_key(key, &model::claim_name(&key.name, &state.volumes[i].0));
            if self.claim_users.contains_key(&claim) {
                if !self.waiting_on_claim.contains_key(&claim) {
                    info!(pod = %key, %claim, "the claim of a finished pod waits: another pod mounts it by name");
                }
                self.waiting_on_claim.insert(claim, key.clone());
                self.count_waiting();
            } else {
                free.push((i, need));
            }
        }
        free
    }

    /// Finished pod `key` found its node listing a claim's volume in
    /// `status.volumesInUse` as of the node's `generation`: it waits for the
    /// node's next change (now, if it changed meanwhile).
    pub(super) fn wait_for_volumes_in_use(&mut self, key: &Key, generation: u64) {
        let Some(node) = self.pods.get(key).and_then(|s| s.finished.as_ref()?.node.clone()) else {
            return;
        };
        if self.nodes.get(&node).is_none_or(|facts| facts.generation != generation) {
            self.look_at(key);
            return;
        }
        if !self.waiting.contains_key(key) {
            info!(pod = %key, %node, "claims of a finished pod wait: its node lists the volume in status.volumesInUse");
        }
        self.wait_for_node(key.clone(), node);
    }
}
