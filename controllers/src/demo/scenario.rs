//! The demo's scenario: the simulated cluster, the story's pods and the
//! kubectl commands it shows. Pure: no I/O, so it is tested as text.

use std::path::Path;

/// The simulated CSI driver (one instance per node, one for the controller side).
pub const DRIVER: &str = "demo.volplane.dev";
/// The topology key each node's driver reports in `NodeGetInfo`.
pub const TOPOLOGY_KEY: &str = "demo.volplane.dev/node";
/// Namespace of volplane's own objects (CSIStorageCapacity, Leases), as in `deploy/`.
pub const VOLPLANE_NAMESPACE: &str = "volplane";
/// Namespace of the story's pods.
pub const APP_NAMESPACE: &str = "default";

/// A StorageClass of the driver: its name and the `type` parameter sent to GetCapacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// The StorageClass name.
    pub name: &'static str,
    /// Its `type` parameter.
    pub media: &'static str,
}

/// The driver's two classes.
pub const CLASSES: [Class; 2] = [
    Class {
        name: "fast",
        media: "ssd",
    },
    Class {
        name: "bulk",
        media: "hdd",
    },
];

/// A node and the free space its driver reports, in GiB, per class of [`CLASSES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSpace {
    /// The node name (also its topology value).
    pub name: &'static str,
    /// Free GiB per class, in the order of [`CLASSES`].
    pub free_gib: [i64; 2],
}

/// Three nodes with different capacities.
pub const NODES: [NodeSpace; 3] = [
    NodeSpace {
        name: "node-a",
        free_gib: [100, 2048],
    },
    NodeSpace {
        name: "node-b",
        free_gib: [20, 1024],
    },
    NodeSpace {
        name: "node-c",
        free_gib: [5, 512],
    },
];

/// A pod of the story with one generic ephemeral volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EphemeralPod {
    /// The pod name.
    pub name: &'static str,
    /// The pod volume's name.
    pub volume: &'static str,
    /// The StorageClass of its claim template.
    pub class: &'static str,
    /// The size it asks for, in GiB.
    pub gib: i64,
}

impl EphemeralPod {
    /// The PVC the ephemeral controller creates: `<pod>-<volume>`.
    pub fn claim(&self) -> String {
        volplane_runtime::naming::ephemeral_claim(self.name, self.volume)
    }

    /// The pod as the API takes it.
    pub fn manifest(&self) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": self.name, "namespace": APP_NAMESPACE},
            "spec": {
                "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
                "volumes": [{"name": self.volume, "ephemeral": {"volumeClaimTemplate": {"spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": self.class,
                    "resources": {"requests": {"storage": format!("{}Gi", self.gib)}}}}}}]
            }
        })
    }
}

/// Act 2 and 3: its 50Gi of `fast` fit only on node-a.
pub const WEB: EphemeralPod = EphemeralPod {
    name: "web",
    volume: "scratch",
    class: "fast",
    gib: 50,
};

/// Act 4: its 10Gi of `fast` fit on node-a and node-b.
pub const DB: EphemeralPod = EphemeralPod {
    name: "db",
    volume: "data",
    class: "fast",
    gib: 10,
};

/// What the controller-side driver says of the db volume in act 4.
pub const ABNORMAL_MESSAGE: &str = "read errors on 3 sectors of the backing disk";

/// A kubectl command the narration shows, with what it prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubectlView {
    /// What the output is, in words.
    pub shows: &'static str,
    /// The command, without the kubeconfig.
    pub command: &'static str,
}

/// volplane's CSIStorageCapacity objects.
pub const CAPACITY: KubectlView = KubectlView {
    shows: "class, topology, capacity and owner of each CSIStorageCapacity",
    command: r#"kubectl get csistoragecapacities -n volplane -o go-template='{{range .items}}{{.storageClassName}}{{"\t"}}{{range $k, $v := .nodeTopology.matchLabels}}{{$k}}={{$v}}{{end}}{{"\t"}}{{.capacity}}{{"\t"}}{{range .metadata.ownerReferences}}{{.kind}}/{{.name}}{{end}}{{"\n"}}{{end}}'"#,
};

/// The story's claims.
pub const CLAIMS: KubectlView = KubectlView {
    shows: "each PVC in default: name, size, owner, bound PV",
    command: r#"kubectl get pvc -n default -o go-template='{{range .items}}{{.metadata.name}}{{"\t"}}{{.spec.resources.requests.storage}}{{"\t"}}{{range .metadata.ownerReferences}}{{.kind}}/{{.name}}{{end}}{{"\t"}}{{with .spec.volumeName}}{{.}}{{end}}{{"\n"}}{{end}}'"#,
};

/// The health controller's events.
pub const HEALTH_EVENTS: KubectlView = KubectlView {
    shows: "claim, reason and note of each event of the health controller",
    command: r#"kubectl get events.events.k8s.io -A -o go-template='{{range .items}}{{$e := .}}{{with .reportingController}}{{if eq . "volplane-health"}}{{$e.regarding.namespace}}/{{$e.regarding.name}}{{"\t"}}{{$e.reason}}{{"\t"}}{{$e.note}}{{"\n"}}{{end}}{{end}}{{end}}'"#,
};

/// The PVs volplane holds abnormal.
pub const ABNORMAL_VOLUMES: KubectlView = KubectlView {
    shows: "each PV volplane holds abnormal, with the driver's message (empty once it recovered)",
    command: r#"kubectl get pv -o go-template='{{range .items}}{{$pv := .metadata.name}}{{with .metadata.annotations}}{{with index . "health.volplane.dev/abnormal"}}{{$pv}}{{"\t"}}{{.}}{{"\n"}}{{end}}{{end}}{{end}}'"#,
};

/// Who leads each controller group.
pub const LEASES: KubectlView = KubectlView {
    shows: "each Lease, its holder and last renewal",
    command: r#"kubectl get leases -n volplane -o go-template='{{range .items}}{{.metadata.name}}{{"\t"}}{{.spec.holderIdentity}}{{"\t"}}{{.spec.renewTime}}{{"\n"}}{{end}}'"#,
};

/// The same through the kubectl plugin, once installed.
pub const PLUGIN_CAPACITY: KubectlView = KubectlView {
    shows: "the same as `kubectl volplane` shows it (plugin installed)",
    command: "kubectl volplane capacity",
};

/// Every command the narration shows, in its order (README's Demo section lists them).
pub const VIEWS: [KubectlView; 6] = [
    CAPACITY,
    PLUGIN_CAPACITY,
    CLAIMS,
    HEALTH_EVENTS,
    ABNORMAL_VOLUMES,
    LEASES,
];

/// `text` as one shell word: as is when it holds only safe characters,
/// else single-quoted.
pub fn shell_word(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+' | ',' | ':' | '@' | '='));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The command line the user runs: the demo's kubeconfig in front, so it
/// never reaches another cluster.
pub fn command_line(kubeconfig: &Path, view: &KubectlView) -> String {
    format!(
        "KUBECONFIG={} {}",
        shell_word(&kubeconfig.to_string_lossy()),
        view.command
    )
}

/// GiB in bytes.
pub fn gib(n: i64) -> i64 {
    n << 30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_carry_the_demo_kubeconfig_as_one_shell_word() {
        let plain = command_line(Path::new("/tmp/volplane-demo/kubeconfig"), &PLUGIN_CAPACITY);
        assert_eq!(
            plain,
            "KUBECONFIG=/tmp/volplane-demo/kubeconfig kubectl volplane capacity"
        );
        let spaced = command_line(Path::new("/tmp/my demo/it's/kubeconfig"), &PLUGIN_CAPACITY);
        assert_eq!(
            spaced,
            r"KUBECONFIG='/tmp/my demo/it'\''s/kubeconfig' kubectl volplane capacity"
        );
    }

    #[test]
    fn every_view_is_a_kubectl_command_in_the_demo_namespaces() {
        for view in VIEWS {
            assert!(view.command.starts_with("kubectl "), "{view:?}");
            assert!(!view.command.contains("--kubeconfig"), "{view:?}");
        }
        for view in [CAPACITY, LEASES] {
            assert!(view.command.contains(&format!("-n {VOLPLANE_NAMESPACE} ")), "{view:?}");
        }
        assert!(CLAIMS.command.contains(&format!("-n {APP_NAMESPACE} ")));
    }

    #[test]
    fn readme_lists_every_command_the_narration_shows() {
        let readme = include_str!("../../../README.md");
        let demo = readme
            .split("\n## Demo\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README has a Demo section");
        let default = Path::new("/tmp/volplane-demo/kubeconfig");
        for view in VIEWS {
            let line = command_line(default, &view);
            assert!(demo.lines().any(|l| l == line), "README's Demo section lacks {line}");
        }
        // The health commands are README's own, shared with the health section.
        for view in [HEALTH_EVENTS, ABNORMAL_VOLUMES, LEASES] {
            assert!(readme.lines().any(|l| l == view.command), "{}", view.command);
        }
        assert!(
            HEALTH_EVENTS
                .command
                .contains(&format!("eq . {:?}", volplane_health::model::REPORTING_CONTROLLER))
        );
    }

    #[test]
    fn the_pods_ask_for_what_the_nodes_can_and_cannot_hold() {
        let fast: Vec<i64> = NODES.iter().map(|n| n.free_gib[0]).collect();
        assert_eq!(CLASSES[0].name, WEB.class);
        // web fits one node, db two: the story shows capacity deciding.
        assert_eq!(fast.iter().filter(|free| **free >= WEB.gib).count(), 1);
        assert_eq!(fast.iter().filter(|free| **free >= DB.gib).count(), 2);
        assert_eq!(WEB.claim(), "web-scratch");
        assert_eq!(DB.claim(), "db-data");
        let manifest = DB.manifest();
        let template = &manifest["spec"]["volumes"][0]["ephemeral"]["volumeClaimTemplate"]["spec"];
        assert_eq!(template["resources"]["requests"]["storage"], "10Gi");
        assert_eq!(template["storageClassName"], "fast");
    }
}
