//! The ephemeral controller's pure model: which PVC a pod's generic
//! ephemeral volume needs, and whether an existing PVC belongs to the pod.
//!
//! The contract is Kubernetes': the scheduler, kubelet, attach/detach
//! controller, PVC protection and the node authorizer all compute
//! `<pod>-<volume>` and check that the PVC's controller owner reference
//! carries the pod's UID.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimTemplate, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// What the controller keeps of a pod in memory: identity, deletion, its
/// generic ephemeral volumes' templates and its phase. A cached `Pod`
/// itself, even emptied, is over 2 KiB plus over 3 KiB per volume (every
/// volume source is a field); this is a few hundred bytes.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct EphemeralPod {
    /// Name, namespace, UID, resource version, creation and deletion time.
    pub metadata: ObjectMeta,
    /// (volume name, claim template) of each generic ephemeral volume.
    pub volumes: Vec<(String, PersistentVolumeClaimTemplate)>,
    /// `status.phase`.
    pub phase: Option<String>,
}

impl From<Pod> for EphemeralPod {
    fn from(pod: Pod) -> Self {
        let meta = pod.metadata;
        let volumes = pod
            .spec
            .and_then(|s| s.volumes)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| Some((v.name, v.ephemeral?.volume_claim_template?)))
            .collect();
        Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                creation_timestamp: meta.creation_timestamp,
                deletion_timestamp: meta.deletion_timestamp,
                ..ObjectMeta::default()
            },
            volumes,
            phase: pod.status.and_then(|s| s.phase),
        }
    }
}

/// A pod for kube-runtime's caches and events: the `v1` `Pod` resource.
impl kube::Resource for EphemeralPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The PVC name of ephemeral volume `volume` in pod `pod`.
pub use volplane_runtime::naming::ephemeral_claim as claim_name;

/// Whether the pod still needs its volumes: not being deleted, not finished.
pub fn is_active(pod: &EphemeralPod) -> bool {
    let finished = pod
        .phase
        .as_deref()
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

/// The pod's generic ephemeral volumes: (volume name, claim template).
pub fn ephemeral_volumes(pod: &EphemeralPod) -> Vec<(&str, &PersistentVolumeClaimTemplate)> {
    pod.volumes
        .iter()
        .map(|(name, template)| (name.as_str(), template))
        .collect()
}

/// The owner reference every ephemeral PVC carries: the pod, as controller.
pub fn owner_reference(pod: &EphemeralPod) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The PVC to create for one ephemeral volume: labels and annotations from
/// the template only, exactly one owner reference (the pod), the template's
/// spec verbatim. `None` when the pod has no name, namespace or UID yet.
pub fn desired_claim(
    pod: &EphemeralPod,
    volume: &str,
    template: &PersistentVolumeClaimTemplate,
) -> Option<PersistentVolumeClaim> {
    let pod_name = pod.metadata.name.as_deref()?;
    let namespace = pod.metadata.namespace.clone()?;
    let template_meta = template.metadata.clone().unwrap_or_default();
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(pod_name, volume)),
            namespace: Some(namespace),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            owner_references: Some(vec![owner_reference(pod)?]),
            ..ObjectMeta::default()
        },
        spec: Some(template.spec.clone()),
        status: None,
    })
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

/// What the controller keeps of a PVC's metadata: identity and owners,
/// which is all [`ownership`] and the re-queueing of pods read. Managed
/// fields, labels, annotations and finalizers are dropped before the cache.
pub fn trim_claim(meta: &mut ObjectMeta) {
    let full = std::mem::take(meta);
    *meta = ObjectMeta {
        name: full.name,
        namespace: full.namespace,
        uid: full.uid,
        resource_version: full.resource_version,
        deletion_timestamp: full.deletion_timestamp,
        owner_references: full.owner_references,
        ..ObjectMeta::default()
    };
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
