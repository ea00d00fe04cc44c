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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::{BoxFuture, join_all};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, PersistentVolumeClaimTemplate};
use kube::api::{Api, PostParams};
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
use crate::model::{self, FailureReason, Need, Ownership, PodIdentity, SlimClaim, SlimPod, Volumes, VolumesInterner};

/// Settings of the ephemeral controller.
#[derive(Clone, Debug)]
pub struct EphemeralConfig {
    /// Pods handled at once.
    pub workers: u16,
    /// `reportingInstance` of events.
    pub instance: String,
    /// Retry delays of a pod whose claims failed.
    pub backoff: Backoff,
}

/// The ephemeral controller. Every replica watches; only while
/// `leadership` allows does it create claims or publish events.
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

/// What is kept of an active pod with generic ephemeral volumes.
#[derive(Clone, Debug)]
struct PodState {
    uid: Box<str>,
    /// Creation time in seconds since the epoch (the latency metric).
    created: Option<i64>,
    volumes: Volumes,
}

enum Signal {
    Pod(Box<Event<SlimPod>>),
    Claim(Box<Event<SlimClaim>>),
    WatchFailed { source: &'static str, error: String },
}

/// A handled pod: the outcome of each volume that needed work.
struct Handled {
    pod: Key,
    uid: Box<str>,
    outcomes: Vec<Result<String, ClaimFailure>>,
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

    /// Turns true once the pod and claim watches have listed.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until `shutdown` completes; pods in flight finish first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let pods = watcher::watcher(Api::<SlimPod>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .map(|event| match event {
                Ok(event) => Signal::Pod(Box::new(event)),
                Err(error) => Signal::WatchFailed {
                    source: "pods",
                    error: error.to_string(),
                },
            });
        let claims = watcher::watcher(Api::<SlimClaim>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .map(|event| match event {
                Ok(event) => Signal::Claim(Box::new(event)),
                Err(error) => Signal::WatchFailed {
                    source: "claims",
                    error: error.to_string(),
                },
            });
        let mut signals = futures::stream::select(pods.boxed(), claims.boxed());
        info!(workers = self.config.workers, "ephemeral controller starting");
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
    namespaces: HashSet<Arc<str>>,
    interner: VolumesInterner,
    /// Active pods with generic ephemeral volumes.
    pods: HashMap<Key, PodState>,
    pods_listing: Option<HashMap<Key, PodState>>,
    /// Every claim, with the UID of the pod that controls it (if one does).
    claims: HashMap<Key, Option<Box<str>>>,
    claims_listing: Option<HashMap<Key, Option<Box<str>>>>,
    pods_listed: bool,
    claims_listed: bool,
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
        Self {
            recorder: Recorder::new(controller.client.clone(), reporter),
            client: controller.client,
            config: controller.config,
            metrics: controller.metrics,
            leadership: controller.leadership,
            leading: false,
            ready: controller.ready,
            namespaces: HashSet::new(),
            interner: VolumesInterner::default(),
            pods: HashMap::new(),
            pods_listing: None,
            claims: HashMap::new(),
            claims_listing: None,
            pods_listed: false,
            claims_listed: false,
            synced: false,
            queue: WorkQueue::default(),
            blocked: HashMap::new(),
            tasks: FuturesUnordered::new(),
        }
    }

    fn key(&mut self, meta: &kube::api::ObjectMeta) -> Option<Key> {
        let namespace = meta.namespace.as_deref()?;
        let name = meta.name.as_deref()?;
        let namespace = match self.namespaces.get(namespace) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = namespace.into();
                self.namespaces.insert(shared.clone());
                shared
            }
        };
        Some(Key {
            namespace,
            name: name.into(),
        })
    }

    /// What is kept of `pod`: nothing unless it is active and has generic
    /// ephemeral volumes.
    fn pod_state(&mut self, pod: &SlimPod) -> Option<(Key, PodState)> {
        if !model::is_active(pod) {
            return None;
        }
        let volumes = model::ephemeral_volumes(pod);
        if volumes.is_empty() {
            return None;
        }
        let key = self.key(&pod.metadata)?;
        let state = PodState {
            uid: pod.metadata.uid.as_deref()?.into(),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            volumes: self.interner.intern(volumes),
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
            info!("leading: creating claims");
            self.look_at_every_pod();
        } else {
            info!(in_flight = self.tasks.len(), "not leading: no claims created");
        }
    }

    fn on_pod(&mut self, event: Event<SlimPod>) {
        match event {
            Event::Init => self.pods_listing = Some(HashMap::new()),
            Event::InitApply(pod) => {
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
                self.pods_listed = true;
                self.listed();
            }
            Event::Apply(pod) => match self.pod_state(&pod) {
                Some((key, state)) => {
                    self.pods.insert(key.clone(), state);
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
            },
            Event::Delete(pod) => {
                if let Some(key) = self.key(&pod.metadata) {
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
        if self.synced || !(self.pods_listed && self.claims_listed) {
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
                (i, model::need(cached, &state.uid))
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
            self.queue.succeeded(key);
            return;
        }
        if !self.leading {
            // Handled when this instance leads (every pod is looked at again then).
            self.metrics.reconciled("not_leading");
            return;
        }
        // Now, also when a retry was due later: something changed.
        self.queue.schedule(key.clone(), Instant::now());
    }

    /// Pod `key` is gone or needs no claims any more.
    fn forget(&mut self, key: &Key) {
        self.queue.forget(key);
        self.blocked.retain(|_, waiting| waiting != key);
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
        for outcome in outcomes {
            match outcome {
                Ok(claim) => {
                    // Known at once: a pod event before the watch confirms it creates nothing twice.
                    let claim = Key {
                        namespace: pod.namespace.clone(),
                        name: claim.into(),
                    };
                    self.claims.insert(claim, Some(uid.clone()));
                }
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
        if failures.is_empty() {
            self.queue.succeeded(&pod);
            self.metrics.reconciled("ok");
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
        warn!(%pod, error = %Error::Claims(failures), retry_in = ?delay, "ephemeral volumes not ready");
        self.queue.schedule(pod, Instant::now() + delay);
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
        let outcomes = join_all(self.needs.iter().map(|(i, need)| {
            let (volume, template) = &self.state.volumes[*i];
            self.ensure_claim(identity, volume, template, *need)
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
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.metrics
                .pod_to_claim_seconds
                .observe(u32::try_from((now - created).max(0)).map_or(f64::MAX, f64::from));
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
        assert_eq!(handled.outcomes, [Ok("p-v".to_string())]);
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
