use serde_json::{Value, json};

use super::*;

fn pod(status: Value) -> SlimPod {
    serde_json::from_value(
        json!({"metadata": {"name": "p", "uid": "u1"}, "spec": {"nodeName": "n1"}, "status": status}),
    )
    .expect("pod")
}

/// As the kubelet writes a pod it rejects at admission.
fn rejected() -> SlimPod {
    pod(json!({"phase": "Failed", "reason": "OutOfcpu",
               "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 64000, used: 0, capacity: 2000"}))
}

fn terminated(phase: &str, finished_at: &str) -> SlimPod {
    pod(json!({"phase": phase, "containerStatuses": [
        {"name": "c", "state": {"terminated": {"exitCode": 0, "finishedAt": finished_at}}}]}))
}

#[test]
fn a_pod_rejected_at_admission_is_released_in_both_modes_and_at_once() {
    for mode in [ReleaseMode::Rejected, ReleaseMode::Terminated] {
        let finished = finished(&rejected(), mode).expect("released");
        assert_eq!(finished.ending, Ending::Rejected);
        assert!(finished.never_admitted);
        assert_eq!(finished.reason.as_deref(), Some("OutOfcpu"));
        let not_ready = NodeFacts::default();
        assert_eq!(
            timing(&finished, NodeView::Known(&not_ready), 0, 0, 3600),
            Verdict::Release
        );
    }
    assert_eq!(finished(&rejected(), ReleaseMode::Never), None);
}

#[test]
fn running_pending_unknown_and_deleted_pods_keep_their_claims() {
    for phase in ["Pending", "Running", "Unknown"] {
        assert_eq!(
            finished(&pod(json!({"phase": phase})), ReleaseMode::Terminated),
            None,
            "{phase}"
        );
    }
    assert_eq!(finished(&pod(json!({})), ReleaseMode::Terminated), None, "no phase yet");
    let mut deleted = rejected();
    deleted.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().expect("time"),
    ));
    assert_eq!(
        finished(&deleted, ReleaseMode::Terminated),
        None,
        "garbage collection's"
    );
}

#[test]
fn a_pod_that_ran_is_terminated_not_rejected_and_only_released_in_terminated_mode() {
    let succeeded = terminated("Succeeded", "2026-01-01T00:00:10Z");
    assert_eq!(finished(&succeeded, ReleaseMode::Rejected), None);
    let failed_after_running = terminated("Failed", "2026-01-01T00:00:10Z");
    assert_eq!(finished(&failed_after_running, ReleaseMode::Rejected), None);
    let restarted = pod(json!({"phase": "Failed", "containerStatuses": [
        {"name": "c", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 1}}}]}));
    assert_eq!(
        finished(&restarted, ReleaseMode::Rejected),
        None,
        "ran before its last restart"
    );
    let started = pod(json!({"phase": "Failed", "containerStatuses": [{"name": "c", "state": {}, "started": true}]}));
    assert_eq!(finished(&started, ReleaseMode::Rejected), None);
    let done = finished(&succeeded, ReleaseMode::Terminated).expect("released");
    assert_eq!(done.ending, Ending::Terminated);
    assert!(!done.never_admitted);
}

#[test]
fn an_admitted_pod_that_never_ran_is_rejected_but_waits_for_the_kubelet_like_a_terminated_one() {
    // E.g. activeDeadlineSeconds passed while its image was pulled: the
    // volumes may have been mounted.
    let pulling = pod(
        json!({"phase": "Failed", "reason": "DeadlineExceeded", "containerStatuses": [
        {"name": "c", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
    );
    let finished = finished(&pulling, ReleaseMode::Rejected).expect("released");
    assert_eq!(finished.ending, Ending::Rejected);
    assert!(!finished.never_admitted);
    let ready = NodeFacts {
        ready: true,
        ..NodeFacts::default()
    };
    assert_eq!(
        timing(&finished, NodeView::Known(&ready), 100, 100, 60),
        Verdict::NotBefore(160)
    );
    assert_eq!(
        timing(&finished, NodeView::Known(&ready), 160, 100, 60),
        Verdict::Release
    );
}

#[test]
fn a_terminated_pod_waits_for_the_delay_after_its_last_container_and_for_a_ready_or_gone_node() {
    let done = finished(
        &terminated("Succeeded", "2026-01-01T00:00:10Z"),
        ReleaseMode::Terminated,
    )
    .expect("done");
    let at = "2026-01-01T00:00:10Z"
        .parse::<k8s_openapi::jiff::Timestamp>()
        .expect("time")
        .as_second();
    assert_eq!(done.since, Some(at));
    let ready = NodeFacts {
        ready: true,
        ..NodeFacts::default()
    };
    let not_ready = NodeFacts::default();
    // The container's finish time counts, not when volplane saw the pod.
    assert_eq!(
        timing(&done, NodeView::Known(&ready), at + 5, at + 5, 30),
        Verdict::NotBefore(at + 30)
    );
    assert_eq!(
        timing(&done, NodeView::Known(&ready), at + 30, at + 29, 30),
        Verdict::Release
    );
    assert!(matches!(
        timing(&done, NodeView::Known(&not_ready), at + 3600, at, 30),
        Verdict::WaitForNode(_)
    ));
    assert_eq!(timing(&done, NodeView::Gone, at + 30, at, 30), Verdict::Release);
    assert_eq!(timing(&done, NodeView::NotBound, at + 30, at, 30), Verdict::Release);
    // No finish time in any status: from when volplane first saw it finished.
    let no_time = finished(&pod(json!({"phase": "Succeeded", "containerStatuses": [{"name": "c", "state": {"terminated": {"exitCode": 0}}}]})), ReleaseMode::Terminated)
        .expect("done");
    assert_eq!(
        timing(&no_time, NodeView::Known(&ready), 1000, 990, 30),
        Verdict::NotBefore(1020)
    );
}

#[test]
fn volumes_in_use_hold_exactly_their_csi_volume_and_anything_unknown() {
    let node = NodeFacts {
        ready: true,
        volumes_in_use: [volume_key("kubernetes.io/csi/hostpath.csi.k8s.io^abc")].into(),
        generation: 1,
    };
    let ours = VolumeSource::Csi {
        driver: "hostpath.csi.k8s.io",
        handle: "abc",
    };
    let other = VolumeSource::Csi {
        driver: "hostpath.csi.k8s.io",
        handle: "abcd",
    };
    assert!(in_use(&node, &ours));
    assert!(!in_use(&node, &other));
    assert!(!in_use(&node, &VolumeSource::Unbound));
    assert!(
        in_use(&node, &VolumeSource::Other),
        "an unknown kind waits while anything is listed"
    );
    assert!(!in_use(&NodeFacts::default(), &VolumeSource::Other));
}

#[test]
fn the_note_names_the_claim_the_volume_and_why_in_any_length() {
    let rejected = finished(&rejected(), ReleaseMode::Rejected).expect("released");
    let text = note("p-data", "data", &rejected);
    assert!(
        text.contains("p-data") && text.contains("\"data\"") && text.contains("OutOfcpu"),
        "{text}"
    );
    let mut long = rejected.clone();
    long.reason = Some("é".repeat(10_000).into());
    assert!(note(&"c".repeat(300), "v", &long).len() <= volplane_runtime::text::EVENT_NOTE_MAX_BYTES);
}
