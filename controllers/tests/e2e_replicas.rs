//! e2e: two volplane replicas with leader election on a real control plane;
//! the leader is killed with SIGKILL while pods keep coming. Ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::{Running, lease_holder};
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";
const LEASE: &str = "volplane-ephemeral";
const LEASE_DURATION: Duration = Duration::from_secs(4);
const RETRY_PERIOD: Duration = Duration::from_secs(1);
const PODS: usize = 150;

fn replica(plane: &ControlPlane, name: &str) -> Running {
    Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=ephemeral",
            "--namespace",
            NAMESPACE,
            "--pod-name",
            name,
            "--leader-election-lease-duration",
            "4s",
            "--leader-election-renew-deadline",
            "3s",
            "--leader-election-retry-period",
            "1s",
        ],
    )
}

/// Creates `PODS` pods with a generic ephemeral volume, eight at a time.
async fn create_pods(client: kube::Client) {
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let batches: Vec<Vec<usize>> = (0..PODS).collect::<Vec<_>>().chunks(8).map(<[usize]>::to_vec).collect();
    for batch in batches {
        let creates = batch.into_iter().map(|i| {
            let pods = pods.clone();
            async move {
                let pod = support::ephemeral_pod(&format!("load-{i}"));
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
            }
        });
        futures::future::join_all(creates).await;
    }
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_duration_and_no_claim_is_lost_or_doubled() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
    plane.add_node("node-1", &BTreeMap::new(), None).await.expect("node");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let mut replicas = BTreeMap::from([("replica-a", replica(&plane, "replica-a"))]);
    replicas
        .get_mut("replica-a")
        .expect("a")
        .wait_for("started leading")
        .await;
    replicas.insert("replica-b", replica(&plane, "replica-b"));
    replicas
        .get_mut("replica-b")
        .expect("b")
        .wait_for("ephemeral controller")
        .await;

    let load = tokio::spawn(create_pods(client.clone()));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    eventually_some(Duration::from_secs(60), "the first claims under load", || async {
        let count = claims.list(&ListParams::default()).await.ok()?.items.len();
        (count >= 20).then_some(())
    })
    .await;
    let leader = lease_holder(&leases, LEASE).await.expect("a holder");
    let (leader_name, standby_name) = if leader.starts_with("replica-a") {
        ("replica-a", "replica-b")
    } else {
        ("replica-b", "replica-a")
    };
    let killed = replicas.remove(leader_name).expect("leader");
    killed.signal("KILL");
    let killed_at = Instant::now();
    killed.reap();

    let new_holder = eventually_some(Duration::from_secs(30), "the standby takes the lease", || async {
        lease_holder(&leases, LEASE)
            .await
            .filter(|h| h.starts_with(standby_name))
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after SIGKILL: {takeover:?} ({new_holder})");
    assert!(
        takeover <= LEASE_DURATION + RETRY_PERIOD * 3,
        "takeover took {takeover:?}, lease duration {LEASE_DURATION:?}"
    );

    load.await.expect("pods created");
    let all = eventually_some(Duration::from_secs(60), "a claim for every pod", || async {
        let items = claims.list(&ListParams::default()).await.ok()?.items;
        (items.len() >= PODS).then_some(items)
    })
    .await;
    assert_eq!(all.len(), PODS, "one claim per pod, no more");
    let pods: BTreeMap<String, String> = Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.metadata.uid?)))
        .collect();
    for claim in &all {
        let name = claim.metadata.name.clone().unwrap_or_default();
        let pod = name.strip_suffix("-data").expect("<pod>-data");
        let owners = claim.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{name}");
        assert_eq!(Some(&owners[0].uid), pods.get(pod), "{name} is owned by its pod");
    }
    // volplane warned about nothing (a deposed leader's late create would be a conflict).
    let warnings: Vec<Option<String>> = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning") && e.reporting_controller.as_deref() == Some("volplane-ephemeral")
        })
        .map(|e| e.note)
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    for (_, running) in replicas {
        let (code, lines) = running.terminate().await;
        assert_eq!(code, Some(0), "{}", lines.join("\n"));
    }
}
