//! At start, the API groups, versions and resources the controllers that
//! run need: one discovery request per group version. One that the API
//! server does not serve ends the start with one line naming it, instead
//! of a watch failing later, over and over.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use tracing::debug;

use crate::args::Controller;

/// A resource a controller needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needed {
    /// `group/version`.
    pub group_version: &'static str,
    /// The resource (plural).
    pub resource: &'static str,
    /// The first Kubernetes release serving it at that version.
    pub since: &'static str,
}

const CAPACITY_OBJECTS: Needed = Needed {
    group_version: "storage.k8s.io/v1",
    resource: "csistoragecapacities",
    since: "1.24",
};
const CSI_DRIVERS: Needed = Needed {
    group_version: "storage.k8s.io/v1",
    resource: "csidrivers",
    since: "1.18",
};
const STORAGE_CLASSES: Needed = Needed {
    group_version: "storage.k8s.io/v1",
    resource: "storageclasses",
    since: "1.6",
};
const EVENTS: Needed = Needed {
    group_version: "events.k8s.io/v1",
    resource: "events",
    since: "1.19",
};
const LEASES: Needed = Needed {
    group_version: "coordination.k8s.io/v1",
    resource: "leases",
    since: "1.14",
};

/// What `controllers` need beyond the core API.
pub fn needed(controllers: &[Controller]) -> Vec<Needed> {
    let mut needed = vec![EVENTS, LEASES];
    if controllers.contains(&Controller::Capacity) {
        needed.extend([CAPACITY_OBJECTS, CSI_DRIVERS, STORAGE_CLASSES]);
    }
    // Deletes the per-node objects of gone nodes.
    if controllers.contains(&Controller::Placements) && !needed.contains(&CAPACITY_OBJECTS) {
        needed.push(CAPACITY_OBJECTS);
    }
    needed
}

/// The first of `needed` that `served` (resources by group version; a
/// group version absent is not served) lacks.
pub fn missing(needed: &[Needed], served: &BTreeMap<&str, BTreeSet<String>>) -> Option<Needed> {
    (needed.iter())
        .find(|n| {
            served
                .get(n.group_version)
                .is_none_or(|resources| !resources.contains(n.resource))
        })
        .copied()
}

/// The line a missing resource ends the start with.
pub fn missing_line(missing: Needed, version: &str) -> String {
    format!(
        "the API server (Kubernetes {version}) does not serve {} {}, which volplane needs \
         (Kubernetes {} or later; supported: see README, Supported Kubernetes versions)",
        missing.group_version, missing.resource, missing.since
    )
}

/// Asks the API server which of `needed` it serves; fails with
/// [`missing_line`] for the first it lacks.
pub async fn check(client: &kube::Client, needed: &[Needed], version: &str) -> anyhow::Result<()> {
    let versions: BTreeSet<&str> = needed.iter().map(|n| n.group_version).collect();
    let mut served = BTreeMap::new();
    for group_version in versions {
        match client.list_api_group_resources(group_version).await {
            Ok(list) => {
                let resources = list.resources.into_iter().map(|r| r.name).collect();
                served.insert(group_version, resources);
            }
            // Not served at all.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                return Err(error).with_context(|| format!("cannot discover the API server's {group_version}"));
            }
        }
    }
    debug!(?served, "API discovery");
    match missing(needed, &served) {
        Some(missing) => anyhow::bail!(missing_line(missing, version)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(entries: &[(&'static str, &[&str])]) -> BTreeMap<&'static str, BTreeSet<String>> {
        (entries.iter())
            .map(|(gv, resources)| (*gv, resources.iter().map(|r| r.to_string()).collect()))
            .collect()
    }

    #[test]
    fn every_resource_served_is_nothing_missing() {
        let all = served(&[
            (
                "storage.k8s.io/v1",
                &["csistoragecapacities", "csidrivers", "storageclasses", "csinodes"],
            ),
            ("events.k8s.io/v1", &["events"]),
            ("coordination.k8s.io/v1", &["leases"]),
        ]);
        assert_eq!(
            missing(&needed(&[Controller::Capacity, Controller::Ephemeral]), &all),
            None
        );
    }

    #[test]
    fn a_resource_or_a_group_version_not_served_is_named() {
        let no_capacity = served(&[
            ("storage.k8s.io/v1", &["csidrivers", "storageclasses"]),
            ("events.k8s.io/v1", &["events"]),
            ("coordination.k8s.io/v1", &["leases"]),
        ]);
        assert_eq!(
            missing(&needed(&[Controller::Capacity]), &no_capacity),
            Some(CAPACITY_OBJECTS)
        );
        // The ephemeral controller does without it.
        assert_eq!(missing(&needed(&[Controller::Ephemeral]), &no_capacity), None);
        let no_events_group = served(&[("coordination.k8s.io/v1", &["leases"])]);
        assert_eq!(missing(&needed(&[Controller::Health]), &no_events_group), Some(EVENTS));
    }

    #[test]
    fn the_line_names_the_resource_and_the_release() {
        let line = missing_line(CAPACITY_OBJECTS, "v1.23.17");
        assert!(line.contains("storage.k8s.io/v1 csistoragecapacities"), "{line}");
        assert!(line.contains("Kubernetes 1.24 or later"), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}
