//! `volplane --controllers health` as an operator runs it: the binary
//! against the API-server double and the test CSI driver.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tempfile::TempDir;
use volplane_csi::{ControllerCapability, CsiMethod, NodeCapability};
use volplane_tests::apiserver::ApiServerDouble;
use volplane_tests::driver::{DriverConfig, TestDriver, TestVolume};
use volplane_tests::objects;
use volplane_tests::wait::{eventually, eventually_some};

use support::{Running, http_get};

const DRIVER: &str = "health.csi.volplane.dev";

async fn namespace(api: &ApiServerDouble, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(api.client())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

/// A PV of `DRIVER` bound to `apps/<claim>`, handle `h-<pv>`.
async fn bound_pv(api: &ApiServerDouble, pv: &str, claim: &str) {
    Api::<PersistentVolume>::all(api.client())
        .create(&PostParams::default(), &objects::bound_pv(pv, DRIVER, "apps", claim))
        .await
        .expect("pv");
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(api.client(), "apps")
        .create(&PostParams::default(), &objects::bound_claim(claim, "apps", pv))
        .await
        .expect("claim");
}

/// Abnormal with `abnormal`'s message, else healthy; 400 of 1000 bytes and
/// 50 of 100 inodes used.
fn volume(abnormal: Option<&str>) -> TestVolume {
    TestVolume {
        bytes: Some((600, 1000, 400)),
        inodes: Some((50, 100, 50)),
        ..abnormal.map_or_else(TestVolume::healthy, TestVolume::abnormal)
    }
}

fn kubeconfig(api: &ApiServerDouble) -> (TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).expect("kubeconfig");
    (dir, path)
}

async fn reasons(api: &ApiServerDouble) -> Vec<(String, String, String)> {
    volplane_tests::events::occurrences(&api.client(), "apps")
        .await
        .expect("events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_controller_reports_conditions_on_pvcs_under_a_lease() {
    let api = ApiServerDouble::start().await.expect("double");
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![
            ControllerCapability::ListVolumes,
            ControllerCapability::GetVolume,
            ControllerCapability::VolumeCondition,
        ],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    namespace(&api, "apps").await;
    driver.put_volume("h-pv-ok", volume(None));
    driver.put_volume("h-pv-bad", volume(Some("disk failed")));
    bound_pv(&api, "pv-ok", "ok").await;
    bound_pv(&api, "pv-bad", "bad").await;
    let (_dir, kubeconfig) = kubeconfig(&api);
    let mut running = Running::start(
        &kubeconfig,
        &[
            "--controllers",
            "health",
            "--csi-address",
            &driver.address(),
            "--http-endpoint",
            "127.0.0.1:0",
            "--health-list-interval",
            "1s",
            "--health-list-page-size",
            "1",
        ],
    );
    let admin = running.admin_address().await;
    running.wait_for("volplane is ready").await;
    let events = eventually_some(Duration::from_secs(20), "the abnormal volume is reported", || async {
        let events = reasons(&api).await;
        events
            .iter()
            .any(|(r, _, _)| r == "VolumeConditionAbnormal")
            .then_some(events)
    })
    .await;
    assert_eq!(
        events,
        [(
            "VolumeConditionAbnormal".to_string(),
            "bad".to_string(),
            "disk failed".to_string()
        )]
    );
    // One page per volume: ListVolumes with max_entries 1, followed.
    assert!(driver.count(CsiMethod::ListVolumes) >= 2);
    assert_eq!(driver.count(CsiMethod::ControllerGetVolume), 0, "the list is preferred");
    let lease: Lease = Api::namespaced(api.client(), "default")
        .get("volplane-health-health.csi.volplane.dev")
        .await
        .expect("the health lease");
    assert!(lease.spec.and_then(|s| s.holder_identity).is_some());
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        metrics.contains("volplane_health_abnormal_volumes{namespace=\"apps\",persistentvolumeclaim=\"bad\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("volplane_health_source{source=\"list_volumes\"} 1"),
        "{metrics}"
    );

    driver.put_volume("h-pv-bad", volume(None));
    eventually(Duration::from_secs(20), "the recovery is reported", || {
        let (_, metrics) = http_get(admin, "/metrics");
        metrics.contains("volplane_health_events_total{reason=\"VolumeConditionNormal\"} 1")
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    let events = reasons(&api).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[1].0, "VolumeConditionNormal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_without_volume_conditions_is_reported_once_and_the_process_stays_up() {
    let api = ApiServerDouble::start().await.expect("double");
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![ControllerCapability::ListVolumes],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    let (_dir, kubeconfig) = kubeconfig(&api);
    let mut running = Running::start(
        &kubeconfig,
        &[
            "--controllers",
            "health",
            "--csi-address",
            &driver.address(),
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    let admin = running.admin_address().await;
    let said = running.wait_for("VOLUME_CONDITION").await;
    assert!(said.contains(DRIVER) && said.contains("stay off"), "{said}");
    assert!(
        !said.contains("LIST_VOLUMES or GET_VOLUME"),
        "only what is missing: {said}"
    );
    running.wait_for("volplane is ready").await;
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let (code, seen) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(seen.iter().filter(|l| l.contains("VOLUME_CONDITION")).count(), 1);
    assert_eq!(driver.count(CsiMethod::ListVolumes), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_side_reports_usage_and_warns_the_pods_on_its_node() {
    let api = ApiServerDouble::start().await.expect("double");
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_service: false,
        controller_capabilities: vec![],
        node_capabilities: Some(vec![NodeCapability::GetVolumeStats, NodeCapability::VolumeCondition]),
        node_id: "n1".into(),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    namespace(&api, "apps").await;
    driver.put_volume("h-pv-0", volume(Some("read-only file system")));
    bound_pv(&api, "pv-0", "data").await;
    for (name, node) in [("here", "n1"), ("there", "n2")] {
        Api::<Pod>::namespaced(api.client(), "apps")
            .create(
                &PostParams::default(),
                &objects::pod_using(name, "apps", node, &["data"]),
            )
            .await
            .expect("pod");
    }
    let (_dir, kubeconfig) = kubeconfig(&api);
    let mut running = Running::start(
        &kubeconfig,
        &[
            "--controllers",
            "health",
            "--node-deployment",
            "--node-name",
            "n1",
            "--csi-address",
            &driver.address(),
            "--http-endpoint",
            "127.0.0.1:0",
            "--health-monitor-interval",
            "200ms",
            "--kubelet-dir",
            "/srv/kubelet",
        ],
    );
    let admin = running.admin_address().await;
    running.wait_for("volplane is ready").await;
    eventually(Duration::from_secs(20), "usage metrics", || {
        let (_, metrics) = http_get(admin, "/metrics");
        metrics.contains(
            "volplane_health_volume_bytes{namespace=\"apps\",persistentvolumeclaim=\"data\",usage=\"available\"} 600",
        )
    })
    .await;
    let events = eventually_some(Duration::from_secs(20), "the pod is warned", || async {
        let events = reasons(&api).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].0, "VolumeConditionAbnormal");
    assert_eq!(events[0].1, "here", "only the pod on this node");
    assert!(events[0].2.contains("read-only file system"), "{}", events[0].2);
    let paths: Vec<String> = driver.volume_stats_paths();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with("/srv/kubelet/pods/") && p.ends_with("/volumes/kubernetes.io~csi/pv-0/mount")),
        "{paths:?}"
    );
    let leases: Api<Lease> = Api::all(api.client());
    assert!(
        leases
            .list(&ListParams::default())
            .await
            .expect("leases")
            .items
            .is_empty(),
        "per-node instances do not elect"
    );
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
}
