use std::fmt;
use std::time::Duration;

use tonic::Code;

/// Result of a CSI call.
pub type Result<T, E = CsiError> = std::result::Result<T, E>;

/// The CSI calls volplane makes; used in errors, logs and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CsiMethod {
    GetPluginInfo,
    GetPluginCapabilities,
    Probe,
    ControllerGetCapabilities,
    GetCapacity,
    ListVolumes,
    ControllerGetVolume,
    NodeGetInfo,
    NodeGetCapabilities,
    NodeGetVolumeStats,
}

impl CsiMethod {
    /// The RPC's name as the specification spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetPluginInfo => "GetPluginInfo",
            Self::GetPluginCapabilities => "GetPluginCapabilities",
            Self::Probe => "Probe",
            Self::ControllerGetCapabilities => "ControllerGetCapabilities",
            Self::GetCapacity => "GetCapacity",
            Self::ListVolumes => "ListVolumes",
            Self::ControllerGetVolume => "ControllerGetVolume",
            Self::NodeGetInfo => "NodeGetInfo",
            Self::NodeGetCapabilities => "NodeGetCapabilities",
            Self::NodeGetVolumeStats => "NodeGetVolumeStats",
        }
    }

    /// The full gRPC method, `/csi.v1.<Service>/<RPC>`, as kubernetes-csi
    /// sidecars label their `csi_sidecar_operations_seconds`.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Self::GetPluginInfo => "/csi.v1.Identity/GetPluginInfo",
            Self::GetPluginCapabilities => "/csi.v1.Identity/GetPluginCapabilities",
            Self::Probe => "/csi.v1.Identity/Probe",
            Self::ControllerGetCapabilities => "/csi.v1.Controller/ControllerGetCapabilities",
            Self::GetCapacity => "/csi.v1.Controller/GetCapacity",
            Self::ListVolumes => "/csi.v1.Controller/ListVolumes",
            Self::ControllerGetVolume => "/csi.v1.Controller/ControllerGetVolume",
            Self::NodeGetInfo => "/csi.v1.Node/NodeGetInfo",
            Self::NodeGetCapabilities => "/csi.v1.Node/NodeGetCapabilities",
            Self::NodeGetVolumeStats => "/csi.v1.Node/NodeGetVolumeStats",
        }
    }

    /// Every method the client calls.
    #[cfg(test)]
    const ALL: [Self; 10] = [
        Self::GetPluginInfo,
        Self::GetPluginCapabilities,
        Self::Probe,
        Self::ControllerGetCapabilities,
        Self::GetCapacity,
        Self::ListVolumes,
        Self::ControllerGetVolume,
        Self::NodeGetInfo,
        Self::NodeGetCapabilities,
        Self::NodeGetVolumeStats,
    ];
}

impl fmt::Display for CsiMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong talking to a CSI driver.
///
/// [`CsiError::is_retryable`] is the one place that decides whether calling
/// again can help.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CsiError {
    /// The `--csi-address` value is not a unix socket address.
    #[error("invalid CSI address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },

    /// The call did not finish within its deadline.
    #[error("{method} timed out after {}", humantime_secs(*timeout))]
    DeadlineExceeded { method: CsiMethod, timeout: Duration },

    /// The driver (or the transport) answered with a gRPC error.
    #[error("{method} failed with {code:?}: {message}")]
    Status {
        method: CsiMethod,
        code: Code,
        message: String,
    },

    /// The driver answered, but with something the specification forbids.
    #[error("{method} returned an invalid response: {reason}")]
    InvalidResponse { method: CsiMethod, reason: String },

    /// Probe answered `ready: false`.
    #[error("the driver reports it is not ready yet")]
    NotReady,

    /// The driver did not become ready before the startup deadline.
    #[error("CSI driver at {address} did not become ready within {}: {last_error}", humantime_secs(*waited))]
    NotReadyWithin {
        address: String,
        waited: Duration,
        last_error: Box<CsiError>,
    },
}

impl CsiError {
    pub(crate) fn from_status(method: CsiMethod, status: &tonic::Status) -> Self {
        // Transport failures carry the useful part (e.g. "No such file or
        // directory") in the source chain, not in the status message.
        let mut message = status.message().to_string();
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            source = cause.source();
        }
        Self::Status {
            method,
            code: status.code(),
            message,
        }
    }

    /// Whether calling again (after a backoff) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::DeadlineExceeded { .. } | Self::NotReady => true,
            Self::Status { code, .. } => code_is_retryable(*code),
            Self::NotReadyWithin { .. } | Self::InvalidAddress { .. } | Self::InvalidResponse { .. } => false,
        }
    }

    /// The gRPC code, where the failure has one (deadlines count as `DeadlineExceeded`).
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            Self::DeadlineExceeded { .. } => Some(Code::DeadlineExceeded),
            _ => None,
        }
    }

    /// True when the driver does not implement the call at all.
    pub fn is_unimplemented(&self) -> bool {
        self.code() == Some(Code::Unimplemented)
    }

    /// A short, stable label for metrics: the gRPC code name or the error kind.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidAddress { .. } => "invalid_address",
            Self::InvalidResponse { .. } => "invalid_response",
            Self::NotReady | Self::NotReadyWithin { .. } => "not_ready",
            Self::DeadlineExceeded { .. } => grpc_code_name(Code::DeadlineExceeded),
            Self::Status { code, .. } => grpc_code_name(*code),
        }
    }
}

/// Transient conditions are worth a retry; answers about the request itself are not.
fn code_is_retryable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// The gRPC status code's name as Go's `codes.Code.String()` spells it
/// (`OK`, `Canceled`, `Unavailable`, …): the `grpc_status_code` label
/// kubernetes-csi sidecars use, and volplane's `grpc_code`.
pub fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_name_the_service_and_the_rpc() {
        for method in CsiMethod::ALL {
            let service = match method {
                CsiMethod::GetPluginInfo | CsiMethod::GetPluginCapabilities | CsiMethod::Probe => "Identity",
                CsiMethod::NodeGetInfo | CsiMethod::NodeGetCapabilities | CsiMethod::NodeGetVolumeStats => "Node",
                _ => "Controller",
            };
            assert_eq!(method.grpc_path(), format!("/csi.v1.{service}/{}", method.as_str()));
        }
    }

    fn status(code: Code) -> CsiError {
        CsiError::Status {
            method: CsiMethod::GetCapacity,
            code,
            message: "x".into(),
        }
    }

    #[test]
    fn transient_codes_are_retryable_and_request_errors_are_not() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(status(code).is_retryable(), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::OutOfRange,
        ] {
            assert!(!status(code).is_retryable(), "{code:?}");
        }
    }

    #[test]
    fn deadline_is_retryable_and_labelled_like_the_grpc_code() {
        let err = CsiError::DeadlineExceeded {
            method: CsiMethod::Probe,
            timeout: Duration::from_millis(250),
        };
        assert!(err.is_retryable());
        assert_eq!(err.label(), "DeadlineExceeded");
        assert_eq!(err.to_string(), "Probe timed out after 250ms");
    }

    #[test]
    fn invalid_responses_are_permanent() {
        let err = CsiError::InvalidResponse {
            method: CsiMethod::GetCapacity,
            reason: "negative".into(),
        };
        assert!(!err.is_retryable());
        assert_eq!(err.label(), "invalid_response");
    }

    #[test]
    fn status_message_includes_the_transport_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let mut st = tonic::Status::unavailable("connect failed");
        st.set_source(std::sync::Arc::new(io));
        let err = CsiError::from_status(CsiMethod::Probe, &st);
        assert_eq!(
            err.to_string(),
            "Probe failed with Unavailable: connect failed: No such file or directory"
        );
    }
}
