//! Test doubles shared by volplane's test suites.
//!
//! - [`driver`]: a scriptable CSI driver, a real tonic server on a unix socket.
//! - [`apiserver`]: an in-process Kubernetes API-server double for `kube::Client`.

pub mod apiserver;
pub mod driver;
