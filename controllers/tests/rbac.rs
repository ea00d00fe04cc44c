//! The RBAC in deploy/ covers every request volplane makes. The requests
//! are not listed by hand: each deployment in deploy/ is run as written
//! (its args and downward-API env) against the API-server double, driven
//! through its write paths, and every request the double logged from
//! volplane is checked against the rules bound to that deployment's
//! ServiceAccount.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use support::Running;
use volplane_tests::apiserver::{ApiServerDouble, RequestRecord, Verb};
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver};
use volplane_tests::wait::eventually;

/// The namespace deploy/ installs into.
const NAMESPACE: &str = "volplane";
const DRIVER: &str = "rbac.csi.volplane.dev";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// The rules bound to `account`: cluster-wide ones, and those of Roles in
/// the install namespace.
struct Grants {
    cluster: Vec<PolicyRule>,
    namespaced: Vec<PolicyRule>,
}

impl Grants {
    fn of(rbac_file: &str, account: &str) -> Self {
        let docs = documents(&deploy(rbac_file));
        let bound = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == account)
        };
        let cluster_roles: Vec<ClusterRole> = of_kind(&docs, "ClusterRole");
        let roles: Vec<Role> = of_kind(&docs, "Role");
        let mut grants = Self {
            cluster: Vec::new(),
            namespaced: Vec::new(),
        };
        for binding in of_kind::<ClusterRoleBinding>(&docs, "ClusterRoleBinding") {
            if bound(&binding.subjects) {
                let role = cluster_roles
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(&binding.role_ref.name))
                    .unwrap_or_else(|| panic!("ClusterRole {} is missing", binding.role_ref.name));
                grants.cluster.extend(role.rules.clone().unwrap_or_default());
            }
        }
        for binding in of_kind::<RoleBinding>(&docs, "RoleBinding") {
            if bound(&binding.subjects) {
                let role = roles
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(&binding.role_ref.name))
                    .unwrap_or_else(|| panic!("Role {} is missing", binding.role_ref.name));
                grants.namespaced.extend(role.rules.clone().unwrap_or_default());
            }
        }
        assert!(
            !grants.cluster.is_empty(),
            "{account} has no cluster rules in {rbac_file}"
        );
        grants
    }

    fn allows(&self, request: &RequestRecord) -> bool {
        let verb = verb_name(request.verb);
        let resource = match &request.subresource {
            Some(sub) => format!("{}/{sub}", request.resource),
            None => request.resource.clone(),
        };
        let matches = |rule: &PolicyRule| {
            let any =
                |list: &Option<Vec<String>>, want: &str| list.iter().flatten().any(|item| item == "*" || item == want);
            any(&rule.api_groups, &request.group)
                && any(&rule.resources, &resource)
                && rule.verbs.iter().any(|v| v == "*" || v == verb)
        };
        self.cluster.iter().any(matches)
            || (request.namespace.as_deref() == Some(NAMESPACE) && self.namespaced.iter().any(matches))
    }
}

fn verb_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::Patch => "patch",
        Verb::Delete => "delete",
        Verb::DeleteCollection => "deletecollection",
    }
}

/// The pod template of the one Deployment or DaemonSet in `file`, and
/// the ServiceAccount it runs as.
fn workload(file: &str) -> (PodSpec, String) {
    let docs = documents(&deploy(file));
    let template = of_kind::<Deployment>(&docs, "Deployment")
        .into_iter()
        .filter_map(|d| d.spec.map(|s| s.template))
        .chain(
            of_kind::<DaemonSet>(&docs, "DaemonSet")
                .into_iter()
                .filter_map(|d| d.spec.map(|s| s.template)),
        )
        .next()
        .unwrap_or_else(|| panic!("{file}: no Deployment or DaemonSet"));
    let spec = template.spec.expect("pod spec");
    let account = spec.service_account_name.clone().expect("service account");
    (spec, account)
}

/// The volplane container of a workload manifest.
fn volplane_container(spec: &PodSpec) -> Container {
    spec.containers
        .iter()
        .find(|c| c.image.as_deref().is_some_and(|i| i.starts_with("volplane")))
        .cloned()
        .expect("a volplane container")
}

/// Starts the container as written, with the test driver's socket, a local
/// admin port and the downward-API values a kubelet would fill in.
fn run_as_deployed(kubeconfig: &Path, container: &Container, csi: Option<&str>, pod: &str) -> Running {
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|arg| match arg.split_once('=') {
            Some(("--csi-address", _)) => format!("--csi-address={}", csi.expect("a CSI driver")),
            Some(("--http-endpoint", _)) => "--http-endpoint=127.0.0.1:0".to_string(),
            _ => arg,
        })
        .collect();
    let mut command = support::volplane();
    command.arg("--kubeconfig").arg(kubeconfig).args(&args);
    for env in container.env.iter().flatten() {
        let field = env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = match field {
            Some("metadata.namespace") => NAMESPACE.to_string(),
            Some("metadata.name") => pod.to_string(),
            Some("spec.nodeName") => "n1".to_string(),
            _ => env.value.clone().unwrap_or_default(),
        };
        command.env(&env.name, value);
    }
    Running::spawn(command)
}

async fn create(client: &kube::Client, api_version: &str, kind: &str, plural: &str, object: Value) {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
    let object: DynamicObject = serde_json::from_value(object).expect("object");
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.create(&PostParams::default(), &object).await.expect("create");
}

/// A double with the install namespace, a node with its CSINode, a class
/// and a PV of the test driver.
async fn cluster() -> (ApiServerDouble, tempfile::TempDir, PathBuf) {
    let double = ApiServerDouble::start().await.expect("double");
    let client = double.client();
    create(
        &client,
        "v1",
        "Namespace",
        "namespaces",
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    create(
        &client,
        "v1",
        "Node",
        "nodes",
        json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}}),
    )
    .await;
    create(
        &client,
        "storage.k8s.io/v1",
        "CSINode",
        "csinodes",
        json!({"metadata": {"name": "n1"},
        "spec": {"drivers": [{"name": DRIVER, "nodeID": "n1", "topologyKeys": ["zone"]}]}}),
    )
    .await;
    create(
        &client,
        "storage.k8s.io/v1",
        "CSIDriver",
        "csidrivers",
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}),
    )
    .await;
    create(
        &client,
        "storage.k8s.io/v1",
        "StorageClass",
        "storageclasses",
        json!({"metadata": {"name": "wffc"},
        "provisioner": DRIVER, "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    // An object of a class that no longer exists: volplane deletes it.
    create(
        &client,
        "storage.k8s.io/v1",
        "CSIStorageCapacity",
        "csistoragecapacities",
        json!({
        "metadata": {"name": "csisc-obsolete", "namespace": NAMESPACE, "labels": {
            volplane_capacity::model::DRIVER_LABEL: DRIVER,
            volplane_capacity::model::MANAGED_BY_LABEL: "volplane"}},
        "storageClassName": "gone", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1Gi"}),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, double.kubeconfig()).expect("kubeconfig");
    (double, dir, kubeconfig)
}

/// Every request volplane made (its User-Agent names it), checked.
fn assert_covered(double: &ApiServerDouble, grants: &Grants, what: &str) {
    let requests: Vec<RequestRecord> = double
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("volplane/"))
        .collect();
    assert!(requests.len() >= 5, "{what}: too few requests to judge: {requests:?}");
    let mut missing: Vec<String> = requests
        .iter()
        .filter(|r| !grants.allows(r))
        .map(|r| {
            format!(
                "{} {}{}{} in {}",
                verb_name(r.verb),
                r.resource,
                r.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default(),
                if r.group.is_empty() {
                    String::new()
                } else {
                    format!(".{}", r.group)
                },
                r.namespace.as_deref().unwrap_or("(cluster)")
            )
        })
        .collect();
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "{what}: deploy/ RBAC does not allow: {missing:#?}");
}

/// The collections volplane listed or watched without a label or field
/// selector, or outside a namespace of its own: what a DaemonSet would make
/// the API server send once per node.
fn unselected_reads(double: &ApiServerDouble) -> Vec<String> {
    let mut resources: Vec<String> = double
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("volplane/") && matches!(r.verb, Verb::List | Verb::Watch))
        .filter(|r| r.label_selector.is_none() && r.field_selector.is_none())
        .map(|r| r.resource)
        .collect();
    resources.sort_unstable();
    resources.dedup();
    resources
}

fn write_verbs(double: &ApiServerDouble, resource: &str) -> Vec<&'static str> {
    let mut verbs: Vec<&'static str> = double
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("volplane/") && r.resource == resource)
        .filter(|r| !matches!(r.verb, Verb::Get | Verb::List | Verb::Watch))
        .map(|r| verb_name(r.verb))
        .collect();
    verbs.sort_unstable();
    verbs.dedup();
    verbs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capacity_sidecar_deployment_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    let client = double.client();
    // The owner chain the deployment's pod walks: Pod → ReplicaSet → Deployment.
    create(&client, "apps/v1", "Deployment", "deployments", json!({"metadata": {"name": "csi-controller", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}})).await;
    let deployment: Value = serde_json::to_value(
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
            .get("csi-controller")
            .await
            .expect("deployment"),
    )
    .expect("json");
    create(&client, "apps/v1", "ReplicaSet", "replicasets", json!({"metadata": {"name": "csi-controller-7d9", "namespace": NAMESPACE,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "csi-controller",
            "uid": deployment["metadata"]["uid"], "controller": true}]},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}})).await;
    let replica_set: Value = serde_json::to_value(
        Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(client.clone(), NAMESPACE)
            .get("csi-controller-7d9")
            .await
            .expect("replicaset"),
    )
    .expect("json");
    create(
        &client,
        "v1",
        "Pod",
        "pods",
        json!({"metadata": {"name": "csi-controller-7d9-x1", "namespace": NAMESPACE,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "csi-controller-7d9",
            "uid": replica_set["metadata"]["uid"], "controller": true}]}, "spec": {"containers": []}}),
    )
    .await;

    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(1 << 30));
    // The first answer fails: a Warning event on the owner.
    driver.fail_next(
        volplane_csi::CsiMethod::GetCapacity,
        1,
        tonic::Code::Unavailable,
        "warming up",
    );

    let (spec, account) = workload("capacity/deployment.yaml");
    let mut running = run_as_deployed(
        &kubeconfig,
        &volplane_container(&spec),
        Some(&driver.address()),
        "csi-controller-7d9-x1",
    );
    running.wait_for("started leading").await;
    eventually(Duration::from_secs(20), "create, delete and an event", || {
        write_verbs(&double, "csistoragecapacities") == ["create", "delete"]
            && !write_verbs(&double, "events").is_empty()
    })
    .await;
    // A new volume of the driver refreshes its class at once: a patch.
    driver.set_default_capacity(CapacityAnswer::available(2 << 30));
    create(
        &client,
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        json!({"metadata": {"name": "pv1"},
        "spec": {"storageClassName": "wffc", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": DRIVER, "volumeHandle": "v1"}}}),
    )
    .await;
    eventually(Duration::from_secs(20), "a patch", || {
        write_verbs(&double, "csistoragecapacities") == ["create", "delete", "patch"]
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        write_verbs(&double, "leases").contains(&"patch"),
        "the lease was taken and released"
    );
    assert_covered(&double, &Grants::of("capacity/rbac.yaml", &account), "capacity sidecar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_node_daemonset_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    // An obsolete object of this node's instance.
    create(
        &double.client(),
        "storage.k8s.io/v1",
        "CSIStorageCapacity",
        "csistoragecapacities",
        json!({
        "metadata": {"name": "csisc-obsolete-n1", "namespace": NAMESPACE, "labels": {
            volplane_capacity::model::DRIVER_LABEL: DRIVER,
            volplane_capacity::model::MANAGED_BY_LABEL: volplane_capacity::model::managed_by(Some("n1"))}},
        "storageClassName": "gone", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1Gi"}),
    )
    .await;
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        node_id: "n1".into(),
        node_topology: Some(volplane_tests::driver::labels([("zone", "a")])),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(1 << 30));
    driver.fail_next(
        volplane_csi::CsiMethod::GetCapacity,
        1,
        tonic::Code::Unavailable,
        "warming up",
    );
    // The owner the instance's pod walks up to: Pod → DaemonSet.
    create(&double.client(), "apps/v1", "DaemonSet", "daemonsets", json!({"metadata": {"name": "volplane-capacity-node", "namespace": NAMESPACE},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}})).await;
    let daemon_set = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(double.client(), NAMESPACE)
        .get("volplane-capacity-node")
        .await
        .expect("daemonset");
    create(
        &double.client(),
        "v1",
        "Pod",
        "pods",
        json!({"metadata": {"name": "volplane-capacity-node-x1", "namespace": NAMESPACE,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "volplane-capacity-node",
            "uid": daemon_set.metadata.uid, "controller": true}]}, "spec": {"containers": []}}),
    )
    .await;
    let (spec, account) = workload("capacity-per-node/daemonset.yaml");
    let mut running = run_as_deployed(
        &kubeconfig,
        &volplane_container(&spec),
        Some(&driver.address()),
        "volplane-capacity-node-x1",
    );
    running.wait_for("volplane is ready").await;
    eventually(Duration::from_secs(20), "create, delete and an event", || {
        write_verbs(&double, "csistoragecapacities") == ["create", "delete"]
            && !write_verbs(&double, "events").is_empty()
    })
    .await;
    // A volume created on the node: the driver reports less, and the
    // frequent local poll (no PV watch per node) publishes it.
    driver.set_default_capacity(CapacityAnswer::available(1 << 29));
    eventually(Duration::from_secs(20), "a patch", || {
        write_verbs(&double, "csistoragecapacities") == ["create", "delete", "patch"]
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        write_verbs(&double, "leases").is_empty(),
        "per-node mode does not elect"
    );
    assert_eq!(
        unselected_reads(&double),
        ["storageclasses"],
        "an instance on every node reads no other collection cluster-wide"
    );
    assert_covered(
        &double,
        &Grants::of("capacity-per-node/rbac.yaml", &account),
        "per-node capacity",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ephemeral_deployment_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    let client = double.client();
    let (spec, account) = workload("ephemeral/deployment.yaml");
    let mut running = run_as_deployed(&kubeconfig, &volplane_container(&spec), None, "volplane-ephemeral-x1");
    running.wait_for("started leading").await;
    create(
        &client,
        "v1",
        "Namespace",
        "namespaces",
        json!({"metadata": {"name": "apps"}}),
    )
    .await;
    // One claim to create, one name taken by a foreign PVC (a Warning event).
    create(
        &client,
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        json!({"metadata": {"name": "taken-data", "namespace": "apps"}, "spec": {}}),
    )
    .await;
    for name in ["fresh", "taken"] {
        create(&client, "v1", "Pod", "pods", json!({"metadata": {"name": name, "namespace": "apps"},
            "spec": {"containers": [], "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}})).await;
    }
    eventually(Duration::from_secs(20), "a claim and an event", || {
        write_verbs(&double, "persistentvolumeclaims") == ["create"] && !write_verbs(&double, "events").is_empty()
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert_covered(&double, &Grants::of("ephemeral/rbac.yaml", &account), "ephemeral");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placements_deployment_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    let client = double.client();
    let (spec, account) = workload("capacity-per-node/placements.yaml");
    let mut running = run_as_deployed(&kubeconfig, &volplane_container(&spec), None, "volplane-placements-x1");
    running.wait_for("started leading").await;
    create(&client, "v1", "Node", "nodes", json!({"metadata": {"name": "p1"}})).await;
    create(
        &client,
        "v1",
        "Namespace",
        "namespaces",
        json!({"metadata": {"name": "apps"}}),
    )
    .await;
    create(&client, "v1", "PersistentVolumeClaim", "persistentvolumeclaims", json!({
        "metadata": {"name": "placed", "namespace": "apps", "annotations": {"volume.kubernetes.io/selected-node": "p1"}},
        "spec": {"storageClassName": "wffc", "resources": {"requests": {"storage": "1Gi"}}}})).await;
    eventually(Duration::from_secs(20), "the node's list created", || {
        write_verbs(&double, "configmaps") == ["create"]
    })
    .await;
    let claims = kube::Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client.clone(), "apps");
    let bind = json!({"spec": {"volumeName": "pv-placed"}});
    claims
        .patch(
            "placed",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(bind),
        )
        .await
        .expect("bind");
    eventually(Duration::from_secs(20), "the node's list patched", || {
        write_verbs(&double, "configmaps") == ["create", "patch"]
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert_covered(
        &double,
        &Grants::of("capacity-per-node/placements.yaml", &account),
        "placements",
    );
}

/// A PV of the test driver bound to `apps/data`, handle `h-pv-data`, used
/// by the pod `apps/user` on n1.
async fn bound_volume_in_use(client: &kube::Client) {
    create(
        client,
        "v1",
        "Namespace",
        "namespaces",
        json!({"metadata": {"name": "apps"}}),
    )
    .await;
    let pv = volplane_tests::objects::bound_pv("pv-data", DRIVER, "apps", "data");
    create(
        client,
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        serde_json::to_value(pv).expect("json"),
    )
    .await;
    let claim = volplane_tests::objects::bound_claim("data", "apps", "pv-data");
    create(
        client,
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        serde_json::to_value(claim).expect("json"),
    )
    .await;
    let pod = volplane_tests::objects::pod_using("user", "apps", "n1", &["data"]);
    create(client, "v1", "Pod", "pods", serde_json::to_value(pod).expect("json")).await;
}

fn sick_volume() -> volplane_tests::driver::TestVolume {
    volplane_tests::driver::TestVolume {
        published_node_ids: vec!["n1".into()],
        bytes: Some((1, 2, 1)),
        ..volplane_tests::driver::TestVolume::abnormal("disk failed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_deployment_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    bound_volume_in_use(&double.client()).await;
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![
            volplane_csi::ControllerCapability::ListVolumes,
            volplane_csi::ControllerCapability::VolumeCondition,
        ],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.put_volume("h-pv-data", sick_volume());
    let (spec, account) = workload("health/deployment.yaml");
    let mut running = run_as_deployed(
        &kubeconfig,
        &volplane_container(&spec),
        Some(&driver.address()),
        "csi-controller-health-x1",
    );
    running.wait_for("started leading").await;
    eventually(Duration::from_secs(20), "an event and the PV annotation", || {
        write_verbs(&double, "events") == ["create"] && write_verbs(&double, "persistentvolumes") == ["patch"]
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert!(write_verbs(&double, "leases").contains(&"patch"));
    assert_covered(&double, &Grants::of("health/rbac.yaml", &account), "health");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_node_daemonset_rbac_covers_every_request() {
    let (double, _dir, kubeconfig) = cluster().await;
    bound_volume_in_use(&double.client()).await;
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        node_id: "n1".into(),
        node_capabilities: Some(vec![
            volplane_csi::NodeCapability::GetVolumeStats,
            volplane_csi::NodeCapability::VolumeCondition,
        ]),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.put_volume("h-pv-data", sick_volume());
    let (spec, account) = workload("health-node/daemonset.yaml");
    let mut running = run_as_deployed(
        &kubeconfig,
        &volplane_container(&spec),
        Some(&driver.address()),
        "volplane-health-node-x1",
    );
    running.wait_for("volplane is ready").await;
    eventually(Duration::from_secs(20), "an event on the pod", || {
        write_verbs(&double, "events") == ["create"]
    })
    .await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        write_verbs(&double, "leases").is_empty(),
        "per-node mode does not elect"
    );
    assert!(
        unselected_reads(&double).is_empty(),
        "an instance on every node reads no collection cluster-wide: {:?}",
        unselected_reads(&double)
    );
    assert_covered(
        &double,
        &Grants::of("health-node/rbac.yaml", &account),
        "health node side",
    );
}
