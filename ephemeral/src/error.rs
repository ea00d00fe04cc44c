use crate::model::FailureReason;

/// One ephemeral volume whose PVC could not be ensured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimFailure {
    /// The PVC name.
    pub claim: String,
    /// Why, as a metric label.
    pub reason: FailureReason,
    /// Why, for humans.
    pub message: String,
}

/// What a reconcile of one pod can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some volumes of the pod failed; the others were handled.
    #[error("{} of the pod's ephemeral volumes failed: {}", .0.len(), .0.iter().map(|f| format!("{} ({})", f.claim, f.message)).collect::<Vec<_>>().join("; "))]
    Claims(Vec<ClaimFailure>),
}
