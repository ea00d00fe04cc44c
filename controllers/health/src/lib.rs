//! Volume health monitoring for CSI volumes: the driver's volume
//! conditions as events on PVCs (controller side, [`HealthController`]),
//! node failures as events on the PVCs their pods use (its node watcher),
//! and per-node volume stats and conditions ([`NodeHealthAgent`]).

pub mod metrics;
pub mod model;
mod monitor;
mod node;
pub mod plan;

pub use metrics::HealthMetrics;
pub use monitor::{HealthConfig, HealthController, Source};
pub use node::{NodeHealthAgent, NodeHealthConfig};

/// What the health controllers can fail with (they log and retry
/// everything at run time; this is for the caller's signature).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up failed.
    #[error("{0}")]
    Setup(String),
}
