use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};

use crate::address::CsiAddress;
use crate::csi::v1 as pb;
use crate::driver_info::{self, DriverInfo, PluginCapabilities};
use crate::error::{CsiError, CsiMethod, Result};
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;

/// A typed CSI client over a unix socket.
///
/// The connection is made lazily on the first call and re-made after it
/// breaks, so a driver restart costs failed calls, never the client. Every
/// call carries a deadline (the gRPC `grpc-timeout` header, enforced locally
/// too) and returns a [`CsiError`] that says whether to retry.
#[derive(Clone, Debug)]
pub struct CsiClient {
    address: CsiAddress,
    channel: Channel,
    timeout: Duration,
    observer: Option<Arc<dyn CallObserver>>,
}

/// Told of every call a [`CsiClient`] makes, as it ends: the method, the
/// gRPC code it ended with (`Code::Ok` for an answer, valid or not;
/// `DeadlineExceeded` when the deadline passed) and how long it took.
pub trait CallObserver: Send + Sync + std::fmt::Debug {
    /// One call ended.
    fn call_ended(&self, method: CsiMethod, code: tonic::Code, elapsed: Duration);
}

/// A call on its way: its observer hears how it ended, also when the
/// caller gives up on it (a lost term, a shutdown drops the future): then
/// as `Cancelled`, as a sidecar's context cancellation would count it.
struct InFlight<'a> {
    observer: Option<&'a Arc<dyn CallObserver>>,
    method: CsiMethod,
    started: Instant,
    ended: bool,
}

impl InFlight<'_> {
    fn end(&mut self, code: tonic::Code) {
        self.ended = true;
        if let Some(observer) = self.observer {
            observer.call_ended(self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.end(tonic::Code::Cancelled);
        }
    }
}

/// What to ask `GetCapacity` about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapacityQuery {
    /// StorageClass parameters, reserved `csi.storage.k8s.io/` keys already removed.
    pub parameters: BTreeMap<String, String>,
    /// The topology segment; `None` for drivers without topology support.
    pub topology: Option<BTreeMap<String, String>>,
}

/// A validated `GetCapacity` answer: no negative sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityReport {
    /// Bytes available for new volumes.
    pub available_capacity: i64,
    /// Largest volume that can be created, when the driver says.
    pub maximum_volume_size: Option<i64>,
    /// Smallest volume that can be created, when the driver says.
    pub minimum_volume_size: Option<i64>,
}

/// One page of `ListVolumes`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumePage {
    /// The volumes on this page.
    pub entries: Vec<pb::list_volumes_response::Entry>,
    /// Token for the next page; `None` on the last page.
    pub next_token: Option<String>,
}

impl CsiClient {
    /// Creates a client for `address`; nothing is dialled until the first call.
    pub fn new(address: CsiAddress, timeout: Duration) -> Self {
        let path = address.path().to_path_buf();
        // The URI is a placeholder: the connector below ignores it and dials the socket.
        let endpoint = Endpoint::from_static("http://csi.invalid");
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }));
        Self {
            address,
            channel,
            timeout,
            observer: None,
        }
    }

    /// The same client, telling `observer` of every call.
    pub fn observed_by(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    async fn unary<T, F>(&self, method: CsiMethod, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut in_flight = InFlight {
            observer: self.observer.as_ref(),
            method,
            started,
            ended: false,
        };
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(CsiError::DeadlineExceeded {
                method,
                timeout: self.timeout,
            }),
            // The driver's gRPC server enforces the `grpc-timeout` we send and
            // may answer Cancelled a moment before our own timer fires.
            Ok(Err(status))
                if status.code() == tonic::Code::DeadlineExceeded
                    || (status.code() == tonic::Code::Cancelled && started.elapsed() >= self.timeout) =>
            {
                Err(CsiError::DeadlineExceeded {
                    method,
                    timeout: self.timeout,
                })
            }
            Ok(Err(status)) => Err(CsiError::from_status(method, &status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        };
        debug!(%method, elapsed = ?started.elapsed(), ok = outcome.is_ok(), "CSI call");
        in_flight.end(
            outcome
                .as_ref()
                .err()
                .and_then(CsiError::code)
                .unwrap_or(tonic::Code::Ok),
        );
        outcome
    }

    /// `Probe`: `Ok(())` when ready, [`CsiError::NotReady`] when the driver says it is still starting.
    pub async fn probe(&self) -> Result<()> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let response = self
            .unary(CsiMethod::Probe, identity.probe(self.request(pb::ProbeRequest {})))
            .await?;
        // An unset `ready` means ready.
        match response.ready {
            Some(false) => Err(CsiError::NotReady),
            _ => Ok(()),
        }
    }

    /// Calls `Probe` until the driver is ready, backing off exponentially
    /// (100ms doubling to 5s) and logging every failed attempt. Gives up after
    /// `give_up_after`, or never when it is `None`.
    pub async fn probe_until_ready(&self, give_up_after: Option<Duration>) -> Result<()> {
        let started = Instant::now();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_factor(2.0)
            .without_max_times()
            .build();
        let mut attempt = 1u32;
        loop {
            let error = match self.probe().await {
                Ok(()) => {
                    info!(address = %self.address, attempt, "CSI driver is ready");
                    return Ok(());
                }
                Err(error) => error,
            };
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            if let Some(limit) = give_up_after {
                let waited = started.elapsed();
                if waited + delay > limit {
                    return Err(CsiError::NotReadyWithin {
                        address: self.address.to_string(),
                        waited: limit,
                        last_error: Box::new(error),
                    });
                }
            }
            warn!(address = %self.address, attempt, retry_in = ?delay, %error, "CSI driver not ready yet");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// `GetPluginInfo`: the driver name (validated non-empty) and vendor version.
    pub async fn plugin_info(&self) -> Result<pb::GetPluginInfoResponse> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let response = self
            .unary(
                CsiMethod::GetPluginInfo,
                identity.get_plugin_info(self.request(pb::GetPluginInfoRequest {})),
            )
            .await?;
        DriverInfo::check_name(&response)?;
        Ok(response)
    }

    /// `GetPluginCapabilities`.
    pub async fn plugin_capabilities(&self) -> Result<PluginCapabilities> {
        let mut identity = IdentityClient::new(self.channel.clone());
        let response = self
            .unary(
                CsiMethod::GetPluginCapabilities,
                identity.get_plugin_capabilities(self.request(pb::GetPluginCapabilitiesRequest {})),
            )
            .await?;
        Ok(PluginCapabilities::from_response(&response))
    }

    /// Reads name, version and all capabilities, once, at startup.
    ///
    /// Controller capabilities are asked for only when the plugin advertises
    /// the Controller service. The Node service is optional on a controller
    /// socket: `Unimplemented` there yields `node: None`.
    pub async fn driver_info(&self) -> Result<DriverInfo> {
        let info = self.plugin_info().await?;
        let plugin = self.plugin_capabilities().await?;
        let controller = if plugin.controller_service {
            let mut client = ControllerClient::new(self.channel.clone());
            let response = self
                .unary(
                    CsiMethod::ControllerGetCapabilities,
                    client.controller_get_capabilities(self.request(pb::ControllerGetCapabilitiesRequest {})),
                )
                .await?;
            driver_info::controller_capabilities(&response)
        } else {
            Default::default()
        };
        let mut node_client = NodeClient::new(self.channel.clone());
        let node = match self
            .unary(
                CsiMethod::NodeGetCapabilities,
                node_client.node_get_capabilities(self.request(pb::NodeGetCapabilitiesRequest {})),
            )
            .await
        {
            Ok(response) => Some(driver_info::node_capabilities(&response)),
            Err(error) if error.is_unimplemented() => None,
            Err(error) => return Err(error),
        };
        Ok(DriverInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            plugin,
            controller,
            node,
        })
    }

    /// `GetCapacity` for one (parameters, topology) pair.
    ///
    /// Negative sizes are rejected as [`CsiError::InvalidResponse`]: they
    /// must never be published.
    pub async fn get_capacity(&self, query: &CapacityQuery) -> Result<CapacityReport> {
        let mut client = ControllerClient::new(self.channel.clone());
        let request = pb::GetCapacityRequest {
            volume_capabilities: Vec::new(),
            parameters: query.parameters.clone(),
            accessible_topology: query.topology.as_ref().map(|segments| pb::Topology {
                segments: segments.clone(),
            }),
        };
        let response = self
            .unary(CsiMethod::GetCapacity, client.get_capacity(self.request(request)))
            .await?;
        validate_capacity(&response)
    }

    /// One page of `ListVolumes`; `max_entries` 0 lets the driver choose.
    pub async fn list_volumes(&self, max_entries: i32, starting_token: Option<&str>) -> Result<VolumePage> {
        let mut client = ControllerClient::new(self.channel.clone());
        let request = pb::ListVolumesRequest {
            max_entries,
            starting_token: starting_token.unwrap_or_default().to_string(),
        };
        let response = self
            .unary(CsiMethod::ListVolumes, client.list_volumes(self.request(request)))
            .await?;
        Ok(VolumePage {
            entries: response.entries,
            next_token: Some(response.next_token).filter(|t| !t.is_empty()),
        })
    }

    /// `ControllerGetVolume` for one volume.
    pub async fn controller_get_volume(&self, volume_id: &str) -> Result<pb::ControllerGetVolumeResponse> {
        let mut client = ControllerClient::new(self.channel.clone());
        let request = pb::ControllerGetVolumeRequest {
            volume_id: volume_id.to_string(),
        };
        self.unary(
            CsiMethod::ControllerGetVolume,
            client.controller_get_volume(self.request(request)),
        )
        .await
    }

    /// `NodeGetInfo`: node id and accessible topology of the node this socket serves.
    pub async fn node_get_info(&self) -> Result<pb::NodeGetInfoResponse> {
        let mut client = NodeClient::new(self.channel.clone());
        let response = self
            .unary(
                CsiMethod::NodeGetInfo,
                client.node_get_info(self.request(pb::NodeGetInfoRequest {})),
            )
            .await?;
        if response.node_id.is_empty() {
            return Err(CsiError::InvalidResponse {
                method: CsiMethod::NodeGetInfo,
                reason: "the node id is empty".into(),
            });
        }
        Ok(response)
    }

    /// `NodeGetVolumeStats` for a volume published at `volume_path`.
    pub async fn node_get_volume_stats(
        &self,
        volume_id: &str,
        volume_path: &str,
    ) -> Result<pb::NodeGetVolumeStatsResponse> {
        let mut client = NodeClient::new(self.channel.clone());
        let request = pb::NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_string(),
            volume_path: volume_path.to_string(),
            staging_target_path: String::new(),
        };
        self.unary(
            CsiMethod::NodeGetVolumeStats,
            client.node_get_volume_stats(self.request(request)),
        )
        .await
    }
}

fn validate_capacity(response: &pb::GetCapacityResponse) -> Result<CapacityReport> {
    let negative = |what: &str, value: i64| CsiError::InvalidResponse {
        method: CsiMethod::GetCapacity,
        reason: format!("{what} is negative ({value})"),
    };
    if response.available_capacity < 0 {
        return Err(negative("available_capacity", response.available_capacity));
    }
    let maximum_volume_size = response.maximum_volume_size;
    if let Some(v) = maximum_volume_size.filter(|v| *v < 0) {
        return Err(negative("maximum_volume_size", v));
    }
    let minimum_volume_size = response.minimum_volume_size;
    if let Some(v) = minimum_volume_size.filter(|v| *v < 0) {
        return Err(negative("minimum_volume_size", v));
    }
    Ok(CapacityReport {
        available_capacity: response.available_capacity,
        maximum_volume_size,
        minimum_volume_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_sizes_are_driver_errors() {
        let bad = [
            pb::GetCapacityResponse {
                available_capacity: -1,
                ..Default::default()
            },
            pb::GetCapacityResponse {
                available_capacity: 1,
                maximum_volume_size: Some(-5),
                minimum_volume_size: None,
            },
            pb::GetCapacityResponse {
                available_capacity: 1,
                maximum_volume_size: None,
                minimum_volume_size: Some(-5),
            },
        ];
        for response in bad {
            let err = validate_capacity(&response).expect_err("negative must be rejected");
            assert!(matches!(err, CsiError::InvalidResponse { .. }), "{err}");
        }
    }

    #[test]
    fn unset_maximum_stays_unset_and_zero_is_kept() {
        let report = validate_capacity(&pb::GetCapacityResponse {
            available_capacity: 0,
            maximum_volume_size: None,
            minimum_volume_size: Some(0),
        })
        .expect("valid");
        assert_eq!(
            report,
            CapacityReport {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: Some(0)
            }
        );
    }
}
