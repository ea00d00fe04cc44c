//! What a published value leaves out. While placements in flight reserve
//! part of a (segment, class), volplane's object carries the driver's own
//! value and the bytes reserved as annotations, so that `kubectl volplane
//! capacity` can show the driver's value, the reservation and what is
//! published side by side. Without a reservation the object carries
//! neither: the published value is the driver's.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::PublishedCapacity;
use crate::quantity::{format_bytes, parse_bytes};

/// Annotation: the driver's last answer (`availableCapacity`), as a quantity.
pub const DRIVER_CAPACITY_ANNOTATION: &str = "volplane.io/driver-capacity";
/// Annotation: the bytes placements in flight reserve, as a quantity.
pub const RESERVED_ANNOTATION: &str = "volplane.io/reserved";

/// The driver's value behind a published one, and what is reserved from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// What the driver answered.
    pub driver_capacity: i64,
    /// What placements in flight reserve (above zero).
    pub reserved: i64,
}

impl Reservation {
    /// The reservation behind a value: none when nothing is reserved.
    pub fn of(driver_capacity: i64, reserved: i64) -> Option<Self> {
        (reserved > 0).then_some(Self {
            driver_capacity,
            reserved,
        })
    }

    /// The reservation an object's annotations state: none when either is
    /// missing or does not read as a quantity.
    pub fn read(annotations: Option<&BTreeMap<String, String>>) -> Option<Self> {
        let annotations = annotations?;
        let bytes = |key: &str| annotations.get(key).and_then(|raw| parse_bytes(raw));
        Self::of(bytes(DRIVER_CAPACITY_ANNOTATION)?, bytes(RESERVED_ANNOTATION)?)
    }

    /// The annotations of a new object.
    pub fn annotations(reservation: Option<Self>) -> Option<BTreeMap<String, String>> {
        let reservation = reservation?;
        Some(BTreeMap::from([
            (
                DRIVER_CAPACITY_ANNOTATION.to_string(),
                format_bytes(reservation.driver_capacity),
            ),
            (RESERVED_ANNOTATION.to_string(), format_bytes(reservation.reserved)),
        ]))
    }

    /// The `metadata.annotations` of a JSON merge patch: both set, or both
    /// removed.
    pub fn patch(reservation: Option<Self>) -> Value {
        match reservation {
            Some(r) => json!({
                DRIVER_CAPACITY_ANNOTATION: format_bytes(r.driver_capacity),
                RESERVED_ANNOTATION: format_bytes(r.reserved),
            }),
            None => json!({DRIVER_CAPACITY_ANNOTATION: null, RESERVED_ANNOTATION: null}),
        }
    }
}

/// What volplane writes into an object: the value, and the reservation
/// behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publication {
    /// The published capacity.
    pub value: PublishedCapacity,
    /// What the value leaves out, if anything.
    pub reservation: Option<Reservation>,
}

impl From<PublishedCapacity> for Publication {
    fn from(value: PublishedCapacity) -> Self {
        Self {
            value,
            reservation: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_reserved_is_no_reservation() {
        assert_eq!(Reservation::of(100, 0), None);
        assert_eq!(Reservation::of(100, -5), None);
        assert_eq!(Reservation::annotations(None), None);
    }

    #[test]
    fn annotations_read_back_as_written() {
        let reservation = Reservation::of(100 << 30, 10 << 30);
        let annotations = Reservation::annotations(reservation).expect("annotations");
        assert_eq!(annotations[DRIVER_CAPACITY_ANNOTATION], "100Gi");
        assert_eq!(annotations[RESERVED_ANNOTATION], "10Gi");
        assert_eq!(Reservation::read(Some(&annotations)), reservation);
    }

    #[test]
    fn unreadable_or_partial_annotations_are_no_reservation() {
        let one = BTreeMap::from([(RESERVED_ANNOTATION.to_string(), "10Gi".to_string())]);
        assert_eq!(Reservation::read(Some(&one)), None);
        let bad = BTreeMap::from([
            (RESERVED_ANNOTATION.to_string(), "ten".to_string()),
            (DRIVER_CAPACITY_ANNOTATION.to_string(), "1Gi".to_string()),
        ]);
        assert_eq!(Reservation::read(Some(&bad)), None);
        assert_eq!(Reservation::read(None), None);
    }

    #[test]
    fn a_patch_sets_both_or_removes_both() {
        let set = Reservation::patch(Reservation::of(3 << 30, 1 << 30));
        assert_eq!(
            set,
            json!({DRIVER_CAPACITY_ANNOTATION: "3Gi", RESERVED_ANNOTATION: "1Gi"})
        );
        let removed = Reservation::patch(None);
        assert_eq!(
            removed,
            json!({DRIVER_CAPACITY_ANNOTATION: null, RESERVED_ANNOTATION: null})
        );
    }
}
