//! e2e: the shipped monitoring (`deploy/monitoring`) judged by a real
//! Prometheus (Debian's `prometheus`, on loopback) that scrapes volplane's
//! processes on a real control plane with the real hostpathplugin and
//! evaluates the shipped rules: every dashboard query returns data, no
//! alert fires in normal operation, and the alerts fire on the faults they
//! are for. Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.
//!
//! The scrape job is the shipped one (`scrape-config.yaml`) with its
//! `kubernetes_sd_configs` replaced by a file of targets carrying the same
//! `__meta_kubernetes_*` labels (Debian's Prometheus is built without
//! Kubernetes discovery), so the shipped relabelling makes the job names.
//! Only the scrape and evaluation intervals are the test's own (1 s).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::Running;
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::process::Process;
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const EPHEMERAL_LEASE: &str = "volplane-ephemeral";

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// A port on loopback nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `GET path` on `address`: status and body.
fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (0, String::new());
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // HTTP/1.0: the answer comes whole, never chunked.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One volplane process as Prometheus discovers it: its pod, container and
/// admin port.
struct Target {
    pod: String,
    container: &'static str,
    app: &'static str,
    port: u16,
}

impl Target {
    /// A target group with the labels the Kubernetes pod role gives.
    fn group(&self) -> Value {
        json!({"targets": [format!("127.0.0.1:{}", self.port)], "labels": {
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_pod_name": self.pod,
            "__meta_kubernetes_pod_container_name": self.container,
            "__meta_kubernetes_pod_container_port_name": "admin",
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": self.app,
        }})
    }
}

/// A real Prometheus with the shipped scrape job and rules.
struct Prometheus {
    address: SocketAddr,
    _process: Process,
}

impl Prometheus {
    async fn start(plane: &ControlPlane, targets: &[Target]) -> Self {
        let dir = plane.scratch("prometheus").expect("scratch");
        let targets_file = dir.join("targets.json");
        let groups: Vec<Value> = targets.iter().map(Target::group).collect();
        std::fs::write(&targets_file, serde_json::to_string(&groups).expect("json")).expect("targets");
        let shipped = std::fs::read_to_string(monitoring_dir().join("scrape-config.yaml")).expect("scrape config");
        let shipped: Value = serde_saphyr::from_str(&shipped).expect("scrape-config.yaml is YAML");
        let mut job = shipped["scrape_configs"][0].clone();
        let job_fields = job.as_object_mut().expect("a scrape job");
        assert!(
            job_fields.remove("kubernetes_sd_configs").is_some(),
            "the shipped job discovers pods"
        );
        job_fields.insert("file_sd_configs".into(), json!([{"files": [targets_file]}]));
        job_fields.insert("scrape_interval".into(), json!("1s"));
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [monitoring_dir().join("rules.yaml")],
            "scrape_configs": [job],
        });
        // JSON is YAML.
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).expect("config");
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let binary = std::env::var("VOLPLANE_PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into());
        assert!(
            Path::new(&binary).exists(),
            "{binary} is missing: install Debian's prometheus package (.ci/run does) or set VOLPLANE_PROMETHEUS"
        );
        let process = plane
            .start_process(
                "prometheus",
                &binary,
                &[
                    format!("--config.file={}", config_file.display()),
                    format!("--storage.tsdb.path={}", dir.join("data").display()),
                    format!("--web.listen-address={address}"),
                ],
            )
            .expect("prometheus starts");
        volplane_tests::wait::show_log_on_failure("prometheus", process.log_path());
        volplane_tests::wait::eventually(Duration::from_secs(60), "Prometheus is ready", || {
            get(address, "/-/ready").0 == 200
        })
        .await;
        Self {
            address,
            _process: process,
        }
    }

    /// `data` of an API answer.
    fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.address, path);
        assert_eq!(status, 200, "{path}: {body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        answer["data"].clone()
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<Value> {
        let encoded: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let data = self.api(&format!("/api/v1/query?query={encoded}"));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Active alerts: (name, state, labels).
    fn alerts(&self) -> Vec<(String, String, BTreeMap<String, String>)> {
        let data = self.api("/api/v1/alerts");
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .into_iter()
            .map(|alert| {
                let labels: BTreeMap<String, String> = serde_json::from_value(alert["labels"].clone()).expect("labels");
                let state = alert["state"].as_str().unwrap_or_default().to_string();
                (labels.get("alertname").cloned().unwrap_or_default(), state, labels)
            })
            .collect()
    }

    /// Waits until alert `name` with labels `with` is firing (or not active
    /// at all, when `firing` is false).
    async fn wait_for_alert(&self, name: &str, with: &[(&str, &str)], firing: bool, limit: Duration) {
        let what = format!("{name} {with:?} {}", if firing { "fires" } else { "is resolved" });
        eventually_some(limit, &what, || async {
            let matching = self.alerts().into_iter().filter(|(alert, _, labels)| {
                alert == name && with.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            });
            let states: Vec<String> = matching.map(|(_, state, _)| state).collect();
            let done = if firing {
                states.iter().any(|s| s == "firing")
            } else {
                states.is_empty()
            };
            done.then_some(())
        })
        .await;
    }
}

/// Every panel query of the shipped dashboard, with Grafana's rate
/// interval made concrete.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring_dir().join("dashboard.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let mut panels: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    let mut queries = Vec::new();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((title.clone(), expr.replace("$__rate_interval", "1m")));
            }
        }
    }
    queries
}

/// volplane as a replica `pod` of a two-replica Deployment, with short
/// leases, its admin server on `port`.
fn replica(plane: &ControlPlane, pod: &str, port: u16, controllers: &[&str]) -> Running {
    let endpoint = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--namespace",
        NAMESPACE,
        "--pod-name",
        pod,
        "--http-endpoint",
        &endpoint,
    ];
    args.extend([
        "--leader-election-lease-duration",
        "4s",
        "--leader-election-renew-deadline",
        "3s",
        "--leader-election-retry-period",
        "1s",
    ]);
    args.extend(controllers);
    Running::start(plane.kubeconfig(), &args)
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_dashboard_has_data_and_the_shipped_alerts_fire_on_faults_and_only_then() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("classes");
    plane.add_hostpath_node("node-0").await.expect("node");
    let mut driver = plane
        .start_hostpath("controller", &[("fast", "10Gi")])
        .await
        .expect("hostpathplugin");
    let address = driver.address();
    let capacity = [
        "--controllers=capacity,health",
        "--csi-address",
        &address,
        "--capacity-owner",
        "none",
        "--capacity-poll-interval",
        "2s",
        "--health-list-interval",
        "2s",
    ];
    let ephemeral = ["--controllers=ephemeral"];
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let targets = [
        ("csi-controller-0", "volplane-capacity", "csi-controller"),
        ("csi-controller-1", "volplane-capacity", "csi-controller"),
        ("volplane-ephemeral-0", "volplane-ephemeral", "volplane-ephemeral"),
        ("volplane-ephemeral-1", "volplane-ephemeral", "volplane-ephemeral"),
    ]
    .iter()
    .zip(&ports)
    .map(|((pod, container, app), port)| Target {
        pod: pod.to_string(),
        container,
        app,
        port: *port,
    })
    .collect::<Vec<_>>();
    let mut capacity_replicas = Vec::new();
    let mut ephemeral_replicas = Vec::new();
    for target in &targets {
        let (flags, replicas) = if target.container == "volplane-capacity" {
            (&capacity[..], &mut capacity_replicas)
        } else {
            (&ephemeral[..], &mut ephemeral_replicas)
        };
        let mut process = replica(&plane, &target.pod, target.port, flags);
        process.wait_for("volplane is ready").await;
        replicas.push(process);
    }
    // A pod with an ephemeral volume: a claim created, a latency observed.
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &support::ephemeral_pod("monitored"))
        .await
        .expect("pod");
    eventually_some(Duration::from_secs(60), "the pod's claim", || {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        async move { claims.get_opt("monitored-data").await.ok().flatten() }
    })
    .await;
    let prometheus = Prometheus::start(&plane, &targets).await;

    // Every panel has data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let empty = loop {
        let empty: Vec<&(String, String)> = queries
            .iter()
            .filter(|(_, expr)| prometheus.query(expr).is_empty())
            .collect();
        if empty.is_empty() || tokio::time::Instant::now() > deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        empty.is_empty(),
        "dashboard panels without data after 120 s: {empty:#?}"
    );
    // The rules are loaded and evaluated; nothing fires in normal operation.
    let rules = prometheus.api("/api/v1/rules");
    let group = &rules["groups"][0];
    assert_eq!(group["name"], "volplane", "{rules}");
    assert!(group["rules"].as_array().is_some_and(|r| r.len() >= 10), "{rules}");
    assert!(
        group["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r["health"] == "ok"),
        "every rule evaluates: {rules}"
    );
    let active = prometheus.alerts();
    assert!(active.is_empty(), "no alert in normal operation: {active:#?}");

    // Faults: every ephemeral replica stops; the driver and its socket go.
    for replica in ephemeral_replicas.drain(..) {
        let (code, _) = replica.terminate().await;
        assert_eq!(code, Some(0));
    }
    driver.vanish();
    let faulted = std::time::Instant::now();
    let lease = [("lease", EPHEMERAL_LEASE)];
    prometheus
        .wait_for_alert("VolplaneNoLeader", &lease, true, Duration::from_secs(180))
        .await;
    println!(
        "VolplaneNoLeader fired {:?} after the last replica stopped",
        faulted.elapsed()
    );
    // One replica back: it leads, the alert resolves.
    let mut back = replica(&plane, &targets[2].pod, targets[2].port, &ephemeral);
    back.wait_for("volplane is ready").await;
    let returned = std::time::Instant::now();
    prometheus
        .wait_for_alert("VolplaneNoLeader", &lease, false, Duration::from_secs(120))
        .await;
    println!(
        "VolplaneNoLeader resolved {:?} after a replica was ready again",
        returned.elapsed()
    );

    let capacity_job = [("job", "volplane-capacity")];
    prometheus
        .wait_for_alert("VolplaneCapacityStale", &capacity_job, true, Duration::from_secs(420))
        .await;
    println!(
        "VolplaneCapacityStale fired {:?} after the driver went",
        faulted.elapsed()
    );
    let driver_name = [("driver_name", volplane_tests::e2e::HostPath::DRIVER)];
    prometheus
        .wait_for_alert(
            "VolplaneCSIDriverUnreachable",
            &driver_name,
            true,
            Duration::from_secs(300),
        )
        .await;
    println!(
        "VolplaneCSIDriverUnreachable fired {:?} after the driver went",
        faulted.elapsed()
    );
    // The capacity and health replicas kept their leases throughout.
    let leaderless: Vec<_> = prometheus
        .alerts()
        .into_iter()
        .filter(|(name, _, labels)| {
            name == "VolplaneNoLeader" && labels.get("lease").is_some_and(|l| l != EPHEMERAL_LEASE)
        })
        .collect();
    assert!(leaderless.is_empty(), "{leaderless:#?}");

    let (code, _) = back.terminate().await;
    assert_eq!(code, Some(0));
    for replica in capacity_replicas {
        let (code, _) = replica.terminate().await;
        assert_eq!(code, Some(0));
    }
}
