//! What volplane makes of what changed while its API server was away, on a
//! real control plane: two kube-apiservers on one etcd; volplane talks to
//! the first, which is killed with -9; through the second, a provisioned
//! volume is deleted and another turns abnormal, half the pods with
//! ephemeral volumes are deleted and new ones arrive, a node is removed;
//! the first comes back (its watch cache fresh: every watch re-lists).
//! Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see tests/README.md.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::{Running, ephemeral_pod, metric_value};
use volplane_health::model::REASON_ABNORMAL;
use volplane_tests::e2e::{HostPath, Options};
use volplane_tests::objects::{create, remove_node};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const APPS: &str = "e2e-gap";
/// Pods with an ephemeral volume before the gap (two pages of a list).
const PODS: usize = 600;
/// Pods created during the gap.
const NEW_PODS: usize = 20;

/// A claim of the `hostpath` class provisioned by csi-provisioner; its
/// volume handle.
async fn provisioned(client: &kube::Client, name: &str) -> String {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), APPS);
    create(
        &claims,
        json!({"metadata": {"name": name},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hostpath",
                        "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
    eventually_some(
        Duration::from_secs(60),
        "csi-provisioner provisions and binds",
        || async {
            let claim = claims.get(name).await.ok()?;
            (claim.status?.phase.as_deref() == Some("Bound")).then_some(())?;
            let pv = Api::<PersistentVolume>::all(client.clone())
                .get(claim.spec?.volume_name.as_deref()?)
                .await
                .ok()?;
            Some(pv.spec?.csi?.volume_handle)
        },
    )
    .await
}

async fn create_pods(client: &kube::Client, names: impl Iterator<Item = String>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    futures::stream::iter(names)
        .for_each_concurrent(16, |name| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &ephemeral_pod(&name))
                    .await
                    .expect("create pod");
            }
        })
        .await;
}

/// The claims in the namespace, by name, with the UID of their controlling pod.
async fn claims(client: &kube::Client) -> Vec<(String, String)> {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), APPS)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|claim| {
            let owner = claim
                .metadata
                .owner_references?
                .into_iter()
                .find(|r| r.controller == Some(true))?
                .uid;
            Some((claim.metadata.name?, owner))
        })
        .collect()
}

/// (node, class) of volplane's CSIStorageCapacity objects, one entry each.
async fn capacity_objects(client: &kube::Client) -> Vec<(String, String)> {
    let mut objects: Vec<(String, String)> = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels("csi.storage.k8s.io/managed-by=volplane"))
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| {
            let node = o.node_topology?.match_labels?.get(HostPath::TOPOLOGY_KEY)?.clone();
            Some((node, o.storage_class_name))
        })
        .collect();
    objects.sort();
    objects
}

fn every_node_and_class(nodes: &[&str]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = nodes
        .iter()
        .flat_map(|node| ["fast", "slow"].map(|class| (node.to_string(), class.to_string())))
        .collect();
    pairs.sort();
    pairs
}

async fn abnormal_events(client: &kube::Client, claim: &str) -> usize {
    volplane_tests::events::count(client, APPS, REASON_ABNORMAL, claim).await
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_api_server_was_away_volplane_forgets_what_vanished_and_adds_only_what_is_new() {
    let options = Options {
        audit: true,
        ..Options::default()
    };
    let (plane, other) = support::two_api_servers(options, &[NAMESPACE, APPS]).await;
    let client = plane.client();
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    create(
        &Api::<StorageClass>::all(client.clone()),
        json!({"metadata": {"name": "hostpath"}, "provisioner": HostPath::DRIVER, "volumeBindingMode": "Immediate"}),
    )
    .await;
    for node in ["node-1", "node-2"] {
        plane.add_hostpath_node(node).await.expect("node");
    }
    let driver = plane
        .start_hostpath("node-1", &[("fast", "40Gi"), ("slow", "4Gi")])
        .await
        .expect("hostpathplugin");
    // csi-provisioner talks to the second API server: it keeps working
    // while the first is away.
    let second_kubeconfig = plane.second_kubeconfig().expect("second kubeconfig");
    let _provisioner = plane
        .start_process(
            "csi-provisioner",
            "csi-provisioner",
            &[
                format!("--csi-address={}", driver.socket().display()),
                format!("--kubeconfig={}", second_kubeconfig.display()),
            ],
        )
        .expect("csi-provisioner");
    let kept = provisioned(&client, "kept").await;
    let doomed = provisioned(&client, "deleted").await;
    create_pods(&client, (0..PODS).map(|i| format!("p{i:04}"))).await;

    let mut volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity,ephemeral,health",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "none",
            "--capacity-poll-interval",
            "10m",
            "--leader-election=false",
            "--health-list-interval",
            "1s",
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    let admin = volplane.admin_address().await;
    eventually_some(Duration::from_secs(120), "every pod has its claim", || async {
        (claims(&client).await.len() == PODS).then_some(())
    })
    .await;
    eventually_some(Duration::from_secs(60), "capacity for both nodes", || async {
        (capacity_objects(&client).await == every_node_and_class(&["node-1", "node-2"])).then_some(())
    })
    .await;
    support::wait_for_health_checks(admin, "normal", 2.0).await;
    // The volume deleted during the gap is abnormal before it: announced
    // once, its gauge set.
    std::fs::remove_dir_all(driver.state_dir().join(&doomed)).expect("the doomed volume's directory goes");
    eventually_some(Duration::from_secs(30), "the doomed volume announced", || async {
        (abnormal_events(&client, "deleted").await == 1).then_some(())
    })
    .await;
    let gauge = |claim: &str| {
        metric_value(
            admin,
            "volplane_health_abnormal_volumes",
            &[("persistentvolumeclaim", claim)],
        )
    };
    assert_eq!(gauge("deleted"), 1.0);

    // volplane's API server goes away.
    let doomed_pv = Api::<PersistentVolumeClaim>::namespaced(client.clone(), APPS)
        .get("deleted")
        .await
        .ok()
        .and_then(|claim| claim.spec?.volume_name);
    let doomed_writes_before = (plane.audit_log().expect("audit log").iter())
        .filter(|r| r.is_write() && r.resource == "persistentvolumes" && r.name == doomed_pv)
        .count();
    plane.kill_api_server().expect("kill the first API server");
    let gone_pod_uids: BTreeSet<String> = {
        let pods: Api<Pod> = Api::namespaced(other.clone(), APPS);
        let mut uids = BTreeSet::new();
        for i in (0..PODS).step_by(2) {
            let name = format!("p{i:04}");
            let pod = pods.get(&name).await.expect("pod");
            uids.extend(pod.metadata.uid);
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await
                .expect("delete pod");
        }
        uids
    };
    create_pods(&other, (0..NEW_PODS).map(|i| format!("new{i:02}"))).await;
    Api::<PersistentVolumeClaim>::namespaced(other.clone(), APPS)
        .delete("deleted", &DeleteParams::default())
        .await
        .expect("delete the claim");
    let directory = driver.state_dir().join(&kept);
    std::fs::remove_dir_all(&directory).expect("the kept volume's directory goes");
    remove_node(&other, "node-2").await.expect("remove node-2");
    // csi-provisioner deletes the PV (and the driver's volume) meanwhile.
    eventually_some(Duration::from_secs(60), "the deleted claim's PV goes", || async {
        let pvs = Api::<PersistentVolume>::all(other.clone())
            .list(&ListParams::default())
            .await
            .ok()?;
        (pvs.items.len() == 1).then_some(())
    })
    .await;

    plane
        .restart_api_server()
        .await
        .expect("the first API server comes back");
    let back = std::time::Instant::now();

    // health: the abnormal volume is announced once; the deleted one never.
    eventually_some(Duration::from_secs(30), "the abnormal volume announced", || async {
        (abnormal_events(&client, "kept").await > 0).then_some(())
    })
    .await;
    // ephemeral: the remaining and the new pods have their claims, and no
    // claim is owned by a pod deleted during the gap (the garbage collector
    // removes the old ones; volplane created none for them).
    eventually_some(
        Duration::from_secs(60),
        "claims of exactly the pods that are there",
        || async {
            let claims = claims(&client).await;
            let owned_by_gone = claims.iter().filter(|(_, uid)| gone_pod_uids.contains(uid)).count();
            (claims.len() == PODS / 2 + NEW_PODS && owned_by_gone == 0).then_some(())
        },
    )
    .await;
    // capacity: the removed node's objects are deleted, one object per pair.
    eventually_some(Duration::from_secs(30), "capacity for node-1 only", || async {
        (capacity_objects(&client).await == every_node_and_class(&["node-1"])).then_some(())
    })
    .await;
    support::wait_for_health_checks(admin, "abnormal", 3.0).await;
    assert_eq!(abnormal_events(&client, "kept").await, 1);
    assert_eq!(
        abnormal_events(&client, "deleted").await,
        1,
        "the deleted volume was announced again"
    );
    assert_eq!(gauge("deleted"), 0.0, "the deleted volume's gauge stayed");
    assert_eq!(gauge("kept"), 1.0);
    let audit = plane.audit_log().expect("audit log");
    let created = audit
        .iter()
        .filter(|r| {
            r.verb == "create" && r.resource == "persistentvolumeclaims" && r.user_agent.starts_with("volplane")
        })
        .count();
    assert_eq!(
        created,
        PODS + NEW_PODS,
        "claims created for pods deleted during the gap"
    );
    let kept_pv = Api::<PersistentVolumeClaim>::namespaced(client.clone(), APPS)
        .get("kept")
        .await
        .ok()
        .and_then(|claim| claim.spec?.volume_name);
    let pv_writes = |log: &[volplane_tests::e2e::AuditRecord], pv: &Option<String>| {
        (log.iter())
            .filter(|r| r.is_write() && r.resource == "persistentvolumes" && r.user_agent.starts_with("volplane"))
            .filter(|r| r.name == *pv)
            .count()
    };
    assert_eq!(
        pv_writes(&audit, &doomed_pv),
        doomed_writes_before,
        "volplane wrote to the PV deleted during the gap"
    );
    assert!(
        pv_writes(&audit, &kept_pv) >= 1,
        "the kept volume's condition is not recorded"
    );
    eprintln!("e2e gap: back in {:?}", back.elapsed());
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}
