//! Side-by-side benchmarks on a real control plane (ignored; run by hand):
//! volplane, the incumbent in the same run, and the API server's own limit.
//!
//! ```sh
//! VOLPLANE_E2E_BIN_DIR=$(../shared/k8s/install) cargo test --release -p volplane --test bench_real -- --ignored --nocapture --test-threads 1
//! ```
//!
//! Sizes and knobs (environment):
//! - capacity: `VOLPLANE_BENCH_NODES` × `VOLPLANE_BENCH_CLASSES` objects
//!   (default 100 × 2; the issue's sizes are 1,000 × 4 and 5,000 × 4),
//!   `VOLPLANE_BENCH_ROUNDS` (raw and volplane alternate, medians reported,
//!   default 3), `VOLPLANE_BENCH_RAW_IN_FLIGHT` (the raw client's requests
//!   in flight, default 32), `VOLPLANE_BENCH_POLL_SECONDS` (volplane's poll
//!   interval for the steady-state figure, default 30), `VOLPLANE_BENCH_ARGS`
//!   (more flags for volplane); csi-provisioner at its defaults (1 QPS) runs
//!   only up to 400 objects;
//! - per-node reads: `VOLPLANE_BENCH_NODES` nodes and `VOLPLANE_BENCH_VOLUMES` PVs;
//! - ephemeral: `VOLPLANE_BENCH_PODS` pods (default 2,000) in bursts of
//!   `VOLPLANE_BENCH_BURST` (default 2,000); `VOLPLANE_BENCH_INCUMBENT=0`
//!   leaves kube-controller-manager out;
//! - health: `VOLPLANE_BENCH_VOLUMES` (default 20 for the events window,
//!   10,000 for the sweep) and `VOLPLANE_BENCH_WINDOW_SECONDS` (default 30);
//! - capacity under a burst: `VOLPLANE_BENCH_BURST_PODS` (default 95) pods
//!   with a 10Gi claim each on 10 nodes of uneven node-local storage;
//!   `VOLPLANE_BENCH_BURST_ONLY` (`volplane`, `csi-provisioner` or `no`)
//!   runs one column alone, to look into it.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use support::{Running, http_get, status_kib};
use volplane_csi::ControllerCapability;
use volplane_tests::driver::{DriverConfig, TestDriver, TestVolume};
use volplane_tests::e2e::{AuditRecord, ControlPlane, HostPath, Options, bin_dir};
use volplane_tests::objects::create;
use volplane_tests::process::{Process, cpu_seconds};
use volplane_tests::raw;
use volplane_tests::wait::eventually_some;

const PARALLEL: usize = 16;
const LIMIT: Duration = Duration::from_secs(900);

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

/// Peak RSS in MiB of `pid`.
fn peak_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0
}

/// Peak RSS in MiB and CPU seconds of `pid`, for the report.
fn footprint(pid: u32) -> String {
    format!("peak RSS {:.0} MiB, CPU {:.2} s", peak_mib(pid), cpu_seconds(pid))
}

/// How many objects the collection at `path` holds: one list of one item
/// and the server's count of the rest (cheap, unlike listing them all).
async fn count(client: &kube::Client, path: &str) -> usize {
    let Ok(request) = http::Request::get(format!("{path}?limit=1")).body(Vec::new()) else {
        return 0;
    };
    let Ok(text) = client.request_text(request).await else {
        return 0;
    };
    let list: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let items = list["items"].as_array().map_or(0, Vec::len);
    let rest = list["metadata"]["remainingItemCount"].as_u64().unwrap_or(0);
    items + usize::try_from(rest).unwrap_or(0)
}

/// When the first and when all `want` objects were in the collection at
/// `path`, from `started` (polled every 100 ms).
#[derive(Clone, Copy)]
struct Published {
    first: Option<Duration>,
    all: Option<Duration>,
}

async fn objects_after(client: &kube::Client, path: &str, want: usize, started: Instant) -> Published {
    let mut first = None;
    while started.elapsed() < LIMIT {
        let count = count(client, path).await;
        if count > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if count >= want {
            return Published {
                first,
                all: Some(started.elapsed()),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Published { first, all: None }
}

fn capacities_path(namespace: &str) -> String {
    format!("/apis/storage.k8s.io/v1/namespaces/{namespace}/csistoragecapacities")
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

fn listed(times: &[Option<Duration>]) -> String {
    times.iter().map(|t| seconds(*t)).collect::<Vec<_>>().join(", ")
}

/// The sum of every sample of `metric` (a counter, or a histogram's
/// `_count` or `_sum`) on volplane's admin endpoint.
fn scraped(admin: std::net::SocketAddr, metric: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .filter(|line| line.split(['{', ' ']).next() == Some(metric))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `work` over `items` with `PARALLEL` at a time on `client`.
async fn in_parallel<T, F, Fut>(items: Vec<T>, work: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(items).for_each_concurrent(PARALLEL, work).await;
}

/// `nodes` fake nodes with hostpathplugin's topology label and CSINode,
/// created `PARALLEL` at a time.
async fn hostpath_nodes(plane: &ControlPlane, nodes: usize) -> Vec<String> {
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    in_parallel(names.clone(), |node| async move {
        plane.add_hostpath_node(&node).await.expect("node");
    })
    .await;
    names
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
    let node_names = hostpath_nodes(&plane, nodes).await;
    let driver = plane
        .start_hostpath("controller", &[("fast", "100Gi"), ("slow", "10Gi")])
        .await
        .expect("hostpathplugin");
    let address = driver.address();
    let rounds = env_number("VOLPLANE_BENCH_ROUNDS", 3).max(1);
    let poll = Duration::from_secs(env_number("VOLPLANE_BENCH_POLL_SECONDS", 30) as u64);
    let extra = std::env::var("VOLPLANE_BENCH_ARGS").unwrap_or_default();
    let mut args: Vec<String> = extra.split_whitespace().map(String::from).collect();
    args.extend(["--capacity-poll-interval".into(), format!("{}s", poll.as_secs())]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Raw and volplane alternate, each in a fresh namespace, so both see the
    // API server in the same state; the medians are reported.
    let (mut raws, mut ours, mut first, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..rounds {
        let raw_time = raw_creates(&plane, &format!("bench-raw-{round}"), &node_names, classes).await;
        let (published, volplane) =
            volplane_run(&plane, &address, &format!("bench-volplane-{round}"), &args, want).await;
        if let Some(all) = published.all {
            ratios.push(format!("{:.2}", all.as_secs_f64() / raw_time.as_secs_f64()));
        }
        println!(
            "round {round}: raw {:.2} s, volplane {} ({})",
            raw_time.as_secs_f64(),
            seconds(published.all),
            footprint(volplane.pid())
        );
        raws.push(Some(raw_time));
        ours.push(published.all);
        first.push(published.first);
        last = Some(volplane);
    }
    let Some(mut volplane) = last else {
        return;
    };
    let in_flight = env_number("VOLPLANE_BENCH_RAW_IN_FLIGHT", 32);
    let mut report = vec![
        (
            format!(
                "raw creates ({in_flight} in flight), median of {rounds} ({})",
                listed(&raws)
            ),
            median(&raws),
            String::new(),
        ),
        (
            format!("volplane (defaults), median of {rounds} ({})", listed(&ours)),
            median(&ours),
            footprint(volplane.pid()),
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
    let admin = volplane.admin_address().await;
    let (steady, steady_cpu) = steady_state(&volplane, admin, poll).await;
    let idle_rate = steady_cpu / poll.as_secs_f64();
    let node_events = node_events(&plane, &volplane, admin, &node_names, idle_rate).await;
    let (code, _) = volplane.terminate().await;
    assert_eq!(code, Some(0));

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
        let process = plane
            .start_csi_provisioner(namespace_name, &driver, namespace_name, &args)
            .expect("csi-provisioner");
        let time = objects_after(&client, &capacities_path(namespace_name), want, started)
            .await
            .all;
        report.push((name.to_string(), time, footprint(process.pid())));
    }

    println!(
        "\ncapacity: {nodes} nodes × {classes} classes = {want} CSIStorageCapacity objects, process start → all published"
    );
    for (name, time, footprint) in report {
        println!("  {name:<100} {:>10}  {footprint}", seconds(time));
    }
    println!(
        "  volplane steady state, one {} s poll of {want} unchanged items: {steady}",
        poll.as_secs()
    );
    println!("  volplane, {nodes} Node updates (a label no topology key reads): {node_events}");
}

/// The API server's own limit: one object per (node, class) into
/// `namespace` from the raw client; the time they took.
async fn raw_creates(plane: &ControlPlane, namespace_name: &str, nodes: &[String], classes: usize) -> Duration {
    namespace(&plane.client(), namespace_name).await;
    let bodies: Vec<Vec<u8>> = (0..nodes.len() * classes)
        .map(|i| {
            serde_json::to_vec(&json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSIStorageCapacity",
                "metadata": {"generateName": "csisc-", "labels": {"csi.storage.k8s.io/managed-by": "raw"}},
                "storageClassName": format!("class-{}", i % classes),
                "nodeTopology": {"matchLabels": {HostPath::TOPOLOGY_KEY: nodes[i / classes]}},
                "capacity": "100Gi", "maximumVolumeSize": "100Gi"}))
            .expect("json")
        })
        .collect();
    let client = plane.new_client().await.expect("client");
    let in_flight = env_number("VOLPLANE_BENCH_RAW_IN_FLIGHT", 32);
    raw::create_all(&client, &capacities_path(namespace_name), bodies, in_flight)
        .await
        .expect("raw creates")
}

/// Starts volplane's capacity controller for `namespace` (with `extra`
/// arguments) and waits for its `want` objects; keeps it running.
async fn volplane_run(
    plane: &ControlPlane,
    address: &str,
    namespace_name: &str,
    extra: &[&str],
    want: usize,
) -> (Published, Running) {
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
        "--http-endpoint",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let volplane = Running::start(plane.kubeconfig(), &args);
    let published = objects_after(&client, &capacities_path(namespace_name), want, started).await;
    (published, volplane)
}

/// CPU, GetCapacity calls and writes of a running volplane over one poll
/// interval after everything is published (the report, and the CPU seconds).
async fn steady_state(volplane: &Running, admin: std::net::SocketAddr, poll: Duration) -> (String, f64) {
    let calls = "volplane_capacity_get_capacity_duration_seconds_count";
    let writes = "volplane_capacity_api_writes_total";
    // After the creates, the next polls spread over the following interval
    // (each at least half an interval away): wait it out, then measure one.
    tokio::time::sleep(poll).await;
    let (cpu, called, wrote) = (
        cpu_seconds(volplane.pid()),
        scraped(admin, calls),
        scraped(admin, writes),
    );
    // A benchmark window, not a settle time: one poll interval is measured.
    tokio::time::sleep(poll).await;
    let used = cpu_seconds(volplane.pid()) - cpu;
    let report = format!(
        "CPU {used:.2} s, {:.0} GetCapacity calls, {:.0} writes, peak RSS {:.0} MiB",
        scraped(admin, calls) - called,
        scraped(admin, writes) - wrote,
        peak_mib(volplane.pid())
    );
    (report, used)
}

/// Every node gets a new label no topology key reads: what the cluster does
/// to Nodes all the time. volplane's CPU for them above its polling
/// (`idle_rate` CPU seconds per second), and its writes.
async fn node_events(
    plane: &ControlPlane,
    volplane: &Running,
    admin: std::net::SocketAddr,
    nodes: &[String],
    idle_rate: f64,
) -> String {
    let writes = "volplane_capacity_api_writes_total";
    let (cpu, wrote) = (cpu_seconds(volplane.pid()), scraped(admin, writes));
    let api: Api<Node> = Api::all(plane.new_client().await.expect("client"));
    let started = Instant::now();
    in_parallel(nodes.to_vec(), |node| {
        let api = api.clone();
        async move {
            api.patch(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"bench.volplane.dev/touched": "yes"}}})),
            )
            .await
            .expect("patch node");
        }
    })
    .await;
    let patched = started.elapsed();
    // The events reach volplane within its watch; a second covers them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(volplane.pid()) - cpu;
    let above = (used - idle_rate * started.elapsed().as_secs_f64()).max(0.0);
    format!(
        "CPU {used:.2} s, {above:.2} s above polling ({:.0} µs per event), {:.0} writes; the patches took {:.2} s",
        above * 1e6 / nodes.len() as f64,
        scraped(admin, writes) - wrote,
        patched.as_secs_f64()
    )
}

/// The whole-collection reads (list or watch without name or selector) of
/// each client, by user agent prefix, and of which resources.
fn whole_collection_reads(log: &[AuditRecord], agent: &str) -> BTreeMap<String, usize> {
    let mut reads = BTreeMap::new();
    for record in log
        .iter()
        .filter(|r| r.user_agent.starts_with(agent) && r.is_unselected_read())
    {
        *reads.entry(format!("{} {}", record.verb, record.resource)).or_insert(0) += 1;
    }
    reads
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_instances_api_reads() {
    let nodes = env_number("VOLPLANE_BENCH_NODES", 100);
    let volumes = env_number("VOLPLANE_BENCH_VOLUMES", 1000);
    let options = Options {
        audit: true,
        ..Options::default()
    };
    let plane = ControlPlane::start_with(&bin_dir(), options)
        .await
        .expect("control plane");
    let client = plane.client();
    namespace(&client, "volplane").await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    let node_names = hostpath_nodes(&plane, nodes).await;
    // Volumes of other nodes: what a whole-collection PV read brings along.
    let bodies: Vec<Vec<u8>> = (0..volumes)
        .map(|i| {
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("pv-{i}")},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                         "csi": {"driver": HostPath::DRIVER, "volumeHandle": format!("v-{i}")},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                             {"key": HostPath::TOPOLOGY_KEY, "operator": "In", "values": [node_names[i % nodes]]}]}]}}}}))
            .expect("json")
        })
        .collect();
    raw::create_all(&client, "/api/v1/persistentvolumes", bodies, 32)
        .await
        .expect("PVs");
    let driver = plane
        .start_hostpath("node-0", &[("fast", "100Gi"), ("slow", "10Gi")])
        .await
        .expect("hostpathplugin");
    let volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity,health",
            "--node-deployment",
            "--node-name",
            "node-0",
            "--csi-address",
            &driver.address(),
            "--namespace",
            "volplane",
        ],
    );
    // volplane first, until it published node-0's objects; then
    // csi-provisioner, whose objects volplane leaves to it (it never
    // publishes beside an incumbent's object for the same item, see the
    // adoption gate).
    eventually_some(
        Duration::from_secs(120),
        "volplane published node-0's capacity",
        || async { (count(&client, &capacities_path("volplane")).await >= 2).then_some(()) },
    )
    .await;
    let provisioner = plane
        .start_csi_provisioner_as(
            "csi-provisioner-node-0",
            &driver,
            plane.kubeconfig(),
            &[("NAMESPACE", "volplane"), ("NODE_NAME", "node-0")],
            &[
                "--node-deployment=true",
                "--enable-capacity",
                "--capacity-ownerref-level=-1",
            ],
        )
        .expect("csi-provisioner");
    // Both have published node-0's objects; then their reads are all made.
    let published = eventually_some(
        Duration::from_secs(120),
        "csi-provisioner published node-0's capacity",
        || async {
            let n = managed_by(&client, "external-provisioner-node-0").await;
            (n >= 2).then_some(n)
        },
    )
    .await;
    // A benchmark window: both run side by side for it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = plane.audit_log().expect("audit log");
    println!(
        "\nper-node instances on a cluster of {nodes} nodes and {volumes} PVs (each published node-0's {published} capacity objects, in turn): \
         lists and watches of whole collections, per instance"
    );
    for (name, agent, pid) in [
        ("volplane (capacity + node health)", "volplane/", volplane.pid()),
        (
            "csi-provisioner --node-deployment",
            "csi-provisioner",
            provisioner.pid(),
        ),
    ] {
        let reads = whole_collection_reads(&log, agent);
        let total: usize = reads.values().sum();
        println!("  {name:<40} {total:>3} requests: {reads:?}; {}", footprint(pid));
    }
}

/// Pods `prefix-0…` with one generic ephemeral volume each, raw-created in
/// `namespace`; when the last was created.
async fn raw_pods(client: &kube::Client, namespace_name: &str, prefix: &str, pods: usize) -> Instant {
    let bodies: Vec<Vec<u8>> = (0..pods)
        .map(|i| {
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{prefix}-{i}")},
                "spec": {"schedulerName": "bench-unscheduled",
                         "containers": [{"name": "c", "image": "registry.invalid/none"}],
                         "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                             "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
            .expect("json")
        })
        .collect();
    raw::create_all(client, &format!("/api/v1/namespaces/{namespace_name}/pods"), bodies, 32)
        .await
        .expect("pods");
    Instant::now()
}

fn claims_path(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims")
}

/// What one controller did with bursts of pods.
struct EphemeralRun {
    lags: Vec<Duration>,
    peak: f64,
    cpu: f64,
    restart: Option<String>,
}

/// Bursts of `burst` pods, each in its own namespace, until `pods`; the
/// lag from each burst's last pod to its last claim.
async fn bursts(plane: &ControlPlane, prefix: &str, pods: usize, burst: usize) -> Vec<Duration> {
    let client = plane.new_client().await.expect("client");
    let mut lags = Vec::new();
    for (b, start) in (0..pods).step_by(burst.max(1)).enumerate() {
        let ns = format!("{prefix}-{b}");
        namespace(&client, &ns).await;
        let size = burst.min(pods - start);
        let last_pod = raw_pods(&client, &ns, "pod", size).await;
        let seen = objects_after(&client, &claims_path(&ns), size, last_pod).await;
        lags.push(seen.all.unwrap_or(LIMIT));
    }
    lags
}

fn lag_summary(lags: &[Duration]) -> String {
    let mut sorted = lags.to_vec();
    sorted.sort();
    let at = |q: usize| sorted.get((sorted.len() * q / 100).min(sorted.len().saturating_sub(1)));
    format!(
        "{} bursts: lag median {:.2} s, max {:.2} s",
        sorted.len(),
        at(50).map_or(0.0, Duration::as_secs_f64),
        sorted.last().map_or(0.0, Duration::as_secs_f64)
    )
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_last_pod_to_last_claim() {
    let pods = env_number("VOLPLANE_BENCH_PODS", 2000);
    let burst = env_number("VOLPLANE_BENCH_BURST", 2000).max(1);
    let mut report = Vec::new();

    // Each controller on a control plane of its own: neither sees the other's pods.
    {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane");
        let args = [
            "--controllers=ephemeral",
            "--namespace",
            "default",
            "--leader-election=false",
            "--http-endpoint",
            "127.0.0.1:0",
        ];
        let volplane = Running::start(plane.kubeconfig(), &args);
        wait_until_serving(&plane.client(), "default").await;
        let lags = bursts(&plane, "bench-volplane", pods, burst).await;
        let (peak, cpu) = (peak_mib(volplane.pid()), cpu_seconds(volplane.pid()));
        let (code, _) = volplane.terminate().await;
        assert_eq!(code, Some(0));
        let restart = restart(&plane, &args, pods, burst).await;
        report.push((
            "volplane".to_string(),
            EphemeralRun {
                lags,
                peak,
                cpu,
                restart: Some(restart),
            },
        ));
    }
    // VOLPLANE_BENCH_INCUMBENT=0 measures volplane alone.
    if env_number("VOLPLANE_BENCH_INCUMBENT", 1) != 0 {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane");
        let kcm = plane
            .start_controller_manager_with(
                "bench-kcm",
                "ephemeral-volume-controller",
                &["--kube-api-qps=200", "--kube-api-burst=400"],
            )
            .expect("kube-controller-manager");
        wait_until_serving(&plane.client(), "default").await;
        let lags = bursts(&plane, "bench-kcm", pods, burst).await;
        report.push((
            "kube-controller-manager (--kube-api-qps 200 --kube-api-burst 400)".to_string(),
            EphemeralRun {
                lags,
                peak: peak_mib(kcm.pid()),
                cpu: cpu_seconds(kcm.pid()),
                restart: None,
            },
        ));
    }

    println!(
        "\nephemeral: {pods} pods in bursts of {burst} (raw client, 32 in flight), last pod of a burst → its last PVC"
    );
    for (name, run) in report {
        println!(
            "  {name:<70} {}; peak RSS {:.0} MiB, CPU {:.2} s",
            lag_summary(&run.lags),
            run.peak,
            run.cpu
        );
        if let Some(restart) = run.restart {
            println!("    restart with every pod and claim in place: {restart}");
        }
    }
}

/// volplane started again on the same cluster: time to ready, claims it
/// created (none are missing), peak RSS, and the lag of one more burst.
async fn restart(plane: &ControlPlane, args: &[&str], pods: usize, burst: usize) -> String {
    let started = Instant::now();
    let mut volplane = Running::start(plane.kubeconfig(), args);
    let admin = volplane.admin_address().await;
    let ready = eventually_some(LIMIT, "volplane ready after the restart", || async {
        (http_get(admin, "/readyz").0 == 200).then(|| started.elapsed())
    })
    .await;
    let peak_after_lists = peak_mib(volplane.pid());
    let client = plane.client();
    let ns = "bench-volplane-after-restart";
    namespace(&client, ns).await;
    let size = burst.min(pods);
    let last_pod = raw_pods(&client, ns, "pod", size).await;
    let lag = objects_after(&client, &claims_path(ns), size, last_pod).await.all;
    let created = scraped(admin, "volplane_ephemeral_claims_created_total");
    let line = format!(
        "ready after {:.2} s, peak RSS {:.0} MiB by then ({:.0} MiB after one more burst); \
         claims created {created:.0} (the new burst's {size}); that burst's lag {}",
        ready.as_secs_f64(),
        peak_after_lists,
        peak_mib(volplane.pid()),
        seconds(lag)
    );
    let (code, _) = volplane.terminate().await;
    assert_eq!(code, Some(0));
    line
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
    let _provisioner = plane
        .start_csi_provisioner("csi-provisioner", &driver, ns, &[])
        .expect("csi-provisioner");
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
    let monitor = external_health_monitor(&plane, driver.socket(), "5s");
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

fn external_health_monitor(plane: &ControlPlane, socket: &Path, interval: &str) -> Process {
    let binary =
        volplane_tests::e2e::find_binary(plane.bin_dir(), "csi-external-health-monitor-controller").expect("monitor");
    plane
        .start_process(
            "external-health-monitor",
            &binary.to_string_lossy(),
            &[
                format!("--csi-address={}", socket.display()),
                format!("--kubeconfig={}", plane.kubeconfig().display()),
                format!("--list-volumes-interval={interval}"),
            ],
        )
        .expect("external-health-monitor")
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_sweep_of_many_healthy_volumes() {
    let volumes = env_number("VOLPLANE_BENCH_VOLUMES", 10_000);
    let window = Duration::from_secs(env_number("VOLPLANE_BENCH_WINDOW_SECONDS", 30) as u64);
    let options = Options {
        audit: true,
        ..Options::default()
    };
    let plane = ControlPlane::start_with(&bin_dir(), options)
        .await
        .expect("control plane");
    let client = plane.client();
    let ns = "bench-health";
    namespace(&client, ns).await;
    namespace(&client, "volplane").await;
    const DRIVER: &str = "bench-health.csi.volplane.dev";
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![
            ControllerCapability::ListVolumes,
            ControllerCapability::GetVolume,
            ControllerCapability::VolumeCondition,
        ],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    for i in 0..volumes {
        driver.put_volume(&format!("h-pv-{i:05}"), TestVolume::healthy());
    }
    // Bound claims and volumes, as the PV controller leaves them.
    let claims: Vec<Vec<u8>> = (0..volumes)
        .map(|i| {
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("claim-{i:05}")},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": format!("pv-{i:05}"),
                         "resources": {"requests": {"storage": "1Gi"}}}}))
            .expect("json")
        })
        .collect();
    raw::create_all(&client, &claims_path(ns), claims, 32)
        .await
        .expect("claims");
    let pvs: Vec<Vec<u8>> = (0..volumes)
        .map(|i| {
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": format!("pv-{i:05}")},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                         "csi": {"driver": DRIVER, "volumeHandle": format!("h-pv-{i:05}")},
                         "claimRef": {"namespace": ns, "name": format!("claim-{i:05}")}}}))
            .expect("json")
        })
        .collect();
    raw::create_all(&client, "/api/v1/persistentvolumes", pvs, 32)
        .await
        .expect("PVs");
    // Bound, as the PV controller leaves them (it binds pre-bound pairs slowly:
    // 2,284 of 10,000 in 15 minutes here).
    let bind: Vec<http::Request<kube::client::Body>> = (0..volumes)
        .map(|i| {
            raw::request(
                http::Method::PATCH,
                &format!("/api/v1/persistentvolumes/pv-{i:05}/status"),
                "application/merge-patch+json",
                br#"{"status": {"phase": "Bound"}}"#.to_vec(),
            )
            .expect("request")
        })
        .collect();
    raw::send_all(&client, bind, 32).await.expect("PV status");

    let started = Instant::now();
    let mut volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=health",
            "--csi-address",
            &driver.address(),
            "--namespace",
            "volplane",
            "--leader-election=false",
            "--health-list-interval",
            "10s",
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    let admin = volplane.admin_address().await;
    let first_sweep = eventually_some(LIMIT, "volplane's first sweep", || async {
        (scraped(admin, "volplane_health_sweep_duration_seconds_count") >= 1.0).then(|| started.elapsed())
    })
    .await;
    let sweep = scraped(admin, "volplane_health_sweep_duration_seconds_sum");
    let monitor = external_health_monitor(&plane, driver.socket(), "10s");
    let (cpu, monitor_cpu) = (cpu_seconds(volplane.pid()), cpu_seconds(monitor.pid()));
    // A benchmark window: both sweep the same volumes side by side.
    tokio::time::sleep(window).await;
    let bound = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|pv| pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                .count()
        })
        .unwrap_or(0);
    let log = plane.audit_log().expect("audit log");
    let writes = |agent: &str| {
        log.iter()
            .filter(|r: &&AuditRecord| r.user_agent.starts_with(agent) && r.is_write())
            .count()
    };
    println!(
        "\nhealth: {volumes} healthy bound volumes ({bound} bound), ListVolumes every 10 s, {} s side by side",
        window.as_secs()
    );
    println!(
        "  volplane: process start → first sweep done {:.2} s (the sweep itself {sweep:.2} s); in the window CPU {:.2} s, \
         {} writes in all; {}",
        first_sweep.as_secs_f64(),
        cpu_seconds(volplane.pid()) - cpu,
        writes("volplane/"),
        footprint(volplane.pid())
    );
    println!(
        "  external-health-monitor: in the window CPU {:.2} s, {} writes in all; {}",
        cpu_seconds(monitor.pid()) - monitor_cpu,
        writes("csi-external-health-monitor"),
        footprint(monitor.pid())
    );
}

/// How the burst benchmark's cluster tracks capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracking {
    /// volplane per node with the placements controller.
    Volplane,
    /// csi-provisioner's own per-node capacity tracking.
    CsiProvisioner,
    /// None: the CSIDriver says `storageCapacity: false`.
    Off,
}

/// The uneven node-local pools of the burst benchmark (Gi): 1,000 Gi.
const BURST_POOLS: [u32; 10] = [160, 140, 120, 100, 100, 100, 80, 80, 60, 60];

/// Starts one node's driver, provisioner and (for volplane) capacity
/// instance; returns the processes to keep.
async fn burst_node(
    plane: &ControlPlane,
    node: &str,
    gib: u32,
    tracking: Tracking,
) -> (HostPath, Process, Option<Running>) {
    plane.add_hostpath_node(node).await.expect("node");
    let fast = format!("{gib}Gi");
    let driver = plane
        .start_hostpath(node, &[("fast", &fast), ("slow", "1Gi")])
        .await
        .expect("hostpathplugin");
    let mut args = vec!["--node-deployment=true"];
    if tracking == Tracking::CsiProvisioner {
        args.extend(["--enable-capacity", "--capacity-ownerref-level=-1"]);
    }
    let provisioner = plane
        .start_csi_provisioner_as(
            &format!("csi-provisioner-{node}"),
            &driver,
            plane.kubeconfig(),
            &[("NAMESPACE", "volplane"), ("NODE_NAME", node)],
            &args,
        )
        .expect("csi-provisioner");
    let volplane = (tracking == Tracking::Volplane).then(|| {
        Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=capacity",
                "--node-deployment",
                "--node-name",
                node,
                "--csi-address",
                &driver.address(),
                "--namespace",
                "volplane",
                "--capacity-owner",
                "node",
                "--http-endpoint",
                "127.0.0.1:0",
            ],
        )
    });
    (driver, provisioner, volplane)
}

/// One burst on a fresh cluster: `pods` pods with a 10Gi claim each, one
/// every `gap` (zero: all at once). Returns the report line.
async fn burst_run(tracking: Tracking, pods: usize, gap: Duration) -> String {
    let plane = ControlPlane::start_with(
        &bin_dir(),
        Options {
            audit: true,
            ..Options::default()
        },
    )
    .await
    .expect("control plane starts");
    let client = plane.client();
    namespace(&client, "volplane").await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    if tracking == Tracking::Off {
        volplane_tests::objects::set_storage_capacity(&client, HostPath::DRIVER, false).await;
    }
    let mut nodes = Vec::new();
    for (i, gib) in BURST_POOLS.iter().enumerate() {
        nodes.push(burst_node(&plane, &format!("node-{i}"), *gib, tracking).await);
    }
    let placements = (tracking == Tracking::Volplane).then(|| {
        Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=placements",
                "--namespace",
                "volplane",
                "--leader-election=false",
            ],
        )
    });
    if tracking != Tracking::Off {
        eventually_some(LIMIT, "every node's capacity published", || async {
            (count(&client, &capacities_path("volplane")).await >= 2 * BURST_POOLS.len()).then_some(())
        })
        .await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let seen = tokio::spawn(placements_seen(client.clone(), stopped));
    let (created, bound) = burst_pods(&client, pods, gap).await;
    let _ = stop.send(());
    let (placed, history) = seen.await.expect("placements seen");
    let (refused, refused_claims) = provisioning_failures(&client).await;
    let mut lowered: Vec<Duration> = placed.iter().filter_map(|p| p.lowered).collect();
    lowered.sort();
    let never = placed.len() - lowered.len();
    let refused_detail = match refused_placements(&placed, &history, &refused_claims) {
        detail if detail.is_empty() => detail,
        detail => format!("\n{detail}"),
    };
    let mut lags: Vec<Duration> = (0..pods)
        .filter_map(|i| Some(bound.get(&i)?.duration_since(created[i])))
        .collect();
    lags.sort();
    let at = |q: f64| {
        lags.get(((lags.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map(|d| d.as_secs_f64())
    };
    let all = (bound.len() == pods)
        .then(|| {
            bound
                .values()
                .max()
                .map(|last| last.duration_since(created[0]).as_secs_f64())
        })
        .flatten();
    if tracking == Tracking::Volplane {
        // At rest once the last reservations have ended.
        eventually_some(LIMIT, "no reservation left", || async {
            (reserving_objects(&client).await == Some(0)).then_some(())
        })
        .await;
    }
    let rest = at_rest(&plane, &mut nodes, tracking).await;
    let footprint = burst_footprint(&nodes, placements.as_ref());
    drop(placements);
    drop(nodes);
    format!(
        "refused CreateVolume (each a selected-node reset) {refused}; {}/{pods} Bound{}; create → Bound p50 {} s, p99 {} s; \
         placement → node's capacity lowered {} ({never} placements never followed by a lower value); at rest per node per minute: {rest}; {footprint}",
        bound.len(),
        all.map_or_else(
            || " (not all within the limit)".to_string(),
            |s| format!(" after {s:.1} s")
        ),
        at(0.5).map_or("-".into(), |s| format!("{s:.2}")),
        at(0.99).map_or("-".into(), |s| format!("{s:.2}")),
        milliseconds(&lowered),
    ) + &refused_detail
}

/// Creates the pods and claims, then follows the claims until all are
/// Bound or [`LIMIT`] passed: when each was created and first seen Bound.
async fn burst_pods(client: &kube::Client, pods: usize, gap: Duration) -> (Vec<Instant>, BTreeMap<usize, Instant>) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let mut created = Vec::new();
    for i in 0..pods {
        let name = format!("burst-{i}");
        create(
            &claims,
            json!({"metadata": {"name": name}, "spec": {"accessModes": ["ReadWriteOnce"],
            "storageClassName": "fast", "resources": {"requests": {"storage": "10Gi"}}}}),
        )
        .await;
        create(
            &Api::<Pod>::namespaced(client.clone(), "default"),
            json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]}}),
        )
        .await;
        created.push(Instant::now());
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    let mut bound = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while bound.len() < pods && Instant::now() < deadline {
        for claim in claims
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let index = claim
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("burst-"))
                .and_then(|i| i.parse().ok());
            if let Some(index) = index
                && claim.status.and_then(|s| s.phase).as_deref() == Some("Bound")
            {
                bound.entry(index).or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (created, bound)
}

/// ProvisioningFailed occurrences on the claims (the driver refused
/// CreateVolume), and the claims refused.
async fn provisioning_failures(client: &kube::Client) -> (i64, Vec<String>) {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let failed: Vec<_> = (events.iter())
        .filter(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
        .collect();
    let count = failed.iter().map(|e| i64::from(e.count.unwrap_or(1))).sum();
    for event in &failed {
        let message = event.message.as_deref().unwrap_or_default();
        println!(
            "    ProvisioningFailed {} ×{}: {}",
            event.involved_object.name.as_deref().unwrap_or_default(),
            event.count.unwrap_or(1),
            message.chars().take(200).collect::<String>()
        );
    }
    let claims = failed.iter().filter_map(|e| e.involved_object.name.clone()).collect();
    (count, claims)
}

/// Every CSIStorageCapacity object, when they can be listed.
async fn capacity_objects(client: &kube::Client) -> Option<Vec<serde_json::Value>> {
    let request = http::Request::get("/apis/storage.k8s.io/v1/csistoragecapacities")
        .body(Vec::new())
        .ok()?;
    let mut list: serde_json::Value = serde_json::from_str(&client.request_text(request).await.ok()?).ok()?;
    match list["items"].take() {
        serde_json::Value::Array(items) => Some(items),
        _ => None,
    }
}

/// How many CSIStorageCapacity objects carry a reservation
/// (`volplane.io/reserved`), when they can be listed.
async fn reserving_objects(client: &kube::Client) -> Option<usize> {
    let items = capacity_objects(client).await?;
    Some(
        items
            .iter()
            .filter(|item| !item["metadata"]["annotations"]["volplane.io/reserved"].is_null())
            .count(),
    )
}

/// How many CSIStorageCapacity objects `managed_by` (the label's value) has.
async fn managed_by(client: &kube::Client, managed_by: &str) -> usize {
    let items = capacity_objects(client).await.unwrap_or_default();
    (items.iter())
        .filter(|item| item["metadata"]["labels"]["csi.storage.k8s.io/managed-by"] == managed_by)
        .count()
}

/// Per node, the largest peak RSS and the CPU summed over the burst, of
/// volplane's instances (and its placements controller) and of
/// csi-provisioner (which provisions too, with or without tracking).
fn burst_footprint(nodes: &[(HostPath, Process, Option<Running>)], placements: Option<&Running>) -> String {
    let of = |pids: Vec<u32>| {
        let peak = pids.iter().map(|pid| peak_mib(*pid)).fold(0.0, f64::max);
        let cpu: f64 = pids.iter().map(|pid| cpu_seconds(*pid)).sum();
        format!("peak RSS ≤ {peak:.0} MiB, CPU {cpu:.2} s in all")
    };
    let provisioners = of(nodes.iter().map(|(_, provisioner, _)| provisioner.pid()).collect());
    let volplanes: Vec<u32> = nodes
        .iter()
        .filter_map(|(_, _, volplane)| Some(volplane.as_ref()?.pid()))
        .collect();
    if volplanes.is_empty() {
        return format!("csi-provisioner per node {provisioners}");
    }
    let central = placements.map_or(String::new(), |p| {
        format!(", placements controller {}", footprint(p.pid()))
    });
    format!(
        "volplane per node {}{central}; csi-provisioner per node {provisioners}",
        of(volplanes)
    )
}

/// GetCapacity calls (volplane's own count; csi-provisioner polls once a
/// minute per class) and capacity writes (audit log) per node per minute,
/// over 30 s at rest after the burst.
async fn at_rest(
    plane: &ControlPlane,
    nodes: &mut [(HostPath, Process, Option<Running>)],
    tracking: Tracking,
) -> String {
    if tracking == Tracking::Off {
        return "nothing published".into();
    }
    let window = Duration::from_secs(30);
    let first = nodes.first_mut().and_then(|(_, _, volplane)| volplane.as_mut());
    let admin = match first {
        Some(volplane) => Some(volplane.admin_address().await),
        None => None,
    };
    let calls = |admin| scraped(admin, "volplane_capacity_get_capacity_duration_seconds_count");
    let calls_before = admin.map(calls);
    let writes = |log: &[AuditRecord]| {
        log.iter()
            .filter(|r| r.resource == "csistoragecapacities" && r.is_write() && r.name.is_some())
            .count()
    };
    let writes_before = writes(&plane.audit_log().expect("audit log"));
    tokio::time::sleep(window).await;
    let writes_after = writes(&plane.audit_log().expect("audit log"));
    let per_minute = |n: f64| n * 60.0 / window.as_secs_f64();
    let calls = match (admin, calls_before) {
        (Some(admin), Some(before)) => format!("{:.1} GetCapacity", per_minute(calls(admin) - before)),
        _ => "2 GetCapacity (its 1m poll, one per class)".into(),
    };
    let writes = per_minute((writes_after - writes_before) as f64) / nodes.len() as f64;
    format!("{calls}, {writes:.1} capacity writes")
}

#[ignore = "benchmark on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_under_a_burst_that_fills_node_local_storage() {
    let pods = env_number("VOLPLANE_BENCH_BURST_PODS", 95);
    println!(
        "\n{pods} pods with one 10Gi claim each on 10 nodes of node-local storage (160…60 Gi, 1,000 Gi): \
         real hostpathplugin and csi-provisioner --node-deployment per node, kube-scheduler; a fresh cluster per run"
    );
    for (arrival, gap) in [
        ("10 per second", Duration::from_millis(100)),
        ("all at once", Duration::ZERO),
    ] {
        for (name, tracking) in [
            ("volplane per node + placements", Tracking::Volplane),
            ("csi-provisioner's per-node tracking", Tracking::CsiProvisioner),
            ("no capacity tracking", Tracking::Off),
        ] {
            if std::env::var("VOLPLANE_BENCH_BURST_ONLY").is_ok_and(|only| !name.starts_with(&only)) {
                continue;
            }
            let line = burst_run(tracking, pods, gap).await;
            println!("  {arrival}, {name}: {line}");
        }
    }
}

/// One placement the scheduler made, as seen from outside: a claim's
/// `selected-node` set (or changed), what the node's `fast` object
/// admitted then (the scheduler's limit: `maximumVolumeSize`, else
/// `capacity`) and how long until the node's object admitted less.
#[derive(Debug)]
struct Placement {
    claim: String,
    node: String,
    at: Instant,
    /// The node's limit when the placement was seen, and how old it was.
    admitted: Option<(i64, Duration)>,
    lowered: Option<Duration>,
}

/// Follows claims and capacity objects until `stop` fires: every placement.
/// A node's limit as it changed: (node, bytes, when seen).
type Admitted = Vec<(String, i64, Instant)>;

async fn placements_seen(client: kube::Client, stop: tokio::sync::oneshot::Receiver<()>) -> (Vec<Placement>, Admitted) {
    use k8s_openapi::api::storage::v1::CSIStorageCapacity;
    use kube::runtime::watcher::{self, Event as Watched};
    enum Seen {
        Claim(Box<PersistentVolumeClaim>),
        Capacity(Box<CSIStorageCapacity>),
    }
    fn flatten<K>(event: Result<Watched<K>, watcher::Error>) -> Option<K> {
        match event {
            Ok(Watched::Apply(object) | Watched::InitApply(object)) => Some(object),
            _ => None,
        }
    }
    let claims = watcher::watcher(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default"),
        watcher::Config::default(),
    )
    .filter_map(move |e| futures::future::ready(flatten(e).map(|c| Seen::Claim(Box::new(c)))));
    let capacities = watcher::watcher(Api::<CSIStorageCapacity>::all(client), watcher::Config::default())
        .filter_map(move |e| futures::future::ready(flatten(e).map(|c| Seen::Capacity(Box::new(c)))));
    let mut seen = futures::stream::select(claims.boxed(), capacities.boxed()).take_until(stop);
    let mut on_node: BTreeMap<String, String> = BTreeMap::new();
    let mut admits: BTreeMap<String, (i64, Instant)> = BTreeMap::new();
    let mut history: Vec<(String, i64, Instant)> = Vec::new();
    let mut placements: Vec<Placement> = Vec::new();
    while let Some(seen) = seen.next().await {
        match seen {
            Seen::Claim(claim) => {
                let node = (claim.metadata.annotations.as_ref())
                    .and_then(|a| a.get("volume.kubernetes.io/selected-node"))
                    .cloned();
                let Some(name) = claim.metadata.name else { continue };
                let Some(node) = node else {
                    on_node.remove(&name);
                    continue;
                };
                if on_node.get(&name) != Some(&node) {
                    on_node.insert(name.clone(), node.clone());
                    let admitted = admits.get(&node).map(|(bytes, at)| (*bytes, at.elapsed()));
                    placements.push(Placement {
                        claim: name,
                        node,
                        at: Instant::now(),
                        admitted,
                        lowered: None,
                    });
                }
            }
            Seen::Capacity(object) if object.storage_class_name == "fast" => {
                let node = (object.node_topology.as_ref())
                    .and_then(|t| t.match_labels.as_ref())
                    .and_then(|l| l.get(HostPath::TOPOLOGY_KEY))
                    .cloned();
                let limit = (object.maximum_volume_size.as_ref().or(object.capacity.as_ref()))
                    .and_then(|q| volplane_capacity::quantity::parse_bytes(&q.0));
                let (Some(node), Some(limit)) = (node, limit) else {
                    continue;
                };
                admits.insert(node.clone(), (limit, Instant::now()));
                history.push((node.clone(), limit, Instant::now()));
                for placement in placements.iter_mut().filter(|p| p.node == node && p.lowered.is_none()) {
                    if placement.admitted.is_none_or(|(before, _)| limit < before) {
                        placement.lowered = Some(placement.at.elapsed());
                    }
                }
            }
            Seen::Capacity(_) => {}
        }
    }
    (placements, history)
}

/// The placements of refused claims, each with the placements on its node
/// in the second before it: what the scheduler's view admitted each time.
fn refused_placements(placements: &[Placement], history: &Admitted, refused: &[String]) -> String {
    let Some(start) = placements.first().map(|p| p.at) else {
        return String::new();
    };
    let show = |p: &Placement| {
        let admitted = p.admitted.map_or("nothing".to_string(), |(bytes, age)| {
            format!("{} Gi ({} ms old)", bytes >> 30, age.as_millis())
        });
        format!(
            "{} on {} at +{:.3} s saw {admitted}",
            p.claim,
            p.node,
            p.at.duration_since(start).as_secs_f64()
        )
    };
    let mut lines = Vec::new();
    for (i, placement) in placements
        .iter()
        .enumerate()
        .filter(|(_, p)| refused.contains(&p.claim))
    {
        let before: Vec<String> = placements[..i]
            .iter()
            .filter(|p| p.node == placement.node && placement.at.duration_since(p.at) < Duration::from_secs(10))
            .map(show)
            .collect();
        let changes: Vec<String> = (history.iter())
            .filter(|(node, _, at)| {
                *node == placement.node
                    && at
                        .checked_duration_since(placement.at - Duration::from_secs(10))
                        .is_some()
                    && at
                        .checked_duration_since(placement.at + Duration::from_secs(2))
                        .is_none()
            })
            .map(|(_, bytes, at)| format!("+{:.3} {} Gi", at.duration_since(start).as_secs_f64(), bytes >> 30))
            .collect();
        lines.push(format!(
            "    refused: {}; placed on it in the 10 s before: [{}]; its limit from 10 s before to 2 s after: [{}]",
            show(placement),
            before.join("; "),
            changes.join(", ")
        ));
    }
    lines.join("\n")
}

/// p50, p99 and max of sorted `lags`, in milliseconds.
fn milliseconds(lags: &[Duration]) -> String {
    let at = |q: f64| {
        lags.get(((lags.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or("-".to_string(), |d| d.as_millis().to_string())
    };
    format!("p50 {} ms, p99 {} ms, max {} ms", at(0.5), at(0.99), at(1.0))
}
