//! e2e: every kustomization in deploy/ rendered and applied with the shipped
//! kubectl on a real control plane, the volplane binary running with the
//! ServiceAccount tokens it creates (not admin), and every kubectl
//! go-template in README.md and deploy/README.md run against what it wrote.
//! Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::Running;
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, TestVolume, labels};
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const DRIVER: &str = "e2e-rbac.csi.volplane.dev";
const HEALTH_DRIVER: &str = "e2e-rbac-health.csi.volplane.dev";
const KEY: &str = "topology.volplane.dev/zone";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

async fn client_of(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    kube::Client::try_from(config).expect("client")
}

/// Every directory of deploy/ (the top one included) with a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    let root = deploy("");
    let mut found: Vec<PathBuf> = std::iter::once(root.clone())
        .chain(std::fs::read_dir(&root).expect("deploy/").flatten().map(|e| e.path()))
        .filter(|dir| dir.join("kustomization.yaml").is_file())
        .collect();
    // The namespaces first (deploy/ itself and node-namespace/), as README says.
    found.sort_by_key(|dir| (dir != &root && !dir.ends_with("node-namespace"), dir.clone()));
    assert!(found.len() > 5, "kustomizations: {found:?}");
    found
}

/// Every `kubectl … go-template=…` command line in the READMEs.
fn readme_templates() -> Vec<String> {
    ["../README.md", "../deploy/README.md"]
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).expect(file);
            text.lines()
                .map(str::trim)
                .filter(|line| line.starts_with("kubectl ") && line.contains("go-template="))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What each README template must print here, by a word of its command.
fn expected_output(command: &str) -> &'static [&'static str] {
    if command.contains("get leases -n volplane volplane-ephemeral") {
        &["volplane-ephemeral-e2e_"]
    } else if command.contains("get flowschemas") {
        &["volplane\tvolplane\n", "volplane-leader-election\tleader-election\n"]
    } else if command.contains("get leases") {
        &[
            "volplane-ephemeral\tvolplane-ephemeral-e2e_",
            "volplane-capacity-e2e-rbac.csi.volplane.dev\t",
        ]
    } else if command.contains("get csistoragecapacities") {
        // The capacity as Kubernetes writes it: 1 GiB is `1Gi` (the
        // driver's 2 GiB less the 1 GiB of the claim placed in flight).
        &["\te2e-rbac\ttopology.volplane.dev/zone=a \t1Gi\t"]
    } else if command.contains("events") && command.contains("volplane-health") {
        &["default/health\tVolumeConditionAbnormal\te2e: disk failed\n"]
    } else if command.contains("health.volplane.dev/abnormal") {
        &["e2e-rbac-health\t"]
    } else {
        &[]
    }
}

/// Runs each README go-template with the shipped kubectl, as a user would
/// paste it into a shell, and checks what it prints.
fn check_readme_templates(plane: &ControlPlane) {
    let templates = readme_templates();
    assert!(templates.len() >= 4, "README templates: {templates:?}");
    let path = format!(
        "{}:{}",
        plane.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for command in templates {
        let expected = expected_output(&command);
        assert!(!expected.is_empty(), "no expected output for README's {command}");
        let output = std::process::Command::new("sh")
            .args(["-c", &command])
            .env("PATH", &path)
            .env("KUBECONFIG", plane.kubeconfig())
            .output()
            .expect("sh");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in expected {
            assert!(
                stdout.contains(line),
                "{command}\nprinted:\n{stdout}\nmissing: {line:?}"
            );
        }
    }
}

/// deploy/monitoring's ServiceMonitors and PrometheusRule need the
/// Prometheus Operator's kinds: stand-ins that accept any spec, so that
/// `kubectl apply -k deploy/monitoring` is judged on everything else (the
/// Services, names, namespaces). The rules themselves are checked by
/// promtool and a real Prometheus (e2e_monitoring).
fn stand_in_prometheus_operator_kinds(plane: &ControlPlane) {
    let definitions: Vec<String> = [("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules")]
        .iter()
        .map(|(kind, plural)| {
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
                "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                    "versions": [{"name": "v1", "served": true, "storage": true,
                        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}})
            .to_string()
        })
        .collect();
    let file = plane
        .scratch("prometheus-operator-kinds")
        .expect("scratch")
        .join("crds.json");
    let list = format!(
        r#"{{"apiVersion": "v1", "kind": "List", "items": [{}]}}"#,
        definitions.join(",")
    );
    std::fs::write(&file, list).expect("write");
    plane
        .kubectl_ok(&["apply", "-f", &file.display().to_string()])
        .expect("CRDs");
    plane
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ])
        .expect("CRDs established");
}

fn is_forbidden<T: std::fmt::Debug>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volplane_works_with_the_deploy_rbac_and_nothing_more() {
    let bin_dir = bin_dir();
    let plane = ControlPlane::start(&bin_dir).await.expect("control plane starts");
    let admin = plane.client();
    stand_in_prometheus_operator_kinds(&plane);
    for kustomization in kustomizations() {
        let dir = kustomization.to_string_lossy().into_owned();
        let rendered = plane.kubectl_ok(&["kustomize", &dir]).expect("kubectl kustomize");
        assert!(rendered.contains("kind: "), "{dir} renders to nothing");
        if dir.ends_with("control-plane") {
            for wanted in [
                "node-role.kubernetes.io/control-plane",
                "system-cluster-critical",
                "serviceAccountName: volplane-ephemeral",
            ] {
                assert!(rendered.contains(wanted), "{dir}: no {wanted} in\n{rendered}");
            }
        }
        plane.kubectl_ok(&["apply", "-k", &dir]).expect("kubectl apply -k");
    }
    volplane_tests::objects::create(
        &Api::<CSIDriver>::all(admin.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}),
    )
    .await;
    let storage_class: StorageClass = serde_json::from_value(
        json!({"metadata": {"name": "e2e-rbac"}, "provisioner": DRIVER, "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .expect("class");
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &storage_class)
        .await
        .expect("class");
    plane
        .add_node("n1", &labels([(KEY, "a")]), Some((DRIVER, &[KEY])))
        .await
        .expect("node");

    // Ephemeral, as the volplane-ephemeral ServiceAccount.
    let ephemeral_kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-ephemeral")
        .await
        .expect("token");
    let mut ephemeral = Running::start(
        &ephemeral_kubeconfig,
        &[
            "--controllers=ephemeral",
            "--namespace",
            NAMESPACE,
            "--pod-name",
            "volplane-ephemeral-e2e",
        ],
    );
    ephemeral.wait_for("started leading").await;
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "e2e-rbac"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                 "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                     "accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-rbac",
                     "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
    .expect("pod");
    Api::<Pod>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), "default");
    let claim = eventually_some(Duration::from_secs(60), "the ephemeral claim", || {
        let claims = claims.clone();
        async move { claims.get("e2e-rbac-data").await.ok() }
    })
    .await;

    // Capacity, as the volplane-capacity ServiceAccount.
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    // 2 GiB, less the placed claim's 1 GiB.
    driver.set_default_capacity(CapacityAnswer::available(2 << 30));
    let capacity_kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-capacity")
        .await
        .expect("token");
    let mut capacity = Running::start(
        &capacity_kubeconfig,
        &[
            "--controllers=capacity",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "none",
        ],
    );
    capacity.wait_for("started leading").await;
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(admin.clone(), NAMESPACE);
    eventually_some(Duration::from_secs(60), "a CSIStorageCapacity", || {
        let capacities = capacities.clone();
        async move {
            let items = capacities.list(&ListParams::default()).await.ok()?.items;
            items.into_iter().find(|c| c.storage_class_name == "e2e-rbac")
        }
    })
    .await;
    // Then kube-scheduler places the ephemeral claim (no provisioner runs, so it stays in flight):
    // its 1Gi is reserved in what volplane publishes for its segment.
    eventually_some(Duration::from_secs(60), "the ephemeral claim placed", || {
        let claims = claims.clone();
        async move {
            let claim = claims.get("e2e-rbac-data").await.ok()?;
            claim
                .metadata
                .annotations?
                .get("volume.kubernetes.io/selected-node")
                .map(|_| ())
        }
    })
    .await;

    // Writes outside the grants are refused by the API server.
    let as_capacity = client_of(&capacity_kubeconfig).await;
    let mut elsewhere: CSIStorageCapacity = serde_json::from_value(json!({"metadata": {"generateName": "csisc-"},
        "storageClassName": "e2e-rbac", "capacity": "1Gi"}))
    .expect("object");
    elsewhere.metadata.namespace = Some("default".into());
    let refused = Api::<CSIStorageCapacity>::namespaced(as_capacity.clone(), "default")
        .create(&PostParams::default(), &elsewhere)
        .await;
    assert!(
        is_forbidden(&refused),
        "CSIStorageCapacity outside its namespace: {refused:?}"
    );
    let as_ephemeral = client_of(&ephemeral_kubeconfig).await;
    let refused = Api::<PersistentVolumeClaim>::namespaced(as_ephemeral, "default")
        .replace("e2e-rbac-data", &PostParams::default(), &claim)
        .await;
    assert!(is_forbidden(&refused), "updating a PVC: {refused:?}");
    let refused = Api::<Pod>::namespaced(as_capacity, "default")
        .delete("e2e-rbac", &Default::default())
        .await;
    assert!(is_forbidden(&refused), "deleting a pod: {refused:?}");

    // Health, as the volplane-health ServiceAccount: a pre-provisioned
    // volume the driver reports abnormal, bound by kube-controller-manager.
    let health_driver = TestDriver::start(DriverConfig {
        name: HEALTH_DRIVER.into(),
        controller_capabilities: vec![
            volplane_csi::ControllerCapability::ListVolumes,
            volplane_csi::ControllerCapability::VolumeCondition,
        ],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    health_driver.put_volume("vol-health", TestVolume::abnormal("e2e: disk failed"));
    let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "e2e-rbac-health"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "csi": {"driver": HEALTH_DRIVER, "volumeHandle": "vol-health"},
                 "claimRef": {"namespace": "default", "name": "health"}}}))
    .expect("pv");
    Api::<PersistentVolume>::all(admin.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("pv");
    let health_claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "health"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "e2e-rbac-health",
                 "resources": {"requests": {"storage": "1Gi"}}}}))
    .expect("claim");
    claims
        .create(&PostParams::default(), &health_claim)
        .await
        .expect("claim");
    let health_kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-health")
        .await
        .expect("token");
    let mut health = Running::start(
        &health_kubeconfig,
        &[
            "--controllers=health",
            "--csi-address",
            &health_driver.address(),
            "--namespace",
            NAMESPACE,
            "--health-list-interval",
            "1s",
            "--health-node-watcher",
        ],
    );
    health.wait_for("started leading").await;
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    eventually_some(Duration::from_secs(60), "VolumeConditionAbnormal on the claim", || {
        let events = events.clone();
        async move {
            let items = events.list(&ListParams::default()).await.ok()?.items;
            items.into_iter().find(|e| {
                e.reason.as_deref() == Some("VolumeConditionAbnormal")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("health")
            })
        }
    })
    .await;
    let as_health = client_of(&health_kubeconfig).await;
    let refused = Api::<PersistentVolume>::all(as_health)
        .delete("e2e-rbac-health", &Default::default())
        .await;
    assert!(is_forbidden(&refused), "deleting a PV: {refused:?}");
    eventually_some(Duration::from_secs(30), "the abnormal annotation on the PV", || {
        let pvs: Api<PersistentVolume> = Api::all(admin.clone());
        async move {
            let pv = pvs.get("e2e-rbac-health").await.ok()?;
            pv.metadata
                .annotations?
                .get(volplane_health::model::ABNORMAL_ANNOTATION)
                .cloned()
        }
    })
    .await;
    check_readme_templates(&plane);

    for running in [ephemeral, capacity, health] {
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
        assert!(
            !lines.iter().any(|l| l.contains("Forbidden") || l.contains("forbidden")),
            "volplane hit a permission error:\n{}",
            lines.join("\n")
        );
    }
}
