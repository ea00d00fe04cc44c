//! Prometheus metrics of the health controllers.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{REASON_ABNORMAL, REASON_NODE_FAILED, REASON_NODE_RECOVERED, REASON_NORMAL};

/// The `result` values of `volplane_health_checks_total`: an
/// observation's (see [`crate::model::Observation::label`]), `error` and
/// `unimplemented`.
pub const CHECK_RESULTS: [&str; 6] = [
    "normal",
    "abnormal",
    "missing",
    "no_condition",
    "error",
    "unimplemented",
];

/// Labels naming a PVC.
pub type ClaimLabels = Vec<(&'static str, String)>;

/// The labels of the PVC `namespace/name`.
pub fn claim_labels(namespace: &str, name: &str) -> ClaimLabels {
    vec![
        ("namespace", namespace.to_string()),
        ("persistentvolumeclaim", name.to_string()),
    ]
}

/// The health controllers' metrics.
#[derive(Debug)]
pub struct HealthMetrics {
    /// 1 per volume whose last known condition is abnormal (controller side).
    pub abnormal: Family<ClaimLabels, Gauge>,
    /// Volume checks by result.
    pub checks: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Duration of complete ListVolumes sweeps.
    pub sweep_seconds: Histogram,
    /// Events published, by reason.
    pub events: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Node side: volume usage in bytes (`usage`: used, available, total).
    pub volume_bytes: Family<Vec<(&'static str, String)>, Gauge>,
    /// Node side: volume usage in inodes (`usage`: used, available, total).
    pub volume_inodes: Family<Vec<(&'static str, String)>, Gauge>,
    /// 1 for the way conditions are read now (`list_volumes`,
    /// `get_volume`, or `none` once the driver answered Unimplemented).
    pub source: Family<Vec<(&'static str, &'static str)>, Gauge>,
    /// Nodes the node watcher holds failed now.
    pub failed_nodes: Gauge,
    /// Node side: 1 while the driver reports the volume abnormal, else 0.
    pub node_abnormal: Family<ClaimLabels, Gauge>,
}

impl HealthMetrics {
    /// Registers the metrics under `volplane_health_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            abnormal: Family::default(),
            checks: Family::default(),
            sweep_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            events: Family::default(),
            volume_bytes: Family::default(),
            volume_inodes: Family::default(),
            node_abnormal: Family::default(),
            source: Family::default(),
            failed_nodes: Gauge::default(),
        };
        let sub = registry.sub_registry_with_prefix("health");
        sub.register(
            "abnormal_volumes",
            "1 for each volume whose condition is abnormal (controller side), by PVC",
            metrics.abnormal.clone(),
        );
        sub.register(
            "checks",
            "volume condition checks by result: normal, abnormal, missing, no_condition, error, unimplemented",
            metrics.checks.clone(),
        );
        sub.register(
            "sweep_duration_seconds",
            "duration of complete ListVolumes sweeps",
            metrics.sweep_seconds.clone(),
        );
        sub.register(
            "source",
            "1 for how the controller side reads conditions now: list_volumes, get_volume, or none after Unimplemented",
            metrics.source.clone(),
        );
        sub.register(
            "failed_nodes",
            "nodes the node watcher holds failed (not Ready past the threshold) now",
            metrics.failed_nodes.clone(),
        );
        sub.register("events", "events published by reason", metrics.events.clone());
        metrics.register_node_side(sub);
        metrics.start_at_zero();
        metrics
    }

    /// The node side's usage and condition gauges.
    fn register_node_side(&self, sub: &mut Registry) {
        sub.register(
            "volume_bytes",
            "node side: volume usage in bytes from NodeGetVolumeStats (usage: used, available, total)",
            self.volume_bytes.clone(),
        );
        sub.register(
            "volume_inodes",
            "node side: volume usage in inodes from NodeGetVolumeStats (usage: used, available, total)",
            self.volume_inodes.clone(),
        );
        sub.register(
            "node_volume_abnormal",
            "node side: 1 while NodeGetVolumeStats reports the volume abnormal, else 0",
            self.node_abnormal.clone(),
        );
    }

    /// Every known result and event reason at 0, so that rates and alerts
    /// have a series before the first of each.
    fn start_at_zero(&self) {
        for result in CHECK_RESULTS {
            self.checks.get_or_create(&vec![("result", result)]).inc_by(0);
        }
        for reason in [
            REASON_ABNORMAL,
            REASON_NORMAL,
            REASON_NODE_FAILED,
            REASON_NODE_RECOVERED,
        ] {
            self.events.get_or_create(&vec![("reason", reason)]).inc_by(0);
        }
    }

    /// Marks `source` as the way conditions are read now.
    pub fn set_source(&self, source: &'static str) {
        for label in ["list_volumes", "get_volume", "none"] {
            self.source
                .get_or_create(&vec![("source", label)])
                .set(i64::from(label == source));
        }
    }

    /// Counts a check with `result`.
    pub fn checked(&self, result: &'static str) {
        self.checks.get_or_create(&vec![("result", result)]).inc();
    }
}
