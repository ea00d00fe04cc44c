//! The node side (`--node-deployment`): NodeGetVolumeStats for every
//! volume of this driver that pods on this node use, every interval.
//! Usage becomes metrics; a condition change becomes an event on each pod
//! using the volume. Runs on every node, no election.
//!
//! It reads only its node's pods (a field-selected watch) and, once per pod,
//! each of their claims and its PV by name: an instance on every node must
//! not list every PV in the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use volplane_csi::CsiClient;
use volplane_csi::csi::v1 as pb;
use volplane_runtime::events;
use volplane_runtime::relist::relisting;
use volplane_runtime::{Fed, Feed, Leadership, Readiness};

use crate::calls;
use crate::metrics::{HealthMetrics, claim_labels};
use crate::model::{self, Condition, Watched};
use crate::pods::Pods;

/// Settings of the node side.
#[derive(Clone, Debug)]
pub struct NodeHealthConfig {
    /// The driver name.
    pub driver: String,
    /// This node.
    pub node: String,
    /// The kubelet's root directory (volume paths are under it).
    pub kubelet_dir: String,
    /// Time between rounds of NodeGetVolumeStats.
    pub interval: Duration,
    /// Calls in flight at most.
    pub workers: usize,
    /// Whether the driver reports conditions (VOLUME_CONDITION).
    pub conditions: bool,
    /// `reportingInstance` of events.
    pub instance: String,
}

/// The node-side health agent.
pub struct NodeHealthAgent {
    client: kube::Client,
    csi: CsiClient,
    config: Arc<NodeHealthConfig>,
    metrics: Arc<HealthMetrics>,
    ready: Readiness,
}

impl std::fmt::Debug for NodeHealthAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHealthAgent").field("config", &self.config).finish()
    }
}

/// A volume published on this node and the pods using it.
#[derive(Clone, Debug)]
struct Published {
    volume: Watched,
    /// (pod reference, kubelet path of the volume for that pod).
    pods: Vec<(ObjectReference, String)>,
}

impl NodeHealthAgent {
    /// An agent; nothing runs until [`NodeHealthAgent::run`].
    pub fn new(client: kube::Client, csi: CsiClient, config: NodeHealthConfig, metrics: Arc<HealthMetrics>) -> Self {
        Self {
            client,
            csi,
            config: Arc::new(config),
            metrics,
            ready: Readiness::new(),
        }
    }

    /// Turns true once the pod cache is filled.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let config = self.config.clone();
        let on_this_node = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node));
        let (pods, pods_ready, pod_watch) = node_pods(Api::all(self.client.clone()), on_this_node);
        let watches = tokio::spawn(pod_watch);
        let ready = self.ready;
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "volplane-health-node".into(),
                instance: Some(config.instance.clone()),
            },
        );
        let shutdown = shutdown.fuse();
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {
                watches.abort();
                return;
            }
            _ = ready.mark_ready_when_all(vec![pods_ready]) => {}
        }
        info!(node = %config.node, driver = %config.driver, interval = ?config.interval, "node health agent synced");

        let mut round = Round {
            client: self.client.clone(),
            config: config.clone(),
            csi: self.csi.clone(),
            metrics: self.metrics.clone(),
            recorder,
            conditions: HashMap::new(),
            pod_events: HashMap::new(),
            labelled: BTreeSet::new(),
        };
        let mut volumes = Volumes::new(self.client.clone(), config.clone());
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = ticker.tick() => {
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = async {
                            // Not while the pods are being re-listed: a pod
                            // deleted meanwhile would still look mounted.
                            let Some(pods) = pods.current() else {
                                debug!("this node's pods are being re-listed; the round waits for the next tick");
                                return;
                            };
                            round.run(volumes.published(&pods).await).await;
                        } => {}
                    }
                }
            }
        }
        watches.abort();
        info!("node health agent stopped");
    }
}

/// This node's pods that mount claims: an index fed by their watch, read
/// only while it is a complete view.
#[derive(Clone)]
struct NodePods(Arc<Mutex<(Feed, Pods)>>);

impl NodePods {
    fn new() -> Self {
        Self(Arc::new(Mutex::new((Feed::new("pods"), Pods::default()))))
    }

    /// The pods, unless a list is under way (or none has ended yet).
    fn current(&self) -> Option<Vec<Pod>> {
        let guard = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (feed, pods) = &*guard;
        feed.is_current().then(|| pods.all().cloned().collect())
    }
}

/// The index of this node's pods, the flag its first list raises, and the
/// future that keeps it filled.
fn node_pods(api: Api<Pod>, config: watcher::Config) -> (NodePods, watch::Receiver<bool>, BoxFuture<'static, ()>) {
    let pods = NodePods::new();
    let (listed, ready) = watch::channel(false);
    let index = pods.clone();
    let filling = relisting(api, config)
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    let mut guard = index.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let (feed, pods) = &mut *guard;
                    if matches!(feed.feed(event, pods), Fed::Listed { .. }) {
                        listed.send_replace(true);
                    }
                }
                Err(error) => warn!(%error, "pod watch failed; listing again"),
            }
            async {}
        })
        .boxed();
    (pods, ready, filling)
}

/// A pod's claim: (pod UID, namespace, claim name).
type ClaimKey = (String, String, String);

/// Finds the volumes of this node's pods by name: each claim of a pod, then
/// the PV it is bound to, read once per pod and kept while the pod is on
/// the node. A claim not bound yet is asked again next round.
struct Volumes {
    client: kube::Client,
    config: Arc<NodeHealthConfig>,
    /// What each pod's claim is bound to (`None`: not this driver's volume).
    known: HashMap<ClaimKey, Option<Watched>>,
}

impl Volumes {
    fn new(client: kube::Client, config: Arc<NodeHealthConfig>) -> Self {
        Self {
            client,
            config,
            known: HashMap::new(),
        }
    }

    /// The volumes of this driver that pods on this node use, by PV name.
    async fn published(&mut self, pods: &[Pod]) -> BTreeMap<String, Published> {
        let node = self.config.node.as_str();
        let pods: Vec<Arc<Pod>> = pods
            .iter()
            .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter(|pod| pod.metadata.uid.is_some())
            .cloned()
            .map(Arc::new)
            .collect();
        let keys: Vec<(Arc<Pod>, ClaimKey)> = pods
            .iter()
            .flat_map(|pod| {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                model::pod_claims(pod)
                    .into_iter()
                    .map(move |(namespace, claim)| (pod.clone(), (uid.clone(), namespace, claim)))
            })
            .collect();
        self.learn(&keys).await;
        let mut out: BTreeMap<String, Published> = BTreeMap::new();
        for (pod, key) in &keys {
            let Some(Some(volume)) = self.known.get(key) else {
                continue;
            };
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: pod.metadata.namespace.clone(),
                name: pod.metadata.name.clone(),
                uid: Some(key.0.clone()),
                ..ObjectReference::default()
            };
            let path = model::published_path(&self.config.kubelet_dir, &key.0, &volume.pv);
            out.entry(volume.pv.clone())
                .or_insert_with(|| Published {
                    volume: volume.clone(),
                    pods: Vec::new(),
                })
                .pods
                .push((reference, path));
        }
        out
    }

    /// Keeps what is known of the claims in `keys` (forgetting the others)
    /// and looks up those not known yet.
    async fn learn(&mut self, keys: &[(Arc<Pod>, ClaimKey)]) {
        let wanted: HashSet<&ClaimKey> = keys.iter().map(|(_, key)| key).collect();
        self.known.retain(|key, _| wanted.contains(key));
        let missing: Vec<ClaimKey> = keys
            .iter()
            .map(|(_, key)| key)
            .filter(|key| !self.known.contains_key(*key))
            .cloned()
            .collect();
        let this = &*self;
        let found: Vec<(ClaimKey, Option<Option<Watched>>)> = futures::stream::iter(missing)
            .map(|key| async move {
                let found = this.look_up(&key.1, &key.2).await;
                (key, found)
            })
            .buffer_unordered(self.config.workers.max(1))
            .collect()
            .await;
        for (key, found) in found {
            if let Some(found) = found {
                self.known.insert(key, found);
            }
        }
    }

    /// The volume behind claim `namespace/name`: `Some(Some(_))` a bound
    /// volume of this driver, `Some(None)` a volume of another driver (for
    /// good), `None` not known yet (no claim, not bound, or a failed read).
    async fn look_up(&self, namespace: &str, name: &str) -> Option<Option<Watched>> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let claim = match claims.get_opt(name).await {
            Ok(claim) => claim?,
            Err(error) => {
                debug!(%namespace, claim = %name, %error, "cannot read the claim; next round");
                return None;
            }
        };
        let volume = claim.spec.and_then(|s| s.volume_name).filter(|v| !v.is_empty())?;
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        match pvs.get_opt(&volume).await {
            Ok(Some(pv)) => {
                let ours = pv.spec.as_ref().and_then(|s| s.csi.as_ref()).map(|c| c.driver.as_str())
                    == Some(self.config.driver.as_str());
                if !ours {
                    return Some(None);
                }
                // Bound to this very claim (not a stale name): else next round.
                model::watched(&pv, &self.config.driver)
                    .filter(|w| w.namespace == namespace && w.claim == name)
                    .map(Some)
            }
            Ok(None) => None,
            Err(error) => {
                debug!(pv = %volume, %error, "cannot read the volume; next round");
                None
            }
        }
    }
}

/// One round's bookkeeping, kept between rounds.
struct Round {
    client: kube::Client,
    config: Arc<NodeHealthConfig>,
    csi: CsiClient,
    metrics: Arc<HealthMetrics>,
    recorder: Recorder,
    /// Last announced condition per (pod UID, PV).
    conditions: HashMap<(String, String), Condition>,
    /// Each pod's earlier condition events, read at the first look at
    /// one of its volumes; dropped after the round.
    pod_events: HashMap<String, Vec<model::EarlierEvent>>,
    /// PVCs that have usage metrics (to drop them when the volume goes).
    labelled: BTreeSet<(String, String)>,
}

impl Round {
    async fn run(&mut self, published: BTreeMap<String, Published>) {
        let mut calls = FuturesUnordered::new();
        let mut pending = published.into_values();
        let mut results = Vec::new();
        loop {
            while calls.len() < self.config.workers.max(1) {
                let Some(volume) = pending.next() else {
                    break;
                };
                let csi = self.csi.clone();
                calls.push(async move {
                    // Any pod's path will do: the stats are the volume's.
                    let path = volume.pods.first().map(|(_, p)| p.clone()).unwrap_or_default();
                    let result = csi.node_get_volume_stats(&volume.volume.volume_handle, &path).await;
                    (volume, result)
                });
            }
            match calls.next().await {
                Some(result) => results.push(result),
                None => break,
            }
        }
        let mut seen = BTreeSet::new();
        let mut live_pvs = BTreeSet::new();
        for (volume, result) in results {
            let claim = (volume.volume.namespace.clone(), volume.volume.claim.clone());
            seen.insert(claim.clone());
            live_pvs.insert(volume.volume.pv.clone());
            match result {
                Ok(stats) => self.record(&volume, &stats).await,
                Err(error) => {
                    self.metrics.checked("error");
                    debug!(pv = %volume.volume.pv, %error, "NodeGetVolumeStats failed");
                }
            }
        }
        // Volumes no longer on this node: their series go.
        let gone: Vec<(String, String)> = self.labelled.difference(&seen).cloned().collect();
        for (namespace, claim) in gone {
            self.forget_metrics(&namespace, &claim);
            self.labelled.remove(&(namespace, claim));
        }
        self.conditions.retain(|(_, pv), _| live_pvs.contains(pv));
        self.pod_events.clear();
    }

    async fn record(&mut self, volume: &Published, stats: &pb::NodeGetVolumeStatsResponse) {
        let (namespace, claim) = (&volume.volume.namespace, &volume.volume.claim);
        self.labelled.insert((namespace.clone(), claim.clone()));
        self.record_usage(namespace, claim, &stats.usage);
        if !self.config.conditions {
            self.metrics.checked("no_condition");
            return;
        }
        let Some(reported) = stats.volume_condition.as_ref() else {
            self.metrics.checked("no_condition");
            return;
        };
        let condition = model::condition_of(reported.abnormal, &reported.message);
        self.metrics
            .checked(if reported.abnormal { "abnormal" } else { "normal" });
        self.metrics
            .node_abnormal
            .get_or_create(&claim_labels(namespace, claim))
            .set(i64::from(reported.abnormal));
        self.announce(volume, &condition).await;
    }

    /// Announces a changed condition of `volume` to each pod using it, once.
    async fn announce(&mut self, volume: &Published, condition: &Condition) {
        let (namespace, claim, pv) = (&volume.volume.namespace, &volume.volume.claim, &volume.volume.pv);
        for (pod, _) in &volume.pods {
            let key = (pod.uid.clone().unwrap_or_default(), pv.clone());
            if !self.conditions.contains_key(&key) {
                // First look since this agent started (a restart, a
                // rollout): what the pod's events say was announced.
                let about = model::node_note(pv, namespace, claim, "");
                let earlier = self.earlier_events(pod).await;
                let last = model::remembered(&earlier, &about, condition, std::time::SystemTime::now());
                if last == *condition && *condition != Condition::Normal {
                    info!(pod = ?pod.name, %pv, "already announced within the hour; not again");
                }
                self.conditions.insert(key.clone(), last);
            }
            let Some(announcement) = model::announcement(self.conditions.get(&key), condition) else {
                continue;
            };
            let type_ = if announcement.warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let note = model::node_note(pv, namespace, claim, &announcement.note);
            let event = events::Announcement::new(type_, announcement.reason, "CheckVolumeHealth", note);
            // Every node's agent writes for its own node: no election.
            match events::publish(&self.recorder, &Leadership::unconditional(), &event, pod).await {
                Ok(_) => {
                    self.metrics
                        .events
                        .get_or_create(&vec![("reason", announcement.reason)])
                        .inc();
                    self.conditions.insert(key, condition.clone());
                }
                Err(error) => warn!(%error, pod = ?pod.name, "cannot publish event; the next round retries"),
            }
        }
    }

    /// The condition events about `pod` (field-selected by the pod, its
    /// UID checked), read once per pod: volplane's own before a restart,
    /// the DaemonSet pod it replaced, or external-health-monitor's. None
    /// when they cannot be read (then the agent announces as if new).
    async fn earlier_events(&mut self, pod: &ObjectReference) -> Vec<model::EarlierEvent> {
        let uid = pod.uid.clone().unwrap_or_default();
        if let Some(known) = self.pod_events.get(&uid) {
            return known.clone();
        }
        let (Some(namespace), Some(name)) = (pod.namespace.as_deref(), pod.name.as_deref()) else {
            return Vec::new();
        };
        let about = format!("involvedObject.kind=Pod,involvedObject.name={name}");
        let earlier = calls::earlier_events(&self.client, namespace, &about, pod.uid.as_deref())
            .await
            .unwrap_or_default();
        self.pod_events.insert(uid, earlier.clone());
        earlier
    }

    /// The volume's bytes and inodes (used, available, total) as gauges.
    fn record_usage(&self, namespace: &str, claim: &str, usage: &[pb::VolumeUsage]) {
        use pb::volume_usage::Unit;
        for usage in usage {
            let family = match Unit::try_from(usage.unit) {
                Ok(Unit::Bytes) => &self.metrics.volume_bytes,
                Ok(Unit::Inodes) => &self.metrics.volume_inodes,
                _ => continue,
            };
            for (kind, value) in [
                ("used", usage.used),
                ("available", usage.available),
                ("total", usage.total),
            ] {
                let mut labels = claim_labels(namespace, claim);
                labels.push(("usage", kind.to_string()));
                family.get_or_create(&labels).set(value);
            }
        }
    }

    fn forget_metrics(&self, namespace: &str, claim: &str) {
        self.metrics.node_abnormal.remove(&claim_labels(namespace, claim));
        for family in [&self.metrics.volume_bytes, &self.metrics.volume_inodes] {
            for kind in ["used", "available", "total"] {
                let mut labels = claim_labels(namespace, claim);
                labels.push(("usage", kind.to_string()));
                family.remove(&labels);
            }
        }
    }
}
