//! e2e of Pod Security on the real API server: every kustomization in
//! deploy/ passes the level its namespace enforces. The shipped namespaces
//! are applied as they are; each kustomization is applied with server-side
//! dry run and must draw no warning, and each workload's pod is created
//! (dry run) in its namespace, which enforces the level. The per-node
//! DaemonSets claim "privileged": what "restricted" finds in them is only
//! what they state (the hostPath to the driver's socket and the root user
//! that connects to it), and "baseline" refuses them. Ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use volplane_tests::e2e::{ControlPlane, bin_dir};

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir)
}

fn text(output: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `kubectl apply --dry-run=server -k <dir>`: the warnings it prints.
fn dry_run_warnings(plane: &ControlPlane, dir: &str) -> Vec<String> {
    let path = deploy(dir).display().to_string();
    let output = plane
        .kubectl(&["apply", "--dry-run=server", "-k", &path])
        .expect("kubectl runs");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "apply -k deploy/{dir}: {stdout}{stderr}");
    stderr
        .lines()
        .filter(|l| l.starts_with("Warning:"))
        .map(str::to_string)
        .collect()
}

/// The workloads `kubectl kustomize <dir>` renders: (namespace, pod template).
fn workloads(plane: &ControlPlane, dir: &str) -> Vec<(String, Value)> {
    let path = deploy(dir).display().to_string();
    let rendered = plane.kubectl_ok(&["kustomize", &path]).expect("kubectl kustomize");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&rendered).expect("YAML");
    (documents.into_iter())
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
        .map(|d| {
            let namespace = d["metadata"]["namespace"].as_str().expect("namespace").to_string();
            (namespace, d["spec"]["template"].clone())
        })
        .collect()
}

/// Creates the workload's pod (dry run) in `namespace`; the server's answer.
fn create_pod(plane: &ControlPlane, namespace: &str, template: &Value, dir: &Path) -> std::process::Output {
    let account = template["spec"]["serviceAccountName"].as_str().unwrap_or("default");
    // The account must exist for the pod to be admitted; an existing one is fine.
    let _ = plane.kubectl(&["create", "serviceaccount", "-n", namespace, account]);
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"generateName": "pod-security-", "namespace": namespace},
                         "spec": template["spec"]});
    pod["metadata"]["labels"] = template["metadata"]["labels"].clone();
    let file = dir.join(format!("{account}.json"));
    std::fs::write(&file, pod.to_string()).expect("write the pod");
    plane
        .kubectl(&["create", "--dry-run=server", "-f", &file.display().to_string()])
        .expect("kubectl runs")
}

/// What "restricted" may find in a per-node DaemonSet: the stated exceptions.
fn only_stated_exceptions(warning: &str) -> bool {
    let Some((_, violations)) = warning.split_once("\": ") else {
        return false;
    };
    violations.split("), ").all(|v| {
        (v.starts_with("restricted volume types") && v.ends_with("type \"hostPath\""))
            || v.starts_with("runAsNonRoot != true")
            || v.starts_with("runAsUser=0")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(volplane_e2e),
    ignore = "needs VOLPLANE_E2E_BIN_DIR (real control plane binaries)"
)]
async fn every_kustomization_passes_the_pod_security_level_its_namespace_enforces() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let scratch = tempfile::tempdir().expect("tempdir");
    plane
        .kubectl_ok(&["apply", "-f", &deploy("namespace.yaml").display().to_string()])
        .expect("deploy/namespace.yaml");
    plane
        .kubectl_ok(&["apply", "-k", &deploy("node-namespace").display().to_string()])
        .expect("deploy/node-namespace");

    // "restricted" (warned and enforced in volplane): not one warning, every pod admitted.
    let restricted = [
        ".",
        "capacity",
        "ephemeral",
        "health",
        "control-plane",
        "flowcontrol",
        "policy",
    ];
    let per_node = ["capacity-per-node", "health-node"];
    for dir in restricted {
        assert_eq!(dry_run_warnings(&plane, dir), Vec::<String>::new(), "deploy/{dir}");
    }
    for dir in restricted {
        for (namespace, template) in workloads(&plane, dir) {
            assert_eq!(namespace, "volplane", "deploy/{dir} runs in the restricted namespace");
            let output = create_pod(&plane, &namespace, &template, scratch.path());
            let (stdout, stderr) = text(&output);
            assert!(output.status.success(), "deploy/{dir}: {stdout}{stderr}");
            assert!(!stderr.contains("Warning"), "deploy/{dir}: {stderr}");
        }
    }

    // "privileged" (enforced in volplane-node, which audits at "restricted"):
    // warned at "restricted" for this test, only the stated exceptions show.
    plane
        .kubectl_ok(&[
            "label",
            "namespace",
            "volplane-node",
            "pod-security.kubernetes.io/warn=restricted",
        ])
        .expect("label");
    plane
        .kubectl_ok(&["create", "namespace", "baseline"])
        .and_then(|_| {
            plane.kubectl_ok(&[
                "label",
                "namespace",
                "baseline",
                "pod-security.kubernetes.io/enforce=baseline",
            ])
        })
        .expect("a namespace enforcing baseline");
    for dir in per_node {
        let warnings = dry_run_warnings(&plane, dir);
        assert!(!warnings.is_empty(), "deploy/{dir}: restricted names its exceptions");
        for warning in &warnings {
            assert!(only_stated_exceptions(warning), "deploy/{dir}: {warning}");
        }
    }
    for dir in per_node {
        for (namespace, template) in workloads(&plane, dir) {
            assert_eq!(namespace, "volplane-node", "deploy/{dir}");
            let output = create_pod(&plane, &namespace, &template, scratch.path());
            let (stdout, stderr) = text(&output);
            assert!(
                output.status.success(),
                "deploy/{dir} in volplane-node: {stdout}{stderr}"
            );
            let is_daemon = template["spec"]["volumes"].to_string().contains("hostPath");
            let output = create_pod(&plane, "baseline", &template, scratch.path());
            let (stdout, stderr) = text(&output);
            assert_eq!(
                output.status.success(),
                !is_daemon,
                "deploy/{dir} in a baseline namespace: {stdout}{stderr}"
            );
            if is_daemon {
                assert!(stderr.contains("hostPath"), "{stderr}");
            }
        }
    }
}
