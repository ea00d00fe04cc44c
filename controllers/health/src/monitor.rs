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
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use volplane_csi::{CsiClient, CsiError};
use volplane_runtime::{Fed, Feed, Leadership, Readiness, control_loop, index, phase};

use crate::Error;
use crate::calls::{self, Announced, Writer};
use crate::metrics::HealthMetrics;
use crate::model::{Announcement, Condition, Observation, Watched};
use crate::node_watcher::NodeWatcher;
use crate::volumes::Volumes;

mod observe;

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

/// Announcements written at once.
const WRITERS: usize = 16;

enum Signal {
    Volume(Box<Event<PersistentVolume>>),
    Node(Box<Event<Node>>),
    Pod(Box<Event<Pod>>),
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
        result: Result<Announced, Error>,
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
        let streams = self.inputs();
        let mut state = LoopState::new(self);
        state.metrics.set_source(config.source.label());
        let mut signals = futures::stream::select_all(streams);
        info!(driver = %config.driver, source = ?config.source, node_watcher = ?config.node_failure_threshold,
              "health controller starting");
        control_loop::run(&mut state, &mut signals, shutdown).await;
    }
}

/// Watches every object of a kind, each event as a [`Signal`].
fn watch_all<K>(
    client: &kube::Client,
    source: &'static str,
    signal: fn(Box<Event<K>>) -> Signal,
) -> BoxStream<'static, Signal>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + 'static,
{
    index::watch_all(client, watcher::Config::default(), move |event| match event {
        Ok(event) => signal(Box::new(event)),
        Err(error) => Signal::WatchFailed(source, error.to_string()),
    })
}

impl HealthController {
    /// The watches the loop follows: PVs, and for the node watcher Nodes
    /// and Pods.
    fn inputs(&self) -> Vec<BoxStream<'static, Signal>> {
        let mut streams = vec![watch_all(&self.client, "volumes", Signal::Volume)];
        if self.config.node_failure_threshold.is_some() {
            streams.push(watch_all(&self.client, "nodes", Signal::Node));
            streams.push(watch_all(&self.client, "pods", Signal::Pod));
        }
        streams
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

/// When each volume is checked with ControllerGetVolume.
#[derive(Default)]
struct CheckTimes {
    due: BTreeSet<(Instant, String)>,
    next: HashMap<String, Instant>,
    checking: HashSet<String>,
}

impl CheckTimes {
    fn schedule(&mut self, pv: &str, at: Instant) {
        if let Some(old) = self.next.insert(pv.to_string(), at) {
            self.due.remove(&(old, pv.to_string()));
        }
        self.due.insert((at, pv.to_string()));
    }

    fn forget(&mut self, pv: &str) {
        if let Some(at) = self.next.remove(pv) {
            self.due.remove(&(at, pv.to_string()));
        }
    }

    fn clear(&mut self) {
        self.due.clear();
        self.next.clear();
    }

    fn first_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The first volume due by `now`, taken off the schedule.
    fn take_due(&mut self, now: Instant) -> Option<String> {
        let (at, pv) = self.due.first().cloned().filter(|(at, _)| *at <= now)?;
        self.due.remove(&(at, pv.clone()));
        self.next.remove(&pv);
        Some(pv)
    }
}

/// Announcements waiting for a writer, and the PVs being written.
#[derive(Default)]
struct Writes {
    /// `None`: only the annotation is behind (its patch failed after the
    /// event went out).
    queued: BTreeMap<String, (Watched, Condition, Option<Announcement>)>,
    writing: HashSet<String>,
}

struct LoopState {
    config: Arc<HealthConfig>,
    csi: CsiClient,
    writer: Writer,
    metrics: Arc<HealthMetrics>,
    leadership: Leadership,
    leading: bool,
    ready: Readiness,
    volume_feed: Feed,
    volumes: Volumes,
    node_watcher: Option<NodeWatcher>,
    writes: Writes,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
    /// `None` once the source turned out unusable (Unimplemented).
    source: Option<Source>,
    next_sweep: Option<Instant>,
    sweeping: bool,
    checks: CheckTimes,
}

impl LoopState {
    fn new(controller: HealthController) -> Self {
        let config = controller.config;
        let recorder = Recorder::new(
            controller.client.clone(),
            Reporter {
                controller: crate::model::REPORTING_CONTROLLER.into(),
                instance: Some(config.instance.clone()),
            },
        );
        let writer = Writer {
            recorder,
            leadership: controller.leadership.clone(),
            pvs: Api::all(controller.client),
            metrics: controller.metrics.clone(),
            driver: config.driver.as_str().into(),
        };
        Self {
            csi: controller.csi,
            writer,
            volume_feed: Feed::new("volumes"),
            volumes: Volumes::new(config.driver.clone(), controller.metrics.clone()),
            node_watcher: config.node_failure_threshold.map(NodeWatcher::new),
            metrics: controller.metrics,
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            writes: Writes::default(),
            tasks: FuturesUnordered::new(),
            source: Some(config.source.clone()),
            next_sweep: None,
            sweeping: false,
            checks: CheckTimes::default(),
            config,
        }
    }

    /// Whether every index is a complete view: no decision is taken before.
    fn is_current(&self) -> bool {
        self.volume_feed.is_current() && self.node_watcher.as_ref().is_none_or(NodeWatcher::is_current)
    }

    fn follow_leadership(&mut self) {
        let leading = self.leadership.may_write();
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        if leading {
            info!("leading: checking volume health");
            self.next_sweep = Some(Instant::now());
            if let Some(watcher) = &mut self.node_watcher {
                watcher.new_term();
            }
        } else {
            info!("not leading: no driver calls and no writes");
        }
    }

    fn signal(&mut self, signal: Signal) {
        let fed = match signal {
            Signal::Volume(event) => {
                let fed = self.volume_feed.feed(*event, &mut self.volumes);
                self.follow_volumes();
                fed
            }
            Signal::Node(event) => match &mut self.node_watcher {
                Some(watcher) => watcher.node_feed.feed(*event, &mut watcher.nodes),
                None => return,
            },
            Signal::Pod(event) => match &mut self.node_watcher {
                Some(watcher) => watcher.pod_feed.feed(*event, &mut watcher.pods),
                None => return,
            },
            Signal::WatchFailed(source, error) => {
                warn!(source, %error, "watch failed; retrying with backoff");
                return;
            }
        };
        if let Some(watcher) = &mut self.node_watcher
            && !matches!(fed, Fed::Listing | Fed::Unnamed)
        {
            watcher.changed();
        }
        if matches!(fed, Fed::Listed { .. }) && self.is_current() && self.ready.mark_ready() {
            info!(volumes = self.volumes.len(), "health controller synced");
        }
    }

    /// Schedules the volumes that started being watched and drops
    /// everything pending for those that stopped.
    fn follow_volumes(&mut self) {
        let (started, stopped) = self.volumes.take_changes();
        for pv in stopped {
            self.writes.queued.remove(&pv);
            self.checks.forget(&pv);
        }
        if let Some(Source::GetVolume { interval, .. }) = &self.source {
            let now = Instant::now();
            for pv in started {
                self.checks.schedule(&pv, now + phase::phase(&pv, *interval));
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        if !self.leading || !self.is_current() {
            return None;
        }
        let mut wake: Vec<Instant> = Vec::new();
        if matches!(self.source, Some(Source::ListVolumes { .. })) && !self.sweeping {
            wake.extend(self.next_sweep);
        }
        if let Some(Source::GetVolume { workers, .. }) = &self.source
            && self.checks.checking.len() < *workers
        {
            wake.extend(self.checks.first_due());
        }
        wake.extend(self.node_watcher.as_ref().and_then(NodeWatcher::due));
        wake.into_iter().min()
    }

    fn dispatch(&mut self) {
        if !self.leading || !self.is_current() {
            return;
        }
        let now = Instant::now();
        match self.source.clone() {
            Some(Source::ListVolumes { page_size, .. })
                if !self.sweeping && self.next_sweep.is_some_and(|at| at <= now) =>
            {
                self.start_sweep(page_size);
            }
            Some(Source::GetVolume { interval, workers }) => self.start_checks(now, interval, workers),
            Some(Source::ListVolumes { .. }) | None => {}
        }
        if let Some(watcher) = &mut self.node_watcher {
            let notes = watcher.check_if_due(&self.volumes, now);
            let failed = watcher.failed_nodes();
            for (volume, note) in notes {
                self.publish_node_note(volume, note);
            }
            self.metrics.failed_nodes.set(i64::try_from(failed).unwrap_or(i64::MAX));
        }
        self.write_queued();
    }

    fn start_sweep(&mut self, page_size: i32) {
        self.sweeping = true;
        self.next_sweep = None;
        let csi = self.csi.clone();
        self.tasks.push(
            async move {
                let started = Instant::now();
                let result = calls::sweep(&csi, page_size).await;
                Done::Sweep { started, result }
            }
            .boxed(),
        );
    }

    fn start_checks(&mut self, now: Instant, interval: Duration, workers: usize) {
        while self.checks.checking.len() < workers {
            let Some(pv) = self.checks.take_due(now) else {
                break;
            };
            let Some(watched) = self.volumes.get(&pv).cloned() else {
                continue;
            };
            // The next check is one interval after this one starts.
            self.checks.schedule(&pv, now + interval);
            self.checks.checking.insert(pv.clone());
            let csi = self.csi.clone();
            self.tasks.push(
                async move {
                    let result = calls::check(&csi, &watched.volume_handle).await;
                    Done::Check { pv, result }
                }
                .boxed(),
            );
        }
    }

    fn finished(&mut self, done: Done) {
        match done {
            Done::Sweep { started, result } => self.swept(started, result),
            Done::Check { pv, result } => self.checked(pv, result),
            Done::Announced { pv, condition, result } => {
                self.writes.writing.remove(&pv);
                match result {
                    Ok(Announced::Written) => self.volumes.set_announced(pv, condition),
                    Ok(Announced::PvGone) => {
                        debug!(%pv, "the PV is gone; nothing announced (the watch forgets it)");
                    }
                    Err(error) => warn!(%pv, %error, "cannot announce the volume condition; the next check retries"),
                }
            }
            Done::Noted => {}
        }
    }

    /// A ControllerGetVolume check of `pv` ended.
    fn checked(&mut self, pv: String, result: Result<Observation, CsiError>) {
        self.checks.checking.remove(&pv);
        let Some(volume) = self.volumes.get(&pv).cloned() else {
            return;
        };
        if !self.is_current() {
            // Judged against a view that is being re-listed: check again
            // as soon as the list ends.
            self.checks.schedule(&pv, Instant::now());
            return;
        }
        match result {
            Ok(observation) => self.observe(&volume, &observation),
            Err(error) if error.is_unimplemented() => self.unusable(&error),
            Err(error) => {
                self.metrics.checked("error");
                warn!(%pv, %error, "ControllerGetVolume failed; the condition stays as it was");
            }
        }
    }
}
