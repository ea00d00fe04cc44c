//! The ephemeral controller's I/O: a pod watch and a claim watch, both
//! deserialized into slim types, feed one loop that keeps a few dozen bytes
//! per pod with generic ephemeral volumes (their claim templates shared
//! between equal pods) and the controlling pod's UID per claim — at 50,000
//! pods tens of megabytes, where caching the objects took hundreds. Pods
//! whose claims are missing are queued; up to `workers` of them are handled
//! at once, each creating its missing claims.
//!
//! Nothing is decided before both watches have listed, so a restart never
//! creates a claim twice. A claim volplane created is known at once (the
//! watch confirms it later); a claim deleted while its pod is active is
//! created again; a pod blocked by a foreign claim of its name is retried
//! the moment that claim is deleted or adopted.
//!
//! Finished pods (see [`crate::release`]) are kept only while they still
//! own a claim that `--ephemeral-release` gives back; then a node watch
//! (slim: Ready and `volumesInUse`, hashed) tells when a claim that waits
//! for its node may go. A release deletes the claim with a UID precondition
//! and lifts its `kubernetes.io/pvc-protection` finalizer under a
//! resourceVersion precondition.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, join_all};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimTemplate,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use volplane_runtime::events::{self, Announcement};
use volplane_runtime::{Backoff, Leadership, Readiness, WorkQueue, control_loop};

use crate::error::{ClaimFailure, Error};
use crate::metrics::EphemeralMetrics;
use crate::model::{
    self, FailureReason, Need, Ownership, PodIdentity, SlimClaim, SlimNode, SlimPod, Volumes, VolumesInterner,
};
use crate::release::{self, Finished, NodeFacts, ReleaseMode, Verdict};

/// Settings of the ephemeral controller.
#[derive(Clone, Debug)]
pub struct EphemeralConfig {
    /// Pods handled at once.
    pub workers: u16,
    /// `reportingInstance` of events.
    pub instance: String,
    /// Retry delays of a pod whose claims failed.
    pub backoff: Backoff,
    /// Which finished pods give their claims back.
    pub release: ReleaseMode,
    /// How long after its last container finished an admitted pod's claims
    /// wait, for the kubelet to unmount them.
    pub release_delay: Duration,
    /// How long after volplane first sees a new pod it creates the pod's
    /// claims: while kube-controller-manager's own controller still runs
    /// (a migration), it creates them first and neither side warns.
    pub create_delay: Duration,
}

/// The ephemeral controller. Every replica watches; only while
/// `leadership` allows does it create or release claims or publish events.
pub struct EphemeralController {
    client: kube::Client,
    config: EphemeralConfig,
    metrics: Arc<EphemeralMetrics>,
    leadership: Leadership,
    ready: Readiness,
}

impl std::fmt::Debug for EphemeralController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralController")
            .field("config", &self.config)
            .finish()
    }
}

/// A namespaced name; namespaces are shared between keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    namespace: Arc<str>,
    name: Box<str>,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What is kept of a pod with generic ephemeral volumes: an active one,
/// or a finished one whose claims are to be released.
#[derive(Clone, Debug)]
struct PodState {
    uid: Box<str>,
    /// Creation time in seconds since the epoch (the latency metric).
    created: Option<i64>,
    volumes: Volumes,
    finished: Option<FinishedPod>,
}

/// A finished pod whose claims `--ephemeral-release` gives back.
#[derive(Clone, Debug)]
struct FinishedPod {
    facts: Finished,
    node: Option<Arc<str>>,
    /// When volplane first saw it finished (seconds since the epoch).
    first_seen: i64,
}

enum Signal {
    Pod(Box<Event<SlimPod>>),
    Claim(Box<Event<SlimClaim>>),
    Node(Box<Event<SlimNode>>),
    WatchFailed { source: &'static str, error: String },
}

/// When a finished pod's claims may go.
enum Timing {
    /// Now; its node as last seen, if it has one that exists.
    Now { node: Option<NodeFacts> },
    /// Not yet: queued for later, or waiting for a change.
    Later,
}

/// What became of one volume of a handled pod.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Done {
    /// Its claim exists and is the pod's (created now or found).
    Created(String),
    /// Its claim was released.
    Released(String),
    /// Nothing to release: the claim is gone, not the pod's, or already
    /// being deleted and held by someone else's finalizer.
    Untouched(String),
    /// Its node lists the volume in `status.volumesInUse`, as of the node's
    /// `generation`.
    Waiting { generation: u64 },
}

/// A handled pod: the outcome of each volume that needed work.
struct Handled {
    pod: Key,
    uid: Box<str>,
    outcomes: Vec<Result<Done, ClaimFailure>>,
}

impl EphemeralController {
    /// A controller; nothing runs until [`EphemeralController::run`].
    pub fn new(
        client: kube::Client,
        config: EphemeralConfig,
        metrics: Arc<EphemeralMetrics>,
        leadership: Leadership,
    ) -> Self {
        Self {
            client,
            config,
            metrics,
            leadership,
            ready: Readiness::new(),
        }
    }

    /// Turns true once the pod and claim watches (and the node watch, when
    /// claims are released) have listed.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes; pods in flight finish first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let mut signals = futures::stream::select_all([
            watch_all::<SlimPod>(&self.client, "pods", Signal::Pod),
            watch_all::<SlimClaim>(&self.client, "claims", Signal::Claim),
        ]);
        if self.config.release != ReleaseMode::Never {
            signals.push(watch_all::<SlimNode>(&self.client, "nodes", Signal::Node));
        }
        info!(
            workers = self.config.workers,
            release = ?self.config.release,
            release_delay = ?self.config.release_delay,
            "ephemeral controller starting"
        );
        let mut state = LoopState::new(self);
        control_loop::run(&mut state, &mut signals, shutdown).await;
        info!("ephemeral controller stopped");
        Ok(())
    }
}

struct LoopState {
    client: kube::Client,
    config: EphemeralConfig,
    metrics: Arc<EphemeralMetrics>,
    recorder: Recorder,
    leadership: Leadership,
    leading: bool,
    ready: Readiness,
    /// Namespace and node names, shared between keys.
    names: HashSet<Arc<str>>,
    interner: VolumesInterner,
    /// Pods with generic ephemeral volumes: active ones, and finished ones
    /// while they own a claim that is to be released.
    pods: HashMap<Key, PodState>,
    pods_listing: Option<HashMap<Key, PodState>>,
    /// Every claim, with the UID of the pod that controls it (if one does).
    claims: HashMap<Key, Option<Box<str>>>,
    claims_listing: Option<HashMap<Key, Option<Box<str>>>>,
    /// Nodes (only when claims are released): Ready and volumes in use.
    nodes: HashMap<Arc<str>, NodeFacts>,
    nodes_listing: Option<HashMap<Arc<str>, NodeFacts>>,
    node_changes: u64,
    /// Finished pods waiting for their node to change, and the node.
    waiting: HashMap<Key, Arc<str>>,
    /// Claims that pods which have not finished mount by name, with those
    /// pods (only when claims are released): in use, never released.
    claim_users: HashMap<Key, HashSet<Key>>,
    /// Per pod, the claims it mounts by name (to keep `claim_users`).
    pod_refs: HashMap<Key, Box<[Box<str>]>>,
    refs_listing: Option<HashMap<Key, Box<[Box<str>]>>>,
    /// Claims of finished pods waiting for their other users, and the pod.
    waiting_on_claim: HashMap<Key, Key>,
    pods_listed: bool,
    claims_listed: bool,
    nodes_listed: bool,
    synced: bool,
    queue: WorkQueue<Key>,
    /// Claims held by someone else, and the pod waiting for each name.
    blocked: HashMap<Key, Key>,
    tasks: FuturesUnordered<BoxFuture<'static, Handled>>,
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Handled;

    fn before_wait(&mut self) -> Option<Instant> {
        self.follow_leadership();
        self.dispatch();
        self.queue.next_due().filter(|_| self.leading && self.has_free_worker())
    }

    fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    fn leading(&self) -> bool {
        self.leading
    }

    fn tasks(&mut self) -> &mut FuturesUnordered<BoxFuture<'static, Handled>> {
        &mut self.tasks
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Pod(event) => self.on_pod(*event),
            Signal::Claim(event) => self.on_claim(*event),
            Signal::Node(event) => self.on_node(*event),
            Signal::WatchFailed { source, error } => warn!(source, %error, "watch failed; retrying with backoff"),
        }
    }

    fn finished(&mut self, handled: Handled) {
        self.handled(handled);
    }

    fn stopping(&mut self) {
        info!(
            in_flight = self.tasks.len(),
            "ephemeral controller stopping; finishing pods in flight"
        );
    }

    fn finished_on_shutdown(&mut self, handled: Handled) {
        for failure in handled.outcomes.iter().filter_map(|o| o.as_ref().err()) {
            warn!(pod = %handled.pod, claim = %failure.claim, message = %failure.message, "claim not ensured before shutdown");
        }
    }
}

impl LoopState {
    fn new(controller: EphemeralController) -> Self {
        let reporter = Reporter {
            controller: "volplane-ephemeral".into(),
            instance: Some(controller.config.instance.clone()),
        };
        let controller_release_never = controller.config.release == ReleaseMode::Never;
        Self {
            recorder: Recorder::new(controller.client.clone(), reporter),
            client: controller.client,
            config: controller.config,
            metrics: controller.metrics,
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            names: HashSet::new(),
            interner: VolumesInterner::default(),
            pods: HashMap::new(),
            pods_listing: None,
            claims: HashMap::new(),
            claims_listing: None,
            nodes: HashMap::new(),
            nodes_listing: None,
            node_changes: 0,
            waiting: HashMap::new(),
            claim_users: HashMap::new(),
            pod_refs: HashMap::new(),
            refs_listing: None,
            waiting_on_claim: HashMap::new(),
            pods_listed: false,
            claims_listed: false,
            nodes_listed: controller_release_never,
            synced: false,
            queue: WorkQueue::default(),
            blocked: HashMap::new(),
            tasks: FuturesUnordered::new(),
        }
    }

    /// The shared copy of a namespace or node name.
    fn name(&mut self, name: &str) -> Arc<str> {
        match self.names.get(name) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = name.into();
                self.names.insert(shared.clone());
                shared
            }
        }
    }

    fn key(&mut self, meta: &kube::api::ObjectMeta) -> Option<Key> {
        let namespace = self.name(meta.namespace.as_deref()?);
        Some(Key {
            namespace,
            name: meta.name.as_deref()?.into(),
        })
    }

    /// What is kept of `pod`: nothing unless it has generic ephemeral
    /// volumes and is active, or finished in a way whose claims are released.
    fn pod_state(&mut self, pod: &SlimPod) -> Option<(Key, PodState)> {
        let finished = if model::is_active(pod) {
            None
        } else {
            Some(release::finished(pod, self.config.release)?)
        };
        let volumes = model::ephemeral_volumes(pod);
        if volumes.is_empty() {
            return None;
        }
        let key = self.key(&pod.metadata)?;
        let uid: Box<str> = pod.metadata.uid.as_deref()?.into();
        let finished = match finished {
            None => None,
            Some(facts) => {
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .map(|n| self.name(n));
                // Seen finished before: the wait counts from then.
                let first_seen = self
                    .pods
                    .get(&key)
                    .filter(|known| known.uid == uid)
                    .and_then(|known| known.finished.as_ref())
                    .map_or_else(epoch_seconds, |known| known.first_seen);
                Some(FinishedPod {
                    facts,
                    node,
                    first_seen,
                })
            }
        };
        let state = PodState {
            uid,
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            volumes: self.interner.intern(volumes),
            finished,
        };
        Some((key, state))
    }

    /// Notices a change of leadership; a new leader looks at every pod again.
    fn follow_leadership(&mut self) {
        let leading = self.leadership.may_write();
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        if leading {
            info!("leading: creating and releasing claims");
            self.look_at_every_pod();
        } else {
            info!(
                in_flight = self.tasks.len(),
                "not leading: no claims created or released"
            );
        }
    }

    fn on_pod(&mut self, event: Event<SlimPod>) {
        match event {
            Event::Init => {
                self.pods_listing = Some(HashMap::new());
                self.refs_listing = Some(HashMap::new());
            }
            Event::InitApply(pod) => {
                if let Some((key, refs)) = self.claim_refs(&pod)
                    && !refs.is_empty()
                    && let Some(listing) = &mut self.refs_listing
                {
                    listing.insert(key, refs);
                }
                if let Some((key, state)) = self.pod_state(&pod)
                    && let Some(listing) = &mut self.pods_listing
                {
                    listing.insert(key, state);
                }
            }
            Event::InitDone => {
                let listed = self.pods_listing.take().unwrap_or_default();
                let gone: Vec<Key> = self.pods.keys().filter(|k| !listed.contains_key(*k)).cloned().collect();
                self.pods = listed;
                for key in gone {
                    self.forget(&key);
                }
                self.rebuild_claim_users();
                self.pods_listed = true;
                if self.synced {
                    // Pods may have changed while the watch was down.
                    self.look_at_every_pod();
                }
                self.listed();
            }
            Event::Apply(pod) => {
                if let Some((key, refs)) = self.claim_refs(&pod) {
                    self.set_claim_refs(&key, refs);
                }
                match self.pod_state(&pod) {
                    Some((key, state)) => {
                        self.pods.insert(key.clone(), state);
                        // It changed: whatever it waited for is decided again.
                        self.stop_waiting(&key);
                        if self.synced {
                            self.look_at(&key);
                        }
                    }
                    None => {
                        if let Some(key) = self.key(&pod.metadata) {
                            self.pods.remove(&key);
                            self.forget(&key);
                        }
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some(key) = self.key(&pod.metadata) {
                    self.set_claim_refs(&key, Box::default());
                    self.pods.remove(&key);
                    self.forget(&key);
                }
            }
        }
    }

    fn on_claim(&mut self, event: Event<SlimClaim>) {
        match event {
            Event::Init => self.claims_listing = Some(HashMap::new()),
            Event::InitApply(claim) => {
                let owner = model::controlling_pod(&claim.metadata).map(Box::from);
                if let Some(key) = self.key(&claim.metadata)
                    && let Some(listing) = &mut self.claims_listing
                {
                    listing.insert(key, owner);
                }
            }
            Event::InitDone => {
                self.claims = self.claims_listing.take().unwrap_or_default();
                self.claims_listed = true;
                if self.synced {
                    // Claims may have gone while the watch was down.
                    self.look_at_every_pod();
                }
                self.listed();
            }
            Event::Apply(claim) => {
                let Some(key) = self.key(&claim.metadata) else {
                    return;
                };
                let owner = model::controlling_pod(&claim.metadata).map(Box::from);
                self.claims.insert(key.clone(), owner);
                // Adopted by someone, or the pod's own: a blocked pod looks again.
                self.unblock(&key);
            }
            Event::Delete(claim) => {
                let Some(key) = self.key(&claim.metadata) else {
                    return;
                };
                self.claims.remove(&key);
                self.unblock(&key);
                // The claim of an active pod: created again.
                let owner = claim
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .find(|r| r.controller == Some(true) && r.kind == "Pod")
                    .map(|r| Key {
                        namespace: key.namespace.clone(),
                        name: r.name.as_str().into(),
                    });
                if let Some(pod) = owner
                    && self.synced
                    && self.pods.contains_key(&pod)
                {
                    self.look_at(&pod);
                }
            }
        }
    }

    fn unblock(&mut self, claim: &Key) {
        if let Some(pod) = self.blocked.remove(claim)
            && self.synced
        {
            self.look_at(&pod);
        }
    }

    /// Both watches have listed: decisions can be made.
    fn listed(&mut self) {
        if self.synced || !(self.pods_listed && self.claims_listed && self.nodes_listed) {
            return;
        }
        self.synced = true;
        info!(
            pods = self.pods.len(),
            claims = self.claims.len(),
            "ephemeral controller synced"
        );
        self.ready.mark_ready();
        self.look_at_every_pod();
    }

    fn look_at_every_pod(&mut self) {
        if !self.synced {
            return;
        }
        let keys: Vec<Key> = self.pods.keys().cloned().collect();
        for key in keys {
            self.look_at(&key);
        }
    }

    /// What each ephemeral volume of pod `key` needs.
    fn needs(&self, key: &Key, state: &PodState) -> Vec<(usize, Need)> {
        state
            .volumes
            .iter()
            .enumerate()
            .map(|(i, (volume, _))| {
                let claim = Key {
                    namespace: key.namespace.clone(),
                    name: model::claim_name(&key.name, volume).into(),
                };
                let cached = self.claims.get(&claim).map(|owner| owner.as_deref());
                let need = if state.finished.is_some() {
                    model::release_need(cached, &state.uid)
                } else {
                    model::need(cached, &state.uid)
                };
                (i, need)
            })
            .filter(|(_, need)| *need != Need::Nothing)
            .collect()
    }

    /// Queues pod `key` if one of its claims is missing or not its own.
    fn look_at(&mut self, key: &Key) {
        let Some(state) = self.pods.get(key) else {
            return;
        };
        if self.needs(key, state).is_empty() {
            if state.finished.is_some() {
                // Nothing (left) to release: not kept.
                self.pods.remove(key);
                self.forget(key);
                return;
            }
            self.queue.succeeded(key);
            return;
        }
        if !self.leading {
            // Handled when this instance leads (every pod is looked at again then).
            self.metrics.reconciled("not_leading");
            return;
        }
        // Now, also when a retry was due later: something changed. A pod
        // just created waits `create_delay` first (also at a start-up
        // sync): kube-controller-manager's controller, if it still runs,
        // creates its claims meanwhile.
        let delay_seconds = i64::try_from(self.config.create_delay.as_secs()).unwrap_or(i64::MAX);
        let young = !self.config.create_delay.is_zero()
            && state.finished.is_none()
            && state
                .created
                .is_some_and(|created| epoch_seconds() - created <= delay_seconds.saturating_add(1));
        let at = if young {
            Instant::now() + self.config.create_delay
        } else {
            Instant::now()
        };
        self.queue.schedule(key.clone(), at);
    }

    /// Pod `key` is gone or needs no claims any more.
    fn forget(&mut self, key: &Key) {
        self.queue.forget(key);
        self.blocked.retain(|_, waiting| waiting != key);
        self.stop_waiting(key);
    }

    /// Pod `key` no longer waits for its node or a claim's other users.
    fn stop_waiting(&mut self, key: &Key) {
        self.waiting.remove(key);
        self.waiting_on_claim.retain(|_, pod| pod != key);
        self.count_waiting();
    }

    fn count_waiting(&self) {
        let pods: HashSet<&Key> = self.waiting.keys().chain(self.waiting_on_claim.values()).collect();
        self.metrics.releases_waiting.set(gauge_value(pods.len()));
    }

    /// Finished pod `key` waits until its node changes.
    fn wait_for_node(&mut self, key: Key, node: Arc<str>) {
        self.waiting.insert(key, node);
        self.count_waiting();
    }

    /// The claims `pod` mounts by name, when claims are released at all.
    fn claim_refs(&mut self, pod: &SlimPod) -> Option<(Key, Box<[Box<str>]>)> {
        if self.config.release == ReleaseMode::Never {
            return None;
        }
        let refs = model::claims_in_use(pod).into_iter().map(Box::from).collect();
        Some((self.key(&pod.metadata)?, refs))
    }

    fn claim_key(pod: &Key, claim: &str) -> Key {
        Key {
            namespace: pod.namespace.clone(),
            name: claim.into(),
        }
    }

    /// Pod `key` now mounts `refs` by name; a claim it no longer uses and
    /// nobody else does lets the finished pod waiting for it go on.
    fn set_claim_refs(&mut self, key: &Key, refs: Box<[Box<str>]>) {
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

    /// After a pod list: the claim users from what was listed.
    fn rebuild_claim_users(&mut self) {
        let Some(listed) = self.refs_listing.take() else {
            return;
        };
        self.claim_users.clear();
        for (pod, refs) in &listed {
            for claim in refs.iter() {
                self.claim_users
                    .entry(Self::claim_key(pod, claim))
                    .or_default()
                    .insert(pod.clone());
            }
        }
        self.pod_refs = listed;
        let free: Vec<Key> = self
            .waiting_on_claim
            .iter()
            .filter(|(claim, _)| !self.claim_users.contains_key(*claim))
            .map(|(_, pod)| pod.clone())
            .collect();
        for pod in free {
            self.stop_waiting(&pod);
            self.look_at(&pod);
        }
    }

    fn on_node(&mut self, event: Event<SlimNode>) {
        match event {
            Event::Init => self.nodes_listing = Some(HashMap::new()),
            Event::InitApply(node) => {
                let Some(name) = node.metadata.name.as_deref() else {
                    return;
                };
                let name = self.name(name);
                self.node_changes += 1;
                let facts = node_facts(&node, self.node_changes);
                if let Some(listing) = &mut self.nodes_listing {
                    listing.insert(name, facts);
                }
            }
            Event::InitDone => {
                self.nodes = self.nodes_listing.take().unwrap_or_default();
                self.nodes_listed = true;
                if self.synced {
                    // Nodes may have changed while the watch was down.
                    let waiting: Vec<Key> = self.waiting.keys().cloned().collect();
                    self.recheck(waiting);
                }
                self.listed();
            }
            Event::Apply(node) => {
                let Some(name) = node.metadata.name.as_deref() else {
                    return;
                };
                let name = self.name(name);
                let facts = node_facts(&node, self.node_changes + 1);
                let known = self.nodes.get(&name);
                // Only what a release reads counts as a change (heartbeats,
                // labels and images do not).
                if known.is_none_or(|k| k.ready != facts.ready || k.volumes_in_use != facts.volumes_in_use) {
                    self.node_changes += 1;
                    self.nodes.insert(name.clone(), facts);
                    self.node_changed(&name);
                }
            }
            Event::Delete(node) => {
                if let Some(name) = node.metadata.name.as_deref() {
                    let name = self.name(name);
                    self.nodes.remove(&name);
                    self.node_changed(&name);
                }
            }
        }
    }

    /// The pods waiting for node `name` decide again.
    fn node_changed(&mut self, name: &Arc<str>) {
        let waiting: Vec<Key> = self
            .waiting
            .iter()
            .filter(|(_, node)| *node == name)
            .map(|(pod, _)| pod.clone())
            .collect();
        self.recheck(waiting);
    }

    fn recheck(&mut self, pods: Vec<Key>) {
        for pod in pods {
            self.waiting.remove(&pod);
            self.look_at(&pod);
        }
        self.count_waiting();
    }

    /// Whether finished pod `key` may give its claims back now; if not, it
    /// waits for its node or is queued for when it may.
    fn release_timing(&mut self, key: &Key, finished: &FinishedPod) -> Timing {
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
    fn not_in_use(&mut self, key: &Key, state: &PodState, needs: Vec<(usize, Need)>) -> Vec<(usize, Need)> {
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

    fn has_free_worker(&self) -> bool {
        self.tasks.len() < usize::from(self.config.workers.max(1))
    }

    fn dispatch(&mut self) {
        if !self.synced || !self.leading {
            return;
        }
        let now = Instant::now();
        while self.has_free_worker() {
            let Some(key) = self.queue.pop_due(now) else {
                break;
            };
            let Some(state) = self.pods.get(&key) else {
                self.queue.finish(&key);
                continue;
            };
            let needs = self.needs(&key, state);
            if needs.is_empty() {
                self.queue.finish(&key);
                self.queue.succeeded(&key);
                // A finished pod with nothing to release is not kept.
                self.look_at(&key);
                continue;
            }
            if let Some(finished) = state.finished.clone() {
                let state = state.clone();
                let needs = self.not_in_use(&key, &state, needs);
                let timing = if needs.is_empty() {
                    Timing::Later
                } else {
                    self.release_timing(&key, &finished)
                };
                let Timing::Now { node } = timing else {
                    // Scheduled for later, or waiting for its node or a claim's users.
                    self.queue.finish(&key);
                    continue;
                };
                let work = ReleaseWork {
                    client: self.client.clone(),
                    recorder: self.recorder.clone(),
                    leadership: self.leadership.clone(),
                    metrics: self.metrics.clone(),
                    pod: key,
                    state,
                    finished,
                    node,
                    needs,
                };
                self.tasks.push(work.run().boxed());
                continue;
            }
            let work = PodWork {
                client: self.client.clone(),
                recorder: self.recorder.clone(),
                leadership: self.leadership.clone(),
                metrics: self.metrics.clone(),
                pod: key.clone(),
                state: state.clone(),
                needs,
            };
            self.tasks.push(work.run().boxed());
        }
    }

    fn handled(&mut self, handled: Handled) {
        let Handled { pod, uid, outcomes } = handled;
        self.queue.finish(&pod);
        let current = self.pods.get(&pod).is_some_and(|state| state.uid == uid);
        let mut failures = Vec::new();
        let mut waiting_since = None;
        for outcome in outcomes {
            match outcome {
                Ok(Done::Created(claim)) => {
                    // Known at once: a pod event before the watch confirms it creates nothing twice.
                    let claim = Key {
                        namespace: pod.namespace.clone(),
                        name: claim.into(),
                    };
                    self.claims.insert(claim, Some(uid.clone()));
                }
                Ok(Done::Released(claim)) => {
                    // Gone (the watch confirms it).
                    self.claims.remove(&Key {
                        namespace: pod.namespace.clone(),
                        name: claim.into(),
                    });
                }
                Ok(Done::Untouched(claim)) => {
                    // Not the pod's to release after all: nothing more to do
                    // for it until the watch says otherwise.
                    let claim = Key {
                        namespace: pod.namespace.clone(),
                        name: claim.into(),
                    };
                    if let Some(owner) = self.claims.get_mut(&claim) {
                        *owner = None;
                    }
                }
                Ok(Done::Waiting { generation }) => waiting_since = Some(generation),
                Err(failure) => failures.push(failure),
            }
        }
        if !current {
            // Deleted, finished or replaced by a pod of the same name meanwhile.
            self.look_at(&pod);
            return;
        }
        self.blocked.retain(|_, waiting| *waiting != pod);
        if failures.iter().any(|f| f.reason == FailureReason::NotLeader) {
            // Leadership ended meanwhile; the next leader (maybe this one) redoes the pod.
            self.metrics.reconciled("not_leading");
            return;
        }
        if let Some(generation) = waiting_since {
            self.wait_for_volumes_in_use(&pod, generation);
        }
        if failures.is_empty() {
            self.queue.succeeded(&pod);
            self.metrics.reconciled("ok");
            if waiting_since.is_none() {
                self.look_at(&pod);
            }
            return;
        }
        self.metrics.reconciled("failed");
        for failure in &failures {
            if failure.reason == FailureReason::Conflict {
                let claim = Key {
                    namespace: pod.namespace.clone(),
                    name: failure.claim.as_str().into(),
                };
                self.blocked.insert(claim, pod.clone());
            }
        }
        let attempts = self.queue.failed(&pod);
        let delay = self.config.backoff.delay(attempts);
        warn!(%pod, error = %Error::Claims(failures), retry_in = ?delay, "ephemeral volumes not handled; retrying");
        self.queue.schedule(pod, Instant::now() + delay);
    }

    /// Finished pod `key` found its node listing a claim's volume in
    /// `status.volumesInUse` as of the node's `generation`: it waits for the
    /// node's next change (now, if it changed meanwhile).
    fn wait_for_volumes_in_use(&mut self, key: &Key, generation: u64) {
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

/// A watch of every `K`, its events as the loop's signals.
fn watch_all<K>(
    client: &kube::Client,
    source: &'static str,
    signal: fn(Box<Event<K>>) -> Signal,
) -> futures::stream::BoxStream<'static, Signal>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(move |event| match event {
            Ok(event) => signal(Box::new(event)),
            Err(error) => Signal::WatchFailed {
                source,
                error: error.to_string(),
            },
        })
        .boxed()
}

/// Seconds since the epoch, now.
fn epoch_seconds() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// What is kept of a node: Ready, and its volumes in use, hashed.
fn node_facts(node: &SlimNode, generation: u64) -> NodeFacts {
    let status = node.status.as_ref();
    NodeFacts {
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        volumes_in_use: status
            .and_then(|s| s.volumes_in_use.as_ref())
            .map(|v| v.iter().map(|name| release::volume_key(name)).collect())
            .unwrap_or_default(),
        generation,
    }
}

/// The claims of one finished pod, released.
struct ReleaseWork {
    client: kube::Client,
    recorder: Recorder,
    leadership: Leadership,
    metrics: Arc<EphemeralMetrics>,
    pod: Key,
    state: PodState,
    finished: FinishedPod,
    /// The pod's node as last seen, if it has one that exists.
    node: Option<NodeFacts>,
    needs: Vec<(usize, Need)>,
}

impl ReleaseWork {
    async fn run(self) -> Handled {
        let outcomes: Vec<Result<Done, ClaimFailure>> = join_all(self.needs.iter().map(|(i, _)| {
            let (volume, _) = &self.state.volumes[*i];
            self.release(volume)
        }))
        .await;
        for (outcome, (i, _)) in outcomes.iter().zip(&self.needs) {
            if let Ok(Done::Released(claim)) = outcome {
                self.announce(claim, &self.state.volumes[*i].0).await;
            }
        }
        Handled {
            pod: self.pod.clone(),
            uid: self.state.uid.clone(),
            outcomes,
        }
    }

    /// Releases the claim of `volume` if it is the pod's and its volume is
    /// not in use: delete (UID precondition), then lift PVC protection.
    async fn release(&self, volume: &str) -> Result<Done, ClaimFailure> {
        let name = model::claim_name(&self.pod.name, volume);
        let failure = |message: String| ClaimFailure {
            claim: name.clone(),
            reason: FailureReason::Other,
            message,
        };
        let not_leading = || ClaimFailure {
            claim: name.clone(),
            reason: FailureReason::NotLeader,
            message: "not leading".into(),
        };
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.pod.namespace);
        // Read fresh: the cache may be behind, and only the pod's own claim is touched.
        let claim = match api.get_opt(&name).await {
            Ok(Some(claim)) if model::controlling_pod(&claim.metadata) == Some(&*self.state.uid) => claim,
            Ok(_) => return Ok(Done::Untouched(name)),
            Err(error) => return Err(failure(format!("cannot read PVC {name}: {error}"))),
        };
        if let Some(node) = &self.node
            && self.in_use(node, &claim).await.map_err(failure)?
        {
            return Ok(Done::Waiting {
                generation: node.generation,
            });
        }
        let claim = if claim.metadata.deletion_timestamp.is_some() {
            // Deleted before (by an earlier run, or someone else).
            claim
        } else {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: claim.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.leadership.guard(api.delete(&name, &params)).await {
                Err(_) => return Err(not_leading()),
                // Left: still there, held by finalizers; Right: deleted.
                Ok(Ok(result)) => match result.left() {
                    Some(terminating) => terminating,
                    None => return Ok(Done::Released(name)),
                },
                // Gone, or another object by that name now.
                Ok(Err(kube::Error::Api(status))) if status.code == 404 || status.code == 409 => {
                    return Ok(Done::Untouched(name));
                }
                Ok(Err(error)) => return Err(failure(format!("deleting PVC {name} failed: {error}"))),
            }
        };
        let Some(kept) = release::without_protection(claim.metadata.finalizers.as_deref().unwrap_or_default()) else {
            // Held only by someone else's finalizers: theirs to lift.
            return Ok(Done::Untouched(name));
        };
        // The resourceVersion makes it a compare-and-swap: the finalizers
        // written are those just read, less PVC protection's.
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": claim.metadata.resource_version,
            "finalizers": kept,
        }});
        match self
            .leadership
            .guard(api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
        {
            Err(_) => Err(not_leading()),
            Ok(Ok(_)) => Ok(Done::Released(name)),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(Done::Released(name)),
            Ok(Err(error)) => Err(failure(format!("lifting PVC protection from {name} failed: {error}"))),
        }
    }

    /// Whether `node` lists the volume of `claim` in `status.volumesInUse`
    /// (its PV is read only when the node lists anything).
    async fn in_use(&self, node: &NodeFacts, claim: &PersistentVolumeClaim) -> Result<bool, String> {
        let pv = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .filter(|n| !n.is_empty());
        let Some(pv) = pv.filter(|_| !node.volumes_in_use.is_empty()) else {
            return Ok(false);
        };
        let pv = Api::<PersistentVolume>::all(self.client.clone())
            .get_opt(pv)
            .await
            .map_err(|error| format!("cannot read PV {pv}: {error}"))?;
        Ok(release::in_use(node, &release::volume_source(pv.as_ref())))
    }

    /// The Normal event on the pod, the metric and the log line of a release.
    async fn announce(&self, claim: &str, volume: &str) {
        let facts = &self.finished.facts;
        let reason = facts.ending.label();
        self.metrics.released.get_or_create(&vec![("reason", reason)]).inc();
        info!(pod = %self.pod, claim, reason, "released the claim of a finished pod");
        let announcement = Announcement::normal(
            "EphemeralVolumeReleased",
            "ReleaseClaim",
            release::note(claim, volume, facts),
        );
        let target = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.pod.namespace.to_string()),
            name: Some(self.pod.name.to_string()),
            uid: Some(self.state.uid.to_string()),
            ..ObjectReference::default()
        };
        if let Err(error) = events::publish(&self.recorder, &self.leadership, &announcement, &target).await {
            warn!(%error, "cannot publish event");
        }
    }
}

/// The claims one pod needs, made.
struct PodWork {
    client: kube::Client,
    recorder: Recorder,
    leadership: Leadership,
    metrics: Arc<EphemeralMetrics>,
    pod: Key,
    state: PodState,
    needs: Vec<(usize, Need)>,
}

impl PodWork {
    /// Every volume is handled, even when another fails; failures are
    /// counted and published as Warning events on the pod.
    async fn run(self) -> Handled {
        let identity = PodIdentity {
            namespace: &self.pod.namespace,
            name: &self.pod.name,
            uid: &self.state.uid,
        };
        let this = &self;
        let outcomes: Vec<Result<Done, ClaimFailure>> = join_all(self.needs.iter().map(|(i, need)| {
            let (volume, template) = &this.state.volumes[*i];
            async move {
                this.ensure_claim(identity, volume, template, *need)
                    .await
                    .map(Done::Created)
            }
        }))
        .await;
        for failure in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            if failure.reason == FailureReason::NotLeader {
                continue;
            }
            self.metrics
                .failures
                .get_or_create(&vec![("reason", failure.reason.label().to_string())])
                .inc();
            self.publish_warning(identity, failure).await;
        }
        Handled {
            pod: self.pod.clone(),
            uid: self.state.uid.clone(),
            outcomes,
        }
    }

    /// Makes sure the claim of `volume` exists and is the pod's; `Ok` with its name.
    async fn ensure_claim(
        &self,
        pod: PodIdentity<'_>,
        volume: &str,
        template: &PersistentVolumeClaimTemplate,
        need: Need,
    ) -> Result<String, ClaimFailure> {
        let name = model::claim_name(pod.name, volume);
        let failure = |reason: FailureReason, message: String| ClaimFailure {
            claim: name.clone(),
            reason,
            message,
        };
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), pod.namespace);
        let verdict = |existing: kube::api::PartialObjectMeta<PersistentVolumeClaim>| match model::ownership(
            &existing.metadata,
            pod.uid,
        ) {
            Ownership::Pod => Ok(name.clone()),
            Ownership::Foreign(why) => Err(failure(
                FailureReason::Conflict,
                format!("PVC {name} for ephemeral volume {volume:?} cannot be used: {why}; it is left untouched"),
            )),
        };
        if need == Need::Check {
            // Known to exist and not to be the pod's: read it again, it may have changed.
            match api.get_metadata_opt(&name).await {
                Ok(Some(existing)) => return verdict(existing),
                Ok(None) => {}
                Err(error) => {
                    return Err(failure(
                        FailureReason::Other,
                        format!("cannot read existing PVC {name}: {error}"),
                    ));
                }
            }
        }
        let claim = model::desired_claim(&pod, volume, template);
        let Ok(created) = self.leadership.guard(api.create(&PostParams::default(), &claim)).await else {
            return Err(failure(FailureReason::NotLeader, "not leading".into()));
        };
        match created {
            Ok(_) => {
                self.count_created();
                debug!(namespace = %pod.namespace, pod = %pod.name, claim = %name, "created PVC for ephemeral volume");
                Ok(name)
            }
            // Created meanwhile, e.g. by kube-controller-manager's own controller: whose is it?
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get_metadata(&name).await {
                Ok(existing) => verdict(existing),
                Err(error) => Err(failure(
                    FailureReason::Other,
                    format!("cannot read existing PVC {name}: {error}"),
                )),
            },
            Err(kube::Error::Api(status)) => Err(failure(
                FailureReason::from_status(status.code),
                format!("creating PVC {name} failed: {} ({})", status.message, status.reason),
            )),
            Err(error) => Err(failure(
                FailureReason::Other,
                format!("creating PVC {name} failed: {error}"),
            )),
        }
    }

    /// Counts a created claim and how long after its pod it came.
    fn count_created(&self) {
        self.metrics.created.inc();
        if let Some(created) = self.state.created {
            self.metrics
                .pod_to_claim_seconds
                .observe(u32::try_from((epoch_seconds() - created).max(0)).map_or(f64::MAX, f64::from));
        }
    }

    async fn publish_warning(&self, pod: PodIdentity<'_>, failure: &ClaimFailure) {
        let reason = match failure.reason {
            FailureReason::Conflict => "EphemeralClaimConflict",
            _ => "EphemeralClaimFailed",
        };
        let announcement = Announcement::warning(reason, "CreateClaim", failure.note());
        let target = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.to_string()),
            name: Some(pod.name.to_string()),
            uid: Some(pod.uid.to_string()),
            ..ObjectReference::default()
        };
        if let Err(error) = events::publish(&self.recorder, &self.leadership, &announcement, &target).await {
            warn!(%error, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::events::v1::Event;
    use kube::api::ListParams;
    use prometheus_client::registry::Registry;
    use serde_json::json;
    use volplane_tests::apiserver::{ApiServerDouble, Verb};

    use super::*;

    /// The work for pod `default/p` (volume `v`) as the loop would hand it
    /// out when its claim is missing from the cache.
    async fn work_for_new_pod(client: &kube::Client) -> PodWork {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
            "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}}]}}))
        .expect("pod");
        let created = Api::<Pod>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &pod)
            .await
            .expect("pod");
        let slim: SlimPod = serde_json::from_value(serde_json::to_value(&created).expect("json")).expect("slim");
        let mut registry = Registry::default();
        PodWork {
            client: client.clone(),
            recorder: Recorder::new(client.clone(), Reporter::from("test")),
            leadership: Leadership::unconditional(),
            metrics: Arc::new(EphemeralMetrics::register(&mut registry)),
            pod: Key {
                namespace: "default".into(),
                name: "p".into(),
            },
            state: PodState {
                uid: slim.metadata.uid.as_deref().unwrap_or_default().into(),
                created: None,
                volumes: model::ephemeral_volumes(&slim).into(),
                finished: None,
            },
            needs: vec![(0, Need::Create)],
        }
    }

    #[tokio::test]
    async fn already_exists_with_the_pods_uid_is_success_without_event() {
        let double = ApiServerDouble::start().await.expect("double");
        let client = double.client();
        let work = work_for_new_pod(&client).await;
        // Another controller (kube-controller-manager's) won the race.
        let identity = PodIdentity {
            namespace: "default",
            name: "p",
            uid: &work.state.uid,
        };
        let (volume, template) = &work.state.volumes[0];
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .create(
                &PostParams::default(),
                &model::desired_claim(&identity, volume, template),
            )
            .await
            .expect("claim");
        double.clear_requests();

        let handled = work.run().await;
        assert_eq!(handled.outcomes, [Ok(Done::Created("p-v".to_string()))]);
        assert_eq!(
            double.count(Verb::Create, "persistentvolumeclaims"),
            1,
            "tried, got 409"
        );
        assert_eq!(
            double.count(Verb::Get, "persistentvolumeclaims"),
            1,
            "then checked the owner"
        );
        let events = Api::<Event>::namespaced(client, "default")
            .list(&ListParams::default())
            .await
            .expect("events");
        assert!(events.items.is_empty(), "no event on success");
    }

    #[tokio::test]
    async fn already_exists_with_another_owner_is_a_conflict_and_not_touched() {
        let double = ApiServerDouble::start().await.expect("double");
        let client = double.client();
        let work = work_for_new_pod(&client).await;
        let foreign: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": "p-v", "labels": {"keep": "me"}}})).expect("pvc");
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &foreign)
            .await
            .expect("foreign");
        double.clear_requests();
        let handled = work.run().await;
        let [Err(failure)] = &handled.outcomes[..] else {
            panic!("one conflict: {:?}", handled.outcomes);
        };
        assert_eq!(failure.reason, FailureReason::Conflict);
        assert!(
            failure.message.contains("p-v") && failure.message.contains("not owned"),
            "{}",
            failure.message
        );
        assert_eq!(
            double.writes("persistentvolumeclaims"),
            1,
            "only the failed create, no update"
        );
        let warned = volplane_tests::wait::eventually_some(Duration::from_secs(10), "the Warning event", || {
            let events: Api<Event> = Api::namespaced(client.clone(), "default");
            async move {
                events
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| e.reason.as_deref() == Some("EphemeralClaimConflict"))
            }
        })
        .await;
        assert_eq!(warned.regarding.and_then(|r| r.name).as_deref(), Some("p"));
    }
}
