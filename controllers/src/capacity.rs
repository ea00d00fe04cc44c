//! Turns flags and driver facts into a running capacity controller.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Recorder, Reporter};
use tracing::{error, info};
use volplane_capacity::model::{self, ObjectIdentity};
use volplane_capacity::owner::{self, OwnerMode};
use volplane_capacity::{CapacityConfig, CapacityController, CapacityMetrics, Topology};
use volplane_csi::{ControllerCapability, CsiClient, DriverInfo};
use volplane_runtime::Backoff;
use volplane_runtime::Leadership;
use volplane_runtime::events::{self, Announcement};

use crate::args::{Args, CapacityAdopt, CapacityEnablement, CapacityOwner};
use crate::idle::IdleReason;

/// Why the controller stays idle: the event's reason, and the metric's.
const GET_CAPACITY_UNSUPPORTED: &str = "GetCapacityUnsupported";
const INVALID_TOPOLOGY: &str = "InvalidTopology";

/// Builds the capacity controller, or why it stays idle when the driver
/// cannot report capacity (said once, clearly; the rest of the process
/// keeps running).
pub async fn build(
    client: &kube::Client,
    csi: &CsiClient,
    driver: &DriverInfo,
    args: &Args,
    namespace: &str,
    metrics: Arc<CapacityMetrics>,
    leadership: Leadership,
) -> anyhow::Result<Result<CapacityController, IdleReason>> {
    let node = args.node_deployment.then(|| args.node_name_value()).flatten();
    let mode = owner_mode(args.capacity_owner);
    let owner = owner::resolve(client, mode, namespace, args.pod_name_value(), node).await?;
    // A per-node instance reports on its Node, whoever owns the objects.
    let reported_on = match (node, mode) {
        (Some(_), OwnerMode::Auto | OwnerMode::Pod | OwnerMode::None) => {
            owner::resolve(client, OwnerMode::Node, namespace, None, node).await?
        }
        _ => owner.clone(),
    };
    let event_target = reported_on.as_ref().map(|o| owner::event_target(o, namespace));
    let instance = args.pod_name_value().or(node).unwrap_or("volplane").to_string();

    if !driver.has_controller(ControllerCapability::GetCapacity) {
        let message = format!(
            "CSI driver {} does not advertise the GET_CAPACITY controller capability; \
             the capacity controller stays idle (no CSIStorageCapacity objects are published)",
            driver.name
        );
        idle(client, event_target, instance, GET_CAPACITY_UNSUPPORTED, message).await;
        return Ok(Err(IdleReason(GET_CAPACITY_UNSUPPORTED)));
    }

    let Some((topology, send_topology)) = topology(client, csi, driver, node, event_target.clone(), &instance).await?
    else {
        return Ok(Err(IdleReason(INVALID_TOPOLOGY)));
    };
    let identity = ObjectIdentity {
        namespace: namespace.to_string(),
        driver: model::driver_label_value(&driver.name),
        managed_by: model::managed_by(node),
        owner,
    };
    let placement = Placement {
        topology,
        send_topology,
        node: node.map(str::to_string),
        adopt_from: adopt_from(args.capacity_adopt, node),
    };
    let config = config(args, &driver.name, placement, identity, event_target, instance);
    Ok(Ok(CapacityController::new(
        client.clone(),
        csi.clone(),
        config,
        metrics,
        leadership,
    )))
}

/// The `managed-by` value of csi-provisioner's objects to take over, if any.
fn adopt_from(adopt: CapacityAdopt, node: Option<&str>) -> Option<String> {
    match adopt {
        CapacityAdopt::ExternalProvisioner => {
            let value = volplane_capacity::adopt::incumbent_managed_by(node);
            if value.is_none() {
                tracing::info!(
                    node,
                    "csi-provisioner shortens its label for a node name this long: nothing is adopted"
                );
            }
            value
        }
        CapacityAdopt::None => None,
    }
}

/// Where the controller publishes: its segments, whether GetCapacity gets
/// them, and whether this is a per-node instance.
struct Placement {
    topology: Topology,
    send_topology: bool,
    /// This node, for a per-node instance.
    node: Option<String>,
    /// The `managed-by` value of csi-provisioner's objects to take over.
    adopt_from: Option<String>,
}

/// The controller's settings from the flags and what startup found out.
fn config(
    args: &Args,
    driver: &str,
    placement: Placement,
    identity: ObjectIdentity,
    event_target: Option<ObjectReference>,
    instance: String,
) -> CapacityConfig {
    CapacityConfig {
        driver: driver.to_string(),
        send_topology: placement.send_topology,
        topology: placement.topology,
        // A per-node instance polls its local driver instead of a cluster-wide PV watch.
        volume_events: placement.node.is_none(),
        identity,
        poll_interval: args.capacity_poll_interval(),
        workers: usize::from(args.capacity_workers),
        include_immediate: args.capacity_for_immediate_binding,
        enablement: match args.capacity_enablement {
            CapacityEnablement::Csidriver => model::Enablement::CsiDriver,
            CapacityEnablement::Always => model::Enablement::Always,
        },
        backoff: Backoff {
            base: Duration::from_millis(500),
            max: args.capacity_poll_interval().min(Duration::from_secs(300)),
        },
        event_target,
        instance,
        adopt_from: placement.adopt_from,
        node_placements: placement.node,
    }
}

/// `--capacity-owner`: `auto` is the top-most controller of the pod (the
/// DaemonSet per node, so that uninstalling removes every object; the
/// placements controller deletes those of a node that is gone).
fn owner_mode(flag: CapacityOwner) -> OwnerMode {
    match flag {
        CapacityOwner::Auto => OwnerMode::Auto,
        CapacityOwner::Node => OwnerMode::Node,
        CapacityOwner::Pod => OwnerMode::Pod,
        CapacityOwner::None => OwnerMode::None,
    }
}

/// Where segments come from, and whether GetCapacity sends them: a
/// segment learnt from the driver is sent back, the hostname fallback of a
/// driver without topology is not. `None` when this node's segment cannot
/// be stored (said once; the controller stays idle).
async fn topology(
    client: &kube::Client,
    csi: &CsiClient,
    driver: &DriverInfo,
    node: Option<&str>,
    event_target: Option<ObjectReference>,
    instance: &str,
) -> anyhow::Result<Option<(Topology, bool)>> {
    let Some(node) = node else {
        return Ok(Some(if driver.supports_topology() {
            (Topology::Central, true)
        } else {
            (Topology::Fixed(model::Segment::default()), false)
        }));
    };
    let info = csi.node_get_info().await.context("NodeGetInfo for --node-deployment")?;
    let reported = info
        .accessible_topology
        .map(|t| t.segments)
        .filter(|segments| driver.supports_topology() && !segments.is_empty());
    let segment = model::per_node_segment(node, reported.as_ref());
    if let Some(why) = model::invalid_segment(&segment) {
        let message = format!(
            "NodeGetInfo of CSI driver {} on node {node} returned a topology segment the API server \
             cannot store as a CSIStorageCapacity nodeTopology ({why}); the capacity controller \
             stays idle on this node until the driver is fixed and volplane restarted",
            driver.name
        );
        idle(client, event_target, instance.to_string(), INVALID_TOPOLOGY, message).await;
        return Ok(None);
    }
    info!(%node, %segment, node_id = %info.node_id, "per-node capacity segment");
    Ok(Some((Topology::Fixed(segment), reported.is_some())))
}

/// Says once — log line and Warning event on the owner — why the capacity
/// controller stays idle. Every replica says it: none leads yet.
async fn idle(
    client: &kube::Client,
    event_target: Option<ObjectReference>,
    instance: String,
    reason: &'static str,
    message: String,
) {
    error!("{message}");
    let Some(target) = event_target else {
        return;
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "volplane-capacity".into(),
            instance: Some(instance),
        },
    );
    let announcement = Announcement::warning(reason, "Startup", message);
    if let Err(error) = events::publish(&recorder, &Leadership::unconditional(), &announcement, &target).await {
        error!(%error, reason, "cannot publish event");
    }
}
