//! The ephemeral controller's pure model: which PVC a pod's generic
//! ephemeral volume needs, and whether an existing PVC belongs to the pod.
//!
//! The contract is Kubernetes': the scheduler, kubelet, attach/detach
//! controller, PVC protection and the node authorizer all compute
//! `<pod>-<volume>` and check that the PVC's controller owner reference
//! carries the pod's UID.

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimTemplate, Pod, PodSpec, PodStatus, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// The PVC name of ephemeral volume `volume` in pod `pod`.
pub fn claim_name(pod: &str, volume: &str) -> String {
    format!("{pod}-{volume}")
}

/// Whether the pod still needs its volumes: not being deleted, not finished.
pub fn is_active(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

/// The pod's generic ephemeral volumes: (volume name, claim template).
pub fn ephemeral_volumes(pod: &Pod) -> Vec<(&str, &PersistentVolumeClaimTemplate)> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
        .filter_map(|v| {
            let template = v.ephemeral.as_ref()?.volume_claim_template.as_ref()?;
            Some((v.name.as_str(), template))
        })
        .collect()
}

/// The owner reference every ephemeral PVC carries: the pod, as controller.
pub fn owner_reference(pod: &Pod) -> Option<OwnerReference> {
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
    pod: &Pod,
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

/// What the controller keeps of a pod in memory: identity, deletion,
/// ephemeral volumes and phase. Everything else (managed fields, labels,
/// containers, status details) is dropped before the cache.
pub fn trim(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        creation_timestamp: meta.creation_timestamp,
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    };
    let volumes: Vec<Volume> = pod
        .spec
        .take()
        .and_then(|s| s.volumes)
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.ephemeral.is_some())
        .collect();
    pod.spec = Some(PodSpec {
        volumes: Some(volumes),
        containers: Vec::new(),
        ..PodSpec::default()
    });
    let phase = pod.status.take().and_then(|s| s.phase);
    pod.status = phase.map(|phase| PodStatus {
        phase: Some(phase),
        ..PodStatus::default()
    });
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
