//! Prometheus metrics of the capacity controller.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label set of one label.
pub type OneLabel = Vec<(&'static str, String)>;

/// The capacity controller's metrics.
#[derive(Debug)]
pub struct CapacityMetrics {
    /// Objects that should exist: segments × classes.
    pub desired: Gauge,
    /// Objects that exist and stand for a desired item.
    pub current: Gauge,
    /// Objects being deleted as duplicates or for items no longer desired.
    pub obsolete: Gauge,
    /// GetCapacity latency by gRPC code (`OK` on success).
    pub get_capacity_seconds: Family<OneLabel, Histogram>,
    /// Writes to the API server by verb (create, patch, delete).
    pub api_writes: Family<OneLabel, Counter>,
    /// Work items waiting or running.
    pub queue_depth: Gauge,
    /// 1 while capacity is tracked (see `--capacity-enablement`), else 0.
    pub enabled: Gauge,
    /// csi-provisioner's objects for this driver not adopted yet.
    pub incumbent_objects: Gauge,
    /// 1 while csi-provisioner is found to still maintain its objects.
    pub incumbent_running: Gauge,
    /// Other controllers' (or nobody's) objects for the driver (central mode).
    pub foreign_objects: Gauge,
    /// Watches listing again (after an error or a 410): decisions wait.
    pub relisting: Gauge,
    /// Claims placed by the scheduler whose reservation stands.
    pub placements_in_flight: Gauge,
    /// Bytes those placements reserve over all items.
    pub reserved_bytes: Gauge,
    /// Seconds since the driver gave the oldest value standing for a
    /// desired item.
    pub oldest_value_age: Gauge<f64, AtomicU64>,
    /// The poll interval (`--capacity-poll-interval`) in seconds: what the
    /// age is compared with.
    pub poll_interval: Gauge<f64, AtomicU64>,
}

impl CapacityMetrics {
    /// Registers the metrics under `volplane_capacity_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            desired: Gauge::default(),
            current: Gauge::default(),
            obsolete: Gauge::default(),
            get_capacity_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15))),
            api_writes: Family::default(),
            queue_depth: Gauge::default(),
            enabled: Gauge::default(),
            incumbent_objects: Gauge::default(),
            incumbent_running: Gauge::default(),
            foreign_objects: Gauge::default(),
            relisting: Gauge::default(),
            placements_in_flight: Gauge::default(),
            reserved_bytes: Gauge::default(),
            oldest_value_age: Gauge::default(),
            poll_interval: Gauge::default(),
        };
        let sub = registry.sub_registry_with_prefix("capacity");
        for (name, help, gauge) in metrics.gauges() {
            sub.register(name, help, gauge.clone());
        }
        sub.register(
            "oldest_value_age_seconds",
            "seconds since the driver gave the oldest of the values standing for the items it should publish (polls keep it below the poll interval; it grows while GetCapacity fails)",
            metrics.oldest_value_age.clone(),
        );
        sub.register(
            "poll_interval_seconds",
            "the interval between two GetCapacity calls for an item (--capacity-poll-interval)",
            metrics.poll_interval.clone(),
        );
        sub.register(
            "get_capacity_duration_seconds",
            "GetCapacity latency by gRPC code",
            metrics.get_capacity_seconds.clone(),
        );
        sub.register(
            "api_writes",
            "CSIStorageCapacity writes to the API server by verb",
            metrics.api_writes.clone(),
        );
        for verb in ["create", "patch", "delete"] {
            metrics
                .api_writes
                .get_or_create(&vec![("verb", verb.to_string())])
                .inc_by(0);
        }
        metrics
    }

    /// Every gauge with its name and help.
    fn gauges(&self) -> [(&'static str, &'static str, &Gauge); 11] {
        [
            (
                "objects_desired",
                "CSIStorageCapacity objects that should exist",
                &self.desired,
            ),
            (
                "objects_current",
                "CSIStorageCapacity objects that exist for a desired item",
                &self.current,
            ),
            (
                "objects_obsolete",
                "CSIStorageCapacity objects being deleted (duplicates, gone segments or classes)",
                &self.obsolete,
            ),
            ("queue_depth", "work items waiting or running", &self.queue_depth),
            (
                "enabled",
                "1 while capacity is tracked for the driver (CSIDriver spec.storageCapacity, or --capacity-enablement always)",
                &self.enabled,
            ),
            (
                "incumbent_objects",
                "csi-provisioner's CSIStorageCapacity objects of the driver not adopted yet (--capacity-adopt)",
                &self.incumbent_objects,
            ),
            (
                "incumbent_running",
                "1 while csi-provisioner still maintains its objects (it re-created one volplane adopted): they are left alone",
                &self.incumbent_running,
            ),
            (
                "foreign_objects",
                "CSIStorageCapacity objects of the driver that neither volplane nor csi-provisioner maintains (central mode): reported, never touched",
                &self.foreign_objects,
            ),
            (
                "watches_relisting",
                "watches listing again after an error or a 410 Gone: no write and no GetCapacity call until they end",
                &self.relisting,
            ),
            (
                "placements_in_flight",
                "claims the scheduler placed (volume.kubernetes.io/selected-node) whose reservation stands: not bound yet, or bound and not yet in an answer of the driver, and their volume not taken for a fall of the driver's value",
                &self.placements_in_flight,
            ),
            (
                "reserved_bytes",
                "bytes the placements in flight reserve, subtracted from the driver's values in what is published",
                &self.reserved_bytes,
            ),
        ]
    }

    /// Counts one API write.
    pub fn wrote(&self, verb: &'static str) {
        self.api_writes.get_or_create(&vec![("verb", verb.to_string())]).inc();
    }
}
