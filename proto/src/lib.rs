//! The Container Storage Interface as volplane speaks it: the generated
//! `csi.v1` messages, clients and servers, a typed client over a unix socket
//! ([`CsiClient`]) and the driver facts read once at startup ([`DriverInfo`]).

mod address;
mod client;
mod driver_info;
mod error;

pub use address::CsiAddress;
pub use client::{CallObserver, CapacityQuery, CapacityReport, CsiClient, VolumePage};
pub use driver_info::{ControllerCapability, DriverInfo, NodeCapability, PluginCapabilities};
pub use error::{CsiError, CsiMethod, Result, grpc_code_name};

/// Code generated from `csi.proto` by `build.rs`.
pub mod csi {
    /// CSI specification version 1 (`package csi.v1`).
    #[allow(missing_debug_implementations, clippy::all, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
