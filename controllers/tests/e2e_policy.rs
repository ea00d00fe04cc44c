//! e2e of `deploy/policy` on the real API server (RBAC, built-in CEL
//! admission): who may get PersistentVolumeClaims through generic
//! ephemeral volumes. Users are impersonated with kubectl `--as`. Ignored
//! unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::Running;
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::wait::eventually_some;

/// A user with pods and workloads but not claims; one with both.
const POD_ONLY: &str = "alice";
const BOTH: &str = "bob";
const NAMESPACE: &str = "default";

fn policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy")
}

/// A pod spec with a generic ephemeral volume `scratch` (or none).
fn pod_spec(ephemeral: bool) -> Value {
    let volumes = if ephemeral {
        json!([{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}])
    } else {
        json!([{"name": "tmp", "emptyDir": {}}])
    };
    json!({"containers": [{"name": "c", "image": "registry.invalid/none"}], "volumes": volumes})
}

fn pod(name: &str, ephemeral: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec(ephemeral)})
}

fn deployment(name: &str, ephemeral: bool) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec(ephemeral)}}})
}

fn cron_job(name: &str, ephemeral: bool) -> Value {
    let mut spec = pod_spec(ephemeral);
    spec["restartPolicy"] = json!("Never");
    json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
           "spec": {"schedule": "0 0 1 1 *", "jobTemplate": {"spec": {"template": {"spec": spec}}}}})
}

struct Cluster {
    plane: ControlPlane,
    dir: PathBuf,
}

impl Cluster {
    /// Runs kubectl as `user` (impersonated) with `object` as a file.
    fn kubectl_as(&self, user: &str, verb: &[&str], object: Option<&Value>) -> Output {
        let mut args: Vec<String> = vec![format!("--as={user}")];
        args.extend(verb.iter().map(ToString::to_string));
        if let Some(object) = object {
            let name = object["metadata"]["name"].as_str().expect("name");
            let file = self.dir.join(format!("{user}-{name}.json"));
            std::fs::write(&file, object.to_string()).expect("write object");
            args.push("-f".into());
            args.push(file.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.plane.kubectl(&args).expect("kubectl")
    }

    fn create_as(&self, user: &str, object: &Value) -> Output {
        self.kubectl_as(user, &["create", "-n", NAMESPACE], Some(object))
    }

    fn set_actions(&self, actions: &str) {
        self.plane
            .kubectl_ok(&[
                "patch",
                "validatingadmissionpolicybinding",
                "volplane-ephemeral-volume-permission",
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"validationActions":{actions}}}}}"#),
            ])
            .expect("patch the binding");
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Denied by the policy, with a message that names the volume and the
/// missing permission and says how to get it.
fn assert_denied(output: &Output, what: &str) {
    let text = stderr(output);
    assert!(!output.status.success(), "{what} was allowed: {text}");
    for part in [
        "volplane-ephemeral-volume-permission",
        "\"scratch\"",
        &format!("user \"{POD_ONLY}\" may not create persistentvolumeclaims in namespace \"{NAMESPACE}\""),
        "ask an administrator",
    ] {
        assert!(text.contains(part), "{what}: no {part:?} in: {text}");
    }
}

fn assert_allowed(output: &Output, what: &str) {
    assert!(output.status.success(), "{what} was denied: {}", stderr(output));
}

async fn setup() -> Cluster {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let dir = plane.scratch("policy").expect("scratch");
    plane
        .kubectl_ok(&["apply", "-k", &policy_dir().display().to_string()])
        .expect("apply deploy/policy");
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "workloads", "namespace": NAMESPACE},
         "rules": [{"apiGroups": ["", "apps", "batch"], "verbs": ["create", "get", "list", "patch", "update"],
                    "resources": ["pods", "deployments", "replicasets", "cronjobs", "jobs"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "claims", "namespace": NAMESPACE},
         "rules": [{"apiGroups": [""], "verbs": ["create"], "resources": ["persistentvolumeclaims"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "workloads", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "workloads"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": POD_ONLY},
                      {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": BOTH},
                      {"kind": "ServiceAccount", "name": "replicaset-controller", "namespace": NAMESPACE}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "claims", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "claims"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": BOTH}]}]});
    let file = dir.join("rbac.json");
    std::fs::write(&file, rbac.to_string()).expect("write rbac");
    plane
        .kubectl_ok(&["apply", "-f", &file.display().to_string()])
        .expect("users' RBAC");
    Cluster { plane, dir }
}

/// Waits until the API server enforces the binding's current actions: a
/// probe pod with an ephemeral volume is denied (Deny) or warned about.
async fn wait_for_policy(cluster: &Cluster, deny: bool) {
    let probe = pod("probe", true);
    eventually_some(Duration::from_secs(30), "the policy in force", || {
        let output = cluster.kubectl_as(POD_ONLY, &["create", "--dry-run=server", "-n", NAMESPACE], Some(&probe));
        let text = stderr(&output);
        let enforced = text.contains("volplane-ephemeral-volume-permission")
            && output.status.success() != deny
            && (deny || text.contains("Warning:"));
        async move { enforced.then_some(()) }
    })
    .await;
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_without_claim_permission_allowed_with_it_and_controllers_are_not_users() {
    let cluster = setup().await;
    let volplane = Running::start(
        cluster.plane.kubeconfig(),
        &["--controllers=ephemeral", "--leader-election=false"],
    );
    cluster.set_actions(r#"["Deny"]"#);
    wait_for_policy(&cluster, true).await;

    // Pods and workloads with an ephemeral volume, from a user without PVC create.
    let denied = cluster.create_as(POD_ONLY, &pod("p", true));
    assert_denied(&denied, "a pod");
    // Word for word as deploy/README.md shows it.
    let documented = std::fs::read_to_string(policy_dir().join("../README.md")).expect("deploy/README.md");
    let message = stderr(&denied);
    let message = message.split("denied request: ").nth(1).unwrap_or(&message).trim();
    assert!(
        documented.contains(message),
        "deploy/README.md does not show: {message}"
    );
    assert_denied(&cluster.create_as(POD_ONLY, &deployment("d", true)), "a Deployment");
    assert_denied(&cluster.create_as(POD_ONLY, &cron_job("c", true)), "a CronJob");
    // Without one: allowed.
    assert_allowed(&cluster.create_as(POD_ONLY, &pod("plain", false)), "a plain pod");
    assert_allowed(
        &cluster.create_as(POD_ONLY, &deployment("plain", false)),
        "a plain Deployment",
    );
    assert_allowed(
        &cluster.create_as(POD_ONLY, &cron_job("plain", false)),
        "a plain CronJob",
    );
    // Adding one to an existing Deployment (kubectl patch) is checked too;
    // changing something else is not.
    let add = r#"[{"op":"add","path":"/spec/template/spec/volumes/-","value":{"name":"scratch","ephemeral":{"volumeClaimTemplate":{"spec":{"accessModes":["ReadWriteOnce"],"resources":{"requests":{"storage":"1Gi"}}}}}}}]"#;
    assert_denied(
        &cluster.kubectl_as(
            POD_ONLY,
            &[
                "patch",
                "-n",
                NAMESPACE,
                "deployment",
                "plain",
                "--type=json",
                "-p",
                add,
            ],
            None,
        ),
        "kubectl patch adding one",
    );
    assert_allowed(
        &cluster.kubectl_as(
            POD_ONLY,
            &[
                "patch",
                "-n",
                NAMESPACE,
                "deployment",
                "plain",
                "-p",
                r#"{"spec":{"replicas":3}}"#,
            ],
            None,
        ),
        "kubectl patch of the replicas",
    );

    // A user who may create claims may create all of it.
    assert_allowed(&cluster.create_as(BOTH, &pod("p", true)), "bob's pod");
    assert_allowed(&cluster.create_as(BOTH, &deployment("d", true)), "bob's Deployment");
    assert_allowed(&cluster.create_as(BOTH, &cron_job("c", true)), "bob's CronJob");
    // An update that keeps the ephemeral volume as it was is not checked again.
    assert_allowed(
        &cluster.kubectl_as(
            POD_ONLY,
            &["label", "-n", NAMESPACE, "deployment", "d", "team=web"],
            None,
        ),
        "alice labels bob's Deployment",
    );
    // The Deployment's pods come from kube-controller-manager and get claims from volplane.
    let client = cluster.plane.client();
    let pods = eventually_some(Duration::from_secs(60), "the Deployment's two pods", || async {
        let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
            .list(&ListParams::default().labels("app=d"))
            .await
            .ok()?;
        (pods.items.len() == 2).then_some(pods.items)
    })
    .await;
    for pod in pods {
        let claim = format!("{}-scratch", pod.metadata.name.expect("name"));
        eventually_some(
            Duration::from_secs(60),
            &format!("volplane creates {claim}"),
            || async {
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE)
                    .get_opt(&claim)
                    .await
                    .ok()
                    .flatten()
            },
        )
        .await;
    }
    // The exemption is the controllers' own identities: the ReplicaSet
    // controller's ServiceAccount (which may create pods, not claims) is
    // admitted; a ServiceAccount of the same name in another namespace,
    // with the same rights, is checked and denied.
    let replica_set = Api::<ReplicaSet>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels("app=d"))
        .await
        .expect("ReplicaSets");
    assert_eq!(replica_set.items.len(), 1);
    assert_allowed(
        &cluster.create_as(
            "system:serviceaccount:kube-system:replicaset-controller",
            &pod("from-controller", true),
        ),
        "the ReplicaSet controller's pod",
    );
    let impostor = cluster.create_as(
        "system:serviceaccount:default:replicaset-controller",
        &pod("impostor", true),
    );
    assert!(
        !impostor.status.success() && stderr(&impostor).contains("volplane-ephemeral-volume-permission"),
        "{}",
        stderr(&impostor)
    );

    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binding_warns_and_allows() {
    let cluster = setup().await;
    wait_for_policy(&cluster, false).await;
    for object in [pod("p", true), deployment("d", true), cron_job("c", true)] {
        let output = cluster.create_as(POD_ONLY, &object);
        assert_allowed(&output, "in Warn mode");
        let text = stderr(&output);
        assert!(
            text.contains("Warning:")
                && text.contains("volplane-ephemeral-volume-permission")
                && text.contains("\"scratch\"")
                && text.contains("may not create persistentvolumeclaims"),
            "{text}"
        );
    }
    // A plain pod gets no warning.
    let plain = cluster.create_as(POD_ONLY, &pod("plain", false));
    assert_allowed(&plain, "a plain pod");
    assert!(!stderr(&plain).contains("Warning"), "{}", stderr(&plain));
}
