//! e2e: the per-node DaemonSets — capacity and the node side of health —
//! cost the API server O(1) each: judged by the real API server's audit
//! log, running as the ServiceAccounts deploy/ creates, neither lists or
//! watches a whole collection of pods, PVs, PVCs, Nodes, CSINodes,
//! VolumeAttachments or CSIStorageCapacities. And they still do their work:
//! per-node capacity follows a volume created and deleted on its node
//! (provisioned by the real csi-provisioner and hostpathplugin) within
//! seconds; the node side finds the volume of a pod on its node. Ignored
//! unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;
use support::{Running, metric_value};
use volplane_capacity::quantity::parse_bytes;
use volplane_tests::e2e::{AuditRecord, ControlPlane, HostPath, Options, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane-node";
const CAPACITY_USER: &str = "system:serviceaccount:volplane-node:volplane-capacity-node";
const HEALTH_USER: &str = "system:serviceaccount:volplane-node:volplane-health-node";

/// What a DaemonSet instance must never read as a whole collection.
const PER_NODE_FORBIDDEN: [&str; 7] = [
    "pods",
    "persistentvolumes",
    "persistentvolumeclaims",
    "nodes",
    "csinodes",
    "volumeattachments",
    "csistoragecapacities",
];

/// The capacity volplane published for `class` on node `n1`, in bytes.
async fn published_fast(client: &kube::Client) -> Option<i64> {
    let objects = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels("csi.storage.k8s.io/managed-by=volplane-n1"))
        .await
        .ok()?
        .items;
    let fast = objects.into_iter().find(|o| o.storage_class_name == "fast")?;
    parse_bytes(&fast.capacity?.0)
}

async fn wait_for_fast(client: &kube::Client, bytes: i64, what: &str, limit: Duration) {
    eventually_some(limit, what, || async {
        (published_fast(client).await == Some(bytes)).then_some(())
    })
    .await;
}

/// The reads of `user` in the audit log, and those of them that read a
/// forbidden collection whole.
fn reads_of(log: &[AuditRecord], user: &str) -> (Vec<AuditRecord>, BTreeSet<String>) {
    let reads: Vec<AuditRecord> = log
        .iter()
        .filter(|r| r.user == user && matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .cloned()
        .collect();
    let whole = reads
        .iter()
        .filter(|r| r.is_unselected_read() && PER_NODE_FORBIDDEN.contains(&r.resource.as_str()))
        .map(|r| format!("{} {}", r.verb, r.resource))
        .collect();
    (reads, whole)
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_instances_read_only_their_nodes_and_their_own_objects() {
    let options = Options {
        audit: true,
        ..Options::default()
    };
    let plane = ControlPlane::start_with(&bin_dir(), options)
        .await
        .expect("control plane starts");
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    for dir in ["capacity-per-node", "health-node"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir);
        plane
            .kubectl_ok(&["apply", "-k", &path.to_string_lossy()])
            .expect("kubectl apply -k");
    }
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    create(
        &Api::<StorageClass>::all(client.clone()),
        json!({"metadata": {"name": "fast-now"}, "provisioner": HostPath::DRIVER,
               "volumeBindingMode": "Immediate", "parameters": {"kind": "fast"}}),
    )
    .await;
    plane.add_hostpath_node("n1").await.expect("node");
    // Another node, other pods and claims: what a whole-collection read would also see.
    plane.add_node("n2", &Default::default(), None).await.expect("node");
    let driver = plane
        .start_hostpath("n1", &[("fast", "100Gi"), ("slow", "10Gi")])
        .await
        .expect("hostpathplugin");
    let _provisioner = plane
        .start_csi_provisioner("csi-provisioner", &driver, NAMESPACE, &[])
        .expect("csi-provisioner");

    let capacity_kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-capacity-node")
        .await
        .expect("token");
    let mut capacity = Running::start(
        &capacity_kubeconfig,
        &[
            "--controllers=capacity",
            "--node-deployment",
            "--node-name",
            "n1",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
        ],
    );
    capacity.wait_for("volplane is ready").await;
    wait_for_fast(&client, 100 << 30, "n1's capacity", Duration::from_secs(60)).await;

    // A volume created on the node: the published capacity follows within
    // seconds, with no PV watch behind it.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    create(
        &claims,
        json!({"metadata": {"name": "data"},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-now",
                        "resources": {"requests": {"storage": "10Gi"}}}}),
    )
    .await;
    let volume = eventually_some(Duration::from_secs(60), "the claim is bound", || async {
        let claim = claims.get("data").await.ok()?;
        (claim.status?.phase.as_deref() == Some("Bound")).then_some(())?;
        claim.spec?.volume_name
    })
    .await;
    let provisioned = std::time::Instant::now();
    wait_for_fast(
        &client,
        90 << 30,
        "the capacity after the volume",
        Duration::from_secs(20),
    )
    .await;
    println!(
        "capacity followed a new volume {:?} after it was bound",
        provisioned.elapsed()
    );

    // The node side finds the volume of a pod on its node, by name.
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": "user"},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/none"}],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        json!({"metadata": {"name": "elsewhere"},
               "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "registry.invalid/none"}]}}),
    )
    .await;
    let health_kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-health-node")
        .await
        .expect("token");
    let mut health = Running::start(
        &health_kubeconfig,
        &[
            "--controllers=health",
            "--node-deployment",
            "--node-name",
            "n1",
            "--csi-address",
            &driver.address(),
            "--health-monitor-interval",
            "500ms",
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    let admin = health.admin_address().await;
    health.wait_for("volplane is ready").await;
    eventually_some(
        Duration::from_secs(30),
        "NodeGetVolumeStats for the pod's volume",
        || async {
            let checks: f64 = [
                "normal",
                "abnormal",
                "missing",
                "no_condition",
                "error",
                "unimplemented",
            ]
            .iter()
            .map(|result| metric_value(admin, "volplane_health_checks_total", &[("result", result)]))
            .sum();
            (checks >= 1.0).then_some(())
        },
    )
    .await;

    // The volume deleted: the capacity comes back, again within seconds.
    // (No kubelet confirms a graceful deletion on a fake node.)
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete("user", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    claims
        .delete("data", &DeleteParams::default())
        .await
        .expect("delete claim");
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    eventually_some(Duration::from_secs(60), "the volume is deleted", || async {
        pvs.get_opt(&volume).await.ok()?.is_none().then_some(())
    })
    .await;
    wait_for_fast(
        &client,
        100 << 30,
        "the capacity after the deletion",
        Duration::from_secs(20),
    )
    .await;

    for running in [capacity, health] {
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
    let log = plane.audit_log().expect("audit log");
    for user in [CAPACITY_USER, HEALTH_USER] {
        let (reads, whole) = reads_of(&log, user);
        assert!(
            reads.len() >= 3,
            "{user} made no reads? the audit log has {} records",
            log.len()
        );
        assert!(
            whole.is_empty(),
            "{user} read whole collections: {whole:?}\nall its reads: {reads:#?}"
        );
    }
    let (health_reads, _) = reads_of(&log, HEALTH_USER);
    let by_name = |resource: &str| {
        health_reads
            .iter()
            .any(|r| r.verb == "get" && r.resource == resource && r.name.is_some())
    };
    assert!(
        by_name("persistentvolumeclaims") && by_name("persistentvolumes"),
        "the node side reads the pod's claim and volume by name: {health_reads:#?}"
    );
}
