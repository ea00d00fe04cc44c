//! Capacity benchmark: 1,000 segments × 4 classes = 4,000 CSIStorageCapacity
//! objects, the real `volplane` binary against the API-server double and a
//! test driver that takes 1 ms per GetCapacity. Prints its figures; asserts
//! only correctness (no timing assertions).
//!
//! ```sh
//! cargo test --release -p volplane --test bench_capacity -- --ignored --nocapture
//! ```
//!
//! `VOLPLANE_BENCH_ARGS` adds flags to volplane's command line, e.g.
//! `--kube-api-qps 0` to measure without the client-side rate limit.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, StorageClass};
use kube::api::{Api, PostParams};
use serde_json::json;
use volplane_csi::CsiMethod;
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver};
use volplane_tests::wait::timed;

mod support;

const DRIVER: &str = "bench.csi.volplane.dev";
const SEGMENTS: usize = 1000;
const CLASSES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (use --release)"]
async fn capacity_4000_objects() {
    let double = ApiServerDouble::start().await.expect("double");
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(100 << 30));
    driver.set_delay(CsiMethod::GetCapacity, Duration::from_millis(1));
    let client = double.client();

    let seeding = Instant::now();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "bench"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("ns");
    let nodes: Api<Node> = Api::all(client.clone());
    let csinodes: Api<CSINode> = Api::all(client.clone());
    for i in 0..SEGMENTS {
        let name = format!("node-{i:04}");
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"topology.bench/zone": format!("zone-{i:04}")}}}))
        .expect("node");
        nodes.create(&PostParams::default(), &node).await.expect("node");
        let csinode: CSINode = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name, "topologyKeys": ["topology.bench/zone"]}]}}))
        .expect("csinode");
        csinodes
            .create(&PostParams::default(), &csinode)
            .await
            .expect("csinode");
    }
    let csidriver: CSIDriver =
        serde_json::from_value(json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}))
            .expect("csidriver");
    Api::<CSIDriver>::all(client.clone())
        .create(&PostParams::default(), &csidriver)
        .await
        .expect("csidriver");
    for c in 0..CLASSES {
        let class: StorageClass = serde_json::from_value(json!({"metadata": {"name": format!("class-{c}")},
            "provisioner": DRIVER, "volumeBindingMode": "WaitForFirstConsumer", "parameters": {"tier": c.to_string()}}))
        .expect("class");
        Api::<StorageClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("class");
    }
    println!(
        "seeded {SEGMENTS} nodes/CSINodes and {CLASSES} classes in {:?}",
        seeding.elapsed()
    );

    let poll = Duration::from_secs(10);
    let (mut child, _kubeconfig) = support::spawn_volplane(
        &double,
        &[
            "--csi-address",
            &driver.address(),
            "--namespace",
            "bench",
            "--capacity-poll-interval",
            &format!("{}s", poll.as_secs()),
        ],
    );
    let pid = child.id();

    let objects = SEGMENTS * CLASSES;
    let converged = timed(Duration::from_secs(300), "all objects created", || {
        double.count(Verb::Create, "csistoragecapacities") >= objects
    })
    .await;
    let calls_at_convergence = driver.count(CsiMethod::GetCapacity);
    println!(
        "convergence from empty: {objects} objects in {converged:.2?} ({:.0} objects/s), {calls_at_convergence} GetCapacity calls",
        objects as f64 / converged.as_secs_f64()
    );

    // Steady state: after one interval of settling (the first polls after
    // convergence are spread from half an interval on), one full interval
    // with nothing changed.
    tokio::time::sleep(poll).await; // a fixed measurement window, not a wait for a condition
    let writes_before = double.writes("csistoragecapacities");
    let calls_before = driver.count(CsiMethod::GetCapacity);
    tokio::time::sleep(poll).await; // measuring a whole interval, not waiting for a condition
    let writes = double.writes("csistoragecapacities") - writes_before;
    let calls = driver.count(CsiMethod::GetCapacity) - calls_before;
    let rss = support::status_kib(pid, "VmRSS:").unwrap_or(0);
    let peak = support::status_kib(pid, "VmHWM:").unwrap_or(0);
    println!(
        "steady state over one {poll:?} interval: {calls} GetCapacity calls for {objects} items, {writes} API writes"
    );
    println!(
        "volplane memory: RSS {:.1} MiB, peak RSS {:.1} MiB",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(
        double.count(Verb::Create, "csistoragecapacities"),
        objects,
        "no duplicate creates"
    );
    assert_eq!(writes, 0, "unchanged capacities are not written");
    assert!(
        calls <= objects + objects / 10,
        "{calls} calls in one interval for {objects} items"
    );
}
