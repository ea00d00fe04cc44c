//! Test doubles shared by volplane's test suites.
//!
//! - [`driver`]: a scriptable CSI driver, a real tonic server on a unix socket.
//! - [`apiserver`]: an in-process Kubernetes API-server double for `kube::Client`.
//! - [`events`]: events read back, one entry per occurrence.
//! - [`e2e`]: a throwaway real control plane, when `VOLPLANE_E2E_BIN_DIR` is set.
//! - [`node`]: a real node (containerd, kubelet, the hostpath driver) beside it.
//! - [`image`]: OCI image archives of local binaries, for that node.
//! - [`objects`]: bound PVs and pods using them, as test fixtures.
//! - [`process`]: child processes that die with their test.
//! - [`wait`]: waiting for conditions with deadlines.
//! - [`background`]: a controller running until the test stops it.

pub mod apiserver;
pub mod background;
pub mod driver;
pub mod e2e;
pub mod events;
pub mod image;
pub mod node;
pub mod objects;
pub mod process;
pub mod raw;
pub mod wait;
