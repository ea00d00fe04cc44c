//! The watches behind the capacity controller, as one stream of signals.
//!
//! Everything large is cut on arrival: CSIStorageCapacity objects and PVs
//! are deserialized into slim types, Node metadata is cut to the labels of
//! the driver's topology keys before it reaches the loop. Only the few
//! StorageClasses and the driver's CSIDriver are cached whole.

use std::collections::BTreeSet;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use volplane_runtime::relist::relisting;

use crate::claim::ClaimObject;
use crate::config::{CapacityConfig, Topology};
use crate::model::{CapacityObject, Enablement, VolumeObject};
use crate::topology::{KeySet, NodeLabels, kept_labels};

/// What the watches deliver to the loop.
pub enum Signal {
    /// The StorageClass cache changed (`synced`: its list finished).
    Classes { synced: bool },
    /// The CSIDriver cache changed.
    Driver { synced: bool },
    /// A Node event (central mode).
    Node(Event<NodeLabels>),
    /// A CSINode event (central mode).
    CsiNode(Box<Event<CSINode>>),
    /// An event of volplane's own CSIStorageCapacity objects.
    Capacity(Box<Event<CapacityObject>>),
    /// An event of csi-provisioner's objects for the driver (`--capacity-adopt`).
    Incumbent(Box<Event<CapacityObject>>),
    /// An event of other controllers' (or nobody's) objects for the driver
    /// (central mode).
    Foreign(Box<Event<CapacityObject>>),
    /// A PV event (central mode).
    Volume(Box<Event<VolumeObject>>),
    /// A PVC event (central mode): the scheduler's placements in flight.
    Claim(Box<Event<ClaimObject>>),
    /// An event of this node's placements ConfigMap (per-node mode).
    NodePlacements(Box<Event<ConfigMap>>),
    /// A watch failed; it retries with backoff.
    WatchFailed { source: &'static str, error: String },
}

/// The watches: their streams, the caches of the small collections, and
/// the switch that (re)starts the Node watch with a key set.
pub struct Inputs {
    /// Every watch's signals.
    pub streams: Vec<BoxStream<'static, Signal>>,
    /// Sources whose first list must be done before the loop acts.
    pub required: BTreeSet<&'static str>,
    /// StorageClasses.
    pub classes: Store<StorageClass>,
    /// The driver's CSIDriver (`--capacity-enablement csidriver`).
    pub driver: Option<Store<CSIDriver>>,
    /// Starts the Node watch, and lists the Nodes again, with the keys to keep.
    pub node_keys: Option<watch::Sender<Option<KeySet>>>,
}

impl Inputs {
    /// The watches the loop follows: volplane's own objects (label-selected),
    /// StorageClasses, the CSIDriver by name (when it switches tracking) and,
    /// in central mode, PVs, CSINodes and Nodes (metadata). A per-node
    /// instance reads no cluster-wide collection but the StorageClasses.
    pub fn watch(client: &kube::Client, config: &CapacityConfig, central: bool) -> Self {
        let own = objects(client, config, &config.identity.selector(), "capacities", |e| {
            Signal::Capacity(Box::new(e))
        });
        let (classes, class_signals) = cached(Api::all(client.clone()), watcher::Config::default(), |synced| {
            Signal::Classes { synced }
        });
        let mut inputs = Self {
            streams: vec![own, class_signals],
            required: ["capacities", "classes"].into(),
            classes,
            driver: None,
            node_keys: None,
        };
        if let Some(managed_by) = &config.adopt_from {
            let theirs = format!(
                "{}={},{}={managed_by}",
                crate::model::DRIVER_LABEL,
                config.identity.driver,
                crate::model::MANAGED_BY_LABEL
            );
            let signals = objects(client, config, &theirs, "incumbents", |e| {
                Signal::Incumbent(Box::new(e))
            });
            inputs.add("incumbents", signals);
        }
        if config.enablement == Enablement::CsiDriver {
            let by_name = watcher::Config::default().fields(&format!("metadata.name={}", config.driver));
            let (store, signals) = cached(Api::all(client.clone()), by_name, |synced| Signal::Driver { synced });
            inputs.add("csidriver", signals);
            inputs.driver = Some(store);
        }
        if central {
            inputs.watch_central(client, config);
        }
        if let Some(node) = &config.node_placements {
            // One object, by name: O(1) for the API server per node.
            let name = crate::placements::config_map_name(node);
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &config.identity.namespace);
            let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let signals = relisting(api, by_name)
                .map(|event| match event {
                    Ok(event) => Signal::NodePlacements(Box::new(event)),
                    Err(error) => failed("node placements", &error),
                })
                .boxed();
            inputs.add("node placements", signals);
        }
        inputs
    }

    /// A central instance's cluster-wide watches: other controllers'
    /// objects for the driver, PVs, PVCs (slim: the placements in flight)
    /// and, with topology, CSINodes and Nodes.
    fn watch_central(&mut self, client: &kube::Client, config: &CapacityConfig) {
        // Everyone else's objects for the driver: reported, never touched.
        let others = format!(
            "{driver_label}={},{managed_label}!={},{managed_label}!=external-provisioner",
            config.identity.driver,
            config.identity.managed_by,
            driver_label = crate::model::DRIVER_LABEL,
            managed_label = crate::model::MANAGED_BY_LABEL,
        );
        self.streams
            .push(objects(client, config, &others, "foreign capacities", |e| {
                Signal::Foreign(Box::new(e))
            }));
        self.add(
            "volumes",
            signals("volumes", Api::<VolumeObject>::all(client.clone()), |e| {
                Signal::Volume(Box::new(e))
            }),
        );
        self.add(
            "claims",
            signals("claims", Api::<ClaimObject>::all(client.clone()), |e| {
                Signal::Claim(Box::new(e))
            }),
        );
        if config.topology == Topology::Central {
            self.add(
                "csinodes",
                signals("csinodes", Api::<CSINode>::all(client.clone()), |e| {
                    Signal::CsiNode(Box::new(e))
                }),
            );
            let (keys, kept) = watch::channel(None);
            self.add("nodes", node_labels(client.clone(), kept));
            self.node_keys = Some(keys);
        }
    }

    fn add(&mut self, source: &'static str, signals: BoxStream<'static, Signal>) {
        self.required.insert(source);
        self.streams.push(signals);
    }
}

/// A watch of the CSIStorageCapacity objects in volplane's namespace that
/// `selector` selects.
fn objects(
    client: &kube::Client,
    config: &CapacityConfig,
    selector: &str,
    source: &'static str,
    signal: fn(Event<CapacityObject>) -> Signal,
) -> BoxStream<'static, Signal> {
    let api: Api<CapacityObject> = Api::namespaced(client.clone(), &config.identity.namespace);
    relisting(api, watcher::Config::default().labels(selector))
        .map(move |event| match event {
            Ok(event) => signal(event),
            Err(error) => failed(source, &error),
        })
        .boxed()
}

fn failed(source: &'static str, error: &watcher::Error) -> Signal {
    Signal::WatchFailed {
        source,
        error: error.to_string(),
    }
}

/// A watch of `K` whose events go to the loop as they are.
fn signals<K>(
    source: &'static str,
    api: Api<K>,
    signal: impl Fn(Event<K>) -> Signal + Send + 'static,
) -> BoxStream<'static, Signal>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    relisting(api, watcher::Config::default())
        .map(move |event| match event {
            Ok(event) => signal(event),
            Err(error) => failed(source, &error),
        })
        .boxed()
}

/// A cached watch of `K`: the loop hears that it changed, and reads the cache.
fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: fn(bool) -> Signal,
) -> (Store<K>, BoxStream<'static, Signal>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let source = K::plural(&Default::default()).into_owned();
    let signals = reflector::reflector(writer, relisting(api, config))
        .filter_map(move |event| {
            let signal = match event {
                Ok(Event::InitDone) => Some(changed(true)),
                Ok(Event::Apply(_) | Event::Delete(_)) => Some(changed(false)),
                Ok(Event::Init | Event::InitApply(_)) => None,
                Err(error) => Some(Signal::WatchFailed {
                    source: if source == "storageclasses" {
                        "classes"
                    } else {
                        "csidriver"
                    },
                    error: error.to_string(),
                }),
            };
            async move { signal }
        })
        .boxed();
    (store, signals)
}

/// The Node watch, metadata only, each node cut to the labels of the keys
/// `keys` holds. It starts once `keys` has a value (the CSINodes are
/// listed), and starts over — listing the Nodes again — whenever the value
/// changes (a CSINode named a new topology key).
fn node_labels(client: kube::Client, keys: watch::Receiver<Option<KeySet>>) -> BoxStream<'static, Signal> {
    let restarts = keys.clone();
    let key_sets = futures::stream::unfold((keys, None::<KeySet>), |(mut keys, last)| async move {
        let next = keys
            .wait_for(|now| now.is_some() && *now != last)
            .await
            .ok()
            .and_then(|now| now.clone())?;
        Some((next.clone(), (keys, Some(next))))
    });
    let changes = key_sets.map(move |kept: KeySet| {
        let mut changed = restarts.clone();
        let until = {
            let kept = kept.clone();
            async move {
                let _ = changed.wait_for(|now| now.as_ref() != Some(&kept)).await;
            }
        };
        let nodes: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
        relisting(nodes, watcher::Config::default())
            .take_until(until.boxed())
            .map(move |event| match event {
                Ok(event) => Signal::Node(cut(event, &kept)),
                Err(error) => failed("nodes", &error),
            })
            .boxed()
    });
    changes.flatten().boxed()
}

/// A Node event cut to the labels of `kept`.
fn cut(event: Event<PartialObjectMeta<Node>>, kept: &KeySet) -> Event<NodeLabels> {
    volplane_runtime::index::convert(event, |meta| NodeLabels {
        labels: kept_labels(meta.metadata.labels.as_ref(), kept),
        name: meta.metadata.name.unwrap_or_default(),
        kept: kept.clone(),
    })
}
