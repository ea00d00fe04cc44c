use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::Event;

use super::{Found, LiveNodes, MIN_AGE, Sweep};
use crate::model::{MANAGED_BY_LABEL, managed_by};

const NOW: i64 = 1_800_000_000;

fn object(name: &str, managed: &str, age_secs: i64) -> Found {
    Found {
        name: name.to_string(),
        uid: Some(format!("uid-{name}")),
        managed_by: Some(managed.to_string()),
        created: Some(Timestamp::from_second(NOW - age_secs).expect("timestamp")),
    }
}

fn now() -> Timestamp {
    Timestamp::from_second(NOW).expect("timestamp")
}

fn listed(nodes: &[&str]) -> LiveNodes {
    let mut live = LiveNodes::default();
    assert_eq!(live.apply(Event::Init), None);
    for node in nodes {
        assert_eq!(live.apply(Event::InitApply((*node).to_string())), None);
    }
    assert_eq!(live.apply(Event::InitDone), Some(Sweep::Unlisted));
    live
}

fn names<'a>(found: &[&'a Found]) -> Vec<&'a str> {
    found.iter().map(|f| f.name.as_str()).collect()
}

#[test]
fn a_list_sweeps_the_old_objects_of_unlisted_nodes_only() {
    let live = listed(&["node-a"]);
    let old = MIN_AGE.as_secs().cast_signed() + 1;
    let found = [
        object("of-a", "volplane-node-a", old),
        object("of-gone", "volplane-node-gone", old),
        object("of-new", "volplane-node-new", 5),
        object("central", "volplane", old),
        object("incumbent", "external-provisioner-node-gone", old),
    ];
    assert_eq!(names(&live.stale(&Sweep::Unlisted, &found, now())), ["of-gone"]);
}

#[test]
fn an_object_without_a_creation_time_or_label_is_kept() {
    let live = listed(&[]);
    let mut unknown_age = object("unknown-age", "volplane-gone", 600);
    unknown_age.created = None;
    let mut unlabelled = object("unlabelled", "volplane-gone", 600);
    unlabelled.managed_by = None;
    assert!(
        live.stale(&Sweep::Unlisted, &[unknown_age, unlabelled], now())
            .is_empty()
    );
}

#[test]
fn a_deleted_node_sweeps_its_objects_whatever_their_age() {
    let mut live = listed(&["node-a", "node-b"]);
    let sweep = live.apply(Event::Delete("node-a".into())).expect("a deletion sweeps");
    assert_eq!(sweep, Sweep::Node("node-a".into()));
    let found = [
        object("young", "volplane-node-a", 1),
        object("old", "volplane-node-a", 3600),
        object("of-b", "volplane-node-b", 3600),
    ];
    assert_eq!(names(&live.stale(&sweep, &found, now())), ["young", "old"]);
    assert_eq!(
        LiveNodes::selector(&sweep),
        format!("{MANAGED_BY_LABEL}={}", managed_by(Some("node-a")))
    );
}

#[test]
fn a_node_back_under_its_name_keeps_its_objects() {
    let mut live = listed(&["node-a"]);
    let sweep = live.apply(Event::Delete("node-a".into())).expect("a deletion sweeps");
    assert_eq!(live.apply(Event::Apply("node-a".into())), None);
    assert!(
        live.stale(&sweep, &[object("of-a", "volplane-node-a", 3600)], now())
            .is_empty()
    );
}

#[test]
fn a_relist_forgets_nodes_deleted_meanwhile() {
    let mut live = listed(&["node-a", "node-b"]);
    assert_eq!(live.len(), 2);
    // The watch broke; node-b went while it was away.
    assert_eq!(live.apply(Event::Init), None);
    assert_eq!(live.apply(Event::InitApply("node-a".into())), None);
    assert_eq!(live.apply(Event::InitDone), Some(Sweep::Unlisted));
    assert_eq!(live.len(), 1);
    let found = [
        object("of-b", "volplane-node-b", 3600),
        object("of-a", "volplane-node-a", 3600),
    ];
    assert_eq!(names(&live.stale(&Sweep::Unlisted, &found, now())), ["of-b"]);
}

#[test]
fn no_sweep_before_the_first_list() {
    let mut live = LiveNodes::default();
    assert_eq!(live.apply(Event::Delete("node-a".into())), None);
    assert!(live.is_empty());
}

#[test]
fn long_node_names_match_by_their_shortened_label() {
    let long = "n".repeat(200);
    let mut live = listed(&[long.as_str(), "other"]);
    let sweep = live.apply(Event::Delete(long.clone())).expect("a deletion sweeps");
    let found = [object("of-long", &managed_by(Some(&long)), 3600)];
    assert_eq!(names(&live.stale(&sweep, &found, now())), ["of-long"]);
}

#[test]
fn no_sweep_is_decided_while_the_nodes_are_listed_again() {
    let mut live = listed(&["node-a"]);
    assert!(live.is_current());
    assert_eq!(live.apply(Event::Init), None);
    assert!(!live.is_current(), "the list in progress is not the truth yet");
    assert_eq!(live.apply(Event::InitApply("node-a".into())), None);
    assert_eq!(live.apply(Event::InitApply("node-new".into())), None);
    assert_eq!(live.apply(Event::InitDone), Some(Sweep::Unlisted));
    assert!(live.is_current());
    let old = MIN_AGE.as_secs().cast_signed() + 1;
    let found = [object("of-new", "volplane-node-new", old)];
    assert!(
        live.stale(&Sweep::Unlisted, &found, now()).is_empty(),
        "the node the re-list found keeps its objects"
    );
}

#[test]
fn young_objects_of_unlisted_nodes_are_looked_at_again() {
    let live = listed(&["node-a"]);
    let young = [
        object("young", "volplane-node-gone", 5),
        object("of-a", "volplane-node-a", 5),
    ];
    assert!(live.stale(&Sweep::Unlisted, &young, now()).is_empty());
    assert!(live.deferred(&young, now()), "node-gone's young object is due later");
    let settled = [
        object("old", "volplane-node-gone", 600),
        object("of-a", "volplane-node-a", 5),
    ];
    assert!(!live.deferred(&settled, now()), "nothing young of a gone node");
}
