use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::model::Segment;

fn item(node: &str) -> WorkItem {
    WorkItem {
        segment: Segment::new(BTreeMap::from([(
            "topology.hostpath.csi/node".to_string(),
            node.to_string(),
        )])),
        class: "fast".into(),
    }
}

const INTERVAL: Duration = Duration::from_secs(60);

#[test]
fn the_incumbents_objects_are_adopted_after_a_quiet_interval_and_a_canary_that_stood() {
    let start = Instant::now();
    let mut gate = Gate::new(INTERVAL, start);
    assert!(!gate.canary_due(start + INTERVAL / 2), "not quiet long enough");
    // A change restarts the quiet period.
    assert_eq!(gate.appeared(start + INTERVAL / 2), Appeared::Change);
    assert!(!gate.canary_due(start + INTERVAL));
    let quiet = start + INTERVAL / 2 + INTERVAL;
    assert_eq!(gate.next_wake(), Some(quiet));
    assert!(gate.canary_due(quiet));
    assert!(!gate.may_adopt(&item("a")));
    gate.start_canary(item("a"), quiet);
    assert!(gate.may_adopt(&item("a")) && !gate.may_adopt(&item("b")) && !gate.may_delete());
    gate.canary_written(&item("a"), quiet);
    assert!(!gate.tick(quiet + INTERVAL / 2));
    assert!(gate.tick(quiet + INTERVAL), "the canary stood a full interval");
    assert!(gate.may_adopt(&item("b")) && gate.may_delete());
    assert_eq!(gate.next_wake(), None);
}

#[test]
fn anything_the_incumbent_writes_during_the_canary_means_it_still_runs_and_the_next_try_backs_off() {
    let start = Instant::now();
    let mut gate = Gate::new(INTERVAL, start);
    gate.start_canary(item("a"), start + INTERVAL);
    // The canary's clock starts when its write lands.
    gate.canary_written(&item("a"), start + INTERVAL * 2);
    assert!(!gate.tick(start + INTERVAL * 2 + INTERVAL / 2));
    let recreated = start + INTERVAL * 2 + Duration::from_secs(1);
    assert_eq!(gate.appeared(recreated), Appeared::StillRunning);
    assert_eq!(gate.stage(), &Stage::Waiting);
    assert!(!gate.may_adopt(&item("a")));
    // Quiet for an interval is not enough: the backoff is two intervals.
    assert!(!gate.canary_due(recreated + INTERVAL));
    assert!(gate.canary_due(recreated + INTERVAL * 2));
    gate.start_canary(item("a"), recreated + INTERVAL * 2);
    assert_eq!(gate.appeared(recreated + INTERVAL * 2), Appeared::StillRunning);
    assert!(!gate.canary_due(recreated + INTERVAL * 5));
    assert!(
        gate.canary_due(recreated + INTERVAL * 6),
        "four intervals the second time"
    );
}

#[test]
fn an_incumbent_back_after_the_gate_opened_closes_it_and_backoff_is_capped() {
    let start = Instant::now();
    let interval = Duration::from_secs(1800);
    let mut gate = Gate::new(interval, start);
    gate.open();
    assert_eq!(gate.appeared(start), Appeared::StillRunning, "written while open");
    assert!(!gate.may_delete());
    for _ in 0..10 {
        assert_eq!(gate.appeared(start), Appeared::Change, "waiting: only a change");
    }
    // 2 × 30 min would be an hour: capped there.
    assert_eq!(gate.next_wake(), Some(start + Duration::from_secs(3600)));
}

#[test]
fn a_failed_canary_write_or_a_new_term_waits_a_full_interval_again() {
    let start = Instant::now();
    let mut gate = Gate::new(INTERVAL, start);
    gate.start_canary(item("a"), start + INTERVAL);
    gate.restart(start + INTERVAL + Duration::from_secs(1));
    assert_eq!(gate.stage(), &Stage::Waiting);
    assert!(!gate.canary_due(start + INTERVAL * 2));
    assert!(gate.canary_due(start + INTERVAL * 2 + Duration::from_secs(1)));
}

#[test]
fn the_incumbents_label_values() {
    assert_eq!(incumbent_managed_by(None).as_deref(), Some("external-provisioner"));
    assert_eq!(
        incumbent_managed_by(Some("node-7")).as_deref(),
        Some("external-provisioner-node-7")
    );
    // csi-provisioner shortens past 63 characters: not guessed.
    assert_eq!(incumbent_managed_by(Some(&"n".repeat(43))), None);
    assert!(incumbent_managed_by(Some(&"n".repeat(42))).is_some());
}
