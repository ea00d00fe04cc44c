//! The capacity controller's I/O: watches its inputs, runs the work queue,
//! calls GetCapacity and writes CSIStorageCapacity objects.
//!
//! One task owns all state (no locks): it reacts to watch events and to
//! finished work, and hands due work items to at most `workers` concurrent
//! refresh futures, each of which calls GetCapacity once and writes at most
//! one object.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, CSIStorageCapacity, StorageClass};
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use volplane_csi::{CapacityQuery, CsiClient};
use volplane_runtime::events::{self, Announcement};
use volplane_runtime::{Backoff, Leadership, Readiness, control_loop, phase};

use crate::error::{Error, Result};
use crate::metrics::CapacityMetrics;
use crate::model::{self, Enablement, Labels, ObjectIdentity, PublishedCapacity, Segment, Tracking, WorkItem};
use crate::queue::{self, WorkQueue};

/// Where segments come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// From CSINodes and Node labels (central mode, driver with topology).
    Central,
    /// One fixed segment (per-node mode, or a driver without topology).
    Fixed(Segment),
}

/// Everything the controller needs to know up front.
#[derive(Clone, Debug)]
pub struct CapacityConfig {
    /// The CSI driver name (StorageClass `provisioner`, PV `spec.csi.driver`).
    pub driver: String,
    /// Send the segment as `accessible_topology` (driver has VOLUME_ACCESSIBILITY_CONSTRAINTS).
    pub send_topology: bool,
    /// Where segments come from.
    pub topology: Topology,
    /// Namespace, labels and owner of the objects.
    pub identity: ObjectIdentity,
    /// How often each item is refreshed.
    pub poll_interval: Duration,
    /// Concurrent refreshes.
    pub workers: usize,
    /// Include Immediate-binding classes.
    pub include_immediate: bool,
    /// What turns publishing on: the CSIDriver's `storageCapacity`, or always.
    pub enablement: Enablement,
    /// Retry delays after failures.
    pub backoff: Backoff,
    /// Where Warning events go (the owner), if anywhere.
    pub event_target: Option<ObjectReference>,
    /// `reportingInstance` of events.
    pub instance: String,
}

/// The capacity controller. It watches whether or not it leads; it calls
/// the driver and writes only while `leadership` allows.
pub struct CapacityController {
    client: kube::Client,
    csi: CsiClient,
    config: Arc<CapacityConfig>,
    metrics: Arc<CapacityMetrics>,
    leadership: Leadership,
    ready: Readiness,
}

impl std::fmt::Debug for CapacityController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapacityController")
            .field("config", &self.config)
            .finish()
    }
}

enum Signal {
    /// A store behind segments or classes changed (`synced`: its initial list finished).
    Inputs {
        source: &'static str,
        synced: bool,
    },
    Capacity(Box<Event<CSIStorageCapacity>>),
    Volume(Box<Event<PersistentVolume>>),
    WatchFailed {
        source: &'static str,
        error: String,
    },
}

enum Outcome {
    Written(Box<CSIStorageCapacity>, PublishedCapacity),
    Unchanged(PublishedCapacity),
}

impl Outcome {
    fn published(&self) -> PublishedCapacity {
        match self {
            Self::Written(_, value) | Self::Unchanged(value) => *value,
        }
    }
}

enum Done {
    Refresh(WorkItem, Result<Outcome>),
    Deleted(String, Result<()>),
}

/// A write of volplane's that the watch has not delivered yet.
#[derive(Clone, Debug)]
struct Unseen {
    name: String,
    /// The version the write created (opaque: only compared for equality).
    version: Option<String>,
    at: Instant,
}

/// How long a write may stay unseen before the watch is taken to have
/// missed it (it normally arrives within milliseconds).
const UNSEEN_LIMIT: Duration = Duration::from_secs(10);

/// Retries of a failed delete (at most 5 attempts).
const DELETE_RETRY: Backoff = Backoff {
    base: Duration::from_millis(400),
    max: Duration::from_millis(3200),
};

fn input_signal<K>(source: &'static str, event: std::result::Result<Event<K>, watcher::Error>) -> Option<Signal> {
    match event {
        Ok(Event::InitDone) => Some(Signal::Inputs { source, synced: true }),
        Ok(Event::Apply(_) | Event::Delete(_)) => Some(Signal::Inputs { source, synced: false }),
        Ok(Event::Init | Event::InitApply(_)) => None,
        Err(error) => Some(Signal::WatchFailed {
            source,
            error: error.to_string(),
        }),
    }
}

fn object_name(object: &CSIStorageCapacity) -> String {
    object.metadata.name.clone().unwrap_or_default()
}

impl CapacityController {
    /// A controller; nothing runs until [`CapacityController::run`].
    pub fn new(
        client: kube::Client,
        csi: CsiClient,
        config: CapacityConfig,
        metrics: Arc<CapacityMetrics>,
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

    /// Turns true once every watch listed and the first work was queued.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes, then waits for work in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut inputs = self.inputs();
        let mut signals = futures::stream::select_all(std::mem::take(&mut inputs.streams));
        let mut state = LoopState::new(self, inputs);
        let config = state.config.clone();
        info!(driver = %config.driver, namespace = %config.identity.namespace, managed_by = %config.identity.managed_by,
              poll_interval = ?config.poll_interval, workers = config.workers, "capacity controller starting");
        control_loop::run(&mut state, &mut signals, shutdown).await;
        Ok(())
    }

    /// The watches the loop follows: volplane's own objects, StorageClasses,
    /// PVs, the CSIDriver (when it switches tracking) and, in central mode,
    /// Nodes (metadata only) and CSINodes.
    fn inputs(&self) -> Inputs {
        let config = &self.config;
        let client = &self.client;
        let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), &config.identity.namespace);
        let (capacity_store, writer) = reflector::store();
        let selector = config.identity.selector();
        let capacity_signals = reflector::reflector(
            writer,
            watcher::watcher(capacities, watcher::Config::default().labels(&selector)),
        )
        .default_backoff()
        .map(|event| match event {
            Ok(event) => Signal::Capacity(Box::new(event)),
            Err(error) => Signal::WatchFailed {
                source: "capacities",
                error: error.to_string(),
            },
        })
        .boxed();
        let volume_signals = watcher::watcher(Api::<PersistentVolume>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .map(|event| match event {
                Ok(event) => Signal::Volume(Box::new(event)),
                Err(error) => Signal::WatchFailed {
                    source: "volumes",
                    error: error.to_string(),
                },
            })
            .boxed();
        let (class_store, class_signals) = input_watch(Api::all(client.clone()), watcher::Config::default(), "classes");
        let mut inputs = Inputs {
            streams: vec![capacity_signals, class_signals, volume_signals],
            required: ["capacities", "classes", "volumes"].into(),
            capacity_store,
            class_store,
            driver_store: None,
            topology_stores: None,
        };
        if config.enablement == Enablement::CsiDriver {
            let by_name = watcher::Config::default().fields(&format!("metadata.name={}", config.driver));
            let (store, signals) = input_watch(Api::all(client.clone()), by_name, "csidriver");
            inputs.add("csidriver", signals);
            inputs.driver_store = Some(store);
        }
        if config.topology == Topology::Central {
            // Metadata only: node labels are all the segments need.
            let (nodes, signals) = input_watch(Api::all(client.clone()), watcher::Config::default(), "nodes");
            inputs.add("nodes", signals);
            let (csinodes, signals) = input_watch(Api::all(client.clone()), watcher::Config::default(), "csinodes");
            inputs.add("csinodes", signals);
            inputs.topology_stores = Some((nodes, csinodes));
        }
        inputs
    }
}

/// The watches behind the loop: their stores, and their events as signals.
struct Inputs {
    streams: Vec<BoxStream<'static, Signal>>,
    /// Sources whose first list must be done before the loop acts.
    required: BTreeSet<&'static str>,
    capacity_store: Store<CSIStorageCapacity>,
    class_store: Store<StorageClass>,
    driver_store: Option<Store<CSIDriver>>,
    topology_stores: Option<(Store<PartialObjectMeta<Node>>, Store<CSINode>)>,
}

impl Inputs {
    fn add(&mut self, source: &'static str, signals: BoxStream<'static, Signal>) {
        self.required.insert(source);
        self.streams.push(signals);
    }
}

/// A cached watch of `K` whose events are input signals from `source`.
fn input_watch<K>(api: Api<K>, config: watcher::Config, source: &'static str) -> (Store<K>, BoxStream<'static, Signal>)
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let signals = reflector::reflector(writer, watcher::watcher(api, config))
        .default_backoff()
        .filter_map(move |event| async move { input_signal(source, event) })
        .boxed();
    (store, signals)
}

struct LoopState {
    api: Api<CSIStorageCapacity>,
    csi: CsiClient,
    config: Arc<CapacityConfig>,
    metrics: Arc<CapacityMetrics>,
    recorder: Recorder,
    capacity_store: Store<CSIStorageCapacity>,
    class_store: Store<StorageClass>,
    topology_stores: Option<(Store<PartialObjectMeta<Node>>, Store<CSINode>)>,
    /// The driver's CSIDriver object (`--capacity-enablement csidriver`).
    driver_store: Option<Store<CSIDriver>>,
    /// Whether capacity is tracked, as last announced.
    tracking: Option<Tracking>,
    /// Items whose maximum volume size was reported above their capacity (said once).
    oversized: HashSet<WorkItem>,
    required: BTreeSet<&'static str>,
    synced_sources: BTreeSet<&'static str>,
    synced: bool,
    items: BTreeSet<WorkItem>,
    parameters: BTreeMap<String, Labels>,
    /// The object standing for each item, as the watch last delivered it;
    /// nothing else writes here.
    objects: BTreeMap<WorkItem, CSIStorageCapacity>,
    /// Volplane's own writes the watch has not delivered yet, per item.
    unseen: HashMap<WorkItem, Unseen>,
    /// Items that came due while their write was unseen: run once it is seen.
    deferred: HashSet<WorkItem>,
    deleting: HashSet<String>,
    volumes: HashSet<String>,
    queue: WorkQueue<WorkItem>,
    refreshing: usize,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
    last_warning: HashMap<WorkItem, Instant>,
    start: Instant,
    leadership: Leadership,
    /// Whether writes were allowed when last looked at.
    leading: bool,
    ready: Readiness,
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Done;

    fn before_wait(&mut self) -> Option<Instant> {
        self.follow_leadership();
        self.dispatch();
        self.update_gauges();
        // Due work waits while another instance leads, and while every
        // worker is busy: a finished refresh wakes the loop then (a timer
        // already due would spin it).
        self.queue.next_due().filter(|_| self.leading && self.has_free_worker())
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
            "capacity controller stopping; finishing work in flight"
        );
    }

    fn finished_on_shutdown(&mut self, done: Done) {
        self.finished_on_shutdown(done);
    }
}

impl LoopState {
    fn new(controller: CapacityController, inputs: Inputs) -> Self {
        let config = controller.config;
        let recorder = Recorder::new(
            controller.client.clone(),
            Reporter {
                controller: "volplane-capacity".into(),
                instance: Some(config.instance.clone()),
            },
        );
        Self {
            api: Api::namespaced(controller.client, &config.identity.namespace),
            csi: controller.csi,
            metrics: controller.metrics,
            recorder,
            capacity_store: inputs.capacity_store,
            class_store: inputs.class_store,
            topology_stores: inputs.topology_stores,
            driver_store: inputs.driver_store,
            tracking: None,
            oversized: HashSet::new(),
            required: inputs.required,
            synced_sources: BTreeSet::new(),
            synced: false,
            items: BTreeSet::new(),
            parameters: BTreeMap::new(),
            objects: BTreeMap::new(),
            unseen: HashMap::new(),
            deferred: HashSet::new(),
            deleting: HashSet::new(),
            volumes: HashSet::new(),
            queue: WorkQueue::default(),
            refreshing: 0,
            tasks: FuturesUnordered::new(),
            last_warning: HashMap::new(),
            start: Instant::now(),
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            config,
        }
    }

    /// Notices a change of leadership. A new leader first settles what
    /// was skipped while following: obsolete objects go, missing ones are
    /// created, and every item is refreshed (the work queue kept them).
    fn follow_leadership(&mut self) {
        let leading = self.leadership.may_write();
        if leading == self.leading {
            return;
        }
        self.leading = leading;
        if leading {
            info!("leading: publishing capacity");
            if self.synced {
                self.recompute_items();
                self.resync_objects();
            }
        } else {
            info!(
                in_flight = self.tasks.len(),
                "not leading: no GetCapacity calls and no writes"
            );
        }
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Inputs { source, synced } => {
                if synced {
                    self.synced_sources.insert(source);
                }
                if self.synced {
                    self.recompute_items();
                } else {
                    self.try_initial_sync();
                }
            }
            Signal::Capacity(event) => match *event {
                Event::InitDone => {
                    self.synced_sources.insert("capacities");
                    if self.synced {
                        self.resync_objects();
                    } else {
                        self.try_initial_sync();
                    }
                }
                Event::Apply(object) if self.synced => self.on_object(object),
                Event::Delete(object) if self.synced => self.on_object_deleted(&object),
                _ => {}
            },
            Signal::Volume(event) => self.on_volume(*event),
            Signal::WatchFailed { source, error } => {
                warn!(source, %error, "watch failed; retrying with backoff");
            }
        }
    }

    fn try_initial_sync(&mut self) {
        if self.synced || !self.required.is_subset(&self.synced_sources) {
            return;
        }
        self.synced = true;
        self.recompute_items();
        self.resync_objects();
        info!(
            items = self.items.len(),
            objects = self.objects.len(),
            "capacity controller synced"
        );
        self.ready.mark_ready();
    }

    fn segments(&self) -> BTreeSet<Segment> {
        match (&self.config.topology, &self.topology_stores) {
            (Topology::Fixed(segment), _) => [segment.clone()].into(),
            (Topology::Central, Some((nodes, csinodes))) => {
                let labels: HashMap<String, Labels> = nodes
                    .state()
                    .iter()
                    .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                    .collect();
                let csinodes = csinodes.state();
                model::central_segments(&self.config.driver, csinodes.iter().map(|c| c.as_ref()), |name| {
                    labels.get(name)
                })
            }
            (Topology::Central, None) => BTreeSet::new(),
        }
    }

    /// Follows the enablement switch: says so once per change (log, metric,
    /// events on the owner and the CSIDriver), and returns whether to publish.
    fn follow_tracking(&mut self) -> bool {
        let csidriver = self
            .driver_store
            .as_ref()
            .and_then(|store| store.state().into_iter().next());
        let tracking = model::tracking(self.config.enablement, csidriver.as_deref());
        if self.tracking == Some(tracking) {
            return tracking.enabled();
        }
        let first = self.tracking.is_none();
        self.tracking = Some(tracking);
        self.metrics.enabled.set(i64::from(tracking.enabled()));
        let explanation = tracking.explanation(&self.config.driver);
        if tracking.enabled() {
            info!(enablement = ?self.config.enablement, "{explanation}");
        } else {
            warn!(enablement = ?self.config.enablement, "{explanation}");
        }
        // Turning on at startup is the normal case: no event for it.
        if first && tracking.enabled() {
            return true;
        }
        let type_ = if tracking.enabled() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let announcement = Announcement::new(type_, tracking.reason(), "Enablement", explanation);
        let on_driver = csidriver.map(|object| object.object_ref(&()));
        events::publish_in_background(
            &self.recorder,
            &self.leadership,
            &announcement,
            self.config.event_target.clone().into_iter().chain(on_driver),
        );
        tracking.enabled()
    }

    fn recompute_items(&mut self) {
        let tracked = self.follow_tracking();
        let parameters: BTreeMap<String, Labels> = self
            .class_store
            .state()
            .iter()
            .filter_map(|class| {
                let params = model::capacity_parameters(class, &self.config.driver, self.config.include_immediate)?;
                Some((class.metadata.name.clone()?, params))
            })
            .collect();
        // Switched off, nothing is desired: every object goes, no GetCapacity calls.
        let items = if tracked {
            model::work_items(&self.segments(), parameters.keys())
        } else {
            BTreeSet::new()
        };
        let now = Instant::now();
        for item in items.difference(&self.items) {
            debug!(%item, "new work item");
            self.queue.schedule(item.clone(), now);
        }
        let removed: Vec<WorkItem> = self.items.difference(&items).cloned().collect();
        for item in removed {
            debug!(%item, "work item gone");
            self.queue.forget(&item);
            self.last_warning.remove(&item);
            self.oversized.remove(&item);
            self.unseen.remove(&item);
            self.deferred.remove(&item);
            if let Some(object) = self.objects.remove(&item) {
                self.delete(&object);
            }
        }
        self.items = items;
        self.parameters = parameters;
    }

    /// After the capacity watch (re-)listed: the listed objects are mapped
    /// onto the items by [`model::reconcile_objects`]; what vanished
    /// meanwhile is re-created, what appeared is adopted or deleted, what
    /// changed is refreshed.
    fn resync_objects(&mut self) {
        let now = Instant::now();
        self.unseen.clear();
        for item in std::mem::take(&mut self.deferred) {
            self.queue.schedule(item, now);
        }
        let mut listed: Vec<CSIStorageCapacity> =
            self.capacity_store.state().iter().map(|o| o.as_ref().clone()).collect();
        let names: HashSet<String> = listed.iter().map(object_name).collect();
        // Deletes in flight stay; those whose object is gone are done.
        self.deleting.retain(|name| names.contains(name));
        listed.retain(|o| !self.deleting.contains(&object_name(o)));
        let plan = model::reconcile_objects(&self.items, &listed);
        let mut by_name: HashMap<String, CSIStorageCapacity> =
            listed.into_iter().map(|o| (object_name(&o), o)).collect();
        for name in &plan.delete {
            if let Some(object) = by_name.remove(name) {
                self.delete(&object);
            }
        }
        let previous = std::mem::take(&mut self.objects);
        for (item, name) in plan.adopt {
            let Some(object) = by_name.remove(&name) else {
                continue;
            };
            let refresh = match previous.get(&item) {
                Some(known) if object_name(known) == name => {
                    model::changed_by_others(known, &object, &self.config.identity)
                }
                _ => {
                    debug!(%item, %name, "adopting object");
                    true
                }
            };
            self.objects.insert(item.clone(), object);
            if refresh && !self.queue.is_in_flight(&item) {
                self.queue.schedule(item, now);
            }
        }
        for item in plan.missing {
            if previous.contains_key(&item) {
                info!(%item, "object deleted by someone else; re-creating");
            }
            self.queue.schedule(item, now);
        }
    }

    /// The watch delivered `object`. Our own writes are recognised by their
    /// version; until ours arrives, what comes before it is not taken for
    /// someone else's change.
    fn on_object(&mut self, object: CSIStorageCapacity) {
        let name = object_name(&object);
        if self.deleting.contains(&name) {
            return;
        }
        let Some(item) = model::item_of(&object).filter(|item| self.items.contains(item)) else {
            self.delete(&object);
            return;
        };
        let awaited = self.unseen.get(&item).is_some_and(|unseen| unseen.name == name);
        if self
            .unseen
            .get(&item)
            .is_some_and(|unseen| unseen.name == name && unseen.version == object.metadata.resource_version)
        {
            self.write_seen(&item);
        }
        match self.objects.get(&item) {
            Some(known) if object_name(known) == name => {
                let changed = !awaited && model::changed_by_others(known, &object, &self.config.identity);
                self.objects.insert(item.clone(), object);
                if changed && !self.queue.is_pending(&item) {
                    debug!(%item, %name, "object changed by someone else; refreshing");
                    self.queue.schedule(item, Instant::now());
                }
            }
            Some(_) => {
                debug!(%item, %name, "duplicate object");
                self.delete(&object);
            }
            None => {
                self.objects.insert(item.clone(), object);
                // An item in flight is usually creating this very object:
                // its result arrives next, no second run needed.
                if !awaited && !self.queue.is_in_flight(&item) {
                    debug!(%item, %name, "adopting object");
                    self.queue.schedule(item, Instant::now());
                }
            }
        }
    }

    /// The watch delivered our write for `item` (or it was deleted): a
    /// refresh that waited for it runs now.
    fn write_seen(&mut self, item: &WorkItem) {
        self.unseen.remove(item);
        if self.deferred.remove(item) {
            self.queue.schedule(item.clone(), Instant::now());
        }
    }

    /// Whether `item`'s last write is still on its way through the watch
    /// (a refresh now would write from a stale version). A write unseen for
    /// [`UNSEEN_LIMIT`] is given up on.
    fn awaits_watch(&mut self, item: &WorkItem, now: Instant) -> bool {
        match self.unseen.get(item) {
            Some(unseen) if now.duration_since(unseen.at) < UNSEEN_LIMIT => true,
            Some(unseen) => {
                warn!(%item, name = %unseen.name, "the watch has not delivered volplane's own write; refreshing anyway");
                self.unseen.remove(item);
                false
            }
            None => false,
        }
    }

    fn on_object_deleted(&mut self, object: &CSIStorageCapacity) {
        let name = object_name(object);
        self.deleting.remove(&name);
        let Some(item) = model::item_of(object) else {
            return;
        };
        if self.unseen.get(&item).is_some_and(|unseen| unseen.name == name) {
            self.write_seen(&item);
        }
        if self.objects.get(&item).is_some_and(|known| object_name(known) == name) {
            self.objects.remove(&item);
            if self.items.contains(&item) {
                info!(%item, %name, "object deleted by someone else; re-creating");
                self.queue.schedule(item, Instant::now());
            }
        }
    }

    fn on_volume(&mut self, event: Event<PersistentVolume>) {
        let ours = |pv: &PersistentVolume| {
            pv.spec.as_ref().and_then(|s| s.csi.as_ref()).map(|c| c.driver.as_str())
                == Some(self.config.driver.as_str())
        };
        match event {
            Event::InitApply(pv) if ours(&pv) => {
                self.volumes.insert(pv.metadata.name.clone().unwrap_or_default());
            }
            Event::InitDone => {
                self.synced_sources.insert("volumes");
                self.try_initial_sync();
            }
            Event::Apply(pv) if ours(&pv) => {
                let created = self.volumes.insert(pv.metadata.name.clone().unwrap_or_default());
                if created && self.synced {
                    self.refresh_for_volume(&pv, "created");
                }
            }
            Event::Delete(pv) if ours(&pv) => {
                self.volumes.remove(&pv.metadata.name.clone().unwrap_or_default());
                if self.synced {
                    self.refresh_for_volume(&pv, "deleted");
                }
            }
            _ => {}
        }
    }

    fn refresh_for_volume(&mut self, pv: &PersistentVolume, what: &str) {
        let now = Instant::now();
        for item in model::items_for_volume(pv, &self.config.driver, &self.items) {
            debug!(%item, pv = ?pv.metadata.name, what, "volume changed; refreshing");
            self.queue.schedule(item, now);
        }
    }

    fn delete(&mut self, object: &CSIStorageCapacity) {
        let name = object_name(object);
        // A follower leaves it to the leader (or to itself once it leads).
        if name.is_empty() || !self.leading || !self.deleting.insert(name.clone()) {
            return;
        }
        let api = self.api.clone();
        let leadership = self.leadership.clone();
        let metrics = self.metrics.clone();
        let params = DeleteParams {
            preconditions: object.metadata.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        info!(%name, "deleting obsolete CSIStorageCapacity");
        self.tasks.push(
            async move {
                let mut attempt = 0u32;
                let result = loop {
                    attempt += 1;
                    let Ok(deleted) = leadership.guard(api.delete(&name, &params)).await else {
                        break Err(Error::NotLeader(volplane_runtime::NotLeader));
                    };
                    match deleted {
                        Ok(_) => {
                            metrics.wrote("delete");
                            break Ok(());
                        }
                        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => break Ok(()),
                        Err(error) if attempt >= 5 => {
                            break Err(Error::Write {
                                verb: "delete",
                                source: error,
                            });
                        }
                        Err(error) => {
                            warn!(%name, %error, attempt, "delete failed; retrying");
                            tokio::time::sleep(DELETE_RETRY.delay(attempt)).await;
                        }
                    }
                };
                Done::Deleted(name, result)
            }
            .boxed(),
        );
    }

    fn has_free_worker(&self) -> bool {
        self.refreshing < self.config.workers.max(1)
    }

    fn dispatch(&mut self) {
        if !self.synced || !self.leading {
            return;
        }
        let now = Instant::now();
        while self.has_free_worker() {
            let Some(item) = self.queue.pop_due(now) else {
                break;
            };
            if self.awaits_watch(&item, now) {
                let until = self.unseen.get(&item).map_or(now, |unseen| unseen.at + UNSEEN_LIMIT);
                self.queue.finish(&item);
                self.queue.schedule(item.clone(), until);
                self.deferred.insert(item);
                continue;
            }
            let Some(parameters) = self
                .parameters
                .get(&item.class)
                .cloned()
                .filter(|_| self.items.contains(&item))
            else {
                self.queue.finish(&item);
                continue;
            };
            self.refreshing += 1;
            let current = self.objects.get(&item).cloned();
            let work = Refresh {
                api: self.api.clone(),
                csi: self.csi.clone(),
                config: self.config.clone(),
                metrics: self.metrics.clone(),
                leadership: self.leadership.clone(),
            };
            self.tasks.push(
                async move {
                    let result = work.run(&item, parameters, current).await;
                    Done::Refresh(item, result)
                }
                .boxed(),
            );
        }
    }

    fn finished(&mut self, done: Done) {
        match done {
            Done::Refresh(item, result) => self.refreshed(item, result),
            Done::Deleted(name, result) => {
                self.deleting.remove(&name);
                match result {
                    Ok(()) | Err(Error::NotLeader(_)) => {}
                    Err(error) => {
                        warn!(%name, %error, "cannot delete obsolete CSIStorageCapacity; will retry after the next re-list");
                    }
                }
            }
        }
    }

    /// The item's next regular poll.
    fn next_poll(&self, item: &WorkItem) -> Instant {
        let phase = phase::phase(&item.to_string(), self.config.poll_interval);
        queue::next_poll(Instant::now(), self.start, self.config.poll_interval, phase)
    }

    fn refreshed(&mut self, item: WorkItem, result: Result<Outcome>) {
        self.refreshing -= 1;
        self.queue.finish(&item);
        let desired = self.items.contains(&item);
        let next = match result {
            Ok(outcome) => {
                self.queue.succeeded(&item);
                self.last_warning.remove(&item);
                self.note_oversized(&item, outcome.published());
                if let Outcome::Written(object, _) = outcome {
                    self.wrote(&item, *object, desired);
                }
                self.next_poll(&item)
            }
            Err(Error::NotLeader(_)) => {
                // Cut off by a lost lease: done again once leading.
                debug!(%item, "refresh abandoned: not leading");
                Instant::now()
            }
            Err(error) if error.is_not_found() => {
                // Deleted behind our back between the watch event and the
                // write: the watch brings the deletion, which re-creates at
                // once; the next poll is the fallback.
                debug!(%item, "object gone before the write; waiting for the watch");
                self.next_poll(&item)
            }
            Err(error) => self.refresh_failed(&item, &error),
        };
        if desired {
            self.queue.schedule(item, next);
        }
    }

    /// A refresh wrote `object`: the watch will bring it back; until then
    /// it is awaited (or it is deleted at once when nobody needs it).
    fn wrote(&mut self, item: &WorkItem, object: CSIStorageCapacity, desired: bool) {
        let name = object_name(&object);
        let version = object.metadata.resource_version.clone();
        match self.objects.get(item) {
            _ if !desired => self.delete(&object),
            Some(known) if object_name(known) != name => self.delete(&object),
            // The watch was quicker than the response.
            Some(known) if known.metadata.resource_version == version => {}
            _ => {
                let unseen = Unseen {
                    name,
                    version,
                    at: Instant::now(),
                };
                self.unseen.insert(item.clone(), unseen);
            }
        }
    }

    /// Logs and counts a failed refresh and says when to retry: a permanent
    /// error waits for the next poll, others back off.
    fn refresh_failed(&mut self, item: &WorkItem, error: &Error) -> Instant {
        let failures = self.queue.failed(item);
        let retry_at = if error.is_permanent() {
            self.next_poll(item)
        } else {
            Instant::now() + self.config.backoff.delay(failures)
        };
        warn!(%item, error = %error, failures, permanent = error.is_permanent(),
              retry_in = ?retry_at.saturating_duration_since(Instant::now()),
              "capacity refresh failed; the published value stays");
        if error.is_announced() {
            self.warn_event(item, error);
        }
        retry_at
    }

    fn finished_on_shutdown(&mut self, done: Done) {
        if let Done::Refresh(item, Err(error)) = &done {
            warn!(%item, %error, "refresh failed during shutdown");
        }
    }

    /// A Warning event on the owner, at most once per item per poll interval.
    fn warn_event(&mut self, item: &WorkItem, error: &Error) {
        let Some(target) = self.config.event_target.clone() else {
            return;
        };
        let now = Instant::now();
        if self
            .last_warning
            .get(item)
            .is_some_and(|last| now.duration_since(*last) < self.config.poll_interval)
        {
            return;
        }
        self.last_warning.insert(item.clone(), now);
        let reason = match error {
            Error::Write { .. } => "CapacityRejected",
            _ => "GetCapacityFailed",
        };
        let announcement = Announcement::warning(reason, "GetCapacity", model::refresh_failure_note(item, error));
        events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
    }

    /// Says once per item that its maximum volume size exceeds its capacity
    /// (published as reported; the scheduler trusts the maximum).
    fn note_oversized(&mut self, item: &WorkItem, value: PublishedCapacity) {
        let oversized = value
            .maximum_volume_size
            .is_some_and(|maximum| maximum > value.capacity);
        if !oversized {
            self.oversized.remove(item);
        } else if self.oversized.insert(item.clone()) {
            info!(%item, capacity = value.capacity, maximum_volume_size = ?value.maximum_volume_size,
                  "the driver reports a maximum volume size above the available capacity; published as reported");
        }
    }

    fn update_gauges(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.desired.set(gauge(self.items.len()));
        self.metrics.current.set(gauge(self.objects.len()));
        self.metrics.obsolete.set(gauge(self.deleting.len()));
        self.metrics
            .queue_depth
            .set(gauge(self.queue.pending() + self.queue.in_flight()));
    }
}

/// One refresh: GetCapacity, then create or update the object if needed.
struct Refresh {
    api: Api<CSIStorageCapacity>,
    csi: CsiClient,
    config: Arc<CapacityConfig>,
    metrics: Arc<CapacityMetrics>,
    leadership: Leadership,
}

impl Refresh {
    async fn run(&self, item: &WorkItem, parameters: Labels, current: Option<CSIStorageCapacity>) -> Result<Outcome> {
        let query = CapacityQuery {
            parameters,
            topology: self.config.send_topology.then(|| item.segment.0.clone()),
        };
        let started = Instant::now();
        let report = self.csi.get_capacity(&query).await;
        let code = match &report {
            Ok(_) => "OK",
            Err(error) => error.label(),
        };
        self.metrics
            .get_capacity_seconds
            .get_or_create(&vec![("grpc_code", code.to_string())])
            .observe(started.elapsed().as_secs_f64());
        let report = report.map_err(Error::Csi)?;
        let value = PublishedCapacity {
            capacity: report.available_capacity,
            maximum_volume_size: report.maximum_volume_size,
        };
        match current {
            None => {
                let object = model::new_object(item, value, &self.config.identity);
                let created = self
                    .leadership
                    .guard(self.api.create(&PostParams::default(), &object))
                    .await?
                    .map_err(|source| Error::Write { verb: "create", source })?;
                self.metrics.wrote("create");
                debug!(%item, name = ?created.metadata.name, capacity = value.capacity, "created CSIStorageCapacity");
                Ok(Outcome::Written(Box::new(created), value))
            }
            Some(existing) => match model::updated_object(&existing, value, &self.config.identity) {
                None => Ok(Outcome::Unchanged(value)),
                Some(updated) => {
                    let name = object_name(&existing);
                    let replaced = self
                        .leadership
                        .guard(self.api.replace(&name, &PostParams::default(), &updated))
                        .await?
                        .map_err(|source| Error::Write { verb: "update", source })?;
                    self.metrics.wrote("update");
                    debug!(%item, %name, capacity = value.capacity, "updated CSIStorageCapacity");
                    Ok(Outcome::Written(Box::new(replaced), value))
                }
            },
        }
    }
}
