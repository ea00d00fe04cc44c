//! The placements controller's I/O: one central instance (the Lease
//! holder) watches the claims and its own ConfigMaps and writes each
//! node's list of placements in flight (see [`super`]).
//!
//! One task owns all state: claim and ConfigMap events mark nodes dirty;
//! a dirty node gets one write (create, or a merge patch of what changed)
//! at a time, so a burst of placements on a node costs a write per change
//! the watch shows, coalesced while one is in flight.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use volplane_runtime::index::convert;
use volplane_runtime::relist::relisting;
use volplane_runtime::{Backoff, Entries, Entry, Fed, Feed, Leadership, Readiness, control_loop};

use super::{
    ByNode, KnownMap, NODE_ANNOTATION, PLACEMENTS_LABEL, RELEASED_ANNOTATION, config_map_name, map_patch, to_data,
};
use crate::claim::ClaimObject;

/// Writes to one node's ConfigMap in flight at most, and this many in all.
const WRITERS: usize = 16;

/// Retries of a failed write.
const RETRY: Backoff = Backoff {
    base: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// The placements controller's metrics, `volplane_placements_*`.
#[derive(Debug, Default)]
pub struct PlacementsMetrics {
    /// Claims placed and not bound, over all nodes.
    pub in_flight: Gauge,
    /// ConfigMap writes by verb.
    pub writes: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// CSIStorageCapacity objects of gone nodes deleted (see [`super::sweep`]).
    pub swept: Counter,
}

impl PlacementsMetrics {
    /// Registers the metrics under `placements_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("placements");
        sub.register(
            "in_flight",
            "claims the scheduler placed on a node and that are not bound yet",
            metrics.in_flight.clone(),
        );
        sub.register(
            "writes",
            "writes of the per-node placements ConfigMaps by verb",
            metrics.writes.clone(),
        );
        sub.register(
            "swept",
            "CSIStorageCapacity objects of per-node instances deleted because their node is gone",
            metrics.swept.clone(),
        );
        for verb in ["create", "patch"] {
            metrics.writes.get_or_create(&vec![("verb", verb)]).inc_by(0);
        }
        metrics
    }
}

/// The placements controller.
pub struct PlacementsController {
    client: kube::Client,
    namespace: String,
    metrics: Arc<PlacementsMetrics>,
    leadership: Leadership,
    ready: Readiness,
}

impl std::fmt::Debug for PlacementsController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementsController")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl PlacementsController {
    /// A controller writing its ConfigMaps in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, metrics: Arc<PlacementsMetrics>, leadership: Leadership) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            metrics,
            leadership,
            ready: Readiness::new(),
        }
    }

    /// Turns true once both watches listed.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes, then waits for the writes in flight.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let claims = relisting(Api::<ClaimObject>::all(self.client.clone()), watcher::Config::default())
            .map(|event| match event {
                Ok(event) => Signal::Claim(Box::new(event)),
                Err(error) => Signal::WatchFailed("claims", error.to_string()),
            })
            .boxed();
        let maps = relisting(
            Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace),
            watcher::Config::default().labels(PLACEMENTS_LABEL),
        )
        .map(|event| match event {
            Ok(event) => Signal::Map(Box::new(event)),
            Err(error) => Signal::WatchFailed("placements configmaps", error.to_string()),
        })
        .boxed();
        let signals: BoxStream<'static, Signal> = futures::stream::select(claims, maps).boxed();
        info!(namespace = %self.namespace, "placements controller starting");
        let mut state = LoopState::new(self);
        control_loop::run(&mut state, signals, shutdown).await;
    }
}

enum Signal {
    Claim(Box<Event<ClaimObject>>),
    Map(Box<Event<ConfigMap>>),
    WatchFailed(&'static str, String),
}

/// A write of one node's ConfigMap ended, with the data it wrote.
struct Done {
    node: String,
    map: KnownMap,
    result: Result<&'static str, String>,
}

struct LoopState {
    io: Io,
    metrics: Arc<PlacementsMetrics>,
    leadership: Leadership,
    leading: bool,
    ready: Readiness,
    claims_feed: Feed,
    maps_feed: Feed,
    by_node: ByNode,
    /// volplane's ConfigMaps by name, as the watch delivered them.
    maps: Entries<KnownMap>,
    /// What each node's ConfigMap was last written with, until the watch
    /// shows it (the object holds one or the other).
    written: HashMap<String, KnownMap>,
    dirty: BTreeSet<String>,
    writing: HashSet<String>,
    /// Nodes whose last write failed: when to try again, and how often it failed.
    retry: HashMap<String, (Instant, u32)>,
    tasks: FuturesUnordered<BoxFuture<'static, Done>>,
}

/// What the writes need.
#[derive(Clone)]
struct Io {
    maps: Api<ConfigMap>,
    nodes: Api<PartialObjectMeta<Node>>,
    namespace: String,
}

impl LoopState {
    fn new(controller: PlacementsController) -> Self {
        Self {
            io: Io {
                maps: Api::namespaced(controller.client.clone(), &controller.namespace),
                nodes: Api::all(controller.client),
                namespace: controller.namespace.clone(),
            },
            metrics: controller.metrics,
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            claims_feed: Feed::new("claims"),
            maps_feed: Feed::new("placements configmaps"),
            by_node: ByNode::default(),
            maps: Entries::in_namespace(controller.namespace),
            written: HashMap::new(),
            dirty: BTreeSet::new(),
            writing: HashSet::new(),
            retry: HashMap::new(),
            tasks: FuturesUnordered::new(),
        }
    }

    fn current(&self) -> bool {
        self.claims_feed.is_current() && self.maps_feed.is_current()
    }

    /// Every node with claims in flight or a ConfigMap is looked at again.
    fn all_dirty(&mut self) {
        let nodes = (self.maps.iter().map(|(_, known)| known.node.clone())).chain(self.by_node.nodes().cloned());
        self.dirty.extend(nodes.collect::<Vec<_>>());
    }

    fn on_map(&mut self, event: Event<ConfigMap>) {
        let event = convert(event, |map| Entry::of(&map, KnownMap::of(&map)));
        let fed = self.maps_feed.feed(event, &mut self.maps);
        for change in self.maps.take_changes() {
            let now = self.maps.get(&change.name);
            // The watch caught up with volplane's write.
            if let Some(now) = now
                && self.written.get(&now.node) == Some(now)
            {
                self.written.remove(&now.node);
            }
            let nodes = now
                .map(|k| k.node.clone())
                .into_iter()
                .chain(change.before.map(|k| k.node));
            self.dirty.extend(nodes.collect::<Vec<_>>());
        }
        self.listed(&fed);
    }

    fn listed(&mut self, fed: &Fed) {
        if !matches!(fed, Fed::Listed { .. }) || !self.current() {
            return;
        }
        self.all_dirty();
        if self.ready.mark_ready() {
            info!(
                nodes = self.dirty.len(),
                in_flight = self.by_node.len(),
                "placements controller synced"
            );
        }
    }

    /// Starts a write for each dirty node that needs one.
    fn dispatch(&mut self) {
        if !self.leading || !self.current() {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = (self.dirty.iter())
            .filter(|node| !self.writing.contains(*node))
            .filter(|node| self.retry.get(*node).is_none_or(|(at, _)| *at <= now))
            .take(WRITERS.saturating_sub(self.writing.len()))
            .cloned()
            .collect();
        for node in due {
            self.dirty.remove(&node);
            self.write(node);
        }
    }

    /// Writes `node`'s ConfigMap if it does not hold its placements (and
    /// its release mark).
    fn write(&mut self, node: String) {
        let name = config_map_name(&node);
        let seen = self.maps.get(&name);
        let desired = KnownMap {
            node: node.clone(),
            data: self.by_node.on(&node).map(to_data).unwrap_or_default(),
            // A new mark, else what volplane last wrote, else what is there.
            released: (self.by_node.released_on(&node).cloned())
                .or_else(|| self.written.get(&node).and_then(|w| w.released.clone()))
                .or_else(|| seen.and_then(|s| s.released.clone())),
        };
        let known: Vec<&KnownMap> = seen.into_iter().chain(self.written.get(&node)).collect();
        let write = match (known.is_empty(), map_patch(&known, &desired)) {
            (_, None) => return,
            (true, Some(_)) => Write::Create,
            (false, Some(patch)) => Write::Patch(patch),
        };
        self.writing.insert(node.clone());
        let io = self.io.clone();
        let leadership = self.leadership.clone();
        self.tasks.push(
            async move {
                let result = match leadership.guard(io.write(&name, &desired, write)).await {
                    Ok(result) => result,
                    Err(_) => Err("not leading".to_string()),
                };
                Done {
                    node,
                    map: desired,
                    result,
                }
            }
            .boxed(),
        );
    }
}

enum Write {
    Create,
    Patch(Value),
}

impl Io {
    async fn write(&self, name: &str, map: &KnownMap, write: Write) -> Result<&'static str, String> {
        match write {
            Write::Patch(patch) => {
                let patched = self
                    .maps
                    .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
                match patched {
                    Ok(_) => Ok("patch"),
                    // Deleted by someone: created again next time.
                    Err(kube::Error::Api(status)) if status.code == 404 => Err(format!("{name} is gone")),
                    Err(error) => Err(error.to_string()),
                }
            }
            Write::Create => self.create(name, map).await,
        }
    }

    /// Creates the ConfigMap, owned by its Node (deleted with it).
    async fn create(&self, name: &str, map: &KnownMap) -> Result<&'static str, String> {
        let node = map.node.as_str();
        let mut annotations = BTreeMap::from([(NODE_ANNOTATION, node)]);
        if let Some(mark) = &map.released {
            annotations.insert(RELEASED_ANNOTATION, mark);
        }
        let owner = match self.nodes.get_metadata(node).await {
            Ok(meta) => meta.metadata.uid.map(|uid| OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid,
                ..OwnerReference::default()
            }),
            // A placement on a node that does not exist: nobody reads it.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok("skip"),
            Err(error) => return Err(error.to_string()),
        };
        let map: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "namespace": self.namespace,
                "labels": {PLACEMENTS_LABEL: "true", "app.kubernetes.io/managed-by": "volplane"},
                "annotations": annotations,
                "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
            },
            "data": map.data,
        }))
        .map_err(|error| error.to_string())?;
        match self.maps.create(&PostParams::default(), &map).await {
            Ok(_) => Ok("create"),
            // There already (the watch is behind): patched next time.
            Err(kube::Error::Api(status)) if status.code == 409 => Err(format!("{name} exists already")),
            Err(error) => Err(error.to_string()),
        }
    }
}

impl control_loop::State for LoopState {
    type Signal = Signal;
    type Done = Done;

    fn before_wait(&mut self) -> Option<Instant> {
        let leading = self.leadership.may_write();
        if leading && !self.leading {
            info!("leading: writing the placements of every node");
            self.all_dirty();
        }
        self.leading = leading;
        self.dispatch();
        self.metrics
            .in_flight
            .set(i64::try_from(self.by_node.len()).unwrap_or(i64::MAX));
        let waiting = self
            .dirty
            .iter()
            .filter_map(|node| self.retry.get(node).map(|(at, _)| *at));
        waiting.min().filter(|_| self.leading)
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
        match signal {
            Signal::Claim(event) => {
                if let Event::Delete(claim) = &*event {
                    let mark = k8s_openapi::jiff::Timestamp::now().to_string();
                    self.by_node.deleted(claim, &mark);
                }
                let fed = self.claims_feed.feed(*event, &mut self.by_node);
                self.dirty.extend(self.by_node.take_changed());
                self.listed(&fed);
            }
            Signal::Map(event) => self.on_map(*event),
            Signal::WatchFailed(source, error) => warn!(source, %error, "watch failed; retrying with backoff"),
        }
    }

    fn finished(&mut self, done: Done) {
        self.writing.remove(&done.node);
        match done.result {
            Ok(verb) => {
                debug!(node = %done.node, verb, "wrote placements");
                self.retry.remove(&done.node);
                self.by_node.release_written(&done.node, done.map.released.as_ref());
                if verb != "skip" {
                    self.metrics.writes.get_or_create(&vec![("verb", verb)]).inc();
                    self.written.insert(done.node, done.map);
                }
            }
            Err(error) => {
                let failures = self.retry.get(&done.node).map_or(1, |(_, n)| n + 1);
                warn!(node = %done.node, %error, failures, "cannot write the node's placements; retrying");
                self.retry
                    .insert(done.node.clone(), (Instant::now() + RETRY.delay(failures), failures));
                self.dirty.insert(done.node);
            }
        }
    }

    fn finished_on_shutdown(&mut self, done: Done) {
        if let Err(error) = done.result {
            warn!(node = %done.node, %error, "placements write failed during shutdown");
        }
    }
}
