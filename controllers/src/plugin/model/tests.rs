use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::*;
use volplane_capacity::model::Reservation;

const DRIVER: &str = "hostpath.csi.k8s.io";
const KEY: &str = "topology.hostpath.csi/node";

fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("object")
}

fn node(name: &str) -> Node {
    from(json!({"metadata": {"name": name, "labels": {KEY: name, "kubernetes.io/hostname": name}}}))
}

fn capacity(name: &str, node: &str, capacity: &str, maximum: Option<&str>) -> CSIStorageCapacity {
    from(
        json!({"metadata": {"name": name, "namespace": "kube-system", "creationTimestamp": "2026-12-01T10:00:00Z"},
                "storageClassName": "fast", "nodeTopology": {"matchLabels": {KEY: node}},
                "capacity": capacity, "maximumVolumeSize": maximum}),
    )
}

fn class(name: &str, mode: &str) -> StorageClass {
    from(json!({"metadata": {"name": name}, "provisioner": DRIVER, "volumeBindingMode": mode}))
}

fn driver(tracked: bool) -> CSIDriver {
    from(json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": tracked}}))
}

/// The seed scenario: three nodes with 100Gi, 20Gi and 5Gi.
fn seed() -> Cluster {
    Cluster {
        nodes: vec![node("node-0"), node("node-1"), node("node-2")],
        classes: vec![class("fast", "WaitForFirstConsumer")],
        drivers: vec![driver(true)],
        capacities: vec![
            capacity("csisc-0", "node-0", "100Gi", None),
            capacity("csisc-1", "node-1", "20Gi", None),
            capacity("csisc-2", "node-2", "5Gi", None),
        ],
    }
}

fn ephemeral_pod(name: &str, size: &str) -> Pod {
    from(json!({"metadata": {"name": name, "namespace": "default"},
                "spec": {"containers": [], "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                             "resources": {"requests": {"storage": size}}}}}}]}}))
}

fn now() -> k8s_openapi::jiff::Timestamp {
    "2026-12-01T10:05:00Z".parse().expect("time")
}

#[test]
fn selectors_match_like_the_scheduler() {
    let labels = BTreeMap::from([
        ("zone".to_string(), "a".to_string()),
        ("rack".to_string(), "1".to_string()),
    ]);
    let cases: &[(serde_json::Value, bool)] = &[
        (json!({}), true),
        (json!({"matchLabels": {"zone": "a"}}), true),
        (json!({"matchLabels": {"zone": "b"}}), false),
        (json!({"matchLabels": {"zone": "a", "rack": "2"}}), false),
        (
            json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}),
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}),
            false,
        ),
        (
            json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}),
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["x"]}]}),
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "rack", "operator": "Exists"}]}),
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}),
            false,
        ),
        (
            json!({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}),
            true,
        ),
        (
            json!({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}),
            false,
        ),
    ];
    for (selector, want) in cases {
        let selector: LabelSelector = from(selector.clone());
        assert_eq!(selects(&selector, &labels), *want, "{selector:?}");
    }
}

#[test]
fn an_object_without_node_topology_reaches_no_node() {
    let mut object = capacity("c", "node-0", "1Gi", None);
    object.node_topology = None;
    assert!(!reaches(&object, &node("node-0")));
    assert!(reaches(&capacity("c", "node-0", "1Gi", None), &node("node-0")));
}

#[test]
fn the_limit_is_the_maximum_volume_size_when_set() {
    assert_eq!(limit(&capacity("c", "n", "100Gi", None)), Some(100 << 30));
    assert_eq!(limit(&capacity("c", "n", "100Gi", Some("20Gi"))), Some(20 << 30));
}

#[test]
fn capacity_rows_per_node_and_class_with_dashes_and_tracking() {
    let mut cluster = seed();
    cluster.nodes.push(node("node-3"));
    cluster.classes.push(class("slow", "WaitForFirstConsumer"));
    let rows = capacity_rows(&cluster, None, None, now());
    let summary: Vec<(&str, &str, Option<i64>)> = rows
        .iter()
        .map(|r| (r.node.as_str(), r.class.as_str(), r.capacity))
        .collect();
    assert_eq!(
        summary,
        [
            ("node-0", "fast", Some(100 << 30)),
            ("node-0", "slow", None),
            ("node-1", "fast", Some(20 << 30)),
            ("node-1", "slow", None),
            ("node-2", "fast", Some(5 << 30)),
            ("node-2", "slow", None),
            ("node-3", "fast", None),
            ("node-3", "slow", None),
        ]
    );
    assert_eq!(rows[0].object.as_deref(), Some("kube-system/csisc-0"));
    assert_eq!(rows[0].age_seconds, Some(300));
    assert_eq!(rows[0].topology.as_deref(), Some("topology.hostpath.csi/node=node-0"));
    assert_eq!(rows[1].topology, None);
    assert!(rows.iter().all(|r| r.tracking == Tracking::Tracked));
    let only_slow = capacity_rows(&cluster, Some("slow"), None, now());
    assert_eq!(only_slow.len(), 4);
    assert!(capacity_rows(&cluster, None, Some("other.csi"), now()).is_empty());
    cluster.drivers = vec![driver(false)];
    assert!(
        capacity_rows(&cluster, None, None, now())
            .iter()
            .all(|r| r.tracking == Tracking::NotTracked)
    );
}

#[test]
fn volplanes_rows_show_what_is_reserved_and_what_the_driver_said() {
    let mut cluster = seed();
    let managed = |mut object: CSIStorageCapacity, annotations: Option<BTreeMap<String, String>>| {
        let labels = BTreeMap::from([("csi.storage.k8s.io/managed-by".to_string(), "volplane".to_string())]);
        object.metadata.labels = Some(labels);
        object.metadata.annotations = annotations;
        object
    };
    let reserved = Reservation::annotations(Reservation::of(30 << 30, 10 << 30));
    cluster.capacities[0] = managed(capacity("csisc-0", "node-0", "20Gi", None), reserved);
    cluster.capacities[1] = managed(capacity("csisc-1", "node-1", "20Gi", None), None);
    let rows = capacity_rows(&cluster, None, None, now());
    let shown: Vec<_> = rows
        .iter()
        .map(|r| (r.capacity, r.reserved, r.driver_capacity))
        .collect();
    assert_eq!(
        shown,
        [
            (Some(20 << 30), Some(10 << 30), Some(30 << 30)),
            // volplane's, nothing reserved: the driver's value is published.
            (Some(20 << 30), Some(0), Some(20 << 30)),
            // Not volplane's: unknown.
            (Some(5 << 30), None, None),
        ]
    );
}

#[test]
fn of_several_objects_the_one_admitting_the_largest_volume_is_shown_and_used() {
    let mut cluster = seed();
    cluster.capacities.push(capacity("csisc-1b", "node-1", "80Gi", None));
    let rows = capacity_rows(&cluster, None, None, now());
    assert_eq!(rows[1].object.as_deref(), Some("kube-system/csisc-1b"));
    let why = why(&ephemeral_pod("p", "50Gi"), &[], &[], &cluster);
    assert!(why.nodes[1].1[0].fits, "{why:?}");
}

#[test]
fn the_seed_scenario_50gi_fits_only_node_0_and_500gi_nowhere() {
    let cluster = seed();
    let fits = why(&ephemeral_pod("web", "50Gi"), &[], &[], &cluster);
    assert_eq!(fits.claims.len(), 1);
    assert!(fits.claims[0].from_template);
    assert_eq!(fits.claims[0].name, "web-data");
    let reasons: Vec<(&str, bool, &str)> = fits
        .nodes
        .iter()
        .map(|(n, f)| (n.as_str(), f[0].fits, f[0].reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("node-0", true, "needs 50Gi, fits capacity 100Gi (csisc-0)"),
            ("node-1", false, "needs 50Gi, capacity 20Gi (csisc-1)"),
            ("node-2", false, "needs 50Gi, capacity 5Gi (csisc-2)"),
        ]
    );
    assert_eq!(fits.verdict, "default/web: its volumes fit only on node-0");
    let nowhere = why(&ephemeral_pod("big", "500Gi"), &[], &[], &cluster);
    assert_eq!(nowhere.verdict, "default/big: its volumes fit on none of the 3 nodes");
}

#[test]
fn every_reason_the_scheduler_has() {
    let mut cluster = seed();
    cluster.capacities[0] = capacity("csisc-0", "node-0", "100Gi", Some("20Gi"));
    let node0 = node("node-0");
    let claim = |class: Option<&str>, size: Option<i64>| Claim {
        name: "c".into(),
        volume: "v".into(),
        from_template: false,
        class: class.map(str::to_string),
        size,
        bound_to: None,
        missing: false,
    };
    let reason = |c: &Claim, cluster: &Cluster| fit(c, &node0, &[], cluster);
    let got = reason(&claim(Some("fast"), Some(50 << 30)), &cluster);
    assert_eq!(
        (got.fits, got.reason.as_str()),
        (false, "needs 50Gi, larger than maximumVolumeSize 20Gi (csisc-0)")
    );
    let got = reason(&claim(Some("fast"), Some(10 << 30)), &cluster);
    assert!(got.fits, "{got:?}");
    let got = reason(&claim(Some("gone"), Some(1)), &cluster);
    assert_eq!(got.reason, "StorageClass gone does not exist");
    cluster.classes.push(class("now", "Immediate"));
    let got = reason(&claim(Some("now"), Some(1)), &cluster);
    assert!(!got.fits && got.reason.contains("binds Immediately"), "{got:?}");
    let got = reason(&claim(Some("fast"), None), &cluster);
    assert!(got.fits && got.reason.starts_with("no storage request"), "{got:?}");
    let got = reason(&claim(None, Some(1)), &cluster);
    assert!(!got.fits && got.reason.contains("no default class"), "{got:?}");
    cluster.capacities.clear();
    let got = reason(&claim(Some("fast"), Some(1)), &cluster);
    assert_eq!(
        got.reason,
        "no CSIStorageCapacity for class fast and this node's topology"
    );
    cluster.drivers = vec![driver(false)];
    let got = reason(&claim(Some("fast"), Some(1 << 50)), &cluster);
    assert!(got.fits && got.reason.contains("not tracked"), "{got:?}");
    cluster.drivers.clear();
    assert!(
        reason(&claim(Some("fast"), Some(1 << 50)), &cluster).fits,
        "no CSIDriver: not checked"
    );
}

#[test]
fn a_bound_claim_fits_where_its_volume_is_reachable() {
    let cluster = seed();
    let pv: PersistentVolume = from(
        json!({"metadata": {"name": "pv-1"}, "spec": {"nodeAffinity": {"required": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": KEY, "operator": "In", "values": ["node-1"]}]}]}}}}),
    );
    let pvc: PersistentVolumeClaim = from(json!({"metadata": {"name": "web-data"},
        "spec": {"storageClassName": "fast", "volumeName": "pv-1", "resources": {"requests": {"storage": "50Gi"}}}}));
    let why = why(&ephemeral_pod("web", "50Gi"), &[pvc], &[pv], &cluster);
    assert!(!why.claims[0].from_template);
    let fits: Vec<bool> = why.nodes.iter().map(|(_, f)| f[0].fits).collect();
    assert_eq!(fits, [false, true, false], "{why:?}");
    assert!(why.nodes[0].1[0].reason.contains("excludes this node"));
    assert_eq!(why.verdict, "default/web: its volumes fit only on node-1");
}

#[test]
fn a_missing_claim_and_the_default_class() {
    let mut cluster = seed();
    let mut fast = class("fast", "WaitForFirstConsumer");
    fast.metadata.annotations = Some([(DEFAULT_CLASS_ANNOTATION.to_string(), "true".to_string())].into());
    cluster.classes = vec![fast];
    let pod: Pod = from(
        json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {"containers": [], "volumes": [
        {"name": "named", "persistentVolumeClaim": {"claimName": "nope"}},
        {"name": "tmp", "ephemeral": {"volumeClaimTemplate": {"spec": {"resources": {"requests": {"storage": "1Gi"}}}}}}]}}),
    );
    let why = why(&pod, &[], &[], &cluster);
    assert!(why.claims[0].missing);
    assert_eq!(why.claims[1].class.as_deref(), Some("fast"), "the default class");
    assert_eq!(why.nodes[0].1[0].reason, "PVC nope does not exist");
    assert_eq!(why.verdict, "default/p: its volumes fit on none of the 3 nodes");
}

#[test]
fn ages_are_written_like_kubectl() {
    let cases = [
        (5, "5s"),
        (119, "119s"),
        (150, "2m30s"),
        (600, "10m"),
        (3 * 3600 + 120, "3h2m"),
        (20 * 3600, "20h"),
        (3 * 86400 + 3600, "3d1h"),
        (40 * 86400, "40d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
        (9 * 365 * 86400, "9y"),
    ];
    for (seconds, want) in cases {
        assert_eq!(human_age(Duration::from_secs(seconds)), want, "{seconds}");
    }
}

#[test]
fn selectors_are_written_like_kubectl() {
    let selector: LabelSelector = from(json!({"matchLabels": {"zone": "a"}, "matchExpressions": [
        {"key": "rack", "operator": "In", "values": ["1", "2"]}, {"key": "gpu", "operator": "DoesNotExist"}]}));
    assert_eq!(selector_text(&selector), "zone=a,rack in (1,2),!gpu");
    assert_eq!(selector_text(&LabelSelector::default()), "<all>");
}

#[test]
fn a_finished_pod_holding_its_claims_says_whether_volplane_releases_them() {
    let mut pod = ephemeral_pod("job", "10Gi");
    pod.metadata.uid = Some("u1".into());
    let owned: PersistentVolumeClaim = from(json!({"metadata": {"name": "job-data",
        "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "job", "uid": "u1", "controller": true}]}}));
    let foreign: PersistentVolumeClaim = from(json!({"metadata": {"name": "job-data"}}));
    assert_eq!(held(&pod, std::slice::from_ref(&owned)), None, "not finished");

    pod.status = Some(from(
        json!({"phase": "Failed", "reason": "OutOfcpu", "message": "Pod was rejected: …"}),
    ));
    let rejected = held(&pod, std::slice::from_ref(&owned)).expect("held");
    assert!(
        rejected.contains("job-data")
            && rejected.contains("OutOfcpu")
            && rejected.contains("the default")
            && rejected.contains("at once"),
        "{rejected}"
    );
    assert_eq!(held(&pod, &[foreign]), None, "not its claim");
    assert_eq!(held(&pod, &[]), None, "already gone");

    pod.status = Some(from(
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "c", "image": "i", "imageID": "",
        "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}]}),
    ));
    let terminated = held(&pod, &[owned]).expect("held");
    assert!(
        terminated.contains("only with --ephemeral-release=terminated")
            && terminated.contains("until the pod is deleted"),
        "{terminated}"
    );
}

#[test]
fn each_row_says_whose_object_applies_and_how_many_stale_ones_also_do() {
    let mut cluster = seed();
    let mut theirs = capacity("left-over", "node-0", "500Gi", None);
    theirs.metadata.labels = Some(BTreeMap::from([(
        "csi.storage.k8s.io/managed-by".to_string(),
        "external-provisioner".to_string(),
    )]));
    cluster.capacities.push(theirs);
    for object in &mut cluster.capacities {
        if object.metadata.name.as_deref() == Some("csisc-1") {
            object.metadata.labels = Some(BTreeMap::from([(
                "csi.storage.k8s.io/managed-by".to_string(),
                "volplane-node-1".to_string(),
            )]));
        }
    }
    let rows = capacity_rows(&cluster, Some("fast"), None, now());
    let node = |name: &str| rows.iter().find(|r| r.node == name).expect("row");
    // The larger, stale object is the one the scheduler would use.
    assert_eq!(
        (node("node-0").managed_by, node("node-0").others),
        (Some(Manager::CsiProvisioner), 1)
    );
    assert_eq!(
        (node("node-1").managed_by, node("node-1").others),
        (Some(Manager::Volplane), 0)
    );
    assert_eq!(node("node-2").managed_by, Some(Manager::Foreign), "no label: nobody's");
}
