//! deploy/monitoring against the rest of deploy/ and the docs: every
//! Service selects pods of a shipped workload that have an `admin` port,
//! every Service has its ServiceMonitor, the PrometheusRule is the plain
//! rules file, every alert can be acted on and has promtool tests that see
//! it fire and stay quiet, and the READMEs' alert tables name every alert.
//! (`.ci/run` runs the promtool tests themselves; e2e_monitoring runs the
//! rules and the dashboard in a real Prometheus.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn monitoring_dir() -> PathBuf {
    deploy_dir().join("monitoring")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn document(path: &Path) -> Value {
    documents(path).into_iter().next().expect("one document")
}

/// The shipped workloads outside deploy/monitoring: (namespace, pod
/// template labels, whether a container has a port named `admin`).
fn workloads() -> Vec<(String, BTreeMap<String, String>, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/").flatten() {
        let dir = entry.path();
        let kustomization = dir.join("kustomization.yaml");
        if !kustomization.exists() || dir.ends_with("monitoring") {
            continue;
        }
        let namespace = document(&kustomization)["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        for file in std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.path()) {
            if file.extension().is_none_or(|e| e != "yaml") || file.ends_with("kustomization.yaml") {
                continue;
            }
            for doc in documents(&file) {
                if !matches!(doc["kind"].as_str(), Some("Deployment" | "DaemonSet")) {
                    continue;
                }
                let template = &doc["spec"]["template"];
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(template["metadata"]["labels"].clone()).unwrap_or_default();
                let admin = template["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        c["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|p| p["name"] == "admin")
                    });
                found.push((namespace.clone(), labels, admin));
            }
        }
    }
    found
}

fn kind_in(file: &str, kind: &str) -> Vec<Value> {
    documents(&monitoring_dir().join(file))
        .into_iter()
        .filter(|doc| doc["kind"] == kind)
        .collect()
}

#[test]
fn every_service_selects_shipped_pods_with_an_admin_port_and_has_a_service_monitor() {
    let workloads = workloads();
    let services = kind_in("services.yaml", "Service");
    assert_eq!(services.len(), 6, "one per component");
    let monitors = kind_in("servicemonitors.yaml", "ServiceMonitor");
    for service in &services {
        let name = service["metadata"]["name"].as_str().expect("name");
        let namespace = service["metadata"]["namespace"].as_str().expect("namespace");
        let selector: BTreeMap<String, String> =
            serde_json::from_value(service["spec"]["selector"].clone()).expect("selector");
        let selected: Vec<_> = workloads
            .iter()
            .filter(|(ns, labels, _)| ns == namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect();
        assert!(
            !selected.is_empty(),
            "Service {namespace}/{name} selects no shipped pods"
        );
        assert!(
            selected.iter().all(|(_, _, admin)| *admin),
            "{name}: pods without an admin port"
        );
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "admin", "{name}");

        let monitor = monitors
            .iter()
            .find(|m| m["metadata"]["name"] == name && m["metadata"]["namespace"] == namespace)
            .unwrap_or_else(|| panic!("no ServiceMonitor {namespace}/{name}"));
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "admin", "{name}");
        assert_eq!(
            endpoint["honorLabels"], true,
            "{name}: per-claim namespace labels must win"
        );
        let wanted: BTreeMap<String, String> =
            serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone()).expect("matchLabels");
        let labels: BTreeMap<String, String> =
            serde_json::from_value(service["metadata"]["labels"].clone()).expect("labels");
        assert!(
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "ServiceMonitor {name} does not select its Service"
        );
    }
    assert_eq!(monitors.len(), services.len());
}

/// The alerting rules of a rules document (`groups:`).
fn alerts(rules: &Value) -> Vec<Value> {
    let groups = rules["groups"].as_array().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    alerts(&document(&monitoring_dir().join("rules.yaml")))
        .iter()
        .map(|a| a["alert"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn the_prometheus_rule_is_the_rules_file_and_every_alert_says_what_to_do() {
    let rules = document(&monitoring_dir().join("rules.yaml"));
    let resource = kind_in("prometheusrule.yaml", "PrometheusRule");
    assert_eq!(resource.len(), 1);
    assert_eq!(
        resource[0]["spec"], rules,
        "prometheusrule.yaml's spec differs from rules.yaml"
    );
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "{alerts:#?}");
    for alert in &alerts {
        let name = &alert["alert"];
        assert!(alert["for"].as_str().is_some_and(|f| !f.is_empty()), "{name}: no for:");
        assert!(
            matches!(alert["labels"]["severity"].as_str(), Some("warning" | "critical")),
            "{name}: severity"
        );
        for annotation in ["summary", "description"] {
            assert!(
                alert["annotations"][annotation].as_str().is_some_and(|t| t.len() > 20),
                "{name}: no {annotation}"
            );
        }
    }
}

#[test]
fn every_alert_has_promtool_tests_that_see_it_fire_and_stay_quiet() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let tests = monitoring_dir().join("tests");
    for file in std::fs::read_dir(&tests).expect("tests/").flatten().map(|e| e.path()) {
        let doc = document(&file);
        assert_eq!(doc["rule_files"][0], "../rules.yaml", "{}", file.display());
        for test in doc["tests"].as_array().into_iter().flatten() {
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_string();
                if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                    firing.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    let names = alert_names();
    assert_eq!(firing, names, "alerts with a test where they fire");
    assert_eq!(quiet, names, "alerts with a test where they stay quiet");
}

/// The rows of the table under `heading` that name an alert: its cells.
fn alert_rows(readme: &str, heading: &str) -> BTreeMap<String, Vec<String>> {
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("no {heading}"));
    section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| {
            let cells: Vec<String> = line
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect();
            let name = cells.get(1)?.clone();
            name.starts_with("Volplane").then(|| (name, cells[2..].to_vec()))
        })
        .collect()
}

#[test]
fn the_readmes_alert_tables_name_every_alert_with_its_severity_and_for() {
    let rules = document(&monitoring_dir().join("rules.yaml"));
    let expected: BTreeMap<String, (String, String)> = alerts(&rules)
        .iter()
        .map(|a| {
            let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (field(&a["alert"]), (field(&a["labels"]["severity"]), field(&a["for"])))
        })
        .collect();
    let names: BTreeSet<&String> = expected.keys().collect();
    let root = std::fs::read_to_string(deploy_dir().join("../README.md")).expect("README.md");
    let rows = alert_rows(&root, "\n### Alerts\n");
    assert_eq!(rows.keys().collect::<BTreeSet<_>>(), names, "README.md");
    for (name, cells) in &rows {
        assert_eq!(cells[0], expected[name].0, "README.md: severity of {name}");
    }
    let own = std::fs::read_to_string(monitoring_dir().join("README.md")).expect("README");
    let rows = alert_rows(&own, "\n## Alerts\n");
    assert_eq!(
        rows.keys().collect::<BTreeSet<_>>(),
        names,
        "deploy/monitoring/README.md"
    );
    for (name, cells) in &rows {
        assert_eq!(
            (&cells[0], &cells[1]),
            (&expected[name].0, &expected[name].1),
            "deploy/monitoring/README.md: {name}"
        );
    }
}
