use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use serde_json::json;

use super::*;

fn pv(name: &str, driver: &str, phase: &str, claim: Option<(&str, &str)>) -> PersistentVolume {
    let mut spec = json!({"csi": {"driver": driver, "volumeHandle": format!("h-{name}")}});
    if let Some((ns, claim)) = claim {
        spec["claimRef"] = json!({"namespace": ns, "name": claim, "uid": format!("uid-{claim}")});
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec, "status": {"phase": phase}})).expect("pv")
}

fn node(ready: Option<(&str, i64)>) -> Node {
    let conditions = match ready {
        Some((status, at)) => json!([{"type": "Ready", "status": status,
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::from_second(at).expect("time").to_string()}]),
        None => json!([]),
    };
    serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": {"conditions": conditions}})).expect("node")
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

#[test]
fn only_changes_are_announced() {
    let abnormal = |m: &str| Condition::Abnormal(m.to_string());
    // A first normal reading is silent; a first abnormal one is a warning.
    assert_eq!(announcement(None, &Condition::Normal), None);
    let first = announcement(None, &abnormal("disk gone")).expect("warning");
    assert!(first.warning);
    assert_eq!((first.reason, first.note.as_str()), (REASON_ABNORMAL, "disk gone"));
    // Still abnormal with the same message: nothing again.
    assert_eq!(announcement(Some(&abnormal("disk gone")), &abnormal("disk gone")), None);
    // A different message is a change.
    assert_eq!(
        announcement(Some(&abnormal("disk gone")), &abnormal("disk back, fs read-only")).map(|a| a.reason),
        Some(REASON_ABNORMAL)
    );
    // Recovery: once, Normal.
    let recovered = announcement(Some(&abnormal("x")), &Condition::Normal).expect("normal");
    assert!(!recovered.warning);
    assert_eq!(recovered.reason, REASON_NORMAL);
    assert_eq!(announcement(Some(&Condition::Normal), &Condition::Normal), None);
}

#[test]
fn observations_map_to_conditions() {
    assert_eq!(condition_of(false, "ignored"), Condition::Normal);
    assert_eq!(condition_of(true, "bad"), Condition::Abnormal("bad".into()));
    assert!(matches!(condition_of(true, " "), Condition::Abnormal(m) if m.contains("no message")));
    let missing = Observation::Missing {
        how: "missing from ListVolumes",
    };
    match missing.condition("h-1", "d.example") {
        Some(Condition::Abnormal(message)) => {
            assert!(
                message.contains("h-1") && message.contains("d.example") && message.contains("ListVolumes"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(Observation::Silent.condition("h", "d"), None, "no condition, no change");
    assert_eq!(missing.label(), "missing");
}

#[test]
fn the_annotation_round_trips_and_a_normal_condition_removes_it() {
    let mut volume = pv("p", "d", "Bound", Some(("ns", "c")));
    assert_eq!(announced(&volume), None);
    let patch = annotation_patch(&Condition::Abnormal("bad".into()));
    assert_eq!(patch["metadata"]["annotations"][ABNORMAL_ANNOTATION], "bad");
    volume.metadata.annotations = Some([(ABNORMAL_ANNOTATION.to_string(), "bad".to_string())].into());
    assert_eq!(announced(&volume), Some(Condition::Abnormal("bad".into())));
    assert!(annotation_patch(&Condition::Normal)["metadata"]["annotations"][ABNORMAL_ANNOTATION].is_null());
    let long = "é".repeat(2000);
    let patch = annotation_patch(&Condition::Abnormal(long));
    assert!(
        patch["metadata"]["annotations"][ABNORMAL_ANNOTATION]
            .as_str()
            .expect("str")
            .len()
            <= volplane_runtime::text::ANNOTATION_VALUE_MAX_BYTES
    );
}

mod any_text {
    use proptest::prelude::*;
    use volplane_runtime::text::{ANNOTATION_VALUE_MAX_BYTES, EVENT_NOTE_MAX_BYTES};

    use super::*;

    fn annotation(condition: &Condition) -> String {
        annotation_patch(condition)["metadata"]["annotations"][ABNORMAL_ANNOTATION]
            .as_str()
            .expect("an abnormal condition is recorded")
            .to_string()
    }

    proptest! {
        /// Whatever the driver says, the note and the annotation fit, and
        /// the recorded message compares equal to the next same report
        /// (no second announcement).
        #[test]
        fn driver_messages_fit_and_are_announced_once(message in any::<String>(), repeat in 1usize..600) {
            let message = message.repeat(repeat);
            let condition = condition_of(true, &message);
            let announced_now = announcement(None, &condition).expect("abnormal is announced");
            prop_assert!(announced_now.note.len() <= EVENT_NOTE_MAX_BYTES);
            let recorded = annotation(&condition);
            prop_assert!(recorded.len() <= ANNOTATION_VALUE_MAX_BYTES);
            let mut volume = pv("p", "d", "Bound", Some(("ns", "c")));
            volume.metadata.annotations = Some([(ABNORMAL_ANNOTATION.to_string(), recorded)].into());
            let last = announced(&volume);
            prop_assert_eq!(announcement(last.as_ref(), &condition_of(true, &message)), None);
        }

        #[test]
        fn missing_volume_and_node_failure_notes_fit(handle in any::<String>(), driver in any::<String>(),
                                                      node in any::<String>(), pods in proptest::collection::btree_set(any::<String>(), 0..80)) {
            let missing = Observation::Missing { how: "absent from ListVolumes" }.condition(&handle.repeat(50), &driver);
            let Some(Condition::Abnormal(note)) = missing else { panic!("missing is abnormal") };
            prop_assert!(note.len() <= EVENT_NOTE_MAX_BYTES);
            let pods: BTreeSet<String> = pods.into_iter().map(|p| p.repeat(20)).collect();
            prop_assert!(node_failed_note(&node, at(0), &pods).len() <= EVENT_NOTE_MAX_BYTES);
        }
    }
}

#[test]
fn an_announced_node_failure_round_trips_through_the_pv() {
    let mut volume = pv("p", "d", "Bound", Some(("ns", "c")));
    assert_eq!(announced_node_failure(&volume), None);
    let patch = node_failure_patch(Some("n1"));
    assert_eq!(patch["metadata"]["annotations"][NODE_FAILED_ANNOTATION], "n1");
    volume.metadata.annotations = Some([(NODE_FAILED_ANNOTATION.to_string(), "n1".to_string())].into());
    assert_eq!(announced_node_failure(&volume).as_deref(), Some("n1"));
    assert!(node_failure_patch(None)["metadata"]["annotations"][NODE_FAILED_ANNOTATION].is_null());
    volume.metadata.annotations = Some([(NODE_FAILED_ANNOTATION.to_string(), String::new())].into());
    assert_eq!(announced_node_failure(&volume), None, "an empty value names no node");
}

#[test]
fn only_bound_csi_volumes_of_the_driver_are_watched() {
    let bound = watched(&pv("p1", "d", "Bound", Some(("ns", "c1"))), "d").expect("watched");
    assert_eq!(
        (
            bound.pv.as_str(),
            bound.volume_handle.as_str(),
            bound.namespace.as_str(),
            bound.claim.as_str()
        ),
        ("p1", "h-p1", "ns", "c1")
    );
    assert_eq!(bound.claim_reference().uid.as_deref(), Some("uid-c1"));
    assert_eq!(watched(&pv("p2", "other", "Bound", Some(("ns", "c"))), "d"), None);
    assert_eq!(watched(&pv("p3", "d", "Available", None), "d"), None);
    assert_eq!(watched(&pv("p4", "d", "Released", Some(("ns", "c"))), "d"), None);
    let in_tree: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "p5"},
        "spec": {"hostPath": {"path": "/x"}, "claimRef": {"namespace": "ns", "name": "c"}}, "status": {"phase": "Bound"}}))
    .expect("pv");
    assert_eq!(watched(&in_tree, "d"), None);
}

#[test]
fn node_failure_is_timed_from_the_ready_transition() {
    let threshold = Duration::from_secs(300);
    assert_eq!(
        node_verdict(&node(Some(("True", 100))), threshold, at(10_000)),
        NodeVerdict::Healthy
    );
    assert_eq!(
        node_verdict(&node(Some(("False", 1_000))), threshold, at(1_299)),
        NodeVerdict::Suspect { fails_at: at(1_300) }
    );
    assert_eq!(
        node_verdict(&node(Some(("Unknown", 1_000))), threshold, at(1_300)),
        NodeVerdict::Failed { since: at(1_000) }
    );
    // No Ready condition at all: never reported Ready.
    assert!(matches!(
        node_verdict(&node(None), threshold, at(10_000)),
        NodeVerdict::Failed { .. }
    ));
}

#[test]
fn volumes_on_a_node_are_found_through_pods_and_their_claims() {
    let pod = |name: &str, node: &str, claim: &str| -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"nodeName": node,
            "containers": [], "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
                {"name": "cfg", "configMap": {"name": "x"}}]}}),
        )
        .expect("pod")
    };
    let pods = [pod("a", "n1", "c1"), pod("b", "n1", "c1"), pod("c", "n2", "c2")];
    let mut by_claim = BTreeMap::new();
    for (claim, pv_name) in [("c1", "p1"), ("c2", "p2"), ("a-scratch", "p3")] {
        let w = watched(&pv(pv_name, "d", "Bound", Some(("ns", claim))), "d").expect("watched");
        by_claim.insert(("ns".to_string(), claim.to_string()), w);
    }
    let on_n1 = volumes_on_node("n1", &pods, &by_claim);
    let summary: Vec<(String, Vec<String>)> = on_n1
        .iter()
        .map(|(w, pods)| (w.pv.clone(), pods.iter().cloned().collect()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("p1".to_string(), vec!["ns/a".to_string(), "ns/b".to_string()]),
            ("p3".to_string(), vec!["ns/a".to_string()]),
        ]
    );
    let note = node_failed_note("n1", at(0), &on_n1.values().next().cloned().expect("pods"));
    assert!(
        note.contains("n1") && note.contains("ns/a, ns/b") && note.contains("1970-01-01T00:00:00Z"),
        "{note}"
    );
}

#[test]
fn trimmed_pods_keep_node_and_claims() {
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "ns", "uid": "u",
        "labels": {"x": "y"}}, "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "c1"}}, {"name": "cfg", "configMap": {"name": "x"}}]},
        "status": {"phase": "Running"}}))
    .expect("pod");
    let before = pod_claims(&pod);
    let trimmed = trim_pod(pod);
    assert_eq!(pod_claims(&trimmed), before);
    assert_eq!(trimmed.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("n1"));
    assert_eq!(trimmed.metadata.uid.as_deref(), Some("u"));
    assert!(trimmed.status.is_none() && trimmed.metadata.labels.is_none());
}

#[test]
fn trimmed_nodes_keep_name_and_readiness() {
    let since = "2026-01-01T00:00:00Z";
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {"a": "b"}},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {"conditions": [
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "Unknown", "lastTransitionTime": since}],
            "images": [{"names": ["registry.example/big:1"], "sizeBytes": 1}]}}))
    .expect("node");
    let now = SystemTime::now();
    let threshold = Duration::from_secs(60);
    let verdict = node_verdict(&node, threshold, now);
    let trimmed = trim_node(node);
    assert_eq!(node_verdict(&trimmed, threshold, now), verdict);
    assert_eq!(trimmed.metadata.name.as_deref(), Some("n1"));
    assert!(trimmed.spec.is_none() && trimmed.metadata.labels.is_none());
    let status = trimmed.status.expect("status");
    assert!(status.images.is_none());
    assert_eq!(status.conditions.map(|c| c.len()), Some(1));
}

#[test]
fn published_paths_are_under_the_kubelet_dir() {
    assert_eq!(
        published_path("/var/lib/kubelet/", "uid-1", "pv-1"),
        "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/pv-1/mount"
    );
}

fn earlier(reason: &str, message: &str, minutes_ago: u64, now: SystemTime) -> EarlierEvent {
    EarlierEvent {
        reason: reason.into(),
        message: message.into(),
        at: now - Duration::from_secs(minutes_ago * 60),
        by: "csi-pv-monitor-controller-hostpath.csi.k8s.io".into(),
    }
}

#[test]
fn a_condition_announced_by_anyone_within_the_hour_is_not_announced_again() {
    let now = SystemTime::now();
    let abnormal = announcement(None, &Condition::Abnormal("disk gone".into())).expect("announced");
    let normal = announcement(Some(&Condition::Abnormal("disk gone".into())), &Condition::Normal).expect("announced");
    // The incumbent said it 10 minutes ago: volplane only records it.
    let said = [earlier(REASON_ABNORMAL, "disk gone", 10, now)];
    assert_eq!(already_announced(&abnormal, &said, now), Some(&said[0]));
    // Too long ago, another message, or a recovery since: announced.
    assert_eq!(
        already_announced(&abnormal, &[earlier(REASON_ABNORMAL, "disk gone", 61, now)], now),
        None
    );
    assert_eq!(
        already_announced(&abnormal, &[earlier(REASON_ABNORMAL, "disk full", 10, now)], now),
        None
    );
    let recovered_since = [
        earlier(REASON_ABNORMAL, "disk gone", 20, now),
        earlier(REASON_NORMAL, "fine", 10, now),
    ];
    assert_eq!(already_announced(&abnormal, &recovered_since, now), None);
    // A recovery already announced (in the incumbent's words) is not repeated.
    assert_eq!(
        already_announced(&normal, &recovered_since, now),
        Some(&recovered_since[1])
    );
    // Other reasons do not count.
    assert_eq!(
        already_announced(&abnormal, &[earlier("NodeFailed", "disk gone", 1, now)], now),
        None
    );
    assert_eq!(already_announced(&abnormal, &[], now), None);
}

fn node_event(reason: &str, message: &str, minutes_ago: u64) -> EarlierEvent {
    EarlierEvent {
        reason: reason.into(),
        message: message.into(),
        at: SystemTime::now() - Duration::from_secs(minutes_ago * 60),
        by: "volplane-health-node".into(),
    }
}

#[test]
fn a_node_agent_remembers_the_latest_condition_its_pod_events_name_for_the_volume() {
    let about = node_note("pv-1", "apps", "data", "");
    let abnormal = Condition::Abnormal("I/O errors".into());
    let said = node_note("pv-1", "apps", "data", "I/O errors");
    let now = SystemTime::now();
    // Announced 10 minutes ago, still so: the same condition, no new event.
    let earlier = [node_event(REASON_ABNORMAL, &said, 10)];
    assert_eq!(remembered(&earlier, &about, &abnormal, now), abnormal);
    assert_eq!(
        announcement(Some(&remembered(&earlier, &about, &abnormal, now)), &abnormal),
        None
    );
    // Recovered while no agent ran: the recovery is announced.
    let last = remembered(&earlier, &about, &Condition::Normal, now);
    assert!(matches!(announcement(Some(&last), &Condition::Normal), Some(a) if a.reason == REASON_NORMAL));
    // Another volume's event, or one older than the hour, says nothing.
    let other = [node_event(
        REASON_ABNORMAL,
        &node_note("pv-2", "apps", "data", "I/O errors"),
        1,
    )];
    assert_eq!(remembered(&other, &about, &abnormal, now), Condition::Normal);
    let old = [node_event(REASON_ABNORMAL, &said, 61)];
    assert_eq!(remembered(&old, &about, &abnormal, now), Condition::Normal);
    // The latest wins: abnormal, then normal again.
    let both = [
        node_event(REASON_ABNORMAL, &said, 20),
        node_event(REASON_NORMAL, &about, 5),
    ];
    assert_eq!(remembered(&both, &about, &abnormal, now), Condition::Normal);
}

#[test]
fn a_long_driver_message_is_remembered_as_its_cut_note() {
    let message = "x".repeat(3000);
    let abnormal = Condition::Abnormal(message.clone());
    let about = node_note("pv-1", "apps", "data", "");
    let note = announcement(None, &abnormal).expect("abnormal is announced").note;
    let said = node_note("pv-1", "apps", "data", &note);
    assert!(said.len() <= volplane_runtime::text::EVENT_NOTE_MAX_BYTES);
    let earlier = [node_event(REASON_ABNORMAL, &said, 1)];
    assert_eq!(remembered(&earlier, &about, &abnormal, SystemTime::now()), abnormal);
}
