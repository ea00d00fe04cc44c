//! A PersistentVolumeClaim as placements read it: which node the scheduler
//! placed it on (`volume.kubernetes.io/selected-node`), its class, its
//! request and whether it is bound. Pure.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::quantity::parse_bytes;

/// The annotation kube-scheduler sets on a claim it placed.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A PersistentVolumeClaim cut to what decides a placement: name,
/// namespace, the `selected-node` annotation (no other), class, requested
/// storage and bound volume.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClaimObject {
    /// Name, namespace and the `selected-node` annotation.
    #[serde(deserialize_with = "claim_metadata")]
    pub metadata: ObjectMeta,
    /// Class, request and volume.
    pub spec: Option<ClaimSpec>,
}

volplane_runtime::slim_resource!(ClaimObject, PersistentVolumeClaim);

/// The part of a claim's spec a placement reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSpec {
    /// `storageClassName`.
    pub storage_class_name: Option<String>,
    /// `volumeName`: set once the claim is bound.
    pub volume_name: Option<String>,
    /// `resources.requests`.
    pub resources: Option<ClaimResources>,
}

/// `spec.resources` of a claim.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClaimResources {
    /// `requests`.
    pub requests: Option<BTreeMap<String, Quantity>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    #[serde(default, deserialize_with = "selected_node_only")]
    annotations: Option<BTreeMap<String, String>>,
}

fn claim_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = ClaimMeta::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        annotations: meta.annotations,
        ..ObjectMeta::default()
    })
}

/// The annotations, of which only `selected-node` is kept (the others are
/// skipped without being allocated).
fn selected_node_only<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct SelectedNode;
    impl<'de> Visitor<'de> for SelectedNode {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == SELECTED_NODE {
                    kept = Some(BTreeMap::from([(key.into_owned(), map.next_value::<String>()?)]));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(kept)
        }
    }
    deserializer.deserialize_any(SelectedNode)
}

/// What a claim says of its placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// Placed on `node`, not bound yet: `bytes` of `class` are in flight.
    Placed {
        /// The selected node.
        node: String,
        /// The claim's class.
        class: String,
        /// Its requested storage.
        bytes: i64,
    },
    /// Bound to a volume.
    Bound,
    /// Not placed (no selected node, no class or no valid request).
    Unplaced,
}

/// What `claim` says of its placement.
pub fn claimed(claim: &ClaimObject) -> Claimed {
    let spec = claim.spec.as_ref();
    if spec
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        return Claimed::Bound;
    }
    let node = (claim.metadata.annotations.as_ref())
        .and_then(|a| a.get(SELECTED_NODE))
        .filter(|node| !node.is_empty());
    let class = spec
        .and_then(|s| s.storage_class_name.as_deref())
        .filter(|c| !c.is_empty());
    let bytes = (spec.and_then(|s| s.resources.as_ref()))
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_bytes(&q.0))
        .filter(|bytes| *bytes > 0);
    match (node, class, bytes) {
        (Some(node), Some(class), Some(bytes)) => Claimed::Placed {
            node: node.clone(),
            class: class.to_string(),
            bytes,
        },
        _ => Claimed::Unplaced,
    }
}
