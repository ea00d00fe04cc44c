//! Events, published the one way every controller does it: only while
//! leading (a follower stays silent), with the note cut to the API
//! server's limit on a character boundary.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

use crate::leadership::Leadership;
use crate::text;

/// What an event says; the same announcement may go on several objects.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// Normal or Warning.
    pub type_: EventType,
    /// The machine-readable reason (`CapacityTrackingDisabled`, …).
    pub reason: &'static str,
    /// The human-readable note; cut to [`text::EVENT_NOTE_MAX_BYTES`] when published.
    pub note: String,
    /// What volplane was doing (`GetCapacity`, `CreateClaim`, …).
    pub action: &'static str,
    /// A second object the event is about (the PV of a PVC's event).
    pub related: Option<ObjectReference>,
}

impl Announcement {
    /// A Warning.
    pub fn warning(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        Self::new(EventType::Warning, reason, action, note)
    }

    /// A Normal event.
    pub fn normal(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        Self::new(EventType::Normal, reason, action, note)
    }

    /// Of `type_`.
    pub fn new(type_: EventType, reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        Self {
            type_,
            reason,
            note: note.into(),
            action,
            related: None,
        }
    }

    /// The same, also about `object`.
    #[must_use]
    pub fn related_to(mut self, object: ObjectReference) -> Self {
        self.related = Some(object);
        self
    }

    /// The event as sent.
    pub fn event(&self) -> Event {
        Event {
            type_: self.type_,
            reason: self.reason.into(),
            note: Some(text::event_note(&self.note)),
            action: self.action.into(),
            secondary: self.related.clone(),
        }
    }
}

/// How a publication under the leadership guard ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// The API server has it.
    Sent,
    /// Not leading (or the term ended in flight): nothing was sent.
    NotLeading,
}

/// Publishes `announcement` about `target` if this process leads.
pub async fn publish(
    recorder: &Recorder,
    leadership: &Leadership,
    announcement: &Announcement,
    target: &ObjectReference,
) -> Result<Published, kube::Error> {
    match leadership.guard(recorder.publish(&announcement.event(), target)).await {
        Ok(Ok(())) => Ok(Published::Sent),
        Ok(Err(error)) => Err(error),
        Err(_) => Ok(Published::NotLeading),
    }
}

/// Publishes `announcement` on each of `targets` in the background; a
/// failure is logged, not retried (events are best effort).
pub fn publish_in_background(
    recorder: &Recorder,
    leadership: &Leadership,
    announcement: &Announcement,
    targets: impl IntoIterator<Item = ObjectReference>,
) {
    for target in targets {
        let (recorder, leadership, announcement) = (recorder.clone(), leadership.clone(), announcement.clone());
        tokio::spawn(async move {
            if let Err(error) = publish(&recorder, &leadership, &announcement, &target).await {
                warn!(%error, reason = announcement.reason, "cannot publish event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_note_is_cut_to_the_limit_and_the_related_object_kept() {
        let long = "ü".repeat(3000);
        let pv = ObjectReference {
            name: Some("pv-1".into()),
            ..ObjectReference::default()
        };
        let event = Announcement::warning("VolumeConditionAbnormal", "CheckVolumeHealth", long)
            .related_to(pv.clone())
            .event();
        let note = event.note.expect("a note");
        assert!(note.len() <= text::EVENT_NOTE_MAX_BYTES);
        assert!(note.ends_with(text::CUT_MARKER));
        assert_eq!(event.secondary, Some(pv));
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(
            (event.reason.as_str(), event.action.as_str()),
            ("VolumeConditionAbnormal", "CheckVolumeHealth")
        );
    }

    #[test]
    fn a_short_note_is_sent_as_written() {
        let event = Announcement::normal("CapacityTrackingEnabled", "Watch", "on again").event();
        assert_eq!(event.note.as_deref(), Some("on again"));
        assert_eq!(event.secondary, None);
    }
}
