//! Command-line flags. Every flag can also be set through the environment
//! variable named in its help text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use volplane_csi::CsiAddress;
use volplane_leader::ElectionConfig;

/// A controller volplane can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Controller {
    /// Publish CSIStorageCapacity objects (needs --csi-address).
    Capacity,
    /// Create the PVCs of generic ephemeral volumes.
    Ephemeral,
    /// Report CSI volume conditions as events (needs --csi-address); with
    /// --node-deployment, the node side (NodeGetVolumeStats).
    Health,
    /// List, per node, the claims the scheduler placed there and that are
    /// not bound yet, for per-node capacity instances (one central instance).
    Placements,
}

impl Controller {
    /// Whether the controller talks to a CSI driver.
    pub fn needs_csi(self) -> bool {
        match self {
            Self::Capacity | Self::Health => true,
            Self::Ephemeral | Self::Placements => false,
        }
    }
}

/// The controllers this process runs, from [`Args::plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The CSI driver and the controllers that use it, if any runs.
    pub csi: Option<CsiPlan>,
    /// Whether the ephemeral controller runs.
    pub ephemeral: bool,
    /// Whether the placements controller runs.
    pub placements: bool,
}

/// The controllers that talk to the CSI driver at `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsiPlan {
    /// `--csi-address`.
    pub address: CsiAddress,
    /// Whether the capacity controller runs.
    pub capacity: bool,
    /// Whether the health controller runs.
    pub health: bool,
}

impl Plan {
    /// The controllers, for the startup log line.
    pub fn controllers(&self) -> Vec<Controller> {
        let csi = self.csi.as_ref();
        [
            (Controller::Capacity, csi.is_some_and(|c| c.capacity)),
            (Controller::Health, csi.is_some_and(|c| c.health)),
            (Controller::Ephemeral, self.ephemeral),
            (Controller::Placements, self.placements),
        ]
        .into_iter()
        .filter_map(|(controller, runs)| runs.then_some(controller))
        .collect()
    }
}

/// Who owns the CSIStorageCapacity objects (`--capacity-owner`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CapacityOwner {
    /// The top-most controller of POD_NAME (Deployment, StatefulSet,
    /// DaemonSet): uninstalling removes every object. Per node, the
    /// placements controller deletes the objects of a node that is gone.
    #[default]
    Auto,
    /// The pod named by POD_NAME.
    Pod,
    /// The node named by NODE_NAME (per-node mode): the objects outlive an
    /// uninstall.
    Node,
    /// No owner reference.
    None,
}

/// What turns capacity tracking on (`--capacity-enablement`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CapacityEnablement {
    /// Publish while the driver's CSIDriver has `spec.storageCapacity: true`
    /// (the switch kube-scheduler reads); otherwise publish nothing and
    /// delete volplane's own objects.
    #[default]
    Csidriver,
    /// Publish regardless of the CSIDriver (external-provisioner's behaviour).
    Always,
}

/// `--capacity-adopt`: whose CSIStorageCapacity objects volplane takes over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CapacityAdopt {
    /// csi-provisioner's (`managed-by: external-provisioner`, per node
    /// `external-provisioner-<node>`), once it has stopped maintaining them.
    #[default]
    ExternalProvisioner,
    /// Nobody's: they are left as they are.
    None,
}

/// `--ephemeral-release`: which finished pods give their claims back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EphemeralRelease {
    /// Pods that failed without ever starting a container (the kubelet
    /// rejected them at admission).
    #[default]
    Rejected,
    /// Every pod in a terminal phase (Succeeded, Failed).
    Terminated,
    /// None, as kube-controller-manager: claims stay until the pod object goes.
    Never,
}

impl From<EphemeralRelease> for volplane_ephemeral::ReleaseMode {
    fn from(release: EphemeralRelease) -> Self {
        match release {
            EphemeralRelease::Rejected => Self::Rejected,
            EphemeralRelease::Terminated => Self::Terminated,
            EphemeralRelease::Never => Self::Never,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// A subcommand of `volplane`.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Run volplane on an embedded control plane: an in-process API server,
    /// simulated CSI drivers on three nodes, volplane's controllers as in
    /// production, and a narrated story. Never touches a real cluster;
    /// needs a build with the `demo` cargo feature.
    Demo(DemoArgs),
    /// Print a shell completion script for volplane, e.g.
    /// `source <(volplane completion bash)`.
    Completion(CompletionArgs),
}

/// `volplane completion`.
#[derive(Clone, Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `volplane demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Play the story once, stop everything and exit 0, instead of running
    /// until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Directory for the kubeconfig, the drivers' sockets and volplane's
    /// logs [default: <temp dir>/volplane-demo].
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
}

/// volplane: CSI storage capacity, generic ephemeral volumes and volume
/// health for Kubernetes.
#[derive(Clone, Debug, Parser)]
#[command(name = "volplane", version, about, long_about = None)]
pub struct Args {
    /// Without a subcommand, volplane runs its controllers.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Path to a kubeconfig file. Without it, the in-cluster service account
    /// is used, then ~/.kube/config.
    #[arg(long, env = "KUBECONFIG", value_name = "PATH", value_parser = parse_optional_path)]
    pub kubeconfig: Option<OptionalPath>,

    /// The CSI driver's unix socket: /path, unix:///path or unix:/path.
    #[arg(long, env = "CSI_ADDRESS", value_name = "ADDRESS")]
    pub csi_address: Option<CsiAddress>,

    /// Deadline of every CSI call.
    #[arg(long, env = "CSI_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub csi_timeout: Duration,

    /// How long to wait at startup for the CSI driver to answer Probe with
    /// "ready" (its socket may appear late); 0 waits forever.
    #[arg(long, env = "CSI_STARTUP_TIMEOUT", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub csi_startup_timeout: Duration,

    /// Comma-separated controllers to run. Default: capacity when
    /// --csi-address is set, ephemeral otherwise.
    #[arg(long, env = "VOLPLANE_CONTROLLERS", value_name = "LIST", value_delimiter = ',')]
    pub controllers: Vec<Controller>,

    /// Namespace for the objects volplane owns (CSIStorageCapacity, Leases).
    /// Default: the namespace of the kubeconfig context or service account.
    #[arg(long, env = "NAMESPACE", value_name = "NAMESPACE", value_parser = parse_optional_name)]
    pub namespace: Option<OptionalName>,

    /// Address of the admin HTTP server (/metrics, /livez, /readyz), e.g.
    /// ":8080" or "127.0.0.1:8080". Empty disables it.
    #[arg(long, env = "HTTP_ENDPOINT", value_name = "ADDRESS", default_value = "", value_parser = parse_http_endpoint)]
    pub http_endpoint: HttpEndpoint,

    /// Run per node (DaemonSet): publish capacity for this node's topology
    /// segment only, from NodeGetInfo. Needs --node-name.
    #[arg(long, env = "NODE_DEPLOYMENT")]
    pub node_deployment: bool,

    /// This node's name (downward API `spec.nodeName`), for --node-deployment.
    #[arg(long, env = "NODE_NAME", value_name = "NAME", value_parser = parse_optional_name)]
    pub node_name: Option<OptionalName>,

    /// This pod's name (downward API `metadata.name`), for owner references and events.
    #[arg(long, env = "POD_NAME", value_name = "NAME", value_parser = parse_optional_name)]
    pub pod_name: Option<OptionalName>,

    /// What turns capacity tracking on: the driver's CSIDriver
    /// `spec.storageCapacity`, followed live, or always.
    #[arg(long, env = "CAPACITY_ENABLEMENT", value_enum, default_value_t = CapacityEnablement::Csidriver)]
    pub capacity_enablement: CapacityEnablement,

    /// Owner of the CSIStorageCapacity objects.
    #[arg(long, env = "CAPACITY_OWNER", value_enum, default_value_t = CapacityOwner::Auto)]
    pub capacity_owner: CapacityOwner,

    /// How often each (segment, storage class) is refreshed; polls are spread over the interval.
    /// Default 1m, and 5s with --node-deployment: a per-node instance asks its local driver
    /// often instead of watching every PersistentVolume in the cluster.
    #[arg(long, env = "CAPACITY_POLL_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub capacity_poll_interval: Option<Duration>,

    /// Concurrent GetCapacity refreshes.
    #[arg(long, env = "CAPACITY_WORKERS", value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub capacity_workers: u16,

    /// Also publish capacity for StorageClasses with Immediate binding.
    #[arg(long, env = "CAPACITY_FOR_IMMEDIATE_BINDING")]
    pub capacity_for_immediate_binding: bool,

    /// Take over csi-provisioner's CSIStorageCapacity objects for the
    /// driver in place, once it has stopped maintaining them.
    #[arg(long, env = "CAPACITY_ADOPT", value_enum, default_value_t = CapacityAdopt::ExternalProvisioner)]
    pub capacity_adopt: CapacityAdopt,

    /// Average client-side limit of requests per second to the API server
    /// (watches count once, when opened); 0 disables the limit. Unset: no
    /// client-side limit when the API server does API Priority and Fairness
    /// (it answers with X-Kubernetes-PF-* headers), else 200.
    #[arg(long, env = "KUBE_API_QPS", value_name = "QPS")]
    pub kube_api_qps: Option<f64>,

    /// Requests that may go out at once above the average rate. Unset: 2 × QPS.
    #[arg(long, env = "KUBE_API_BURST", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_api_burst: Option<u32>,

    /// Pods the ephemeral controller reconciles at once.
    #[arg(long, env = "EPHEMERAL_WORKERS", value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ephemeral_workers: u16,

    /// Which finished pods give their ephemeral volumes' claims back while
    /// the pod object stays: the claim is deleted and, once its volume is
    /// provably not in use, PVC protection is lifted.
    #[arg(long, env = "EPHEMERAL_RELEASE", value_enum, default_value_t = EphemeralRelease::Rejected)]
    pub ephemeral_release: EphemeralRelease,

    /// How long after it first sees a new pod volplane creates its claims.
    /// For a migration only: while kube-controller-manager's own
    /// ephemeral-volume-controller still runs, it creates them first, and
    /// neither side warns about the other's claim.
    #[arg(long, env = "EPHEMERAL_CREATE_DELAY", value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub ephemeral_create_delay: Duration,

    /// How long after its last container finished an admitted pod's claims
    /// wait before release, for the kubelet to unmount the volumes.
    #[arg(long, env = "EPHEMERAL_RELEASE_DELAY", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub ephemeral_release_delay: Duration,

    /// Time between ListVolumes sweeps of the health controller.
    #[arg(long, env = "HEALTH_LIST_INTERVAL", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub health_list_interval: Duration,

    /// Entries per ListVolumes page (`max_entries`); 0 lets the driver choose.
    #[arg(long, env = "HEALTH_LIST_PAGE_SIZE", value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(i32).range(0..))]
    pub health_list_page_size: i32,

    /// Time between checks of one volume with ControllerGetVolume, and
    /// between NodeGetVolumeStats rounds on the node side.
    #[arg(long, env = "HEALTH_MONITOR_INTERVAL", value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    pub health_monitor_interval: Duration,

    /// ControllerGetVolume (or NodeGetVolumeStats) calls in flight at most.
    #[arg(long, env = "HEALTH_WORKERS", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub health_workers: u16,

    /// Also watch nodes: report NodeFailed on the PVCs of this driver used
    /// by pods on a node that has not been Ready for the threshold.
    #[arg(long, env = "HEALTH_NODE_WATCHER")]
    pub health_node_watcher: bool,

    /// How long a node must be NotReady or Unknown (from its Ready
    /// condition's lastTransitionTime) before NodeFailed.
    #[arg(long, env = "HEALTH_NODE_FAILURE_THRESHOLD", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub health_node_failure_threshold: Duration,

    /// The kubelet's root directory, for the volume paths the node side
    /// passes to NodeGetVolumeStats.
    #[arg(long, env = "KUBELET_DIR", value_name = "PATH", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Elect one writer per controller group among replicas, on
    /// coordination.k8s.io Leases (capacity and health: one per driver;
    /// ephemeral: one per cluster). Per-node instances never elect. `--leader-election=false`
    /// turns it off: then run one replica only.
    #[arg(long, env = "LEADER_ELECTION", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_election: bool,

    /// Namespace of the Leases. Default: --namespace.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE", value_name = "NAMESPACE", value_parser = parse_optional_name)]
    pub leader_election_namespace: Option<OptionalName>,

    /// How long others wait after the holder's last renewal before taking
    /// the lease (whole seconds).
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_election_lease_duration: Duration,

    /// The holder stops writing when its last successful renewal is this
    /// old; must be shorter than the lease duration.
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// Time between renewals, and between attempts to take the lease
    /// (whole seconds).
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Log format; the level comes from RUST_LOG (default: info for volplane,
    /// warn for libraries).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// A path flag whose environment variable may be set but empty (= unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalPath(pub Option<PathBuf>);

/// A name flag whose environment variable may be set but empty (= unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalName(pub Option<String>);

fn parse_optional_path(raw: &str) -> Result<OptionalPath, String> {
    Ok(OptionalPath(
        Some(raw.trim()).filter(|s| !s.is_empty()).map(PathBuf::from),
    ))
}

fn parse_optional_name(raw: &str) -> Result<OptionalName, String> {
    Ok(OptionalName(
        Some(raw.trim()).filter(|s| !s.is_empty()).map(str::to_string),
    ))
}

/// Where the admin HTTP server listens, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpEndpoint(pub Option<SocketAddr>);

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw).map_err(|e| format!("{e} (examples: 10s, 500ms, 2m)"))
}

fn parse_http_endpoint(raw: &str) -> Result<HttpEndpoint, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(HttpEndpoint(None));
    }
    // ":8080" means every interface, as in Go's net.Listen.
    let full = if raw.starts_with(':') {
        format!("0.0.0.0{raw}")
    } else {
        raw.to_string()
    };
    full.parse::<SocketAddr>()
        .map(|addr| HttpEndpoint(Some(addr)))
        .map_err(|_| format!("expected host:port or :port, e.g. :8080 (got {raw:?})"))
}

impl Args {
    /// Parses the process's command line; `volplane demo` takes none of
    /// volplane's own flags on it (the demo runs its own cluster, and a
    /// `--kubeconfig` there would suggest otherwise).
    pub fn parse_checked() -> Result<Self, clap::Error> {
        Self::parse_checked_from(std::env::args_os())
    }

    /// [`Args::parse_checked`] of `argv`.
    pub fn parse_checked_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = Self::command();
        let matches = command.try_get_matches_from_mut(argv)?;
        let args = Self::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        if let Some(subcommand) = &args.command {
            let given = command
                .get_arguments()
                .find(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine));
            if let Some(flag) = given.and_then(|arg| arg.get_long()) {
                let message = match subcommand {
                    Command::Demo(_) => format!(
                        "--{flag} is volplane's own flag; `volplane demo` runs its own cluster and takes only its own flags (see 'volplane demo --help')"
                    ),
                    Command::Completion(_) => {
                        format!("--{flag} is volplane's own flag; `volplane completion` takes only the shell")
                    }
                };
                return Err(command.error(ErrorKind::ArgumentConflict, message));
            }
        }
        Ok(args)
    }

    /// The controllers to run: as given, or the default for the other flags.
    pub fn selected_controllers(&self) -> Vec<Controller> {
        let mut selected = if self.controllers.is_empty() {
            vec![if self.csi_address.is_some() {
                Controller::Capacity
            } else {
                Controller::Ephemeral
            }]
        } else {
            self.controllers.clone()
        };
        selected.sort();
        selected.dedup();
        selected
    }

    /// `--capacity-poll-interval`, or its default for the mode: 1m
    /// centrally, 5s per node (GetCapacity on the local socket is cheap, and
    /// frequent polls replace a cluster-wide PV watch on every node).
    pub fn capacity_poll_interval(&self) -> Duration {
        self.capacity_poll_interval.unwrap_or(if self.node_deployment {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(60)
        })
    }

    /// Checks combinations of flags that clap cannot check alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.plan().map(|_| ())
    }

    /// What this process runs, once the flags are checked together: the
    /// controllers that talk to the driver come with its address.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let selected = self.selected_controllers();
        let wants = |controller| selected.contains(&controller);
        let csi = match (&self.csi_address, selected.iter().find(|c| c.needs_csi())) {
            (_, None) => None,
            (Some(address), Some(_)) => Some(CsiPlan {
                address: address.clone(),
                capacity: wants(Controller::Capacity),
                health: wants(Controller::Health),
            }),
            (None, Some(controller)) => {
                let name = controller
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                anyhow::bail!("the {name} controller needs --csi-address (or CSI_ADDRESS)");
            }
        };
        self.check_combinations()?;
        Ok(Plan {
            csi,
            ephemeral: wants(Controller::Ephemeral),
            placements: wants(Controller::Placements),
        })
    }

    fn check_combinations(&self) -> anyhow::Result<()> {
        if self.node_deployment && self.node_name_value().is_none() {
            anyhow::bail!("--node-deployment needs --node-name (or NODE_NAME from the downward API)");
        }
        if self.capacity_owner == CapacityOwner::Node && !self.node_deployment {
            anyhow::bail!("--capacity-owner node needs --node-deployment");
        }
        if self.kube_api_qps.is_some_and(|qps| !qps.is_finite() || qps < 0.0) {
            anyhow::bail!("--kube-api-qps must be a number >= 0 (0 disables the limit)");
        }
        if self.capacity_poll_interval.is_some_and(|interval| interval.is_zero()) {
            anyhow::bail!("--capacity-poll-interval must be greater than zero");
        }
        if self.csi_timeout.is_zero() {
            anyhow::bail!("--csi-timeout must be greater than zero");
        }
        for (flag, value) in [
            ("--health-list-interval", self.health_list_interval),
            ("--health-monitor-interval", self.health_monitor_interval),
            ("--health-node-failure-threshold", self.health_node_failure_threshold),
        ] {
            if value.is_zero() {
                anyhow::bail!("{flag} must be greater than zero");
            }
        }
        if self.leader_election {
            self.election_timing("lease", "default", "identity").validate()?;
        }
        Ok(())
    }

    /// The election settings for one lease.
    pub fn election_timing(&self, lease_name: &str, namespace: &str, identity: &str) -> ElectionConfig {
        ElectionConfig {
            lease_name: lease_name.to_string(),
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            lease_duration: self.leader_election_lease_duration,
            renew_deadline: self.leader_election_renew_deadline,
            retry_period: self.leader_election_retry_period,
        }
    }

    /// The Leases' namespace, if one was given and is not empty.
    pub fn leader_election_namespace_name(&self) -> Option<&str> {
        self.leader_election_namespace.as_ref().and_then(|n| n.0.as_deref())
    }

    /// The kubeconfig path, if one was given and is not empty.
    pub fn kubeconfig_path(&self) -> Option<&PathBuf> {
        self.kubeconfig.as_ref().and_then(|p| p.0.as_ref())
    }

    /// The namespace, if one was given and is not empty.
    pub fn namespace_name(&self) -> Option<&str> {
        self.namespace.as_ref().and_then(|n| n.0.as_deref())
    }

    /// The node name, if one was given and is not empty.
    pub fn node_name_value(&self) -> Option<&str> {
        self.node_name.as_ref().and_then(|n| n.0.as_deref())
    }

    /// The pod name, if one was given and is not empty.
    pub fn pod_name_value(&self) -> Option<&str> {
        self.pod_name.as_ref().and_then(|n| n.0.as_deref())
    }

    /// The client-side rate limit as "at most N requests per window" (N =
    /// burst, window = burst / qps), or `None` for no client-side limit.
    /// An explicit `--kube-api-qps` or `--kube-api-burst` always applies;
    /// otherwise the API server's flow control (`flow_control`) replaces
    /// the default bucket of 200 QPS, burst 400.
    pub fn api_rate_window(&self, flow_control: bool) -> Option<(u64, Duration)> {
        const DEFAULT_QPS: f64 = 200.0;
        let explicit = self.kube_api_qps.is_some() || self.kube_api_burst.is_some();
        if flow_control && !explicit {
            return None;
        }
        let qps = self.kube_api_qps.unwrap_or(DEFAULT_QPS);
        if qps <= 0.0 {
            return None;
        }
        // Twice the rate, as client-go's defaults (5 QPS, burst 10) have it.
        let burst = self
            .kube_api_burst
            .unwrap_or_else(|| (qps * 2.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        Some((u64::from(burst), Duration::from_secs_f64(f64::from(burst) / qps)))
    }

    /// The startup wait for the CSI driver; `None` means forever.
    pub fn csi_startup_limit(&self) -> Option<Duration> {
        Some(self.csi_startup_timeout).filter(|d| !d.is_zero())
    }
}

/// Prints a usage error as one line (help and version go to stdout as usual).
pub fn report_usage_error(error: clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{}", one_line(&error.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// Folds clap's multi-line error into one line: the message and any
/// "[possible values: …]", without tips and the usage block.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() || line.starts_with("tip:") {
            continue;
        }
        parts.push(line);
    }
    if parts.is_empty() {
        parts.push("error: invalid arguments");
    }
    format!("{} (see 'volplane --help')", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("volplane").chain(args.iter().copied()))
    }

    #[test]
    fn the_demo_takes_none_of_volplanes_flags() {
        let demo = |argv: &[&str]| Args::parse_checked_from(std::iter::once("volplane").chain(argv.iter().copied()));
        let args = demo(&["demo", "--once"]).expect("the demo's own flags");
        assert!(matches!(
            args.command,
            Some(Command::Demo(DemoArgs { once: true, dir: None }))
        ));
        let error = demo(&["--kubeconfig", "/k", "demo"]).expect_err("volplane's flag before demo");
        assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
        assert!(
            error.to_string().contains("--kubeconfig is volplane's own flag"),
            "{error}"
        );
        assert!(demo(&["demo", "--kubeconfig", "/k"]).is_err(), "not a flag of the demo");
        assert!(demo(&["--kubeconfig", "/k"]).is_ok(), "without the demo, as before");
    }

    #[test]
    fn defaults_match_the_documentation() {
        let args = parse(&[]).expect("no flags is valid");
        assert_eq!(args.csi_timeout, Duration::from_secs(10));
        assert_eq!(args.csi_startup_timeout, Duration::from_secs(60));
        assert_eq!(args.http_endpoint, HttpEndpoint(None));
        assert_eq!(args.log_format, LogFormat::Plain);
        assert_eq!(args.selected_controllers(), [Controller::Ephemeral]);
    }

    #[test]
    fn csi_address_selects_capacity_by_default() {
        let args = parse(&["--csi-address", "unix:///csi/csi.sock"]).expect("valid");
        assert_eq!(args.selected_controllers(), [Controller::Capacity]);
        assert!(args.validate().is_ok());
    }

    #[test]
    fn controllers_are_a_comma_list_and_unknown_names_are_rejected() {
        let args = parse(&[
            "--controllers",
            "ephemeral,capacity,ephemeral",
            "--csi-address",
            "/x.sock",
        ])
        .expect("valid");
        assert_eq!(
            args.selected_controllers(),
            [Controller::Capacity, Controller::Ephemeral]
        );
        let err = parse(&["--controllers", "capacity,frobnicate"]).expect_err("unknown controller");
        let text = err.to_string();
        assert!(
            text.contains("frobnicate") && text.contains("capacity") && text.contains("ephemeral"),
            "{text}"
        );
    }

    #[test]
    fn the_plan_pairs_the_driver_controllers_with_the_address() {
        let all = parse(&["--controllers", "health,ephemeral,capacity", "--csi-address", "/x.sock"]).expect("valid");
        let plan = all.plan().expect("plan");
        assert_eq!(
            plan.controllers(),
            [Controller::Capacity, Controller::Health, Controller::Ephemeral]
        );
        let csi = plan.csi.expect("driver controllers");
        assert_eq!(csi.address.to_string(), "unix:///x.sock");
        assert!(csi.capacity && csi.health && plan.ephemeral);
        // The address alone does not make a driver controller run.
        let ephemeral = parse(&["--controllers", "ephemeral", "--csi-address", "/x.sock"]).expect("valid");
        let plan = ephemeral.plan().expect("plan");
        assert_eq!((plan.csi, plan.ephemeral), (None, true));
    }

    #[test]
    fn capacity_without_a_csi_address_is_refused() {
        let args = parse(&["--controllers", "capacity"]).expect("parses");
        let err = args.validate().expect_err("needs csi");
        assert!(err.to_string().contains("--csi-address"), "{err}");
    }

    #[test]
    fn http_endpoint_accepts_port_only_and_full_addresses() {
        let port_only = parse(&["--http-endpoint", ":8080"]).expect("valid");
        assert_eq!(
            port_only.http_endpoint,
            HttpEndpoint(Some("0.0.0.0:8080".parse().expect("addr")))
        );
        let full = parse(&["--http-endpoint", "127.0.0.1:9090"]).expect("valid");
        assert_eq!(
            full.http_endpoint,
            HttpEndpoint(Some("127.0.0.1:9090".parse().expect("addr")))
        );
        assert!(parse(&["--http-endpoint", "localhost"]).is_err());
    }

    #[test]
    fn durations_and_addresses_are_validated_by_the_parser() {
        assert_eq!(
            parse(&["--csi-timeout", "250ms"]).expect("valid").csi_timeout,
            Duration::from_millis(250)
        );
        assert!(parse(&["--csi-timeout", "ten seconds"]).is_err());
        let err = parse(&["--csi-address", "tcp://10.0.0.1:9000"]).expect_err("not unix");
        assert!(err.to_string().contains("only unix sockets"), "{err}");
    }

    #[test]
    fn usage_errors_fold_into_one_line_with_the_valid_values() {
        let err = parse(&["--controllers", "frobnicate"]).expect_err("unknown controller");
        let line = one_line(&err.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("error: invalid value 'frobnicate'"), "{line}");
        assert!(
            line.contains("[possible values: capacity, ephemeral, health, placements]"),
            "{line}"
        );
        let err = parse(&["--bogus-flag"]).expect_err("unknown flag");
        let line = one_line(&err.render().to_string());
        assert_eq!(
            line,
            "error: unexpected argument '--bogus-flag' found (see 'volplane --help')"
        );
    }

    #[test]
    fn empty_kubeconfig_and_namespace_mean_unset() {
        let args = parse(&["--kubeconfig", "", "--namespace", " "]).expect("valid");
        assert_eq!(args.kubeconfig_path(), None);
        assert_eq!(args.namespace_name(), None);
        let args = parse(&["--kubeconfig", "/k", "--namespace", "kube-system"]).expect("valid");
        assert_eq!(args.kubeconfig_path(), Some(&PathBuf::from("/k")));
        assert_eq!(args.namespace_name(), Some("kube-system"));
    }

    #[test]
    fn capacity_flags_have_documented_defaults_and_checks() {
        let args = parse(&["--csi-address", "/x.sock"]).expect("valid");
        assert_eq!(args.capacity_poll_interval(), Duration::from_secs(60));
        assert_eq!(args.capacity_workers, 64);
        assert_eq!(args.capacity_owner, CapacityOwner::Auto);
        assert!(!args.node_deployment && !args.capacity_for_immediate_binding);
        let no_node = parse(&["--csi-address", "/x.sock", "--node-deployment"]).expect("parses");
        assert!(
            no_node
                .validate()
                .expect_err("needs node")
                .to_string()
                .contains("--node-name")
        );
        let node_owner = parse(&["--csi-address", "/x.sock", "--capacity-owner", "node"]).expect("parses");
        assert!(node_owner.validate().is_err());
        assert!(parse(&["--capacity-workers", "0"]).is_err());
    }

    #[test]
    fn api_rate_limit_flags() {
        let args = parse(&[]).expect("valid");
        assert_eq!((args.kube_api_qps, args.kube_api_burst), (None, None));
        assert!(parse(&["--kube-api-qps=-1"]).expect("parses").validate().is_err());
        assert!(parse(&["--kube-api-burst", "0"]).is_err());
        // Without flow control: the default bucket; with it: none.
        assert_eq!(args.api_rate_window(false), Some((400, Duration::from_secs(2))));
        assert_eq!(args.api_rate_window(true), None);
        // Explicit flags always apply.
        let explicit = parse(&["--kube-api-qps", "50"]).expect("valid");
        assert_eq!(explicit.api_rate_window(true), Some((100, Duration::from_secs(2))));
        let burst_only = parse(&["--kube-api-burst", "10"]).expect("valid");
        assert_eq!(burst_only.api_rate_window(true), Some((10, Duration::from_millis(50))));
        assert_eq!(
            parse(&["--kube-api-qps", "0"]).expect("valid").api_rate_window(false),
            None
        );
    }

    #[test]
    fn leader_election_is_on_by_default_with_consistent_timing() {
        let args = parse(&[]).expect("valid");
        assert!(args.leader_election);
        assert_eq!(
            (
                args.leader_election_lease_duration,
                args.leader_election_renew_deadline,
                args.leader_election_retry_period
            ),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        assert!(args.validate().is_ok());
        assert!(!parse(&["--leader-election=false"]).expect("valid").leader_election);
        assert!(parse(&["--leader-election"]).expect("valid").leader_election);
        let backwards = parse(&["--leader-election-renew-deadline", "20s"]).expect("parses");
        let err = backwards.validate().expect_err("renew deadline beyond the lease");
        assert!(err.to_string().contains("renew deadline"), "{err}");
        let fractional = parse(&["--leader-election-lease-duration", "1500ms"]).expect("parses");
        assert!(fractional.validate().is_err(), "the Lease API counts whole seconds");
        let off = parse(&["--leader-election=false", "--leader-election-renew-deadline", "20s"]).expect("parses");
        assert!(off.validate().is_ok(), "timing does not matter without election");
    }

    #[test]
    fn health_flags_have_documented_defaults_and_checks() {
        let args = parse(&["--controllers", "health", "--csi-address", "/x.sock"]).expect("valid");
        assert_eq!(args.selected_controllers(), [Controller::Health]);
        assert!(args.validate().is_ok());
        assert_eq!(
            (
                args.health_list_interval,
                args.health_list_page_size,
                args.health_monitor_interval,
                args.health_workers,
                args.health_node_watcher,
                args.health_node_failure_threshold,
            ),
            (
                Duration::from_secs(300),
                500,
                Duration::from_secs(60),
                10,
                false,
                Duration::from_secs(300)
            )
        );
        assert_eq!(args.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        let err = parse(&["--controllers", "health"])
            .expect("parses")
            .validate()
            .expect_err("needs csi");
        assert!(
            err.to_string().contains("health controller needs --csi-address"),
            "{err}"
        );
        assert!(parse(&["--health-list-page-size=-1"]).is_err());
        assert!(parse(&["--health-workers", "0"]).is_err());
        let zero = parse(&["--health-monitor-interval", "0s"]).expect("parses");
        assert!(
            zero.validate()
                .expect_err("zero")
                .to_string()
                .contains("--health-monitor-interval")
        );
    }

    #[test]
    fn zero_startup_timeout_waits_forever() {
        let args = parse(&["--csi-startup-timeout", "0s"]).expect("valid");
        assert_eq!(args.csi_startup_limit(), None);
    }
}
