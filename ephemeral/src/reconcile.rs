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

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use volplane_runtime::{Backoff, Leadership, Readiness, WorkQueue, control_loop, index};

use crate::error::{ClaimFailure, Error};
use crate::metrics::EphemeralMetrics;
use crate::model::{self, FailureReason, Need, SlimClaim, SlimNode, SlimPod, Volumes, VolumesInterner};
use crate::release::{self, Finished, NodeFacts, ReleaseMode};

mod dispatch;
mod releases;
mod watches;
mod work;

use watches::Watches;

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
        let watches = Watches::new(self.config.release != ReleaseMode::Never);
        let mut running = Running {
            watches,
            state: LoopState::new(self),
        };
        control_loop::run(&mut running, &mut signals, shutdown).await;
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
    /// Every claim, with the UID of the pod that controls it (if one does).
    claims: HashMap<Key, Option<Box<str>>>,
    /// Nodes (only when claims are released): Ready and volumes in use.
    nodes: HashMap<Arc<str>, NodeFacts>,
    node_changes: u64,
    /// Finished pods waiting for their node to change, and the node.
    waiting: HashMap<Key, Arc<str>>,
    /// Claims that pods which have not finished mount by name, with those
    /// pods (only when claims are released): in use, never released.
    claim_users: HashMap<Key, HashSet<Key>>,
    /// Per pod, the claims it mounts by name (to keep `claim_users`).
    pod_refs: HashMap<Key, Box<[Box<str>]>>,
    /// Claims of finished pods waiting for their other users, and the pod.
    waiting_on_claim: HashMap<Key, Key>,
    /// Whether every watch's index is a complete view (set by
    /// [`Watches`]); no decision is taken while one is (re-)listing.
    current: bool,
    queue: WorkQueue<Key>,
    /// Claims held by someone else, and the pod waiting for each name.
    blocked: HashMap<Key, Key>,
    /// Pods whose last attempt failed, and why (retried with backoff).
    failing: HashMap<Key, FailureReason>,
    tasks: FuturesUnordered<BoxFuture<'static, Handled>>,
}

/// The loop's state with the feeds of its watches beside it.
struct Running {
    watches: Watches,
    state: LoopState,
}

impl control_loop::State for Running {
    type Signal = Signal;
    type Done = Handled;

    fn before_wait(&mut self) -> Option<Instant> {
        let state = &mut self.state;
        state.follow_leadership();
        state.dispatch();
        // While a watch lists nothing is dispatched: the list's end wakes
        // the loop, not a due time already past (that would spin).
        (state.queue.next_due()).filter(|_| state.leading && state.has_free_worker() && state.current)
    }

    fn leadership(&self) -> &Leadership {
        &self.state.leadership
    }

    fn leading(&self) -> bool {
        self.state.leading
    }

    fn tasks(&mut self) -> &mut FuturesUnordered<BoxFuture<'static, Handled>> {
        &mut self.state.tasks
    }

    fn signal(&mut self, signal: Signal) {
        self.watches.signal(&mut self.state, signal);
    }

    fn finished(&mut self, handled: Handled) {
        self.state.handled(handled);
    }

    fn stopping(&mut self) {
        info!(
            in_flight = self.state.tasks.len(),
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
            claims: HashMap::new(),
            nodes: HashMap::new(),
            node_changes: 0,
            waiting: HashMap::new(),
            claim_users: HashMap::new(),
            pod_refs: HashMap::new(),
            waiting_on_claim: HashMap::new(),
            current: false,
            queue: WorkQueue::default(),
            blocked: HashMap::new(),
            failing: HashMap::new(),
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
            // Another replica tries them now.
            let failing: Vec<Key> = self.failing.keys().cloned().collect();
            for pod in failing {
                self.set_failing(&pod, None);
            }
        }
    }

    fn look_at_every_pod(&mut self) {
        if !self.current {
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
    /// Not while a watch lists: every pod is looked at when it ends.
    fn look_at(&mut self, key: &Key) {
        if !self.current {
            return;
        }
        let Some(state) = self.pods.get(key) else {
            return;
        };
        if self.needs(key, state).is_empty() {
            let finished = state.finished.is_some();
            self.set_failing(key, None);
            if finished {
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
        self.set_failing(key, None);
        self.queue.forget(key);
        self.blocked.retain(|_, waiting| waiting != key);
        self.stop_waiting(key);
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
    index::watch_all(client, watcher::Config::default(), move |event| match event {
        Ok(event) => signal(Box::new(event)),
        Err(error) => Signal::WatchFailed {
            source,
            error: error.to_string(),
        },
    })
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
