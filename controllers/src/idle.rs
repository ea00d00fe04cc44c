//! `volplane_controller_idle`: a selected controller that does not run
//! because the CSI driver cannot serve it (said once in the log and, for
//! capacity, as an event; this keeps it visible to alerts).

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a controller stays idle: a stable `reason` label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleReason(pub &'static str);

/// The gauge family, 1 per idle (controller, reason).
#[derive(Clone, Debug, Default)]
pub struct IdleMetrics {
    idle: Family<Vec<(&'static str, &'static str)>, Gauge>,
}

impl IdleMetrics {
    /// Registers `controller_idle` in `registry` (volplane's own).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "controller_idle",
            "1 for a selected controller that stays idle because the CSI driver cannot serve it, by controller and reason",
            metrics.idle.clone(),
        );
        metrics
    }

    /// Marks `controller` idle for `reason`.
    pub fn idle(&self, controller: &'static str, reason: IdleReason) {
        self.idle
            .get_or_create(&vec![("controller", controller), ("reason", reason.0)])
            .set(1);
    }
}
