//! The ephemeral controller: for every pod with generic ephemeral volumes,
//! creates the PVC `<pod>-<volume>` owned by the pod, so garbage collection
//! removes it with the pod.
//!
//! - [`model`]: pure — names, metadata, ownership, trimming.
//! - [`reconcile`]: the kube-runtime controller — watches, creates, events, metrics.

mod error;
pub mod metrics;
pub mod model;
pub mod reconcile;

pub use error::{ClaimFailure, Error};
pub use metrics::EphemeralMetrics;
pub use reconcile::{EphemeralConfig, EphemeralController};
