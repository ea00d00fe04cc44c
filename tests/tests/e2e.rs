//! End-to-end tests against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler). Skipped with a message unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::json;
use volplane_tests::background::Background;
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::wait::eventually_some as eventually;

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_serves_namespaces_and_schedules_pods() {
    let bin_dir = bin_dir();
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

mod capacity {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::api::storage::v1::CSIStorageCapacity;
    use kube::api::ListParams;
    use volplane_capacity::model::{Enablement, ObjectIdentity};
    use volplane_capacity::{CapacityConfig, CapacityController, CapacityMetrics, Topology};
    use volplane_runtime::Backoff;
    use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, labels};

    use super::*;

    const DRIVER: &str = "e2e.csi.volplane.dev";
    const KEY: &str = "topology.volplane.dev/zone";

    use volplane_tests::objects::create;

    fn claim_and_pod(name: &str, size: &str) -> (serde_json::Value, serde_json::Value) {
        (
            json!({"metadata": {"name": name},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-wffc",
                            "resources": {"requests": {"storage": size}}}}),
            json!({"metadata": {"name": name},
                   "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}}),
        )
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_scheduler_places_pods_only_where_published_capacity_fits() {
        let bin_dir = bin_dir();
        let plane = ControlPlane::start(&bin_dir).await.expect("control plane starts");
        let client = plane.client();
        let ns = "e2e-capacity";
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": ns}}),
        )
        .await;
        volplane_tests::objects::tracked_driver_with_class(&client, DRIVER, "e2e-wffc").await;
        for node in ["small", "big"] {
            plane
                .add_node(node, &labels([(KEY, node)]), Some((DRIVER, &[KEY])))
                .await
                .expect("node");
        }

        let driver = TestDriver::start(DriverConfig {
            name: DRIVER.into(),
            ..DriverConfig::default()
        })
        .await
        .expect("driver");
        driver.set_capacity(Some(labels([(KEY, "small")])), None, CapacityAnswer::available(1 << 30));
        driver.set_capacity(Some(labels([(KEY, "big")])), None, CapacityAnswer::available(10 << 30));
        let mut registry = prometheus_client::registry::Registry::default();
        let controller = CapacityController::new(
            client.clone(),
            driver.client(Duration::from_secs(5)),
            CapacityConfig {
                driver: DRIVER.into(),
                send_topology: true,
                topology: Topology::Central,
                volume_events: true,
                identity: ObjectIdentity {
                    namespace: ns.into(),
                    driver: DRIVER.into(),
                    managed_by: "volplane".into(),
                    owner: None,
                },
                poll_interval: Duration::from_secs(60),
                workers: 4,
                include_immediate: false,
                enablement: Enablement::CsiDriver,
                backoff: Backoff {
                    base: Duration::from_millis(200),
                    max: Duration::from_secs(5),
                },
                event_target: None,
                instance: "e2e".into(),
                adopt_from: None,
                node_placements: None,
            },
            Arc::new(CapacityMetrics::register(&mut registry)),
            volplane_runtime::Leadership::unconditional(),
        );
        let running = Background::spawn(|shutdown| controller.run(shutdown));

        let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), ns);
        eventually(Duration::from_secs(60), "two CSIStorageCapacity objects", || {
            let capacities = capacities.clone();
            async move {
                let items = capacities.list(&ListParams::default()).await.ok()?.items;
                (items.len() == 2).then_some(())
            }
        })
        .await;

        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (claim, pod) = claim_and_pod("fits-big", "5Gi");
        create(&claims, claim).await;
        create(&pods, pod).await;
        // With late binding the scheduler records its choice on the claim.
        let selected = volplane_tests::objects::selected_node(&claims, "fits-big").await;
        assert_eq!(selected, "big", "5Gi only fits the node with 10Gi");

        let (claim, pod) = claim_and_pod("fits-nowhere", "50Gi");
        create(&claims, claim).await;
        create(&pods, pod).await;
        let message = eventually(Duration::from_secs(90), "the pod is unschedulable", || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("fits-nowhere").await.ok()?;
                let condition = pod
                    .status?
                    .conditions?
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
                condition.message
            }
        })
        .await;
        assert!(message.contains("did not have enough free storage"), "{message}");
        let pod = pods.get("fits-nowhere").await.expect("pod");
        assert_eq!(pod.spec.and_then(|s| s.node_name), None);

        running.stop(Duration::from_secs(20)).await.expect("controller result");
    }
}

mod ephemeral {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::api::DeleteParams;
    use volplane_ephemeral::{EphemeralConfig, EphemeralController, EphemeralMetrics};
    use volplane_tests::objects::create;

    use super::*;

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ephemeral_volume_gets_its_claim_is_scheduled_and_is_collected_with_the_pod() {
        let bin_dir = bin_dir();
        let plane = ControlPlane::start(&bin_dir).await.expect("control plane starts");
        let client = plane.client();
        let running = start_ephemeral(&plane).await;

        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "seed"},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                     "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
                         "accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-wffc",
                         "resources": {"requests": {"storage": "4Gi"}}}}}}]}}))
        .expect("pod");
        let pod = pods.create(&PostParams::default(), &pod).await.expect("pod");

        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let claim = eventually(Duration::from_secs(60), "the claim seed-scratch", || {
            let claims = claims.clone();
            async move { claims.get("seed-scratch").await.ok() }
        })
        .await;
        let owner = claim.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owner.len(), 1);
        assert_eq!(Some(&owner[0].uid), pod.metadata.uid.as_ref());
        // The scheduler accepted the pod and picked a node for the late-bound claim.
        let selected = volplane_tests::objects::selected_node(&claims, "seed-scratch").await;
        assert_eq!(selected, "node-1");

        // Stop volplane first so only the garbage collector can act.
        running.stop(Duration::from_secs(20)).await.expect("controller result");
        pods.delete("seed", &DeleteParams::default().grace_period(0))
            .await
            .expect("delete pod");
        eventually(Duration::from_secs(120), "the claim is garbage-collected", || {
            let claims = claims.clone();
            async move { claims.get("seed-scratch").await.is_err().then_some(()) }
        })
        .await;
    }
    /// A node, the WaitForFirstConsumer class `e2e-wffc`, and volplane's
    /// ephemeral controller running in the background.
    async fn start_ephemeral(plane: &ControlPlane) -> Background<Result<(), volplane_ephemeral::Error>> {
        let client = plane.client();
        plane.add_node("node-1", &BTreeMap::new(), None).await.expect("node");
        create(
            &Api::<StorageClass>::all(client.clone()),
            json!({"metadata": {"name": "e2e-wffc"}, "provisioner": "e2e.csi.volplane.dev",
                   "volumeBindingMode": "WaitForFirstConsumer"}),
        )
        .await;
        let mut registry = prometheus_client::registry::Registry::default();
        let controller = EphemeralController::new(
            client,
            EphemeralConfig {
                workers: 8,
                instance: "e2e".into(),
                backoff: volplane_runtime::Backoff {
                    base: Duration::from_millis(200),
                    max: Duration::from_secs(300),
                },
                release: volplane_ephemeral::ReleaseMode::default(),
                release_delay: Duration::from_secs(60),
                create_delay: Duration::ZERO,
            },
            Arc::new(EphemeralMetrics::register(&mut registry)),
            volplane_runtime::Leadership::unconditional(),
        );
        Background::spawn(|shutdown| controller.run(shutdown))
    }

    /// volplane's events in `namespace`: (type, reason, regarding, note).
    async fn volplane_events(client: &kube::Client, namespace: &str) -> Vec<(String, String, String, String)> {
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), namespace)
            .list(&kube::api::ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.reporting_controller.as_deref() == Some("volplane-ephemeral"))
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    fn ephemeral_pod(name: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                     "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {
                         "metadata": {"labels": {"app": "e2e"}},
                         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-wffc",
                                  "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
        .expect("pod")
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beside_the_controller_managers_own_controller_each_pod_gets_one_claim_and_a_foreign_claim_is_left_alone() {
        let options = volplane_tests::e2e::Options {
            kcm_ephemeral: true,
            ..Default::default()
        };
        let plane = ControlPlane::start_with(&bin_dir(), options)
            .await
            .expect("control plane starts");
        let client = plane.client();
        let running = start_ephemeral(&plane).await;

        // A claim that belongs to no pod, and a pod whose volume would be it.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let foreign: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "foreign-data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e-wffc",
                     "resources": {"requests": {"storage": "2Gi"}}}}))
        .expect("claim");
        let foreign = claims.create(&PostParams::default(), &foreign).await.expect("claim");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let mut created = Vec::new();
        for i in 0..20 {
            created.push(
                pods.create(&PostParams::default(), &ephemeral_pod(&format!("pod-{i}")))
                    .await
                    .expect("pod"),
            );
        }
        pods.create(&PostParams::default(), &ephemeral_pod("foreign"))
            .await
            .expect("pod");

        for pod in &created {
            let name = format!("{}-data", pod.metadata.name.as_deref().unwrap_or_default());
            let claim = eventually(Duration::from_secs(60), "every pod's claim", || {
                let claims = claims.clone();
                let name = name.clone();
                async move { claims.get(&name).await.ok() }
            })
            .await;
            let owners = claim.metadata.owner_references.unwrap_or_default();
            assert_eq!(owners.len(), 1, "{name}: {owners:?}");
            let owner = &owners[0];
            assert_eq!(
                (
                    owner.api_version.as_str(),
                    owner.kind.as_str(),
                    Some(&owner.name),
                    Some(&owner.uid)
                ),
                ("v1", "Pod", pod.metadata.name.as_ref(), pod.metadata.uid.as_ref())
            );
            assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
            assert_eq!(
                claim.metadata.labels.unwrap_or_default().get("app").map(String::as_str),
                Some("e2e")
            );
        }
        let warning = eventually(
            Duration::from_secs(60),
            "a Warning on the pod of the foreign claim",
            || {
                let client = client.clone();
                async move {
                    volplane_events(&client, "default")
                        .await
                        .into_iter()
                        .find(|(type_, _, regarding, _)| type_ == "Warning" && regarding == "foreign")
                }
            },
        )
        .await;
        assert!(warning.3.contains("foreign-data"), "{warning:?}");

        // Nothing else: one claim per pod (no generateName twins), the foreign
        // claim untouched, and no Warning about the pods both controllers served.
        let all = claims
            .list(&kube::api::ListParams::default())
            .await
            .expect("claims")
            .items;
        assert_eq!(
            all.len(),
            created.len() + 1,
            "{:?}",
            all.iter().map(|c| &c.metadata.name).collect::<Vec<_>>()
        );
        let untouched = claims.get("foreign-data").await.expect("foreign claim");
        assert_eq!(untouched.metadata.resource_version, foreign.metadata.resource_version);
        assert_eq!(untouched.metadata.owner_references, None);
        let spurious: Vec<_> = volplane_events(&client, "default")
            .await
            .into_iter()
            .filter(|(type_, _, regarding, _)| type_ == "Warning" && regarding != "foreign")
            .collect();
        assert!(spurious.is_empty(), "{spurious:?}");
        running.stop(Duration::from_secs(20)).await.expect("controller result");
    }

    /// A denial message far beyond an event note, in scripts where a byte
    /// cut falls inside a character; one line (policies forbid line breaks).
    fn long_denial() -> String {
        let mut message = String::from("Abgelehnt durch Richtlinie: ");
        while message.len() < 4000 {
            message.push_str("größer als erlaubt — 容量不足 — קיבולת — 🦀 ");
        }
        message
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_an_admission_policy_rejects_with_a_long_message_warns_its_pod_and_others_are_served() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        let message = long_denial();
        let policies = plane.scratch("policies").expect("scratch");
        let manifest = policies.join("deny.json");
        let deny = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
             "metadata": {"name": "deny-rejected"},
             "spec": {"failurePolicy": "Fail",
                      "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                          "operations": ["CREATE"], "resources": ["persistentvolumeclaims"]}]},
                      "validations": [{"expression": "!object.metadata.name.startsWith('rejected')",
                                       "message": message}]}},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
             "metadata": {"name": "deny-rejected"},
             "spec": {"policyName": "deny-rejected", "validationActions": ["Deny"]}}]});
        std::fs::write(&manifest, deny.to_string()).expect("write the policy");
        plane
            .kubectl_ok(&["apply", "-f", &manifest.to_string_lossy()])
            .expect("apply the policy");
        // Policies take effect asynchronously: wait until one denies.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let probe: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"generateName": "rejected-probe-"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
            .expect("claim");
        let denial = eventually(Duration::from_secs(30), "the policy denies", || {
            let claims = claims.clone();
            let probe = probe.clone();
            async move {
                match claims.create(&PostParams::default(), &probe).await {
                    Err(kube::Error::Api(status)) if status.message.contains("denied request") => Some(status.message),
                    _ => None,
                }
            }
        })
        .await;
        assert!(
            denial.len() > 4000,
            "the API server passes the whole message on: {}",
            denial.len()
        );

        let running = start_ephemeral(&plane).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        pods.create(&PostParams::default(), &ephemeral_pod("rejected"))
            .await
            .expect("pod");
        pods.create(&PostParams::default(), &ephemeral_pod("accepted"))
            .await
            .expect("pod");
        let warning = eventually(Duration::from_secs(60), "a Warning on the rejected pod", || {
            let client = client.clone();
            async move {
                volplane_events(&client, "default")
                    .await
                    .into_iter()
                    .find(|(type_, _, regarding, _)| type_ == "Warning" && regarding == "rejected")
            }
        })
        .await;
        let note = warning.3;
        assert!(note.len() <= 1024, "{} bytes", note.len());
        assert!(
            note.contains("rejected-data") && note.contains("Abgelehnt durch Richtlinie"),
            "{note}"
        );
        assert!(note.ends_with(volplane_runtime::text::CUT_MARKER), "{note}");

        // The controller is still up and serving: this pod's claim, and a later one's.
        for name in ["accepted", "later"] {
            if name == "later" {
                pods.create(&PostParams::default(), &ephemeral_pod(name))
                    .await
                    .expect("pod");
            }
            let claim = format!("{name}-data");
            eventually(Duration::from_secs(60), "the other pods' claims", || {
                let claims = claims.clone();
                let claim = claim.clone();
                async move { claims.get(&claim).await.ok() }
            })
            .await;
        }
        assert!(claims.get("rejected-data").await.is_err(), "the policy let it through");
        running.stop(Duration::from_secs(20)).await.expect("controller result");
    }
}

mod health {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    use volplane_csi::ControllerCapability;
    use volplane_health::model::{
        ABNORMAL_ANNOTATION, REASON_ABNORMAL, REASON_NODE_FAILED, REASON_NODE_RECOVERED, REASON_NORMAL,
    };
    use volplane_health::{HealthConfig, HealthController, HealthMetrics, Source};
    use volplane_tests::driver::{DriverConfig, TestDriver, TestVolume};

    use super::*;

    const DRIVER: &str = "e2e-health.csi.volplane.dev";
    const NS: &str = "e2e-health";

    /// (reason, regarding name, note) of every occurrence of an event in
    /// the namespace; none while the API server does not answer.
    async fn events(client: &kube::Client) -> Vec<(String, String, String)> {
        volplane_tests::events::occurrences(client, NS)
            .await
            .unwrap_or_default()
    }

    async fn wait_for_event(client: &kube::Client, reason: &str, what: &str) -> (String, String, String) {
        eventually(Duration::from_secs(60), what, || {
            let client = client.clone();
            let reason = reason.to_string();
            async move { events(&client).await.into_iter().find(|(r, _, _)| *r == reason) }
        })
        .await
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_volume_condition_and_a_failed_node_become_events_on_the_claim() {
        let bin_dir = bin_dir();
        let plane = ControlPlane::start(&bin_dir).await.expect("control plane starts");
        let client = plane.client();
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace");
        plane.add_node("node-1", &BTreeMap::new(), None).await.expect("node");

        // A pre-provisioned PV and its claim: kube-controller-manager binds them.
        let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "e2e-health-pv"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain",
                     "csi": {"driver": DRIVER, "volumeHandle": "vol-1"},
                     "claimRef": {"namespace": NS, "name": "data"}}}))
        .expect("pv");
        Api::<PersistentVolume>::all(client.clone())
            .create(&PostParams::default(), &pv)
            .await
            .expect("pv");
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "e2e-health-pv",
                     "resources": {"requests": {"storage": "1Gi"}}}}))
        .expect("claim");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        claims.create(&PostParams::default(), &claim).await.expect("claim");
        eventually(Duration::from_secs(60), "the PV is bound", || {
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            async move {
                let pv = pvs.get("e2e-health-pv").await.ok()?;
                (pv.status?.phase.as_deref() == Some("Bound")).then_some(())
            }
        })
        .await;
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "user"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.invalid/none"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}))
        .expect("pod");
        Api::<Pod>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &pod)
            .await
            .expect("pod");

        let driver = TestDriver::start(DriverConfig {
            name: DRIVER.into(),
            controller_capabilities: vec![ControllerCapability::ListVolumes, ControllerCapability::VolumeCondition],
            ..DriverConfig::default()
        })
        .await
        .expect("driver");
        driver.put_volume("vol-1", TestVolume::abnormal("e2e: disk failed"));
        let mut registry = prometheus_client::registry::Registry::default();
        let controller = HealthController::new(
            client.clone(),
            driver.client(Duration::from_secs(5)),
            HealthConfig {
                driver: DRIVER.into(),
                source: Source::ListVolumes {
                    interval: Duration::from_millis(500),
                    page_size: 100,
                },
                fallback: None,
                node_failure_threshold: Some(Duration::from_secs(2)),
                instance: "e2e".into(),
            },
            Arc::new(HealthMetrics::register(&mut registry)),
            volplane_runtime::Leadership::unconditional(),
        );
        let running = Background::spawn(|shutdown| controller.run(shutdown));

        let (_, regarding, note) =
            wait_for_event(&client, REASON_ABNORMAL, "VolumeConditionAbnormal on the claim").await;
        assert_eq!((regarding.as_str(), note.as_str()), ("data", "e2e: disk failed"));
        eventually(Duration::from_secs(30), "the PV annotation", || {
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            async move {
                let pv = pvs.get("e2e-health-pv").await.ok()?;
                pv.metadata.annotations?.get(ABNORMAL_ANNOTATION).cloned()
            }
        })
        .await;

        driver.put_volume("vol-1", TestVolume::healthy());
        let (_, regarding, _) = wait_for_event(&client, REASON_NORMAL, "VolumeConditionNormal on the claim").await;
        assert_eq!(regarding, "data");

        // The node stops reporting: past the threshold, NodeFailed on the
        // claim its pod uses; back to Ready, NodeRecovered.
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        plane
            .set_node_ready("node-1", "Unknown", "NodeStatusUnknown", an_hour_ago)
            .await
            .expect("node unknown");
        let (_, regarding, note) = wait_for_event(&client, REASON_NODE_FAILED, "NodeFailed on the claim").await;
        assert_eq!(regarding, "data");
        assert!(
            note.contains("node-1") && note.contains(&format!("{NS}/user")),
            "{note}"
        );
        plane
            .set_node_ready("node-1", "True", "KubeletReady", std::time::SystemTime::now())
            .await
            .expect("node ready");
        wait_for_event(&client, REASON_NODE_RECOVERED, "NodeRecovered on the claim").await;

        running.stop(Duration::from_secs(20)).await;
        let reasons: Vec<String> = events(&client).await.into_iter().map(|(r, _, _)| r).collect();
        for reason in [
            REASON_ABNORMAL,
            REASON_NORMAL,
            REASON_NODE_FAILED,
            REASON_NODE_RECOVERED,
        ] {
            assert_eq!(
                reasons.iter().filter(|r| *r == reason).count(),
                1,
                "{reason} once: {reasons:?}"
            );
        }
    }
}
