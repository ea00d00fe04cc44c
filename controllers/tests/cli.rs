//! The `volplane` binary as an operator meets it: flags, startup errors,
//! startup against an API server and a CSI driver, and SIGTERM.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use volplane_csi::CsiMethod;
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver};

use support::{Running, http_get, volplane};

fn error_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

fn assert_no_panic(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

/// An API server for the startup check: the in-process double.
async fn api_server() -> ApiServerDouble {
    ApiServerDouble::start().await.expect("API-server double")
}

fn write_kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n\
         users:\n- name: test\n  user:\n    token: test-token\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: volplane-test\n\
         current-context: test\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

async fn run_to_exit(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn volplane");
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(limit, waiting).await {
        Ok(output) => output.expect("join").expect("wait"),
        Err(_) => panic!("volplane did not exit within {limit:?}"),
    }
}

#[tokio::test]
async fn an_unknown_flag_is_one_line_and_exit_code_2() {
    let mut command = volplane();
    command.arg("--bogus-flag");
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("'--bogus-flag'"), "{stderr}");
}

#[tokio::test]
async fn an_unknown_controller_names_the_valid_ones() {
    let mut command = volplane();
    command.args(["--controllers", "capacity,frobnicate"]);
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("[possible values: capacity, ephemeral, health, placements]"),
        "{stderr}"
    );
}

#[tokio::test]
async fn version_prints_the_crate_version() {
    let mut command = volplane();
    command.arg("--version");
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("volplane {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn a_missing_csi_socket_is_one_clear_error_line() {
    let api = api_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let mut command = volplane();
    command
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--csi-address", "/nonexistent", "--csi-startup-timeout", "1s"]);
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1));
    assert_no_panic(&output);
    let errors = error_lines(&output);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("unix:///nonexistent"), "{}", errors[0]);
    assert!(errors[0].contains("did not become ready within 1s"), "{}", errors[0]);
    assert!(errors[0].contains("No such file or directory"), "{}", errors[0]);
}

#[tokio::test]
async fn an_unreachable_api_server_is_one_clear_error_line() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &format!("http://{closed}"));
    let mut command = volplane();
    command.arg("--kubeconfig").arg(&kubeconfig);
    let output = run_to_exit(command, Duration::from_secs(60)).await;
    assert_eq!(output.status.code(), Some(1));
    assert_no_panic(&output);
    let errors = error_lines(&output);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains(&format!("cannot reach the Kubernetes API server at http://{closed}")),
        "{}",
        errors[0]
    );
}

#[tokio::test]
async fn a_missing_kubeconfig_file_is_one_clear_error_line() {
    let mut command = volplane();
    command.args(["--kubeconfig", "/nonexistent/kubeconfig"]);
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1));
    let errors = error_lines(&output);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("error: cannot read kubeconfig /nonexistent/kubeconfig"),
        "{}",
        errors[0]
    );
}

/// A namespace for volplane's objects, one node in zone a with a CSINode
/// for `driver`, and a WaitForFirstConsumer class of that driver.
/// Creates the kubeconfig's namespace, `volplane-test`.
async fn create_namespace(api: &ApiServerDouble) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "volplane-test"}})).expect("ns");
    Api::<Namespace>::all(api.client())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

async fn seed_cluster(api: &ApiServerDouble, driver: &str) {
    let client = api.client();
    create_namespace(api).await;
    let node: Node =
        serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}})).expect("node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("node");
    let csinode: CSINode = serde_json::from_value(json!({"metadata": {"name": "n1"},
        "spec": {"drivers": [{"name": driver, "nodeID": "n1", "topologyKeys": ["zone"]}]}}))
    .expect("csinode");
    Api::<CSINode>::all(client.clone())
        .create(&PostParams::default(), &csinode)
        .await
        .expect("csinode");
    let csidriver: CSIDriver =
        serde_json::from_value(json!({"metadata": {"name": driver}, "spec": {"storageCapacity": true}}))
            .expect("csidriver");
    Api::<CSIDriver>::all(client.clone())
        .create(&PostParams::default(), &csidriver)
        .await
        .expect("csidriver");
    let class: StorageClass = serde_json::from_value(json!({"metadata": {"name": "wffc"}, "provisioner": driver,
        "volumeBindingMode": "WaitForFirstConsumer"}))
    .expect("class");
    Api::<StorageClass>::all(client)
        .create(&PostParams::default(), &class)
        .await
        .expect("class");
}

/// The first CSIStorageCapacity in `volplane-test`, waiting up to 20 s for one.
async fn first_published_capacity(api: &ApiServerDouble) -> CSIStorageCapacity {
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(api.client(), "volplane-test");
    volplane_tests::wait::eventually_some(Duration::from_secs(20), "a CSIStorageCapacity is published", || {
        let capacities = capacities.clone();
        async move {
            capacities
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .next()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_against_api_server_and_driver_then_exits_cleanly_on_sigterm() {
    let api = api_server().await;
    let driver = TestDriver::start(DriverConfig {
        name: "cli.csi.volplane.dev".into(),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(5 << 30));
    seed_cluster(&api, "cli.csi.volplane.dev").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let mut running = Running::start(
        &kubeconfig,
        &["--csi-address", &driver.address(), "--http-endpoint", "127.0.0.1:0"],
    );
    let admin = running.admin_address().await;
    let found = running.wait_for("CSI driver found").await;
    assert!(found.contains("cli.csi.volplane.dev"), "{found}");
    assert!(found.contains("GET_CAPACITY"), "{found}");
    running.wait_for("volplane is ready").await;

    assert_eq!(http_get(admin, "/livez").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);
    // The capacity controller published the one (segment, class) pair.
    let published = first_published_capacity(&api).await;
    assert_eq!(published.storage_class_name, "wffc");
    assert_eq!(published.capacity.map(|q| q.0).as_deref(), Some("5Gi"));

    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("volplane_build_info{version=\""), "{metrics}");
    assert!(metrics.contains("volplane_capacity_objects_desired 1"), "{metrics}");
    assert!(metrics.contains("volplane_capacity_enabled 1"), "{metrics}");

    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_without_get_capacity_is_reported_once_and_the_process_stays_up() {
    let api = api_server().await;
    let driver = TestDriver::start(DriverConfig {
        name: "nocap.csi.volplane.dev".into(),
        controller_capabilities: vec![],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let mut running = Running::start(
        &kubeconfig,
        &["--csi-address", &driver.address(), "--http-endpoint", "127.0.0.1:0"],
    );
    let admin = running.admin_address().await;
    let said = running.wait_for("GET_CAPACITY").await;
    assert!(
        said.contains("nocap.csi.volplane.dev") && said.contains("stays idle"),
        "{said}"
    );
    running.wait_for("volplane is ready").await;
    assert_eq!(http_get(admin, "/readyz").0, 200);
    assert_eq!(driver.count(volplane_csi::CsiMethod::GetCapacity), 0);

    let (code, seen) = running.terminate().await;
    assert_eq!(code, Some(0));
    // Said once, not in a loop.
    assert_eq!(seen.iter().filter(|l| l.contains("GET_CAPACITY")).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_request_passes_the_client_side_rate_limit() {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
    let api = api_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let client = api.client();
    create_namespace(&api).await;
    let mut running = Running::start(
        &kubeconfig,
        &[
            "--controllers",
            "ephemeral",
            "--kube-api-qps",
            "20",
            "--kube-api-burst",
            "4",
        ],
    );
    running.wait_for("volplane is ready").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..24 {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i}")},
            "spec": {"containers": [], "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}))
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("pod");
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while claims.list(&ListParams::default()).await.expect("list").items.len() < 24 {
        assert!(tokio::time::Instant::now() < deadline, "claims not created");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));

    // volplane's creates: at most `burst` per `burst / qps` = 4 per 200 ms
    // window, so any span of n windows holds at most 4·(n + 1) of them.
    let creates: Vec<std::time::Instant> = api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "persistentvolumeclaims" && r.verb == volplane_tests::apiserver::Verb::Create)
        .map(|r| r.at)
        .collect();
    assert_eq!(creates.len(), 24);
    let span = creates[creates.len() - 1].duration_since(creates[0]);
    let windows = span.as_secs_f64() / 0.2;
    assert!(
        24.0 <= 4.0 * (windows.ceil() + 1.0),
        "24 creates in {span:?} exceed 4 per 200 ms"
    );
}

/// volplane in per-node mode on node `n1` of a seeded double, its objects
/// owned by the Node (`--capacity-owner node`), with a driver
/// `name` whose NodeGetInfo reports `topology`. Keep the directory alive:
/// it holds the kubeconfig.
async fn start_per_node(
    name: &str,
    topology: BTreeMap<String, String>,
) -> (ApiServerDouble, TestDriver, tempfile::TempDir, Running) {
    let api = api_server().await;
    let driver = TestDriver::start(DriverConfig {
        name: name.into(),
        node_id: "n1".into(),
        node_topology: Some(topology),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(3 << 30));
    seed_cluster(&api, name).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let running = Running::start(
        &kubeconfig,
        &[
            "--csi-address",
            &driver.address(),
            "--node-deployment",
            "--node-name",
            "n1",
            // No pod here to walk up to a DaemonSet (`auto`, see e2e_node).
            "--capacity-owner",
            "node",
        ],
    );
    (api, driver, dir, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_mode_publishes_this_nodes_segment_owned_by_the_node() {
    let (api, driver, _dir, mut running) =
        start_per_node("node.csi.volplane.dev", volplane_tests::driver::labels([("zone", "a")])).await;
    running.wait_for("volplane is ready").await;
    let published = first_published_capacity(&api).await;
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));

    let labels = published.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("csi.storage.k8s.io/managed-by").map(String::as_str),
        Some("volplane-n1")
    );
    assert_eq!(
        published.node_topology.and_then(|t| t.match_labels),
        Some(volplane_tests::driver::labels([("zone", "a")]))
    );
    let owners = published.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!((owners[0].kind.as_str(), owners[0].name.as_str()), ("Node", "n1"));
    // The driver's own segment is sent back to it.
    let sent = driver.capacity_requests();
    assert!(
        sent.iter()
            .all(|r| r.accessible_topology.as_ref().map(|t| t.segments.clone())
                == Some(volplane_tests::driver::labels([("zone", "a")])))
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let mut command = volplane();
    command.args(["--log-format", "json", "--kubeconfig", "/nonexistent/kubeconfig"]);
    let output = run_to_exit(command, Duration::from_secs(30)).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logs: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("error:")).collect();
    assert!(!logs.is_empty(), "{stderr}");
    for line in logs {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(value["level"].is_string() && value["timestamp"].is_string(), "{line}");
    }
    assert!(stderr.contains("\"message\":\"volplane starting\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_synced_caches_and_metrics_parse_as_prometheus_text() {
    let api = api_server().await;
    create_namespace(&api).await;
    // The pod list fails until the test lets it through: no sync, not ready.
    api.fail_next(Some(Verb::List), Some("pods"), 100_000, 500);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let mut running = Running::start(
        &kubeconfig,
        &["--controllers", "ephemeral", "--http-endpoint", "127.0.0.1:0"],
    );
    let admin = running.admin_address().await;
    volplane_tests::wait::eventually(Duration::from_secs(20), "two failed pod lists", || {
        api.count(Verb::List, "pods") >= 2
    })
    .await;
    assert_eq!(http_get(admin, "/livez").0, 200, "alive while not ready");
    assert_eq!(http_get(admin, "/readyz").0, 503, "not ready before the caches synced");
    api.clear_faults();
    volplane_tests::wait::eventually(Duration::from_secs(20), "/readyz turns 200", || {
        http_get(admin, "/readyz").0 == 200
    })
    .await;

    running.wait_for("started leading").await;
    let (status, text) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(value("process_resident_memory_bytes") > 1_000_000.0);
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_open_fds") >= 3.0);
    assert_eq!(value("volplane_build_info"), 1.0);
    assert_eq!(value("volplane_leader_election_leading"), 1.0, "a lone replica leads");
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_write_is_one_debug_line_naming_verb_resource_and_object() {
    use k8s_openapi::api::core::v1::Pod;
    let api = api_server().await;
    create_namespace(&api).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let mut command = volplane();
    command
        .env("RUST_LOG", "info,volplane::audit=debug")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--controllers", "ephemeral", "--leader-election=false"]);
    let mut running = Running::spawn(command);
    running.wait_for("volplane is ready").await;
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "audited"},
        "spec": {"containers": [], "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}))
    .expect("pod");
    Api::<Pod>::namespaced(api.client(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let line = running.wait_for("API write").await;
    for part in [
        "verb=\"create\"",
        "resource=persistentvolumeclaims",
        "namespace=\"default\"",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
    let (code, lines) = running.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(
        lines.iter().filter(|l| l.contains("API write")).count(),
        1,
        "exactly one write (no leases without election): {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_node_topology_the_api_server_would_reject_is_reported_once_and_never_retried() {
    // A value no label may have: too long, a space, non-ASCII.
    let (api, driver, _dir, mut running) = start_per_node(
        "badtopo.csi.volplane.dev",
        volplane_tests::driver::labels([("zone", &"zöne a".repeat(20))]),
    )
    .await;
    let reported = running
        .wait_for("cannot store as a CSIStorageCapacity nodeTopology")
        .await;
    assert!(reported.contains("not a valid label value"), "{reported}");
    running.wait_for("capacity controller idle").await;
    let event = volplane_tests::wait::eventually_some(Duration::from_secs(20), "InvalidTopology on the Node", || {
        let client = api.client();
        async move {
            volplane_tests::events::occurrences(&client, "default")
                .await
                .ok()?
                .into_iter()
                .find(|(reason, regarding, _)| reason == "InvalidTopology" && regarding == "n1")
        }
    })
    .await;
    assert!(event.2.len() <= 1024, "{}", event.2.len());
    let (code, lines) = running.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    assert_eq!(driver.count(CsiMethod::GetCapacity), 0);
    let objects = Api::<CSIStorageCapacity>::all(api.client())
        .list(&Default::default())
        .await
        .expect("list");
    assert!(objects.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_and_unavailable_requests_are_retried_and_nothing_is_lost() {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
    let api = api_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &api.url());
    let client = api.client();
    create_namespace(&api).await;
    // The first pod list gets 503 twice; the first claims 429 (Retry-After: 1) three times.
    api.fail_next(Some(Verb::List), Some("pods"), 2, 503);
    api.fail_next(Some(Verb::Create), Some("persistentvolumeclaims"), 3, 429);
    let mut running = Running::start(
        &kubeconfig,
        &["--controllers", "ephemeral", "--http-endpoint", "127.0.0.1:0"],
    );
    let admin = running.admin_address().await;
    running.wait_for("volplane is ready").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i}")},
            "spec": {"containers": [], "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}))
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("pod");
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    volplane_tests::wait::eventually_some(Duration::from_secs(30), "every claim", || {
        let claims = claims.clone();
        async move { (claims.list(&ListParams::default()).await.ok()?.items.len() == 5).then_some(()) }
    })
    .await;
    let retried = |verb: &str, code: &str| {
        support::metric_value(admin, "volplane_api_retries_total", &[("verb", verb), ("code", code)])
    };
    assert_eq!(retried("GET", "503"), 2.0);
    assert_eq!(retried("POST", "429"), 3.0);
    // Retried below the controller: no failure reached it, no Warning went out.
    assert_eq!(
        support::metric_value(admin, "volplane_ephemeral_claim_failures_total", &[]),
        0.0
    );
    let warnings = volplane_tests::events::occurrences(&client, "default")
        .await
        .expect("events");
    assert!(warnings.is_empty(), "{warnings:?}");
    // The double does no flow control: the default client-side bucket applies.
    assert_eq!(support::metric_value(admin, "volplane_api_flow_control", &[]), 0.0);
    assert_eq!(support::metric_value(admin, "volplane_api_client_qps", &[]), 200.0);
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));
}
