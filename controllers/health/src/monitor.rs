//! The controller side: asks the driver for the condition of every bound
//! volume (ListVolumes sweeps, or ControllerGetVolume per volume), announces
//! changes as events on the PVCs, keeps what it announced in a PV
//! annotation, and, with the node watcher, reports failed nodes on the
//! PVCs their pods use.
//!
//! One task owns the state; driver calls and writes run as futures it
//! polls. Only the leader calls the driver and writes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, ObjectReference, PersistentVolume, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tracing::{debug, error, info, warn};
use volplane_csi::{CsiClient, CsiError};
use volplane_runtime::events::{self, Published};
use volplane_runtime::{Leadership, NotLeader, Readiness, control_loop, phase};

use crate::Error;
use crate::metrics::{HealthMetrics, claim_labels};
use crate::model::{self, Announcement, Condition, NodeVerdict, Observation, Watched};

/// How the driver is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// ListVolumes sweeps every `interval`, `page_size` entries per page.
    ListVolumes {
        /// Time between sweeps.
        interval: Duration,
        /// `max_entries` per page (0: the driver chooses).
        page_size: i32,
    },
    /// ControllerGetVolume per volume every `interval`, `workers` at once.
    GetVolume {
        /// Time between checks of one volume.
        interval: Duration,
        /// Calls in flight at most.
        workers: usize,
    },
}

/// Settings of the controller side.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// The driver name (`spec.csi.driver` of its PVs).
    pub driver: String,
    /// How conditions are read.
    pub source: Source,
    /// Used instead when `source` answers Unimplemented (a driver that
    /// advertises LIST_VOLUMES but does not list conditions, say).
    pub fallback: Option<Source>,
    /// The node watcher's failure threshold; `None` disables it.
    pub node_failure_threshold: Option<Duration>,
    /// `reportingInstance` of events.
    pub instance: String,
}

/// The controller side of volume health monitoring.
pub struct HealthController {
    client: kube::Client,
    csi: CsiClient,
    config: Arc<HealthConfig>,
    metrics: Arc<HealthMetrics>,
    leadership: Leadership,
    ready: Readiness,
}

impl std::fmt::Debug for HealthController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthController")
            .field("config", &self.config)
            .finish()
    }
}

/// Sweeps restarted after ABORTED (a stale token) before the sweep fails.
const SWEEP_RESTARTS: usize = 3;
/// How long node and pod changes gather before the node watcher looks.
const NODE_CHECK_DELAY: Duration = Duration::from_millis(500);
/// Announcements written at once.
const WRITERS: usize = 16;

enum Signal {
    Volume(Box<Event<PersistentVolume>>),
    Synced(&'static str),
    Changed,
    WatchFailed(&'static str, String),
}

enum Done {
    Sweep {
        started: Instant,
        result: Result<HashMap<String, Option<Condition>>, CsiError>,
    },
    Check {
        pv: String,
        result: Result<Observation, CsiError>,
    },
    Announced {
        pv: String,
        condition: Condition,
        result: Result<(), Error>,
    },
    Noted,
}

impl Source {
    /// The `source` label of `volplane_health_source`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ListVolumes { .. } => "list_volumes",
            Self::GetVolume { .. } => "get_volume",
        }
    }
}

impl HealthController {
    /// A controller; nothing runs until [`HealthController::run`].
    pub fn new(
        client: kube::Client,
        csi: CsiClient,
        config: HealthConfig,
        metrics: Arc<HealthMetrics>,
        leadership: Leadership,
    ) -> Self {
        Self {
            client,
            csi,
            config: Arc::new(config),
            metrics,
            leadership,
            ready: Readiness::new(),
        }
    }

    /// Turns true once the caches are filled.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes, then lets writes in flight finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let config = self.config.clone();
        let (streams, required, stores) = self.inputs();
        let mut state = LoopState::new(self, required, stores);
        state.metrics.set_source(config.source.label());
        let mut signals = futures::stream::select_all(streams);
        info!(driver = %config.driver, source = ?config.source, node_watcher = ?config.node_failure_threshold,
              "health controller starting");
        control_loop::run(&mut state, &mut signals, shutdown).await;
    }
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Done;

    fn before_wait(&mut self) -> Option<Instant> {
        self.follow_leadership();
        self.dispatch();
        self.next_wake()
    }

    fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    fn leading(&self) -> bool {
        self.leading
    }

    fn tasks(&mut self) -> &mut FuturesUnordered<BoxFuture<'static, Done>> {
        &mut self.tasks
    }

    fn signal(&mut self, signal: Signal) {
        self.signal(signal);
    }

    fn finished(&mut self, done: Done) {
        self.finished(done);
    }

    fn stopping(&mut self) {
        info!(
            in_flight = self.tasks.len(),
            "health controller stopping; finishing work in flight"
        );
    }

    fn finished_on_shutdown(&mut self, done: Done) {
        if let Done::Announced {
            pv, result: Err(error), ..
        } = done
        {
            warn!(%pv, %error, "announcement failed during shutdown");
        }
    }
}

fn store_signal<K>(source: &'static str, event: Result<Event<K>, watcher::Error>) -> Signal {
    match event {
        Ok(Event::InitDone) => Signal::Synced(source),
        Ok(_) => Signal::Changed,
        Err(error) => Signal::WatchFailed(source, error.to_string()),
    }
}

impl HealthController {
    /// The watches the loop follows: PVs, and for the node watcher Nodes
    /// and Pods (trimmed); with the sources whose first list must be done.
    #[allow(clippy::type_complexity)]
    fn inputs(
        &self,
    ) -> (
        Vec<BoxStream<'static, Signal>>,
        BTreeSet<&'static str>,
        Option<(Store<Node>, Store<Pod>)>,
    ) {
        let mut streams: Vec<BoxStream<'static, Signal>> = vec![
            watcher::watcher(
                Api::<PersistentVolume>::all(self.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .map(|event| match event {
                Ok(Event::InitDone) => Signal::Synced("volumes"),
                Ok(event) => Signal::Volume(Box::new(event)),
                Err(error) => Signal::WatchFailed("volumes", error.to_string()),
            })
            .boxed(),
        ];
        let mut required: BTreeSet<&'static str> = ["volumes"].into();
        if self.config.node_failure_threshold.is_none() {
            return (streams, required, None);
        }
        required.extend(["nodes", "pods"]);
        let (nodes, writer) = reflector::store::<Node>();
        streams.push(
            watcher::watcher(Api::<Node>::all(self.client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(|node| *node = model::trim_node(std::mem::take(node)))
                .reflect(writer)
                .map(|event| store_signal("nodes", event))
                .boxed(),
        );
        let (pods, writer) = reflector::store::<Pod>();
        streams.push(
            watcher::watcher(Api::<Pod>::all(self.client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(|pod| *pod = model::trim_pod(std::mem::take(pod)))
                .reflect(writer)
                .map(|event| store_signal("pods", event))
                .boxed(),
        );
        (streams, required, Some((nodes, pods)))
    }
}

struct LoopState {
    config: Arc<HealthConfig>,
    csi: CsiClient,
    pvs: Api<PersistentVolume>,
    recorder: Recorder,
    metrics: Arc<HealthMetrics>,
    leadership: Leadership,
    leading: bool,
    required: BTreeSet<&'static str>,
    synced: BTreeSet<&'static str>,
    ready: Readiness,
    /// Watched volumes by PV name.
    volumes: BTreeMap<String, Watched>,
    /// What was last announced per PV (seeded from the annotation).
    announced: HashMap<String, Condition>,
    /// PVs with an announcement being written.
    writing: HashSet<String>,
    /// Announcements waiting for a writer.
    /// Announcements waiting for a writer; `None`: only the annotation is
    /// behind (its patch failed after the event went out).
    queued: BTreeMap<String, (Watched, Condition, Option<Announcement>)>,
    /// What each watched PV's annotation says now (from the watch).
    recorded: HashMap<String, Option<Condition>>,
    /// When each PV started being watched: a sweep that began earlier
    /// may have listed the driver before the volume existed, so it cannot
    /// call the volume missing.
    watched_since: HashMap<String, Instant>,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
    /// `None` once the source turned out unusable (Unimplemented).
    source: Option<Source>,
    next_sweep: Option<Instant>,
    sweeping: bool,
    due: BTreeSet<(Instant, String)>,
    next_check: HashMap<String, Instant>,
    checking: HashSet<String>,
    stores: Option<(Store<Node>, Store<Pod>)>,
    /// Failed nodes with the volumes (and pods) announced for them.
    failed_nodes: BTreeMap<String, BTreeMap<Watched, BTreeSet<String>>>,
    /// The failed node each PV's annotation names (what some leader
    /// announced), by PV name.
    node_failure_annotations: HashMap<String, String>,
    /// Rebuild `failed_nodes` from the annotations before the next node
    /// check (at start and on every new term: another replica may have
    /// announced failures meanwhile).
    reseed_failed_nodes: bool,
    next_node_check: Option<Instant>,
}

impl LoopState {
    fn new(
        controller: HealthController,
        required: BTreeSet<&'static str>,
        stores: Option<(Store<Node>, Store<Pod>)>,
    ) -> Self {
        let config = controller.config;
        let recorder = Recorder::new(
            controller.client.clone(),
            Reporter {
                controller: crate::model::REPORTING_CONTROLLER.into(),
                instance: Some(config.instance.clone()),
            },
        );
        Self {
            csi: controller.csi,
            pvs: Api::all(controller.client),
            recorder,
            metrics: controller.metrics,
            leadership: controller.leadership,
            leading: false,
            required,
            synced: BTreeSet::new(),
            ready: controller.ready,
            volumes: BTreeMap::new(),
            announced: HashMap::new(),
            writing: HashSet::new(),
            queued: BTreeMap::new(),
            recorded: HashMap::new(),
            watched_since: HashMap::new(),
            tasks: FuturesUnordered::new(),
            source: Some(config.source.clone()),
            next_sweep: None,
            sweeping: false,
            due: BTreeSet::new(),
            next_check: HashMap::new(),
            checking: HashSet::new(),
            stores,
            failed_nodes: BTreeMap::new(),
            node_failure_annotations: HashMap::new(),
            reseed_failed_nodes: true,
            next_node_check: None,
            config,
        }
    }

    fn is_synced(&self) -> bool {
        self.required.is_subset(&self.synced)
    }

    fn follow_leadership(&mut self) {
        let leading = self.leadership.may_write();
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        if leading {
            info!("leading: checking volume health");
            self.reseed_failed_nodes = true;
            self.next_sweep = Some(Instant::now());
            self.next_node_check = Some(Instant::now());
        } else {
            info!("not leading: no driver calls and no writes");
        }
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Volume(event) => match *event {
                Event::Init => {}
                Event::InitApply(pv) | Event::Apply(pv) => self.on_volume(&pv),
                Event::Delete(pv) => {
                    if let Some(name) = pv.metadata.name.as_deref() {
                        self.forget(name);
                    }
                }
                Event::InitDone => {}
            },
            Signal::Synced(source) => {
                self.synced.insert(source);
                if self.is_synced() && self.ready.mark_ready() {
                    info!(volumes = self.volumes.len(), "health controller synced");
                }
            }
            Signal::Changed => {
                // Nodes or pods changed: look at the nodes again soon. One
                // look covers every change of the last NODE_CHECK_DELAY, so a
                // busy cluster costs at most one scan per that delay.
                if self.stores.is_some() {
                    let soon = Instant::now() + NODE_CHECK_DELAY;
                    self.next_node_check = Some(self.next_node_check.map_or(soon, |at| at.min(soon)));
                }
            }
            Signal::WatchFailed(source, error) => warn!(source, %error, "watch failed; retrying with backoff"),
        }
    }

    fn on_volume(&mut self, pv: &PersistentVolume) {
        let Some(name) = pv.metadata.name.clone() else {
            return;
        };
        match model::watched(pv, &self.config.driver) {
            Some(watched) => {
                if !self.announced.contains_key(&name)
                    && let Some(condition) = model::announced(pv)
                {
                    self.metrics
                        .abnormal
                        .get_or_create(&claim_labels(&watched.namespace, &watched.claim))
                        .set(1);
                    self.announced.insert(name.clone(), condition);
                }
                if !self.next_check.contains_key(&name)
                    && let Some(Source::GetVolume { interval, .. }) = &self.source
                {
                    let at = Instant::now() + phase::phase(&name, *interval);
                    self.next_check.insert(name.clone(), at);
                    self.due.insert((at, name.clone()));
                }
                self.recorded.insert(name.clone(), model::announced(pv));
                self.watched_since.entry(name.clone()).or_insert_with(Instant::now);
                match model::announced_node_failure(pv) {
                    Some(node) => self.node_failure_annotations.insert(name.clone(), node),
                    None => self.node_failure_annotations.remove(&name),
                };
                self.volumes.insert(name, watched);
            }
            // Unbound, released or not ours (any more): not watched.
            None => self.forget(&name),
        }
    }

    fn forget(&mut self, name: &str) {
        if let Some(watched) = self.volumes.remove(name) {
            self.metrics
                .abnormal
                .remove(&claim_labels(&watched.namespace, &watched.claim));
        }
        self.announced.remove(name);
        self.recorded.remove(name);
        self.watched_since.remove(name);
        self.node_failure_annotations.remove(name);
        self.queued.remove(name);
        if let Some(at) = self.next_check.remove(name) {
            self.due.remove(&(at, name.to_string()));
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        if !self.leading || !self.is_synced() {
            return None;
        }
        let mut wake: Vec<Instant> = Vec::new();
        if matches!(self.source, Some(Source::ListVolumes { .. })) && !self.sweeping {
            wake.extend(self.next_sweep);
        }
        if let Some(Source::GetVolume { workers, .. }) = &self.source
            && self.checking.len() < *workers
        {
            wake.extend(self.due.first().map(|(at, _)| *at));
        }
        wake.extend(self.next_node_check);
        wake.into_iter().min()
    }

    fn dispatch(&mut self) {
        if !self.leading || !self.is_synced() {
            return;
        }
        let now = Instant::now();
        match self.source.clone() {
            Some(Source::ListVolumes { page_size, .. })
                if !self.sweeping && self.next_sweep.is_some_and(|at| at <= now) =>
            {
                self.sweeping = true;
                self.next_sweep = None;
                let csi = self.csi.clone();
                self.tasks.push(
                    async move {
                        let started = Instant::now();
                        let result = sweep(&csi, page_size).await;
                        Done::Sweep { started, result }
                    }
                    .boxed(),
                );
            }
            Some(Source::GetVolume { interval, workers }) => {
                while self.checking.len() < workers {
                    let Some((at, name)) = self.due.first().cloned().filter(|(at, _)| *at <= now) else {
                        break;
                    };
                    self.due.remove(&(at, name.clone()));
                    let Some(watched) = self.volumes.get(&name).cloned() else {
                        self.next_check.remove(&name);
                        continue;
                    };
                    // The next check is one interval after this one starts.
                    let next = now + interval;
                    self.next_check.insert(name.clone(), next);
                    self.due.insert((next, name.clone()));
                    self.checking.insert(name.clone());
                    let csi = self.csi.clone();
                    self.tasks.push(
                        async move {
                            let result = check(&csi, &watched.volume_handle).await;
                            Done::Check { pv: name, result }
                        }
                        .boxed(),
                    );
                }
            }
            Some(Source::ListVolumes { .. }) | None => {}
        }
        if self.next_node_check.is_some_and(|at| at <= now) {
            self.next_node_check = None;
            self.check_nodes();
        }
        self.write_queued();
    }

    fn finished(&mut self, done: Done) {
        match done {
            Done::Sweep { started, result } => self.swept(started, result),
            Done::Check { pv, result } => {
                self.checking.remove(&pv);
                let Some(volume) = self.volumes.get(&pv).cloned() else {
                    return;
                };
                match result {
                    Ok(observation) => self.observe(&volume, &observation),
                    Err(error) if error.is_unimplemented() => self.unusable(&error),
                    Err(error) => {
                        self.metrics.checked("error");
                        warn!(%pv, %error, "ControllerGetVolume failed; the condition stays as it was");
                    }
                }
            }
            Done::Announced { pv, condition, result } => {
                self.writing.remove(&pv);
                match result {
                    Ok(()) => {
                        if self.volumes.contains_key(&pv) {
                            self.announced.insert(pv, condition);
                        }
                    }
                    Err(error) => warn!(%pv, %error, "cannot announce the volume condition; the next check retries"),
                }
            }
            Done::Noted => {}
        }
    }

    /// A ListVolumes sweep that began at `started` ended.
    fn swept(&mut self, started: Instant, result: Result<HashMap<String, Option<Condition>>, CsiError>) {
        self.sweeping = false;
        let Some(Source::ListVolumes { interval, .. }) = self.source.clone() else {
            return;
        };
        let listed = match result {
            Ok(listed) => listed,
            Err(error) if error.is_unimplemented() => return self.unusable(&error),
            Err(error) => {
                self.metrics.checked("error");
                let retry = (interval / 10).max(Duration::from_secs(1));
                warn!(%error, retry_in = ?retry, "ListVolumes sweep failed; conditions stay as they were");
                self.next_sweep = Some(Instant::now() + retry);
                return;
            }
        };
        self.metrics.sweep_seconds.observe(started.elapsed().as_secs_f64());
        debug!(listed = listed.len(), watched = self.volumes.len(), took = ?started.elapsed(), "ListVolumes sweep done");
        let watched: Vec<Watched> = self.volumes.values().cloned().collect();
        for volume in watched {
            let observation = match listed.get(&volume.volume_handle) {
                Some(Some(condition)) => Observation::Reported(condition.clone()),
                Some(None) => Observation::Silent,
                // Bound after the sweep began: the next one judges.
                None if self.watched_since.get(&volume.pv).is_some_and(|at| *at > started) => continue,
                None => Observation::Missing {
                    how: "missing from ListVolumes",
                },
            };
            self.observe(&volume, &observation);
        }
        self.next_sweep = Some(started + interval);
    }

    /// The driver does not implement the call its capabilities promised:
    /// use the fallback if there is one, else stop checking (and stay up).
    fn unusable(&mut self, error: &CsiError) {
        self.metrics.checked("unimplemented");
        self.due.clear();
        self.next_check.clear();
        self.sweeping = false;
        self.next_sweep = None;
        let fallback = self.config.fallback.clone().filter(|f| Some(f) != self.source.as_ref());
        match fallback {
            Some(fallback) => {
                error!(%error, fallback = ?fallback, "the CSI driver does not implement the call for volume conditions; using the fallback");
                self.use_source(Some(fallback));
            }
            None => {
                error!(%error, "the CSI driver does not implement the call for volume conditions; controller-side checks stop");
                self.use_source(None);
            }
        }
    }

    /// Switches to `source` and schedules its first checks.
    fn use_source(&mut self, source: Option<Source>) {
        self.metrics.set_source(source.as_ref().map_or("none", Source::label));
        self.source = source;
        match &self.source {
            Some(Source::ListVolumes { .. }) => self.next_sweep = Some(Instant::now()),
            Some(Source::GetVolume { interval, .. }) => {
                let now = Instant::now();
                for name in self.volumes.keys() {
                    let at = now + phase::phase(name, *interval);
                    self.next_check.insert(name.clone(), at);
                    self.due.insert((at, name.clone()));
                }
            }
            None => {}
        }
    }

    fn observe(&mut self, volume: &Watched, observation: &Observation) {
        self.metrics.checked(observation.label());
        let Some(condition) = observation.condition(&volume.volume_handle, &self.config.driver) else {
            return;
        };
        let labels = claim_labels(&volume.namespace, &volume.claim);
        match &condition {
            Condition::Abnormal(_) => {
                self.metrics.abnormal.get_or_create(&labels).set(1);
            }
            Condition::Normal => {
                self.metrics.abnormal.remove(&labels);
            }
        }
        match model::announcement(self.announced.get(&volume.pv), &condition) {
            Some(announcement) => {
                self.queued
                    .insert(volume.pv.clone(), (volume.clone(), condition, Some(announcement)));
            }
            None => {
                let recorded = self.recorded.get(&volume.pv).cloned().flatten();
                let wanted = matches!(condition, Condition::Abnormal(_)).then(|| condition.clone());
                if recorded != wanted && !self.writing.contains(&volume.pv) {
                    debug!(pv = %volume.pv, "the PV annotation is behind the announced condition; writing it again");
                    self.queued.insert(volume.pv.clone(), (volume.clone(), condition, None));
                } else {
                    self.queued.remove(&volume.pv);
                }
            }
        }
    }

    fn write_queued(&mut self) {
        let free = WRITERS.saturating_sub(self.writing.len());
        let ready: Vec<String> = self
            .queued
            .keys()
            .filter(|pv| !self.writing.contains(*pv))
            .take(free)
            .cloned()
            .collect();
        for pv in ready {
            let Some((volume, condition, announcement)) = self.queued.remove(&pv) else {
                continue;
            };
            self.writing.insert(pv.clone());
            if let Some(announcement) = &announcement {
                info!(pv = %pv, namespace = %volume.namespace, claim = %volume.claim, reason = announcement.reason, note = %announcement.note, "volume condition changed");
            }
            let recorder = self.recorder.clone();
            let leadership = self.leadership.clone();
            let pvs = self.pvs.clone();
            let metrics = self.metrics.clone();
            self.tasks.push(
                async move {
                    let result = announce(
                        &recorder,
                        &leadership,
                        &pvs,
                        &volume,
                        &condition,
                        announcement.as_ref(),
                        &metrics,
                    )
                    .await;
                    Done::Announced { pv, condition, result }
                }
                .boxed(),
            );
        }
    }

    /// The node watcher: a node not Ready for the threshold gets one
    /// NodeFailed event per PVC its pods use; its return one NodeRecovered.
    fn check_nodes(&mut self) {
        let (Some(threshold), Some((nodes, pods))) = (self.config.node_failure_threshold, self.stores.clone()) else {
            return;
        };
        if std::mem::take(&mut self.reseed_failed_nodes) {
            self.reseed_failed_nodes_from_annotations();
        }
        let now = SystemTime::now();
        let nodes = nodes.state();
        let mut wake: Option<SystemTime> = None;
        let mut failed = Vec::new();
        let mut healthy = Vec::new();
        for node in &nodes {
            let Some(name) = node.metadata.name.clone() else {
                continue;
            };
            match model::node_verdict(node, threshold, now) {
                NodeVerdict::Failed { since } => failed.push((name, since)),
                NodeVerdict::Suspect { fails_at } => wake = Some(wake.map_or(fails_at, |w| w.min(fails_at))),
                NodeVerdict::Healthy => healthy.push(name),
            }
        }
        if let Some(at) = wake {
            let wait = at.duration_since(now).unwrap_or_default();
            self.next_node_check = Some(Instant::now() + wait + Duration::from_millis(10));
        }
        let present: HashSet<&str> = nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
        self.forget_deleted_nodes(&present);
        let pods = pods.state();
        for (node, since) in failed {
            self.node_failed(node, since, &pods);
        }
        for node in healthy {
            self.node_recovered(&node);
        }
        self.metrics
            .failed_nodes
            .set(i64::try_from(self.failed_nodes.len()).unwrap_or(i64::MAX));
    }

    /// After a restart or a new term: the failed nodes the PV annotations name.
    fn reseed_failed_nodes_from_annotations(&mut self) {
        self.failed_nodes.clear();
        for (pv, node) in &self.node_failure_annotations {
            if let Some(volume) = self.volumes.get(pv) {
                self.failed_nodes
                    .entry(node.clone())
                    .or_default()
                    .insert(volume.clone(), BTreeSet::new());
            }
        }
    }

    /// A failed node that was deleted: its annotations go, no event.
    fn forget_deleted_nodes(&mut self, present: &HashSet<&str>) {
        let gone: Vec<String> = self
            .failed_nodes
            .keys()
            .filter(|n| !present.contains(n.as_str()))
            .cloned()
            .collect();
        for node in gone {
            info!(%node, "failed node deleted; no recovery to report");
            for volume in self.failed_nodes.remove(&node).unwrap_or_default().into_keys() {
                self.node_note(volume, NodeNote::Forgotten);
            }
        }
    }

    /// `node` has failed since `since`: NodeFailed for each volume its pods
    /// use that was not announced yet.
    fn node_failed(&mut self, node: String, since: SystemTime, pods: &[Arc<Pod>]) {
        let by_claim: BTreeMap<(String, String), Watched> = self
            .volumes
            .values()
            .map(|w| ((w.namespace.clone(), w.claim.clone()), w.clone()))
            .collect();
        let volumes = model::volumes_on_node(&node, pods.iter().map(AsRef::as_ref), &by_claim);
        let known = self.failed_nodes.remove(&node);
        if known.is_none() {
            warn!(%node, volumes = volumes.len(), "node failed");
        }
        // Volumes announced before keep their pods; volumes that turned up
        // since (a pod cache catching up) are announced now.
        let mut announced = known.unwrap_or_default();
        for (volume, pods) in volumes {
            if announced.contains_key(&volume) {
                continue;
            }
            let note = model::node_failed_note(&node, since, &pods);
            self.node_note(
                volume.clone(),
                NodeNote::Failed {
                    node: node.clone(),
                    note,
                },
            );
            announced.insert(volume, pods);
        }
        self.failed_nodes.insert(node, announced);
    }

    /// `node` is Ready again: NodeRecovered for each volume announced failed.
    fn node_recovered(&mut self, node: &str) {
        let Some(volumes) = self.failed_nodes.remove(node) else {
            return;
        };
        info!(%node, volumes = volumes.len(), "node recovered");
        for volume in volumes.into_keys() {
            let note = format!("node {node} is Ready again");
            self.node_note(volume, NodeNote::Recovered { note });
        }
    }

    /// Publishes a node watcher event on the volume's PVC, then records
    /// (or clears) the failed node in the PV's annotation.
    fn node_note(&mut self, volume: Watched, note: NodeNote) {
        let recorder = self.recorder.clone();
        let leadership = self.leadership.clone();
        let metrics = self.metrics.clone();
        let pvs = self.pvs.clone();
        self.tasks.push(
            async move {
                let (event, node) = match note {
                    NodeNote::Failed { node, note } => {
                        (Some((EventType::Warning, model::REASON_NODE_FAILED, note)), Some(node))
                    }
                    NodeNote::Recovered { note } => {
                        (Some((EventType::Normal, model::REASON_NODE_RECOVERED, note)), None)
                    }
                    NodeNote::Forgotten => (None, None),
                };
                if let Some((type_, reason, note)) = event {
                    let event = events::Announcement::new(type_, reason, "WatchNode", note);
                    match events::publish(&recorder, &leadership, &event, &volume.claim_reference()).await {
                        Ok(Published::Sent) => {
                            metrics.events.get_or_create(&vec![("reason", reason)]).inc();
                        }
                        Ok(Published::NotLeading) => return Done::Noted,
                        Err(error) => {
                            warn!(%error, reason, pv = %volume.pv, "cannot publish event");
                            return Done::Noted;
                        }
                    }
                }
                let patch = Patch::Merge(model::node_failure_patch(node.as_deref()));
                if let Ok(Err(error)) = leadership
                    .guard(pvs.patch(&volume.pv, &PatchParams::default(), &patch))
                    .await
                {
                    warn!(%error, pv = %volume.pv, "cannot record the node failure on the PV");
                }
                Done::Noted
            }
            .boxed(),
        );
    }
}

/// What the node watcher says about a volume.
enum NodeNote {
    /// `node` failed: NodeFailed, and the annotation names it.
    Failed { node: String, note: String },
    /// Its node is Ready again: NodeRecovered, and the annotation goes.
    Recovered { note: String },
    /// Its failed node was deleted: the annotation goes, no event.
    Forgotten,
}

/// One full ListVolumes sweep: every page, restarted on ABORTED.
async fn sweep(csi: &CsiClient, page_size: i32) -> Result<HashMap<String, Option<Condition>>, CsiError> {
    let mut attempt = 0;
    'sweep: loop {
        let mut listed = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            match csi.list_volumes(page_size, token.as_deref()).await {
                Ok(page) => {
                    for entry in page.entries {
                        let Some(volume) = entry.volume else {
                            continue;
                        };
                        let condition = entry
                            .status
                            .and_then(|s| s.volume_condition)
                            .map(|c| model::condition_of(c.abnormal, &c.message));
                        listed.insert(volume.volume_id, condition);
                    }
                    match page.next_token {
                        Some(next) => token = Some(next),
                        None => return Ok(listed),
                    }
                }
                Err(error) if error.code() == Some(Code::Aborted) && attempt < SWEEP_RESTARTS => {
                    attempt += 1;
                    debug!(%error, attempt, "ListVolumes token went stale; restarting the sweep");
                    continue 'sweep;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// One ControllerGetVolume check.
async fn check(csi: &CsiClient, volume_handle: &str) -> Result<Observation, CsiError> {
    match csi.controller_get_volume(volume_handle).await {
        Ok(response) => Ok(response
            .status
            .and_then(|s| s.volume_condition)
            .map_or(Observation::Silent, |c| {
                Observation::Reported(model::condition_of(c.abnormal, &c.message))
            })),
        Err(error) if error.code() == Some(Code::NotFound) => Ok(Observation::Missing {
            how: "ControllerGetVolume answered NotFound",
        }),
        Err(error) => Err(error),
    }
}

/// Publishes the event on the PVC (if there is one), then records the
/// condition on the PV. `Err` only when the event did not go out: a failed
/// annotation is written again after the next check, never the event.
/// The earlier event about the claim that already says what
/// `announcement` would (external-health-monitor's before a migration, or
/// volplane's own), read from the claim's events; `None` when there is
/// none or they cannot be read (then the announcement is made).
async fn earlier_announcement(
    pvs: &Api<PersistentVolume>,
    volume: &Watched,
    announcement: &Announcement,
) -> Option<model::EarlierEvent> {
    let events: Api<CoreEvent> = Api::namespaced(pvs.clone().into_client(), &volume.namespace);
    let selector = format!(
        "involvedObject.kind=PersistentVolumeClaim,involvedObject.name={}",
        volume.claim
    );
    let listed = match events.list(&ListParams::default().fields(&selector)).await {
        Ok(listed) => listed.items,
        Err(error) => {
            debug!(claim = %volume.claim, %error, "cannot read the claim's events; announcing");
            return None;
        }
    };
    let earlier: Vec<model::EarlierEvent> = listed
        .into_iter()
        .filter_map(|e| {
            let at = [
                e.series
                    .as_ref()
                    .and_then(|s| s.last_observed_time.as_ref())
                    .map(|t| t.0),
                e.event_time.as_ref().map(|t| t.0),
                e.last_timestamp.as_ref().map(|t| t.0),
                e.first_timestamp.as_ref().map(|t| t.0),
            ]
            .into_iter()
            .flatten()
            .max()?;
            Some(model::EarlierEvent {
                reason: e.reason?,
                message: e.message.unwrap_or_default(),
                at: SystemTime::from(at),
                by: e
                    .reporting_component
                    .filter(|c| !c.is_empty())
                    .or_else(|| e.source.and_then(|s| s.component))
                    .unwrap_or_default(),
            })
        })
        .collect();
    model::already_announced(announcement, &earlier, SystemTime::now()).cloned()
}

async fn announce(
    recorder: &Recorder,
    leadership: &Leadership,
    pvs: &Api<PersistentVolume>,
    volume: &Watched,
    condition: &Condition,
    announcement: Option<&Announcement>,
    metrics: &HealthMetrics,
) -> Result<(), Error> {
    let earlier = match announcement {
        Some(announcement) => earlier_announcement(pvs, volume, announcement).await,
        None => None,
    };
    if let (Some(announcement), Some(earlier)) = (announcement, &earlier) {
        info!(pv = %volume.pv, namespace = %volume.namespace, claim = %volume.claim, reason = announcement.reason,
              by = %earlier.by, "already announced within the hour; recorded without a second event");
    }
    if let Some(announcement) = announcement.filter(|_| earlier.is_none()) {
        let type_ = if announcement.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let pv = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolume".into()),
            name: Some(volume.pv.clone()),
            ..ObjectReference::default()
        };
        let event = events::Announcement::new(
            type_,
            announcement.reason,
            "CheckVolumeHealth",
            announcement.note.clone(),
        )
        .related_to(pv);
        match events::publish(recorder, leadership, &event, &volume.claim_reference()).await {
            Ok(Published::Sent) => {
                metrics
                    .events
                    .get_or_create(&vec![("reason", announcement.reason)])
                    .inc();
            }
            Ok(Published::NotLeading) => return Err(Error::NotLeader(NotLeader)),
            Err(source) => {
                return Err(Error::Event {
                    namespace: volume.namespace.clone(),
                    claim: volume.claim.clone(),
                    source,
                });
            }
        }
    }
    let patch = Patch::Merge(model::annotation_patch(condition));
    match leadership
        .guard(pvs.patch(&volume.pv, &PatchParams::default(), &patch))
        .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            warn!(pv = %volume.pv, %error, "cannot record the announced condition on the PV; retried after the next check")
        }
        // Not leading any more: the next leader judges from the annotation.
        Err(_) if announcement.is_none() => {}
        Err(error) => warn!(pv = %volume.pv, %error, "term ended before the PV annotation was written"),
    }
    Ok(())
}
