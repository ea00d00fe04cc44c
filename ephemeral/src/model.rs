//! The ephemeral controller's pure model: which PVC a pod's generic
//! ephemeral volume needs, and whether an existing PVC belongs to the pod.
//!
//! The contract is Kubernetes': the scheduler, kubelet, attach/detach
//! controller, PVC protection and the node authorizer all compute
//! `<pod>-<volume>` and check that the PVC's controller owner reference
//! carries the pod's UID.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimTemplate, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;

/// A pod as the controller reads it from the API server: identity, its
/// volumes (generic ephemeral ones whole, claims referenced by name), its
/// node, and of its status the phase, reason and whether containers ever
/// ran. Everything else in the pod — containers, managed fields, the rest of
/// the status — is skipped by the parser.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimPod {
    /// Name, namespace, UID, creation and deletion time.
    #[serde(deserialize_with = "volplane_runtime::slim::metadata")]
    pub metadata: ObjectMeta,
    /// `spec.volumes` and `spec.nodeName`.
    pub spec: Option<SlimPodSpec>,
    /// `status`: phase, reason, container states.
    pub status: Option<SlimPodStatus>,
}

volplane_runtime::slim_resource!(SlimPod, Pod);

/// The part of a pod's spec the controller reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    /// The pod's volumes.
    pub volumes: Option<Vec<SlimVolume>>,
    /// The node the pod is bound to.
    pub node_name: Option<String>,
}

/// A pod volume: its name and, for a generic ephemeral volume, the template.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimVolume {
    /// The volume name.
    pub name: String,
    /// `ephemeral`, when it is a generic ephemeral volume.
    pub ephemeral: Option<SlimEphemeral>,
    /// `persistentVolumeClaim`, when it mounts a claim by name.
    #[serde(rename = "persistentVolumeClaim")]
    pub claim: Option<SlimClaimSource>,
}

/// `volume.persistentVolumeClaim`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimClaimSource {
    /// The claim's name, in the pod's namespace.
    pub claim_name: String,
}

/// `volume.ephemeral`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimEphemeral {
    /// The claim template.
    pub volume_claim_template: Option<PersistentVolumeClaimTemplate>,
}

/// The part of a pod's status the controller reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: Option<String>,
    /// Why the pod is in this phase (`OutOfcpu`, `NodeAffinity`, …).
    pub reason: Option<String>,
    /// `initContainerStatuses`.
    pub init_container_statuses: Option<Vec<SlimContainerStatus>>,
    /// `containerStatuses`.
    pub container_statuses: Option<Vec<SlimContainerStatus>>,
    /// `ephemeralContainerStatuses`.
    pub ephemeral_container_statuses: Option<Vec<SlimContainerStatus>>,
}

impl SlimPodStatus {
    /// Every container status of the pod: init, regular and ephemeral.
    pub fn containers(&self) -> impl Iterator<Item = &SlimContainerStatus> {
        [
            &self.init_container_statuses,
            &self.container_statuses,
            &self.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        .flatten()
    }
}

/// A container status as far as releasing claims needs it: did the
/// container ever run, and when did it finish.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimContainerStatus {
    /// The current state.
    pub state: Option<SlimContainerState>,
    /// The state before the last restart.
    pub last_state: Option<SlimContainerState>,
    /// Whether the startup probe passed.
    pub started: Option<bool>,
}

/// `running`, `terminated` (with `finishedAt`) or neither (waiting).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimContainerState {
    /// Present while the container runs.
    pub running: Option<serde::de::IgnoredAny>,
    /// Present once it has exited.
    pub terminated: Option<SlimTerminated>,
}

/// `state.terminated`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimTerminated {
    /// When the container exited.
    pub finished_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// A node as the release of finished pods' claims reads it: Ready, and
/// the volumes its kubelet has in use.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimNode {
    /// Its name.
    #[serde(deserialize_with = "volplane_runtime::slim::metadata")]
    pub metadata: ObjectMeta,
    /// Conditions and `volumesInUse`.
    pub status: Option<SlimNodeStatus>,
}

volplane_runtime::slim_resource!(SlimNode, k8s_openapi::api::core::v1::Node);

/// The part of a node's status the controller reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimNodeStatus {
    /// Its conditions, of which Ready counts.
    pub conditions: Option<Vec<SlimCondition>>,
    /// The unique names of the volumes the kubelet has in use (attachable
    /// drivers only).
    pub volumes_in_use: Option<Vec<String>>,
}

/// A condition's type and status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimCondition {
    /// `Ready`, …
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
}

/// A PVC as the controller reads it: its metadata, for ownership.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimClaim {
    /// Name, namespace, UID, owner references.
    #[serde(deserialize_with = "volplane_runtime::slim::metadata")]
    pub metadata: ObjectMeta,
}

volplane_runtime::slim_resource!(SlimClaim, PersistentVolumeClaim);

/// A pod's generic ephemeral volumes: (volume name, claim template). Pods
/// with equal volumes (the pods of one workload) share one copy.
pub type Volumes = Arc<[Volume]>;

/// One generic ephemeral volume: its name and claim template.
pub type Volume = (String, PersistentVolumeClaimTemplate);

/// Who a claim is made for: the pod's namespace, name and UID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodIdentity<'a> {
    /// The pod's namespace (the claim's too).
    pub namespace: &'a str,
    /// The pod's name.
    pub name: &'a str,
    /// The pod's UID, which the claim's owner reference carries.
    pub uid: &'a str,
}

/// The PVC name of ephemeral volume `volume` in pod `pod`.
pub use volplane_runtime::naming::ephemeral_claim as claim_name;

/// Whether the pod still needs its volumes: not being deleted, not finished.
pub fn is_active(pod: &SlimPod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

/// The claims a pod that has not finished mounts by name
/// (`persistentVolumeClaim.claimName`): they are in use, whoever owns them.
/// A pod being deleted still counts until it has finished.
pub fn claims_in_use(pod: &SlimPod) -> Vec<&str> {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if finished {
        return Vec::new();
    }
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some(v.claim.as_ref()?.claim_name.as_str()))
        .collect()
}

/// The pod's generic ephemeral volumes: (volume name, claim template).
pub fn ephemeral_volumes(pod: &SlimPod) -> Vec<Volume> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some((v.name.clone(), v.ephemeral.as_ref()?.volume_claim_template.clone()?)))
        .collect()
}

/// The owner reference every ephemeral PVC carries: the pod, as controller.
pub fn owner_reference(pod: &PodIdentity<'_>) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.name.to_string(),
        uid: pod.uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The PVC to create for one ephemeral volume: labels and annotations from
/// the template only, exactly one owner reference (the pod), the template's
/// spec verbatim.
pub fn desired_claim(
    pod: &PodIdentity<'_>,
    volume: &str,
    template: &PersistentVolumeClaimTemplate,
) -> PersistentVolumeClaim {
    let template_meta = template.metadata.clone().unwrap_or_default();
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(pod.name, volume)),
            namespace: Some(pod.namespace.to_string()),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            owner_references: Some(vec![owner_reference(pod)]),
            ..ObjectMeta::default()
        },
        spec: Some(template.spec.clone()),
        status: None,
    }
}

/// Who an existing PVC with the expected name belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Controlled by this pod (by UID): done.
    Pod,
    /// Anything else; never modified. The text says why, for the event.
    Foreign(String),
}

/// Checks an existing PVC's controller owner reference against the pod's UID.
pub fn ownership(claim: &ObjectMeta, pod_uid: &str) -> Ownership {
    let controller = claim
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    match controller {
        Some(owner) if owner.kind == "Pod" && owner.uid == pod_uid => Ownership::Pod,
        Some(owner) if owner.kind == "Pod" => Ownership::Foreign(format!(
            "it belongs to an earlier pod {} (uid {}), not this one",
            owner.name, owner.uid
        )),
        Some(owner) => Ownership::Foreign(format!("it is controlled by {} {}", owner.kind, owner.name)),
        None => Ownership::Foreign("it exists and is not owned by the pod".into()),
    }
}

/// The UID of the pod that controls a PVC (its controller owner reference
/// of kind Pod), the one thing the controller keeps per claim.
pub fn controlling_pod(claim: &ObjectMeta) -> Option<&str> {
    claim
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .filter(|r| r.kind == "Pod")
        .map(|r| r.uid.as_str())
}

/// What one ephemeral volume of a pod needs, from what the claim cache
/// knows of its PVC: `None` no claim, `Some(uid)` a claim controlled by the
/// pod with that UID, `Some(None)` a claim controlled by no pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The pod's claim exists.
    Nothing,
    /// No claim by that name: create it.
    Create,
    /// A claim by that name that is not the pod's: read it and report.
    Check,
    /// The pod is finished and its claim is to be released.
    Release,
}

/// What a volume needs, given the cached claim's controlling pod.
pub fn need(cached: Option<Option<&str>>, pod_uid: &str) -> Need {
    match cached {
        None => Need::Create,
        Some(Some(uid)) if uid == pod_uid => Need::Nothing,
        Some(_) => Need::Check,
    }
}

/// What a volume of a finished pod needs: its own claim released;
/// nothing for a claim that is missing or someone else's.
pub fn release_need(cached: Option<Option<&str>>, pod_uid: &str) -> Need {
    match cached {
        Some(Some(uid)) if uid == pod_uid => Need::Release,
        _ => Need::Nothing,
    }
}

/// Hands out one shared copy of equal [`Volumes`]: 50,000 pods of a few
/// workloads keep a few copies of their claim templates, not 50,000.
#[derive(Debug, Default)]
pub struct VolumesInterner {
    hasher: RandomState,
    known: HashMap<u64, Vec<Weak<[Volume]>>>,
    since_pruned: usize,
}

impl VolumesInterner {
    /// The shared copy of `volumes`.
    pub fn intern(&mut self, volumes: Vec<Volume>) -> Volumes {
        // Equal volumes serialize alike (maps are ordered); the hash only
        // narrows the search, equality decides.
        let key = self
            .hasher
            .hash_one(serde_json::to_string(&volumes).unwrap_or_default());
        let bucket = self.known.entry(key).or_default();
        bucket.retain(|weak| weak.strong_count() > 0);
        if let Some(shared) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|shared| shared[..] == volumes[..])
        {
            return shared;
        }
        let shared: Volumes = volumes.into();
        bucket.push(Arc::downgrade(&shared));
        self.since_pruned += 1;
        if self.since_pruned > 1024 {
            self.known.retain(|_, bucket| {
                bucket.retain(|weak| weak.strong_count() > 0);
                !bucket.is_empty()
            });
            self.since_pruned = 0;
        }
        shared
    }
}

/// Why creating a PVC failed, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// A PVC with the name exists and is not the pod's.
    Conflict,
    /// Forbidden, including exceeded quota.
    Forbidden,
    /// Rejected as invalid.
    Invalid,
    /// Anything else: webhooks, server errors, timeouts.
    Other,
    /// Not attempted or cut off: another instance leads. Not a failure of
    /// the pod; the claim is handled when this instance leads.
    NotLeader,
}

impl FailureReason {
    /// The reasons counted in `volplane_ephemeral_claim_failures_total`
    /// (not [`Self::NotLeader`]).
    pub const COUNTED: [Self; 4] = [Self::Conflict, Self::Forbidden, Self::Invalid, Self::Other];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Conflict => "conflict",
            Self::Forbidden => "forbidden",
            Self::Invalid => "invalid",
            Self::Other => "other",
            Self::NotLeader => "not_leader",
        }
    }

    /// Classifies an API status code from a create.
    pub fn from_status(code: u16) -> Self {
        match code {
            403 => Self::Forbidden,
            422 => Self::Invalid,
            409 => Self::Conflict,
            _ => Self::Other,
        }
    }
}

#[cfg(test)]
mod tests;
