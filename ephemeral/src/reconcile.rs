//! The ephemeral controller on kube-runtime: a pod watch, cached as
//! [`EphemeralPod`]s, drives
//! reconciles; a trimmed metadata-only PVC watch serves as the cache of existing
//! claims and re-queues pods when a claim they wait for is deleted or
//! adopted (tombstones included).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimTemplate, Pod};
use kube::api::{Api, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use volplane_runtime::events::{self, Announcement};
use volplane_runtime::{Backoff, Leadership, Readiness};

use crate::error::{ClaimFailure, Error};
use crate::metrics::EphemeralMetrics;
use crate::model::{self, EphemeralPod, FailureReason, Ownership};

/// Settings of the ephemeral controller.
#[derive(Clone, Debug)]
pub struct EphemeralConfig {
    /// Pods reconciled at once.
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

type ClaimKey = (String, String);

struct Context {
    client: kube::Client,
    claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    claims_ready: watch::Receiver<bool>,
    recorder: Recorder,
    metrics: Arc<EphemeralMetrics>,
    /// Claims a pod waits for because a foreign PVC holds the name.
    blocked: Arc<Mutex<HashMap<ClaimKey, ObjectRef<EphemeralPod>>>>,
    failures: Mutex<HashMap<ObjectRef<EphemeralPod>, u32>>,
    backoff: Backoff,
    leadership: Leadership,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    /// Turns true once the pod and PVC caches are filled.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// What every reconcile shares: the claim cache (and whether it has
    /// listed), the recorder, metrics, retry state and leadership.
    fn context(
        &self,
        claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
        claims_ready: watch::Receiver<bool>,
        blocked: Arc<Mutex<HashMap<ClaimKey, ObjectRef<EphemeralPod>>>>,
    ) -> Arc<Context> {
        let reporter = Reporter {
            controller: "volplane-ephemeral".into(),
            instance: Some(self.config.instance.clone()),
        };
        Arc::new(Context {
            client: self.client.clone(),
            claims,
            claims_ready,
            recorder: Recorder::new(self.client.clone(), reporter),
            metrics: self.metrics.clone(),
            blocked,
            failures: Mutex::default(),
            backoff: self.config.backoff,
            leadership: self.leadership.clone(),
        })
    }

    /// Runs until `shutdown` completes; reconciles in flight finish first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + Sync + 'static) -> Result<(), Error> {
        // Readiness is tracked with watch channels: a store's own
        // `wait_until_ready` wakes only one of several concurrent waiters.
        let (pods_listed, pods_ready) = watch::channel(false);
        let (claims_listed, claims_ready) = watch::channel(false);
        let (pod_store, pod_writer) = reflector::store::<EphemeralPod>();
        let pods = watcher::watcher(Api::<Pod>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .map_ok(cached)
            .reflect(pod_writer)
            .inspect_ok(move |event| {
                if matches!(event, watcher::Event::InitDone) {
                    pods_listed.send_replace(true);
                }
            })
            .applied_objects();

        let (claim_store, claim_writer) = reflector::store::<PartialObjectMeta<PersistentVolumeClaim>>();
        let claims = watcher::watcher(
            Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|claim| model::trim_claim(&mut claim.metadata))
        .reflect(claim_writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                claims_listed.send_replace(true);
            }
        })
        .touched_objects();

        let blocked: Arc<Mutex<HashMap<ClaimKey, ObjectRef<EphemeralPod>>>> = Arc::default();
        let context = self.context(claim_store, claims_ready.clone(), blocked.clone());

        let ready = self.ready;
        let readiness = tokio::spawn(async move {
            if ready.mark_ready_when_all(vec![pods_ready, claims_ready]).await {
                info!("ephemeral controller synced");
            }
        });

        info!(workers = self.config.workers, "ephemeral controller starting");
        Controller::for_stream(pods, pod_store)
            .watches_stream(claims, move |claim| pods_waiting_for(&claim, &blocked))
            // Pods skipped while following are all looked at again at each gain.
            .reconcile_all_on(self.leadership.clone().gains())
            .with_config(ControllerConfig::default().concurrency(self.config.workers))
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, context)
            .for_each(|result| async move {
                if let Err(error) = result {
                    debug!(%error, "reconcile did not complete");
                }
            })
            .await;
        readiness.abort();
        info!("ephemeral controller stopped");
        Ok(())
    }
}

/// A pod event as the cache keeps it: [`EphemeralPod`], not the whole `Pod`.
fn cached(event: watcher::Event<Pod>) -> watcher::Event<EphemeralPod> {
    match event {
        watcher::Event::Apply(pod) => watcher::Event::Apply(pod.into()),
        watcher::Event::Delete(pod) => watcher::Event::Delete(pod.into()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(pod) => watcher::Event::InitApply(pod.into()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The pods a PVC event concerns: the pod that controls it (its claim may
/// have to be re-created) and a pod blocked on its name (it may now be free).
fn pods_waiting_for(
    claim: &PartialObjectMeta<PersistentVolumeClaim>,
    blocked: &Mutex<HashMap<ClaimKey, ObjectRef<EphemeralPod>>>,
) -> Vec<ObjectRef<EphemeralPod>> {
    let Some(namespace) = claim.metadata.namespace.clone() else {
        return Vec::new();
    };
    let name = claim.name_any();
    let mut pods = Vec::new();
    if let Some(pod) = lock(blocked).get(&(namespace.clone(), name)) {
        pods.push(pod.clone());
    }
    if let Some(owner) = claim
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == "Pod")
    {
        pods.push(ObjectRef::new(&owner.name).within(&namespace));
    }
    pods
}

async fn reconcile(pod: Arc<EphemeralPod>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Decide on existing claims only once the claim cache is complete.
    let _ = ctx.claims_ready.clone().wait_for(|r| *r).await;
    let pod_ref = ObjectRef::from_obj(pod.as_ref());
    if !ctx.leadership.may_write() {
        ctx.metrics.reconciled("not_leading");
        return Ok(Action::await_change());
    }
    let volumes = model::ephemeral_volumes(&pod);
    if !model::is_active(&pod) || volumes.is_empty() {
        ctx.forget(&pod_ref);
        return Ok(Action::await_change());
    }
    // Every volume is handled, even when another fails.
    let outcomes = join_all(
        volumes
            .iter()
            .map(|(volume, template)| ensure_claim(&pod, volume, template, &ctx)),
    )
    .await;
    let failures: Vec<ClaimFailure> = outcomes.into_iter().filter_map(Result::err).collect();
    if failures.iter().any(|f| f.reason == FailureReason::NotLeader) {
        // Leadership ended meanwhile; the next leader (maybe this one) redoes the pod.
        ctx.metrics.reconciled("not_leading");
        return Ok(Action::await_change());
    }
    {
        let mut blocked = lock(&ctx.blocked);
        blocked.retain(|_, waiting| *waiting != pod_ref);
        let namespace = pod.namespace().unwrap_or_default();
        for failure in failures.iter().filter(|f| f.reason == FailureReason::Conflict) {
            blocked.insert((namespace.clone(), failure.claim.clone()), pod_ref.clone());
        }
    }
    if failures.is_empty() {
        lock(&ctx.failures).remove(&pod_ref);
        ctx.metrics.reconciled("ok");
        return Ok(Action::await_change());
    }
    ctx.metrics.reconciled("failed");
    for failure in &failures {
        ctx.metrics
            .failures
            .get_or_create(&vec![("reason", failure.reason.label().to_string())])
            .inc();
        ctx.publish_warning(&pod, failure).await;
    }
    Err(Error::Claims(failures))
}

fn error_policy(pod: Arc<EphemeralPod>, error: &Error, ctx: Arc<Context>) -> Action {
    let pod_ref = ObjectRef::from_obj(pod.as_ref());
    let failures = {
        let mut all = lock(&ctx.failures);
        let n = all.entry(pod_ref).or_insert(0);
        *n += 1;
        *n
    };
    let delay = ctx.backoff.delay(failures);
    warn!(pod = %pod.name_any(), namespace = %pod.namespace().unwrap_or_default(), %error, retry_in = ?delay, "ephemeral volumes not ready");
    Action::requeue(delay)
}

async fn ensure_claim(
    pod: &EphemeralPod,
    volume: &str,
    template: &PersistentVolumeClaimTemplate,
    ctx: &Context,
) -> Result<(), ClaimFailure> {
    let pod_name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let uid = pod.uid().unwrap_or_default();
    let name = model::claim_name(&pod_name, volume);
    let failure = |reason: FailureReason, message: String| ClaimFailure {
        claim: name.clone(),
        reason,
        message,
    };
    let check = |meta: &kube::api::ObjectMeta| match model::ownership(meta, &uid) {
        Ownership::Pod => Ok(()),
        Ownership::Foreign(why) => Err(failure(
            FailureReason::Conflict,
            format!("PVC {name} for ephemeral volume {volume:?} cannot be used: {why}; it is left untouched"),
        )),
    };
    if let Some(existing) = ctx.claims.get(&ObjectRef::new(&name).within(&namespace)) {
        return check(&existing.metadata);
    }
    let Some(claim) = model::desired_claim(pod, volume, template) else {
        return Err(failure(FailureReason::Other, "the pod has no UID yet".into()));
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let Ok(created) = ctx.leadership.guard(api.create(&PostParams::default(), &claim)).await else {
        return Err(failure(FailureReason::NotLeader, "not leading".into()));
    };
    match created {
        Ok(_) => {
            ctx.count_created(pod);
            debug!(%namespace, pod = %pod_name, claim = %name, "created PVC for ephemeral volume");
            Ok(())
        }
        // Created meanwhile, e.g. by kube-controller-manager's own controller.
        Err(kube::Error::Api(status)) if status.code == 409 => match api.get_metadata(&name).await {
            Ok(existing) => check(&existing.metadata),
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

impl Context {
    /// Counts a created claim and how long after its pod it came.
    fn count_created(&self, pod: &EphemeralPod) {
        self.metrics.created.inc();
        if let Some(created) = pod.creation_timestamp() {
            let pod_secs = created.0.as_second();
            let now_secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.metrics
                .pod_to_claim_seconds
                .observe(u32::try_from((now_secs - pod_secs).max(0)).map_or(f64::MAX, f64::from));
        }
    }

    fn forget(&self, pod: &ObjectRef<EphemeralPod>) {
        lock(&self.blocked).retain(|_, waiting| waiting != pod);
        lock(&self.failures).remove(pod);
    }

    async fn publish_warning(&self, pod: &EphemeralPod, failure: &ClaimFailure) {
        let reason = match failure.reason {
            FailureReason::Conflict => "EphemeralClaimConflict",
            _ => "EphemeralClaimFailed",
        };
        let announcement = Announcement::warning(reason, "CreateClaim", failure.note());
        if let Err(error) = events::publish(&self.recorder, &self.leadership, &announcement, &pod.object_ref(&())).await
        {
            warn!(%error, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::events::v1::Event;
    use kube::api::ListParams;
    use prometheus_client::registry::Registry;
    use serde_json::json;
    use volplane_tests::apiserver::{ApiServerDouble, Verb};

    use super::*;

    /// A context whose claim cache is empty and complete, so a PVC that
    /// exists in the API server reaches the create call and its 409.
    fn context(client: kube::Client) -> Context {
        let (claims, mut writer) = reflector::store::<PartialObjectMeta<PersistentVolumeClaim>>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let mut registry = Registry::default();
        Context {
            recorder: Recorder::new(client.clone(), Reporter::from("test")),
            client,
            claims,
            claims_ready: watch::channel(true).1,
            metrics: Arc::new(EphemeralMetrics::register(&mut registry)),
            blocked: Arc::default(),
            failures: Mutex::default(),
            backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_secs(300),
            },
            leadership: Leadership::unconditional(),
        }
    }

    #[tokio::test]
    async fn already_exists_with_the_pods_uid_is_success_without_event() {
        let double = ApiServerDouble::start().await.expect("double");
        let client = double.client();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
            "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}}]}}))
        .expect("pod");
        let pod = EphemeralPod::from(pods.create(&PostParams::default(), &pod).await.expect("pod"));
        // Another controller (kube-controller-manager's) won the race.
        let (volume, template) = model::ephemeral_volumes(&pod)[0];
        let claim = model::desired_claim(&pod, volume, template).expect("claim");
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &claim)
            .await
            .expect("claim");
        double.clear_requests();

        let ctx = context(client.clone());
        let outcome = ensure_claim(&pod, volume, template, &ctx).await;
        assert_eq!(outcome, Ok(()));
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
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
            "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}}]}}))
        .expect("pod");
        let pod = EphemeralPod::from(
            Api::<Pod>::namespaced(client.clone(), "default")
                .create(&PostParams::default(), &pod)
                .await
                .expect("pod"),
        );
        let foreign: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": "p-v", "labels": {"keep": "me"}}})).expect("pvc");
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &foreign)
            .await
            .expect("foreign");
        double.clear_requests();
        let ctx = context(client);
        let (volume, template) = model::ephemeral_volumes(&pod)[0];
        let failure = ensure_claim(&pod, volume, template, &ctx).await.expect_err("conflict");
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
    }
}
