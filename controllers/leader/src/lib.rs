//! Leader election for volplane's controllers.
//!
//! Each controller group (capacity per driver, ephemeral cluster-wide)
//! runs one [`Elector`] on a coordination.k8s.io Lease. Every replica keeps
//! its caches warm; only the holder writes, and every write goes through
//! [`Leadership::guard`], which refuses writes outside a term and cuts
//! off writes in flight when the term ends.

mod elector;
mod leadership;

pub use elector::{ElectionConfig, ElectionMetrics, Elector};
pub use leadership::{Leadership, NotLeader, Term};
