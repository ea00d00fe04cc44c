//! The capacity controller: publishes one `CSIStorageCapacity` object per
//! (topology segment, storage class) so the scheduler only places pods whose
//! late-bound volumes fit.
//!
//! - [`model`]: pure — segments, classes, objects, reconciliation.
//! - [`queue`]: pure — the work queue keyed by value, backoff and poll spreading.

pub mod model;
pub mod quantity;
pub mod queue;
