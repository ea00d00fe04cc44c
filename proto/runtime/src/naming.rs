//! Names Kubernetes derives from other objects' names.

/// The PersistentVolumeClaim of a pod's generic ephemeral volume:
/// `<pod>-<volume>`, as kube-controller-manager and kubelet name it
/// (k8s.io/component-helpers/storage/ephemeral).
pub fn ephemeral_claim(pod: &str, volume: &str) -> String {
    format!("{pod}-{volume}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_dash_volume() {
        assert_eq!(super::ephemeral_claim("web-0", "scratch"), "web-0-scratch");
    }
}
