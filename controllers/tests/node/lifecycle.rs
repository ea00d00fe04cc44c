//! The per-node capacity parts' life on the real node: a rollout keeps
//! every object (same UID, never missing), a deleted Node's objects go,
//! and uninstalling the per-node kustomization leaves no object of
//! volplane's behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use volplane_tests::e2e::ControlPlane;
use volplane_tests::node::NODE_NAME;
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

use super::{NAMESPACE, app_pods, is_ready, name};

const DAEMONSET: &str = "volplane-capacity-node";

/// The node's objects: class → UID, and the owners they name.
async fn node_objects(client: &kube::Client) -> Option<(BTreeMap<String, String>, BTreeSet<String>)> {
    let selector = format!("csi.storage.k8s.io/managed-by=volplane-{NODE_NAME}");
    let list = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&selector))
        .await
        .ok()?;
    let owners = (list.items.iter())
        .flat_map(|o| o.metadata.owner_references.iter().flatten())
        .map(|r| format!("{}/{}", r.kind, r.name))
        .collect();
    let uids = (list.items.into_iter())
        .map(|o| (o.storage_class_name, o.metadata.uid.unwrap_or_default()))
        .collect();
    Some((uids, owners))
}

/// Restarts the DaemonSet's pods; all along, the node's objects are the
/// same objects, owned by the DaemonSet.
pub async fn rollout_keeps_the_objects(plane: &ControlPlane) {
    let client = plane.client();
    let (before, owners) = node_objects(&client).await.expect("the node's objects");
    assert_eq!(before.len(), 2, "one object per class: {before:?}");
    assert_eq!(
        owners,
        BTreeSet::from([format!("DaemonSet/{DAEMONSET}")]),
        "owned by the DaemonSet"
    );
    let old: BTreeSet<String> = app_pods(&client, DAEMONSET).await.iter().map(name).collect();
    plane
        .kubectl_ok(&["rollout", "restart", "-n", NAMESPACE, &format!("daemonset/{DAEMONSET}")])
        .expect("kubectl rollout restart");
    let started = Instant::now();
    let looks = std::sync::atomic::AtomicUsize::new(0);
    eventually_some(Duration::from_secs(120), "the DaemonSet rolled out", || async {
        looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (now, _) = node_objects(&client).await?;
        assert_eq!(
            now,
            before,
            "the node's objects, at {:?} into the rollout",
            started.elapsed()
        );
        let pods = app_pods(&client, DAEMONSET).await;
        let replaced = pods.iter().all(|p| !old.contains(&name(p)) && is_ready(p));
        (replaced && pods.len() == 1).then_some(())
    })
    .await;
    let (after, _) = node_objects(&client).await.expect("the node's objects");
    assert_eq!(after, before, "the new instance kept the objects");
    println!(
        "rollout: {:?} with the node's objects in place at each of {} looks",
        started.elapsed(),
        looks.into_inner()
    );
}

/// A Node deleted: volplane-placements deletes the per-node objects that
/// name it, and leaves the others.
pub async fn a_deleted_nodes_objects_go(client: &kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    // Tainted: no DaemonSet pod goes there.
    create(
        &nodes,
        json!({"metadata": {"name": "gone-node"},
               "spec": {"taints": [{"key": "volplane.test/no-pods", "effect": "NoSchedule"}]}}),
    )
    .await;
    let objects: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), NAMESPACE);
    create(
        &objects,
        json!({"metadata": {"name": "of-gone-node",
                            "labels": {"csi.storage.k8s.io/managed-by": "volplane-gone-node",
                                       "csi.storage.k8s.io/drivername": "hostpath.csi.k8s.io"}},
               "storageClassName": "fast", "capacity": "1Gi",
               "nodeTopology": {"matchLabels": {"kubernetes.io/hostname": "gone-node"}}}),
    )
    .await;
    let (before, _) = node_objects(client).await.expect("the node's objects");
    nodes
        .delete("gone-node", &DeleteParams::default())
        .await
        .expect("delete the node");
    let deleted = Instant::now();
    eventually_some(Duration::from_secs(30), "the gone node's object deleted", || async {
        matches!(objects.get_opt("of-gone-node").await, Ok(None)).then_some(())
    })
    .await;
    println!("a deleted node's object went {:?} after the node", deleted.elapsed());
    let (after, _) = node_objects(client).await.expect("the node's objects");
    assert_eq!(after, before, "the live node's objects stay");
}

/// The objects of the per-node kustomization, as the test overlay renders
/// them, in the overlay's order: what `kubectl delete -k` of it deletes.
fn per_node_part(plane: &ControlPlane) -> Value {
    let render = |dir: &Path| -> Vec<Value> {
        let rendered = plane
            .kubectl_ok(&["kustomize", &dir.display().to_string()])
            .expect("kubectl kustomize");
        serde_saphyr::from_multiple(&rendered).expect("YAML")
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let wanted: BTreeSet<String> = render(&root.join("deploy/capacity-per-node")).iter().map(key).collect();
    let items: Vec<Value> = (render(&root.join("tests/deploy-node")).into_iter())
        .filter(|o| wanted.contains(&key(o)))
        .collect();
    assert_eq!(items.len(), wanted.len(), "the overlay renders every per-node object");
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// `kubectl delete` of the per-node part: within a minute, no
/// CSIStorageCapacity object of a per-node instance is left.
pub async fn uninstall_leaves_no_capacity(plane: &ControlPlane) {
    let client = plane.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("capacity-per-node.json");
    std::fs::write(&file, per_node_part(plane).to_string()).expect("write the objects");
    plane
        .kubectl_ok(&["delete", "--wait=false", "-f", &file.display().to_string()])
        .expect("kubectl delete");
    let deleted = Instant::now();
    let objects: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), NAMESPACE);
    let left = || async {
        let list = objects.list(&ListParams::default()).await.ok()?;
        let per_node: Vec<String> = (list.items.into_iter())
            .filter(|o| {
                (o.metadata.labels.as_ref())
                    .and_then(|l| l.get("csi.storage.k8s.io/managed-by"))
                    .is_some_and(|m| m.starts_with("volplane-"))
            })
            .filter_map(|o| o.metadata.name)
            .collect();
        Some(per_node)
    };
    eventually_some(Duration::from_secs(60), "no per-node capacity left", || async {
        left().await.filter(Vec::is_empty)
    })
    .await;
    println!(
        "uninstall: no per-node capacity {:?} after kubectl delete",
        deleted.elapsed()
    );
    // The terminating instances could still write: once they are gone, none is back.
    eventually_some(Duration::from_secs(90), "the per-node pods gone", || async {
        app_pods(&client, DAEMONSET).await.is_empty().then_some(())
    })
    .await;
    let after = left().await.expect("list the objects");
    assert!(after.is_empty(), "per-node capacity after the pods went: {after:?}");
}
