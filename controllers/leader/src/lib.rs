//! Leader election for volplane's controllers.
//!
//! Each controller group (capacity per driver, ephemeral cluster-wide)
//! runs one [`Elector`] on a coordination.k8s.io Lease and publishes its
//! [`Term`](volplane_runtime::Term). Every replica keeps its caches warm;
//! only the holder writes, and every write goes through
//! [`Leadership::guard`](volplane_runtime::Leadership::guard), which refuses
//! writes outside a term and cuts off writes in flight when the term ends.

mod elector;

pub use elector::{ElectionConfig, ElectionMetrics, Elector, TimingError};
