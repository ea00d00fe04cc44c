//! The startup sequence: admin server, API server, CSI driver, controllers;
//! then run until SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::config::{KubeConfigOptions, Kubeconfig};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use volplane_capacity::CapacityMetrics;
use volplane_capacity::placements::publisher::{PlacementsController, PlacementsMetrics};
use volplane_capacity::placements::sweep;
use volplane_csi::{CsiClient, DriverInfo};
use volplane_ephemeral::{EphemeralConfig, EphemeralController, EphemeralMetrics};
use volplane_health::HealthMetrics;
use volplane_leader::{ElectionMetrics, Elector};
use volplane_runtime::{Backoff, Leadership};

use crate::admin::{self, Probes};
use crate::args::{Args, CsiPlan, Plan};
use crate::client::{ApiMetrics, Retry, RetryConfig};
use crate::csi_calls::CsiCallMetrics;
use crate::idle::IdleMetrics;

/// How long running controllers get to finish in-flight work after a signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Runs volplane until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let plan = args.plan()?;
    info!(version = env!("CARGO_PKG_VERSION"), controllers = ?plan.controllers(), "volplane starting");

    let mut registry = admin::registry();
    let metrics = ProcessMetrics::register(&plan, &mut registry);
    let probes = Arc::new(Probes::new(registry));
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match args.http_endpoint.0 {
        Some(address) => Some(admin::serve(address, probes.clone(), stop_rx.clone()).await?),
        None => None,
    };

    let identity = identity(args.pod_name_value());
    let (client, config, version) = connect_kube(&args, &identity, &metrics.api).await?;
    crate::discovery::check(&client, &crate::discovery::needed(&plan.controllers()), &version).await?;
    let namespace = own_namespace(&args, &client);
    let lease_namespace = args.leader_election_namespace_name().unwrap_or(&namespace).to_string();
    let mut controllers = Controllers {
        client: client.clone(),
        args: &args,
        namespace,
        elections: Elections {
            lease_client: lease_client(config, &args, &metrics.api)?,
            watch_client: client,
            namespace: lease_namespace,
            identity,
            metrics: metrics.election,
            stop: watch::channel(false).0,
            running: JoinSet::new(),
        },
        stop: stop_rx,
        tasks: JoinSet::new(),
        readiness: Vec::new(),
        idle: metrics.idle,
    };
    if let (Some(csi), Some(metrics)) = (&plan.csi, metrics.csi) {
        controllers.start_driver_controllers(csi, metrics).await?;
    }
    if let Some(metrics) = metrics.ephemeral {
        controllers.start_ephemeral(metrics);
    }
    if let Some(metrics) = metrics.placements {
        controllers.start_placements(metrics);
    }
    let outcome = controllers.run_until_stopped(&probes).await;
    let _ = stop_tx.send(true);
    controllers.shut_down().await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    outcome
}

/// The namespace of volplane's own objects: `--namespace`, else the client's.
fn own_namespace(args: &Args, client: &kube::Client) -> String {
    let namespace = args
        .namespace_name()
        .map_or_else(|| client.default_namespace().to_string(), str::to_string);
    info!(%namespace, "namespace for volplane's own objects");
    namespace
}

/// The process's metrics, registered for the controllers of the plan.
struct ProcessMetrics {
    csi: Option<CsiMetrics>,
    ephemeral: Option<Arc<EphemeralMetrics>>,
    placements: Option<Arc<PlacementsMetrics>>,
    election: Arc<ElectionMetrics>,
    api: Arc<ApiMetrics>,
    idle: IdleMetrics,
}

impl ProcessMetrics {
    fn register(plan: &Plan, registry: &mut Registry) -> Self {
        // Only a process that talks to a driver has CSI calls to show.
        let calls = plan.csi.as_ref().map(|_| CsiCallMetrics::register(registry));
        let metrics = admin::volplane_metrics(registry);
        Self {
            csi: plan.csi.as_ref().zip(calls).map(|(csi, calls)| CsiMetrics {
                calls,
                capacity: csi.capacity.then(|| Arc::new(CapacityMetrics::register(metrics))),
                health: csi.health.then(|| Arc::new(HealthMetrics::register(metrics))),
            }),
            ephemeral: plan.ephemeral.then(|| Arc::new(EphemeralMetrics::register(metrics))),
            placements: plan.placements.then(|| Arc::new(PlacementsMetrics::register(metrics))),
            election: Arc::new(ElectionMetrics::register(metrics)),
            api: ApiMetrics::register(metrics),
            idle: IdleMetrics::register(metrics),
        }
    }
}

/// The metrics of the controllers that talk to the driver.
struct CsiMetrics {
    calls: Arc<CsiCallMetrics>,
    capacity: Option<Arc<CapacityMetrics>>,
    health: Option<Arc<HealthMetrics>>,
}

type ControllerTask = (&'static str, anyhow::Result<()>);

/// The running controllers of this process and what they share.
struct Controllers<'a> {
    client: kube::Client,
    args: &'a Args,
    namespace: String,
    elections: Elections,
    stop: watch::Receiver<bool>,
    tasks: JoinSet<ControllerTask>,
    readiness: Vec<watch::Receiver<bool>>,
    idle: IdleMetrics,
}

impl Controllers<'_> {
    /// Waits for the driver, reads what it can do, and starts the capacity
    /// and health controllers the plan asks for (each says once if the
    /// driver cannot serve it, and the process keeps running).
    async fn start_driver_controllers(&mut self, csi: &CsiPlan, metrics: CsiMetrics) -> anyhow::Result<()> {
        let client = CsiClient::new(csi.address.clone(), self.args.csi_timeout).observed_by(metrics.calls.clone());
        client.probe_until_ready(self.args.csi_startup_limit()).await?;
        let driver = client.driver_info().await.with_context(|| {
            format!(
                "cannot read the identity and capabilities of the CSI driver at {}",
                csi.address
            )
        })?;
        metrics.calls.set_driver(&driver.name);
        log_driver(&driver);
        if let Some(metrics) = metrics.capacity {
            self.start_capacity(&client, &driver, metrics).await?;
        }
        if let Some(metrics) = metrics.health {
            self.start_health(&client, &driver, metrics);
        }
        Ok(())
    }

    async fn start_capacity(
        &mut self,
        csi: &CsiClient,
        driver: &DriverInfo,
        metrics: Arc<CapacityMetrics>,
    ) -> anyhow::Result<()> {
        let args = self.args;
        // Per-node instances each own their node's objects: no election.
        let leadership = if args.node_deployment {
            Leadership::unconditional()
        } else {
            self.elections.join(args, capacity_lease(&driver.name))
        };
        let built = crate::capacity::build(&self.client, csi, driver, args, &self.namespace, metrics, leadership);
        match built.await? {
            Ok(capacity) => {
                self.readiness.push(capacity.readiness());
                let shutdown = stop_requested(self.stop.clone());
                self.tasks
                    .spawn(async move { ("capacity", capacity.run(shutdown).await.map_err(anyhow::Error::from)) });
            }
            Err(reason) => {
                info!(reason = reason.0, "capacity controller idle");
                self.idle.idle("capacity", reason);
            }
        }
        Ok(())
    }

    fn start_health(&mut self, csi: &CsiClient, driver: &DriverInfo, metrics: Arc<HealthMetrics>) {
        let args = self.args;
        // The node side runs on every node: no election.
        let lease = health_lease(&driver.name);
        let elections = &mut self.elections;
        match crate::health::build(&self.client, csi, driver, args, metrics, || elections.join(args, lease)) {
            Ok(health) => {
                self.readiness.push(health.readiness());
                let shutdown = stop_requested(self.stop.clone());
                self.tasks.spawn(async move {
                    health.run(shutdown).await;
                    ("health", Ok(()))
                });
            }
            Err(reason) => {
                info!(reason = reason.0, "health controller idle");
                self.idle.idle("health", reason);
            }
        }
    }

    fn start_ephemeral(&mut self, metrics: Arc<EphemeralMetrics>) {
        let args = self.args;
        let config = EphemeralConfig {
            workers: args.ephemeral_workers,
            instance: args.pod_name_value().unwrap_or("volplane").to_string(),
            backoff: Backoff {
                base: Duration::from_millis(500),
                max: Duration::from_secs(300),
            },
            release: args.ephemeral_release.into(),
            release_delay: args.ephemeral_release_delay,
            create_delay: args.ephemeral_create_delay,
        };
        let leadership = self.elections.join(args, EPHEMERAL_LEASE.to_string());
        let ephemeral = EphemeralController::new(self.client.clone(), config, metrics, leadership);
        self.readiness.push(ephemeral.readiness());
        let shutdown = stop_requested(self.stop.clone());
        self.tasks
            .spawn(async move { ("ephemeral", ephemeral.run(shutdown).await.map_err(anyhow::Error::from)) });
    }

    fn start_placements(&mut self, metrics: Arc<PlacementsMetrics>) {
        let leadership = self.elections.join(self.args, PLACEMENTS_LEASE.to_string());
        let swept = metrics.swept.clone();
        let placements = PlacementsController::new(self.client.clone(), &self.namespace, metrics, leadership.clone());
        self.readiness.push(placements.readiness());
        let shutdown = stop_requested(self.stop.clone());
        self.tasks.spawn(async move {
            placements.run(shutdown).await;
            ("placements", Ok(()))
        });
        let (client, namespace) = (self.client.clone(), self.namespace.clone());
        let shutdown = stop_requested(self.stop.clone());
        self.tasks.spawn(async move {
            sweep::run(client, namespace, leadership, swept, shutdown).await;
            ("node sweep", Ok(()))
        });
    }

    /// Ready once every running controller has synced; runs until a
    /// signal (`Ok`) or until a controller stops or fails (`Err`).
    async fn run_until_stopped(&mut self, probes: &Arc<Probes>) -> anyhow::Result<()> {
        // Before anything can say "ready": see wait_for_termination.
        let termination = wait_for_termination();
        let readiness = std::mem::take(&mut self.readiness);
        let ready = tokio::spawn({
            let probes = probes.clone();
            async move {
                for mut ready in readiness {
                    if ready.wait_for(|r| *r).await.is_err() {
                        return;
                    }
                }
                probes.set_ready(true);
                info!("volplane is ready");
            }
        });
        let outcome = tokio::select! {
            signal = termination => signal.map(|()| info!("termination signal received, shutting down")),
            Some(joined) = self.tasks.join_next() => match joined {
                Ok((name, Ok(()))) => Err(anyhow::anyhow!("the {name} controller stopped unexpectedly")),
                Ok((name, Err(error))) => Err(error.context(format!("the {name} controller failed"))),
                Err(error) => Err(anyhow::anyhow!("a controller task panicked: {error}")),
            },
        };
        ready.abort();
        probes.set_ready(false);
        outcome
    }

    /// Lets the controllers finish work in flight (the stop was sent),
    /// then gives the leases up: only now no write is left in flight.
    async fn shut_down(mut self) {
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = self.tasks.join_next().await {
                if let Ok((name, Err(error))) = joined {
                    warn!(controller = name, error = %format!("{error:#}"), "controller ended with an error during shutdown");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(grace = ?SHUTDOWN_GRACE, "work still in flight after the grace period; abandoning it");
            self.tasks.abort_all();
        }
        self.elections.release(self.args.leader_election_renew_deadline).await;
    }
}

/// Completes once a stop was requested (or the sender is gone).
async fn stop_requested(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The elections of this process, one per controller group.
struct Elections {
    lease_client: kube::Client,
    watch_client: kube::Client,
    namespace: String,
    identity: String,
    metrics: Arc<ElectionMetrics>,
    stop: watch::Sender<bool>,
    running: JoinSet<()>,
}

impl Elections {
    /// Starts campaigning for `lease_name` (or leads unconditionally
    /// without election).
    fn join(&mut self, args: &Args, lease_name: String) -> Leadership {
        if !args.leader_election {
            return Leadership::unconditional();
        }
        let elector = Elector::new(
            self.lease_client.clone(),
            self.watch_client.clone(),
            args.election_timing(&lease_name, &self.namespace, &self.identity),
            self.metrics.clone(),
        );
        let leadership = elector.leadership();
        self.running.spawn(elector.run(stop_requested(self.stop.subscribe())));
        leadership
    }

    /// Stops every election, releasing held leases, within `limit`.
    async fn release(mut self, limit: Duration) {
        let _ = self.stop.send(true);
        let released = tokio::time::timeout(limit + Duration::from_secs(1), async {
            while self.running.join_next().await.is_some() {}
        })
        .await;
        if released.is_err() {
            warn!("leases not released in time; they expire by themselves");
        }
    }
}

/// This process's identity in leases and its User-Agent: the pod name
/// (or host name) and a random part, unique per start.
fn identity(pod_name: Option<&str>) -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = pod_name.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "volplane".to_string())
    });
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{host}_{:08x}", hasher.finish() as u32)
}

/// The Lease of the placements controller.
pub const PLACEMENTS_LEASE: &str = "volplane-placements";

/// The Lease of the ephemeral controller.
pub const EPHEMERAL_LEASE: &str = "volplane-ephemeral";

/// The Lease of the capacity controller for `driver`.
pub fn capacity_lease(driver: &str) -> String {
    format!("volplane-capacity-{}", lease_suffix(driver))
}

/// The Lease of the controller-side health controller for `driver`.
pub fn health_lease(driver: &str) -> String {
    format!("volplane-health-{}", lease_suffix(driver))
}

/// A driver name as part of a Lease name: lower case, other characters
/// than letters, digits, '-' and '.' become '-'.
fn lease_suffix(driver: &str) -> String {
    let name: String = driver
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}

/// The client for lease requests: its own small rate budget (renewals
/// never queue behind controller traffic) and timeouts shorter than the
/// renew deadline (a hung request fails instead of outliving the term).
fn lease_client(mut config: kube::Config, args: &Args, metrics: &Arc<ApiMetrics>) -> anyhow::Result<kube::Client> {
    // Each attempt gets a third of the renew deadline, so a retry still fits in it.
    let timeout = args.leader_election_renew_deadline / 3;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    api_client(
        config,
        Some((LEASE_BURST, Duration::from_secs(1))),
        RetryConfig::LEASES,
        metrics,
        "the leader election client",
    )
}

/// Requests per second leader election may make: a bound against a loop
/// gone wrong, not a pace. Renewals take a few requests per lease per
/// retry period, but taking a lease takes about a dozen at once (read,
/// create, watch, lock, transitions, re-read), and a process runs up to
/// three elections; at 10 the second election of a start waited for the
/// next second.
const LEASE_BURST: u64 = 50;

/// A client on `config`'s stack: at most `burst` requests per `window`
/// seconds when `limit` is given (retries pass the limiter again), every
/// write logged, and volplane's `retries` in place of kube's (which know
/// neither 5xx nor broken connections).
fn api_client(
    mut config: kube::Config,
    limit: Option<(u64, Duration)>,
    retries: RetryConfig,
    metrics: &Arc<ApiMetrics>,
    what: &str,
) -> anyhow::Result<kube::Client> {
    config.default_retry = false;
    let url = config.cluster_url.clone();
    let limiter = limit.map(|(burst, window)| tower::limit::RateLimitLayer::new(burst, window));
    let client = kube::client::ClientBuilder::try_from(config)
        .with_context(|| format!("cannot create {what} for {url}"))?
        .with_layer(&tower::util::option_layer(limiter))
        .with_layer(&crate::audit::layer())
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&tower::retry::RetryLayer::new(Retry::new(retries, metrics.clone())))
        .build();
    Ok(client)
}

async fn connect_kube(
    args: &Args,
    identity: &str,
    metrics: &Arc<ApiMetrics>,
) -> anyhow::Result<(kube::Client, kube::Config, String)> {
    let config = match args.kubeconfig_path() {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration found (not in a cluster, no --kubeconfig, no ~/.kube/config)")?,
    };
    let mut config = config;
    let agent = format!("volplane/{} ({identity})", env!("CARGO_PKG_VERSION"));
    if let Ok(agent) = http::HeaderValue::from_str(&agent) {
        config.headers.push((http::header::USER_AGENT, agent));
    }
    let url = config.cluster_url.clone();
    // The first contact fails fast: an unreachable server is a startup error.
    let probe = api_client(config.clone(), None, RetryConfig::STARTUP, metrics, "a client")?;
    let (version, flow_control) = server_version(&probe)
        .await
        .with_context(|| format!("cannot reach the Kubernetes API server at {url}"))?;
    let limit = args.api_rate_window(flow_control);
    let qps = limit.map_or(0.0, |(burst, window)| burst as f64 / window.as_secs_f64());
    metrics.flow_control.set(i64::from(flow_control));
    metrics.client_qps.set(qps);
    match (flow_control, limit) {
        (true, None) => info!(
            "the API server does API Priority and Fairness: no client-side rate limit (set --kube-api-qps to have one)"
        ),
        (false, None) => info!("no client-side rate limit (--kube-api-qps 0)"),
        (_, Some((burst, _))) => info!(flow_control, qps, burst, "client-side rate limit"),
    }
    let client = api_client(config.clone(), limit, RetryConfig::CONTROLLERS, metrics, "a client")?;
    info!(%url, version = %version.git_version, "connected to the Kubernetes API server");
    Ok((client, config, version.git_version))
}

/// One `GET /version`: the server's version, and whether it classifies
/// volplane's requests with API Priority and Fairness (GA since 1.29, on by
/// default), which it says with `X-Kubernetes-PF-*` response headers.
async fn server_version(client: &kube::Client) -> anyhow::Result<(Info, bool)> {
    let request = http::Request::get("/version").body(kube::client::Body::empty())?;
    let response = client.send(request).await?;
    let flow_control = crate::client::flow_control_in(response.headers());
    let status = response.status();
    let body = response.into_body().collect_bytes().await?;
    if !status.is_success() {
        anyhow::bail!(
            "GET /version answered {status}: {}",
            volplane_runtime::text::cut(&String::from_utf8_lossy(&body), 300)
        );
    }
    let version = serde_json::from_slice(&body).context("GET /version answered something else than a version")?;
    Ok((version, flow_control))
}

fn log_driver(driver: &DriverInfo) {
    info!(
        driver = %driver.name,
        vendor_version = %driver.vendor_version,
        controller_service = driver.plugin.controller_service,
        topology = driver.supports_topology(),
        controller_capabilities = ?driver.controller_names(),
        node_capabilities = ?driver.node_names(),
        "CSI driver found"
    );
}

/// Completes on SIGTERM or SIGINT. The handlers are installed at the
/// call, not at the first poll: a signal sent as soon as the process says
/// it is ready is never the default action's (death by signal).
pub(crate) fn wait_for_termination() -> impl std::future::Future<Output = anyhow::Result<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler");
    let int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler");
    async move {
        let (mut term, mut int) = (term?, int?);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    }
}
