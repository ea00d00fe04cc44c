//! Text from outside — CSI drivers, the API server, admission webhooks and
//! policies — can be of any length and any UTF-8. Every place that puts it
//! into an event note or an annotation cuts it here: on a character
//! boundary (slicing a `String` inside a multi-byte character panics), with
//! a visible marker, within the API server's limits.

use std::borrow::Cow;

/// The API server rejects an `events.k8s.io/v1` Event whose note is longer
/// than this many bytes.
pub const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// How long one annotation value volplane writes may be. The API server
/// limits all annotations of an object together to 256 KiB; volplane keeps
/// each of its own values at the size of an event note, so that the value
/// it records and the note it announces are the same text.
pub const ANNOTATION_VALUE_MAX_BYTES: usize = EVENT_NOTE_MAX_BYTES;

/// Appended to text that was cut.
pub const CUT_MARKER: &str = " …";

/// `text` if it fits in `max_bytes`, else its longest prefix that ends on
/// a character boundary and leaves room for [`CUT_MARKER`], followed by the
/// marker. The result is never longer than `max_bytes` (when `max_bytes`
/// is smaller than the marker itself, it is just the prefix).
pub fn cut(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    if max_bytes < CUT_MARKER.len() {
        return Cow::Borrowed(prefix(text, max_bytes));
    }
    let kept = prefix(text, max_bytes - CUT_MARKER.len());
    Cow::Owned(format!("{kept}{CUT_MARKER}"))
}

/// [`cut`] to [`EVENT_NOTE_MAX_BYTES`], as an owned note.
pub fn event_note(text: &str) -> String {
    cut(text, EVENT_NOTE_MAX_BYTES).into_owned()
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a
/// character boundary (no marker).
pub fn prefix(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn short_text_is_kept_as_is() {
        assert!(matches!(
            cut("GetCapacity failed", 1024),
            Cow::Borrowed("GetCapacity failed")
        ));
        assert_eq!(cut("", 0), "");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_a_marker() {
        // "é" is two bytes: a cut at byte 5 falls inside the third one.
        let text = "éééééé";
        assert_eq!(cut(text, 9), "éé …");
        assert_eq!(cut(text, 12), text);
        assert_eq!(cut(text, 11), "ééé …");
        // No room for the marker: just the prefix.
        assert_eq!(cut(text, 3), "é");
        assert_eq!(cut("🦀🦀", 3), "");
    }

    #[test]
    fn prefix_never_splits_a_character() {
        assert_eq!(prefix("a🦀b", 1), "a");
        assert_eq!(prefix("a🦀b", 4), "a");
        assert_eq!(prefix("a🦀b", 5), "a🦀");
    }

    proptest! {
        #[test]
        fn cut_fits_keeps_a_prefix_and_marks_what_it_dropped(text in any::<String>(), max in 0usize..64) {
            let result = cut(&text, max);
            prop_assert!(result.len() <= max || text.len() <= max);
            if text.len() <= max {
                prop_assert_eq!(result.as_ref(), text.as_str());
            } else if max >= CUT_MARKER.len() {
                let kept = result.strip_suffix(CUT_MARKER).expect("marker");
                prop_assert!(text.starts_with(kept));
                // Nothing more of the text would have fit.
                let next = text[kept.len()..].chars().next().map_or(0, char::len_utf8);
                prop_assert!(kept.len() + next + CUT_MARKER.len() > max);
            } else {
                prop_assert!(text.starts_with(result.as_ref()));
            }
        }

        #[test]
        fn event_notes_fit_whatever_the_text(text in ".{0,3000}") {
            let note = event_note(&text);
            prop_assert!(note.len() <= EVENT_NOTE_MAX_BYTES);
            prop_assert_eq!(note == text, text.len() <= EVENT_NOTE_MAX_BYTES);
        }
    }
}
