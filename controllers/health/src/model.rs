//! Pure decisions of the health controllers: which volumes are watched,
//! what the driver's answer means, when an event is due, when a node has
//! failed. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, Pod};

/// The PV annotation that holds the last announced abnormal condition (its
/// message); absent while the volume is normal. It is how a restarted
/// controller knows what it already said.
pub const ABNORMAL_ANNOTATION: &str = "health.volplane.dev/abnormal";

/// The PV annotation naming the failed node announced for its volume
/// (`NodeFailed`), removed with `NodeRecovered`: like
/// [`ABNORMAL_ANNOTATION`], it spares a restarted controller announcing a
/// node failure again.
pub const NODE_FAILED_ANNOTATION: &str = "health.volplane.dev/node-failed";

/// `reportingController` of the controller side's events.
pub const REPORTING_CONTROLLER: &str = "volplane-health";

/// Event reasons.
pub const REASON_ABNORMAL: &str = "VolumeConditionAbnormal";
/// Event reason on recovery.
pub const REASON_NORMAL: &str = "VolumeConditionNormal";
/// Event reason when a node using the volume failed.
pub const REASON_NODE_FAILED: &str = "NodeFailed";
/// Event reason when that node came back.
pub const REASON_NODE_RECOVERED: &str = "NodeRecovered";

/// A volume's condition as volplane tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Healthy.
    Normal,
    /// Unhealthy, with the driver's (or volplane's) message.
    Abnormal(String),
}

/// What one check found out about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The driver reported a condition.
    Reported(Condition),
    /// The driver does not know the volume (missing from ListVolumes, or
    /// ControllerGetVolume said NOT_FOUND); `how` says which.
    Missing {
        /// How the absence was found.
        how: &'static str,
    },
    /// The driver knows the volume but reported no condition.
    Silent,
}

impl Observation {
    /// The condition this observation stands for, if any.
    pub fn condition(&self, volume_handle: &str, driver: &str) -> Option<Condition> {
        match self {
            Self::Reported(condition) => Some(condition.clone()),
            Self::Missing { how } => Some(Condition::Abnormal(truncate(&format!(
                "the CSI driver {driver} does not know volume {volume_handle} any more ({how})"
            )))),
            Self::Silent => None,
        }
    }

    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Reported(Condition::Normal) => "normal",
            Self::Reported(Condition::Abnormal(_)) => "abnormal",
            Self::Missing { .. } => "missing",
            Self::Silent => "no_condition",
        }
    }
}

/// Reads a CSI `VolumeCondition` (abnormal flag and message).
pub fn condition_of(abnormal: bool, message: &str) -> Condition {
    if abnormal {
        // Truncated here, so that the message in the PV annotation (which
        // is limited) compares equal to the next report.
        let message = if message.trim().is_empty() {
            "the CSI driver reports the volume abnormal (no message)".to_string()
        } else {
            truncate(message)
        };
        Condition::Abnormal(message)
    } else {
        Condition::Normal
    }
}

/// An event to publish because a condition changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// `Warning` for abnormal, `Normal` for recovery.
    pub warning: bool,
    /// The event reason.
    pub reason: &'static str,
    /// The event message.
    pub note: String,
}

/// Decides whether a newly observed condition must be announced, given
/// what was announced last (`None`: nothing yet, which counts as normal).
/// Only changes are announced: a first normal reading says nothing, an
/// unchanged abnormal condition says nothing again, a new abnormal message
/// is a change.
pub fn announcement(last: Option<&Condition>, now: &Condition) -> Option<Announcement> {
    let last = last.unwrap_or(&Condition::Normal);
    if last == now {
        return None;
    }
    Some(match now {
        Condition::Abnormal(message) => Announcement {
            warning: true,
            reason: REASON_ABNORMAL,
            note: truncate(message),
        },
        Condition::Normal => Announcement {
            warning: false,
            reason: REASON_NORMAL,
            note: "the CSI driver reports the volume healthy again".to_string(),
        },
    })
}

/// How long an earlier event about a claim's condition — from
/// external-health-monitor before a migration, or from volplane itself —
/// stands for an announcement volplane would make now.
pub const ANNOUNCED_WINDOW: Duration = Duration::from_secs(3600);

/// One earlier event about a claim, from anyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EarlierEvent {
    /// Its reason.
    pub reason: String,
    /// Its message (note).
    pub message: String,
    /// When it was last seen.
    pub at: SystemTime,
    /// Who reported it (the event's source or reporting controller).
    pub by: String,
}

/// The earlier event that already says what `announcement` would: the
/// latest condition event about the claim within [`ANNOUNCED_WINDOW`] of
/// `now`, if it has the same reason (and, for an abnormal condition, the
/// same message). Then volplane records the condition without a second
/// event; a later change is announced as usual.
pub fn already_announced<'a>(
    announcement: &Announcement,
    earlier: &'a [EarlierEvent],
    now: SystemTime,
) -> Option<&'a EarlierEvent> {
    let since = now.checked_sub(ANNOUNCED_WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
    let latest = earlier
        .iter()
        .filter(|e| (e.reason == REASON_ABNORMAL || e.reason == REASON_NORMAL) && e.at >= since)
        .max_by_key(|e| e.at)?;
    let same = latest.reason == announcement.reason
        && (announcement.reason == REASON_NORMAL || truncate(&latest.message) == announcement.note);
    same.then_some(latest)
}

/// The note of a node-side event about `pv` on a pod: the volume and claim
/// named first, then `note`, cut to an event note's length.
pub fn node_note(pv: &str, namespace: &str, claim: &str, note: &str) -> String {
    volplane_runtime::text::event_note(&format!("volume {pv} (PVC {namespace}/{claim}): {note}"))
}

/// What a pod's events say was last announced about `pv` (node side,
/// after a restart or a rollout, with no memory of its own): the latest
/// condition event within [`ANNOUNCED_WINDOW`] of `at` whose note is about
/// that volume (`about`: [`node_note`] with an empty note). Nothing
/// announced within the hour counts as normal. An abnormal one with the
/// very note `now` would get stands for `now`.
pub fn remembered(earlier: &[EarlierEvent], about: &str, now: &Condition, at: SystemTime) -> Condition {
    let since = at.checked_sub(ANNOUNCED_WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
    let latest = earlier
        .iter()
        .filter(|e| (e.reason == REASON_ABNORMAL || e.reason == REASON_NORMAL) && e.at >= since)
        .filter(|e| e.message.starts_with(about))
        .max_by_key(|e| e.at);
    match latest {
        Some(event) if event.reason == REASON_ABNORMAL => match now {
            Condition::Abnormal(message)
                if volplane_runtime::text::event_note(&format!("{about}{}", truncate(message))) == event.message =>
            {
                now.clone()
            }
            Condition::Abnormal(_) | Condition::Normal => {
                Condition::Abnormal(event.message.strip_prefix(about).unwrap_or(&event.message).to_string())
            }
        },
        _ => Condition::Normal,
    }
}

/// The condition last announced for a PV, as kept in its annotation.
pub fn announced(pv: &PersistentVolume) -> Option<Condition> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(ABNORMAL_ANNOTATION)
        .map(|message| Condition::Abnormal(message.clone()))
}

/// The merge patch that records `condition` on a PV.
pub fn annotation_patch(condition: &Condition) -> serde_json::Value {
    let value = match condition {
        Condition::Normal => serde_json::Value::Null,
        Condition::Abnormal(message) => serde_json::Value::String(truncate(message)),
    };
    serde_json::json!({"metadata": {"annotations": {ABNORMAL_ANNOTATION: value}}})
}

/// The failed node announced for this PV, if any.
pub fn announced_node_failure(pv: &PersistentVolume) -> Option<String> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(NODE_FAILED_ANNOTATION)
        .filter(|node| !node.is_empty())
        .cloned()
}

/// The merge patch that records (`Some(node)`) or clears (`None`) an
/// announced node failure on a PV.
pub fn node_failure_patch(node: Option<&str>) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {NODE_FAILED_ANNOTATION: node}}})
}

/// Messages go into event notes and PV annotations: cut to fit both, on a
/// character boundary. Cutting again changes nothing, so a recorded message
/// compares equal to the next report of the same condition.
fn truncate(message: &str) -> String {
    volplane_runtime::text::cut(message, volplane_runtime::text::ANNOTATION_VALUE_MAX_BYTES).into_owned()
}

/// A PV volplane monitors: bound, CSI, of this driver.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watched {
    /// PV name.
    pub pv: String,
    /// `spec.csi.volumeHandle`.
    pub volume_handle: String,
    /// The bound claim's namespace.
    pub namespace: String,
    /// The bound claim's name.
    pub claim: String,
    /// The bound claim's UID, if known.
    pub claim_uid: Option<String>,
}

impl Watched {
    /// The PVC as an event target.
    pub fn claim_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.claim.clone()),
            uid: self.claim_uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The PV as a watched volume, when it is bound, CSI and of `driver`.
/// Anything else (other drivers, in-tree volumes, unbound PVs) is `None`.
pub fn watched(pv: &PersistentVolume, driver: &str) -> Option<Watched> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Bound") {
        return None;
    }
    let claim = spec.claim_ref.as_ref()?;
    Some(Watched {
        pv: pv.metadata.name.clone()?,
        volume_handle: csi.volume_handle.clone(),
        namespace: claim.namespace.clone()?,
        claim: claim.name.clone()?,
        claim_uid: claim.uid.clone(),
    })
}

/// The PVCs (namespace, name) a pod mounts, including the PVCs of its
/// generic ephemeral volumes (`<pod>-<volume>`).
pub fn pod_claims(pod: &Pod) -> Vec<(String, String)> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|volume| {
            if let Some(claim) = &volume.persistent_volume_claim {
                Some((namespace.clone(), claim.claim_name.clone()))
            } else {
                volume.ephemeral.as_ref().map(|_| {
                    (
                        namespace.clone(),
                        volplane_runtime::naming::ephemeral_claim(&pod_name, &volume.name),
                    )
                })
            }
        })
        .collect()
}

/// Keeps what the health controllers read of a pod: identity, node and volumes.
pub fn trim_pod(mut pod: Pod) -> Pod {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.labels = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers = Vec::new();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.affinity = None;
        spec.tolerations = None;
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| v.persistent_volume_claim.is_some() || v.ephemeral.is_some());
            for volume in volumes {
                if let Some(ephemeral) = volume.ephemeral.as_mut() {
                    ephemeral.volume_claim_template = None;
                }
            }
        }
    }
    pod.status = None;
    pod
}

/// Keeps what the node watcher reads of a node: its name and Ready
/// condition (nodes carry image lists, addresses and more, per node).
pub fn trim_node(node: Node) -> Node {
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == "Ready")
        .collect();
    Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: node.metadata.name,
            uid: node.metadata.uid,
            resource_version: node.metadata.resource_version,
            ..Default::default()
        },
        spec: None,
        status: Some(k8s_openapi::api::core::v1::NodeStatus {
            conditions: Some(ready),
            ..Default::default()
        }),
    }
}

/// Since when a node has not been Ready (Ready is False or Unknown, or
/// missing), from the condition's lastTransitionTime. `None` when Ready.
pub fn not_ready_since(node: &Node) -> Option<SystemTime> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(condition) if condition.status == "True" => None,
        Some(condition) => Some(
            condition
                .last_transition_time
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, |t| t.0.into()),
        ),
        None => Some(SystemTime::UNIX_EPOCH),
    }
}

/// A node's health as the node watcher judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeVerdict {
    /// Ready.
    Healthy,
    /// Not Ready, but for less than the threshold.
    Suspect {
        /// When it turns `Failed` unless it recovers.
        fails_at: SystemTime,
    },
    /// Not Ready for at least the threshold.
    Failed {
        /// Since when it has not been Ready.
        since: SystemTime,
    },
}

/// Judges a node at `now` with failure `threshold`.
pub fn node_verdict(node: &Node, threshold: Duration, now: SystemTime) -> NodeVerdict {
    match not_ready_since(node) {
        None => NodeVerdict::Healthy,
        Some(since) => {
            let fails_at = since + threshold;
            if now >= fails_at {
                NodeVerdict::Failed { since }
            } else {
                NodeVerdict::Suspect { fails_at }
            }
        }
    }
}

/// The watched volumes that pods on `node` use, each with those pods
/// (`namespace/name`), from the pods and a claim → volume index.
pub fn volumes_on_node<'a>(
    node: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
    by_claim: &BTreeMap<(String, String), Watched>,
) -> BTreeMap<Watched, BTreeSet<String>> {
    let mut out: BTreeMap<Watched, BTreeSet<String>> = BTreeMap::new();
    for pod in pods {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
            continue;
        }
        let pod_name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        for claim in pod_claims(pod) {
            if let Some(watched) = by_claim.get(&claim) {
                out.entry(watched.clone()).or_default().insert(pod_name.clone());
            }
        }
    }
    out
}

/// The note of a NodeFailed event.
pub fn node_failed_note(node: &str, since: SystemTime, pods: &BTreeSet<String>) -> String {
    let since = humantime_rfc3339(since);
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    truncate(&format!(
        "node {node} has not been Ready since {since}; pods using this volume there: {}",
        pods.join(", ")
    ))
}

fn humantime_rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    k8s_openapi::jiff::Timestamp::from_second(seconds).map_or_else(|_| format!("{seconds}s"), |t| t.to_string())
}

/// Where the kubelet mounts a CSI volume of a pod:
/// `<kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount`.
pub fn published_path(kubelet_dir: &str, pod_uid: &str, pv: &str) -> String {
    format!(
        "{}/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}/mount",
        kubelet_dir.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests;
