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
    /// Short names in discovery, as the real API server lists them (`kubectl get pvc`).
    pub short_names: &'static [&'static str],
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

    const fn short(mut self, names: &'static [&'static str]) -> Self {
        self.short_names = names;
        self
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
        short_names: &[],
    }
}

/// Everything the double serves.
pub const KINDS: &[ResourceKind] = &[
    kind("", "v1", "namespaces", "Namespace", false, true).short(&["ns"]),
    kind("", "v1", "nodes", "Node", false, true).short(&["no"]),
    kind("", "v1", "pods", "Pod", true, true).short(&["po"]),
    kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true, true).short(&["pvc"]),
    kind("", "v1", "persistentvolumes", "PersistentVolume", false, true).short(&["pv"]),
    kind("", "v1", "events", "Event", true, false).short(&["ev"]),
    kind("", "v1", "serviceaccounts", "ServiceAccount", true, false).short(&["sa"]),
    kind("", "v1", "configmaps", "ConfigMap", true, false).short(&["cm"]),
    kind("events.k8s.io", "v1", "events", "Event", true, false).short(&["ev"]),
    kind("storage.k8s.io", "v1", "csinodes", "CSINode", false, false),
    kind("storage.k8s.io", "v1", "csidrivers", "CSIDriver", false, false),
    kind("storage.k8s.io", "v1", "storageclasses", "StorageClass", false, false).short(&["sc"]),
    kind(
        "storage.k8s.io",
        "v1",
        "csistoragecapacities",
        "CSIStorageCapacity",
        true,
        false,
    ),
    kind("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    kind("apps", "v1", "deployments", "Deployment", true, true).short(&["deploy"]),
    kind("apps", "v1", "replicasets", "ReplicaSet", true, true).short(&["rs"]),
    kind("apps", "v1", "statefulsets", "StatefulSet", true, true).short(&["sts"]),
    kind("apps", "v1", "daemonsets", "DaemonSet", true, true).short(&["ds"]),
];

/// Index into [`KINDS`] of the resource at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Index into [`KINDS`] of the `namespaces` resource.
pub const NAMESPACES: usize = 0;
