//! The ephemeral controller: for every pod with generic ephemeral volumes,
//! creates the PVC `<pod>-<volume>` owned by the pod, so garbage collection
//! removes it with the pod.
//!
//! - [`model`]: pure — slim pods and claims, names, metadata, ownership, shared templates.
//! - [`release`]: pure — when the claims of a finished pod may go (`--ephemeral-release`).
//! - [`reconcile`]: the I/O — the loop over the pod and claim watches, creates, events, metrics.

mod error;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod release;

pub use error::{ClaimFailure, Error};
pub use metrics::EphemeralMetrics;
pub use reconcile::{EphemeralConfig, EphemeralController};
pub use release::ReleaseMode;
