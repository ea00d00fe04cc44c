//! Kubernetes objects the test suites create again and again.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use serde_json::json;

/// A 1Gi PV of `driver` named `name`, with volume handle `h-<name>`,
/// bound to the claim `namespace/claim` (claim UID `uid-<claim>`), its
/// status `Bound` (the API-server double keeps status given at create).
pub fn bound_pv(name: &str, driver: &str, namespace: &str, claim: &str) -> PersistentVolume {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": driver, "volumeHandle": format!("h-{name}")},
                 "claimRef": {"namespace": namespace, "name": claim, "uid": format!("uid-{claim}")}},
        "status": {"phase": "Bound"}}))
    .expect("a valid PersistentVolume")
}

/// The claim `namespace/name` (UID `uid-<name>`) bound to the PV `volume`,
/// as [`bound_pv`] pairs with it: what a node reads to find a pod's volume.
pub fn bound_claim(name: &str, namespace: &str, volume: &str) -> PersistentVolumeClaim {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "volumeName": volume},
        "status": {"phase": "Bound"}}),
    )
    .expect("a valid PersistentVolumeClaim")
}

/// A pod `namespace/name` assigned to `node` that mounts each of `claims`
/// (volumes `v0`, `v1`, …), with no containers.
pub fn pod_using(name: &str, namespace: &str, node: &str, claims: &[&str]) -> Pod {
    let volumes: Vec<serde_json::Value> = claims
        .iter()
        .enumerate()
        .map(|(i, claim)| json!({"name": format!("v{i}"), "persistentVolumeClaim": {"claimName": claim}}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [], "volumes": volumes}}))
    .expect("a valid Pod")
}

/// Creates the object `value` (JSON in the API's shape) through `api`; fails the test if the API server refuses.
pub async fn create<K>(api: &kube::Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize,
{
    match try_create(api, value).await {
        Ok(object) => object,
        Err(error) => panic!("{error:#}"),
    }
}

/// Creates the object `value` (JSON in the API's shape) through `api`;
/// the error names the kind and the object.
pub async fn try_create<K>(api: &kube::Api<K>, value: serde_json::Value) -> anyhow::Result<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize,
{
    use anyhow::Context as _;
    let kind = K::kind(&());
    let object: K = serde_json::from_value(value).with_context(|| format!("not a valid {kind}"))?;
    let name = object.meta().name.clone().unwrap_or_default();
    api.create(&kube::api::PostParams::default(), &object)
        .await
        .with_context(|| format!("cannot create {kind} {name}"))
}

/// A CSIDriver `driver` with `storageCapacity: true` (kube-scheduler checks
/// its capacity) and a WaitForFirstConsumer StorageClass `class` of it.
pub async fn tracked_driver_with_class(client: &kube::Client, driver: &str, class: &str) {
    use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
    create(
        &kube::Api::<CSIDriver>::all(client.clone()),
        json!({"metadata": {"name": driver}, "spec": {"storageCapacity": true, "attachRequired": false}}),
    )
    .await;
    create(
        &kube::Api::<StorageClass>::all(client.clone()),
        json!({"metadata": {"name": class}, "provisioner": driver, "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
}

/// Flips `spec.storageCapacity` of the CSIDriver `driver`, the switch
/// kube-scheduler and volplane's capacity controller read.
pub async fn set_storage_capacity(client: &kube::Client, driver: &str, enabled: bool) {
    use k8s_openapi::api::storage::v1::CSIDriver;
    use kube::api::{Patch, PatchParams};
    kube::Api::<CSIDriver>::all(client.clone())
        .patch(
            driver,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"storageCapacity": enabled}})),
        )
        .await
        .expect("patch the CSIDriver");
}

/// The node kube-scheduler selected for the late-bound claim `name` (its
/// `volume.kubernetes.io/selected-node` annotation), waiting up to 90 s.
pub async fn selected_node(claims: &kube::Api<PersistentVolumeClaim>, name: &str) -> String {
    let what = format!("the scheduler selects a node for claim {name}");
    crate::wait::eventually_some(Duration::from_secs(90), &what, || async {
        claims
            .get(name)
            .await
            .ok()?
            .metadata
            .annotations?
            .get("volume.kubernetes.io/selected-node")
            .cloned()
    })
    .await
}

/// Removes node `name` as a cluster operator would: its CSINode, then its Node.
pub async fn remove_node(client: &kube::Client, name: &str) -> kube::Result<()> {
    let params = kube::api::DeleteParams::default();
    kube::Api::<k8s_openapi::api::storage::v1::CSINode>::all(client.clone())
        .delete(name, &params)
        .await?;
    kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(name, &params)
        .await?;
    Ok(())
}
