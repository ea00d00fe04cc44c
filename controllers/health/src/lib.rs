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

/// What the health controllers can fail with: nothing so far. They log and
/// retry everything at run time; the type keeps their `run` signature in
/// line with the other controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
