//! `csi_sidecar_operations_seconds`: every CSI call volplane makes, measured
//! as the kubernetes-csi sidecars measure theirs (same name, labels, label
//! values and buckets), so that dashboards and alerts built on the sidecars
//! keep working after a migration.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use volplane_csi::{CallObserver, CsiMethod, grpc_code_name};

/// The sidecars' buckets, in seconds.
const BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0,
];

/// The driver name of calls made before `GetPluginInfo` answered, as the
/// sidecars label them.
const UNKNOWN_DRIVER: &str = "unknown-driver";

/// Labels of one series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    driver_name: String,
    /// The full gRPC method, e.g. `/csi.v1.Controller/GetCapacity`.
    method_name: &'static str,
    /// Go's name of the gRPC code, e.g. `OK`, `Unavailable`.
    grpc_status_code: &'static str,
}

/// The histogram, and the driver name once it is known.
#[derive(Debug)]
pub struct CsiCallMetrics {
    driver: OnceLock<String>,
    seconds: Family<CallLabels, Histogram>,
}

impl CsiCallMetrics {
    /// Registers `csi_sidecar_operations_seconds` in the root registry (no
    /// `volplane_` prefix: the name is the sidecars').
    pub fn register(root: &mut Registry) -> Arc<Self> {
        let metrics = Arc::new(Self {
            driver: OnceLock::new(),
            seconds: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
        });
        root.sub_registry_with_prefix("csi_sidecar").register(
            "operations_seconds",
            "Container Storage Interface operation duration with gRPC error code status total",
            metrics.seconds.clone(),
        );
        metrics
    }

    /// Labels the calls from now on with the driver's name (the first name
    /// given stays: one process talks to one driver).
    pub fn set_driver(&self, name: &str) {
        let _ = self.driver.set(name.to_string());
    }
}

impl CallObserver for CsiCallMetrics {
    fn call_ended(&self, method: CsiMethod, code: tonic::Code, elapsed: Duration) {
        let labels = CallLabels {
            driver_name: self.driver.get().map_or(UNKNOWN_DRIVER, String::as_str).to_string(),
            method_name: method.grpc_path(),
            grpc_status_code: grpc_code_name(code),
        };
        self.seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn calls_are_labelled_as_the_sidecars_label_them() {
        let mut registry = Registry::default();
        let metrics = CsiCallMetrics::register(&mut registry);
        metrics.call_ended(CsiMethod::Probe, tonic::Code::Unavailable, Duration::from_millis(3));
        metrics.set_driver("hostpath.csi.k8s.io");
        metrics.call_ended(CsiMethod::GetCapacity, tonic::Code::Ok, Duration::from_millis(200));
        metrics.call_ended(CsiMethod::GetCapacity, tonic::Code::Cancelled, Duration::from_secs(1));
        let text = exposition(&registry);
        for line in [
            "# TYPE csi_sidecar_operations_seconds histogram",
            r#"csi_sidecar_operations_seconds_count{driver_name="unknown-driver",method_name="/csi.v1.Identity/Probe",grpc_status_code="Unavailable"} 1"#,
            r#"csi_sidecar_operations_seconds_bucket{le="0.1",driver_name="unknown-driver",method_name="/csi.v1.Identity/Probe",grpc_status_code="Unavailable"} 1"#,
            r#"csi_sidecar_operations_seconds_bucket{le="0.1",driver_name="hostpath.csi.k8s.io",method_name="/csi.v1.Controller/GetCapacity",grpc_status_code="OK"} 0"#,
            r#"csi_sidecar_operations_seconds_bucket{le="0.25",driver_name="hostpath.csi.k8s.io",method_name="/csi.v1.Controller/GetCapacity",grpc_status_code="OK"} 1"#,
            r#"csi_sidecar_operations_seconds_count{driver_name="hostpath.csi.k8s.io",method_name="/csi.v1.Controller/GetCapacity",grpc_status_code="Canceled"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn the_first_driver_name_stays() {
        let mut registry = Registry::default();
        let metrics = CsiCallMetrics::register(&mut registry);
        metrics.set_driver("a.example.com");
        metrics.set_driver("b.example.com");
        metrics.call_ended(CsiMethod::NodeGetVolumeStats, tonic::Code::Ok, Duration::ZERO);
        let text = exposition(&registry);
        assert!(
            text.contains(r#"driver_name="a.example.com",method_name="/csi.v1.Node/NodeGetVolumeStats""#),
            "{text}"
        );
        assert!(!text.contains("b.example.com"), "{text}");
    }
}
