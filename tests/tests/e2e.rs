//! End-to-end tests against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler). Skipped with a message unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::json;
use volplane_tests::e2e::{ControlPlane, bin_dir_or_skip};

/// Polls `check` every 250ms until it returns `Some`, failing after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_serves_namespaces_and_schedules_pods() {
    let Some(bin_dir) = bin_dir_or_skip("control_plane_serves_namespaces_and_schedules_pods") else {
        return;
    };
    let plane = ControlPlane::start(&bin_dir).await.expect("control plane starts");
    let client = plane.client();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some("e2e-smoke".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    let read = namespaces.get("e2e-smoke").await.expect("read namespace back");
    assert!(read.metadata.uid.is_some());

    plane
        .add_node("node-1", &BTreeMap::new(), None)
        .await
        .expect("fake node");
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("node-1").await.expect("node");
    assert!(node.spec.and_then(|s| s.taints).unwrap_or_default().is_empty());

    // The scheduler is running: a plain pod gets bound to the only node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "e2e-smoke");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "smoke"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let node_name = eventually(Duration::from_secs(60), "pod scheduled", || {
        let pods = pods.clone();
        async move {
            pods.get("smoke")
                .await
                .ok()
                .and_then(|p| p.spec)
                .and_then(|s| s.node_name)
        }
    })
    .await;
    assert_eq!(node_name, "node-1");
}
