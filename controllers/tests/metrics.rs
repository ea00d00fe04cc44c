//! `/metrics` as a scraper sees it: in the format it asks for, and with
//! exactly the metrics README.md's table names, over the processes volplane
//! runs as (central capacity, health and ephemeral; per-node capacity and
//! health; placements), against the API-server double and the test driver.
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::json;
use volplane_csi::{ControllerCapability, NodeCapability};
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, TestVolume};
use volplane_tests::objects;

use support::Running;

const DRIVER: &str = "metrics.csi.volplane.dev";
const NAMESPACE: &str = "volplane-test";

/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` with `accept`: the Content-Type and the body.
fn scrape(address: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(address).expect("connect admin server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: volplane\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .expect("a Content-Type");
    (content_type, body.to_string())
}

/// Checks `text` is the Prometheus text format 0.0.4 as a strict reader
/// takes it: every sample belongs to the family of the `# TYPE` before it
/// (a histogram's with `_bucket`, `_sum`, `_count`), counters are named by
/// their `_total` samples, a `# HELP` names the family that follows, no
/// OpenMetrics-only line; and, where promtool is installed, that
/// `promtool check metrics` finds nothing to say.
fn check_text_format(text: &str) {
    let mut family: Option<(&str, &str)> = None;
    let mut help: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_whitespace().next();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                kind != "counter" || name.ends_with("_total"),
                "counter {name} without _total"
            );
            assert_eq!(help.take(), Some(name), "the HELP before {line}");
            family = Some((name, kind));
        } else {
            assert!(!line.starts_with('#'), "not in the text format: {line}");
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let (family_name, kind) = family.unwrap_or_else(|| panic!("{line} before any # TYPE"));
            let suffix = name
                .strip_prefix(family_name)
                .unwrap_or_else(|| panic!("{line} not of {family_name}"));
            let allowed: &[&str] = if kind == "histogram" {
                &["_bucket", "_sum", "_count"]
            } else {
                &[""]
            };
            assert!(allowed.contains(&suffix), "{line} in {kind} {family_name}");
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}: value {value:?}");
        }
    }
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return;
    };
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = promtool.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The metric families of a text-format exposition (their `# TYPE` names).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every metric named in the first column of README.md's metric table.
fn documented() -> BTreeSet<String> {
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Metrics\n").nth(1).expect("a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .filter_map(|line| line.split('|').nth(1))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn seed(api: &ApiServerDouble) {
    let client = api.client();
    objects::create(
        &kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    objects::create(
        &kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
        json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}}),
    )
    .await;
    objects::create(
        &kube::Api::<k8s_openapi::api::storage::v1::CSINode>::all(client.clone()),
        json!({"metadata": {"name": "n1"},
               "spec": {"drivers": [{"name": DRIVER, "nodeID": "n1", "topologyKeys": ["zone"]}]}}),
    )
    .await;
    objects::create(
        &kube::Api::<k8s_openapi::api::storage::v1::CSIDriver>::all(client.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}),
    )
    .await;
    objects::create(
        &kube::Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client),
        json!({"metadata": {"name": "wffc"}, "provisioner": DRIVER, "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
}

/// Volume `pv-0` (claim `apps/data`, abnormal) used by a pod on `n1`, and a
/// claim the scheduler placed on `n1` that is not bound yet: something for
/// every controller to count.
async fn workload(api: &ApiServerDouble, driver: &TestDriver) {
    let client = api.client();
    objects::create(
        &kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()),
        json!({"metadata": {"name": "apps"}}),
    )
    .await;
    driver.put_volume(
        "h-pv-0",
        TestVolume {
            bytes: Some((600, 1000, 400)),
            inodes: Some((50, 100, 50)),
            ..TestVolume::abnormal("read-only file system")
        },
    );
    let pvs = kube::Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone());
    pvs.create(&Default::default(), &objects::bound_pv("pv-0", DRIVER, "apps", "data"))
        .await
        .expect("pv");
    let claims = kube::Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client.clone(), "apps");
    claims
        .create(&Default::default(), &objects::bound_claim("data", "apps", "pv-0"))
        .await
        .expect("claim");
    objects::create(
        &claims,
        json!({"metadata": {"name": "placed", "annotations": {"volume.kubernetes.io/selected-node": "n1"}},
               "spec": {"storageClassName": "wffc", "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client, "apps")
        .create(
            &Default::default(),
            &objects::pod_using("here", "apps", "n1", &["data"]),
        )
        .await
        .expect("pod");
}

/// The union of the metric families the processes at `admins` expose, once
/// it holds every one in `wanted` (or after 30 s).
async fn exposed_by(admins: &[SocketAddr], wanted: &BTreeSet<String>) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let exposed: BTreeSet<String> = admins
            .iter()
            .flat_map(|admin| families(&scrape(*admin, None).1))
            .collect();
        if wanted.is_subset(&exposed) || tokio::time::Instant::now() > deadline {
            return exposed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_text_unless_openmetrics_is_asked_for_and_readme_names_every_one() {
    let api = ApiServerDouble::start().await.expect("double");
    seed(&api).await;
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![
            ControllerCapability::GetCapacity,
            ControllerCapability::ListVolumes,
            ControllerCapability::GetVolume,
            ControllerCapability::VolumeCondition,
        ],
        node_capabilities: Some(vec![NodeCapability::GetVolumeStats, NodeCapability::VolumeCondition]),
        node_id: "n1".into(),
        node_topology: Some([("zone".to_string(), "a".to_string())].into()),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(5 << 30));
    // A driver without volume conditions: its health controller stays idle.
    let plain = TestDriver::start(DriverConfig::default()).await.expect("driver");
    workload(&api, &driver).await;
    // One throttled pod list: a retry to count.
    api.fail_next(Some(Verb::List), Some("pods"), 1, 429);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let common = ["--namespace", NAMESPACE, "--http-endpoint", "127.0.0.1:0"];
    let (address, plain_address) = (driver.address(), plain.address());
    let csi = ["--csi-address", &address];
    let node = ["--node-deployment", "--node-name", "n1", "--capacity-owner", "node"];
    let node_health = ["--health-monitor-interval", "200ms", "--kubelet-dir", "/srv/kubelet"];
    let processes: [Vec<&str>; 4] = [
        [&["--controllers", "capacity,ephemeral,health"][..], &csi, &common].concat(),
        [
            &["--controllers", "capacity,health"][..],
            &node,
            &node_health,
            &csi,
            &common,
        ]
        .concat(),
        [&["--controllers", "placements"][..], &common].concat(),
        [
            &["--controllers", "health", "--csi-address", &plain_address][..],
            &common,
        ]
        .concat(),
    ];
    let mut admins = Vec::new();
    let mut running = Vec::new();
    for args in &processes {
        let mut process = Running::start(&kubeconfig, args);
        let admin = process.admin_address().await;
        process.wait_for("volplane is ready").await;

        let (content_type, text) = scrape(admin, None);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "{args:?}");
        assert!(!text.contains("# EOF"), "the text format has no EOF: {args:?}\n{text}");
        check_text_format(&text);

        let (content_type, openmetrics) = scrape(admin, Some(PROMETHEUS_ACCEPT));
        assert_eq!(
            content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{args:?}"
        );
        assert!(openmetrics.ends_with("# EOF\n"), "{args:?}\n{openmetrics}");
        admins.push(admin);
        running.push(process);
    }

    let documented = documented();
    let exposed = exposed_by(&admins, &documented).await;
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exposed).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "README.md's metric table and /metrics differ:\n  exposed, not in the table: {undocumented:?}\n  in the table, not exposed: {missing:?}"
    );
    for process in running {
        let (code, _) = process.terminate().await;
        assert_eq!(code, Some(0));
    }
}
