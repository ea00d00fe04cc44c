//! A drain's view of the ephemeral Deployment on the real node: the Lease
//! holder's pod evicted through the Eviction API hands over to the other
//! replica, a second eviction while one replica is missing is refused by
//! the PodDisruptionBudget (429), and pods arriving meanwhile all get their
//! claims.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, EvictParams};
use volplane_tests::e2e::ControlPlane;
use volplane_tests::objects::create;
use volplane_tests::wait::eventually_some;

use super::{NAMESPACE, name, namespace_for_pods, ready_pods, support, unscheduled_pod, wait_for_claims};

const APP: &str = "volplane-ephemeral";

/// A client of the control plane that returns a 429 instead of retrying it.
async fn without_retries(plane: &ControlPlane) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// The pod holding the ephemeral controllers' Lease.
async fn leader(leases: &Api<Lease>) -> Option<String> {
    let holder = support::lease_holder(leases, APP).await?;
    // volplane's identity is `<pod name>_<random suffix>`.
    Some(
        holder
            .rsplit_once('_')
            .map_or(holder.as_str(), |(pod, _)| pod)
            .to_string(),
    )
}

pub async fn eviction_hands_over_and_a_second_is_refused(plane: &ControlPlane) {
    let client = plane.client();
    let replicas: Vec<String> = ready_pods(&client, APP, 2).await.iter().map(name).collect();
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NAMESPACE);
    eventually_some(Duration::from_secs(60), "the budget allows one disruption", || async {
        let status = budgets.get(APP).await.ok()?.status?;
        (status.disruptions_allowed == 1 && status.current_healthy == 2).then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder = eventually_some(Duration::from_secs(30), "a holder of the Lease", || leader(&leases)).await;
    let standby = replicas
        .iter()
        .find(|r| **r != holder)
        .cloned()
        .unwrap_or_else(|| panic!("the Lease is held by a replica: {holder} of {replicas:?}"));

    let namespace = "drained";
    namespace_for_pods(plane, namespace).await;
    // kube's client retries a 429 by itself: this one says it.
    let pods: Api<Pod> = Api::namespaced(without_retries(plane).await, NAMESPACE);
    pods.evict(&holder, &EvictParams::default())
        .await
        .expect("the holder's eviction is allowed");
    let evicted = Instant::now();
    let refused = pods.evict(&standby, &EvictParams::default()).await;
    match refused {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 429, "{status:?}"),
        other => {
            let budget = budgets.get(APP).await.map(|b| b.status);
            let pod = pods.get(&standby).await.map(|p| p.status.and_then(|s| s.conditions));
            panic!(
                "a second eviction with one replica missing is refused, got {other:?}; budget {budget:?}; {standby}: {pod:?}"
            )
        }
    }

    // Pods arrive while the Lease moves.
    let arrivals: Api<Pod> = Api::namespaced(client.clone(), namespace);
    const PODS: usize = 10;
    for i in 0..PODS {
        create(&arrivals, unscheduled_pod(&format!("during-{i}"))).await;
    }
    let successor = eventually_some(Duration::from_secs(60), "the standby holds the Lease", || async {
        leader(&leases).await.filter(|holder| *holder == standby)
    })
    .await;
    println!(
        "eviction: {successor} holds the Lease {:?} after the eviction",
        evicted.elapsed()
    );
    wait_for_claims(&client, namespace, PODS).await;
    // The Deployment replaces the evicted pod; the budget allows one again.
    ready_pods(&client, APP, 2).await;
    eventually_some(
        Duration::from_secs(60),
        "the budget allows one disruption again",
        || async {
            let status = budgets.get(APP).await.ok()?.status?;
            (status.disruptions_allowed == 1).then_some(())
        },
    )
    .await;
}
