//! Which object owns the CSIStorageCapacity objects (`--capacity-owner`).

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::Api;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// How the owner is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerMode {
    /// The top-most controller of this pod (Deployment, StatefulSet, DaemonSet).
    Auto,
    /// This pod.
    Pod,
    /// This node (per-node mode): removed nodes take their objects with them.
    Node,
    /// No owner.
    None,
}

fn controller_ref(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

fn reference(api_version: &str, kind: &str, meta: &ObjectMeta) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// The owner reference to put on every object; `None` for [`OwnerMode::None`].
pub async fn resolve(
    client: &kube::Client,
    mode: OwnerMode,
    namespace: &str,
    pod_name: Option<&str>,
    node_name: Option<&str>,
) -> Result<Option<OwnerReference>> {
    let startup = |what: String| move |source| Error::Startup { what, source };
    match mode {
        OwnerMode::None => Ok(None),
        OwnerMode::Node => {
            let node = node_name
                .ok_or_else(|| Error::Config("--capacity-owner node needs NODE_NAME (per-node mode)".into()))?;
            let node = Api::<Node>::all(client.clone())
                .get(node)
                .await
                .map_err(startup(format!("cannot read node {node} for the owner reference")))?;
            Ok(reference("v1", "Node", &node.metadata))
        }
        OwnerMode::Pod | OwnerMode::Auto => {
            let Some(pod_name) = pod_name else {
                if mode == OwnerMode::Auto {
                    warn!("POD_NAME is not set: CSIStorageCapacity objects get no owner and outlive volplane");
                    return Ok(None);
                }
                return Err(Error::Config("--capacity-owner pod needs POD_NAME".into()));
            };
            let pod = Api::<Pod>::namespaced(client.clone(), namespace)
                .get(pod_name)
                .await
                .map_err(startup(format!(
                    "cannot read pod {namespace}/{pod_name} for the owner reference"
                )))?;
            if mode == OwnerMode::Pod {
                return Ok(reference("v1", "Pod", &pod.metadata));
            }
            let owner = top_controller(client, namespace, &pod.metadata).await?;
            info!(kind = %owner.as_ref().map_or("none", |o| o.kind.as_str()),
                  name = %owner.as_ref().map_or("", |o| o.name.as_str()), "owner of CSIStorageCapacity objects");
            Ok(owner)
        }
    }
}

/// Walks controller references up from a pod: ReplicaSet → Deployment,
/// StatefulSet, DaemonSet. A pod without a controller owns its objects itself.
async fn top_controller(client: &kube::Client, namespace: &str, pod: &ObjectMeta) -> Result<Option<OwnerReference>> {
    let read = |kind: &str, name: &str| {
        let what = format!("cannot read {kind} {namespace}/{name} for the owner reference");
        move |source| Error::Startup { what, source }
    };
    let Some(parent) = controller_ref(pod) else {
        return Ok(reference("v1", "Pod", pod));
    };
    match parent.kind.as_str() {
        "ReplicaSet" => {
            let rs = Api::<ReplicaSet>::namespaced(client.clone(), namespace)
                .get(&parent.name)
                .await
                .map_err(read("ReplicaSet", &parent.name))?;
            match controller_ref(&rs.metadata) {
                Some(grand) if grand.kind == "Deployment" => {
                    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
                        .get(&grand.name)
                        .await
                        .map_err(read("Deployment", &grand.name))?;
                    Ok(reference("apps/v1", "Deployment", &deployment.metadata))
                }
                _ => Ok(reference("apps/v1", "ReplicaSet", &rs.metadata)),
            }
        }
        "StatefulSet" => {
            let sts = Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .get(&parent.name)
                .await
                .map_err(read("StatefulSet", &parent.name))?;
            Ok(reference("apps/v1", "StatefulSet", &sts.metadata))
        }
        "DaemonSet" => {
            let ds = Api::<DaemonSet>::namespaced(client.clone(), namespace)
                .get(&parent.name)
                .await
                .map_err(read("DaemonSet", &parent.name))?;
            Ok(reference("apps/v1", "DaemonSet", &ds.metadata))
        }
        // An unknown controller kind: reference it as it is.
        _ => Ok(Some(OwnerReference {
            block_owner_deletion: None,
            ..parent.clone()
        })),
    }
}

/// Where Warning events about the objects go: the owner, in `namespace` unless cluster-scoped.
pub fn event_target(owner: &OwnerReference, namespace: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        uid: Some(owner.uid.clone()),
        namespace: (owner.kind != "Node").then(|| namespace.to_string()),
        ..ObjectReference::default()
    }
}
