//! e2e on a real node: deploy/ as shipped (through the overlay in
//! `tests/deploy-node`) runs as pods from volplane's release binary next to
//! the hostpath driver, a kubelet mounts the volumes volplane's claims get,
//! and the kubelet itself rejects a pod that does not fit.
//! Needs root and Debian's containerd, runc, containernetworking-plugins
//! and busybox-static (see `volplane_tests::node`); ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

#[path = "node/disruption.rs"]
mod disruption;
#[path = "node/lifecycle.rs"]
mod lifecycle;
#[path = "node/rollout.rs"]
mod rollout;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use volplane_capacity::quantity::parse_bytes;
use volplane_tests::e2e::{ControlPlane, Options, bin_dir};
use volplane_tests::node::{BUSYBOX_IMAGE, HOSTPATH_STATE_DIR, NODE_NAME, RealNode};
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
/// Set for the child test [`holds_a_node_until_killed`].
const HOLDER_ENV: &str = "VOLPLANE_E2E_NODE_HOLDER";

/// The tests of this file run one at a time (one node per machine; the
/// kill test's child needs the node while its parent waits).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const GI: i64 = 1 << 30;

/// The binary in the node's volplane image: the release binary (built now
/// when needed), or with `VOLPLANE_E2E_IMAGE=test-build` the binary this
/// test run built (a debug build, with the demo; CI uses it to keep within
/// its time: a release build of the workspace takes ten minutes on 2 cores).
fn image_binary() -> std::path::PathBuf {
    if std::env::var("VOLPLANE_E2E_IMAGE").is_ok_and(|v| v == "test-build") {
        return env!("CARGO_BIN_EXE_volplane").into();
    }
    volplane_tests::node::volplane_release_binary().expect("volplane's release binary")
}

/// The control plane, ready for a node, and the node.
async fn start() -> (ControlPlane, RealNode) {
    let plane = ControlPlane::start_with(
        &bin_dir(),
        Options {
            node: true,
            // The rolling update's check reads who wrote what.
            audit: true,
            ..Options::default()
        },
    )
    .await
    .expect("control plane starts");
    let node = plane.start_node(&image_binary()).await.expect("the node starts");
    (plane, node)
}

/// When the test fails, shows the pods, volplane's pods' last log lines and
/// the events: what a failed wait alone does not say.
struct ShowPodsOnFailure<'a>(&'a ControlPlane);

impl Drop for ShowPodsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let show = |args: &[&str]| {
            self.0.kubectl(args).map_or_else(
                |error| format!("{error:#}"),
                |o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                },
            )
        };
        eprintln!("--- pods\n{}", show(&["get", "pods", "-A", "-o", "wide"]));
        for app in ["volplane-capacity-node", "volplane-health-node", "volplane-ephemeral"] {
            let selector = format!("app.kubernetes.io/name={app}");
            eprintln!(
                "--- logs of {app}\n{}",
                show(&["logs", "-n", NAMESPACE, "-l", &selector, "--tail=25", "--prefix"])
            );
        }
        eprintln!("--- events\n{}", show(&["get", "events", "-A"]));
    }
}

/// Applies deploy/ through the test overlay, with the hostpath driver's
/// CSIDriver and classes and a csi-provisioner that provisions for it.
async fn deploy(plane: &ControlPlane) {
    let client = plane.client();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": NAMESPACE}}),
    )
    .await;
    plane.create_hostpath_classes().await.expect("CSIDriver and classes");
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/deploy-node");
    plane
        .kubectl_ok(&["apply", "-k", &overlay.display().to_string()])
        .expect("kubectl apply -k tests/deploy-node");
}

/// Pods of `namespace` labelled `app.kubernetes.io/name=<app>`.
async fn app_pods(client: &kube::Client, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={app}")))
        .await
        .map(|list| list.items)
        .unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Waits until `count` pods of `app` run and are Ready (their readiness
/// probe, `/readyz`, answered), on the node; returns them.
async fn ready_pods(client: &kube::Client, app: &str, count: usize) -> Vec<Pod> {
    eventually_some(
        Duration::from_secs(120),
        &format!("{count} Ready pods of {app}"),
        || async {
            let pods: Vec<Pod> = app_pods(client, app)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            (pods.len() == count && pods.iter().all(is_ready)).then_some(pods)
        },
    )
    .await
}

/// A pod's admin endpoint, on its IP on the node's bridge.
fn admin_address(pod: &Pod) -> SocketAddr {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod IP");
    format!("{ip}:8080").parse().expect("admin address")
}

/// The node's published capacity per class, from objects owned by the DaemonSet.
async fn published(client: &kube::Client) -> BTreeMap<String, i64> {
    let objects = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    objects
        .into_iter()
        .filter(|o| {
            o.metadata.owner_references.as_ref().is_some_and(|owners| {
                owners
                    .iter()
                    .any(|r| r.kind == "DaemonSet" && r.name == "volplane-capacity-node")
            })
        })
        .filter(|o| {
            (o.metadata.labels.as_ref())
                .and_then(|l| l.get("csi.storage.k8s.io/managed-by"))
                .is_some_and(|m| *m == format!("volplane-{NODE_NAME}"))
        })
        .filter_map(|o| Some((o.storage_class_name, parse_bytes(&o.capacity?.0)?)))
        .collect()
}

async fn wait_for_published(client: &kube::Client, class: &str, bytes: i64) {
    eventually_some(
        Duration::from_secs(60),
        &format!("{class} capacity of node {NODE_NAME} published as {} GiB", bytes / GI),
        || async { (published(client).await.get(class) == Some(&bytes)).then_some(()) },
    )
    .await;
}

/// A generic ephemeral volume `data` of `size` in class `class`.
fn ephemeral(size: &str, class: &str) -> Value {
    json!([{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": class,
        "resources": {"requests": {"storage": size}}}}}}])
}

/// A pod `name` that is never scheduled (no such scheduler) with a 1Gi
/// ephemeral volume of class fast: where only its claim matters.
fn unscheduled_pod(name: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"schedulerName": "nobody",
                    "containers": [{"name": "c", "image": BUSYBOX_IMAGE}],
                    "volumes": ephemeral("1Gi", "fast")}})
}

/// A busybox pod running `script` with volume `data` at /data.
fn busybox_pod(name: &str, script: &str, size: &str, class: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                    "command": ["sh", "-c", script],
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": ephemeral(size, class)}})
}

/// Creates pod `value` held back from scheduling until its claim exists.
/// kube-scheduler 1.36 rejects a pod whose ephemeral claim is not there yet
/// and, seen here, may not try again for minutes after the claim appears:
/// the test takes that race out (volplane creates claims of gated pods).
async fn create_after_its_claim(client: &kube::Client, mut value: Value) {
    let name = value["metadata"]["name"].as_str().expect("name").to_string();
    value["spec"]["schedulingGates"] = json!([{"name": "volplane.test/claim-first"}]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create(&pods, value).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    eventually_some(Duration::from_secs(30), &format!("{name}'s claim"), || async {
        claims.get_opt(&format!("{name}-data")).await.ok()?.map(|_| ())
    })
    .await;
    pods.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"schedulingGates": null}})),
    )
    .await
    .expect("lift the scheduling gate");
}

async fn running(pods: &Api<Pod>, name: &str) -> Pod {
    eventually_some(Duration::from_secs(90), &format!("pod {name} Running"), || async {
        let pod = pods.get_opt(name).await.ok()??;
        (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
    })
    .await
}

/// The handle of the volume bound to claim `name`.
async fn volume_handle(client: &kube::Client, namespace: &str, claim: &str) -> String {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    eventually_some(Duration::from_secs(60), &format!("claim {claim} bound"), || async {
        let claim = claims.get_opt(claim).await.ok()??;
        let volume = claim.spec?.volume_name?;
        let pv = Api::<PersistentVolume>::all(client.clone())
            .get_opt(&volume)
            .await
            .ok()??;
        Some(pv.spec?.csi?.volume_handle)
    })
    .await
}

/// The core/v1 events of `namespace` as (reason, object name, message):
/// the kubelet's and the scheduler's among them (events.k8s.io/v1 cannot
/// read those without an eventTime).
async fn core_events(client: &kube::Client, namespace: &str) -> Vec<(String, String, String)> {
    Api::<CoreEvent>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits for an event `reason` about `about` whose note contains `text`;
/// on a timeout the failure lists the events about it.
async fn wait_for_event(client: &kube::Client, namespace: &str, about: &str, reason: &str, text: &str) {
    let what = format!("{reason} \"…{text}…\" about {about}");
    let found = volplane_tests::wait::until(Duration::from_secs(90), &what, || async {
        let events = core_events(client, namespace).await;
        events
            .iter()
            .any(|(r, a, note)| r == reason && a == about && note.contains(text))
            .then_some(())
    })
    .await;
    if let Err(error) = found {
        let events = core_events(client, namespace).await;
        let seen: Vec<_> = events.into_iter().filter(|(_, a, _)| a == about).collect();
        panic!("{error:#}; events about {about}: {seen:#?}");
    }
}

async fn gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    eventually_some(Duration::from_secs(90), &format!("{what} {name} gone"), || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(volplane_e2e),
    ignore = "needs VOLPLANE_E2E_BIN_DIR (real control plane binaries)"
)]
async fn deploy_runs_as_pods_on_a_real_node_and_the_seed_story_holds() {
    let _serial = SERIAL.lock().await;
    let (plane, node) = start().await;
    let _show = ShowPodsOnFailure(&plane);
    let client = plane.client();
    let _provisioner = plane
        .start_csi_provisioner("csi-provisioner", node.hostpath(), NAMESPACE, &[])
        .expect("csi-provisioner");
    deploy(&plane).await;

    // Every workload of deploy/ runs, Ready by its /readyz probe.
    ready_pods(&client, "volplane-capacity-node", 1).await;
    let health = ready_pods(&client, "volplane-health-node", 1).await.remove(0);
    ready_pods(&client, "volplane-ephemeral", 2).await;

    // The per-node capacity DaemonSet publishes the node's pools, owned by the DaemonSet.
    wait_for_published(&client, "fast", 100 * GI).await;
    wait_for_published(&client, "slow", 10 * GI).await;

    seed_story(&client).await;
    kubelet_rejection_releases_the_claim(&client).await;
    health_reports_the_drivers_condition_once(&client, admin_address(&health)).await;
    unreachable_api_server_is_not_ready(&client).await;
    leader_hands_over_while_pods_arrive(&plane).await;
    disruption::eviction_hands_over_and_a_second_is_refused(&plane).await;
    rollout::rolling_update_without_a_gap(&plane).await;
    lifecycle::rollout_keeps_the_objects(&plane).await;
    lifecycle::a_deleted_nodes_objects_go(&client).await;
    lifecycle::uninstall_leaves_no_capacity(&plane).await;
    drop(node);
    assert_eq!(
        volplane_tests::node::leftovers(),
        Vec::<String>::new(),
        "a stopped node leaves nothing"
    );
}

/// A test binary killed with `kill -9` while its node runs a pod leaves the
/// pod's processes, mounts, bridge and cgroups behind; the next node's start
/// removes them, and that node's end leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(volplane_e2e),
    ignore = "needs VOLPLANE_E2E_BIN_DIR (real control plane binaries)"
)]
async fn what_a_killed_test_left_is_removed_by_the_next_node() {
    use std::io::BufRead as _;
    let _serial = SERIAL.lock().await;
    let mut command = std::process::Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", "holds_a_node_until_killed", "--ignored", "--nocapture"])
        .env(HOLDER_ENV, "1")
        .stdout(std::process::Stdio::piped());
    let mut child = volplane_tests::process::dies_with_test(&mut command)
        .spawn()
        .expect("start the holder");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(pids) = line.strip_prefix("holding: ") {
                let _ = sender.send(pids.to_string());
            }
        }
    });
    let held = tokio::task::spawn_blocking(move || receiver.recv_timeout(Duration::from_secs(240)))
        .await
        .expect("reader")
        .expect("the holder runs a pod on its node within 4 minutes");
    let held: Vec<u32> = held.split(',').filter_map(|pid| pid.parse().ok()).collect();
    child.kill().expect("kill -9 the holder");
    child.wait().expect("reap the holder");

    let left = volplane_tests::node::leftovers();
    assert!(
        held.iter().any(|pid| volplane_tests::node::is_alive(*pid)) && !left.is_empty(),
        "a killed test leaves its node's pods running: {held:?}, {left:?}"
    );
    let (plane, node) = start().await;
    let survivors: Vec<u32> = held
        .into_iter()
        .filter(|pid| volplane_tests::node::is_alive(*pid))
        .collect();
    assert!(
        survivors.is_empty(),
        "the killed node's processes are gone: {survivors:?}"
    );
    drop(node);
    drop(plane);
    assert_eq!(
        volplane_tests::node::leftovers(),
        Vec::<String>::new(),
        "nothing is left behind"
    );
}

/// The child of [`what_a_killed_test_left_is_removed_by_the_next_node`]:
/// runs a node with a pod and waits to be killed. Does nothing on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: run by what_a_killed_test_left_is_removed_by_the_next_node"]
async fn holds_a_node_until_killed() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let (plane, node) = start().await;
    let pods: Api<Pod> = Api::namespaced(plane.client(), "default");
    create(
        &pods,
        json!({"metadata": {"name": "held"},
               "spec": {"containers": [{"name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                        "command": ["sleep", "3600"],
                                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                        "volumes": [{"name": "scratch", "emptyDir": {}}]}}),
    )
    .await;
    running(&pods, "held").await;
    let pids: Vec<String> = node.process_ids().iter().map(u32::to_string).collect();
    println!("holding: {}", pids.join(","));
    std::future::pending::<()>().await;
}

/// A 10Gi volume for a pod that fits only where capacity says so: the pod
/// runs, its file is in the driver's state, and its deletion gives the
/// capacity back. A pod asking for more than any pool has stays Pending.
async fn seed_story(client: &kube::Client) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create_after_its_claim(client, busybox_pod("too-big", "sleep 3600", "200Gi", "fast")).await;
    wait_for_event(
        client,
        "default",
        "too-big",
        "FailedScheduling",
        "did not have enough free storage",
    )
    .await;

    create_after_its_claim(
        client,
        busybox_pod(
            "seed",
            "echo seeded > /data/seed.txt && exec sleep 3600",
            "10Gi",
            "fast",
        ),
    )
    .await;
    let pod = running(&pods, "seed").await;
    assert_eq!(pod.spec.and_then(|s| s.node_name).as_deref(), Some(NODE_NAME));
    let handle = volume_handle(client, "default", "seed-data").await;
    let file = Path::new(HOSTPATH_STATE_DIR).join(&handle).join("seed.txt");
    eventually_some(
        Duration::from_secs(30),
        "the pod's file in the driver's state",
        || async { (std::fs::read_to_string(&file).ok()?.trim() == "seeded").then_some(()) },
    )
    .await;
    wait_for_published(client, "fast", 90 * GI).await;

    pods.delete("seed", &DeleteParams::default())
        .await
        .expect("delete seed");
    pods.delete("too-big", &DeleteParams::default())
        .await
        .expect("delete too-big");
    gone(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default"),
        "seed-data",
        "claim",
    )
    .await;
    eventually_some(
        Duration::from_secs(90),
        "the PV and the driver's volume gone",
        || async {
            let volumes = Api::<PersistentVolume>::all(client.clone())
                .list(&ListParams::default())
                .await
                .ok()?;
            (volumes.items.is_empty() && !Path::new(HOSTPATH_STATE_DIR).join(&handle).exists()).then_some(())
        },
    )
    .await;
    wait_for_published(client, "fast", 100 * GI).await;
}

/// A pod bound to the node asking for more CPU than it has: the kubelet
/// rejects it (OutOfcpu) and volplane releases the claim it had created.
async fn kubelet_rejection_releases_the_claim(client: &kube::Client) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // No scheduler takes it: it waits unbound until the test binds it.
    create(
        &pods,
        json!({"metadata": {"name": "greedy"},
               "spec": {"schedulerName": "nobody", "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                        "command": ["sleep", "3600"],
                                        "resources": {"requests": {"cpu": "64"}}}],
                        "volumes": ephemeral("1Gi", "fast")}}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    eventually_some(Duration::from_secs(30), "greedy's claim", || async {
        claims.get_opt("greedy-data").await.ok()?.map(|_| ())
    })
    .await;
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "greedy"},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}});
    pods.create_subresource::<Value, Value>("binding", "greedy", &PostParams::default(), &binding)
        .await
        .expect("bind greedy to the node");
    eventually_some(
        Duration::from_secs(60),
        "the kubelet rejects greedy (OutOfcpu)",
        || async {
            let status = pods.get_opt("greedy").await.ok()??.status?;
            (status.phase.as_deref() == Some("Failed") && status.reason.as_deref() == Some("OutOfcpu")).then_some(())
        },
    )
    .await;
    gone(&claims, "greedy-data", "released claim").await;
    eventually_some(Duration::from_secs(30), "EphemeralVolumeReleased on greedy", || async {
        (volplane_tests::events::count(client, "default", "EphemeralVolumeReleased", "greedy").await == 1).then_some(())
    })
    .await;
    pods.delete("greedy", &DeleteParams::default())
        .await
        .expect("delete greedy");
}

/// The node-side health DaemonSet asks the driver about a mounted volume at
/// the kubelet's real path (the driver answers with a condition for it) and
/// reports the abnormal condition the driver gives once, however
/// many sweeps see it. (hostpathplugin's own node-side check calls the
/// kubelet's bind mount "not mounted" here: that is its answer to report.)
async fn health_reports_the_drivers_condition_once(client: &kube::Client, admin: SocketAddr) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create_after_its_claim(client, busybox_pod("patient", "exec sleep 3600", "1Gi", "slow")).await;
    running(&pods, "patient").await;
    volume_handle(client, "default", "patient-data").await;
    let count = || async {
        core_events(client, "default")
            .await
            .iter()
            .filter(|(reason, about, _)| reason == "VolumeConditionAbnormal" && about == "patient")
            .count()
    };
    eventually_some(
        Duration::from_secs(60),
        "VolumeConditionAbnormal about patient",
        || async { (count().await > 0).then_some(()) },
    )
    .await;
    support::wait_for_health_checks(admin, "abnormal", 2.0).await;
    assert_eq!(count().await, 1, "reported once however many sweeps see it");
    assert_eq!(
        support::metric_value(
            admin,
            "volplane_health_node_volume_abnormal",
            &[("namespace", "default"), ("persistentvolumeclaim", "patient-data")]
        ),
        1.0,
        "the driver answered for the volume at the kubelet's path"
    );
    pods.delete("patient", &DeleteParams::default())
        .await
        .expect("delete patient");
}

/// The ephemeral Deployment's pod, with the API server's address made
/// unreachable: it runs, its readiness probe fails, it is never Ready.
async fn unreachable_api_server_is_not_ready(client: &kube::Client) {
    let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get("volplane-ephemeral")
        .await
        .expect("the ephemeral Deployment");
    let mut spec = serde_json::to_value(deployment.spec.expect("spec").template.spec.expect("pod spec")).expect("json");
    spec["containers"][0]["env"].as_array_mut().expect("env").extend([
        json!({"name": "KUBERNETES_SERVICE_HOST", "value": "10.88.0.1"}),
        json!({"name": "KUBERNETES_SERVICE_PORT", "value": "1"}),
    ]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    create(
        &pods,
        json!({"metadata": {"name": "cut-off", "labels": {"test": "cut-off"}}, "spec": spec}),
    )
    .await;
    wait_for_event(client, NAMESPACE, "cut-off", "Unhealthy", "Readiness probe failed").await;
    let pod = pods.get("cut-off").await.expect("cut-off");
    assert!(
        !is_ready(&pod),
        "a pod that cannot reach the API server is not Ready: {:?}",
        pod.status
    );
    pods.delete("cut-off", &DeleteParams::default())
        .await
        .expect("delete cut-off");
}

/// Creates namespace `name` and waits for its `default` ServiceAccount,
/// without which no pod is admitted there.
async fn namespace_for_pods(plane: &ControlPlane, name: &str) {
    create(
        &Api::<Namespace>::all(plane.client()),
        json!({"metadata": {"name": name}}),
    )
    .await;
    plane
        .wait_for_service_account(name)
        .await
        .expect("default ServiceAccount");
}

/// Waits until namespace `namespace` holds `count` claims: one for each
/// pod that arrived there.
async fn wait_for_claims(client: &kube::Client, namespace: &str, count: usize) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    eventually_some(
        Duration::from_secs(60),
        "a claim for every pod that arrived",
        || async {
            let list = claims.list(&ListParams::default()).await.ok()?;
            (list.items.len() == count).then_some(())
        },
    )
    .await;
}

/// Pods arrive every 100 ms while the pod holding the ephemeral Lease is
/// deleted: the other replica takes over, every pod gets exactly its one
/// claim, none is lost.
async fn leader_hands_over_while_pods_arrive(plane: &ControlPlane) {
    const PODS: usize = 60;
    let client = plane.client();
    let namespace = "arrivals";
    namespace_for_pods(plane, namespace).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    // volplane's identity is `<pod name>_<random suffix>`.
    let pod_of = |holder: &str| holder.rsplit_once('_').map_or(holder, |(pod, _)| pod).to_string();
    let leader = eventually_some(Duration::from_secs(30), "a holder of volplane-ephemeral", || async {
        support::lease_holder(&leases, "volplane-ephemeral")
            .await
            .map(|holder| pod_of(&holder))
    })
    .await;
    let replicas: BTreeSet<String> = app_pods(&client, "volplane-ephemeral").await.iter().map(name).collect();
    assert!(
        replicas.contains(&leader),
        "the Lease is held by a replica: {leader} of {replicas:?}"
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let arrivals = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            for i in 0..PODS {
                interval.tick().await;
                create(&pods, unscheduled_pod(&format!("arrival-{i}"))).await;
            }
        })
    };
    eventually_some(Duration::from_secs(30), "the first arrivals", || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        (list.items.len() >= 10).then_some(())
    })
    .await;
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .delete(&leader, &DeleteParams::default())
        .await
        .expect("delete the leader's pod");
    let successor = eventually_some(Duration::from_secs(60), "another replica holds the Lease", || async {
        let holder = pod_of(&support::lease_holder(&leases, "volplane-ephemeral").await?);
        (holder != leader).then_some(holder)
    })
    .await;
    assert!(
        replicas.contains(&successor),
        "the standby took over: {successor} of {replicas:?}"
    );
    arrivals.await.expect("pods created");

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let owners = eventually_some(Duration::from_secs(60), "a claim for every arrival", || async {
        let list = claims.list(&ListParams::default()).await.ok()?;
        (list.items.len() >= PODS).then_some(list.items)
    })
    .await;
    let uids: BTreeMap<String, String> = pods
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .map(|p| (name(&p), p.metadata.uid.unwrap_or_default()))
        .collect();
    assert_eq!(owners.len(), PODS, "one claim per pod, no more");
    for claim in owners {
        let claim_name = claim.metadata.name.clone().unwrap_or_default();
        let pod = claim_name.strip_suffix("-data").expect("named <pod>-data");
        let owner = claim
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.controller == Some(true)))
            .unwrap_or_else(|| panic!("{claim_name} has no controller"));
        assert_eq!(Some(&owner.uid), uids.get(pod), "{claim_name} is owned by its pod");
    }
    let warnings = volplane_tests::events::occurrences(&client, namespace)
        .await
        .expect("events");
    assert!(
        warnings.iter().all(|(reason, _, _)| !reason.starts_with("Failed")),
        "no failure while leadership moved: {warnings:?}"
    );
}
