//! Soak: an hour of churn with a fault every few minutes, on a real control
//! plane. Pods with ephemeral volumes are created and deleted, PVs created
//! and deleted, nodes added and removed, while, in turn, volplane's API
//! server is killed with -9 and restarted, the leading replica is killed
//! with -9 (and replaced), and the CSI driver is restarted. Every 10 s it
//! samples the replicas' RSS; at the end it prints the first and last ten
//! minutes side by side and checks that every invariant holds.
//!
//! ```sh
//! VOLPLANE_E2E_BIN_DIR=$(../shared/k8s/install) cargo test --release -p volplane --test soak -- --ignored --nocapture
//! ```
//!
//! `VOLPLANE_SOAK_MINUTES` (default 60) and `VOLPLANE_SOAK_FAULT_SECONDS`
//! (default 180) change the length and the spacing of faults.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::{Running, ephemeral_pod, status_kib};
use volplane_capacity::quantity::parse_bytes;
use volplane_csi::{CapacityQuery, CsiClient};
use volplane_tests::e2e::{ControlPlane, HostPath, Options};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const APPS: &str = "soak";
const POOLS: [(&str, &str); 2] = [("fast", "1Ti"), ("slow", "100Gi")];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A replica of volplane (capacity, ephemeral, health) with leader election.
fn replica(plane: &ControlPlane, driver: &HostPath, identity: &str) -> Running {
    let mut command = support::volplane();
    command
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .args([
            "--controllers=capacity,ephemeral,health",
            "--csi-address",
            &driver.address(),
            "--namespace",
            NAMESPACE,
            "--capacity-owner",
            "none",
            "--capacity-poll-interval",
            "30s",
            "--health-list-interval",
            "10s",
            "--leader-election-namespace",
            NAMESPACE,
            "--http-endpoint",
            "127.0.0.1:0",
        ])
        .env("POD_NAME", identity);
    Running::spawn(command)
}

/// A PV of the `fast` class on `node` (Available: capacity refreshes for it).
fn volume(name: &str, node: &str) -> serde_json::Value {
    json!({"metadata": {"name": name},
           "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "csi": {"driver": HostPath::DRIVER, "volumeHandle": name},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": HostPath::TOPOLOGY_KEY, "operator": "In", "values": [node]}]}]}}}})
}

/// One step of churn through `client` (the API server that stays).
async fn churn(client: &kube::Client, step: u64, nodes: &mut Vec<String>, plane: &ControlPlane) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    for i in 0..5 {
        let _ = pods
            .create(&PostParams::default(), &ephemeral_pod(&format!("p{step:06}-{i}")))
            .await;
    }
    if step >= 20 {
        for i in 0..5 {
            let _ = pods
                .delete(&format!("p{:06}-{i}", step - 20), &DeleteParams::default())
                .await;
        }
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    if step.is_multiple_of(5) {
        let node = &nodes[usize::try_from(step / 5).unwrap_or(0) % nodes.len()];
        let pv: PersistentVolume = serde_json::from_value(volume(&format!("pv-{step:06}"), node)).expect("pv");
        let _ = pvs.create(&PostParams::default(), &pv).await;
        if step >= 50 {
            let _ = pvs
                .delete(&format!("pv-{:06}", step - 50), &DeleteParams::default())
                .await;
        }
    }
    if step.is_multiple_of(30) && step > 0 {
        // A node goes and another comes.
        let gone = nodes.remove(0);
        let _ = volplane_tests::objects::remove_node(client, &gone).await;
        let added = format!("node-{step:06}");
        if plane.add_hostpath_node(&added).await.is_ok() {
            nodes.push(added);
        }
    }
}

/// The faults, in turn.
#[derive(Clone, Copy, Debug)]
enum Fault {
    ApiServer,
    Leader,
    Driver,
}

/// RSS samples (MiB) by minute since the start.
type Samples = Vec<(f64, f64)>;

fn summary(samples: &[(f64, f64)]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    let mut values: Vec<f64> = samples.iter().map(|(_, v)| *v).collect();
    values.sort_by(f64::total_cmp);
    format!(
        "min {:.1} MiB, median {:.1} MiB, max {:.1} MiB ({} samples)",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
        values.len()
    )
}

#[ignore = "soak: an hour on a real control plane; see the module docs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_churn_and_faults_leaves_every_invariant_true_and_memory_flat() {
    let minutes = env_number("VOLPLANE_SOAK_MINUTES", 60);
    let fault_every = Duration::from_secs(env_number("VOLPLANE_SOAK_FAULT_SECONDS", 180));
    let (plane, other) = support::two_api_servers(Options::default(), &[NAMESPACE, APPS]).await;
    let client = plane.client();
    plane.create_hostpath_classes().await.expect("classes");
    let mut nodes: Vec<String> = (0..5).map(|i| format!("node-{i}")).collect();
    for node in &nodes {
        plane.add_hostpath_node(node).await.expect("node");
    }
    let mut driver = plane
        .start_hostpath("controller", &POOLS)
        .await
        .expect("hostpathplugin");
    let mut replicas: Vec<(String, Running)> = ["volplane-a", "volplane-b"]
        .map(|name| (name.to_string(), replica(&plane, &driver, name)))
        .into();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(other.clone(), NAMESPACE);
    let mut generation = 0;

    let started = Instant::now();
    let mut samples: BTreeMap<u32, Samples> = BTreeMap::new();
    let (mut step, mut faults, mut next_fault, mut next_sample) = (0u64, 0usize, fault_every, Duration::ZERO);
    let mut panics = 0;
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        churn(&other, step, &mut nodes, &plane).await;
        step += 1;
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(10);
            for (_, running) in &replicas {
                let rss = status_kib(running.pid(), "VmRSS").unwrap_or(0) as f64 / 1024.0;
                samples
                    .entry(running.pid())
                    .or_default()
                    .push((started.elapsed().as_secs_f64() / 60.0, rss));
            }
        }
        if started.elapsed() >= next_fault {
            next_fault += fault_every;
            let fault = [Fault::ApiServer, Fault::Leader, Fault::Driver][faults % 3];
            faults += 1;
            eprintln!("soak: {:.1} min: {fault:?}", started.elapsed().as_secs_f64() / 60.0);
            match fault {
                Fault::ApiServer => {
                    plane.kill_api_server().expect("kill the API server");
                    for _ in 0..10 {
                        churn(&other, step, &mut nodes, &plane).await;
                        step += 1;
                    }
                    plane.restart_api_server().await.expect("the API server comes back");
                }
                Fault::Leader => {
                    // Kill the ephemeral Lease's holder with -9 and start a
                    // fresh replica; the other takes over.
                    let holder = support::lease_holder(&leases, "volplane-ephemeral")
                        .await
                        .unwrap_or_default();
                    let index = replicas
                        .iter()
                        .position(|(name, _)| holder.starts_with(&format!("{name}-")))
                        .unwrap_or(0);
                    let (_, killed) = replicas.remove(index);
                    killed.signal("KILL");
                    let (_, lines) = killed.exit("the killed replica is gone").await;
                    panics += lines.iter().filter(|l| l.contains("panicked")).count();
                    generation += 1;
                    let name = format!("volplane-{generation}");
                    replicas.push((name.clone(), replica(&plane, &driver, &name)));
                }
                Fault::Driver => {
                    driver = plane.restart_hostpath(driver, &POOLS).await.expect("driver restarts");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The invariants, once the last changes have settled (bounded waits).
    let pods: Api<Pod> = Api::namespaced(client.clone(), APPS);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), APPS);
    eventually_some(
        Duration::from_secs(120),
        "each pod has exactly its claim, no claim outlives its pod",
        || async {
            let pods = pods.list(&ListParams::default()).await.ok()?.items;
            let claims = claims.list(&ListParams::default()).await.ok()?.items;
            let wanted: BTreeSet<(String, String)> = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| Some((format!("{}-data", p.metadata.name.clone()?), p.metadata.uid.clone()?)))
                .collect();
            let have: BTreeSet<(String, String)> = claims
                .iter()
                .filter_map(|c| {
                    let owner = c
                        .metadata
                        .owner_references
                        .as_ref()?
                        .iter()
                        .find(|r| r.controller == Some(true))?;
                    Some((c.metadata.name.clone()?, owner.uid.clone()))
                })
                .collect();
            (wanted == have).then_some(())
        },
    )
    .await;
    let csi = CsiClient::new(driver.address().parse().expect("address"), Duration::from_secs(5));
    let mut expected: BTreeSet<(String, String, i64)> = BTreeSet::new();
    for node in &nodes {
        for (class, _) in POOLS {
            let report = csi
                .get_capacity(&CapacityQuery {
                    parameters: [("kind".to_string(), class.to_string())].into(),
                    topology: Some([(HostPath::TOPOLOGY_KEY.to_string(), node.clone())].into()),
                })
                .await
                .expect("GetCapacity");
            expected.insert((node.clone(), class.to_string(), report.available_capacity));
        }
    }
    eventually_some(
        Duration::from_secs(120),
        "one capacity object per (node, class), the driver's value",
        || async {
            let objects = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
                .list(&ListParams::default().labels("csi.storage.k8s.io/managed-by=volplane"))
                .await
                .ok()?
                .items;
            let published: Vec<(String, String, i64)> = objects
                .into_iter()
                .filter_map(|o| {
                    let node = o.node_topology?.match_labels?.get(HostPath::TOPOLOGY_KEY)?.clone();
                    Some((node, o.storage_class_name, parse_bytes(&o.capacity?.0)?))
                })
                .collect();
            let unique: BTreeSet<(String, String, i64)> = published.iter().cloned().collect();
            (unique.len() == published.len() && unique == expected).then_some(())
        },
    )
    .await;

    let all: Vec<(f64, f64)> = samples.values().flatten().copied().collect();
    // Ten minutes each (a third of a shorter run).
    let span = if minutes >= 30 { 10.0 } else { minutes as f64 / 3.0 };
    let first: Vec<(f64, f64)> = all.iter().filter(|(m, _)| *m < span).copied().collect();
    let last: Vec<(f64, f64)> = all
        .iter()
        .filter(|(m, _)| *m >= minutes as f64 - span)
        .copied()
        .collect();
    println!(
        "soak: {minutes} min, {step} churn steps, {faults} faults, {} replicas over the run",
        samples.len()
    );
    println!("soak: RSS per replica, first {span:.0} min: {}", summary(&first));
    println!("soak: RSS per replica, last  {span:.0} min: {}", summary(&last));
    for (_, running) in replicas {
        let (code, lines) = running.terminate().await;
        panics += lines.iter().filter(|l| l.contains("panicked")).count();
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
    assert_eq!(panics, 0, "a replica panicked");
}
