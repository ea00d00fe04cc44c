//! The rows of `kubectl volplane capacity`: per (node, class), the object
//! the scheduler uses, whose it is, and what volplane reserved from the
//! driver's value.

use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use serde::Serialize;
use volplane_capacity::model::Reservation;

use super::{Cluster, Tracking, bytes, selector_text};

/// One row of `kubectl volplane capacity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityRow {
    /// The node.
    pub node: String,
    /// The StorageClass.
    pub class: String,
    /// Its provisioner.
    pub driver: String,
    /// Whether the scheduler checks capacity for it.
    pub tracking: Tracking,
    /// Published capacity in bytes (`None`: no object applies).
    pub capacity: Option<i64>,
    /// What placements in flight reserve, in bytes, by volplane's
    /// `volplane.io/reserved` annotation (0 without one; `None`: not
    /// volplane's object, or none applies).
    pub reserved: Option<i64>,
    /// The driver's own value behind `capacity`, in bytes: by volplane's
    /// `volplane.io/driver-capacity` annotation, else `capacity` itself
    /// (`None`: not volplane's object, or none applies).
    pub driver_capacity: Option<i64>,
    /// Published maximum volume size in bytes.
    pub maximum_volume_size: Option<i64>,
    /// `namespace/name` of the object that applies (the one admitting the
    /// largest volume when several do).
    pub object: Option<String>,
    /// How long that object has existed, in seconds.
    pub age_seconds: Option<u64>,
    /// That object's `nodeTopology`, as `key=value` pairs and expressions.
    pub topology: Option<String>,
    /// Who maintains that object, by its `csi.storage.k8s.io/managed-by`.
    pub managed_by: Option<Manager>,
    /// Other objects that also apply to the node and class: stale ones (a
    /// duplicate, a left-over of another controller). The scheduler accepts
    /// the node when any of them says the volume fits.
    pub others: usize,
}

/// Who maintains a CSIStorageCapacity object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Manager {
    /// volplane (`volplane`, `volplane-<node>`).
    Volplane,
    /// csi-provisioner (`external-provisioner[-<node>]`): volplane takes it
    /// over once csi-provisioner has stopped (`--capacity-adopt`).
    CsiProvisioner,
    /// Anyone else, or nobody (no such label): never touched by volplane.
    Foreign,
}

impl Manager {
    /// Of an object, by its labels.
    pub fn of(object: &CSIStorageCapacity) -> Self {
        let label = object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("csi.storage.k8s.io/managed-by"))
            .map(String::as_str)
            .unwrap_or_default();
        if label == "volplane" || label.starts_with("volplane-") {
            Self::Volplane
        } else if label == "external-provisioner" || label.starts_with("external-provisioner-") {
            Self::CsiProvisioner
        } else {
            Self::Foreign
        }
    }

    /// As `kubectl volplane capacity` shows it.
    pub fn text(self) -> &'static str {
        match self {
            Self::Volplane => "volplane",
            Self::CsiProvisioner => "csi-provisioner",
            Self::Foreign => "foreign",
        }
    }
}

/// What volplane's object reserves and what its driver said (`None` for
/// others' objects): by its annotations; without them nothing is reserved.
fn reservation(object: &CSIStorageCapacity) -> (Option<i64>, Option<i64>) {
    if Manager::of(object) != Manager::Volplane {
        return (None, None);
    }
    match Reservation::read(object.metadata.annotations.as_ref()) {
        Some(r) => (Some(r.reserved), Some(r.driver_capacity)),
        None => (Some(0), bytes(object.capacity.as_ref())),
    }
}

/// One row per (node, class), sorted by node then class, for the classes
/// whose name and provisioner pass the filters.
pub fn capacity_rows(
    cluster: &Cluster,
    class_filter: Option<&str>,
    driver_filter: Option<&str>,
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<CapacityRow> {
    let mut rows = Vec::new();
    for node in &cluster.nodes {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        for class in &cluster.classes {
            let class_name = class.metadata.name.clone().unwrap_or_default();
            if class_filter.is_some_and(|f| f != class_name) || driver_filter.is_some_and(|f| f != class.provisioner) {
                continue;
            }
            let applying = cluster.capacities_for(&class_name, node);
            let best = applying.first().copied();
            let (reserved, driver_capacity) = best.map_or((None, None), reservation);
            rows.push(CapacityRow {
                reserved,
                driver_capacity,
                managed_by: best.map(Manager::of),
                others: applying.len().saturating_sub(1),
                node: node_name.clone(),
                class: class_name,
                driver: class.provisioner.clone(),
                tracking: cluster.tracking(&class.provisioner),
                capacity: best.and_then(|c| bytes(c.capacity.as_ref())),
                maximum_volume_size: best.and_then(|c| bytes(c.maximum_volume_size.as_ref())),
                object: best.map(|c| {
                    format!(
                        "{}/{}",
                        c.metadata.namespace.as_deref().unwrap_or_default(),
                        c.metadata.name.as_deref().unwrap_or_default()
                    )
                }),
                age_seconds: best
                    .and_then(|c| c.metadata.creation_timestamp.as_ref())
                    .map(|t| u64::try_from(now.as_second() - t.0.as_second()).unwrap_or(0)),
                topology: best.and_then(|c| c.node_topology.as_ref()).map(selector_text),
            });
        }
    }
    rows.sort_by(|a, b| (&a.node, &a.class).cmp(&(&b.node, &b.class)));
    rows
}
