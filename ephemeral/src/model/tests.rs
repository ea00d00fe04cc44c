use serde_json::json;

use super::*;

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("pod")
}

/// The pod as the controller reads it.
fn cached(pod: &Pod) -> SlimPod {
    serde_json::from_value(serde_json::to_value(pod).expect("json")).expect("slim pod")
}

/// Who `pod` is, for its claims.
fn identity(pod: &SlimPod) -> PodIdentity<'_> {
    PodIdentity {
        namespace: pod.metadata.namespace.as_deref().unwrap_or_default(),
        name: pod.metadata.name.as_deref().unwrap_or_default(),
        uid: pod.metadata.uid.as_deref().unwrap_or_default(),
    }
}

fn web() -> Pod {
    pod(json!({
        "metadata": {"name": "web-0", "namespace": "shop", "uid": "pod-uid",
                     "labels": {"app": "web"}, "annotations": {"note": "pod annotation"},
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {
            "containers": [{"name": "c", "image": "nginx"}],
            "volumes": [
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                    "metadata": {"labels": {"type": "scratch"}, "annotations": {"a": "b"}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                             "resources": {"requests": {"storage": "4Gi"}},
                             "selector": {"matchLabels": {"x": "y"}}, "volumeName": "pv-1",
                             "dataSource": {"kind": "VolumeSnapshot", "name": "snap", "apiGroup": "snapshot.storage.k8s.io"},
                             "dataSourceRef": {"kind": "VolumeSnapshot", "name": "snap", "apiGroup": "snapshot.storage.k8s.io"}}}}},
                {"name": "cache", "ephemeral": {"volumeClaimTemplate": {
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}},
                {"name": "config", "configMap": {"name": "cfg"}}
            ]
        },
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]}
    }))
}

#[test]
fn claim_names_are_pod_dash_volume() {
    assert_eq!(claim_name("web-0", "scratch"), "web-0-scratch");
    assert_eq!(claim_name("a-b", "c"), "a-b-c");
}

#[test]
fn only_ephemeral_volumes_need_claims() {
    let p = cached(&web());
    let names: Vec<String> = ephemeral_volumes(&p).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["scratch", "cache"]);
    let plain =
        pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "volumes": [{"name": "v", "emptyDir": {}}]}}));
    assert!(ephemeral_volumes(&cached(&plain)).is_empty());
    let none = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
    assert!(ephemeral_volumes(&cached(&none)).is_empty());
}

#[test]
fn terminating_and_finished_pods_are_skipped() {
    assert!(is_active(&cached(&web())));
    for phase in ["Succeeded", "Failed"] {
        let mut p = web();
        p.status.as_mut().expect("status").phase = Some(phase.into());
        assert!(!is_active(&cached(&p)), "{phase}");
    }
    for phase in ["Pending", "Running", "Unknown"] {
        let mut p = web();
        p.status.as_mut().expect("status").phase = Some(phase.into());
        assert!(is_active(&cached(&p)), "{phase}");
    }
    let mut p = web();
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("time"),
    ));
    assert!(!is_active(&cached(&p)));
}

#[test]
fn the_claim_takes_metadata_from_the_template_only_and_the_spec_verbatim() {
    let p = cached(&web());
    let (volume, template) = &ephemeral_volumes(&p)[0];
    let claim = desired_claim(&identity(&p), volume, template);
    assert_eq!(claim.metadata.name.as_deref(), Some("web-0-scratch"));
    assert_eq!(claim.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(
        claim.metadata.labels,
        Some([("type".to_string(), "scratch".to_string())].into())
    );
    assert_eq!(
        claim.metadata.annotations,
        Some([("a".to_string(), "b".to_string())].into())
    );
    assert_eq!(claim.spec.as_ref(), Some(&template.spec));
    let spec = claim.spec.expect("spec");
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(spec.volume_name.as_deref(), Some("pv-1"));
    assert!(spec.selector.is_some() && spec.data_source.is_some() && spec.data_source_ref.is_some());
    assert!(claim.status.is_none());
}

#[test]
fn a_nil_storage_class_stays_nil_and_no_metadata_means_none() {
    let p = cached(&web());
    let (volume, template) = &ephemeral_volumes(&p)[1];
    let claim = desired_claim(&identity(&p), volume, template);
    assert_eq!(claim.spec.and_then(|s| s.storage_class_name), None);
    assert_eq!(claim.metadata.labels, None);
    assert_eq!(claim.metadata.annotations, None);
}

#[test]
fn exactly_one_owner_reference_the_pod_as_controller() {
    let p = cached(&web());
    let (volume, template) = &ephemeral_volumes(&p)[0];
    let claim = desired_claim(&identity(&p), volume, template);
    assert_eq!(
        claim.metadata.owner_references,
        Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: "web-0".into(),
            uid: "pod-uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }])
    );
}

#[test]
fn ownership_is_decided_by_the_controller_reference_uid() {
    let meta = |owners: serde_json::Value| -> ObjectMeta {
        serde_json::from_value(json!({"name": "web-0-scratch", "ownerReferences": owners})).expect("meta")
    };
    let pod_ref = |uid: &str, controller: bool| json!({"apiVersion": "v1", "kind": "Pod", "name": "web-0", "uid": uid, "controller": controller});
    assert_eq!(
        ownership(&meta(json!([pod_ref("pod-uid", true)])), "pod-uid"),
        Ownership::Pod
    );
    // Same name, earlier incarnation of the pod.
    assert!(
        matches!(ownership(&meta(json!([pod_ref("old-uid", true)])), "pod-uid"), Ownership::Foreign(why) if why.contains("old-uid"))
    );
    // Our UID but not as controller does not count.
    assert!(matches!(
        ownership(&meta(json!([pod_ref("pod-uid", false)])), "pod-uid"),
        Ownership::Foreign(_)
    ));
    assert!(matches!(ownership(&meta(json!(null)), "pod-uid"), Ownership::Foreign(why) if why.contains("not owned")));
    let sts =
        json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "pod-uid", "controller": true}]);
    assert!(matches!(ownership(&meta(sts), "pod-uid"), Ownership::Foreign(why) if why.contains("StatefulSet db")));
}

#[test]
fn the_slim_pod_keeps_only_what_the_controller_reads() {
    let p = cached(&web());
    assert_eq!(p.metadata.name.as_deref(), Some("web-0"));
    assert_eq!(p.metadata.uid.as_deref(), Some("pod-uid"));
    assert!(p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none());
    let volumes = p.spec.as_ref().and_then(|s| s.volumes.as_ref()).expect("volumes");
    assert_eq!(volumes.len(), 3, "every volume, named");
    assert!(
        volumes[2].ephemeral.is_none(),
        "the configMap volume's source is not read"
    );
    assert_eq!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Pending"));
}

#[test]
fn pods_with_equal_volumes_share_one_copy() {
    let mut interner = VolumesInterner::default();
    let a = interner.intern(ephemeral_volumes(&cached(&web())));
    let b = interner.intern(ephemeral_volumes(&cached(&web())));
    assert!(Arc::ptr_eq(&a, &b), "equal volumes, one allocation");
    let mut other = web();
    other
        .spec
        .as_mut()
        .expect("spec")
        .volumes
        .as_mut()
        .expect("volumes")
        .truncate(1);
    let c = interner.intern(ephemeral_volumes(&cached(&other)));
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(c.len(), 1);
    drop((a, b));
    let again = interner.intern(ephemeral_volumes(&cached(&web())));
    assert_eq!(again.len(), 2, "a copy nobody holds any more is made again");
}

#[test]
fn what_a_volume_needs_follows_the_cached_claims_controlling_pod() {
    assert_eq!(need(None, "u1"), Need::Create);
    assert_eq!(need(Some(Some("u1")), "u1"), Need::Nothing);
    assert_eq!(need(Some(Some("u0")), "u1"), Need::Check, "an earlier pod's claim");
    assert_eq!(need(Some(None), "u1"), Need::Check, "a claim no pod controls");
}

#[test]
fn failure_reasons_by_status_code() {
    assert_eq!(FailureReason::from_status(403), FailureReason::Forbidden);
    assert_eq!(FailureReason::from_status(422), FailureReason::Invalid);
    assert_eq!(FailureReason::from_status(500), FailureReason::Other);
    assert_eq!(FailureReason::from_status(400), FailureReason::Other);
    assert_eq!(FailureReason::Forbidden.label(), "forbidden");
}

#[test]
fn a_claim_is_known_by_the_pod_that_controls_it() {
    let meta: ObjectMeta = serde_json::from_value(serde_json::json!({
        "name": "p-data", "namespace": "ns",
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "s", "uid": "u0"},
            {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u1", "controller": true}]
    }))
    .expect("meta");
    assert_eq!(controlling_pod(&meta), Some("u1"));
    assert_eq!(ownership(&meta, "u1"), Ownership::Pod);
    let statefulset: ObjectMeta = serde_json::from_value(serde_json::json!({"name": "p-data",
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "s", "uid": "u1", "controller": true}]}))
    .expect("meta");
    assert_eq!(controlling_pod(&statefulset), None, "controlled, but not by a pod");
}
