//! e2e of a burst of pods filling node-local storage, on a real control
//! plane with the real hostpathplugin and csi-provisioner on every node:
//! volplane per node with the placements controller shows kube-scheduler
//! what the placements in flight leave, so no CreateVolume is refused.
//! Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, ListParams};
use serde_json::json;
use support::Running;
use volplane_capacity::model::Reservation;
use volplane_capacity::quantity::parse_bytes;
use volplane_tests::e2e::{ControlPlane, HostPath, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const GI: i64 = 1 << 30;

/// Node → the `fast` capacity volplane publishes for it.
async fn published_fast(client: &kube::Client) -> BTreeMap<String, i64> {
    (fast_objects(client).await.into_iter())
        .filter_map(|(node, o)| Some((node, parse_bytes(&o.capacity?.0)?)))
        .collect()
}

/// volplane's `fast` objects, with the node each is for.
async fn fast_objects(client: &kube::Client) -> Vec<(String, CSIStorageCapacity)> {
    let objects = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    (objects.into_iter())
        .filter(|o| o.storage_class_name == "fast")
        .filter_map(|o| {
            let node = o
                .node_topology
                .as_ref()?
                .match_labels
                .as_ref()?
                .get(HostPath::TOPOLOGY_KEY)?
                .clone();
            Some((node, o))
        })
        .collect()
}

/// Node → (published, reserved, the driver's value) of the `fast` objects
/// that carry a reservation.
async fn reservations(client: &kube::Client) -> BTreeMap<String, (i64, i64, i64)> {
    (fast_objects(client).await.into_iter())
        .filter_map(|(node, o)| {
            let reservation = Reservation::read(o.metadata.annotations.as_ref())?;
            let published = parse_bytes(&o.capacity?.0)?;
            Some((node, (published, reservation.reserved, reservation.driver_capacity)))
        })
        .collect()
}

async fn wait_for_fast(client: &kube::Client, want: &BTreeMap<String, i64>, what: &str) {
    eventually_some(Duration::from_secs(60), what, || async {
        (published_fast(client).await == *want).then_some(())
    })
    .await;
}

/// A 10Gi `fast` claim and a pod using it, which prefers node-0 (so that
/// node-0 is filled first, and is the scheduler's choice as long as the
/// published capacity says it fits).
async fn pod_with_claim(client: &kube::Client, name: &str) {
    create(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": name},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": "10Gi"}}}}),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": name},
               "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
                        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 100, "preference": {"matchExpressions": [
                                {"key": HostPath::TOPOLOGY_KEY, "operator": "In", "values": ["node-0"]}]}}]}}}}),
    )
    .await;
}

/// The ProvisioningFailed events of the claims in `default`: each a
/// CreateVolume the driver refused, a `selected-node` reset and a pod
/// scheduled again.
async fn refused(client: &kube::Client) -> Vec<String> {
    let events = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    (events.into_iter())
        .filter(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
        .map(|e| {
            format!(
                "{}: {}",
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_fills_a_node_provisions_every_volume_on_the_first_try() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    // node-0 has room for two of the burst's volumes, node-1 for all.
    let pools = [("node-0", "25Gi"), ("node-1", "200Gi")];
    let mut processes = Vec::new();
    let mut running = Vec::new();
    for (node, fast) in pools {
        plane.add_hostpath_node(node).await.expect("node");
        let driver = plane
            .start_hostpath(node, &[("fast", fast), ("slow", "1Gi")])
            .await
            .expect("hostpathplugin");
        running.push(Running::start(
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
            ],
        ));
        let provisioner = plane
            .start_csi_provisioner_as(
                &format!("csi-provisioner-{node}"),
                &driver,
                plane.kubeconfig(),
                &[("NAMESPACE", NAMESPACE), ("NODE_NAME", node)],
                &["--node-deployment=true"],
            )
            .expect("csi-provisioner");
        processes.push((driver, provisioner));
    }
    running.push(Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=placements",
            "--namespace",
            NAMESPACE,
            "--leader-election=false",
        ],
    ));
    let at_rest = BTreeMap::from([("node-0".to_string(), 25 * GI), ("node-1".to_string(), 200 * GI)]);
    wait_for_fast(&client, &at_rest, "both nodes published").await;

    // Eight pods, one every 200 ms: faster than provisioning, so several
    // are placed while the volumes of the others are still being created.
    // Meanwhile, what the objects say they reserve is sampled.
    let sampler = {
        let client = client.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while stopped.try_recv().is_err() {
                seen.extend(reservations(&client).await.into_values());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        });
        (stop, task)
    };
    for i in 0..8 {
        pod_with_claim(&client, &format!("burst-{i}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let on_node_0 = eventually_some(Duration::from_secs(120), "every claim bound", || async {
        let items = claims.list(&ListParams::default()).await.ok()?.items;
        let bound = items
            .iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"));
        let nodes: Vec<String> = bound
            .filter_map(|c| {
                c.metadata
                    .annotations
                    .as_ref()?
                    .get("volume.kubernetes.io/selected-node")
                    .cloned()
            })
            .collect();
        (nodes.len() == 8).then(|| nodes.iter().filter(|n| *n == "node-0").count())
    })
    .await;
    let _ = sampler.0.send(());
    let seen = sampler.1.await.expect("sampler");
    assert!(!seen.is_empty(), "no object said what it reserved during the burst");
    for (published, reserved, driver) in &seen {
        assert_eq!(
            *published,
            (driver - reserved).max(0),
            "published is the driver's value less the reserved: {seen:?}"
        );
    }
    let refusals = refused(&client).await;
    println!(
        "burst: {on_node_0} of 8 volumes on node-0, {} CreateVolume refused",
        refusals.len()
    );
    assert!(refusals.is_empty(), "CreateVolume refused: {refusals:#?}");
    assert_eq!(on_node_0, 2, "node-0, preferred, has room for two");
    // Every reservation ended: the drivers' values alone are published.
    let after = BTreeMap::from([
        ("node-0".to_string(), 25 * GI - on_node_0 as i64 * 10 * GI),
        ("node-1".to_string(), 200 * GI - (8 - on_node_0 as i64) * 10 * GI),
    ]);
    wait_for_fast(&client, &after, "the drivers' values after the burst").await;
    eventually_some(
        Duration::from_secs(30),
        "no object says it reserves anything",
        || async { reservations(&client).await.is_empty().then_some(()) },
    )
    .await;
    for volplane in running {
        let (code, lines) = volplane.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
    drop(processes);
}

/// A `fast` claim of `size` placed on node-0 as kube-scheduler places one
/// (its `selected-node` set), with no pod.
async fn placed_claim(client: &kube::Client, name: &str, size: &str) {
    create(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": name, "annotations": {"volume.kubernetes.io/selected-node": "node-0"}},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": size}}}}),
    )
    .await;
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_failed_placement_gives_its_reservation_back() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    plane.add_hostpath_node("node-0").await.expect("node");
    let driver = plane
        .start_hostpath("node-0", &[("fast", "25Gi"), ("slow", "1Gi")])
        .await
        .expect("hostpathplugin");
    let per_node = [
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
    ];
    let placements = [
        "--controllers=placements",
        "--namespace",
        NAMESPACE,
        "--leader-election=false",
    ];
    let running = [
        Running::start(plane.kubeconfig(), &per_node),
        Running::start(plane.kubeconfig(), &placements),
    ];
    let node_0 = |bytes: i64| BTreeMap::from([("node-0".to_string(), bytes)]);
    wait_for_fast(&client, &node_0(25 * GI), "node-0 published").await;

    // No provisioner yet: the placement stays in flight until its claim goes.
    placed_claim(&client, "held", "10Gi").await;
    wait_for_fast(&client, &node_0(15 * GI), "10Gi reserved").await;
    assert_eq!(
        reservations(&client).await,
        BTreeMap::from([("node-0".to_string(), (15 * GI, 10 * GI, 25 * GI))])
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims.delete("held", &Default::default()).await.expect("delete");
    wait_for_fast(&client, &node_0(25 * GI), "the deleted claim's reservation gone").await;

    // More than the node has: nothing is published while it is in flight;
    // csi-provisioner's CreateVolume is refused, it removes `selected-node`,
    // and the reservation goes back.
    placed_claim(&client, "too-big", "30Gi").await;
    wait_for_fast(&client, &node_0(0), "30Gi reserved").await;
    let provisioner = plane
        .start_csi_provisioner_as(
            "csi-provisioner-node-0",
            &driver,
            plane.kubeconfig(),
            &[("NAMESPACE", NAMESPACE), ("NODE_NAME", "node-0")],
            &["--node-deployment=true"],
        )
        .expect("csi-provisioner");
    eventually_some(Duration::from_secs(60), "the CreateVolume refused", || async {
        let refusals = refused(&client).await;
        refusals.iter().any(|r| r.starts_with("too-big: ")).then_some(())
    })
    .await;
    wait_for_fast(&client, &node_0(25 * GI), "the failed claim's reservation given back").await;
    let claim = claims.get("too-big").await.expect("claim");
    let annotations = claim.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("volume.kubernetes.io/selected-node"),
        "{annotations:?}"
    );
    eventually_some(
        Duration::from_secs(30),
        "no object says it reserves anything",
        || async { reservations(&client).await.is_empty().then_some(()) },
    )
    .await;
    for volplane in running {
        let (code, lines) = volplane.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
    drop((driver, provisioner));
}
