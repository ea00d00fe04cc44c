//! The pods that mount claims, as an index fed by a pod watch (every pod
//! for the node watcher, this node's for the node side).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use volplane_runtime::{Index, ObjectKey};

use crate::model;

/// The pods that mount claims, trimmed to their node and volumes.
#[derive(Default)]
pub(crate) struct Pods(BTreeMap<ObjectKey, Pod>);

impl Pods {
    /// Every pod held.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Pod> {
        self.0.values()
    }
}

impl Index<Pod> for Pods {
    fn apply(&mut self, pod: Pod) {
        let Some(key) = ObjectKey::of(&pod) else { return };
        let pod = model::trim_pod(pod);
        let mounts_claims = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.volumes.as_ref())
            .is_some_and(|volumes| !volumes.is_empty());
        if mounts_claims {
            self.0.insert(key, pod);
        } else {
            self.0.remove(&key);
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.0.remove(key);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.0.keys().cloned().collect()
    }
}
