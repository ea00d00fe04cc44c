use std::collections::BTreeSet;

use crate::csi::v1 as pb;
use crate::error::{CsiError, CsiMethod, Result};

/// A controller RPC capability (`ControllerServiceCapability.RPC.Type`).
pub use pb::controller_service_capability::rpc::Type as ControllerCapability;
/// A node RPC capability (`NodeServiceCapability.RPC.Type`).
pub use pb::node_service_capability::rpc::Type as NodeCapability;

/// The plugin-wide capabilities from `GetPluginCapabilities`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginCapabilities {
    /// The plugin serves the Controller service.
    pub controller_service: bool,
    /// Volumes are not equally accessible from every node: topology matters.
    pub volume_accessibility_constraints: bool,
}

impl PluginCapabilities {
    /// Reads the capabilities from a response, ignoring values this build does not know.
    pub fn from_response(response: &pb::GetPluginCapabilitiesResponse) -> Self {
        use pb::plugin_capability::service::Type;
        let mut caps = Self::default();
        for capability in &response.capabilities {
            if let Some(pb::plugin_capability::Type::Service(service)) = &capability.r#type {
                match Type::try_from(service.r#type) {
                    Ok(Type::ControllerService) => caps.controller_service = true,
                    Ok(Type::VolumeAccessibilityConstraints) => caps.volume_accessibility_constraints = true,
                    _ => {}
                }
            }
        }
        caps
    }
}

/// Reads the controller capabilities from a response, ignoring unknown values.
pub fn controller_capabilities(response: &pb::ControllerGetCapabilitiesResponse) -> BTreeSet<ControllerCapability> {
    response
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::controller_service_capability::Type::Rpc(rpc)) => ControllerCapability::try_from(rpc.r#type).ok(),
            None => None,
        })
        .filter(|c| *c != ControllerCapability::Unknown)
        .collect()
}

/// Reads the node capabilities from a response, ignoring unknown values.
pub fn node_capabilities(response: &pb::NodeGetCapabilitiesResponse) -> BTreeSet<NodeCapability> {
    response
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::node_service_capability::Type::Rpc(rpc)) => NodeCapability::try_from(rpc.r#type).ok(),
            None => None,
        })
        .filter(|c| *c != NodeCapability::Unknown)
        .collect()
}

/// What a driver told us about itself at startup; read once, never refreshed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// `GetPluginInfo.name`: the name StorageClasses and PVs refer to.
    pub name: String,
    /// `GetPluginInfo.vendor_version`, opaque.
    pub vendor_version: String,
    /// Plugin-wide capabilities.
    pub plugin: PluginCapabilities,
    /// Controller capabilities; empty when the plugin has no Controller service.
    pub controller: BTreeSet<ControllerCapability>,
    /// Node capabilities; `None` when this endpoint does not serve the Node service.
    pub node: Option<BTreeSet<NodeCapability>>,
}

impl DriverInfo {
    /// Validates `GetPluginInfo`'s answer. The specification requires the
    /// name, at most 63 characters, alphanumeric at both ends with `-` and
    /// `.` between; Kubernetes uses it as a CSIDriver name and label value.
    pub(crate) fn check_name(response: &pb::GetPluginInfoResponse) -> Result<()> {
        let name = response.name.as_str();
        let invalid = |why: &str| CsiError::InvalidResponse {
            method: CsiMethod::GetPluginInfo,
            reason: format!("the driver name {:?} {why}", volplane_runtime::text::cut(name, 100)),
        };
        if name.is_empty() {
            return Err(invalid("is empty"));
        }
        if name.len() > 63 {
            return Err(invalid("is longer than 63 characters"));
        }
        let inner_ok = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        let ends_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
        if !inner_ok || !ends_ok {
            return Err(invalid(
                "must consist of alphanumerics, '-' and '.', and begin and end alphanumeric",
            ));
        }
        Ok(())
    }

    /// Whether topology segments must be sent to (and read from) the driver.
    pub fn supports_topology(&self) -> bool {
        self.plugin.volume_accessibility_constraints
    }

    /// Whether the controller advertises a capability.
    pub fn has_controller(&self, capability: ControllerCapability) -> bool {
        self.controller.contains(&capability)
    }

    /// Whether the node service advertises a capability.
    pub fn has_node(&self, capability: NodeCapability) -> bool {
        self.node.as_ref().is_some_and(|caps| caps.contains(&capability))
    }

    /// Capability names for logs, e.g. `["GET_CAPACITY", "LIST_VOLUMES"]`.
    pub fn controller_names(&self) -> Vec<&'static str> {
        self.controller.iter().map(|c| c.as_str_name()).collect()
    }

    /// Node capability names for logs; empty when there is no Node service.
    pub fn node_names(&self) -> Vec<&'static str> {
        self.node
            .iter()
            .flat_map(|caps| caps.iter().map(|c| c.as_str_name()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin_cap(t: pb::plugin_capability::service::Type) -> pb::PluginCapability {
        pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::Service(pb::plugin_capability::Service {
                r#type: t as i32,
            })),
        }
    }

    #[test]
    fn plugin_capabilities_are_read_and_unknown_values_ignored() {
        use pb::plugin_capability::service::Type;
        let response = pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                plugin_cap(Type::VolumeAccessibilityConstraints),
                pb::PluginCapability {
                    r#type: Some(pb::plugin_capability::Type::Service(pb::plugin_capability::Service {
                        r#type: 999,
                    })),
                },
                pb::PluginCapability { r#type: None },
            ],
        };
        let caps = PluginCapabilities::from_response(&response);
        assert!(caps.volume_accessibility_constraints);
        assert!(!caps.controller_service);
    }

    #[test]
    fn controller_capabilities_skip_unknown_and_unset_values() {
        let rpc = |t: i32| pb::ControllerServiceCapability {
            r#type: Some(pb::controller_service_capability::Type::Rpc(
                pb::controller_service_capability::Rpc { r#type: t },
            )),
        };
        let response = pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(ControllerCapability::GetCapacity as i32),
                rpc(ControllerCapability::VolumeCondition as i32),
                rpc(0),
                rpc(4242),
            ],
        };
        let caps = controller_capabilities(&response);
        assert_eq!(
            caps.into_iter().collect::<Vec<_>>(),
            vec![ControllerCapability::GetCapacity, ControllerCapability::VolumeCondition]
        );
    }

    #[test]
    fn driver_names_follow_the_specification() {
        let check = |name: &str| {
            DriverInfo::check_name(&pb::GetPluginInfoResponse {
                name: name.into(),
                ..Default::default()
            })
        };
        assert!(check("hostpath.csi.k8s.io").is_ok());
        assert!(check(&"a".repeat(63)).is_ok());
        for bad in [
            "-driver",
            "driver.",
            "dri ver",
            "drïver",
            "ü",
            "🦀🦀🦀",
            &"a".repeat(64),
            &"é".repeat(5000),
        ] {
            let error = check(bad).expect_err(bad);
            // Quoted, cut on a character boundary: the message stays readable.
            assert!(error.to_string().len() < 400, "{error}");
        }
    }

    #[test]
    fn empty_driver_name_is_an_invalid_response() {
        let err = DriverInfo::check_name(&pb::GetPluginInfoResponse::default()).expect_err("must fail");
        assert!(matches!(
            err,
            CsiError::InvalidResponse {
                method: CsiMethod::GetPluginInfo,
                ..
            }
        ));
    }
}
