//! Turns flags and driver facts into the health controller (central) or
//! the node-side health agent (`--node-deployment`).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};
use volplane_csi::{CsiClient, DriverInfo};
use volplane_health::plan::{self, Timing};
use volplane_health::{HealthConfig, HealthController, HealthMetrics, NodeHealthAgent, NodeHealthConfig};
use volplane_runtime::Leadership;

use crate::args::Args;
use crate::idle::IdleReason;

/// The health side this process runs.
#[derive(Debug)]
pub enum Health {
    /// Conditions from the controller service, events on PVCs.
    Controller(HealthController),
    /// Stats and conditions from the node service, events on pods.
    Node(NodeHealthAgent),
}

impl Health {
    /// Turns true once the caches are filled.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        match self {
            Self::Controller(controller) => controller.readiness(),
            Self::Node(agent) => agent.readiness(),
        }
    }

    /// Runs until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        match self {
            Self::Controller(controller) => controller.run(shutdown).await,
            Self::Node(agent) => agent.run(shutdown).await,
        }
    }
}

/// The node agent's settings, or why the driver's node service cannot
/// serve it (said once).
fn node_agent(driver: &DriverInfo, args: &Args, instance: String) -> Result<NodeHealthConfig, IdleReason> {
    // Args::plan refuses --node-deployment without a node name.
    let node = args.node_name_value().ok_or(IdleReason("NoNodeName"))?.to_string();
    let conditions = match plan::node_conditions(driver) {
        Ok(conditions) => conditions,
        Err(unsupported) => {
            error!("{unsupported}");
            return Err(IdleReason(unsupported.reason()));
        }
    };
    if !conditions {
        info!(driver = %driver.name, "the node service does not advertise VOLUME_CONDITION: usage metrics only");
    }
    Ok(NodeHealthConfig {
        driver: driver.name.clone(),
        node,
        kubelet_dir: args.kubelet_dir.to_string_lossy().into_owned(),
        interval: args.health_monitor_interval,
        workers: usize::from(args.health_workers),
        conditions,
        instance,
    })
}

/// Builds the health side, or why it stays idle when the driver lacks what
/// it needs (said once, clearly; the rest of the process keeps running). The
/// leadership is asked for only when the central controller will run.
pub fn build(
    client: &kube::Client,
    csi: &CsiClient,
    driver: &DriverInfo,
    args: &Args,
    metrics: Arc<HealthMetrics>,
    leadership: impl FnOnce() -> Leadership,
) -> Result<Health, IdleReason> {
    let instance = args
        .pod_name_value()
        .or(args.node_name_value())
        .unwrap_or("volplane")
        .to_string();
    if args.node_deployment {
        let agent = node_agent(driver, args, instance)?;
        return Ok(Health::Node(NodeHealthAgent::new(
            client.clone(),
            csi.clone(),
            agent,
            metrics,
        )));
    }
    let timing = Timing {
        list_interval: args.health_list_interval,
        page_size: args.health_list_page_size,
        get_interval: args.health_monitor_interval,
        workers: usize::from(args.health_workers),
    };
    let chosen = match plan::controller_plan(driver, timing) {
        Ok(chosen) => chosen,
        Err(unsupported) => {
            error!("{unsupported}");
            return Err(IdleReason(unsupported.reason()));
        }
    };
    let config = HealthConfig {
        driver: driver.name.clone(),
        source: chosen.source,
        fallback: chosen.fallback,
        // Never zero: Args::plan refuses it.
        node_failure_threshold: args.health_node_watcher.then_some(args.health_node_failure_threshold),
        instance,
    };
    Ok(Health::Controller(HealthController::new(
        client.clone(),
        csi.clone(),
        config,
        metrics,
        leadership(),
    )))
}
