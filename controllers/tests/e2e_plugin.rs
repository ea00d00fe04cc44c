//! e2e: `kubectl volplane` against a real control plane, checked against
//! what kube-scheduler actually did. The seed scenario: three nodes with
//! 100Gi, 20Gi and 5Gi published; a pod whose 50Gi ephemeral volume fits
//! only node-0, and one whose 500Gi volume fits nowhere. Ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::Api;
use serde_json::json;
use support::Running;
use volplane_tests::driver::labels;
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::objects::{create, tracked_driver_with_class};
use volplane_tests::wait::eventually_some;

const DRIVER: &str = "plugin.csi.volplane.dev";
const KEY: &str = "topology.volplane.dev/node";
const NS: &str = "shop";

fn plugin(plane: &ControlPlane, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-volplane"))
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .args(args)
        .output()
        .expect("run kubectl-volplane")
}

fn stdout(plane: &ControlPlane, args: &[&str]) -> String {
    let output = plugin(plane, args);
    assert!(
        output.status.success(),
        "kubectl-volplane {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The table's lines with runs of spaces made one, for comparing.
fn squeezed(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn ephemeral_pod(name: &str, size: &str) -> serde_json::Value {
    json!({"metadata": {"name": name},
           "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                    "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                        "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": size}}}}}}]}})
}

async fn seed(plane: &ControlPlane) {
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NS}}),
    )
    .await;
    tracked_driver_with_class(&client, DRIVER, "fast").await;
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), "default");
    for (node, size) in [("node-0", "100Gi"), ("node-1", "20Gi"), ("node-2", "5Gi")] {
        plane
            .add_node(node, &labels([(KEY, node)]), Some((DRIVER, &[KEY])))
            .await
            .expect("node");
        create(
            &capacities,
            json!({"metadata": {"name": format!("csisc-{node}")}, "storageClassName": "fast",
                   "nodeTopology": {"matchLabels": {KEY: node}}, "capacity": size}),
        )
        .await;
    }
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_and_why_say_what_the_scheduler_did() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    seed(&plane).await;
    let client = plane.client();

    let capacity = stdout(&plane, &["capacity"]);
    println!("$ kubectl volplane capacity\n{capacity}");
    // Every column but AGE, which depends on the moment.
    let without_age = |text: &str| -> Vec<String> {
        squeezed(text)
            .iter()
            .map(|line| {
                let mut words: Vec<&str> = line.split(' ').collect();
                words.pop();
                words.join(" ")
            })
            .collect()
    };
    assert_eq!(
        without_age(&capacity),
        [
            "NODE CLASS DRIVER CAPACITY RESERVED FROM DRIVER MAX VOLUME SIZE OBJECT MANAGED-BY",
            // Created by hand, without a managed-by label: nobody's.
            "node-0 fast plugin.csi.volplane.dev 100Gi - - - default/csisc-node-0 foreign",
            "node-1 fast plugin.csi.volplane.dev 20Gi - - - default/csisc-node-1 foreign",
            "node-2 fast plugin.csi.volplane.dev 5Gi - - - default/csisc-node-2 foreign",
        ],
        "{capacity}"
    );
    let wide = stdout(&plane, &["capacity", "--class", "fast", "-o", "wide"]);
    println!("$ kubectl volplane capacity --class fast -o wide\n{wide}");
    let wide_lines = squeezed(&wide);
    assert!(wide_lines[0].ends_with("OBJECT MANAGED-BY AGE TOPOLOGY"), "{wide}");
    assert!(
        wide_lines[1].starts_with("node-0 fast plugin.csi.volplane.dev 100Gi - - - default/csisc-node-0 foreign ")
            && wide_lines[1].ends_with(" topology.volplane.dev/node=node-0"),
        "{wide}"
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout(&plane, &["capacity", "-o", "json"])).expect("json");
    assert_eq!(rows[0]["capacity"], json!(100i64 << 30));

    // Before any PVC exists, `why` reads the ephemeral volume template.
    let _ephemeral = Running::start(
        plane.kubeconfig(),
        &["--controllers=ephemeral", "--leader-election=false"],
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    create(&pods, ephemeral_pod("web", "50Gi")).await;
    create(&pods, ephemeral_pod("huge", "500Gi")).await;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let selected = volplane_tests::objects::selected_node(&claims, "web-data").await;
    // Until the claim exists the scheduler waits for the ephemeral volume
    // controller; then it judges the storage.
    let unschedulable = eventually_some(Duration::from_secs(90), "huge is unschedulable for storage", || async {
        let pod = pods.get("huge").await.ok()?;
        pod.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
            .message
            .filter(|m| m.contains("did not have enough free storage"))
    })
    .await;
    assert!(unschedulable.starts_with("0/3 nodes are available"), "{unschedulable}");

    let why = stdout(&plane, &["why", "web", "-n", NS]);
    println!("$ kubectl volplane why web -n shop\n{why}");
    let lines = squeezed(&why);
    assert!(
        lines.contains(&"node-0 web-data fits needs 50Gi, fits capacity 100Gi (csisc-node-0)".to_string()),
        "{why}"
    );
    assert!(
        lines.contains(&"node-1 web-data no needs 50Gi, capacity 20Gi (csisc-node-1)".to_string()),
        "{why}"
    );
    assert!(
        lines.contains(&"node-2 web-data no needs 50Gi, capacity 5Gi (csisc-node-2)".to_string()),
        "{why}"
    );
    let verdict = lines.last().expect("verdict");
    assert_eq!(
        verdict,
        &format!("shop/web: its volumes fit only on {selected}"),
        "the scheduler chose {selected}"
    );

    let yaml = stdout(&plane, &["why", "web", "-n", NS, "-o", "yaml"]);
    let parsed: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
    assert_eq!(
        parsed["verdict"],
        json!(format!("shop/web: its volumes fit only on {selected}")),
        "{yaml}"
    );
    assert_eq!(parsed["claims"][0]["size"], json!(50i64 << 30), "{yaml}");

    let why = stdout(&plane, &["why", "huge", "-n", NS]);
    println!("$ kubectl volplane why huge -n shop\n{why}");
    assert_eq!(
        squeezed(&why).last().map(String::as_str),
        Some("shop/huge: its volumes fit on none of the 3 nodes"),
        "{why}"
    );
    assert!(why.contains("needs 500Gi, capacity 100Gi (csisc-node-0)"), "{why}");

    // One clear error line and a non-zero exit for a pod that is not there.
    let missing = plugin(&plane, &["why", "nobody", "-n", NS]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: cannot read pod shop/nobody"), "{stderr}");

    let health = stdout(&plane, &["health", "-A"]);
    assert_eq!(health, "No volumes held abnormal or on a failed node.\n");

    // A PV annotated the way volplane's health controller records an
    // abnormal condition and a failed node.
    create(
        &Api::<PersistentVolume>::all(client.clone()),
        json!({"metadata": {"name": "pv-web", "annotations": {
                   "health.volplane.dev/abnormal": "mount point /data is missing",
                   "health.volplane.dev/node-failed": "node-0"}},
               "spec": {"capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "claimRef": {"namespace": NS, "name": "web-data"},
                        "csi": {"driver": DRIVER, "volumeHandle": "vol-web"}}}),
    )
    .await;
    let health = stdout(&plane, &["health", "-n", NS]);
    println!("$ kubectl volplane health -n shop\n{health}");
    assert_eq!(
        squeezed(&health),
        [
            "PVC VOLUME CONDITION SINCE PODS",
            "web-data pv-web mount point /data is missing - web",
            "web-data pv-web node node-0 failed - web",
        ],
        "{health}"
    );
}
