//! A scriptable CSI driver for tests: a real gRPC server on a unix socket.
//!
//! Tests choose the driver's name and capabilities up front
//! ([`DriverConfig`]) and script its behaviour while it runs: capacities per
//! (topology, parameters), volumes with conditions, per-method injected
//! errors and delays, readiness. Every request is recorded before it is
//! answered, so tests can assert on exactly what volplane asked.
//!
//! The server stops when the [`TestDriver`] is dropped or [`TestDriver::stop`]ped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};
use volplane_csi::csi::v1 as pb;
use volplane_csi::{ControllerCapability, CsiAddress, CsiClient, CsiMethod, NodeCapability};

/// Topology segments or parameters: key/value pairs.
pub type Labels = BTreeMap<String, String>;

/// Builds a [`Labels`] map from pairs.
pub fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// What the driver says about itself. Fixed for the driver's lifetime.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// `GetPluginInfo.name`.
    pub name: String,
    /// `GetPluginInfo.vendor_version`.
    pub vendor_version: String,
    /// Advertise CONTROLLER_SERVICE and serve the Controller RPCs.
    pub controller_service: bool,
    /// Advertise VOLUME_ACCESSIBILITY_CONSTRAINTS.
    pub topology: bool,
    /// `ControllerGetCapabilities`.
    pub controller_capabilities: Vec<ControllerCapability>,
    /// `NodeGetCapabilities`; `None`: the Node service answers Unimplemented.
    pub node_capabilities: Option<Vec<NodeCapability>>,
    /// `NodeGetInfo.node_id`.
    pub node_id: String,
    /// `NodeGetInfo.accessible_topology`; `None` leaves it unset.
    pub node_topology: Option<Labels>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            name: "test.csi.volplane.dev".into(),
            vendor_version: "1.0.0-test".into(),
            controller_service: true,
            topology: true,
            controller_capabilities: vec![ControllerCapability::GetCapacity],
            node_capabilities: Some(vec![]),
            node_id: "test-node".into(),
            node_topology: None,
        }
    }
}

/// A scripted `GetCapacity` answer; raw values, so tests can send invalid ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityAnswer {
    /// `available_capacity`.
    pub available: i64,
    /// `maximum_volume_size`.
    pub maximum: Option<i64>,
    /// `minimum_volume_size`.
    pub minimum: Option<i64>,
}

impl CapacityAnswer {
    /// An answer with only `available_capacity` set.
    pub fn available(bytes: i64) -> Self {
        Self {
            available: bytes,
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug)]
struct CapacityRule {
    topology: Option<Labels>,
    parameters: Option<Labels>,
    answer: CapacityAnswer,
}

/// A volume the driver knows, for ListVolumes / ControllerGetVolume / NodeGetVolumeStats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestVolume {
    /// `Volume.capacity_bytes`.
    pub capacity_bytes: i64,
    /// `(abnormal, message)`; `None` leaves `volume_condition` unset.
    pub condition: Option<(bool, String)>,
    /// `published_node_ids`.
    pub published_node_ids: Vec<String>,
    /// NodeGetVolumeStats usage in bytes: (available, total, used).
    pub bytes: Option<(i64, i64, i64)>,
    /// NodeGetVolumeStats usage in inodes: (available, total, used).
    pub inodes: Option<(i64, i64, i64)>,
}

impl TestVolume {
    /// A 1 GiB volume the driver reports healthy (no usage figures).
    pub fn healthy() -> Self {
        Self {
            capacity_bytes: 1 << 30,
            condition: Some((false, String::new())),
            ..Self::default()
        }
    }

    /// A 1 GiB volume the driver reports abnormal with `message`.
    pub fn abnormal(message: &str) -> Self {
        Self {
            condition: Some((true, message.to_string())),
            ..Self::healthy()
        }
    }
}

/// One request the driver received, with its payload where it has one.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    GetPluginInfo,
    GetPluginCapabilities,
    Probe,
    ControllerGetCapabilities,
    GetCapacity(pb::GetCapacityRequest),
    ListVolumes(pb::ListVolumesRequest),
    ControllerGetVolume(pb::ControllerGetVolumeRequest),
    NodeGetInfo,
    NodeGetCapabilities,
    NodeGetVolumeStats(pb::NodeGetVolumeStatsRequest),
}

impl Call {
    /// Which RPC this was.
    pub fn method(&self) -> CsiMethod {
        match self {
            Self::GetPluginInfo => CsiMethod::GetPluginInfo,
            Self::GetPluginCapabilities => CsiMethod::GetPluginCapabilities,
            Self::Probe => CsiMethod::Probe,
            Self::ControllerGetCapabilities => CsiMethod::ControllerGetCapabilities,
            Self::GetCapacity(_) => CsiMethod::GetCapacity,
            Self::ListVolumes(_) => CsiMethod::ListVolumes,
            Self::ControllerGetVolume(_) => CsiMethod::ControllerGetVolume,
            Self::NodeGetInfo => CsiMethod::NodeGetInfo,
            Self::NodeGetCapabilities => CsiMethod::NodeGetCapabilities,
            Self::NodeGetVolumeStats(_) => CsiMethod::NodeGetVolumeStats,
        }
    }
}

#[derive(Debug)]
struct DriverState {
    config: DriverConfig,
    ready: bool,
    default_capacity: CapacityAnswer,
    capacity_rules: Vec<CapacityRule>,
    volumes: BTreeMap<String, TestVolume>,
    failures: HashMap<CsiMethod, VecDeque<(Code, String)>>,
    delays: HashMap<CsiMethod, Duration>,
    calls: Vec<Call>,
    deadlines: Vec<Option<String>>,
    received: Vec<std::time::Instant>,
}

/// Handle to a running test driver; dropping it stops the server.
#[derive(Debug)]
pub struct TestDriver {
    socket: PathBuf,
    state: Arc<Mutex<DriverState>>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDriver {
    /// Starts a driver on a socket in a fresh temporary directory.
    pub async fn start(config: DriverConfig) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("csi.sock");
        let mut driver = Self::start_at(&socket, config).await?;
        driver._dir = Some(dir);
        Ok(driver)
    }

    /// Starts a driver on `socket` (e.g. a path a client is already dialling).
    pub async fn start_at(socket: &Path, config: DriverConfig) -> io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let state = Arc::new(Mutex::new(DriverState {
            config,
            ready: true,
            default_capacity: CapacityAnswer::default(),
            capacity_rules: Vec::new(),
            volumes: BTreeMap::new(),
            failures: HashMap::new(),
            delays: HashMap::new(),
            calls: Vec::new(),
            deadlines: Vec::new(),
            received: Vec::new(),
        }));
        let service = Service { state: state.clone() };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(pb::identity_server::IdentityServer::new(service.clone()))
            .add_service(pb::controller_server::ControllerServer::new(service.clone()))
            .add_service(pb::node_server::NodeServer::new(service));
        let server = tokio::spawn(async move {
            let incoming = UnixListenerStream::new(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            socket: socket.to_path_buf(),
            state,
            shutdown: Some(shutdown),
            server: Some(server),
            _dir: None,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The address as `--csi-address` takes it (`unix:///…`).
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A client for this driver with the given call deadline.
    pub fn client(&self, timeout: Duration) -> CsiClient {
        let address: CsiAddress = match self.address().parse() {
            Ok(address) => address,
            Err(error) => panic!(
                "test driver socket {} is not a valid address: {error}",
                self.socket.display()
            ),
        };
        CsiClient::new(address, timeout)
    }

    fn state(&self) -> MutexGuard<'_, DriverState> {
        lock(&self.state)
    }

    /// Probe answers `ready: <ready>` from now on.
    pub fn set_ready(&self, ready: bool) {
        self.state().ready = ready;
    }

    /// The answer for GetCapacity requests no rule matches (initially 0 bytes).
    pub fn set_default_capacity(&self, answer: CapacityAnswer) {
        self.state().default_capacity = answer;
    }

    /// Answers GetCapacity requests whose topology (when `Some`) and
    /// parameters (when `Some`) equal these. Later rules win over earlier ones.
    pub fn set_capacity(&self, topology: Option<Labels>, parameters: Option<Labels>, answer: CapacityAnswer) {
        self.state().capacity_rules.push(CapacityRule {
            topology,
            parameters,
            answer,
        });
    }

    /// Adds or replaces a volume.
    pub fn put_volume(&self, id: &str, volume: TestVolume) {
        self.state().volumes.insert(id.to_string(), volume);
    }

    /// Removes a volume; returns whether it existed.
    pub fn remove_volume(&self, id: &str) -> bool {
        self.state().volumes.remove(id).is_some()
    }

    /// The next `times` calls of `method` fail with `code` and `message`.
    pub fn fail_next(&self, method: CsiMethod, times: usize, code: Code, message: &str) {
        let mut state = self.state();
        let queue = state.failures.entry(method).or_default();
        queue.extend(std::iter::repeat_n((code, message.to_string()), times));
    }

    /// Every call of `method` waits `delay` before it is answered (zero clears it).
    pub fn set_delay(&self, method: CsiMethod, delay: Duration) {
        let mut state = self.state();
        if delay.is_zero() {
            state.delays.remove(&method);
        } else {
            state.delays.insert(method, delay);
        }
    }

    /// Every request received so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// How many requests of `method` were received.
    pub fn count(&self, method: CsiMethod) -> usize {
        self.state().calls.iter().filter(|c| c.method() == method).count()
    }

    /// The GetCapacity requests received so far.
    pub fn capacity_requests(&self) -> Vec<pb::GetCapacityRequest> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::GetCapacity(request) => Some(request.clone()),
                _ => None,
            })
            .collect()
    }

    /// The `grpc-timeout` header of every request so far, oldest first.
    pub fn deadlines(&self) -> Vec<Option<String>> {
        self.state().deadlines.clone()
    }

    /// The `volume_path` of every NodeGetVolumeStats request so far.
    pub fn volume_stats_paths(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::NodeGetVolumeStats(request) => Some(request.volume_path),
                _ => None,
            })
            .collect()
    }

    /// Every request so far with the time it arrived, oldest first.
    pub fn timed_calls(&self) -> Vec<(Call, std::time::Instant)> {
        let state = self.state();
        state
            .calls
            .iter()
            .cloned()
            .zip(state.received.iter().copied())
            .collect()
    }

    /// The GetCapacity requests so far with the time each arrived.
    pub fn timed_capacity_requests(&self) -> Vec<(std::time::Instant, pb::GetCapacityRequest)> {
        let state = self.state();
        state
            .calls
            .iter()
            .zip(&state.received)
            .filter_map(|(call, at)| match call {
                Call::GetCapacity(request) => Some((*at, request.clone())),
                _ => None,
            })
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_calls(&self) {
        let mut state = self.state();
        state.calls.clear();
        state.deadlines.clear();
        state.received.clear();
    }

    /// Stops the server and waits until it no longer accepts connections.
    pub async fn stop(mut self) {
        self.shutdown_now().await;
    }

    async fn shutdown_now(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn lock(state: &Mutex<DriverState>) -> MutexGuard<'_, DriverState> {
    // A test that panicked while holding the lock must not hide its own failure
    // behind a poisoned-lock panic in the server.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Debug)]
struct Service {
    state: Arc<Mutex<DriverState>>,
}

impl Service {
    /// Records the call, then applies the scripted delay and failure for its method.
    async fn enter(&self, metadata: &tonic::metadata::MetadataMap, call: Call) -> Result<(), Status> {
        let method = call.method();
        let deadline = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (delay, failure) = {
            let mut state = lock(&self.state);
            state.calls.push(call);
            state.deadlines.push(deadline);
            state.received.push(std::time::Instant::now());
            let delay = state.delays.get(&method).copied();
            let failure = state.failures.get_mut(&method).and_then(VecDeque::pop_front);
            (delay, failure)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match failure {
            Some((code, message)) => Err(Status::new(code, message)),
            None => Ok(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, DriverState> {
        lock(&self.state)
    }

    fn require_controller(&self) -> Result<(), Status> {
        if self.state().config.controller_service {
            Ok(())
        } else {
            Err(Status::unimplemented("this driver has no Controller service"))
        }
    }

    fn require_node(&self) -> Result<(), Status> {
        if self.state().config.node_capabilities.is_some() {
            Ok(())
        } else {
            Err(Status::unimplemented("this driver has no Node service"))
        }
    }
}

fn condition(volume: &TestVolume) -> Option<pb::VolumeCondition> {
    volume
        .condition
        .as_ref()
        .map(|(abnormal, message)| pb::VolumeCondition {
            abnormal: *abnormal,
            message: message.clone(),
        })
}

fn to_volume(id: &str, volume: &TestVolume) -> pb::Volume {
    pb::Volume {
        capacity_bytes: volume.capacity_bytes,
        volume_id: id.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Service {
    async fn get_plugin_info(
        &self,
        request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        self.enter(request.metadata(), Call::GetPluginInfo).await?;
        let state = self.state();
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: state.config.name.clone(),
            vendor_version: state.config.vendor_version.clone(),
            manifest: BTreeMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::service::Type;
        self.enter(request.metadata(), Call::GetPluginCapabilities).await?;
        let state = self.state();
        let service = |t: Type| pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::Service(pb::plugin_capability::Service {
                r#type: t as i32,
            })),
        };
        let mut capabilities = Vec::new();
        if state.config.controller_service {
            capabilities.push(service(Type::ControllerService));
        }
        if state.config.topology {
            capabilities.push(service(Type::VolumeAccessibilityConstraints));
        }
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        self.enter(request.metadata(), Call::Probe).await?;
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.state().ready),
        }))
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Service {
    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.enter(&metadata, Call::ListVolumes(request.clone())).await?;
        self.require_controller()?;
        if request.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let state = self.state();
        let start = request.starting_token.as_str();
        if !start.is_empty() && !state.volumes.contains_key(start) {
            return Err(Status::aborted(format!("starting_token {start:?} is not valid")));
        }
        let limit = match usize::try_from(request.max_entries) {
            Ok(0) | Err(_) => usize::MAX,
            Ok(n) => n,
        };
        let mut remaining = state
            .volumes
            .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded));
        let entries = remaining
            .by_ref()
            .take(limit)
            .map(|(id, volume)| pb::list_volumes_response::Entry {
                volume: Some(to_volume(id, volume)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: volume.published_node_ids.clone(),
                    volume_condition: condition(volume),
                }),
            })
            .collect();
        let next_token = remaining.next().map(|(id, _)| id.clone()).unwrap_or_default();
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.enter(&metadata, Call::GetCapacity(request.clone())).await?;
        self.require_controller()?;
        let state = self.state();
        let topology = request.accessible_topology.as_ref().map(|t| &t.segments);
        let answer = state
            .capacity_rules
            .iter()
            .rev()
            .find(|rule| {
                rule.topology.as_ref().is_none_or(|t| Some(t) == topology)
                    && rule.parameters.as_ref().is_none_or(|p| *p == request.parameters)
            })
            .map_or(state.default_capacity, |rule| rule.answer);
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: answer.available,
            maximum_volume_size: answer.maximum,
            minimum_volume_size: answer.minimum,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        self.enter(request.metadata(), Call::ControllerGetCapabilities).await?;
        self.require_controller()?;
        let state = self.state();
        let capabilities = state
            .config
            .controller_capabilities
            .iter()
            .map(|c| pb::ControllerServiceCapability {
                r#type: Some(pb::controller_service_capability::Type::Rpc(
                    pb::controller_service_capability::Rpc { r#type: *c as i32 },
                )),
            })
            .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.enter(&metadata, Call::ControllerGetVolume(request.clone()))
            .await?;
        self.require_controller()?;
        let state = self.state();
        let volume = state
            .volumes
            .get(&request.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {} does not exist", request.volume_id)))?;
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(to_volume(&request.volume_id, volume)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: volume.published_node_ids.clone(),
                volume_condition: condition(volume),
            }),
        }))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for Service {
    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let (metadata, _, request) = request.into_parts();
        self.enter(&metadata, Call::NodeGetVolumeStats(request.clone())).await?;
        self.require_node()?;
        let state = self.state();
        let volume = state
            .volumes
            .get(&request.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {} does not exist", request.volume_id)))?;
        let usage = |unit: Unit, (available, total, used): (i64, i64, i64)| pb::VolumeUsage {
            available,
            total,
            used,
            unit: unit as i32,
        };
        let usage = volume
            .bytes
            .map(|u| usage(Unit::Bytes, u))
            .into_iter()
            .chain(volume.inodes.map(|u| usage(Unit::Inodes, u)))
            .collect();
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: condition(volume),
        }))
    }

    async fn node_get_capabilities(
        &self,
        request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        self.enter(request.metadata(), Call::NodeGetCapabilities).await?;
        self.require_node()?;
        let state = self.state();
        let capabilities = state
            .config
            .node_capabilities
            .iter()
            .flatten()
            .map(|c| pb::NodeServiceCapability {
                r#type: Some(pb::node_service_capability::Type::Rpc(
                    pb::node_service_capability::Rpc { r#type: *c as i32 },
                )),
            })
            .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        self.enter(request.metadata(), Call::NodeGetInfo).await?;
        self.require_node()?;
        let state = self.state();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: state.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: state.config.node_topology.as_ref().map(|segments| pb::Topology {
                segments: segments.clone(),
            }),
        }))
    }
}
