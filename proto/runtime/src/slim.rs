//! Slim copies of Kubernetes objects: only the fields a controller decides
//! on are deserialized, everything else in the JSON (managed fields,
//! annotations, status, other spec fields) is skipped by the parser without
//! being allocated. At 20,000 watched objects, or a 50,000-pod list, what
//! is never built is memory and CPU never spent.
//!
//! A slim type is a struct with `metadata: ObjectMeta` deserialized by
//! [`metadata`], and [`slim_resource!`](crate::slim_resource) makes it a
//! resource kube's `Api` and watcher accept, at the URL of the full type.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::{Deserialize, Deserializer};

/// The metadata fields controllers read; the rest is skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    labels: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
    finalizers: Option<Vec<String>>,
}

/// Deserializes `metadata` keeping name, namespace, UID, resource version,
/// creation and deletion time, labels, owner references and finalizers —
/// never managed fields or annotations.
pub fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let slim = SlimMeta::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: slim.name,
        namespace: slim.namespace,
        uid: slim.uid,
        resource_version: slim.resource_version,
        creation_timestamp: slim.creation_timestamp,
        deletion_timestamp: slim.deletion_timestamp,
        labels: slim.labels,
        owner_references: slim.owner_references,
        finalizers: slim.finalizers,
        ..ObjectMeta::default()
    })
}

#[doc(hidden)]
pub use k8s_openapi as __k8s_openapi;

/// Makes `$slim` (a struct with a `metadata: ObjectMeta` field) a
/// Kubernetes resource at the same API path as `$full`, so that kube's
/// `Api<$slim>` lists and watches `$full` objects into the slim type.
#[macro_export]
macro_rules! slim_resource {
    ($slim:ty, $full:ty) => {
        impl $crate::slim::__k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$full as $crate::slim::__k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as $crate::slim::__k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as $crate::slim::__k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as $crate::slim::__k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$full as $crate::slim::__k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as $crate::slim::__k8s_openapi::Resource>::Scope;
        }
        impl $crate::slim::__k8s_openapi::Metadata for $slim {
            type Ty = $crate::slim::__k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Clone, Debug, Default, Deserialize)]
    struct Thing {
        #[serde(deserialize_with = "metadata")]
        metadata: ObjectMeta,
    }

    #[test]
    fn managed_fields_and_annotations_are_skipped_the_rest_is_kept() {
        let thing: Thing = serde_json::from_value(json!({"metadata": {
            "name": "a", "namespace": "ns", "uid": "u-1", "resourceVersion": "7",
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "labels": {"k": "v"}, "annotations": {"big": "x".repeat(100_000)},
            "finalizers": ["f"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u-2", "controller": true}],
            "managedFields": [{"manager": "m", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        }}))
        .expect("thing");
        let meta = thing.metadata;
        assert_eq!(meta.name.as_deref(), Some("a"));
        assert_eq!(meta.namespace.as_deref(), Some("ns"));
        assert_eq!(meta.uid.as_deref(), Some("u-1"));
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert!(meta.creation_timestamp.is_some());
        assert_eq!(meta.labels.unwrap_or_default().get("k").map(String::as_str), Some("v"));
        assert_eq!(meta.finalizers, Some(vec!["f".to_string()]));
        assert_eq!(meta.owner_references.unwrap_or_default()[0].uid, "u-2");
        assert!(meta.annotations.is_none(), "annotations skipped");
        assert!(meta.managed_fields.is_none(), "managed fields skipped");
    }

    #[test]
    fn missing_metadata_fields_stay_unset() {
        let thing: Thing = serde_json::from_value(json!({"metadata": {}})).expect("thing");
        assert_eq!(thing.metadata, ObjectMeta::default());
    }
}
