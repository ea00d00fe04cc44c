//! Test doubles shared by volplane's test suites.
//!
//! - [`driver`]: a scriptable CSI driver, a real tonic server on a unix socket.

pub mod driver;
