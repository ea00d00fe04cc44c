//! The driver's value in csi-provisioner's objects before the takeover.
//!
//! The adoption gate keeps csi-provisioner's objects theirs until they have
//! been quiet and a canary stood: two poll intervals at least. Their values
//! need not wait: both controllers ask the same driver, so volplane writes
//! the value alone (`capacity`, `maximumVolumeSize`; labels and owner stay)
//! into an object it does not own yet, as soon as it has asked the driver.
//!
//! The gate must still tell csi-provisioner's writes from these: its quiet
//! period starts again at every write it sees. A value write's own
//! resource version is recognised when the watch shows it; a change of the
//! object seen while a value write of it is in flight waits for the
//! write's answer, which says whether the change was that write.

use std::collections::HashMap;

use crate::model::WorkItem;

/// Value writes into csi-provisioner's objects, and their resource versions.
#[derive(Debug, Default)]
pub(super) struct ValueWrites {
    /// In flight: the item's object by name.
    in_flight: HashMap<WorkItem, String>,
    /// Versions the watch showed of an object while a value write of it was in flight.
    parked: HashMap<String, Vec<String>>,
    /// The version volplane's last value write of an object returned, by
    /// name, until the watch shows it.
    unseen: HashMap<String, String>,
}

impl ValueWrites {
    /// A value write of `name` for `item` starts.
    pub(super) fn started(&mut self, item: &WorkItem, name: &str) {
        self.in_flight.insert(item.clone(), name.to_string());
        self.parked.entry(name.to_string()).or_default();
    }

    /// Whether volplane's last value write of `name` has not come back
    /// through the watch yet: the next one waits for it (it would be
    /// decided on an old version, and refused).
    pub(super) fn awaits_watch(&self, name: &str) -> bool {
        self.unseen.contains_key(name) || self.parked.contains_key(name)
    }

    /// The watch shows `name` written at `version`: whether someone else
    /// (csi-provisioner) wrote it. Not yet known while a value write of it
    /// is in flight: `false` now, and [`ValueWrites::write_ended`] tells.
    pub(super) fn written_by_others(&mut self, name: &str, version: Option<&String>) -> bool {
        if version.is_some() && self.unseen.get(name) == version {
            self.unseen.remove(name);
            return false;
        }
        if let Some(parked) = self.parked.get_mut(name) {
            parked.extend(version.cloned());
            return false;
        }
        // Written over before the watch showed volplane's version (a
        // re-list skips versions): nothing of it is left to wait for.
        self.unseen.remove(name);
        true
    }

    /// The value write for `item` ended, at `version` if it landed. `None`
    /// when `item` had none in flight; else whether someone else wrote the
    /// object meanwhile (a version seen that was not the write's).
    pub(super) fn write_ended(&mut self, item: &WorkItem, version: Option<String>) -> Option<bool> {
        let name = self.in_flight.remove(item)?;
        let parked = self.parked.remove(&name).unwrap_or_default();
        let others = parked.iter().any(|seen| Some(seen) != version.as_ref());
        match version.filter(|version| !parked.contains(version)) {
            Some(version) => {
                self.unseen.insert(name, version);
            }
            None => {
                self.unseen.remove(&name);
            }
        }
        Some(others)
    }

    /// No object of csi-provisioner's is left: nothing to recognise.
    pub(super) fn forget_versions(&mut self) {
        self.unseen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Segment;

    fn item() -> WorkItem {
        WorkItem {
            segment: Segment::from_pairs([("zone", "a")]),
            class: "fast".into(),
        }
    }

    fn version(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn the_writes_own_version_is_not_someone_elses() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        assert_eq!(writes.write_ended(&item(), version("7")), Some(false));
        assert!(
            !writes.written_by_others("theirs", version("7").as_ref()),
            "the watch shows our write"
        );
        assert!(
            writes.written_by_others("theirs", version("8").as_ref()),
            "then csi-provisioner's"
        );
    }

    #[test]
    fn a_change_seen_before_the_answer_waits_for_it() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        // The watch is quicker than the response.
        assert!(!writes.written_by_others("theirs", version("7").as_ref()));
        assert_eq!(writes.write_ended(&item(), version("7")), Some(false), "it was ours");
        assert!(!writes.awaits_watch("theirs"), "seen already: nothing left to wait for");

        writes.started(&item(), "theirs");
        assert!(!writes.written_by_others("theirs", version("9").as_ref()));
        assert_eq!(
            writes.write_ended(&item(), version("10")),
            Some(true),
            "9 was csi-provisioner's"
        );
    }

    #[test]
    fn a_failed_write_leaves_every_change_seen_to_someone_else() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        assert_eq!(writes.write_ended(&item(), None), Some(false), "nothing seen");
        writes.started(&item(), "theirs");
        assert!(!writes.written_by_others("theirs", version("3").as_ref()));
        assert_eq!(writes.write_ended(&item(), None), Some(true));
        assert_eq!(writes.write_ended(&item(), None), None, "no write in flight");
    }

    #[test]
    fn the_next_write_waits_until_the_watch_showed_the_last() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        assert!(writes.awaits_watch("theirs"), "in flight");
        assert_eq!(writes.write_ended(&item(), version("7")), Some(false));
        assert!(writes.awaits_watch("theirs"), "7 not seen yet: no write decided on 6");
        assert!(!writes.written_by_others("theirs", version("7").as_ref()));
        assert!(!writes.awaits_watch("theirs"));
        // Even when a second write started meanwhile, 7 stays ours.
        writes.started(&item(), "theirs");
        assert_eq!(writes.write_ended(&item(), version("8")), Some(false));
        writes.started(&item(), "theirs");
        assert!(!writes.written_by_others("theirs", version("8").as_ref()), "8 was ours");
        assert_eq!(
            writes.write_ended(&item(), None),
            Some(false),
            "a refused write saw nothing of theirs"
        );
    }
}
