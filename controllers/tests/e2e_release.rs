//! e2e of `--ephemeral-release` on a real control plane: kube-controller-
//! manager with its garbage collector, PVC protection and PV controller,
//! csi-provisioner with the real hostpath driver, so volumes are really
//! provisioned and deleted. The pods' status is written as the kubelet
//! writes it on an admission rejection, through the status subresource.
//! Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::{Running, metric_value};
use volplane_capacity::quantity::parse_bytes;
use volplane_tests::e2e::{ControlPlane, HostPath, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const NODE: &str = "node-0";
const PROTECTION: &str = "kubernetes.io/pvc-protection";

/// Waits until `check` resolves to true, failing after `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    volplane_tests::wait::eventually_some(limit, what, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await;
}

/// The status the kubelet writes when it rejects a pod at admission.
fn rejected() -> Value {
    json!({"phase": "Failed", "reason": "OutOfcpu",
           "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 64000, used: 0, capacity: 2000"})
}

/// A pod that ran to completion, as the kubelet reports it.
fn succeeded() -> Value {
    json!({"phase": "Succeeded", "containerStatuses": [{"name": "c", "image": "registry.invalid/none",
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": "2026-01-01T00:00:00Z"}}}]})
}

/// A pod with one generic ephemeral volume `data` of `size` in class `fast`,
/// bound to `node` directly when given (then its claim is never provisioned:
/// the class waits for the scheduler's choice).
fn pod(name: &str, size: &str, node: Option<&str>) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/none"}],
                    "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                        "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                        "resources": {"requests": {"storage": size}}}}}}]}})
}

async fn set_status(client: &kube::Client, pod: &str, status: Value) {
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch_status(pod, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
        .await
        .expect("pod status");
}

async fn claim(client: &kube::Client, name: &str) -> Option<PersistentVolumeClaim> {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get_opt(name)
        .await
        .expect("read claim")
}

async fn wait_for_claim(client: &kube::Client, name: &str) -> PersistentVolumeClaim {
    eventually_some(Duration::from_secs(60), &format!("claim {name}"), || {
        claim(client, name)
    })
    .await
}

async fn wait_gone(client: &kube::Client, name: &str, what: &str) {
    wait_until(Duration::from_secs(60), what, || async {
        claim(client, name).await.is_none()
    })
    .await;
}

/// The claim is there, not being deleted, PVC protection in place.
async fn assert_untouched(client: &kube::Client, name: &str) {
    let claim = claim(client, name).await.unwrap_or_else(|| panic!("{name} is gone"));
    assert!(claim.metadata.deletion_timestamp.is_none(), "{name}: {claim:?}");
    assert!(
        claim
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == PROTECTION),
        "{name} lost its protection"
    );
}

/// A pod created after the others whose claim exists proves the controller
/// has seen everything before it.
async fn probe(client: &kube::Client, name: &str) {
    create(
        &Api::<Pod>::namespaced(client.clone(), "default"),
        pod(name, "1Gi", Some(NODE)),
    )
    .await;
    wait_for_claim(client, &format!("{name}-data")).await;
}

/// volplane's published capacity of class `fast` on the node, in bytes.
async fn published_fast(client: &kube::Client) -> Option<i64> {
    Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .ok()?
        .items
        .into_iter()
        .find(|c| c.storage_class_name == "fast")
        .and_then(|c| parse_bytes(&c.capacity?.0))
}

async fn setup(plane: &ControlPlane) -> HostPath {
    create(
        &Api::<Namespace>::all(plane.client()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    plane.add_hostpath_node(NODE).await.expect("node");
    plane
        .start_hostpath(NODE, &[("fast", "100Gi"), ("slow", "10Gi")])
        .await
        .expect("hostpathplugin")
}

fn ephemeral(plane: &ControlPlane, release: &[&str]) -> Running {
    let mut args = vec![
        "--controllers=ephemeral",
        "--leader-election=false",
        "--namespace",
        NAMESPACE,
        "--http-endpoint",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(release);
    Running::start(plane.kubeconfig(), &args)
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_pods_volume_goes_back_to_the_driver_and_a_volume_in_use_waits_for_its_node() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    let driver = setup(&plane).await;
    let _provisioner = plane
        .start_csi_provisioner("csi-provisioner", &driver, NAMESPACE, &[])
        .expect("csi-provisioner");
    let capacity = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity",
            "--node-deployment",
            "--node-name",
            NODE,
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "node",
            "--capacity-poll-interval",
            "1s",
        ],
    );
    let mut volplane = ephemeral(&plane, &[]);
    let admin = volplane.admin_address().await;
    wait_until(Duration::from_secs(60), "100Gi published", || async {
        published_fast(&client).await == Some(100 << 30)
    })
    .await;

    // Two pods placed by the scheduler, their 10Gi volumes provisioned.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["rejected", "in-use"] {
        create(&pods, pod(name, "10Gi", None)).await;
    }
    let mut volumes = Vec::new();
    for name in ["rejected", "in-use"] {
        let pv = eventually_some(
            Duration::from_secs(90),
            &format!("{name}'s volume provisioned"),
            || async { claim(&client, &format!("{name}-data")).await?.spec?.volume_name },
        )
        .await;
        wait_until(Duration::from_secs(60), "the pod is bound", || async {
            pods.get(name).await.ok().and_then(|p| p.spec?.node_name).as_deref() == Some(NODE)
        })
        .await;
        let handle = Api::<PersistentVolume>::all(client.clone())
            .get(&pv)
            .await
            .expect("pv")
            .spec
            .and_then(|s| s.csi)
            .map(|csi| csi.volume_handle)
            .expect("a CSI volume");
        volumes.push((pv, handle));
    }
    wait_until(Duration::from_secs(60), "80Gi left", || async {
        published_fast(&client).await == Some(80 << 30)
    })
    .await;

    // The node's kubelet has one of them in use (an attachable driver would say so).
    let in_use = format!("kubernetes.io/csi/{}^{}", HostPath::DRIVER, volumes[1].1);
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"volumesInUse": [in_use]}})),
        )
        .await
        .expect("volumesInUse");
    set_status(&client, "in-use", rejected()).await;
    set_status(&client, "rejected", rejected()).await;

    // The rejected pod's claim, PV and volume go; the capacity comes back.
    wait_gone(&client, "rejected-data", "the rejected pod's claim released").await;
    wait_until(Duration::from_secs(90), "its PV deleted", || async {
        Api::<PersistentVolume>::all(client.clone())
            .get_opt(&volumes[0].0)
            .await
            .ok()
            .flatten()
            .is_none()
    })
    .await;
    wait_until(Duration::from_secs(60), "the capacity back to 90Gi", || async {
        published_fast(&client).await == Some(90 << 30)
    })
    .await;
    let note = eventually_some(Duration::from_secs(30), "the Normal event", || async {
        Api::<Event>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("EphemeralVolumeReleased")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rejected")
            })?
            .note
    })
    .await;
    assert!(note.contains("rejected-data") && note.contains("OutOfcpu"), "{note}");

    // The other waits for its node, untouched, until the node lets it go.
    wait_until(Duration::from_secs(30), "one pod waits for its node", || async {
        metric_value(admin, "volplane_ephemeral_releases_waiting", &[]) == 1.0
    })
    .await;
    assert_untouched(&client, "in-use-data").await;
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"volumesInUse": null}})),
        )
        .await
        .expect("volumesInUse");
    wait_gone(&client, "in-use-data", "released once the node stops listing it").await;
    wait_until(Duration::from_secs(90), "the capacity back to 100Gi", || async {
        published_fast(&client).await == Some(100 << 30)
    })
    .await;
    assert_eq!(
        metric_value(admin, "volplane_ephemeral_released_total", &[("reason", "rejected")]),
        2.0
    );
    for running in [volplane, capacity] {
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mode_releases_its_pods_and_never_another_claim() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    let _driver = setup(&plane).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");

    let volplane = ephemeral(&plane, &["--ephemeral-release=never"]);
    for name in ["done", "failed", "running"] {
        create(&pods, pod(name, "1Gi", Some(NODE))).await;
        wait_for_claim(&client, &format!("{name}-data")).await;
    }
    // Two finished pods whose claim names are taken: by another live pod's
    // claim (same name, other UID), and by a PVC nobody owns.
    let keeper = create(&pods, pod("keeper", "1Gi", Some(NODE))).await;
    let keeper_uid = keeper.metadata.uid.clone().expect("uid");
    let foreign_owner =
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "keeper", "uid": keeper_uid, "controller": true}]);
    for (name, owners) in [("reused", foreign_owner), ("unowned", Value::Null)] {
        create(
            &claims,
            json!({"metadata": {"name": format!("{name}-data"), "ownerReferences": owners},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                            "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
        create(&pods, pod(name, "1Gi", Some(NODE))).await;
        set_status(&client, name, rejected()).await;
    }
    set_status(&client, "done", succeeded()).await;
    set_status(&client, "failed", rejected()).await;
    set_status(&client, "running", json!({"phase": "Running"})).await;
    probe(&client, "probe-never").await;
    for claim in [
        "done-data",
        "failed-data",
        "running-data",
        "reused-data",
        "unowned-data",
    ] {
        assert_untouched(&client, claim).await;
    }
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));

    let volplane = ephemeral(&plane, &[]);
    wait_gone(
        &client,
        "failed-data",
        "rejected (the default) releases the rejected pod's claim",
    )
    .await;
    probe(&client, "probe-rejected").await;
    for claim in ["done-data", "running-data", "reused-data", "unowned-data"] {
        assert_untouched(&client, claim).await;
    }
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));

    let volplane = ephemeral(
        &plane,
        &["--ephemeral-release=terminated", "--ephemeral-release-delay=1s"],
    );
    wait_gone(&client, "done-data", "terminated releases the Succeeded pod's claim").await;
    probe(&client, "probe-terminated").await;
    for claim in ["running-data", "reused-data", "unowned-data"] {
        assert_untouched(&client, claim).await;
    }
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}

/// How long releasing the claims of this many rejected pods takes.
fn burst_size() -> usize {
    std::env::var("VOLPLANE_RELEASE_PODS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rejected_pods_give_back_every_claim() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    let _driver = setup(&plane).await;
    let volplane = ephemeral(&plane, &[]);
    let count = burst_size();
    let names: Vec<String> = (0..count).map(|i| format!("r{i:05}")).collect();
    let bodies = names
        .iter()
        .map(|name| serde_json::to_vec(&pod(name, "1Gi", Some(NODE))).expect("json"))
        .collect();
    volplane_tests::raw::create_all(&client, "/api/v1/namespaces/default/pods", bodies, 16)
        .await
        .expect("pods");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let claim_count = || async {
        claims
            .list_metadata(&ListParams::default())
            .await
            .map_or(usize::MAX, |l| l.items.len())
    };
    wait_until(Duration::from_secs(120), "every pod's claim", || async {
        claim_count().await == count
    })
    .await;
    let status = serde_json::to_vec(&json!({"status": rejected()})).expect("json");
    let requests = names
        .iter()
        .map(|name| {
            volplane_tests::raw::request(
                http::Method::PATCH,
                &format!("/api/v1/namespaces/default/pods/{name}/status"),
                "application/merge-patch+json",
                status.clone(),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .expect("requests");
    let started = Instant::now();
    let written = volplane_tests::raw::send_all(&client, requests, 16)
        .await
        .expect("statuses");
    wait_until(Duration::from_secs(300), "every claim released", || async {
        claim_count().await == 0
    })
    .await;
    let released = started.elapsed();
    println!(
        "released the claims of {count} rejected pods {:.2} s after the first status was written ({:.2} s to write them all)",
        released.as_secs_f64(),
        written.as_secs_f64()
    );
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}
