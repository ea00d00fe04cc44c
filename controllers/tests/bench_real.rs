//! Side-by-side benchmarks on a real control plane (ignored; run by hand):
//! volplane, the incumbent in the same run, and the API server's own limit.
//!
//! ```sh
//! VOLPLANE_E2E_BIN_DIR=$(../shared/k8s/install) cargo test --release -p volplane --test bench_real -- --ignored --nocapture --test-threads 1
//! ```
//!
//! Sizes: `VOLPLANE_BENCH_NODES` and `VOLPLANE_BENCH_CLASSES` (capacity,
//! default 100 nodes × 2 classes; csi-provisioner at its defaults, 1 QPS,
//! runs only up to 400 objects),
//! `VOLPLANE_BENCH_PODS` (ephemeral, default 2000; `VOLPLANE_BENCH_INCUMBENT=0`
//! leaves kube-controller-manager out), `VOLPLANE_BENCH_ARGS` (more
//! arguments for volplane's capacity runs), `VOLPLANE_BENCH_ROUNDS` (capacity:
//! raw and volplane alternate this many times, medians reported, default 3),
//! `VOLPLANE_BENCH_VOLUMES`
//! and `VOLPLANE_BENCH_WINDOW_SECONDS` (health, default 20 volumes, 30 s).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use serde_json::json;
use support::{Running, status_kib};
use volplane_tests::e2e::{ControlPlane, HostPath, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::process::{Process, cpu_seconds};
use volplane_tests::wait::eventually_some;

const PARALLEL: usize = 16;
const LIMIT: Duration = Duration::from_secs(600);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn namespace(client: &kube::Client, name: &str) {
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": name}}),
    )
    .await;
}

/// Peak RSS in MiB and CPU seconds of `pid`, for the report.
fn footprint(pid: u32) -> String {
    let peak = status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    format!("peak RSS {peak:.0} MiB, CPU {:.2} s", cpu_seconds(pid))
}

/// Runs `items` through `PARALLEL` workers, each with its own client (its own connections).
async fn in_parallel<F, Fut>(plane: &ControlPlane, items: Vec<usize>, work: F)
where
    F: Fn(kube::Client, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut lanes: Vec<Vec<usize>> = vec![Vec::new(); PARALLEL];
    for (i, item) in items.into_iter().enumerate() {
        lanes[i % PARALLEL].push(item);
    }
    let mut tasks = Vec::new();
    for lane in lanes {
        let client = plane.new_client().await.expect("client");
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            for item in lane {
                work(client.clone(), item).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
}

/// When the first and when all `want` CSIStorageCapacity objects were in
/// `namespace`, from `started` (polled every 50 ms).
#[derive(Clone, Copy)]
struct Published {
    first: Option<Duration>,
    all: Option<Duration>,
}

async fn capacity_objects_after(client: &kube::Client, namespace: &str, want: usize, started: Instant) -> Published {
    let api: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), namespace);
    let mut first = None;
    while started.elapsed() < LIMIT {
        let count = api
            .list_metadata(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if count > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if count >= want {
            return Published {
                first,
                all: Some(started.elapsed()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Published { first, all: None }
}

/// The median of `times` (a run that did not finish counts as the longest).
fn median(times: &[Option<Duration>]) -> Option<Duration> {
    let mut sorted: Vec<Duration> = times.iter().map(|t| t.unwrap_or(LIMIT)).collect();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().filter(|t| *t < LIMIT)
}

fn seconds(time: Option<Duration>) -> String {
    time.map_or_else(
        || format!("> {} s", LIMIT.as_secs()),
        |t| format!("{:.2} s", t.as_secs_f64()),
    )
}

fn provisioner(plane: &ControlPlane, name: &str, driver: &HostPath, namespace: &str, extra: &[&str]) -> Process {
    plane
        .start_csi_provisioner(name, driver, namespace, extra)
        .expect("start csi-provisioner")
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_process_start_to_all_objects_published() {
    let nodes = env_number("VOLPLANE_BENCH_NODES", 100);
    let classes = env_number("VOLPLANE_BENCH_CLASSES", 2).max(2);
    let want = nodes * classes;
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane");
    let client = plane.client();
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    for c in 2..classes {
        create(
            &Api::<StorageClass>::all(client.clone()),
            json!({"metadata": {"name": format!("fast-{c}")}, "provisioner": HostPath::DRIVER,
                   "volumeBindingMode": "WaitForFirstConsumer", "parameters": {"kind": "fast"}}),
        )
        .await;
    }
    let node_names: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    for node in &node_names {
        plane.add_hostpath_node(node).await.expect("node");
    }
    let driver = plane
        .start_hostpath("controller", &[("fast", "100Gi"), ("slow", "10Gi")])
        .await
        .expect("hostpathplugin");
    let address = driver.address();
    let rounds = env_number("VOLPLANE_BENCH_ROUNDS", 3).max(1);
    let extra = std::env::var("VOLPLANE_BENCH_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();

    // Raw and volplane alternate, each in a fresh namespace, so both see the
    // API server in the same state; the medians are reported.
    let (mut raw, mut ours, mut first, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ours_footprint = String::new();
    for round in 0..rounds {
        let raw_time = raw_creates(&plane, &format!("bench-raw-{round}"), &node_names, classes).await;
        let (published, used) = volplane_run(&plane, &address, &format!("bench-volplane-{round}"), &extra, want).await;
        if let Some(all) = published.all {
            ratios.push(format!("{:.2}", all.as_secs_f64() / raw_time.as_secs_f64()));
        }
        raw.push(Some(raw_time));
        ours.push(published.all);
        first.push(published.first);
        ours_footprint = used;
    }
    let listed = |times: &[Option<Duration>]| times.iter().map(|t| seconds(*t)).collect::<Vec<_>>().join(", ");
    let mut report = vec![
        (
            format!(
                "raw parallel creates (16 connections), median of {rounds} ({})",
                listed(&raw)
            ),
            median(&raw),
            String::new(),
        ),
        (
            format!(
                "volplane (defaults: flow control is the API server's), median of {rounds} ({})",
                listed(&ours)
            ),
            median(&ours),
            ours_footprint,
        ),
        (
            format!(
                "  first object at ({}); ratio to raw in the same round ({})",
                listed(&first),
                ratios.join(", ")
            ),
            median(&first),
            String::new(),
        ),
    ];

    let mut qps200 = extra.clone();
    qps200.extend(["--kube-api-qps", "200"]);
    let (published, used) = volplane_run(&plane, &address, "bench-volplane-qps200", &qps200, want).await;
    report.push((
        "volplane (--kube-api-qps 200, the old fixed default)".to_string(),
        published.all,
        used,
    ));

    let slow = [("csi-provisioner (defaults)", "bench-provisioner", &[][..])];
    let slow = if want <= 400 { &slow[..] } else { &[] };
    if want > 400 {
        report.push((
            "csi-provisioner (defaults): skipped, 1 QPS needs > 1 s per object".into(),
            None,
            String::new(),
        ));
    }
    for (name, namespace_name, extra) in slow.iter().copied().chain([(
        "csi-provisioner (--kube-api-capacity-qps 200 --kube-api-capacity-burst 400 --capacity-threads 16)",
        "bench-provisioner-tuned",
        &[
            "--kube-api-capacity-qps=200",
            "--kube-api-capacity-burst=400",
            "--capacity-threads=16",
        ][..],
    )]) {
        namespace(&client, namespace_name).await;
        let mut args = vec!["--enable-capacity", "--capacity-ownerref-level=-1"];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let process = provisioner(&plane, namespace_name, &driver, namespace_name, &args);
        let time = capacity_objects_after(&client, namespace_name, want, started).await.all;
        report.push((name.to_string(), time, footprint(process.pid())));
    }

    println!(
        "\ncapacity: {nodes} nodes × {classes} classes = {want} CSIStorageCapacity objects, process start → all published"
    );
    for (name, time, footprint) in report {
        println!("  {name:<100} {:>10}  {footprint}", seconds(time));
    }
}

/// The API server's own limit: one object per (node, class) into
/// `namespace` from 16 parallel connections; the time they took.
async fn raw_creates(plane: &ControlPlane, namespace_name: &str, nodes: &[String], classes: usize) -> Duration {
    namespace(&plane.client(), namespace_name).await;
    let api_namespace = namespace_name.to_string();
    let nodes = nodes.to_vec();
    let started = Instant::now();
    in_parallel(plane, (0..nodes.len() * classes).collect(), move |client, i| {
        let node = nodes[i / classes].clone();
        let api: Api<CSIStorageCapacity> = Api::namespaced(client, &api_namespace);
        async move {
            create(
                &api,
                json!({"metadata": {"generateName": "csisc-", "labels": {"csi.storage.k8s.io/managed-by": "raw"}},
                       "storageClassName": if i % 2 == 0 { "fast" } else { "slow" },
                       "nodeTopology": {"matchLabels": {HostPath::TOPOLOGY_KEY: node}},
                       "capacity": "100Gi", "maximumVolumeSize": "100Gi"}),
            )
            .await;
        }
    })
    .await;
    started.elapsed()
}

/// Starts volplane's capacity controller for `namespace` (with `extra`
/// arguments) and waits for its `want` objects; its footprint at the end.
async fn volplane_run(
    plane: &ControlPlane,
    address: &str,
    namespace_name: &str,
    extra: &[&str],
    want: usize,
) -> (Published, String) {
    let client = plane.client();
    namespace(&client, namespace_name).await;
    let mut args = vec![
        "--controllers=capacity",
        "--csi-address",
        address,
        "--namespace",
        namespace_name,
        "--capacity-owner",
        "none",
        "--leader-election=false",
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let volplane = Running::start(plane.kubeconfig(), &args);
    let published = capacity_objects_after(&client, namespace_name, want, started).await;
    (published, footprint(volplane.pid()))
}

/// Creates `pods` pods with one generic ephemeral volume each in `namespace`
/// from 16 parallel connections, and returns (last pod created, last claim seen).
async fn pods_to_claims(plane: &ControlPlane, namespace_name: &str, pods: usize) -> (Instant, Option<Instant>) {
    let client = plane.client();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace_name);
    let seen = tokio::spawn(async move {
        let mut names = BTreeSet::new();
        let stream = watcher::watcher(claims, watcher::Config::default()).boxed();
        let mut stream = stream;
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await else {
                continue;
            };
            if let Ok(watcher::Event::Apply(claim) | watcher::Event::InitApply(claim)) = event
                && let Some(name) = claim.metadata.name
            {
                names.insert(name);
                if names.len() >= pods {
                    return Some(Instant::now());
                }
            }
        }
        None
    });
    let namespace_owned = namespace_name.to_string();
    in_parallel(plane, (0..pods).collect(), move |client, i| {
        let namespace_owned = namespace_owned.clone();
        async move {
            let api: Api<Pod> = Api::namespaced(client, &namespace_owned);
            create(
                &api,
                json!({"metadata": {"name": format!("pod-{i}")},
                       "spec": {"schedulerName": "bench-unscheduled",
                                "containers": [{"name": "c", "image": "registry.invalid/none"}],
                                "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                                    "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}),
            )
            .await;
        }
    })
    .await;
    let last_pod = Instant::now();
    (last_pod, seen.await.expect("watch"))
}

/// Waits until the ephemeral controller in charge answers a probe pod.
async fn wait_until_serving(client: &kube::Client, namespace_name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace_name);
    create(
        &pods,
        json!({"metadata": {"name": "probe"},
               "spec": {"schedulerName": "bench-unscheduled", "containers": [{"name": "c", "image": "registry.invalid/none"}],
                        "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace_name);
    eventually_some(Duration::from_secs(120), "the controller serves", || async {
        claims.get("probe-data").await.ok().map(|_| ())
    })
    .await;
    pods.delete("probe", &Default::default()).await.expect("delete probe");
    // Garbage collection may have removed it with its pod already.
    match claims.delete("probe-data", &Default::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => panic!("delete probe claim: {error}"),
    }
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_last_pod_to_last_claim() {
    let pods = env_number("VOLPLANE_BENCH_PODS", 2000);
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane");
    let client = plane.client();
    let mut report = Vec::new();

    for (name, namespace_name, extra) in [
        ("volplane (defaults)", "bench-volplane", &[][..]),
        (
            "volplane --kube-api-qps 200",
            "bench-volplane-qps",
            &["--kube-api-qps", "200"][..],
        ),
    ] {
        namespace(&client, namespace_name).await;
        let mut args = vec![
            "--controllers=ephemeral",
            "--namespace",
            namespace_name,
            "--leader-election=false",
        ];
        args.extend_from_slice(extra);
        let volplane = Running::start(plane.kubeconfig(), &args);
        wait_until_serving(&client, namespace_name).await;
        let (last_pod, last_claim) = pods_to_claims(&plane, namespace_name, pods).await;
        report.push((
            name,
            last_claim.map(|c| c.saturating_duration_since(last_pod)),
            footprint(volplane.pid()),
        ));
    }

    // VOLPLANE_BENCH_INCUMBENT=0 measures volplane alone (e.g. its memory at 10,000 pods).
    let incumbent = env_number("VOLPLANE_BENCH_INCUMBENT", 1) != 0;
    let incumbents = [
        ("kube-controller-manager (defaults)", "bench-kcm", &[][..]),
        (
            "kube-controller-manager --kube-api-qps 200",
            "bench-kcm-qps",
            &["--kube-api-qps=200", "--kube-api-burst=400"][..],
        ),
    ];
    for (name, namespace_name, extra) in incumbents.into_iter().filter(|_| incumbent) {
        namespace(&client, namespace_name).await;
        let kcm = plane
            .start_controller_manager_with(namespace_name, "ephemeral-volume-controller", extra)
            .expect("kube-controller-manager");
        wait_until_serving(&client, namespace_name).await;
        let (last_pod, last_claim) = pods_to_claims(&plane, namespace_name, pods).await;
        report.push((
            name,
            last_claim.map(|c| c.saturating_duration_since(last_pod)),
            footprint(kcm.pid()),
        ));
    }

    println!("\nephemeral: {pods} pods from {PARALLEL} parallel clients, last pod created → last PVC seen");
    for (name, time, footprint) in report {
        println!("  {name:<45} {:>10}  {footprint}", seconds(time));
    }
}

/// Occurrences of events with `reason` per regarding object, by who reported them.
async fn events_by_reporter(
    client: &kube::Client,
    namespace_name: &str,
    reason: &str,
) -> BTreeMap<String, BTreeMap<String, usize>> {
    let events = Api::<Event>::namespaced(client.clone(), namespace_name)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items;
    let mut by: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for event in events.into_iter().filter(|e| e.reason.as_deref() == Some(reason)) {
        let reporter = event
            .reporting_controller
            .clone()
            .filter(|r| !r.is_empty())
            .or_else(|| event.deprecated_source.as_ref().and_then(|s| s.component.clone()))
            .unwrap_or_default();
        let count = event
            .series
            .as_ref()
            .map(|s| s.count)
            .or(event.deprecated_count)
            .unwrap_or(1);
        let regarding = event.regarding.and_then(|r| r.name).unwrap_or_default();
        *by.entry(reporter).or_default().entry(regarding).or_default() += usize::try_from(count).unwrap_or(1);
    }
    by
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_events_per_abnormal_volume_over_a_window() {
    let volumes = env_number("VOLPLANE_BENCH_VOLUMES", 20);
    let window = Duration::from_secs(env_number("VOLPLANE_BENCH_WINDOW_SECONDS", 30) as u64);
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane");
    let client = plane.client();
    let ns = "bench-health";
    namespace(&client, ns).await;
    namespace(&client, "volplane").await;
    plane.add_hostpath_node("node-1").await.expect("node");
    create(
        &Api::<StorageClass>::all(client.clone()),
        json!({"metadata": {"name": "hostpath"}, "provisioner": HostPath::DRIVER, "volumeBindingMode": "Immediate"}),
    )
    .await;
    let driver = plane.start_hostpath("node-1", &[]).await.expect("hostpathplugin");
    let _provisioner = provisioner(&plane, "csi-provisioner", &driver, ns, &[]);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for i in 0..volumes {
        create(
            &claims,
            json!({"metadata": {"name": format!("data-{i}")},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hostpath",
                            "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
    }
    let handles = eventually_some(Duration::from_secs(120), "every claim bound", || async {
        let pvs = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
            .list(&ListParams::default())
            .await
            .ok()?
            .items;
        let bound: Vec<String> = pvs
            .into_iter()
            .filter(|pv| pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .filter_map(|pv| Some(pv.spec?.csi?.volume_handle))
            .collect();
        (bound.len() >= volumes).then_some(bound)
    })
    .await;
    for handle in &handles {
        std::fs::remove_dir_all(driver.state_dir().join(handle)).expect("remove the volume's directory");
    }

    let started = Instant::now();
    let volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=health",
            "--csi-address",
            &driver.address(),
            "--namespace",
            "volplane",
            "--leader-election=false",
            "--health-list-interval",
            "5s",
        ],
    );
    let monitor_binary =
        volplane_tests::e2e::find_binary(plane.bin_dir(), "csi-external-health-monitor-controller").expect("monitor");
    let monitor = plane
        .start_process(
            "external-health-monitor",
            &monitor_binary.to_string_lossy(),
            &[
                format!("--csi-address={}", driver.socket().display()),
                format!("--kubeconfig={}", plane.kubeconfig().display()),
                "--list-volumes-interval=5s".into(),
            ],
        )
        .expect("external-health-monitor");
    // A benchmark window, not a settle time: both run side by side for it.
    tokio::time::sleep(window).await;
    let elapsed = started.elapsed();
    let by = events_by_reporter(&client, ns, "VolumeConditionAbnormal").await;
    println!(
        "\nhealth: {volumes} abnormal volumes, ListVolumes every 5 s, {:.0} s side by side: VolumeConditionAbnormal occurrences",
        elapsed.as_secs_f64()
    );
    for (reporter, per_claim) in &by {
        let total: usize = per_claim.values().sum();
        println!(
            "  {reporter:<55} {total:>5} events on {:>3} claims = {:.1} per volume",
            per_claim.len(),
            total as f64 / volumes as f64
        );
    }
    println!(
        "  volplane: {}; external-health-monitor: {}",
        footprint(volplane.pid()),
        footprint(monitor.pid())
    );
}
