//! The startup sequence: admin server, API server, CSI driver; then wait for
//! a termination signal.

use std::sync::Arc;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tracing::info;
use volplane_csi::{CsiClient, DriverInfo};

use crate::admin::{self, Health};
use crate::args::Args;

/// Runs volplane until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    let controllers = args.selected_controllers();
    info!(version = env!("CARGO_PKG_VERSION"), ?controllers, "volplane starting");

    let health = Arc::new(Health::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match args.http_endpoint.0 {
        Some(address) => Some(admin::serve(address, health.clone(), stop_rx).await?),
        None => None,
    };

    let client = connect_kube(&args).await?;
    let namespace = args
        .namespace_name()
        .map_or_else(|| client.default_namespace().to_string(), str::to_string);
    info!(%namespace, "namespace for volplane's own objects");

    if controllers.iter().any(|c| c.needs_csi())
        && let Some(address) = &args.csi_address
    {
        let csi = CsiClient::new(address.clone(), args.csi_timeout)?;
        csi.probe_until_ready(args.csi_startup_limit()).await?;
        let driver = csi
            .driver_info()
            .await
            .with_context(|| format!("cannot read the identity and capabilities of the CSI driver at {address}"))?;
        log_driver(&driver);
    }

    // The controllers themselves are not part of this build yet: volplane
    // only proves it can reach the API server and the driver.
    info!(
        ?controllers,
        "connected; no controller is implemented in this build yet, waiting for a termination signal"
    );
    health.set_ready(true);

    wait_for_termination().await?;
    info!("termination signal received, shutting down");
    health.set_ready(false);
    let _ = stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    Ok(())
}

async fn connect_kube(args: &Args) -> anyhow::Result<kube::Client> {
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
    let url = config.cluster_url.clone();
    let client = kube::Client::try_from(config).with_context(|| format!("cannot create a client for {url}"))?;
    let version = client
        .apiserver_version()
        .await
        .with_context(|| format!("cannot reach the Kubernetes API server at {url}"))?;
    info!(%url, version = %version.git_version, "connected to the Kubernetes API server");
    Ok(client)
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

async fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
