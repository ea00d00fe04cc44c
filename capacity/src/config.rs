//! What the capacity controller is told up front: the driver, where
//! segments come from, the objects' identity, timing.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use volplane_runtime::Backoff;

use crate::model::{Enablement, ObjectIdentity, Segment};

/// Where segments come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// From CSINodes and Node labels (central mode, driver with topology).
    Central,
    /// One fixed segment (per-node mode, or a driver without topology).
    Fixed(Segment),
}

/// Everything the controller needs to know up front.
#[derive(Clone, Debug)]
pub struct CapacityConfig {
    /// The CSI driver name (StorageClass `provisioner`, PV `spec.csi.driver`).
    pub driver: String,
    /// Send the segment as `accessible_topology` (driver has VOLUME_ACCESSIBILITY_CONSTRAINTS).
    pub send_topology: bool,
    /// Where segments come from.
    pub topology: Topology,
    /// Refresh the items of a PV's class and segment when it is created or
    /// deleted (central mode: one cluster-wide PV watch). A per-node
    /// instance leaves it off and polls its local driver instead, so the
    /// API server is not asked for every PV once per node.
    pub volume_events: bool,
    /// Namespace, labels and owner of the objects.
    pub identity: ObjectIdentity,
    /// How often each item is refreshed.
    pub poll_interval: Duration,
    /// Concurrent driver calls and writes.
    pub workers: usize,
    /// Include Immediate-binding classes.
    pub include_immediate: bool,
    /// What turns publishing on: the CSIDriver's `storageCapacity`, or always.
    pub enablement: Enablement,
    /// Retry delays after failures.
    pub backoff: Backoff,
    /// Where Warning events go (the owner), if anywhere.
    pub event_target: Option<ObjectReference>,
    /// `reportingInstance` of events.
    pub instance: String,
    /// The `managed-by` value of csi-provisioner's objects to take over
    /// (`--capacity-adopt external-provisioner`), if any.
    pub adopt_from: Option<String>,
    /// Per-node mode: this node, whose placements in flight the central
    /// placements controller lists in a ConfigMap of `identity.namespace`
    /// (watched by name; see [`crate::placements`]).
    pub node_placements: Option<String>,
}
