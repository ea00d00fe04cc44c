//! The resource kinds the double serves.

/// One served resource: group/version/plural plus how it behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group; empty for core/v1.
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural, as in URLs.
    pub plural: &'static str,
    /// Kind, as in objects.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether a `/status` subresource exists (then `status` is only written through it).
    pub status: bool,
}

impl ResourceKind {
    /// `apiVersion` as objects carry it: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> ResourceKind {
    ResourceKind {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
    }
}

/// Everything the double serves.
pub const KINDS: &[ResourceKind] = &[
    kind("", "v1", "namespaces", "Namespace", false, true),
    kind("", "v1", "nodes", "Node", false, true),
    kind("", "v1", "pods", "Pod", true, true),
    kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true, true),
    kind("", "v1", "persistentvolumes", "PersistentVolume", false, true),
    kind("", "v1", "events", "Event", true, false),
    kind("", "v1", "serviceaccounts", "ServiceAccount", true, false),
    kind("", "v1", "configmaps", "ConfigMap", true, false),
    kind("events.k8s.io", "v1", "events", "Event", true, false),
    kind("storage.k8s.io", "v1", "csinodes", "CSINode", false, false),
    kind("storage.k8s.io", "v1", "csidrivers", "CSIDriver", false, false),
    kind("storage.k8s.io", "v1", "storageclasses", "StorageClass", false, false),
    kind(
        "storage.k8s.io",
        "v1",
        "csistoragecapacities",
        "CSIStorageCapacity",
        true,
        false,
    ),
    kind("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    kind("apps", "v1", "deployments", "Deployment", true, true),
    kind("apps", "v1", "replicasets", "ReplicaSet", true, true),
    kind("apps", "v1", "statefulsets", "StatefulSet", true, true),
    kind("apps", "v1", "daemonsets", "DaemonSet", true, true),
];

/// Index into [`KINDS`] of the resource at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Index into [`KINDS`] of the `namespaces` resource.
pub const NAMESPACES: usize = 0;
