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

use std::collections::hash_map;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
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
use volplane_runtime::index::convert;
use volplane_runtime::work_queue::{self, WorkQueue};
use volplane_runtime::{
    Backoff, Change, Entries, Entry, Fed, Feed, Index, Keyed, Leadership, ObjectKey, Readiness, control_loop, phase,
};

use crate::adopt::{Appeared, Gate, Stage};
use crate::claim::ClaimObject;
pub use crate::config::{CapacityConfig, Topology};
use crate::error::{Error, Result};
use crate::in_flight::{self, ClaimsOf, InFlight, Moment};
use crate::inputs::{Inputs, Signal};
use crate::metrics::CapacityMetrics;
use crate::model::{
    self, CapacityObject, Existing, KnownObject, Labels, Publication, PublishedCapacity, Reservation, Segment,
    Tracking, VolumeObject, WorkItem,
};
use crate::placements::NodeListOf;
use crate::topology::{Applied, CsiNodesOf, KeySet, NodeLabels, NodesOf, Segments, TopologyIndex};

mod adoption;
mod answers;
mod dispatch;
mod objects;
mod reservations;
mod segments;
mod values;
mod volumes;

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
    /// The driver answered a question asked at a moment of the placements.
    Answered(
        Query,
        Moment,
        std::result::Result<CapacityReport, volplane_csi::CsiError>,
    ),
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
        metrics.poll_interval.set(config.poll_interval.as_secs_f64());
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

/// One feed per watch of an index, by the watch's name (as in `required`).
#[derive(Debug, Default)]
struct Feeds(BTreeMap<&'static str, Feed>);

impl Feeds {
    fn feed<K: Keyed, I: Index<K> + ?Sized>(&mut self, watch: &'static str, event: Event<K>, index: &mut I) -> Fed {
        (self.0.entry(watch))
            .or_insert_with(|| Feed::new(watch))
            .feed(event, index)
    }

    /// How many watches list again after their first list.
    fn relisting(&self) -> usize {
        self.0.values().filter(|feed| feed.is_relisting()).count()
    }

    /// Whether the watch named `watch` has listed and lists not again.
    fn is_current(&self, watch: &str) -> bool {
        self.0.get(watch).is_some_and(Feed::is_current)
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
    /// The watches' feeds: while one lists again after its first list, no
    /// decision (no write, no driver call) is taken.
    feeds: Feeds,
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
    published: Published,
    pvs: Pvs,
    adoption: Adoption,
    /// The scheduler's placements in flight (from the claims centrally,
    /// from the node's list per node).
    in_flight: InFlight,
    /// The driver's last answer per item.
    answers: answers::Answers,
    /// Per-node mode: the release mark of this node's placements
    /// ConfigMap, as last seen.
    released: Option<String>,
}

/// volplane's objects as the watch delivered them, and its own writes on
/// their way (see `objects`).
#[derive(Default)]
struct Published {
    /// volplane's objects by name, as the watch delivered them.
    store: Entries<Stored>,
    /// Objects a re-list in progress found changed by someone else.
    changed_while_away: HashSet<String>,
    /// The object (by name) standing for each item.
    objects: HashMap<WorkItem, String>,
    /// Volplane's own writes the watch has not delivered yet, per item.
    unseen: HashMap<WorkItem, Unseen>,
    /// Items that came due while their write was unseen: run once it is seen.
    deferred: HashSet<WorkItem>,
    deleting: HashSet<String>,
}

/// The driver's PVs (see `volumes`).
#[derive(Default)]
struct Pvs {
    /// The driver's PVs by name, with where each is: a PV created or
    /// deleted refreshes the items there, also when a re-list finds it so.
    volumes: Entries<volumes::Placement>,
}

/// csi-provisioner's and other controllers' objects (see `adoption`).
#[derive(Default)]
struct Adoption {
    /// csi-provisioner's objects for the driver (`--capacity-adopt`), by name.
    incumbents: Entries<Stored>,
    /// A re-list in progress found one of them written meanwhile.
    written_while_away: bool,
    /// The incumbent object (by name) standing for each item.
    incumbent_items: HashMap<WorkItem, String>,
    /// When they may be adopted; `None` without `--capacity-adopt`.
    gate: Option<Gate>,
    /// The incumbent was said to be still running (once per period).
    incumbent_reported: bool,
    /// Takeover writes in flight: item → the object's name.
    adopting: HashMap<WorkItem, String>,
    /// The driver's value written into their objects before the takeover.
    values: values::ValueWrites,
    /// Other controllers' (or nobody's) objects for the driver, reported once each.
    foreign: Entries<()>,
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Done;

    fn before_wait(&mut self) -> Option<Instant> {
        self.follow_leadership();
        self.follow_gate();
        self.dispatch();
        self.update_gauges();
        self.update_age();
        // Due work waits while another instance leads, and while every
        // worker is busy: a finished task wakes the loop then (a timer
        // already due would spin it).
        // While a watch lists again nothing is dispatched: its end wakes
        // the loop, not a due time already past (that would spin).
        let work = (self.queue.next_due()).filter(|_| self.leading && self.has_free_worker() && self.may_decide());
        let gate = self
            .adoption
            .gate
            .as_ref()
            .filter(|_| self.leading && self.may_decide())
            .and_then(Gate::next_wake);
        work.into_iter().chain(gate).chain(self.age_due()).min()
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
            Done::Answered(query, _, Err(error)) => {
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
            tracking: None,
            classes: BTreeMap::new(),
            oversized: HashSet::new(),
            required: inputs.required,
            synced_sources: BTreeSet::new(),
            synced: false,
            feeds: Feeds::default(),
            queue: WorkQueue::default(),
            asking: HashMap::new(),
            busy: 0,
            tasks: FuturesUnordered::new(),
            last_warning: HashMap::new(),
            start: Instant::now(),
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            // Keys of the namespace's objects: what a re-list compares.
            published: Published {
                store: Entries::in_namespace(&config.identity.namespace),
                ..Published::default()
            },
            pvs: Pvs::default(),
            in_flight: InFlight::default(),
            answers: answers::Answers::default(),
            released: None,
            adoption: Adoption {
                incumbents: Entries::in_namespace(&config.identity.namespace),
                foreign: Entries::in_namespace(&config.identity.namespace),
                gate: config
                    .adopt_from
                    .as_ref()
                    .map(|_| Gate::new(config.poll_interval, Instant::now())),
                ..Adoption::default()
            },
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
        self.lead_from(leading.then(Instant::now));
        if leading {
            info!("leading: publishing capacity");
            // What happened to csi-provisioner's objects before this term is
            // not known: a full quiet interval again.
            if let Some(gate) = &mut self.adoption.gate {
                gate.restart(Instant::now());
            }
            // A re-list of volplane's objects in progress resyncs at its end.
            if self.synced && self.feeds.is_current("capacities") {
                self.follow_classes();
                self.resync_objects(&HashSet::new());
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
            Signal::Node(event) => self.on_node(event),
            Signal::CsiNode(event) => self.on_csinode(*event),
            Signal::Capacity(event) => self.on_capacity(*event),
            Signal::Incumbent(event) => self.on_incumbent(*event),
            Signal::Foreign(event) => self.on_foreign(*event),
            Signal::Volume(event) => self.on_volume(*event),
            Signal::Claim(event) => self.on_claim(*event),
            Signal::NodePlacements(event) => self.on_node_placements(*event),
            Signal::WatchFailed { source, error } => {
                warn!(source, %error, "watch failed; retrying with backoff");
            }
        }
    }

    /// Whether decisions may be taken: every watch listed, none lists again.
    fn may_decide(&self) -> bool {
        self.synced && self.feeds.relisting() == 0
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
        self.resync_objects(&HashSet::new());
        info!(
            segments = self.segments.len(),
            classes = self.classes.len(),
            objects = self.published.objects.len(),
            "capacity controller synced"
        );
        self.ready.mark_ready();
    }

    fn update_gauges(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .desired
            .set(gauge(self.segments.len() * self.classes.len()));
        self.metrics.current.set(gauge(self.published.objects.len()));
        self.metrics.obsolete.set(gauge(self.published.deleting.len()));
        self.metrics
            .incumbent_objects
            .set(gauge(self.adoption.incumbents.len()));
        self.metrics.relisting.set(gauge(self.feeds.relisting()));
        self.metrics.placements_in_flight.set(gauge(self.in_flight.reserving()));
        let reserved = (self.in_flight.items()).fold(0i64, |sum, (_, bytes)| sum.saturating_add(bytes));
        self.metrics.reserved_bytes.set(reserved);
        self.metrics
            .queue_depth
            .set(gauge(self.queue.pending() + self.queue.in_flight()));
    }
}
