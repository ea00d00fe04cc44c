//! Prometheus metrics of the ephemeral controller.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::FailureReason;
use crate::release::Ending;

/// The ephemeral controller's metrics.
#[derive(Debug)]
pub struct EphemeralMetrics {
    /// PVCs created.
    pub created: Counter,
    /// Failures by reason (`conflict`, `forbidden`, `invalid`, `other`).
    pub failures: Family<Vec<(&'static str, String)>, Counter>,
    /// Seconds from the pod's creation to its PVC's creation.
    pub pod_to_claim_seconds: Histogram,
    /// Pod reconciles by outcome (`ok`, `failed`, `not_leading`).
    pub reconciles: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Claims of finished pods released, by reason (`rejected`, `terminated`).
    pub released: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Finished pods whose claims wait for their node (Ready again, or no
    /// longer listing the volume in `status.volumesInUse`) or for a pod
    /// that mounts the claim by name.
    pub releases_waiting: Gauge,
    /// Pods whose last attempt to ensure their claims failed, by the reason
    /// of the first failure: they are retried with backoff.
    pub failing: Family<Vec<(&'static str, String)>, Gauge>,
}

impl EphemeralMetrics {
    /// The gauge of pods failing for `reason`.
    pub fn failing(&self, reason: FailureReason) -> Gauge {
        self.failing
            .get_or_create(&vec![("reason", reason.label().to_string())])
            .clone()
    }

    /// Counts one reconcile with `outcome`.
    pub fn reconciled(&self, outcome: &'static str) {
        self.reconciles.get_or_create(&vec![("outcome", outcome)]).inc();
    }
}

impl EphemeralMetrics {
    /// Registers the metrics under `volplane_ephemeral_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            created: Counter::default(),
            failures: Family::default(),
            pod_to_claim_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            reconciles: Family::default(),
            released: Family::default(),
            releases_waiting: Gauge::default(),
            failing: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("ephemeral");
        sub.register(
            "claims_created",
            "PVCs created for generic ephemeral volumes",
            metrics.created.clone(),
        );
        sub.register(
            "claim_failures",
            "ephemeral volumes whose PVC could not be ensured, by reason",
            metrics.failures.clone(),
        );
        sub.register(
            "pod_to_claim_seconds",
            "time from a pod's creation to the creation of its PVC (second resolution, as Kubernetes timestamps)",
            metrics.pod_to_claim_seconds.clone(),
        );
        sub.register(
            "reconciles",
            "pod reconciles by outcome: ok, failed, not_leading (skipped; redone when this instance leads)",
            metrics.reconciles.clone(),
        );
        sub.register(
            "released",
            "PVCs of finished pods released (deleted, PVC protection lifted), by reason: rejected, terminated",
            metrics.released.clone(),
        );
        sub.register(
            "releases_waiting",
            "finished pods whose PVCs wait: for their node (NotReady, or listing the volume in status.volumesInUse) or for a pod that mounts the claim by name",
            metrics.releases_waiting.clone(),
        );
        sub.register(
            "claims_failing",
            "pods whose last attempt to ensure their PVCs failed, retried with backoff, by reason: conflict, forbidden, invalid, other",
            metrics.failing.clone(),
        );
        metrics.start_at_zero();
        metrics
    }

    /// Every known label value at 0, so that a rate or an alert on it has a
    /// series before the first failure.
    fn start_at_zero(&self) {
        for reason in FailureReason::COUNTED {
            self.failures
                .get_or_create(&vec![("reason", reason.label().to_string())])
                .inc_by(0);
            self.failing(reason).set(0);
        }
        for outcome in ["ok", "failed", "not_leading"] {
            self.reconciles.get_or_create(&vec![("outcome", outcome)]).inc_by(0);
        }
        for ending in Ending::ALL {
            self.released.get_or_create(&vec![("reason", ending.label())]).inc_by(0);
        }
    }
}
