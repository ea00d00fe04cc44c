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

use std::collections::{HashMap, HashSet};

use crate::model::WorkItem;

/// Value writes into csi-provisioner's objects, and their resource versions.
#[derive(Debug, Default)]
pub(super) struct ValueWrites {
    /// In flight: the item's object by name.
    in_flight: HashMap<WorkItem, String>,
    /// Versions the watch showed of an object while a value write of it was in flight.
    parked: HashMap<String, Vec<String>>,
    /// Versions volplane's value writes returned, until the watch shows them.
    own: HashSet<String>,
}

impl ValueWrites {
    /// A value write of `name` for `item` starts.
    pub(super) fn started(&mut self, item: &WorkItem, name: &str) {
        self.in_flight.insert(item.clone(), name.to_string());
        self.parked.entry(name.to_string()).or_default();
    }

    /// The watch shows `name` written at `version`: whether someone else
    /// (csi-provisioner) wrote it. Not yet known while a value write of it
    /// is in flight: `false` now, and [`ValueWrites::ended`] tells.
    pub(super) fn someone_else(&mut self, name: &str, version: Option<&String>) -> bool {
        if let Some(parked) = self.parked.get_mut(name) {
            parked.extend(version.cloned());
            return false;
        }
        !version.is_some_and(|version| self.own.remove(version))
    }

    /// The value write for `item` ended, at `version` if it landed. `None`
    /// when `item` had none in flight; else whether someone else wrote the
    /// object meanwhile (a version seen that was not the write's).
    pub(super) fn ended(&mut self, item: &WorkItem, version: Option<String>) -> Option<bool> {
        let name = self.in_flight.remove(item)?;
        let parked = self.parked.remove(&name).unwrap_or_default();
        let others = parked.iter().any(|seen| Some(seen) != version.as_ref());
        if let Some(version) = version.filter(|version| !parked.contains(version)) {
            self.own.insert(version);
        }
        Some(others)
    }

    /// No object of csi-provisioner's is left: nothing to recognise.
    pub(super) fn forget_versions(&mut self) {
        self.own.clear();
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
        assert_eq!(writes.ended(&item(), version("7")), Some(false));
        assert!(
            !writes.someone_else("theirs", version("7").as_ref()),
            "the watch shows our write"
        );
        assert!(
            writes.someone_else("theirs", version("8").as_ref()),
            "then csi-provisioner's"
        );
    }

    #[test]
    fn a_change_seen_before_the_answer_waits_for_it() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        // The watch is quicker than the response.
        assert!(!writes.someone_else("theirs", version("7").as_ref()));
        assert_eq!(writes.ended(&item(), version("7")), Some(false), "it was ours");
        assert!(writes.own.is_empty(), "seen already: nothing left to recognise");

        writes.started(&item(), "theirs");
        assert!(!writes.someone_else("theirs", version("9").as_ref()));
        assert_eq!(
            writes.ended(&item(), version("10")),
            Some(true),
            "9 was csi-provisioner's"
        );
    }

    #[test]
    fn a_failed_write_leaves_every_change_seen_to_someone_else() {
        let mut writes = ValueWrites::default();
        writes.started(&item(), "theirs");
        assert_eq!(writes.ended(&item(), None), Some(false), "nothing seen");
        writes.started(&item(), "theirs");
        assert!(!writes.someone_else("theirs", version("3").as_ref()));
        assert_eq!(writes.ended(&item(), None), Some(true));
        assert_eq!(writes.ended(&item(), None), None, "no write in flight");
    }
}
