//! The capacity controller: publishes one `CSIStorageCapacity` object per
//! (topology segment, storage class) so the scheduler only places pods whose
//! late-bound volumes fit.
//!
//! - [`model`]: pure — segments, classes, objects, reconciliation.
//! - [`topology`]: pure — central mode's segments, updated event by event.
//! - [`adopt`]: pure — when csi-provisioner's objects may be taken over.
//! - [`claim`]: pure — a claim as placements read it (selected node, class, request, bound).
//! - [`in_flight`]: pure — what the scheduler's placements in flight reserve, and
//!   when a fall of the driver's value ends a reservation.
//! - [`reconcile`]: the I/O — the loop over the watches (`inputs`), GetCapacity, writes, events, metrics.
//! - `config`: what the controller is told up front ([`CapacityConfig`]).
//! - [`owner`]: resolves `--capacity-owner` to an owner reference.

pub mod adopt;
pub mod claim;
mod config;
mod error;
pub mod in_flight;
mod inputs;
pub mod metrics;
pub mod model;
pub mod owner;
pub mod placements;
pub mod quantity;
pub mod reconcile;
pub mod topology;

pub use error::{Error, Result};
pub use metrics::CapacityMetrics;
pub use reconcile::{CapacityConfig, CapacityController, Topology};
