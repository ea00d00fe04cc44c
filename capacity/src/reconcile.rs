//! The capacity controller's I/O: follows its watches, runs the work queue,
//! calls GetCapacity and writes CSIStorageCapacity objects.
//!
//! One task owns all state (no locks): it reacts to watch events and to
//! finished work, and hands due work items to at most `workers` concurrent
//! tasks. Items that ask the driver the same question — one segment,
//! classes with equal parameters — share one GetCapacity call; each item
//! then writes its own object only if its value changed.
//!
//! What it keeps per object is a [`KnownObject`] of about a hundred bytes;
//! segments come from an incremental [`TopologyIndex`], so a Node event
//! costs work for that node only.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher::Event;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use volplane_csi::{CapacityQuery, CapacityReport, CsiClient};
use volplane_runtime::events::{self, Announcement};
use volplane_runtime::work_queue::{self, WorkQueue};
use volplane_runtime::{Backoff, Leadership, Readiness, control_loop, phase};

use crate::adopt::{Appeared, Gate, Stage};
use crate::error::{Error, Result};
use crate::inputs::{Inputs, NodeLabels, Signal};
use crate::metrics::CapacityMetrics;
use crate::model::{
    self, CapacityObject, Enablement, Existing, KnownObject, Labels, ObjectIdentity, PublishedCapacity, Segment,
    Tracking, VolumeObject, WorkItem,
};
use crate::topology::{Applied, KeySet, Segments, TopologyIndex};

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
    /// Refresh the items of a PV's class and segment when it is created or
    /// deleted (central mode: one cluster-wide PV watch). A per-node
    /// instance leaves it off and polls its local driver instead, so the
    /// API server is not asked for every PV once per node.
    pub volume_events: bool,
    /// Namespace, labels and owner of the objects.
    pub identity: ObjectIdentity,
    /// How often each item is refreshed.
    pub poll_interval: Duration,
    /// Concurrent driver calls and writes.
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
    /// The `managed-by` value of csi-provisioner's objects to take over
    /// (`--capacity-adopt external-provisioner`), if any.
    pub adopt_from: Option<String>,
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

/// One GetCapacity question: items with equal ones share the answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Query {
    segment: Segment,
    parameters: Arc<Labels>,
}

/// A write of one item's object that succeeded.
struct Written {
    name: String,
    version: Option<String>,
}

enum Done {
    Answered(Query, std::result::Result<CapacityReport, volplane_csi::CsiError>),
    Wrote(WorkItem, PublishedCapacity, Result<Written>),
    Deleted(String, Result<()>),
}

/// What is known of one of volplane's objects, as the watch last delivered it.
#[derive(Clone, Debug)]
struct Stored {
    /// The item its shape stands for.
    item: Option<WorkItem>,
    object: KnownObject,
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

/// Warning events about one item are at least this far apart, however
/// often it is polled (a per-node instance polls every few seconds).
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Polls fall into this many slots per interval: the items of one slot are
/// asked together, concurrently, which costs the process far less than
/// waking up for each item alone, while the slots still spread the polls
/// over the interval.
const POLL_SLOTS: u32 = 64;

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
        let mut inputs = Inputs::watch(&self.client, &self.config, self.config.volume_events);
        let mut signals = futures::stream::select_all(std::mem::take(&mut inputs.streams));
        let mut state = LoopState::new(self, inputs);
        let config = state.config.clone();
        info!(driver = %config.driver, namespace = %config.identity.namespace, managed_by = %config.identity.managed_by,
              poll_interval = ?config.poll_interval, workers = config.workers, "capacity controller starting");
        control_loop::run(&mut state, &mut signals, shutdown).await;
        Ok(())
    }
}

/// A watched collection's list in progress: the names it delivered so far.
#[derive(Debug, Default)]
struct Relist(Option<HashSet<String>>);

impl Relist {
    fn start(&mut self) {
        self.0 = Some(HashSet::new());
    }

    fn saw(&mut self, name: &str) {
        if let Some(names) = &mut self.0 {
            names.insert(name.to_string());
        }
    }

    /// The list is done: the names it did not deliver are gone.
    fn gone<'a>(&mut self, known: impl Iterator<Item = &'a str>) -> Vec<String> {
        let listed = self.0.take().unwrap_or_default();
        known.filter(|n| !listed.contains(*n)).map(str::to_string).collect()
    }
}

struct LoopState {
    client: kube::Client,
    api: Api<CapacityObject>,
    csi: CsiClient,
    config: Arc<CapacityConfig>,
    metrics: Arc<CapacityMetrics>,
    recorder: Recorder,
    class_store: Store<StorageClass>,
    /// The driver's CSIDriver object (`--capacity-enablement csidriver`).
    driver_store: Option<Store<CSIDriver>>,
    segments: Segments,
    /// (Re)starts the Node watch with the topology keys to keep.
    node_keys: Option<watch::Sender<Option<KeySet>>>,
    nodes_relist: Relist,
    csinodes_relist: Relist,
    /// Whether capacity is tracked, as last announced.
    tracking: Option<Tracking>,
    /// The classes published for, with their GetCapacity parameters (none
    /// while tracking is off).
    classes: BTreeMap<Arc<str>, Arc<Labels>>,
    /// Items whose maximum volume size was reported above their capacity (said once).
    oversized: HashSet<WorkItem>,
    required: BTreeSet<&'static str>,
    synced_sources: BTreeSet<&'static str>,
    synced: bool,
    /// Watches listing again after their first list: no decision (no
    /// write, no driver call) until every one has ended.
    relisting: BTreeSet<&'static str>,
    /// volplane's objects by name, as the watch delivered them.
    store: HashMap<String, Stored>,
    /// The objects of a list in progress.
    listing: Option<HashMap<String, Stored>>,
    /// The object (by name) standing for each item.
    objects: HashMap<WorkItem, String>,
    /// Volplane's own writes the watch has not delivered yet, per item.
    unseen: HashMap<WorkItem, Unseen>,
    /// Items that came due while their write was unseen: run once it is seen.
    deferred: HashSet<WorkItem>,
    deleting: HashSet<String>,
    /// The driver's PVs by the hash of their name (to tell a new PV from
    /// an update), with the items a change of the PV refreshes (also when
    /// a re-list finds it gone).
    volumes: HashMap<u64, Box<[WorkItem]>>,
    volumes_listing: Option<HashMap<u64, Box<[WorkItem]>>>,
    hasher: RandomState,
    queue: WorkQueue<WorkItem>,
    /// Questions in flight and the items waiting for each answer.
    asking: HashMap<Query, Vec<WorkItem>>,
    /// Driver calls and writes in flight.
    busy: usize,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
    last_warning: HashMap<WorkItem, Instant>,
    start: Instant,
    leadership: Leadership,
    /// Whether writes were allowed when last looked at.
    leading: bool,
    ready: Readiness,
    /// csi-provisioner's objects for the driver (`--capacity-adopt`), by name.
    incumbents: HashMap<String, Stored>,
    incumbents_listing: Option<HashMap<String, Stored>>,
    /// The incumbent object (by name) standing for each item.
    incumbent_items: HashMap<WorkItem, String>,
    /// When they may be adopted; `None` without `--capacity-adopt`.
    gate: Option<Gate>,
    /// The incumbent was said to be still running (once per period).
    incumbent_reported: bool,
    /// Takeover writes in flight: item → the object's name.
    adopting: HashMap<WorkItem, String>,
    /// Other controllers' (or nobody's) objects for the driver, reported once each.
    foreign: HashSet<String>,
    foreign_listing: Option<HashSet<String>>,
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Done;

    fn before_wait(&mut self) -> Option<Instant> {
        self.follow_leadership();
        self.follow_gate();
        self.dispatch();
        self.update_gauges();
        // Due work waits while another instance leads, and while every
        // worker is busy: a finished task wakes the loop then (a timer
        // already due would spin it).
        let work = self.queue.next_due().filter(|_| self.leading && self.has_free_worker());
        let gate = self
            .gate
            .as_ref()
            .filter(|_| self.leading && self.may_decide())
            .and_then(Gate::next_wake);
        work.into_iter().chain(gate).min()
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
        match done {
            Done::Answered(query, Err(error)) => {
                warn!(segment = %query.segment, %error, "GetCapacity failed during shutdown");
            }
            Done::Wrote(item, _, Err(error)) => warn!(%item, %error, "write failed during shutdown"),
            _ => {}
        }
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
        let segments = match &config.topology {
            Topology::Fixed(segment) => Segments::Fixed(segment.clone()),
            Topology::Central => Segments::Central(TopologyIndex::new(&config.driver)),
        };
        Self {
            api: Api::namespaced(controller.client.clone(), &config.identity.namespace),
            client: controller.client,
            csi: controller.csi,
            metrics: controller.metrics,
            recorder,
            class_store: inputs.classes,
            driver_store: inputs.driver,
            segments,
            node_keys: inputs.node_keys,
            nodes_relist: Relist::default(),
            csinodes_relist: Relist::default(),
            tracking: None,
            classes: BTreeMap::new(),
            oversized: HashSet::new(),
            required: inputs.required,
            synced_sources: BTreeSet::new(),
            synced: false,
            relisting: BTreeSet::new(),
            store: HashMap::new(),
            listing: None,
            objects: HashMap::new(),
            unseen: HashMap::new(),
            deferred: HashSet::new(),
            deleting: HashSet::new(),
            volumes: HashMap::new(),
            volumes_listing: None,
            hasher: RandomState::new(),
            queue: WorkQueue::default(),
            asking: HashMap::new(),
            busy: 0,
            tasks: FuturesUnordered::new(),
            last_warning: HashMap::new(),
            start: Instant::now(),
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            incumbents: HashMap::new(),
            incumbents_listing: None,
            incumbent_items: HashMap::new(),
            gate: config
                .adopt_from
                .as_ref()
                .map(|_| Gate::new(config.poll_interval, Instant::now())),
            incumbent_reported: false,
            adopting: HashMap::new(),
            foreign: HashSet::new(),
            foreign_listing: None,
            config,
        }
    }

    /// Whether an object should stand for `item` now.
    fn desired(&self, item: &WorkItem) -> bool {
        self.classes.contains_key(&item.class) && self.segments.contains(&item.segment)
    }

    /// Every item that should have an object now.
    fn desired_items(&self) -> impl Iterator<Item = WorkItem> + '_ {
        self.segments.iter().flat_map(|segment| {
            self.classes.keys().map(move |class| WorkItem {
                segment: segment.clone(),
                class: class.clone(),
            })
        })
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
            // What happened to csi-provisioner's objects before this term is
            // not known: a full quiet interval again.
            if let Some(gate) = &mut self.gate {
                gate.restart(Instant::now());
            }
            if self.synced {
                self.follow_classes();
                self.resync_objects(&HashMap::new());
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
            Signal::Classes { synced } => self.inputs_changed("classes", synced),
            Signal::Driver { synced } => self.inputs_changed("csidriver", synced),
            Signal::Node(event) => {
                self.follow_list("nodes", &event);
                self.on_node(event);
            }
            Signal::CsiNode(event) => {
                self.follow_list("csinodes", &event);
                self.on_csinode(*event);
            }
            Signal::Capacity(event) => {
                self.follow_list("capacities", &event);
                self.on_capacity(*event);
            }
            Signal::Incumbent(event) => {
                self.follow_list("incumbents", &event);
                self.on_incumbent(*event);
            }
            Signal::Foreign(event) => {
                self.follow_list("foreign capacities", &event);
                self.on_foreign(*event);
            }
            Signal::Volume(event) => {
                self.follow_list("volumes", &event);
                self.on_volume(*event);
            }
            Signal::WatchFailed { source, error } => {
                warn!(source, %error, "watch failed; retrying with backoff");
            }
        }
    }

    /// Notes a watch's re-list starting or ending: while any watch lists
    /// again, no decision is taken.
    fn follow_list<K>(&mut self, source: &'static str, event: &Event<K>) {
        match event {
            Event::Init if self.synced && self.relisting.insert(source) => {
                info!(source, "re-listing; writes and driver calls wait until it ends");
            }
            Event::InitDone if self.relisting.remove(source) && self.relisting.is_empty() => {
                info!(source, "re-listed; deciding again");
            }
            _ => {}
        }
        self.metrics
            .relisting
            .set(i64::try_from(self.relisting.len()).unwrap_or(i64::MAX));
    }

    /// Whether decisions may be taken: every watch listed, none lists again.
    fn may_decide(&self) -> bool {
        self.synced && self.relisting.is_empty()
    }

    fn inputs_changed(&mut self, source: &'static str, synced: bool) {
        if synced {
            self.synced_sources.insert(source);
        }
        if self.synced {
            self.follow_classes();
        } else {
            self.try_initial_sync();
        }
    }

    fn try_initial_sync(&mut self) {
        if self.synced || !self.required.is_subset(&self.synced_sources) {
            return;
        }
        self.synced = true;
        self.follow_classes();
        self.resync_objects(&HashMap::new());
        info!(
            segments = self.segments.len(),
            classes = self.classes.len(),
            objects = self.objects.len(),
            "capacity controller synced"
        );
        self.ready.mark_ready();
    }

    fn index(&mut self) -> Option<&mut TopologyIndex> {
        match &mut self.segments {
            Segments::Central(index) => Some(index),
            Segments::Fixed(_) => None,
        }
    }

    fn on_node(&mut self, event: Event<NodeLabels>) {
        let applied = match event {
            Event::Init => {
                self.nodes_relist.start();
                return;
            }
            Event::InitApply(node) => {
                self.nodes_relist.saw(&node.name);
                self.apply_node(node)
            }
            Event::Apply(node) => self.apply_node(node),
            Event::Delete(node) => self.index().map(|index| index.delete_node(&node.name)),
            Event::InitDone => {
                let gone = match &mut self.segments {
                    Segments::Central(index) => self.nodes_relist.gone(index.node_names()),
                    Segments::Fixed(_) => Vec::new(),
                };
                for name in gone {
                    let applied = self.index().map(|index| index.delete_node(&name));
                    self.segments_changed(applied);
                }
                self.synced_sources.insert("nodes");
                self.try_initial_sync();
                return;
            }
        };
        self.segments_changed(applied);
    }

    fn apply_node(&mut self, node: NodeLabels) -> Option<Applied> {
        self.index()
            .map(|index| index.apply_node(&node.name, node.labels, node.kept))
    }

    fn on_csinode(&mut self, event: Event<k8s_openapi::api::storage::v1::CSINode>) {
        let applied = match event {
            Event::Init => {
                self.csinodes_relist.start();
                return;
            }
            Event::InitApply(csinode) => {
                self.csinodes_relist
                    .saw(csinode.metadata.name.as_deref().unwrap_or_default());
                self.index().map(|index| index.apply_csinode(&csinode))
            }
            Event::Apply(csinode) => self.index().map(|index| index.apply_csinode(&csinode)),
            Event::Delete(csinode) => {
                let name = csinode.metadata.name.unwrap_or_default();
                self.index().map(|index| index.delete_csinode(&name))
            }
            Event::InitDone => {
                let gone = match &mut self.segments {
                    Segments::Central(index) => self.csinodes_relist.gone(index.csinode_names()),
                    Segments::Fixed(_) => Vec::new(),
                };
                for name in gone {
                    let applied = self.index().map(|index| index.delete_csinode(&name));
                    self.segments_changed(applied);
                }
                if self.synced_sources.insert("csinodes") {
                    // The keys are known: the Node watch can start.
                    self.restart_node_watch();
                }
                self.try_initial_sync();
                return;
            }
        };
        if applied.as_ref().is_some_and(|a| a.nodes_stale) && self.synced_sources.contains("csinodes") {
            info!("a CSINode names a new topology key; listing the Nodes again");
            self.restart_node_watch();
        }
        self.segments_changed(applied);
    }

    fn restart_node_watch(&mut self) {
        let keys = match &self.segments {
            Segments::Central(index) => index.keys(),
            Segments::Fixed(_) => return,
        };
        if let Some(sender) = &self.node_keys {
            sender.send_replace(Some(keys));
        }
    }

    /// Segments came or went: their items are scheduled or dropped.
    fn segments_changed(&mut self, applied: Option<Applied>) {
        let Some(applied) = applied else {
            return;
        };
        if !self.synced {
            return;
        }
        let now = Instant::now();
        let classes: Vec<Arc<str>> = self.classes.keys().cloned().collect();
        for segment in applied.removed {
            for class in &classes {
                self.drop_item(WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                });
            }
        }
        for segment in applied.added {
            for class in &classes {
                let item = WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                };
                debug!(%item, "new work item");
                self.queue.schedule(item, now);
            }
        }
    }

    /// An item is no longer desired: its work stops and its object goes.
    fn drop_item(&mut self, item: WorkItem) {
        debug!(%item, "work item gone");
        self.queue.forget(&item);
        self.last_warning.remove(&item);
        self.oversized.remove(&item);
        self.unseen.remove(&item);
        self.deferred.remove(&item);
        if let Some(name) = self.objects.remove(&item) {
            self.delete(&name);
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

    /// Follows the StorageClasses and the enablement switch: items of new
    /// classes are scheduled, items of classes gone (or of every class,
    /// when tracking is switched off) are dropped with their objects.
    fn follow_classes(&mut self) {
        let tracked = self.follow_tracking();
        let mut classes: BTreeMap<Arc<str>, Arc<Labels>> = BTreeMap::new();
        if tracked {
            for class in self.class_store.state() {
                let (Some(name), Some(parameters)) = (
                    class.metadata.name.as_deref(),
                    model::capacity_parameters(&class, &self.config.driver, self.config.include_immediate),
                ) else {
                    continue;
                };
                // Keep the shared copies the items already hold.
                let name = self
                    .classes
                    .get_key_value(name)
                    .map_or_else(|| Arc::from(name), |(known, _)| known.clone());
                classes.insert(name, Arc::new(parameters));
            }
        }
        let removed: Vec<Arc<str>> = self
            .classes
            .keys()
            .filter(|c| !classes.contains_key(*c))
            .cloned()
            .collect();
        let added: Vec<Arc<str>> = classes
            .keys()
            .filter(|c| !self.classes.contains_key(*c))
            .cloned()
            .collect();
        self.classes = classes;
        let segments: Vec<Segment> = self.segments.iter().cloned().collect();
        for class in removed {
            for segment in &segments {
                self.drop_item(WorkItem {
                    segment: segment.clone(),
                    class: class.clone(),
                });
            }
        }
        let now = Instant::now();
        for class in added {
            for segment in &segments {
                self.queue.schedule(
                    WorkItem {
                        segment: segment.clone(),
                        class: class.clone(),
                    },
                    now,
                );
            }
        }
    }

    /// An object as the watch delivered it, with its item sharing the
    /// loop's copies of segment and class.
    fn stored(&self, object: &CapacityObject) -> Stored {
        let item = model::item_of(object).map(|item| WorkItem {
            class: self
                .classes
                .get_key_value(&*item.class)
                .map_or(item.class, |(known, _)| known.clone()),
            segment: self.segments.shared(item.segment),
        });
        Stored {
            item,
            object: KnownObject::of(object, &self.config.identity),
        }
    }

    fn on_capacity(&mut self, event: Event<CapacityObject>) {
        match event {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(object) => {
                let stored = self.stored(&object);
                if let (Some(listing), Some(name)) = (&mut self.listing, object.metadata.name) {
                    listing.insert(name, stored);
                }
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let previous = std::mem::replace(&mut self.store, listed);
                self.synced_sources.insert("capacities");
                if self.synced {
                    self.resync_objects(&previous);
                } else {
                    self.try_initial_sync();
                }
            }
            Event::Apply(object) => {
                let Some(name) = object.metadata.name.clone() else {
                    return;
                };
                // An object just taken over from csi-provisioner may arrive
                // here before its watch says it left.
                if self.incumbents.remove(&name).is_some() {
                    self.index_incumbents();
                }
                let stored = self.stored(&object);
                let previous = self.store.insert(name.clone(), stored.clone());
                if self.synced {
                    self.on_object(&name, previous.as_ref(), &stored);
                }
            }
            Event::Delete(object) => {
                let Some(name) = object.metadata.name.clone() else {
                    return;
                };
                let stored = self.stored(&object);
                self.store.remove(&name);
                if self.synced {
                    self.on_object_deleted(&name, &stored);
                }
            }
        }
    }

    /// After the capacity watch (re-)listed: the listed objects are mapped
    /// onto the items by [`model::reconcile_objects`]; what vanished
    /// meanwhile is re-created, what appeared is adopted or deleted, what
    /// changed since `previous` (the objects before the list) is refreshed.
    fn resync_objects(&mut self, previous: &HashMap<String, Stored>) {
        let now = Instant::now();
        // Writes the list shows are seen; the others were made after its
        // snapshot and arrive through the watch next.
        let store = &self.store;
        self.unseen.retain(|_, unseen| {
            store
                .get(&unseen.name)
                .is_none_or(|s| s.object.version != unseen.version)
        });
        let unseen = &self.unseen;
        let due: Vec<WorkItem> = self
            .deferred
            .iter()
            .filter(|i| !unseen.contains_key(*i))
            .cloned()
            .collect();
        for item in due {
            self.deferred.remove(&item);
            self.queue.schedule(item, now);
        }
        // Deletes in flight stay; those whose object is gone are done.
        let store = &self.store;
        self.deleting.retain(|name| store.contains_key(name));
        let listed = self
            .store
            .iter()
            .filter(|(name, _)| !self.deleting.contains(*name))
            .map(|(name, stored)| Existing {
                name,
                item: stored.item.as_ref(),
                created: stored.object.created.as_ref(),
            });
        let plan = model::reconcile_objects(self.desired_items(), |item| self.desired(item), listed);
        for name in &plan.delete {
            self.delete(name);
        }
        let known = std::mem::take(&mut self.objects);
        for (item, name) in plan.adopt {
            let refresh = match (known.get(&item), previous.get(&name), self.store.get(&name)) {
                (Some(was), Some(before), Some(now)) if *was == name => {
                    model::changed_by_others(&before.object, &now.object)
                }
                (Some(was), None, Some(_)) if *was == name => false,
                _ => {
                    debug!(%item, %name, "adopting object");
                    true
                }
            };
            if refresh && !self.queue.is_in_flight(&item) {
                self.queue.schedule(item.clone(), now);
            }
            self.objects.insert(item, name);
        }
        for item in plan.missing {
            if let Some(unseen) = self.unseen.get(&item).filter(|u| !self.store.contains_key(&u.name)) {
                // Created after the list's snapshot: not missing, no second object.
                self.objects.insert(item, unseen.name.clone());
                continue;
            }
            if known.contains_key(&item) {
                info!(%item, "object deleted by someone else; re-creating");
            }
            self.queue.schedule(item, now);
        }
    }

    /// The watch delivered object `name` (`previous`: how it was before).
    /// Our own writes are recognised by their version; until ours arrives,
    /// what comes before it is not taken for someone else's change.
    fn on_object(&mut self, name: &str, previous: Option<&Stored>, now: &Stored) {
        if self.deleting.contains(name) {
            return;
        }
        let Some(item) = now.item.clone().filter(|item| self.desired(item)) else {
            self.delete(name);
            return;
        };
        let awaited = self.unseen.get(&item).is_some_and(|unseen| unseen.name == name);
        if self
            .unseen
            .get(&item)
            .is_some_and(|unseen| unseen.name == name && unseen.version == now.object.version)
        {
            self.write_seen(&item);
        }
        match self.objects.get(&item) {
            Some(known) if known == name => {
                let changed = !awaited && previous.is_none_or(|p| model::changed_by_others(&p.object, &now.object));
                if changed && !self.queue.is_pending(&item) {
                    debug!(%item, %name, "object changed by someone else; refreshing");
                    self.queue.schedule(item, Instant::now());
                }
            }
            Some(_) => {
                debug!(%item, %name, "duplicate object");
                self.delete(name);
            }
            None => {
                self.objects.insert(item.clone(), name.to_string());
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

    fn on_object_deleted(&mut self, name: &str, stored: &Stored) {
        self.deleting.remove(name);
        let Some(item) = stored.item.clone() else {
            return;
        };
        if self.unseen.get(&item).is_some_and(|unseen| unseen.name == name) {
            self.write_seen(&item);
        }
        if self.objects.get(&item).is_some_and(|known| known == name) {
            self.objects.remove(&item);
            if self.desired(&item) {
                info!(%item, %name, "object deleted by someone else; re-creating");
                self.queue.schedule(item, Instant::now());
            }
        }
    }

    fn volume_key(&self, pv: &VolumeObject) -> u64 {
        self.hasher.hash_one(pv.metadata.name.as_deref().unwrap_or_default())
    }

    fn on_volume(&mut self, event: Event<VolumeObject>) {
        let driver = self.config.driver.as_str();
        match event {
            Event::Init => self.volumes_listing = Some(HashMap::new()),
            Event::InitApply(pv) if model::is_volume_of(&pv, driver) => {
                let (key, items) = (self.volume_key(&pv), self.volume_items(&pv));
                if let Some(listing) = &mut self.volumes_listing {
                    listing.insert(key, items);
                }
            }
            Event::InitDone => self.volumes_listed(),
            Event::Apply(pv) if model::is_volume_of(&pv, driver) => {
                let items = self.volume_items(&pv);
                let created = self.volumes.insert(self.volume_key(&pv), items.clone()).is_none();
                if created && self.synced {
                    self.refresh(&items, "volume created");
                }
            }
            Event::Delete(pv) if model::is_volume_of(&pv, driver) => {
                let known = self
                    .volumes
                    .remove(&self.volume_key(&pv))
                    .filter(|items| !items.is_empty());
                let items = known.unwrap_or_else(|| self.volume_items(&pv));
                if self.synced {
                    self.refresh(&items, "volume deleted");
                }
            }
            _ => {}
        }
    }

    /// The PV list ended: PVs created or deleted while the watch was away
    /// refresh their items now, not at the next poll.
    fn volumes_listed(&mut self) {
        let listed = self.volumes_listing.take().unwrap_or_default();
        let previous = std::mem::replace(&mut self.volumes, listed);
        self.synced_sources.insert("volumes");
        if !self.synced {
            self.try_initial_sync();
            return;
        }
        let created: Vec<WorkItem> = (self.volumes.iter())
            .filter(|(key, _)| !previous.contains_key(*key))
            .flat_map(|(_, items)| items.iter().cloned())
            .collect();
        let deleted: Vec<WorkItem> = (previous.iter())
            .filter(|(key, _)| !self.volumes.contains_key(*key))
            .flat_map(|(_, items)| items.iter().cloned())
            .collect();
        self.refresh(&created, "volume created while the watch was away");
        self.refresh(&deleted, "volume deleted while the watch was away");
    }

    /// The items of the PV's class in the segments its node affinity admits.
    fn volume_items(&self, pv: &VolumeObject) -> Box<[WorkItem]> {
        let Some((class, terms)) = model::volume_placement(pv, &self.config.driver) else {
            return Box::default();
        };
        let Some((class, _)) = self.classes.get_key_value(class) else {
            return Box::default();
        };
        (self.segments.admitted(terms).into_iter())
            .map(|segment| WorkItem {
                segment,
                class: class.clone(),
            })
            .collect()
    }

    /// Refreshes `items` now (deduplicated by the queue).
    fn refresh(&mut self, items: &[WorkItem], why: &str) {
        let now = Instant::now();
        for item in items {
            debug!(%item, why, "refreshing");
            self.queue.schedule(item.clone(), now);
        }
    }

    fn delete(&mut self, name: &str) {
        // A follower leaves it to the leader (or to itself once it leads).
        if name.is_empty() || !self.leading || !self.deleting.insert(name.to_string()) {
            return;
        }
        let api = self.api.clone();
        let leadership = self.leadership.clone();
        let metrics = self.metrics.clone();
        let uid = self
            .store
            .get(name)
            .or_else(|| self.incumbents.get(name))
            .and_then(|s| s.object.uid.clone());
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name = name.to_string();
        info!(%name, "deleting obsolete CSIStorageCapacity");
        self.tasks.push(
            async move {
                let result = delete_with_retries(&api, &name, &params, &leadership, &metrics).await;
                Done::Deleted(name, result)
            }
            .boxed(),
        );
    }

    fn has_free_worker(&self) -> bool {
        self.busy < self.config.workers.max(1)
    }

    /// Hands due items to free workers: an item joins the question in
    /// flight for its segment and parameters, or asks a new one.
    fn dispatch(&mut self) {
        if !self.may_decide() || !self.leading {
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
                .classes
                .get(&item.class)
                .filter(|_| self.segments.contains(&item.segment))
                .cloned()
            else {
                self.queue.finish(&item);
                continue;
            };
            let query = Query {
                segment: item.segment.clone(),
                parameters,
            };
            match self.asking.entry(query) {
                Entry::Occupied(mut waiting) => waiting.get_mut().push(item),
                Entry::Vacant(slot) => {
                    let query = slot.key().clone();
                    slot.insert(vec![item]);
                    self.ask(query);
                }
            }
        }
    }

    /// Asks the driver `query`.
    fn ask(&mut self, query: Query) {
        self.busy += 1;
        let csi = self.csi.clone();
        let metrics = self.metrics.clone();
        let request = CapacityQuery {
            parameters: (*query.parameters).clone(),
            topology: self.config.send_topology.then(|| query.segment.labels().clone()),
        };
        self.tasks.push(
            async move {
                let started = Instant::now();
                let report = csi.get_capacity(&request).await;
                let code = match &report {
                    Ok(_) => "OK",
                    Err(error) => error.label(),
                };
                metrics
                    .get_capacity_seconds
                    .get_or_create(&vec![("grpc_code", code.to_string())])
                    .observe(started.elapsed().as_secs_f64());
                Done::Answered(query, report)
            }
            .boxed(),
        );
    }

    fn finished(&mut self, done: Done) {
        match done {
            Done::Answered(query, report) => {
                self.busy -= 1;
                let waiting = self.asking.remove(&query).unwrap_or_default();
                for item in waiting {
                    match &report {
                        Ok(report) => self.answered(item, *report),
                        Err(error) => self.refreshed(item, Err(Error::Csi(error.clone()))),
                    }
                }
            }
            Done::Wrote(item, value, result) => {
                self.busy -= 1;
                self.refreshed(item, result.map(|written| (Some(written), value)));
            }
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

    /// The driver answered for `item`: its object is created or patched
    /// when the value (or anything else volplane owns in it) changed.
    fn answered(&mut self, item: WorkItem, report: CapacityReport) {
        let value = PublishedCapacity {
            capacity: report.available_capacity,
            maximum_volume_size: report.maximum_volume_size,
        };
        if !self.desired(&item) {
            self.queue.finish(&item);
            return;
        }
        if !self.leading {
            self.refreshed(item, Err(Error::NotLeader(volplane_runtime::NotLeader)));
            return;
        }
        let known = self
            .objects
            .get(&item)
            .and_then(|name| Some((name.clone(), self.store.get(name)?)));
        let incumbent = self
            .incumbent_items
            .get(&item)
            .and_then(|name| Some((name.clone(), self.incumbents.get(name)?)));
        let write = match (known, incumbent) {
            // csi-provisioner's object stands for the item: taken over in
            // place once the gate allows, never duplicated before.
            (None, Some((name, theirs))) => {
                let adopt = self.gate.as_ref().is_some_and(|gate| gate.may_adopt(&item));
                match model::update_patch(&theirs.object, value, &self.config.identity).filter(|_| adopt) {
                    Some(patch) => {
                        info!(%item, %name, "adopting csi-provisioner's CSIStorageCapacity");
                        self.adopting.insert(item.clone(), name.clone());
                        Write::Patch(name, patch)
                    }
                    None => {
                        self.refreshed(item, Ok((None, value)));
                        return;
                    }
                }
            }
            (None, None) => Write::Create(Box::new(model::new_object(&item, value, &self.config.identity))),
            (Some((name, stored)), _) => match model::update_patch(&stored.object, value, &self.config.identity) {
                None => {
                    self.refreshed(item, Ok((None, value)));
                    return;
                }
                Some(patch) => Write::Patch(name, patch),
            },
        };
        self.busy += 1;
        let writer = Writer {
            client: self.client.clone(),
            url: self.api.resource_url().to_string(),
            leadership: self.leadership.clone(),
            metrics: self.metrics.clone(),
        };
        self.tasks.push(
            async move {
                let result = writer.write(&item, write).await;
                Done::Wrote(item, value, result)
            }
            .boxed(),
        );
    }

    /// The item's next regular poll: all classes of a segment at once, in
    /// one of [`POLL_SLOTS`] slots of the interval.
    fn next_poll(&self, item: &WorkItem) -> Instant {
        let interval = self.config.poll_interval;
        let slot = interval / POLL_SLOTS;
        let phase = phase::phase(&item.segment.to_string(), interval);
        let phase = if slot.is_zero() {
            phase
        } else {
            slot * u32::try_from(phase.as_nanos() / slot.as_nanos()).unwrap_or(0)
        };
        work_queue::next_poll(Instant::now(), self.start, interval, phase)
    }

    /// A run of `item` ended: with what was written (if anything) and the
    /// value published, or an error.
    fn refreshed(&mut self, item: WorkItem, result: Result<(Option<Written>, PublishedCapacity)>) {
        self.queue.finish(&item);
        if let Some(name) = self.adopting.remove(&item) {
            self.adopted(&item, &name, result.as_ref().map(|_| ()));
        }
        let desired = self.desired(&item);
        let next = match result {
            Ok((written, value)) => {
                self.queue.succeeded(&item);
                self.last_warning.remove(&item);
                self.note_oversized(&item, value);
                if let Some(written) = written {
                    self.wrote(&item, written, desired);
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

    /// A takeover write of csi-provisioner's object `name` for `item` ended:
    /// the canary's interval starts when it landed, a failed one waits a
    /// full interval again; landed after the gate closed, it is given back.
    fn adopted(&mut self, item: &WorkItem, name: &str, result: std::result::Result<(), &Error>) {
        let Some(gate) = &mut self.gate else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(()) if gate.may_adopt(item) => gate.canary_written(item, now),
            // The gate closed meanwhile: if csi-provisioner's object stands
            // for the pair again, the pair keeps that one alone.
            Ok(()) => {
                if self.incumbent_items.contains_key(item) {
                    self.delete(name);
                }
            }
            Err(_) if matches!(gate.stage(), Stage::Canary { item: canary, .. } if canary == item) => {
                gate.restart(now);
            }
            Err(_) => {}
        }
    }

    /// A refresh wrote `written`: the watch will bring it back; until then
    /// it is awaited (or it is deleted at once when nobody needs it).
    fn wrote(&mut self, item: &WorkItem, written: Written, desired: bool) {
        let Written { name, version } = written;
        match self.objects.get(item) {
            _ if !desired => self.delete(&name),
            Some(known) if *known != name => self.delete(&name),
            // The watch was quicker than the response.
            Some(_) if self.store.get(&name).is_some_and(|s| s.object.version == version) => {}
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

    /// A Warning event on the owner, at most once per item per poll
    /// interval, and per minute when polls are more frequent.
    fn warn_event(&mut self, item: &WorkItem, error: &Error) {
        let Some(target) = self.config.event_target.clone() else {
            return;
        };
        let now = Instant::now();
        let quiet = self.config.poll_interval.max(WARNING_INTERVAL);
        if self
            .last_warning
            .get(item)
            .is_some_and(|last| now.duration_since(*last) < quiet)
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

    /// An event of the objects for the driver that neither volplane nor
    /// csi-provisioner maintains: each is said once, never touched.
    fn on_foreign(&mut self, event: Event<CapacityObject>) {
        match event {
            Event::Init => self.foreign_listing = Some(HashSet::new()),
            Event::InitDone => {
                // What the list did not bring was deleted meanwhile.
                if let Some(listed) = self.foreign_listing.take() {
                    self.foreign.retain(|name| listed.contains(name));
                }
            }
            Event::InitApply(object) | Event::Apply(object) => {
                let Some(name) = object.metadata.name.clone() else {
                    return;
                };
                if let Some(listing) = &mut self.foreign_listing {
                    listing.insert(name.clone());
                }
                if self.foreign.insert(name.clone()) {
                    self.report_foreign(&name, &object);
                }
            }
            Event::Delete(object) => {
                if let Some(name) = object.metadata.name {
                    self.foreign.remove(&name);
                }
            }
        }
        self.metrics
            .foreign_objects
            .set(i64::try_from(self.foreign.len()).unwrap_or(i64::MAX));
    }

    fn report_foreign(&self, name: &str, object: &CapacityObject) {
        let managed_by = object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(model::MANAGED_BY_LABEL))
            .map_or_else(|| "nobody (no managed-by label)".to_string(), |m| format!("{m:?}"));
        let note = volplane_runtime::text::event_note(&format!(
            "CSIStorageCapacity {}/{name} for driver {} (class {:?}) is maintained by {managed_by}: volplane \
             leaves it alone, and kube-scheduler reads it beside volplane's objects; delete it if it is stale",
            self.config.identity.namespace, self.config.driver, object.storage_class_name
        ));
        warn!(object = %name, %managed_by, "{note}");
        if let Some(target) = self.config.event_target.clone() {
            let announcement = Announcement::warning("ForeignCapacityObject", "AdoptCapacity", note);
            events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
        }
    }

    /// An event of csi-provisioner's objects for the driver.
    fn on_incumbent(&mut self, event: Event<CapacityObject>) {
        match event {
            Event::Init => self.incumbents_listing = Some(HashMap::new()),
            Event::InitApply(object) => {
                let stored = self.stored(&object);
                if let (Some(listing), Some(name)) = (&mut self.incumbents_listing, object.metadata.name) {
                    listing.insert(name, stored);
                }
            }
            Event::InitDone => {
                let listed = self.incumbents_listing.take().unwrap_or_default();
                // Written while the watch was down: as if seen one by one.
                let written = listed.iter().any(|(name, now)| {
                    self.incumbents
                        .get(name)
                        .is_none_or(|before| before.object.version != now.object.version)
                });
                let relisted = self.synced_sources.contains("incumbents");
                self.incumbents = listed;
                self.index_incumbents();
                self.synced_sources.insert("incumbents");
                if relisted && written {
                    self.incumbent_written(None);
                }
                if self.synced {
                    self.adopt_open();
                } else {
                    self.try_initial_sync();
                }
            }
            Event::Apply(object) => {
                let Some(name) = object.metadata.name.clone() else {
                    return;
                };
                if self.store.contains_key(&name) {
                    // Ours already (taken over); this watch is behind.
                    return;
                }
                let stored = self.stored(&object);
                let previous = self.incumbents.insert(name.clone(), stored.clone());
                self.index_incumbents();
                if previous.is_none_or(|p| p.object.version != stored.object.version) {
                    self.incumbent_written(stored.item.as_ref());
                }
                if self.synced {
                    self.adopt_open();
                }
            }
            Event::Delete(object) => {
                // Adopted (its labels are volplane's now) or deleted.
                if let Some(name) = object.metadata.name {
                    self.incumbents.remove(&name);
                    self.index_incumbents();
                }
            }
        }
    }

    fn index_incumbents(&mut self) {
        let mut index: HashMap<WorkItem, String> = HashMap::new();
        for (name, stored) in &self.incumbents {
            if let Some(item) = &stored.item {
                // The oldest stands for the item, as with volplane's own.
                let keep = index.get(item).is_none_or(|other| {
                    self.incumbents.get(other).and_then(|o| o.object.created.as_ref()) > stored.object.created.as_ref()
                });
                if keep {
                    index.insert(item.clone(), name.clone());
                }
            }
        }
        self.incumbent_items = index;
    }

    /// Someone else wrote one of csi-provisioner's objects (for `item`):
    /// during a canary or after the gate opened, that is csi-provisioner
    /// still at work. The pair gets its one object back (volplane's copy
    /// goes, theirs stays), and it is said once.
    fn incumbent_written(&mut self, item: Option<&WorkItem>) {
        let Some(gate) = &mut self.gate else {
            return;
        };
        let now = Instant::now();
        let canary = match gate.stage() {
            Stage::Canary { item, .. } => Some(item.clone()),
            _ => None,
        };
        let still_running = gate.appeared(now) == Appeared::StillRunning;
        // Every pair csi-provisioner writes for gets its object alone: the
        // canary's, and any written while the gate is not open.
        for item in canary.iter().chain(item) {
            self.give_back(item);
        }
        if !still_running {
            return;
        }
        self.metrics.incumbent_running.set(1);
        if self.incumbent_reported {
            return;
        }
        self.incumbent_reported = true;
        let note = format!(
            "csi-provisioner still maintains the CSIStorageCapacity objects of driver {} (it wrote one while \
             volplane was taking them over): volplane leaves them alone and tries again once they have been quiet \
             for a poll interval; switch its capacity tracking off (--enable-capacity=false)",
            self.config.driver
        );
        warn!(driver = %self.config.driver, "{note}");
        if let Some(target) = self.config.event_target.clone() {
            let announcement = Announcement::warning("IncumbentStillRunning", "AdoptCapacity", note);
            events::publish_in_background(&self.recorder, &self.leadership, &announcement, [target]);
        }
    }

    /// While csi-provisioner's object stands for `item`, volplane's copy of
    /// the pair (as the watch has it, or just written) goes.
    fn give_back(&mut self, item: &WorkItem) {
        if !self.incumbent_items.contains_key(item) {
            return;
        }
        let ours = self
            .objects
            .get(item)
            .cloned()
            .or_else(|| self.unseen.get(item).map(|unseen| unseen.name.clone()))
            .or_else(|| self.adopting.get(item).cloned());
        if let Some(ours) = ours {
            self.delete(&ours);
        }
    }

    /// Moves the takeover of csi-provisioner's objects on: a canary once
    /// they have been quiet, all of them once the canary stood.
    fn follow_gate(&mut self) {
        if !self.may_decide() || !self.leading {
            return;
        }
        let now = Instant::now();
        let Some(gate) = &mut self.gate else {
            return;
        };
        if gate.tick(now) {
            info!(
                objects = self.incumbents.len(),
                "csi-provisioner's objects are quiet and the canary stood: adopting all"
            );
            self.metrics.incumbent_running.set(0);
            self.incumbent_reported = false;
            self.adopt_open();
            return;
        }
        if !gate.canary_due(now) {
            return;
        }
        if self.incumbents.is_empty() {
            // Nothing to take over.
            gate.open();
            return;
        }
        // The canary: an object to take over, else one to delete (obsolete,
        // or a duplicate of volplane's) — csi-provisioner re-creates either.
        let adoptable = self
            .incumbent_items
            .iter()
            .filter(|(item, _)| !self.objects.contains_key(*item) && self.desired(item))
            .map(|(item, name)| (name, item))
            .min()
            .map(|(_, item)| item.clone());
        let obsolete = self
            .incumbents
            .iter()
            .filter_map(|(name, stored)| Some((name, stored.item.as_ref()?)))
            .min()
            .map(|(name, item)| (name.clone(), item.clone()));
        let Some(gate) = &mut self.gate else {
            return;
        };
        match (adoptable, obsolete) {
            (Some(item), _) => {
                info!(%item, "csi-provisioner's objects have been quiet for a poll interval: adopting one first");
                gate.start_canary(item.clone(), now);
                self.queue.schedule(item, now);
            }
            (None, Some((name, item))) => {
                info!(%item, %name, "csi-provisioner's objects have been quiet for a poll interval: deleting one obsolete first");
                gate.start_canary(item, now);
                self.delete(&name);
            }
            (None, None) => gate.open(),
        }
    }

    /// While the gate is open: every incumbent object standing for an item
    /// without one of volplane's is adopted (its item refreshed now); those
    /// standing for nothing volplane publishes, or duplicating its objects,
    /// are deleted.
    fn adopt_open(&mut self) {
        if !self.may_decide() || !self.leading || !self.gate.as_ref().is_some_and(Gate::may_delete) {
            return;
        }
        let now = Instant::now();
        let mut obsolete = Vec::new();
        for (name, stored) in self
            .incumbents
            .iter()
            .filter(|(name, _)| !self.store.contains_key(*name))
        {
            let standing = stored.item.as_ref().filter(|item| {
                self.desired(item) && !self.objects.contains_key(*item) && self.incumbent_items.get(*item) == Some(name)
            });
            match standing {
                Some(item) => {
                    if !self.queue.is_pending(item) && !self.queue.is_in_flight(item) {
                        self.queue.schedule(item.clone(), now);
                    }
                }
                None => obsolete.push(name.clone()),
            }
        }
        for name in obsolete {
            self.delete(&name);
        }
    }

    fn update_gauges(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .desired
            .set(gauge(self.segments.len() * self.classes.len()));
        self.metrics.current.set(gauge(self.objects.len()));
        self.metrics.obsolete.set(gauge(self.deleting.len()));
        self.metrics.incumbent_objects.set(gauge(self.incumbents.len()));
        self.metrics
            .queue_depth
            .set(gauge(self.queue.pending() + self.queue.in_flight()));
    }
}

/// A write for one item.
enum Write {
    Create(Box<CSIStorageCapacity>),
    Patch(String, Value),
}

/// Writes objects, reading back only what the loop needs of the answer.
struct Writer {
    client: kube::Client,
    url: String,
    leadership: Leadership,
    metrics: Arc<CapacityMetrics>,
}

impl Writer {
    async fn write(&self, item: &WorkItem, write: Write) -> Result<Written> {
        let request = kube::core::Request::new(&self.url);
        let (verb, built) = match &write {
            Write::Create(object) => (
                "create",
                serde_json::to_vec(object)
                    .map_err(kube::core::request::Error::SerializeBody)
                    .and_then(|body| request.create(&PostParams::default(), body)),
            ),
            Write::Patch(name, patch) => (
                "patch",
                request.patch(name, &PatchParams::default(), &Patch::Merge(patch)),
            ),
        };
        let built = built.map_err(|source| Error::Write {
            verb,
            source: kube::Error::BuildRequest(source),
        })?;
        let written: CapacityObject = self
            .leadership
            .guard(self.client.request(built))
            .await?
            .map_err(|source| Error::Write { verb, source })?;
        self.metrics.wrote(verb);
        let name = written.metadata.name.unwrap_or_default();
        debug!(%item, %name, verb, "wrote CSIStorageCapacity");
        Ok(Written {
            name,
            version: written.metadata.resource_version,
        })
    }
}

async fn delete_with_retries(
    api: &Api<CapacityObject>,
    name: &str,
    params: &DeleteParams,
    leadership: &Leadership,
    metrics: &CapacityMetrics,
) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let Ok(deleted) = leadership.guard(api.delete(name, params)).await else {
            return Err(Error::NotLeader(volplane_runtime::NotLeader));
        };
        match deleted {
            Ok(_) => {
                metrics.wrote("delete");
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return Ok(()),
            Err(error) if attempt >= 5 => {
                return Err(Error::Write {
                    verb: "delete",
                    source: error,
                });
            }
            Err(error) => {
                warn!(%name, %error, attempt, "delete failed; retrying");
                tokio::time::sleep(DELETE_RETRY.delay(attempt)).await;
            }
        }
    }
}
