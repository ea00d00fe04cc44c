//! The migration runbooks of README.md, on a real control plane: moving
//! generic ephemeral volumes from kube-controller-manager's
//! ephemeral-volume-controller to volplane while pods keep arriving.
//! Ignored unless `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use support::Running;
use volplane_tests::e2e::{ControlPlane, Options, bin_dir};
use volplane_tests::wait::eventually_some;

/// Pods are created this often, before, during and after the switch.
const POD_EVERY: Duration = Duration::from_millis(100);

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                 "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {
                     "metadata": {"labels": {"app": "migration"}},
                     "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
    .expect("pod")
}

/// When each claim was first seen by a watch of the test's own.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

fn watch_claims(client: kube::Client) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        let claims = Api::<PersistentVolumeClaim>::namespaced(client, "default");
        let mut events = watcher::watcher(claims, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Apply(claim) | watcher::Event::InitApply(claim)) = event
                && let Some(name) = claim.metadata.name
                && let Ok(mut seen) = record.lock()
            {
                seen.entry(name).or_insert_with(Instant::now);
            }
        }
    });
    (seen, task)
}

/// Creates pods every [`POD_EVERY`] for `during`, recording when each one's
/// create returned.
async fn create_pods(pods: &Api<Pod>, next: &mut usize, during: Duration, created: &mut Vec<(Pod, Instant)>) {
    let until = Instant::now() + during;
    while Instant::now() < until {
        let pod = pods
            .create(&PostParams::default(), &pod(&format!("pod-{next:04}")))
            .await
            .expect("pod");
        created.push((pod, Instant::now()));
        *next += 1;
        tokio::time::sleep(POD_EVERY).await;
    }
}

/// Warnings of either ephemeral controller (the scheduler's about the
/// node-less cluster and the API server's own are not theirs).
async fn warnings(client: &kube::Client) -> Vec<String> {
    let new: Vec<String> = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning") && !not_theirs(e.reason.as_deref()))
        .map(|e| format!("{:?}: {:?}", e.reason, e.note))
        .collect();
    let old = Api::<CoreEvent>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning") && !not_theirs(e.reason.as_deref()))
        .map(|e| format!("{:?}: {:?}", e.reason, e.message));
    new.into_iter().chain(old).collect()
}

fn not_theirs(reason: Option<&str>) -> bool {
    matches!(reason, Some("FailedScheduling" | "KubeAPIReadyz"))
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_kube_controller_managers_ephemeral_volume_controller_while_pods_arrive() {
    let options = Options {
        kcm_ephemeral: true,
        ..Options::default()
    };
    let plane = ControlPlane::start_with(&bin_dir(), options)
        .await
        .expect("control plane starts");
    let client = plane.client();
    let (seen, watch) = watch_claims(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (mut next, mut created) = (0, Vec::new());

    // kube-controller-manager alone.
    create_pods(&pods, &mut next, Duration::from_secs(2), &mut created).await;
    // Step 1 of the runbook: volplane beside it (releases off while both run).
    let mut volplane = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=ephemeral",
            "--leader-election=false",
            "--ephemeral-release=never",
            "--ephemeral-create-delay=300ms",
        ],
    );
    let starting = Instant::now();
    let mut during_start = Vec::new();
    let creating = create_pods(&pods, &mut next, Duration::from_secs(3), &mut during_start);
    let ((), _) = tokio::join!(creating, volplane.wait_for("volplane is ready"));
    created.extend(during_start);
    println!(
        "volplane ready {:.2} s after it started",
        starting.elapsed().as_secs_f64()
    );
    // Step 2: kube-controller-manager restarts without its controller.
    plane.stop_controller_manager().expect("stop kube-controller-manager");
    let _kcm = plane
        .start_controller_manager_with(
            "kube-controller-manager-2",
            "*,-ephemeral-volume-controller,-node-lifecycle-controller",
            &[
                &format!(
                    "--service-account-private-key-file={}",
                    plane.service_account_key().display()
                ),
                "--use-service-account-credentials=false",
                "--cluster-name=volplane-e2e",
            ],
        )
        .expect("kube-controller-manager again");
    create_pods(&pods, &mut next, Duration::from_secs(3), &mut created).await;

    // Every pod has exactly its claim, with the exact owner contract.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let all = eventually_some(Duration::from_secs(30), "a claim for every pod", || async {
        let all = claims.list(&ListParams::default()).await.ok()?.items;
        (all.len() >= created.len()).then_some(all)
    })
    .await;
    assert_eq!(all.len(), created.len(), "one claim per pod, none twice");
    let by_name: HashMap<String, &PersistentVolumeClaim> =
        all.iter().filter_map(|c| Some((c.metadata.name.clone()?, c))).collect();
    let mut waits = Vec::new();
    for (pod, at) in &created {
        let name = format!("{}-data", pod.metadata.name.as_deref().expect("name"));
        let claim = by_name.get(&name).unwrap_or_else(|| panic!("no {name}"));
        let owners = claim.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{name}: {owners:?}");
        let owner = &owners[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                Some(&owner.name),
                Some(&owner.uid)
            ),
            ("v1", "Pod", pod.metadata.name.as_ref(), pod.metadata.uid.as_ref()),
            "{name}"
        );
        assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
        let first_seen = seen.lock().expect("seen").get(&name).copied().expect("watched");
        waits.push(first_seen.saturating_duration_since(*at));
    }
    waits.sort();
    let longest = waits.last().copied().unwrap_or_default();
    println!(
        "{} pods: claim after the pod p50 {:.3} s, max {:.3} s",
        waits.len(),
        waits[waits.len() / 2].as_secs_f64(),
        longest.as_secs_f64()
    );
    assert!(
        longest <= Duration::from_secs(1),
        "a pod waited {longest:?} for its claim"
    );
    let warnings = warnings(&client).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    watch.abort();
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}

mod health {
    use k8s_openapi::api::core::v1::{Namespace, PersistentVolume};
    use k8s_openapi::api::storage::v1::StorageClass;
    use volplane_health::model::{REASON_ABNORMAL, REASON_NORMAL};
    use volplane_tests::e2e::HostPath;
    use volplane_tests::objects::create;

    use super::*;

    const NS: &str = "e2e-migration";

    async fn count(client: &kube::Client, reason: &str) -> usize {
        volplane_tests::events::count(client, NS, reason, "data").await
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_external_health_monitor_a_condition_it_announced_is_not_announced_again() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": NS}}),
        )
        .await;
        plane.add_hostpath_node("node-1").await.expect("node");
        create(
            &Api::<StorageClass>::all(client.clone()),
            json!({"metadata": {"name": "hostpath"}, "provisioner": HostPath::DRIVER, "volumeBindingMode": "Immediate"}),
        )
        .await;
        let driver = plane.start_hostpath("node-1", &[]).await.expect("hostpathplugin");
        let _provisioner = plane
            .start_csi_provisioner("csi-provisioner", &driver, NS, &[])
            .expect("csi-provisioner");
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
        create(
            &claims,
            json!({"metadata": {"name": "data"},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "hostpath",
                            "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
        let handle = eventually_some(Duration::from_secs(60), "provisioned and bound", || async {
            let claim = claims.get("data").await.ok()?;
            (claim.status?.phase.as_deref() == Some("Bound")).then_some(())?;
            let pv = Api::<PersistentVolume>::all(client.clone())
                .get(claim.spec?.volume_name.as_deref()?)
                .await
                .ok()?;
            Some(pv.spec?.csi?.volume_handle)
        })
        .await;

        // The incumbent announces the volume abnormal, then is stopped.
        let monitor_binary =
            volplane_tests::e2e::find_binary(plane.bin_dir(), "csi-external-health-monitor-controller")
                .expect("external-health-monitor");
        let monitor = plane
            .start_process(
                "external-health-monitor",
                &monitor_binary.to_string_lossy(),
                &[
                    format!("--csi-address={}", driver.socket().display()),
                    format!("--kubeconfig={}", plane.kubeconfig().display()),
                    "--list-volumes-interval=1s".into(),
                    "--monitor-interval=1s".into(),
                ],
            )
            .expect("external-health-monitor");
        let directory = driver.state_dir().join(&handle);
        std::fs::remove_dir_all(&directory).expect("remove the volume's directory");
        eventually_some(
            Duration::from_secs(60),
            "external-health-monitor's VolumeConditionAbnormal",
            || async { (count(&client, REASON_ABNORMAL).await > 0).then_some(()) },
        )
        .await;
        drop(monitor);
        // It may have repeated itself before it stopped.
        let incumbents = count(&client, REASON_ABNORMAL).await;

        // volplane takes over: it sees the same condition and says nothing more.
        let mut volplane = Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=health",
                "--csi-address",
                &driver.address(),
                "--leader-election=false",
                "--health-list-interval",
                "500ms",
                "--http-endpoint",
                "127.0.0.1:0",
            ],
        );
        let admin = volplane.admin_address().await;
        volplane.wait_for("already announced within the hour").await;
        support::wait_for_health_checks(admin, "abnormal", 4.0).await;
        assert_eq!(
            count(&client, REASON_ABNORMAL).await,
            incumbents,
            "the incumbent's only"
        );

        // A later change is volplane's to announce, once; and the next one.
        std::fs::create_dir(&directory).expect("restore the volume's directory");
        eventually_some(Duration::from_secs(30), "VolumeConditionNormal", || async {
            (count(&client, REASON_NORMAL).await > 0).then_some(())
        })
        .await;
        support::wait_for_health_checks(admin, "normal", 4.0).await;
        assert_eq!(count(&client, REASON_NORMAL).await, 1);
        std::fs::remove_dir_all(&directory).expect("remove the volume's directory again");
        eventually_some(
            Duration::from_secs(30),
            "volplane's VolumeConditionAbnormal",
            || async { (count(&client, REASON_ABNORMAL).await > incumbents).then_some(()) },
        )
        .await;
        support::wait_for_health_checks(admin, "abnormal", 4.0).await;
        assert_eq!(count(&client, REASON_ABNORMAL).await, incumbents + 1);

        let (code, lines) = volplane.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}

mod capacity {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, Ordering};

    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::storage::v1::CSIStorageCapacity;
    use support::metric_value;
    use volplane_tests::e2e::HostPath;
    use volplane_tests::objects::create;

    use super::*;

    const NAMESPACE: &str = "volplane";
    const MANAGED_BY: &str = "csi.storage.k8s.io/managed-by";

    /// (node, class) → [(managed-by, capacity)] of every object of the driver.
    type Objects = BTreeMap<(String, String), Vec<(String, String)>>;

    async fn objects(client: &kube::Client) -> Option<Objects> {
        let listed = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
            .list(&ListParams::default().labels(&format!("csi.storage.k8s.io/drivername={}", HostPath::DRIVER)))
            .await
            .ok()?;
        let mut objects = Objects::new();
        for object in listed.items {
            let node = object
                .node_topology
                .as_ref()
                .and_then(|t| t.match_labels.as_ref())
                .and_then(|l| l.get(HostPath::TOPOLOGY_KEY))
                .cloned()
                .unwrap_or_default();
            let managed = object
                .metadata
                .labels
                .unwrap_or_default()
                .remove(MANAGED_BY)
                .unwrap_or_default();
            objects
                .entry((node, object.storage_class_name))
                .or_default()
                .push((managed, object.capacity.map(|q| q.0).unwrap_or_default()));
        }
        Some(objects)
    }

    /// Samples every 100 ms until stopped: for every pair of `expected`, at
    /// least one object, and never two with different capacities.
    fn poll_pairs(
        client: kube::Client,
        expected: BTreeSet<(String, String)>,
    ) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, Vec<String>)>) {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut samples, mut violations) = (0, Vec::new());
            while !stopped.load(Ordering::Relaxed) {
                if let Some(objects) = objects(&client).await {
                    samples += 1;
                    for pair in &expected {
                        match objects.get(pair) {
                            None => violations.push(format!("no object for {pair:?}")),
                            Some(found) => {
                                let values: BTreeSet<&String> = found.iter().map(|(_, c)| c).collect();
                                if values.len() > 1 {
                                    violations.push(format!("{pair:?} has objects that disagree: {found:?}"));
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (samples, violations)
        });
        (stop, task)
    }

    async fn setup(plane: &ControlPlane, nodes: usize) -> (HostPath, BTreeSet<(String, String)>) {
        create(
            &Api::<Namespace>::all(plane.client()),
            json!({"metadata": {"name": NAMESPACE}}),
        )
        .await;
        plane.create_hostpath_classes().await.expect("CSIDriver and classes");
        let mut pairs = BTreeSet::new();
        for i in 0..nodes {
            let node = format!("node-{i:02}");
            plane.add_hostpath_node(&node).await.expect("node");
            for class in ["fast", "slow"] {
                pairs.insert((node.clone(), class.to_string()));
            }
        }
        let driver = plane
            .start_hostpath("controller", &[("fast", "40Gi"), ("slow", "4Gi")])
            .await
            .expect("hostpathplugin");
        (driver, pairs)
    }

    fn csi_provisioner(
        plane: &ControlPlane,
        driver: &HostPath,
        name: &str,
        capacity: bool,
    ) -> volplane_tests::process::Process {
        let enable = format!("--enable-capacity={capacity}");
        plane
            .start_csi_provisioner(
                name,
                driver,
                NAMESPACE,
                &[&enable, "--capacity-ownerref-level=-1", "--capacity-poll-interval=2s"],
            )
            .expect("csi-provisioner")
    }

    fn volplane(plane: &ControlPlane, driver: &HostPath) -> Running {
        volplane_polling(plane, driver, "2s")
    }

    fn volplane_polling(plane: &ControlPlane, driver: &HostPath, interval: &str) -> Running {
        Running::start(
            plane.kubeconfig(),
            &[
                "--controllers=capacity",
                "--csi-address",
                &driver.address(),
                "--namespace",
                NAMESPACE,
                "--capacity-owner",
                "none",
                "--leader-election=false",
                "--capacity-poll-interval",
                interval,
                "--http-endpoint",
                "127.0.0.1:0",
            ],
        )
    }

    async fn all_by(client: &kube::Client, managed_by: &str, pairs: usize) -> Objects {
        eventually_some(
            Duration::from_secs(90),
            &format!("one object per pair, all {managed_by}'s"),
            || async {
                let objects = objects(client).await?;
                let one_each = objects.len() == pairs
                    && objects
                        .values()
                        .all(|found| found.len() == 1 && found[0].0 == managed_by);
                one_each.then_some(objects)
            },
        )
        .await
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_csi_provisioner_every_pair_keeps_one_value_while_volplane_takes_over() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        let (driver, pairs) = setup(&plane, 20).await;
        let first = csi_provisioner(&plane, &driver, "csi-provisioner", true);
        let theirs = all_by(&client, "external-provisioner", pairs.len()).await;
        let (stop, poller) = poll_pairs(client.clone(), pairs.clone());

        // Its capacity tracking is switched off (it keeps provisioning).
        drop(first);
        let _second = csi_provisioner(&plane, &driver, "csi-provisioner-2", false);
        let mut running = volplane(&plane, &driver);
        let admin = running.admin_address().await;
        let ours = all_by(&client, "volplane", pairs.len()).await;
        stop.store(true, Ordering::Relaxed);
        let (samples, violations) = poller.await.expect("poller");
        assert!(samples >= 20, "{samples} samples");
        assert!(
            violations.is_empty(),
            "{} violations, first: {:?}",
            violations.len(),
            violations.first()
        );
        // The driver's values, as csi-provisioner had them.
        let values = |objects: &Objects| -> BTreeMap<(String, String), String> {
            objects
                .iter()
                .map(|(pair, found)| (pair.clone(), found[0].1.clone()))
                .collect()
        };
        assert_eq!(values(&ours), values(&theirs));
        assert_eq!(metric_value(admin, "volplane_capacity_incumbent_objects", &[]), 0.0);
        assert_eq!(
            metric_value(admin, "volplane_capacity_api_writes_total", &[("verb", "create")]),
            0.0,
            "taken over in place, none created"
        );
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("the canary stood: adopting all")),
            "{}",
            lines.join("\n")
        );
    }

    /// The pool shrank while csi-provisioner's capacity tracking was off:
    /// its objects still say 40Gi. volplane, polling every minute (so the
    /// adoption gate stays shut for two minutes at least), writes the
    /// driver's 20Gi into them within 30 s of its start, and they stay
    /// csi-provisioner's until the gate opens; volplane's writes are not
    /// taken for csi-provisioner's.
    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_csi_provisioner_the_drivers_values_show_before_the_takeover() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        let (driver, pairs) = setup(&plane, 5).await;
        let first = csi_provisioner(&plane, &driver, "csi-provisioner", true);
        let theirs = all_by(&client, "external-provisioner", pairs.len()).await;
        assert!(
            theirs.values().all(|found| found[0].1 == "40Gi" || found[0].1 == "4Gi"),
            "{theirs:?}"
        );
        drop(first);
        let _second = csi_provisioner(&plane, &driver, "csi-provisioner-2", false);
        let driver = plane
            .restart_hostpath(driver, &[("fast", "20Gi"), ("slow", "4Gi")])
            .await
            .expect("the driver restarts with a smaller pool");

        let mut running = volplane_polling(&plane, &driver, "1m");
        let started = Instant::now();
        let admin = running.admin_address().await;
        let refreshed = eventually_some(
            Duration::from_secs(30),
            "the driver's values in every object",
            || async {
                let objects = objects(&client).await?;
                let drivers = objects.iter().all(|((_, class), found)| {
                    let want = if class == "fast" { "20Gi" } else { "4Gi" };
                    found.len() == 1 && found[0].1 == want
                });
                (objects.len() == pairs.len() && drivers).then_some(objects)
            },
        )
        .await;
        println!(
            "the driver's values published {:?} after volplane started",
            started.elapsed()
        );
        assert!(
            refreshed.values().all(|found| found[0].0 == "external-provisioner"),
            "still csi-provisioner's, the gate shut: {refreshed:?}"
        );
        assert_eq!(
            metric_value(admin, "volplane_capacity_incumbent_objects", &[]),
            pairs.len() as f64
        );
        assert_eq!(
            metric_value(admin, "volplane_capacity_incumbent_running", &[]),
            0.0,
            "its own value writes are not csi-provisioner's"
        );
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
        assert!(
            !lines.iter().any(|l| l.contains("csi-provisioner still maintains")),
            "{}",
            lines.join("\n")
        );
    }

    /// Objects whose managed-by starts with `prefix`, one per pair.
    async fn all_by_prefix(client: &kube::Client, prefix: &str, pairs: usize) -> Objects {
        eventually_some(
            Duration::from_secs(90),
            &format!("one object per pair, all {prefix}*"),
            || async {
                let objects = objects(client).await?;
                let one_each = objects.len() == pairs
                    && objects
                        .values()
                        .all(|found| found.len() == 1 && found[0].0.starts_with(prefix));
                one_each.then_some(objects)
            },
        )
        .await
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn from_csi_provisioner_per_node_every_node_takes_over_its_own_objects() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        create(
            &Api::<Namespace>::all(plane.client()),
            json!({"metadata": {"name": NAMESPACE}}),
        )
        .await;
        plane.create_hostpath_classes().await.expect("CSIDriver and classes");
        let nodes = ["node-00", "node-01", "node-02"];
        let (mut drivers, mut pairs) = (Vec::new(), BTreeSet::new());
        for node in nodes {
            plane.add_hostpath_node(node).await.expect("node");
            drivers.push(
                plane
                    .start_hostpath(node, &[("fast", "40Gi"), ("slow", "4Gi")])
                    .await
                    .expect("hostpathplugin"),
            );
            for class in ["fast", "slow"] {
                pairs.insert((node.to_string(), class.to_string()));
            }
        }
        let per_node = |node: &str, driver: &HostPath, name: &str, capacity: bool| {
            plane
                .start_csi_provisioner_as(
                    name,
                    driver,
                    plane.kubeconfig(),
                    &[("NAMESPACE", NAMESPACE), ("NODE_NAME", node)],
                    &[
                        "--node-deployment=true",
                        &format!("--enable-capacity={capacity}"),
                        "--capacity-ownerref-level=-1",
                        "--capacity-poll-interval=2s",
                    ],
                )
                .expect("csi-provisioner")
        };
        let first: Vec<_> = nodes
            .iter()
            .zip(&drivers)
            .map(|(node, driver)| per_node(node, driver, &format!("csi-provisioner-{node}"), true))
            .collect();
        let theirs = all_by_prefix(&client, "external-provisioner-node-", pairs.len()).await;
        let (stop, poller) = poll_pairs(client.clone(), pairs.clone());
        drop(first);
        let _second: Vec<_> = nodes
            .iter()
            .zip(&drivers)
            .map(|(node, driver)| per_node(node, driver, &format!("csi-provisioner-2-{node}"), false))
            .collect();
        let volplanes: Vec<Running> = nodes
            .iter()
            .zip(&drivers)
            .map(|(node, driver)| {
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
                        NAMESPACE,
                        "--capacity-poll-interval",
                        "2s",
                    ],
                )
            })
            .collect();
        let ours = all_by_prefix(&client, "volplane-node-", pairs.len()).await;
        stop.store(true, Ordering::Relaxed);
        let (samples, violations) = poller.await.expect("poller");
        assert!(samples >= 20, "{samples} samples");
        assert!(
            violations.is_empty(),
            "{} violations, first: {:?}",
            violations.len(),
            violations.first()
        );
        for ((pair, found), (_, before)) in ours.iter().zip(&theirs) {
            assert_eq!(found[0].0, format!("volplane-{}", pair.0), "each node took its own");
            assert_eq!(found[0].1, before[0].1, "{pair:?}: the driver's value");
        }
        for running in volplanes {
            let (code, lines) = running.terminate().await;
            assert_eq!(code, Some(0), "{}", lines.join("\n"));
        }
    }

    #[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_csi_provisioner_still_publishing_keeps_its_objects_and_volplane_says_why() {
        let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
        let client = plane.client();
        let (driver, pairs) = setup(&plane, 3).await;
        let _provisioner = csi_provisioner(&plane, &driver, "csi-provisioner", true);
        all_by(&client, "external-provisioner", pairs.len()).await;
        let mut running = volplane(&plane, &driver);
        let admin = running.admin_address().await;
        let said = running.wait_for("csi-provisioner still maintains").await;
        assert!(said.contains("--enable-capacity=false"), "{said}");
        assert_eq!(metric_value(admin, "volplane_capacity_incumbent_running", &[]), 1.0);
        // The one object volplane tried is given back: csi-provisioner's only.
        all_by(&client, "external-provisioner", pairs.len()).await;
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}
