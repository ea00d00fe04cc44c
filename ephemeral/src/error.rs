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

impl ClaimFailure {
    /// The note of the Warning event on the pod: the message (from the API
    /// server, admission webhooks and policies: any length, any UTF-8), cut
    /// to what an event note may hold.
    pub fn note(&self) -> String {
        volplane_runtime::text::event_note(&self.message)
    }
}

/// What handling one pod can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some volumes of the pod failed; the others were handled.
    #[error("{} of the pod's ephemeral volumes failed: {}", .0.len(), .0.iter().map(|f| format!("{} ({})", f.claim, f.message)).collect::<Vec<_>>().join("; "))]
    Claims(Vec<ClaimFailure>),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use volplane_runtime::text::{CUT_MARKER, EVENT_NOTE_MAX_BYTES};

    use super::*;

    proptest! {
        #[test]
        fn any_message_makes_a_note_the_api_server_accepts(message in any::<String>(), repeat in 1usize..400) {
            let failure = ClaimFailure {
                claim: "pod-data".into(),
                reason: FailureReason::Other,
                message: message.repeat(repeat),
            };
            let note = failure.note();
            prop_assert!(note.len() <= EVENT_NOTE_MAX_BYTES);
            if failure.message.len() <= EVENT_NOTE_MAX_BYTES {
                prop_assert_eq!(note, failure.message);
            } else {
                prop_assert!(failure.message.starts_with(note.strip_suffix(CUT_MARKER).expect("marked")));
            }
        }
    }
}
