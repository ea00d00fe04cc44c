//! A rolling update on the real node: the ephemeral Deployment's and the
//! capacity DaemonSet's pod templates change (an env var) and roll out
//! while pods with ephemeral volumes keep arriving and the node's capacity
//! is sampled. Every pod gets its claim, the node has exactly one object
//! per class at every sample, and no claim is created by a replica that
//! does not hold the Lease (judged by the API server's audit log).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, ListParams};
use volplane_tests::e2e::{AuditRecord, ControlPlane};
use volplane_tests::node::NODE_NAME;
use volplane_tests::objects::create;

use super::{NAMESPACE, namespace_for_pods, unscheduled_pod, wait_for_claims};

const EPHEMERAL_USER: &str = "system:serviceaccount:volplane:volplane-ephemeral";

/// The node's objects per class, counted.
async fn objects_per_class(client: &kube::Client) -> Option<BTreeMap<String, usize>> {
    let selector = format!("csi.storage.k8s.io/managed-by=volplane-{NODE_NAME}");
    let list = Api::<CSIStorageCapacity>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&selector))
        .await
        .ok()?;
    let mut counts = BTreeMap::new();
    for object in list.items {
        *counts.entry(object.storage_class_name).or_insert(0) += 1;
    }
    Some(counts)
}

/// Samples the node's objects every 100 ms until `stop`: the samples
/// taken, and those without exactly one object per class.
fn sample_objects(client: kube::Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut samples, mut violations) = (0, Vec::new());
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Some(counts) = objects_per_class(&client).await {
                samples += 1;
                let expected = BTreeMap::from([("fast".to_string(), 1), ("slow".to_string(), 1)]);
                if counts != expected {
                    violations.push(format!("{:?}: {counts:?}", started.elapsed()));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (samples, violations)
    })
}

/// Creates a pod with an ephemeral volume every 100 ms until `stop`; how many.
fn arrivals(pods: Api<Pod>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut created = 0;
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            interval.tick().await;
            create(&pods, unscheduled_pod(&format!("rolling-{created}"))).await;
            created += 1;
        }
        created
    })
}

/// Claims created by the ephemeral controller while its writer did not
/// hold the Lease: the holder is whoever last wrote the Lease (a replica
/// writes it only to take or renew it, and to give it up after its last
/// write), in the audit log's order.
pub fn claims_not_from_the_holder(log: &[AuditRecord]) -> (usize, Vec<String>) {
    let mut holder: Option<&str> = None;
    let (mut creates, mut violations) = (0, Vec::new());
    for record in log {
        let succeeded = record.code.is_some_and(|code| (200..300).contains(&code));
        if record.resource == "leases"
            && record.name.as_deref() == Some("volplane-ephemeral")
            && record.is_write()
            && succeeded
        {
            holder = Some(record.user_agent.as_str());
        }
        if record.resource == "persistentvolumeclaims" && record.verb == "create" && record.user == EPHEMERAL_USER {
            creates += 1;
            if holder != Some(record.user_agent.as_str()) {
                violations.push(format!(
                    "{:?} created by {} while {holder:?} held the Lease",
                    record.name, record.user_agent
                ));
            }
        }
    }
    (creates, violations)
}

fn kubectl(plane: &ControlPlane, args: &[&str]) {
    plane
        .kubectl_ok(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error:#}"));
}

pub async fn rolling_update_without_a_gap(plane: &ControlPlane) {
    let client = plane.client();
    let namespace = "rolling";
    namespace_for_pods(plane, namespace).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_objects(client.clone(), stop.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let arriving = arrivals(pods.clone(), stop.clone());

    let started = Instant::now();
    for workload in ["deployment/volplane-ephemeral", "daemonset/volplane-capacity-node"] {
        kubectl(plane, &["set", "env", "-n", NAMESPACE, workload, "VOLPLANE_ROLLOUT=2"]);
    }
    for workload in ["deployment/volplane-ephemeral", "daemonset/volplane-capacity-node"] {
        kubectl(
            plane,
            &["rollout", "status", "-n", NAMESPACE, workload, "--timeout=180s"],
        );
    }
    let rolled = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let created = arriving.await.expect("arrivals");
    let (samples, violations) = sampler.await.expect("sampler");
    println!("rolling update: {rolled:?}, {created} pods arrived, {samples} samples of the node's objects");
    assert!(samples >= 10, "{samples} samples");
    assert!(
        violations.is_empty(),
        "not exactly one object per class: {violations:?}"
    );

    wait_for_claims(&client, namespace, created).await;
    let log = plane.audit_log().expect("audit log");
    let (creates, violations) = claims_not_from_the_holder(&log);
    assert!(
        creates >= created,
        "{creates} claims created in the log, {created} pods in this step alone"
    );
    assert!(
        violations.is_empty(),
        "claims from a replica without the Lease: {violations:#?}"
    );
}
