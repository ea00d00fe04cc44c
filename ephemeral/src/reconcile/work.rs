//! The work of one pod, run as a task of the loop: creating the claims it
//! needs, or releasing the claims of a finished pod.

use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimTemplate,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::Recorder;
use tracing::{debug, info, warn};
use volplane_runtime::Leadership;
use volplane_runtime::events::{self, Announcement};

use super::{Done, FinishedPod, Handled, Key, PodState, epoch_seconds};
use crate::error::ClaimFailure;
use crate::metrics::EphemeralMetrics;
use crate::model::{self, FailureReason, Need, Ownership, PodIdentity};
use crate::release::{self, NodeFacts};

/// What a pod's work writes with (one copy each, cloned per task).
#[derive(Clone)]
pub(super) struct WorkIo {
    pub(super) client: kube::Client,
    pub(super) recorder: Recorder,
    pub(super) leadership: Leadership,
    pub(super) metrics: Arc<EphemeralMetrics>,
}

/// The claims of one finished pod, released.
pub(super) struct ReleaseWork {
    pub(super) io: WorkIo,
    pub(super) pod: Key,
    pub(super) state: PodState,
    pub(super) finished: FinishedPod,
    /// The pod's node as last seen, if it has one that exists.
    pub(super) node: Option<NodeFacts>,
    pub(super) needs: Vec<(usize, Need)>,
}

impl ReleaseWork {
    pub(super) async fn run(self) -> Handled {
        let outcomes: Vec<Result<Done, ClaimFailure>> = join_all(self.needs.iter().map(|(i, _)| {
            let (volume, _) = &self.state.volumes[*i];
            self.release(volume)
        }))
        .await;
        for (outcome, (i, _)) in outcomes.iter().zip(&self.needs) {
            if let Ok(Done::Released(claim)) = outcome {
                self.announce(claim, &self.state.volumes[*i].0).await;
            }
        }
        Handled {
            pod: self.pod.clone(),
            uid: self.state.uid.clone(),
            outcomes,
        }
    }

    /// Releases the claim of `volume` if it is the pod's and its volume is
    /// not in use: delete (UID precondition), then lift PVC protection.
    async fn release(&self, volume: &str) -> Result<Done, ClaimFailure> {
        let name = model::claim_name(&self.pod.name, volume);
        let failure = |message: String| ClaimFailure {
            claim: name.clone(),
            reason: FailureReason::Other,
            message,
        };
        let not_leading = || ClaimFailure {
            claim: name.clone(),
            reason: FailureReason::NotLeader,
            message: "not leading".into(),
        };
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.io.client.clone(), &self.pod.namespace);
        // Read fresh: the cache may be behind, and only the pod's own claim is touched.
        let claim = match api.get_opt(&name).await {
            Ok(Some(claim)) if model::controlling_pod(&claim.metadata) == Some(&*self.state.uid) => claim,
            Ok(_) => return Ok(Done::Untouched(name)),
            Err(error) => return Err(failure(format!("cannot read PVC {name}: {error}"))),
        };
        if let Some(node) = &self.node
            && self.in_use(node, &claim).await.map_err(failure)?
        {
            return Ok(Done::Waiting {
                generation: node.generation,
            });
        }
        let claim = if claim.metadata.deletion_timestamp.is_some() {
            // Deleted before (by an earlier run, or someone else).
            claim
        } else {
            match self.delete_own(&api, &name, &claim).await? {
                Some(terminating) => terminating,
                None => return Ok(Done::Released(name)),
            }
        };
        let Some(kept) = release::without_protection(claim.metadata.finalizers.as_deref().unwrap_or_default()) else {
            // Held only by someone else's finalizers: theirs to lift.
            return Ok(Done::Untouched(name));
        };
        // The resourceVersion makes it a compare-and-swap: the finalizers
        // written are those just read, less PVC protection's.
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": claim.metadata.resource_version,
            "finalizers": kept,
        }});
        match self
            .io
            .leadership
            .guard(api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
        {
            Err(_) => Err(not_leading()),
            Ok(Ok(_)) => Ok(Done::Released(name)),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(Done::Released(name)),
            Ok(Err(error)) => Err(failure(format!("lifting PVC protection from {name} failed: {error}"))),
        }
    }

    /// Deletes the pod's own `claim` (UID precondition): `Some` the claim
    /// still there, held by finalizers; `None` gone (also when it was
    /// already, or another object has the name now: nothing of the pod's
    /// is left to release).
    async fn delete_own(
        &self,
        api: &Api<PersistentVolumeClaim>,
        name: &str,
        claim: &PersistentVolumeClaim,
    ) -> Result<Option<PersistentVolumeClaim>, ClaimFailure> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: claim.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.io.leadership.guard(api.delete(name, &params)).await {
            Err(_) => Err(ClaimFailure {
                claim: name.to_string(),
                reason: FailureReason::NotLeader,
                message: "not leading".into(),
            }),
            // Left: still there, held by finalizers; Right: deleted.
            Ok(Ok(result)) => Ok(result.left()),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 || status.code == 409 => Ok(None),
            Ok(Err(error)) => Err(ClaimFailure {
                claim: name.to_string(),
                reason: FailureReason::Other,
                message: format!("deleting PVC {name} failed: {error}"),
            }),
        }
    }

    /// Whether `node` lists the volume of `claim` in `status.volumesInUse`
    /// (its PV is read only when the node lists anything).
    async fn in_use(&self, node: &NodeFacts, claim: &PersistentVolumeClaim) -> Result<bool, String> {
        let pv = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .filter(|n| !n.is_empty());
        let Some(pv) = pv.filter(|_| !node.volumes_in_use.is_empty()) else {
            return Ok(false);
        };
        let pv = Api::<PersistentVolume>::all(self.io.client.clone())
            .get_opt(pv)
            .await
            .map_err(|error| format!("cannot read PV {pv}: {error}"))?;
        Ok(release::in_use(node, &release::volume_source(pv.as_ref())))
    }

    /// The Normal event on the pod, the metric and the log line of a release.
    async fn announce(&self, claim: &str, volume: &str) {
        let facts = &self.finished.facts;
        let reason = facts.ending.label();
        self.io.metrics.released.get_or_create(&vec![("reason", reason)]).inc();
        info!(pod = %self.pod, claim, reason, "released the claim of a finished pod");
        let announcement = Announcement::normal(
            "EphemeralVolumeReleased",
            "ReleaseClaim",
            release::note(claim, volume, facts),
        );
        let target = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.pod.namespace.to_string()),
            name: Some(self.pod.name.to_string()),
            uid: Some(self.state.uid.to_string()),
            ..ObjectReference::default()
        };
        if let Err(error) = events::publish(&self.io.recorder, &self.io.leadership, &announcement, &target).await {
            warn!(%error, "cannot publish event");
        }
    }
}

/// The claims one pod needs, made.
pub(super) struct PodWork {
    pub(super) io: WorkIo,
    pub(super) pod: Key,
    pub(super) state: PodState,
    pub(super) needs: Vec<(usize, Need)>,
}

impl PodWork {
    /// Every volume is handled, even when another fails; failures are
    /// counted and published as Warning events on the pod.
    pub(super) async fn run(self) -> Handled {
        let identity = PodIdentity {
            namespace: &self.pod.namespace,
            name: &self.pod.name,
            uid: &self.state.uid,
        };
        let this = &self;
        let outcomes: Vec<Result<Done, ClaimFailure>> = join_all(self.needs.iter().map(|(i, need)| {
            let (volume, template) = &this.state.volumes[*i];
            async move {
                this.ensure_claim(identity, volume, template, *need)
                    .await
                    .map(Done::Created)
            }
        }))
        .await;
        for failure in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            if failure.reason == FailureReason::NotLeader {
                continue;
            }
            self.io
                .metrics
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
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.io.client.clone(), pod.namespace);
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
        if need == Need::Check
            // Known to exist and not to be the pod's: read it again, it may have changed.
            && let Some(existing) = existing_claim(&api, &name).await?
        {
            return verdict(existing);
        }
        let claim = model::desired_claim(&pod, volume, template);
        let leadership = &self.io.leadership;
        let Ok(created) = leadership.guard(api.create(&PostParams::default(), &claim)).await else {
            return Err(failure(FailureReason::NotLeader, "not leading".into()));
        };
        match created {
            Ok(_) => {
                self.count_created();
                debug!(namespace = %pod.namespace, pod = %pod.name, claim = %name, "created PVC for ephemeral volume");
                Ok(name)
            }
            // Created meanwhile, e.g. by kube-controller-manager's own controller: whose is it?
            Err(kube::Error::Api(status)) if status.code == 409 => match existing_claim(&api, &name).await? {
                Some(existing) => verdict(existing),
                None => Err(failure(
                    FailureReason::Other,
                    format!("PVC {name} already exists, then was gone; retrying"),
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
        self.io.metrics.created.inc();
        if let Some(created) = self.state.created {
            self.io
                .metrics
                .pod_to_claim_seconds
                .observe(u32::try_from((epoch_seconds() - created).max(0)).map_or(f64::MAX, f64::from));
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
        if let Err(error) = events::publish(&self.io.recorder, &self.io.leadership, &announcement, &target).await {
            warn!(%error, "cannot publish event");
        }
    }
}

/// The metadata of claim `name`, read fresh; `None` when there is none.
async fn existing_claim(
    api: &Api<PersistentVolumeClaim>,
    name: &str,
) -> Result<Option<kube::api::PartialObjectMeta<PersistentVolumeClaim>>, ClaimFailure> {
    api.get_metadata_opt(name).await.map_err(|error| ClaimFailure {
        claim: name.to_string(),
        reason: FailureReason::Other,
        message: format!("cannot read existing PVC {name}: {error}"),
    })
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

    use kube::runtime::events::Reporter;

    use super::*;
    use crate::model::SlimPod;

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
            io: WorkIo {
                client: client.clone(),
                recorder: Recorder::new(client.clone(), Reporter::from("test")),
                leadership: Leadership::unconditional(),
                metrics: Arc::new(EphemeralMetrics::register(&mut registry)),
            },
            pod: Key {
                namespace: "default".into(),
                name: "p".into(),
            },
            state: PodState {
                uid: slim.metadata.uid.as_deref().unwrap_or_default().into(),
                created: None,
                volumes: model::ephemeral_volumes(&slim).into(),
                finished: None,
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
        assert_eq!(handled.outcomes, [Ok(Done::Created("p-v".to_string()))]);
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
