//! e2e with the real CSI reference driver (csi-driver-host-path's
//! `hostpathplugin`) and, for volumes, the real `csi-provisioner`, on a real
//! control plane, with the volplane binary as deployed. Ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;
use support::{Running, metric_value};
use volplane_capacity::quantity::{format_bytes, parse_bytes};
use volplane_csi::{CapacityQuery, CsiClient};
use volplane_tests::e2e::{ControlPlane, HostPath, bin_dir};
use volplane_tests::objects::{create, set_storage_capacity};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const KEY: &str = HostPath::TOPOLOGY_KEY;

/// The namespace, hostpathplugin's CSIDriver and its `fast` and `slow` classes.
async fn storage_setup(plane: &ControlPlane) {
    create(
        &Api::<Namespace>::all(plane.client()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
}

fn csi_client(driver: &HostPath) -> CsiClient {
    CsiClient::new(driver.address().parse().expect("address"), Duration::from_secs(5))
}

/// (node, class) → (capacity, maximumVolumeSize) in bytes, of volplane's objects.
type Published = BTreeMap<(String, String), (i64, Option<i64>)>;

async fn published(client: &kube::Client) -> Published {
    let objects = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!("csi.storage.k8s.io/drivername={}", HostPath::DRIVER)))
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    objects
        .into_iter()
        .filter_map(|o| {
            let node = o.node_topology?.match_labels?.get(KEY)?.clone();
            let capacity = parse_bytes(&o.capacity?.0)?;
            let maximum = o.maximum_volume_size.and_then(|q| parse_bytes(&q.0));
            Some(((node, o.storage_class_name), (capacity, maximum)))
        })
        .collect()
}

/// What hostpathplugin itself answers to GetCapacity for `node` and each class.
async fn reported(drivers: &[(&str, &HostPath)]) -> Published {
    let mut expected = Published::new();
    for (node, driver) in drivers {
        for class in ["fast", "slow"] {
            let report = csi_client(driver)
                .get_capacity(&CapacityQuery {
                    parameters: [("kind".to_string(), class.to_string())].into(),
                    topology: Some([(KEY.to_string(), node.to_string())].into()),
                })
                .await
                .expect("GetCapacity");
            expected.insert(
                (node.to_string(), class.to_string()),
                (report.available_capacity, report.maximum_volume_size),
            );
        }
    }
    expected
}

/// Each per-node driver with its own node as the segment.
fn per_node(drivers: &[HostPath]) -> Vec<(&str, &HostPath)> {
    drivers.iter().map(|d| (d.node(), d)).collect()
}

async fn wait_for_published(client: &kube::Client, expected: &Published, what: &str) {
    eventually_some(Duration::from_secs(60), what, || async {
        let now = published(client).await;
        (now == *expected).then_some(())
    })
    .await;
}

/// Creates a WaitForFirstConsumer claim of `size` in class `fast` and a pod using it.
async fn claim_with_pod(client: &kube::Client, name: &str, size: &str) {
    create(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": name},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": size}}}}),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": name},
               "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}}),
    )
    .await;
}

/// The scheduler's message for a pod it cannot place.
async fn unschedulable_message(client: &kube::Client, pod: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually_some(Duration::from_secs(60), "the pod is unschedulable", || async {
        pods.get(pod)
            .await
            .ok()?
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
            .message
    })
    .await
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_capacity_follows_the_real_driver_places_pods_and_goes_with_its_node() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    storage_setup(&plane).await;
    let pools = [
        ("node-0", [("fast", "100Gi"), ("slow", "10Gi")]),
        ("node-1", [("fast", "20Gi"), ("slow", "10Gi")]),
        ("node-2", [("fast", "5Gi"), ("slow", "1Gi")]),
    ];
    let mut drivers = Vec::new();
    let mut volplanes = Vec::new();
    for (node, capacities) in &pools {
        plane.add_hostpath_node(node).await.expect("node");
        let driver = plane.start_hostpath(node, capacities).await.expect("hostpathplugin");
        volplanes.push(Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=capacity",
                "--node-deployment",
                "--node-name",
                node,
                "--csi-address",
                &driver.address(),
                "--namespace",
                NAMESPACE,
                "--capacity-owner",
                "node",
                "--capacity-poll-interval",
                "2s",
            ],
        ));
        drivers.push(driver);
    }
    let expected = reported(&per_node(&drivers)).await;
    assert_eq!(expected.len(), 6);
    assert_eq!(expected[&("node-0".into(), "fast".into())].0, 100 << 30);
    wait_for_published(
        &client,
        &expected,
        "one object per (node, class) with the driver's figures",
    )
    .await;

    // The scheduler places WaitForFirstConsumer pods only where capacity fits.
    claim_with_pod(&client, "fits-node-0", "50Gi").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    assert_eq!(
        volplane_tests::objects::selected_node(&claims, "fits-node-0").await,
        "node-0"
    );
    claim_with_pod(&client, "fits-nowhere", "500Gi").await;
    let message = unschedulable_message(&client, "fits-nowhere").await;
    assert!(message.contains("did not have enough free storage"), "{message}");

    // The driver restarts with more room; volplane follows without a restart.
    let node_1 = drivers.remove(1);
    let node_1 = plane
        .restart_hostpath(node_1, &[("fast", "30Gi"), ("slow", "10Gi")])
        .await
        .expect("restart");
    drivers.insert(1, node_1);
    let expected = reported(&per_node(&drivers)).await;
    assert_eq!(expected[&("node-1".into(), "fast".into())].0, 30 << 30);
    wait_for_published(&client, &expected, "node-1's new capacity").await;

    // A removed node takes its objects with it (they are owned by the Node).
    let (code, lines) = volplanes.remove(2).terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    Api::<Node>::all(client.clone())
        .delete("node-2", &DeleteParams::default())
        .await
        .expect("delete node");
    let mut remaining = expected.clone();
    remaining.retain(|(node, _), _| node != "node-2");
    wait_for_published(&client, &remaining, "node-2's objects are collected").await;
    for running in volplanes {
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_capacity_covers_every_segment_and_drops_a_removed_node() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    storage_setup(&plane).await;
    for node in ["node-0", "node-1", "node-2"] {
        plane.add_hostpath_node(node).await.expect("node");
    }
    let driver = plane
        .start_hostpath("controller", &[("fast", "40Gi"), ("slow", "4Gi")])
        .await
        .expect("hostpathplugin");
    let volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "none",
            "--leader-election=false",
            "--capacity-poll-interval",
            "2s",
        ],
    );
    let segments = ["node-0", "node-1", "node-2"].map(|node| (node, &driver));
    let expected = reported(&segments).await;
    wait_for_published(&client, &expected, "one object per CSINode segment and class").await;

    Api::<Node>::all(client.clone())
        .delete("node-2", &DeleteParams::default())
        .await
        .expect("delete node");
    Api::<CSINode>::all(client.clone())
        .delete("node-2", &DeleteParams::default())
        .await
        .expect("delete CSINode");
    let expected = reported(&segments[..2]).await;
    wait_for_published(&client, &expected, "the removed node's objects are deleted").await;
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}

/// (class → (capacity, maximumVolumeSize)) as written, of the objects with `managed_by`.
async fn written(client: &kube::Client, managed_by: &str) -> BTreeMap<String, (String, Option<String>)> {
    Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!("csi.storage.k8s.io/managed-by={managed_by}")))
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let capacity = o.capacity.map(|q| q.0).unwrap_or_default();
            (o.storage_class_name, (capacity, o.maximum_volume_size.map(|q| q.0)))
        })
        .collect()
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_follows_the_csidriver_switch_and_reads_byte_for_byte_like_csi_provisioner() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    storage_setup(&plane).await;
    set_storage_capacity(&client, HostPath::DRIVER, false).await;
    plane.add_hostpath_node("node-0").await.expect("node");
    // 107374182400 and 32208060416 bytes: Kubernetes writes 100Gi and 30716Mi.
    let driver = plane
        .start_hostpath("node-0", &[("fast", "100Gi"), ("slow", "30716Mi")])
        .await
        .expect("hostpathplugin");
    // An hour between polls: what appears after the flip comes from the flip.
    let mut volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity",
            "--node-deployment",
            "--node-name",
            "node-0",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "node",
            "--capacity-poll-interval",
            "1h",
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    let admin = volplane.admin_address().await;
    let off = volplane.wait_for("capacity tracking is off").await;
    assert!(
        off.contains("storageCapacity false") && off.contains("kubectl patch csidriver"),
        "{off}"
    );
    volplane.wait_for("volplane is ready").await;
    assert_eq!(metric_value(admin, "volplane_capacity_enabled", &[]), 0.0);
    eventually_some(
        Duration::from_secs(30),
        "CapacityTrackingDisabled on Node and CSIDriver",
        || async {
            (volplane_tests::events::count(&client, "default", "CapacityTrackingDisabled", "node-0").await == 1
                && volplane_tests::events::count(&client, "default", "CapacityTrackingDisabled", HostPath::DRIVER)
                    .await
                    == 1)
                .then_some(())
        },
    )
    .await;
    assert!(written(&client, "volplane-node-0").await.is_empty());

    // external-provisioner's capacity tracking for the same driver, beside it.
    let _provisioner = plane
        .start_csi_provisioner(
            "csi-provisioner",
            &driver,
            NAMESPACE,
            &["--enable-capacity", "--capacity-ownerref-level=-1"],
        )
        .expect("csi-provisioner");
    let theirs = eventually_some(Duration::from_secs(60), "csi-provisioner publishes", || async {
        let objects = written(&client, "external-provisioner").await;
        (objects.len() == 2).then_some(objects)
    })
    .await;
    assert_eq!(theirs["fast"].0, "100Gi");
    assert_eq!(theirs["slow"].0, "30716Mi");

    // Switched on: both classes at once, written exactly as csi-provisioner writes them.
    set_storage_capacity(&client, HostPath::DRIVER, true).await;
    let ours = eventually_some(Duration::from_secs(30), "volplane publishes on the switch", || async {
        let objects = written(&client, "volplane-node-0").await;
        (objects.len() == 2).then_some(objects)
    })
    .await;
    assert_eq!(
        ours, theirs,
        "volplane's quantities read byte for byte like csi-provisioner's"
    );
    assert_eq!(metric_value(admin, "volplane_capacity_enabled", &[]), 1.0);

    // Switched off: volplane's objects go; csi-provisioner's are not volplane's to touch.
    set_storage_capacity(&client, HostPath::DRIVER, false).await;
    eventually_some(Duration::from_secs(30), "volplane's objects are deleted", || async {
        written(&client, "volplane-node-0").await.is_empty().then_some(())
    })
    .await;
    assert_eq!(written(&client, "external-provisioner").await, theirs);
    assert_eq!(metric_value(admin, "volplane_capacity_enabled", &[]), 0.0);
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}

/// What Go's `resource.NewQuantity(bytes, resource.BinarySI).String()` writes:
/// a binary suffix when exact, decimal SI below 1024, else plain digits.
fn go_binary_si(bytes: i64) -> String {
    if bytes.unsigned_abs() < 1024 || bytes % 1024 == 0 {
        return format_bytes(bytes);
    }
    bytes.to_string()
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_keeps_quantities_exactly_as_volplane_writes_them() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), NAMESPACE);
    let values: [i64; 16] = [
        107_374_182_400,
        32_208_060_416,
        1536,
        1_536_000,
        1000,
        1_000_000_000_000,
        1 << 40,
        5_368_709_121,
        0,
        2000,
        3_000_000,
        1023,
        1025,
        4_000_000_000,
        7 << 60,
        i64::MAX,
    ];
    for (i, bytes) in values.into_iter().enumerate() {
        for (how, text) in [("volplane", format_bytes(bytes)), ("go", go_binary_si(bytes))] {
            let stored = create(
                &capacities,
                json!({"metadata": {"name": format!("q-{i}-{how}")}, "storageClassName": "fast",
                       "capacity": text, "maximumVolumeSize": text}),
            )
            .await;
            let read = capacities.get(&format!("q-{i}-{how}")).await.expect("get");
            for object in [stored, read] {
                assert_eq!(
                    object.capacity.map(|q| q.0),
                    Some(format_bytes(bytes)),
                    "{bytes} written as {text}"
                );
                assert_eq!(object.maximum_volume_size.map(|q| q.0), Some(format_bytes(bytes)));
            }
        }
    }
}

mod health {
    use volplane_health::model::{REASON_ABNORMAL, REASON_NODE_FAILED, REASON_NORMAL};

    use super::*;

    const NS: &str = "e2e-health";

    async fn count(client: &kube::Client, reason: &str, claim: &str) -> usize {
        volplane_tests::events::count(client, NS, reason, claim).await
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provisioned_volume_whose_directory_goes_and_returns_is_announced_once_each_way() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": NS}}),
        )
        .await;
        plane.add_hostpath_node("node-1").await.expect("node");
        create(
            &Api::<StorageClass>::all(client.clone()),
            json!({"metadata": {"name": "hostpath"}, "provisioner": HostPath::DRIVER, "volumeBindingMode": "Immediate"}),
        )
        .await;
        let driver = plane.start_hostpath("node-1", &[]).await.expect("hostpathplugin");
        let _provisioner = plane
            .start_process(
                "csi-provisioner",
                "csi-provisioner",
                &[
                    format!("--csi-address={}", driver.socket().display()),
                    format!("--kubeconfig={}", plane.kubeconfig().display()),
                ],
            )
            .expect("csi-provisioner");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        create(
            &claims,
            json!({"metadata": {"name": "data"},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hostpath",
                            "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
        let volume = eventually_some(
            Duration::from_secs(60),
            "csi-provisioner provisions and binds",
            || async {
                let claim = claims.get("data").await.ok()?;
                (claim.status?.phase.as_deref() == Some("Bound")).then_some(())?;
                let pv = Api::<PersistentVolume>::all(client.clone())
                    .get(claim.spec?.volume_name.as_deref()?)
                    .await
                    .ok()?;
                Some(pv.spec?.csi?.volume_handle)
            },
        )
        .await;
        create(
            &Api::<Pod>::namespaced(client.clone(), NS),
            json!({"metadata": {"name": "user"},
                   "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.invalid/none"}],
                            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}),
        )
        .await;

        let mut volplane = Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=health",
                "--csi-address",
                &driver.address(),
                "--namespace",
                NAMESPACE,
                "--leader-election=false",
                "--health-list-interval",
                "500ms",
                "--health-node-watcher",
                "--health-node-failure-threshold",
                "2s",
                "--http-endpoint",
                "127.0.0.1:0",
            ],
        );
        let admin = volplane.admin_address().await;
        support::wait_for_health_checks(admin, "normal", 2.0).await;

        // The volume's directory goes: one VolumeConditionAbnormal, however many sweeps see it.
        let directory = driver.state_dir().join(&volume);
        assert!(directory.is_dir(), "{} is the volume's directory", directory.display());
        std::fs::remove_dir_all(&directory).expect("remove the volume's directory");
        eventually_some(Duration::from_secs(30), "VolumeConditionAbnormal", || async {
            (count(&client, REASON_ABNORMAL, "data").await > 0).then_some(())
        })
        .await;
        support::wait_for_health_checks(admin, "abnormal", 4.0).await;
        assert_eq!(count(&client, REASON_ABNORMAL, "data").await, 1);

        // It returns: one VolumeConditionNormal.
        std::fs::create_dir(&directory).expect("restore the volume's directory");
        eventually_some(Duration::from_secs(30), "VolumeConditionNormal", || async {
            (count(&client, REASON_NORMAL, "data").await > 0).then_some(())
        })
        .await;
        support::wait_for_health_checks(admin, "normal", 4.0).await;
        assert_eq!(count(&client, REASON_NORMAL, "data").await, 1);
        assert_eq!(count(&client, REASON_ABNORMAL, "data").await, 1);

        // The node goes NotReady: one NodeFailed on the claim its pod uses.
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        plane
            .set_node_ready("node-1", "False", "KubeletNotReady", an_hour_ago)
            .await
            .expect("node not ready");
        eventually_some(Duration::from_secs(30), "NodeFailed", || async {
            (count(&client, REASON_NODE_FAILED, "data").await > 0).then_some(())
        })
        .await;
        support::wait_for_health_checks(admin, "normal", 4.0).await;
        assert_eq!(count(&client, REASON_NODE_FAILED, "data").await, 1);

        let (code, lines) = volplane.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}
