//! Volume health monitoring for CSI volumes: the driver's volume
//! conditions as events on PVCs (controller side, [`HealthController`]),
//! node failures as events on the PVCs their pods use (its node watcher),
//! and per-node volume stats and conditions ([`NodeHealthAgent`]).

mod calls;
pub mod metrics;
pub mod model;
mod monitor;
mod node;
mod node_watcher;
pub mod plan;
mod pods;
mod volumes;

pub use metrics::HealthMetrics;
pub use monitor::{HealthConfig, HealthController, Source};
pub use node::{NodeHealthAgent, NodeHealthConfig};

/// What announcing a volume condition can fail with; the condition is
/// announced again after the next check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event on the PVC did not go out.
    #[error("event on PVC {namespace}/{claim}: {source}")]
    Event {
        /// The PVC's namespace.
        namespace: String,
        /// The PVC's name.
        claim: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
    /// The PV could not be read afresh before announcing.
    #[error("reading PV {pv}: {source}")]
    Read {
        /// The PV's name.
        pv: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
    /// This process does not lead (any more).
    #[error(transparent)]
    NotLeader(#[from] volplane_runtime::NotLeader),
}
