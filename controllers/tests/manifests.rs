//! Every manifest in deploy/ parses into typed Kubernetes objects, every
//! kustomization names files that exist, and the volplane containers'
//! arguments are flags the binary accepts.

use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use volplane::args::Args;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn typed<T: serde::de::DeserializeOwned>(path: &Path, doc: &Value) -> T {
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not parse: {e}", path.display(), doc["kind"]))
}

/// The containers of a pod spec that run volplane's image.
fn volplane_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    (spec.containers.iter()).filter(|c| c.image.as_deref().is_some_and(|i| i.starts_with("volplane")))
}

fn check_volplane_args(path: &Path, spec: &PodSpec) {
    for container in volplane_containers(spec) {
        let args = container.args.clone().unwrap_or_default();
        let parsed = Args::try_parse_from(std::iter::once("volplane".to_string()).chain(args.iter().cloned()));
        assert!(
            parsed.is_ok(),
            "{}: container {} args {args:?}: {:?}",
            path.display(),
            container.name,
            parsed.err()
        );
        // Probes on the admin endpoints, at the port the flags open.
        let where_ = format!("{}: container {}", path.display(), container.name);
        let port = args
            .iter()
            .find_map(|a| a.strip_prefix("--http-endpoint=:"))
            .unwrap_or_else(|| panic!("{where_}: no --http-endpoint=:<port>"));
        let admin_port = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("admin"))
            .unwrap_or_else(|| panic!("{where_}: no admin port"));
        assert_eq!(admin_port.container_port.to_string(), port, "{where_}");
        for (probe, path) in [
            (&container.liveness_probe, "/livez"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{where_}: no HTTP probe for {path}"));
            assert_eq!(get.path.as_deref(), Some(path), "{where_}");
        }
        let requests = container.resources.as_ref().and_then(|r| r.requests.as_ref());
        assert!(
            requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
            "{where_}: no cpu and memory requests"
        );
    }
}

/// What a volplane container keeps of Pod Security's "restricted" level
/// wherever it runs (the per-node DaemonSets' root user and hostPath are
/// checked against the real API server by e2e_pod_security), and the
/// workload's priority class. Whether the workload runs volplane.
fn check_security_and_priority(path: &Path, spec: &PodSpec, priority: &str) -> bool {
    let pod_seccomp = spec.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref());
    let mut volplane = false;
    for container in volplane_containers(spec) {
        volplane = true;
        let where_ = format!("{}: container {}", path.display(), container.name);
        let context = container.security_context.clone().unwrap_or_default();
        assert_eq!(context.allow_privilege_escalation, Some(false), "{where_}");
        assert_eq!(context.read_only_root_filesystem, Some(true), "{where_}");
        assert!(!context.privileged.unwrap_or(false), "{where_}");
        let capabilities = context.capabilities.unwrap_or_default();
        assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]), "{where_}");
        assert_eq!(capabilities.add, None, "{where_}");
        let seccomp = context.seccomp_profile.as_ref().or(pod_seccomp);
        assert_eq!(seccomp.map(|s| s.type_.as_str()), Some("RuntimeDefault"), "{where_}");
    }
    if volplane {
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some(priority),
            "{}",
            path.display()
        );
    }
    volplane
}

/// Replicas of Deployments: more than one, so that leader election has a standby.
fn check_replicas(path: &Path, deployment: &Deployment) {
    let spec = deployment.spec.as_ref().expect("spec");
    let volplane = (spec.template.spec.as_ref()).is_some_and(|s| volplane_containers(s).next().is_some());
    if volplane {
        assert!(
            spec.replicas.unwrap_or(1) >= 2,
            "{}: a single replica has no standby",
            path.display()
        );
        let spread = spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.topology_spread_constraints.clone());
        assert!(
            spread
                .iter()
                .flatten()
                .any(|c| c.topology_key == "topology.kubernetes.io/zone"),
            "{}: replicas are not spread over zones",
            path.display()
        );
    }
}

/// Prometheus's own files in deploy/monitoring (rules, scrape job, rule
/// tests): no Kubernetes objects, checked by tests/monitoring.rs.
fn is_prometheus_file(path: &Path) -> bool {
    let monitoring = deploy_dir().join("monitoring");
    path.starts_with(&monitoring)
        && (path.starts_with(monitoring.join("tests"))
            || path
                .file_name()
                .is_some_and(|n| n == "rules.yaml" || n == "scrape-config.yaml"))
}

#[test]
fn every_manifest_parses_into_typed_objects() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    assert!(files.len() >= 10, "found {files:?}");
    let mut kinds = Vec::new();
    let (mut budgets, mut replicated) = (Vec::new(), Vec::new());
    for path in &files {
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") || is_prometheus_file(path) {
            continue;
        }
        for doc in documents(path) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "ServiceAccount" => drop(typed::<ServiceAccount>(path, &doc)),
                "ClusterRole" => drop(typed::<ClusterRole>(path, &doc)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(path, &doc)),
                "Role" => drop(typed::<Role>(path, &doc)),
                "RoleBinding" => drop(typed::<RoleBinding>(path, &doc)),
                "Namespace" => drop(typed::<Namespace>(path, &doc)),
                "Service" => drop(typed::<k8s_openapi::api::core::v1::Service>(path, &doc)),
                // The Prometheus Operator's kinds: checked by tests/monitoring.rs.
                "ServiceMonitor" | "PrometheusRule" => {}
                "CSIDriver" => drop(typed::<CSIDriver>(path, &doc)),
                "StorageClass" => drop(typed::<StorageClass>(path, &doc)),
                "Pod" => drop(typed::<Pod>(path, &doc)),
                "ValidatingAdmissionPolicy" => drop(typed::<
                    k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy,
                >(path, &doc)),
                "ValidatingAdmissionPolicyBinding" => drop(typed::<
                    k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding,
                >(path, &doc)),
                "FlowSchema" => drop(typed::<k8s_openapi::api::flowcontrol::v1::FlowSchema>(path, &doc)),
                "PriorityLevelConfiguration" => drop(typed::<
                    k8s_openapi::api::flowcontrol::v1::PriorityLevelConfiguration,
                >(path, &doc)),
                "PodDisruptionBudget" => {
                    let budget: PodDisruptionBudget = typed(path, &doc);
                    let spec = budget.spec.expect("spec");
                    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)), "{}", path.display());
                    budgets.push(spec.selector.and_then(|s| s.match_labels).unwrap_or_default());
                }
                "Deployment" => {
                    let d: Deployment = typed(path, &doc);
                    check_replicas(path, &d);
                    let labels = d.spec.as_ref().and_then(|s| s.selector.match_labels.clone());
                    let spec = d.spec.and_then(|s| s.template.spec).expect("pod spec");
                    check_volplane_args(path, &spec);
                    if check_security_and_priority(path, &spec, "system-cluster-critical") {
                        replicated.push((path.clone(), labels.unwrap_or_default()));
                    }
                }
                "DaemonSet" => {
                    let d: DaemonSet = typed(path, &doc);
                    let spec = d.spec.and_then(|s| s.template.spec).expect("pod spec");
                    check_volplane_args(path, &spec);
                    check_security_and_priority(path, &spec, "system-node-critical");
                }
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
            kinds.push(kind);
        }
    }
    for (path, labels) in replicated {
        assert!(
            budgets.contains(&labels),
            "{}: no PodDisruptionBudget selects {labels:?}",
            path.display()
        );
    }
    for expected in [
        "PodDisruptionBudget",
        "Deployment",
        "DaemonSet",
        "CSIDriver",
        "StorageClass",
        "Pod",
        "Role",
        "ClusterRole",
    ] {
        assert!(kinds.iter().any(|k| k == expected), "no {expected} in deploy/");
    }
}

#[test]
fn kustomizations_name_existing_resources() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let kustomizations: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 4);
    for path in kustomizations {
        let doc = documents(path).into_iter().next().expect("one document");
        let dir = path.parent().expect("dir");
        for resource in doc["resources"].as_array().expect("resources") {
            let name = resource.as_str().expect("resource path");
            assert!(dir.join(name).exists(), "{}: {name} does not exist", path.display());
        }
    }
}
