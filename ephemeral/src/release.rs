//! When the claims of a finished pod may be released: the pure rules of
//! `--ephemeral-release`.
//!
//! kube-controller-manager keeps an ephemeral claim until its pod object is
//! gone, and PVC protection keeps it while the pod exists. A pod that will
//! never run again (rejected by the kubelet at admission, or finished and
//! kept by its Job) holds its storage for days. volplane deletes such a
//! claim and lifts its `kubernetes.io/pvc-protection` finalizer, but only
//! when the volume is provably not in use:
//!
//! - a pod with no container status at all never got past the kubelet's
//!   admission (the kubelet writes phase Failed, a reason and "Pod was
//!   rejected: …" and nothing else): its volumes were never set up, so its
//!   claim is free at once;
//! - any other finished pod was admitted, so the kubelet may have mounted
//!   its volumes; it tears them down once every container has terminated.
//!   Its claim is free `delay` after the last container finished, and only
//!   while the node is Ready (its kubelet is there to tear down) or gone
//!   (nothing of it mounts anything any more); a NotReady node holds it;
//! - in every case, while the node's `status.volumesInUse` lists the volume
//!   (attachable drivers), the claim waits.

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::model::SlimPod;

/// The finalizer of PVC protection, lifted from a released claim.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// `--ephemeral-release`: which finished pods give their claims back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReleaseMode {
    /// Pods the kubelet rejected: failed without ever starting a container.
    #[default]
    Rejected,
    /// Every pod in a terminal phase (Succeeded or Failed).
    Terminated,
    /// None: kube-controller-manager's behaviour.
    Never,
}

/// Why a finished pod's claims are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ending {
    /// Failed without ever starting a container.
    Rejected,
    /// Succeeded, or failed after running.
    Terminated,
}

impl Ending {
    /// Both endings.
    pub const ALL: [Self; 2] = [Self::Rejected, Self::Terminated];

    /// The metric label of `volplane_ephemeral_released_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Terminated => "terminated",
        }
    }
}

/// What the controller keeps of a finished pod whose claims it may release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Why its claims go.
    pub ending: Ending,
    /// The kubelet never admitted it (no container status at all): nothing
    /// was ever mounted, the claims are free at once.
    pub never_admitted: bool,
    /// When its last container finished (seconds since the epoch), if a
    /// container status says so.
    pub since: Option<i64>,
    /// `status.reason`, for the event (`OutOfcpu`, …); cut short.
    pub reason: Option<Box<str>>,
}

/// Whether `pod` is finished in a way `mode` releases, and what to keep.
/// A pod being deleted is not: PVC protection lets its claims go once the
/// kubelet is done, and garbage collection deletes them.
pub fn finished(pod: &SlimPod, mode: ReleaseMode) -> Option<Finished> {
    if mode == ReleaseMode::Never || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref()?;
    if phase != "Succeeded" && phase != "Failed" {
        return None;
    }
    let ever_ran = status.containers().any(|c| {
        c.started == Some(true)
            || [&c.state, &c.last_state]
                .into_iter()
                .flatten()
                .any(|s| s.running.is_some() || s.terminated.is_some())
    });
    let ending = if phase == "Failed" && !ever_ran {
        Ending::Rejected
    } else {
        Ending::Terminated
    };
    if ending == Ending::Terminated && mode != ReleaseMode::Terminated {
        return None;
    }
    let since = status
        .containers()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max();
    Some(Finished {
        ending,
        never_admitted: status.containers().next().is_none(),
        since,
        reason: status
            .reason
            .as_deref()
            .map(|r| volplane_runtime::text::cut(r, 128).into()),
    })
}

/// What the controller knows of the pod's node: whether its kubelet is
/// Ready, and the `status.volumesInUse` entries, hashed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Condition Ready is True.
    pub ready: bool,
    /// Hashes of `status.volumesInUse` (see [`volume_key`]).
    pub volumes_in_use: Box<[u64]>,
    /// Counts the node's changes, so a decision made on older facts is
    /// taken again.
    pub generation: u64,
}

/// The hash of one `status.volumesInUse` entry.
pub fn volume_key(unique_name: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    unique_name.hash(&mut hasher);
    hasher.finish()
}

/// The name the kubelet gives a CSI volume in `status.volumesInUse`:
/// `kubernetes.io/csi/<driver>^<volumeHandle>`.
pub fn csi_unique_name(driver: &str, handle: &str) -> String {
    format!("kubernetes.io/csi/{driver}^{handle}")
}

/// What the node says about the claim's volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeView<'a> {
    /// The pod was never bound to a node.
    NotBound,
    /// Its node object is gone.
    Gone,
    /// Its node, as last seen.
    Known(&'a NodeFacts),
}

/// What to do with a finished pod's claim now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Release it.
    Release,
    /// Not before this time (seconds since the epoch).
    NotBefore(i64),
    /// Not while the node is as it is; decide again when it changes.
    WaitForNode(&'static str),
}

/// The time rule: may the claims of `pod` go at `now` (seconds since the
/// epoch), given its node? `first_seen` stands in for `since` when no
/// container status has a finish time.
pub fn timing(pod: &Finished, node: NodeView<'_>, now: i64, first_seen: i64, delay_seconds: i64) -> Verdict {
    if pod.never_admitted {
        return Verdict::Release;
    }
    if let NodeView::Known(facts) = node
        && !facts.ready
    {
        return Verdict::WaitForNode("its node is not Ready, so its kubelet may not have unmounted the volume yet");
    }
    let due = pod.since.unwrap_or(first_seen).saturating_add(delay_seconds);
    if now < due {
        return Verdict::NotBefore(due);
    }
    Verdict::Release
}

/// The volume behind a claim, as far as `status.volumesInUse` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource<'a> {
    /// The claim is not bound: nothing to be in use.
    Unbound,
    /// A CSI volume.
    Csi {
        /// `spec.csi.driver`.
        driver: &'a str,
        /// `spec.csi.volumeHandle`.
        handle: &'a str,
    },
    /// Any other kind (or its PV could not be read): in use while the
    /// node lists any volume.
    Other,
}

/// The volume behind a bound claim: its PV as read (`None`: gone, which
/// counts as unknown).
pub fn volume_source(pv: Option<&PersistentVolume>) -> VolumeSource<'_> {
    match pv.and_then(|pv| pv.spec.as_ref()?.csi.as_ref()) {
        Some(csi) => VolumeSource::Csi {
            driver: &csi.driver,
            handle: &csi.volume_handle,
        },
        None => VolumeSource::Other,
    }
}

/// The finalizers a claim keeps once PVC protection is lifted, or `None`
/// when it has none to lift.
pub fn without_protection(finalizers: &[String]) -> Option<Vec<&str>> {
    finalizers.iter().any(|f| f == PVC_PROTECTION).then(|| {
        finalizers
            .iter()
            .map(String::as_str)
            .filter(|f| *f != PVC_PROTECTION)
            .collect()
    })
}

/// Whether the node lists the volume in `status.volumesInUse`.
pub fn in_use(node: &NodeFacts, volume: &VolumeSource<'_>) -> bool {
    match volume {
        VolumeSource::Unbound => false,
        VolumeSource::Csi { driver, handle } => node
            .volumes_in_use
            .contains(&volume_key(&csi_unique_name(driver, handle))),
        VolumeSource::Other => !node.volumes_in_use.is_empty(),
    }
}

/// The event note of a released claim.
pub fn note(claim: &str, volume: &str, pod: &Finished) -> String {
    let why = match (pod.ending, pod.reason.as_deref()) {
        (Ending::Rejected, Some(reason)) => {
            format!("the pod failed before any container started ({reason}); it will never run")
        }
        (Ending::Rejected, None) => "the pod failed before any container started; it will never run".to_string(),
        (Ending::Terminated, _) => {
            "the pod has terminated and every container has exited; it will never run again".to_string()
        }
    };
    volplane_runtime::text::event_note(&format!("released PVC {claim} of ephemeral volume {volume:?}: {why}"))
}

#[cfg(test)]
mod tests;
