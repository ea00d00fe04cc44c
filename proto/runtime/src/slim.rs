//! Slim copies of Kubernetes objects: only the fields a controller decides
//! on are deserialized, everything else in the JSON (managed fields,
//! annotations other than volplane's own, status, other spec fields) is
//! skipped by the parser without being allocated. At 20,000 watched objects, or a 50,000-pod list, what
//! is never built is memory and CPU never spent.
//!
//! A slim type is a struct with `metadata: ObjectMeta` deserialized by
//! [`metadata`], and [`slim_resource!`](crate::slim_resource) makes it a
//! resource kube's `Api` and watcher accept, at the URL of the full type.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The prefix of the annotations a slim copy keeps: volplane's own.
pub const OWN_ANNOTATIONS: &str = "volplane.io/";

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
    annotations: Option<OwnAnnotations>,
    owner_references: Option<Vec<OwnerReference>>,
    finalizers: Option<Vec<String>>,
}

/// The annotations under [`OWN_ANNOTATIONS`]; the values of others are
/// skipped unread.
struct OwnAnnotations(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for OwnAnnotations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Own;
        impl<'de> Visitor<'de> for Own {
            type Value = OwnAnnotations;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut own = BTreeMap::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key.starts_with(OWN_ANNOTATIONS) {
                        own.insert(key.into_owned(), map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(OwnAnnotations(own))
            }
        }
        deserializer.deserialize_map(Own)
    }
}

/// Deserializes `metadata` keeping name, namespace, UID, resource version,
/// creation and deletion time, labels, volplane's own annotations
/// ([`OWN_ANNOTATIONS`]), owner references and finalizers — never managed
/// fields or anyone else's annotations.
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
        annotations: slim.annotations.map(|own| own.0).filter(|own| !own.is_empty()),
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
    fn managed_fields_and_others_annotations_are_skipped_the_rest_is_kept() {
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
        assert!(meta.annotations.is_none(), "others' annotations skipped");
        assert!(meta.managed_fields.is_none(), "managed fields skipped");
    }

    #[test]
    fn volplanes_own_annotations_are_kept() {
        let thing: Thing = serde_json::from_value(json!({"metadata": {"annotations": {
            "volplane.io/reserved": "10Gi", "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "volplane.io": "no slash", "Volplane.io/x": "case"
        }}}))
        .expect("thing");
        let kept = thing.metadata.annotations.expect("kept");
        assert_eq!(
            kept,
            BTreeMap::from([("volplane.io/reserved".to_string(), "10Gi".to_string())])
        );
    }

    #[test]
    fn annotations_that_are_not_strings_are_an_error() {
        let own = serde_json::from_value::<Thing>(json!({"metadata": {"annotations": {"volplane.io/a": 1}}}));
        assert!(own.is_err(), "volplane's own annotation of another type: {own:?}");
        let others = serde_json::from_value::<Thing>(json!({"metadata": {"annotations": {"b": 1}}}));
        assert!(others.is_ok(), "others' annotations are not read: {others:?}");
    }

    #[test]
    fn missing_metadata_fields_stay_unset() {
        let thing: Thing = serde_json::from_value(json!({"metadata": {}})).expect("thing");
        assert_eq!(thing.metadata, ObjectMeta::default());
    }
}
