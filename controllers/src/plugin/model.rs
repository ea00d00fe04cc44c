//! What `kubectl volplane` shows, from the objects alone (pure): capacity
//! per node and class, and why a pod's claims fit a node or not, by
//! kube-scheduler's VolumeBinding rules for storage capacity.
//!
//! The rules, as the scheduler applies them to a claim that is not bound:
//! its class must bind `WaitForFirstConsumer` (an `Immediate` claim is
//! bound before scheduling, and the pod waits for that); capacity is only
//! checked when the class's provisioner has a CSIDriver with
//! `storageCapacity: true`; then some CSIStorageCapacity of that class whose
//! `nodeTopology` selects the node's labels must hold the requested size in
//! `maximumVolumeSize` when set, else in `capacity`. A bound claim fits
//! where its PV's node affinity allows. Static PVs that could match an
//! unbound claim are not looked at.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Serialize;
use volplane_capacity::quantity::{format_bytes, parse_bytes};

/// The annotation that marks the default StorageClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";

/// The cluster objects the answers come from.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Nodes (their labels are matched against `nodeTopology`).
    pub nodes: Vec<Node>,
    /// StorageClasses.
    pub classes: Vec<StorageClass>,
    /// CSIDrivers (whether capacity is tracked).
    pub drivers: Vec<CSIDriver>,
    /// CSIStorageCapacity objects of every namespace.
    pub capacities: Vec<CSIStorageCapacity>,
}

/// Whether `selector` selects `labels`, as `metav1.LabelSelectorAsSelector`
/// does: every `matchLabels` pair and every expression (`In`, `NotIn`,
/// `Exists`, `DoesNotExist`); an unknown operator selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector.match_labels.iter().flatten();
    let expressions = selector.match_expressions.iter().flatten();
    pairs.into_iter().all(|(key, value)| labels.get(key) == Some(value))
        && expressions
            .into_iter()
            .all(|e| requirement_holds(&e.key, &e.operator, e.values.as_deref(), labels))
}

/// One label requirement (of a label selector or a node selector term):
/// `In`, `NotIn`, `Exists`, `DoesNotExist`; any other operator fails.
fn requirement_holds(key: &str, operator: &str, values: Option<&[String]>, labels: &BTreeMap<String, String>) -> bool {
    let values = values.unwrap_or_default();
    let value = labels.get(key);
    match operator {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// A selector as `kubectl` writes one: `k=v` pairs, then expressions
/// (`k in (a,b)`, `k notin (a)`, `k`, `!k`), comma-separated.
pub fn selector_text(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => format!("{} {other} ({values})", e.key),
        });
    }
    if parts.is_empty() {
        "<all>".into()
    } else {
        parts.join(",")
    }
}

/// Whether a CSIStorageCapacity applies to `node`: the scheduler treats an
/// object without `nodeTopology` as available nowhere.
pub fn reaches(capacity: &CSIStorageCapacity, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    capacity
        .node_topology
        .as_ref()
        .is_some_and(|topology| selects(topology, &labels))
}

fn bytes(quantity: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> Option<i64> {
    parse_bytes(&quantity?.0)
}

/// The largest volume an object admits: `maximumVolumeSize` when set (the
/// scheduler prefers it), else `capacity`.
pub fn limit(capacity: &CSIStorageCapacity) -> Option<i64> {
    match &capacity.maximum_volume_size {
        Some(maximum) => parse_bytes(&maximum.0),
        None => bytes(capacity.capacity.as_ref()),
    }
}

/// How the scheduler treats capacity for a class's provisioner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Tracking {
    /// A CSIDriver with `storageCapacity: true`: capacity is checked.
    Tracked,
    /// No CSIDriver, or `storageCapacity` false: capacity is not checked.
    NotTracked,
}

impl Cluster {
    fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes.iter().find(|c| c.metadata.name.as_deref() == Some(name))
    }

    fn default_class(&self) -> Option<&StorageClass> {
        self.classes.iter().find(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true")
        })
    }

    /// Whether capacity is checked for `driver`.
    pub fn tracking(&self, driver: &str) -> Tracking {
        let tracked = self
            .drivers
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(driver))
            .and_then(|d| d.spec.storage_capacity)
            .unwrap_or(false);
        if tracked {
            Tracking::Tracked
        } else {
            Tracking::NotTracked
        }
    }

    /// The objects of `class` that apply to `node`, the largest limit first.
    fn capacities_for(&self, class: &str, node: &Node) -> Vec<&CSIStorageCapacity> {
        let mut found: Vec<&CSIStorageCapacity> = self
            .capacities
            .iter()
            .filter(|c| c.storage_class_name == class && reaches(c, node))
            .collect();
        found.sort_by_key(|c| std::cmp::Reverse(limit(c).unwrap_or(i64::MIN)));
        found
    }
}

/// A claim of a pod, as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// The PVC's name.
    pub name: String,
    /// The pod volume it backs.
    pub volume: String,
    /// Read from the pod's ephemeral volume template: the PVC does not exist yet.
    pub from_template: bool,
    /// Its StorageClass (the default class when none is named).
    pub class: Option<String>,
    /// Requested bytes.
    pub size: Option<i64>,
    /// The PV it is bound to.
    pub bound_to: Option<String>,
    /// The PVC is missing and there is no template to make it from.
    pub missing: bool,
}

/// A claim on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fit {
    /// Whether the scheduler's storage check passes.
    pub fits: bool,
    /// Why, in words.
    pub reason: String,
}

/// The answer of `kubectl volplane why`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Why {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The node it runs on, if scheduled.
    pub scheduled_on: Option<String>,
    /// Its claims.
    pub claims: Vec<Claim>,
    /// Per node: each claim's fit, in the order of `claims`.
    pub nodes: Vec<(String, Vec<Fit>)>,
    /// One line.
    pub verdict: String,
    /// When the pod has finished and its ephemeral claims still exist:
    /// who holds them and whether volplane releases them.
    pub held: Option<String>,
}

/// The claims behind `pod`'s volumes: named PVCs, and generic ephemeral
/// volumes (`<pod>-<volume>`), from the template when the PVC does not
/// exist yet.
pub fn pod_claims(pod: &Pod, pvcs: &[PersistentVolumeClaim], cluster: &Cluster) -> Vec<Claim> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let find = |name: &str| pvcs.iter().find(|c| c.metadata.name.as_deref() == Some(name));
    let mut claims = Vec::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let (name, template) = if let Some(source) = &volume.persistent_volume_claim {
            (source.claim_name.clone(), None)
        } else if let Some(ephemeral) = &volume.ephemeral {
            let template = ephemeral.volume_claim_template.as_ref().map(|t| &t.spec);
            (
                volplane_runtime::naming::ephemeral_claim(&pod_name, &volume.name),
                template,
            )
        } else {
            continue;
        };
        let existing = find(&name);
        let spec = existing.and_then(|c| c.spec.as_ref()).or(template);
        claims.push(Claim {
            from_template: existing.is_none() && spec.is_some(),
            missing: spec.is_none(),
            class: spec.and_then(|s| class_of(s, cluster)),
            size: spec.and_then(requested),
            bound_to: existing
                .and_then(|c| c.spec.as_ref())
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty()),
            name,
            volume: volume.name.clone(),
        });
    }
    claims
}

fn class_of(spec: &PersistentVolumeClaimSpec, cluster: &Cluster) -> Option<String> {
    spec.storage_class_name
        .clone()
        .or_else(|| cluster.default_class().and_then(|c| c.metadata.name.clone()))
}

fn requested(spec: &PersistentVolumeClaimSpec) -> Option<i64> {
    let storage = spec.resources.as_ref()?.requests.as_ref()?.get("storage")?;
    parse_bytes(&storage.0)
}

/// Whether `claim` passes the scheduler's storage check on `node`.
pub fn fit(claim: &Claim, node: &Node, pvs: &[PersistentVolume], cluster: &Cluster) -> Fit {
    let yes = |reason: String| Fit { fits: true, reason };
    let no = |reason: String| Fit { fits: false, reason };
    if claim.missing {
        return no(format!("PVC {} does not exist", claim.name));
    }
    if let Some(pv) = &claim.bound_to {
        return bound_fit(pv, node, pvs);
    }
    let Some(class_name) = &claim.class else {
        return no("no StorageClass named and no default class".into());
    };
    let Some(class) = cluster.class(class_name) else {
        return no(format!("StorageClass {class_name} does not exist"));
    };
    if class.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer") {
        return no(format!(
            "not bound yet, and class {class_name} binds Immediately: the pod waits for the binding"
        ));
    }
    if cluster.tracking(&class.provisioner) == Tracking::NotTracked {
        return yes(format!(
            "driver {} not tracked: capacity is not checked",
            class.provisioner
        ));
    }
    let Some(size) = claim.size else {
        return yes("no storage request: capacity is not checked".into());
    };
    let candidates = cluster.capacities_for(class_name, node);
    let Some(best) = candidates.first() else {
        return no(format!(
            "no CSIStorageCapacity for class {class_name} and this node's topology"
        ));
    };
    let best_limit = limit(best).unwrap_or(0);
    let name = best.metadata.name.as_deref().unwrap_or_default();
    if best_limit >= size {
        return yes(format!(
            "needs {}, fits {} ({name})",
            format_bytes(size),
            describe(best)
        ));
    }
    match bytes(best.maximum_volume_size.as_ref()) {
        Some(maximum) => no(format!(
            "needs {}, larger than maximumVolumeSize {} ({name})",
            format_bytes(size),
            format_bytes(maximum)
        )),
        None => no(format!(
            "needs {}, capacity {} ({name})",
            format_bytes(size),
            format_bytes(best_limit)
        )),
    }
}

fn describe(capacity: &CSIStorageCapacity) -> String {
    match (
        bytes(capacity.capacity.as_ref()),
        bytes(capacity.maximum_volume_size.as_ref()),
    ) {
        (_, Some(maximum)) => format!("maximumVolumeSize {}", format_bytes(maximum)),
        (Some(available), None) => format!("capacity {}", format_bytes(available)),
        (None, None) => "no capacity".into(),
    }
}

fn bound_fit(pv_name: &str, node: &Node, pvs: &[PersistentVolume]) -> Fit {
    let Some(pv) = pvs.iter().find(|p| p.metadata.name.as_deref() == Some(pv_name)) else {
        return Fit {
            fits: false,
            reason: format!("bound to PV {pv_name}, which does not exist"),
        };
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let terms = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    // Terms are ORed; the expressions of a term are ANDed.
    let allowed = terms.is_empty()
        || terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|e| requirement_holds(&e.key, &e.operator, e.values.as_deref(), &labels))
        });
    Fit {
        fits: allowed,
        reason: if allowed {
            format!("bound to PV {pv_name}, reachable from this node")
        } else {
            format!("bound to PV {pv_name}, whose node affinity excludes this node")
        },
    }
}

/// Every node for every claim of `pod`, and a one-line verdict.
pub fn why(pod: &Pod, pvcs: &[PersistentVolumeClaim], pvs: &[PersistentVolume], cluster: &Cluster) -> Why {
    let claims = pod_claims(pod, pvcs, cluster);
    let mut nodes: Vec<(String, Vec<Fit>)> = cluster
        .nodes
        .iter()
        .map(|node| {
            let name = node.metadata.name.clone().unwrap_or_default();
            (name, claims.iter().map(|c| fit(c, node, pvs, cluster)).collect())
        })
        .collect();
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    let fitting: Vec<&str> = nodes
        .iter()
        .filter(|(_, fits)| fits.iter().all(|f| f.fits))
        .map(|(n, _)| n.as_str())
        .collect();
    let pod_name = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let scheduled_on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let verdict = verdict(&pod_name, &claims, &fitting, nodes.len(), scheduled_on.as_deref());
    Why {
        held: held(pod, pvcs),
        pod: pod_name,
        scheduled_on,
        claims,
        nodes,
        verdict,
    }
}

/// Whether a finished pod still holds ephemeral claims, and whether
/// volplane's `--ephemeral-release` gives them back.
pub fn held(pod: &Pod, pvcs: &[PersistentVolumeClaim]) -> Option<String> {
    use volplane_ephemeral::model::{SlimPod, claim_name, controlling_pod};
    use volplane_ephemeral::release::{Ending, ReleaseMode, finished};
    let slim: SlimPod = serde_json::to_value(pod)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())?;
    let uid = pod.metadata.uid.as_deref()?;
    let name = pod.metadata.name.as_deref()?;
    let held: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.ephemeral.is_some())
        .map(|v| claim_name(name, &v.name))
        .filter(|claim| {
            pvcs.iter()
                .any(|p| p.metadata.name.as_deref() == Some(claim) && controlling_pod(&p.metadata) == Some(uid))
        })
        .collect();
    if held.is_empty() {
        return None;
    }
    let claims = held.join(", ");
    // `Terminated` accepts every finished pod; the ending says which mode releases it.
    let done = finished(&slim, ReleaseMode::Terminated)?;
    let why = done.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    Some(match done.ending {
        Ending::Rejected => format!(
            "the pod failed before any container started{why} and will never run, but still holds {claims}: \
             volplane releases them with --ephemeral-release=rejected (the default) or terminated{}",
            if done.never_admitted {
                " at once"
            } else {
                ", --ephemeral-release-delay after the pod finished"
            }
        ),
        Ending::Terminated => format!(
            "the pod has terminated and will never run again, but still holds {claims}: \
             volplane releases them only with --ephemeral-release=terminated, \
             --ephemeral-release-delay after its last container finished; \
             otherwise they stay until the pod is deleted"
        ),
    })
}

fn verdict(pod: &str, claims: &[Claim], fitting: &[&str], nodes: usize, scheduled_on: Option<&str>) -> String {
    let storage = if claims.is_empty() { " (it has no claims)" } else { "" };
    let placed = scheduled_on
        .map(|n| format!("; it is scheduled on {n}"))
        .unwrap_or_default();
    match fitting {
        [] => format!("{pod}: its volumes fit on none of the {nodes} nodes{placed}"),
        [one] => format!("{pod}: its volumes fit only on {one}{storage}{placed}"),
        many if many.len() == nodes => {
            format!("{pod}: its volumes fit on all {nodes} nodes{storage}{placed}")
        }
        many => format!(
            "{pod}: its volumes fit on {} of {nodes} nodes: {}{placed}",
            many.len(),
            many.join(", ")
        ),
    }
}

/// kubectl's age format (`k8s.io/apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_age(age: Duration) -> String {
    let seconds = age.as_secs();
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    let years = days / 365;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if years < 8 {
        match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        }
    } else {
        format!("{years}y")
    }
}

mod rows;
pub use rows::{CapacityRow, Manager, capacity_rows};

#[cfg(test)]
mod tests;
