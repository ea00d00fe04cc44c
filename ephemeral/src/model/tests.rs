use serde_json::json;

use super::*;

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("pod")
}

/// The pod as the controller caches it.
fn cached(pod: &Pod) -> EphemeralPod {
    EphemeralPod::from(pod.clone())
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
    let names: Vec<&str> = ephemeral_volumes(&p).into_iter().map(|(n, _)| n).collect();
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
    let (volume, template) = ephemeral_volumes(&p)[0];
    let claim = desired_claim(&p, volume, template).expect("claim");
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
    let (volume, template) = ephemeral_volumes(&p)[1];
    let claim = desired_claim(&p, volume, template).expect("claim");
    assert_eq!(claim.spec.and_then(|s| s.storage_class_name), None);
    assert_eq!(claim.metadata.labels, None);
    assert_eq!(claim.metadata.annotations, None);
}

#[test]
fn exactly_one_owner_reference_the_pod_as_controller() {
    let p = cached(&web());
    let (volume, template) = ephemeral_volumes(&p)[0];
    let claim = desired_claim(&p, volume, template).expect("claim");
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
fn a_pod_without_uid_gets_no_claim_yet() {
    let mut p = web();
    p.metadata.uid = None;
    let p = cached(&p);
    let original = cached(&web());
    let (volume, template) = ephemeral_volumes(&original)[0];
    assert!(desired_claim(&p, volume, template).is_none());
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
fn the_cached_pod_keeps_only_what_the_controller_reads() {
    let p = cached(&web());
    assert_eq!(p.metadata.name.as_deref(), Some("web-0"));
    assert_eq!(p.metadata.uid.as_deref(), Some("pod-uid"));
    assert!(p.metadata.managed_fields.is_none() && p.metadata.labels.is_none() && p.metadata.annotations.is_none());
    assert_eq!(p.volumes.len(), 2, "the configMap volume is not kept");
    assert_eq!(p.phase.as_deref(), Some("Pending"));
    // It is the same pod to kube-runtime: kind, version, object reference.
    let reference = kube::Resource::object_ref(&p, &());
    assert_eq!(
        (
            reference.api_version.as_deref(),
            reference.kind.as_deref(),
            reference.name.as_deref()
        ),
        (Some("v1"), Some("Pod"), Some("web-0"))
    );
    assert_eq!(<EphemeralPod as kube::Resource>::plural(&()), "pods");
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
fn a_cached_claim_keeps_what_ownership_reads_and_nothing_else() {
    let mut meta: ObjectMeta = serde_json::from_value(serde_json::json!({
        "name": "p-data", "namespace": "ns", "uid": "c1", "resourceVersion": "7",
        "labels": {"app": "x"}, "annotations": {"big": "x".repeat(4096)},
        "finalizers": ["kubernetes.io/pvc-protection"],
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
        "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u1", "controller": true}]
    }))
    .expect("meta");
    let before = ownership(&meta, "u1");
    trim_claim(&mut meta);
    assert_eq!(ownership(&meta, "u1"), before);
    assert_eq!(
        (meta.name.as_deref(), meta.namespace.as_deref()),
        (Some("p-data"), Some("ns"))
    );
    assert!(meta.labels.is_none() && meta.annotations.is_none() && meta.managed_fields.is_none());
    assert!(meta.finalizers.is_none());
}
