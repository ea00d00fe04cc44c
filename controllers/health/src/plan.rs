//! What the driver's capabilities allow: which calls the controller side
//! reads conditions with, and what the node side can report. Pure.

use std::time::Duration;

use volplane_csi::{ControllerCapability, DriverInfo, NodeCapability};

use crate::Source;

/// The controller side's choice: the preferred source and, when the driver
/// advertises both calls, the other one to fall back to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerPlan {
    /// How conditions are read.
    pub source: Source,
    /// Used if `source` answers Unimplemented.
    pub fallback: Option<Source>,
}

/// Why the driver cannot serve a health side; the message says exactly what
/// is missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// The controller side lacks capabilities (each named).
    #[error("CSI driver {driver} does not advertise {}; controller-side volume health checks stay off", .missing.join(", nor "))]
    Controller {
        /// The driver's name.
        driver: String,
        /// What is missing, in words.
        missing: Vec<String>,
    },
    /// No Node service on the socket.
    #[error("CSI driver {driver} serves no Node service on this socket; node-side volume health stays off")]
    NoNodeService {
        /// The driver's name.
        driver: String,
    },
    /// The node service cannot report volume stats.
    #[error(
        "CSI driver {driver} does not advertise the GET_VOLUME_STATS node capability; node-side volume health stays off"
    )]
    NoVolumeStats {
        /// The driver's name.
        driver: String,
    },
}

impl Unsupported {
    /// A stable name of what is missing, for `volplane_controller_idle{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Controller { .. } => "NoVolumeConditions",
            Self::NoNodeService { .. } => "NoNodeService",
            Self::NoVolumeStats { .. } => "NoVolumeStats",
        }
    }
}

/// How often and how wide the controller side may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Time between ListVolumes sweeps.
    pub list_interval: Duration,
    /// `max_entries` per ListVolumes page (0: the driver chooses).
    pub page_size: i32,
    /// Time between ControllerGetVolume checks of one volume.
    pub get_interval: Duration,
    /// ControllerGetVolume calls in flight at most.
    pub workers: usize,
}

/// ListVolumes if the driver lists volumes (one call per page instead of
/// one per volume), else ControllerGetVolume; both need VOLUME_CONDITION.
/// The error says exactly what is missing.
pub fn controller_plan(driver: &DriverInfo, timing: Timing) -> Result<ControllerPlan, Unsupported> {
    let list = ControllerCapability::ListVolumes;
    let get = ControllerCapability::GetVolume;
    let condition = ControllerCapability::VolumeCondition;
    let mut missing = Vec::new();
    if !driver.plugin.controller_service {
        missing.push("the CONTROLLER_SERVICE plugin capability".to_string());
    }
    if !driver.has_controller(list) && !driver.has_controller(get) {
        missing.push(format!(
            "the {} or {} controller capability",
            list.as_str_name(),
            get.as_str_name()
        ));
    }
    if !driver.has_controller(condition) {
        missing.push(format!("the {} controller capability", condition.as_str_name()));
    }
    if !missing.is_empty() {
        return Err(Unsupported::Controller {
            driver: driver.name.clone(),
            missing,
        });
    }
    let listing = Source::ListVolumes {
        interval: timing.list_interval,
        page_size: timing.page_size,
    };
    let getting = Source::GetVolume {
        interval: timing.get_interval,
        workers: timing.workers,
    };
    Ok(match (driver.has_controller(list), driver.has_controller(get)) {
        (true, true) => ControllerPlan {
            source: listing,
            fallback: Some(getting),
        },
        (true, false) => ControllerPlan {
            source: listing,
            fallback: None,
        },
        _ => ControllerPlan {
            source: getting,
            fallback: None,
        },
    })
}

/// The node side needs GET_VOLUME_STATS; with VOLUME_CONDITION it also
/// reports conditions (`Ok(true)`), without only usage (`Ok(false)`).
pub fn node_conditions(driver: &DriverInfo) -> Result<bool, Unsupported> {
    let stats = NodeCapability::GetVolumeStats;
    if driver.node.is_none() {
        return Err(Unsupported::NoNodeService {
            driver: driver.name.clone(),
        });
    }
    if !driver.has_node(stats) {
        return Err(Unsupported::NoVolumeStats {
            driver: driver.name.clone(),
        });
    }
    Ok(driver.has_node(NodeCapability::VolumeCondition))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use volplane_csi::PluginCapabilities;

    use super::*;

    fn driver(controller: &[ControllerCapability], node: Option<&[NodeCapability]>) -> DriverInfo {
        DriverInfo {
            name: "d.example".into(),
            vendor_version: "1".into(),
            plugin: PluginCapabilities {
                controller_service: true,
                ..PluginCapabilities::default()
            },
            controller: controller.iter().copied().collect(),
            node: node.map(|n| n.iter().copied().collect::<BTreeSet<_>>()),
        }
    }

    const TIMING: Timing = Timing {
        list_interval: Duration::from_secs(300),
        page_size: 500,
        get_interval: Duration::from_secs(60),
        workers: 10,
    };

    #[test]
    fn list_volumes_is_preferred_and_get_volume_is_the_fallback() {
        use ControllerCapability::*;
        let both = controller_plan(&driver(&[ListVolumes, GetVolume, VolumeCondition], None), TIMING).expect("plan");
        assert_eq!(
            both.source,
            Source::ListVolumes {
                interval: Duration::from_secs(300),
                page_size: 500
            }
        );
        assert_eq!(
            both.fallback,
            Some(Source::GetVolume {
                interval: Duration::from_secs(60),
                workers: 10
            })
        );
        let list = controller_plan(&driver(&[ListVolumes, VolumeCondition], None), TIMING).expect("plan");
        assert!(matches!(list.source, Source::ListVolumes { .. }) && list.fallback.is_none());
        let get = controller_plan(&driver(&[GetVolume, VolumeCondition], None), TIMING).expect("plan");
        assert!(matches!(get.source, Source::GetVolume { .. }) && get.fallback.is_none());
    }

    #[test]
    fn what_is_missing_is_named() {
        use ControllerCapability::*;
        let no_condition = controller_plan(&driver(&[ListVolumes], None), TIMING)
            .expect_err("missing")
            .to_string();
        assert!(no_condition.contains("VOLUME_CONDITION"), "{no_condition}");
        assert!(!no_condition.contains("LIST_VOLUMES"), "{no_condition}");
        let no_call = controller_plan(&driver(&[VolumeCondition, GetCapacity], None), TIMING)
            .expect_err("missing")
            .to_string();
        assert!(
            no_call.contains("LIST_VOLUMES or GET_VOLUME") && !no_call.contains("the VOLUME_CONDITION"),
            "{no_call}"
        );
        let nothing = controller_plan(&driver(&[], None), TIMING)
            .expect_err("missing")
            .to_string();
        assert!(
            nothing.contains("LIST_VOLUMES or GET_VOLUME") && nothing.contains("VOLUME_CONDITION"),
            "{nothing}"
        );
        let mut node_only = driver(&[ListVolumes, VolumeCondition], None);
        node_only.plugin.controller_service = false;
        let err = controller_plan(&node_only, TIMING)
            .expect_err("no controller service")
            .to_string();
        assert!(err.contains("CONTROLLER_SERVICE"), "{err}");
    }

    #[test]
    fn the_node_side_needs_stats_and_reports_conditions_when_advertised() {
        use NodeCapability::*;
        assert_eq!(
            node_conditions(&driver(&[], Some(&[GetVolumeStats, VolumeCondition]))),
            Ok(true)
        );
        assert_eq!(node_conditions(&driver(&[], Some(&[GetVolumeStats]))), Ok(false));
        let err = node_conditions(&driver(&[], Some(&[VolumeCondition])))
            .expect_err("no stats")
            .to_string();
        assert!(err.contains("GET_VOLUME_STATS"), "{err}");
        let err = node_conditions(&driver(&[], None))
            .expect_err("no node service")
            .to_string();
        assert!(err.contains("no Node service"), "{err}");
    }
}
