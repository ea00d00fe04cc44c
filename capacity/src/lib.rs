//! The capacity controller: publishes one `CSIStorageCapacity` object per
//! (topology segment, storage class) so the scheduler only places pods whose
//! late-bound volumes fit.
//!
//! - [`model`]: pure — segments, classes, objects, reconciliation.
//! - [`queue`]: pure — the work queue keyed by value, backoff and poll spreading.
//! - [`reconcile`]: the I/O — watches, GetCapacity, writes, events, metrics.
//! - [`owner`]: resolves `--capacity-owner` to an owner reference.

mod error;
pub mod metrics;
pub mod model;
pub mod owner;
pub mod quantity;
pub mod queue;
pub mod reconcile;

pub use error::{Error, Result};
pub use metrics::CapacityMetrics;
pub use reconcile::{CapacityConfig, CapacityController, Topology};
