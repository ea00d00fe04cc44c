//! The admin HTTP server: `/metrics` (Prometheus text 0.0.4 or OpenMetrics,
//! as the scraper asks), `/livez`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exposition::Format;

/// What the admin endpoints (`/readyz`, `/metrics`) report on.
#[derive(Debug)]
pub struct Probes {
    ready: AtomicBool,
    registry: Registry,
}

/// The root registry: the standard `process_*` metrics, and
/// `volplane_build_info`. Register volplane's own metrics in
/// [`volplane_metrics`].
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(crate::process::ProcessCollector));
    let build_info = Family::<Vec<(String, String)>, Gauge>::default();
    build_info
        .get_or_create(&vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    volplane_metrics(&mut registry).register("build_info", "volplane build information", build_info);
    registry
}

/// The part of `root` whose metrics are named `volplane_*`.
pub fn volplane_metrics(root: &mut Registry) -> &mut Registry {
    root.sub_registry_with_prefix("volplane")
}

impl Probes {
    /// Serves `registry`; not ready yet.
    pub fn new(registry: Registry) -> Self {
        Self {
            ready: AtomicBool::new(false),
            registry,
        }
    }

    /// Marks the process ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The metrics in OpenMetrics text.
    pub fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The admin routes.
pub fn router(probes: Arc<Probes>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

async fn readyz(State(probes): State<Arc<Probes>>) -> impl IntoResponse {
    if probes.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// `/metrics` in the format the scraper's `Accept` header prefers: the
/// Prometheus text format 0.0.4 unless it asks for OpenMetrics.
async fn metrics(State(probes): State<Arc<Probes>>, headers: HeaderMap) -> impl IntoResponse {
    // Every Accept header, as one list.
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let format = Format::negotiate(Some(&accept.join(",")));
    match probes.encode_metrics() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type()), (header::VARY, "Accept")],
            format.render(&text),
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
    }
}

/// Binds `address` (failing fast with a clear error) and serves until `stop` turns true.
pub async fn serve(
    address: SocketAddr,
    probes: Arc<Probes>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on --http-endpoint {address}"))?;
    let bound = listener.local_addr().unwrap_or(address);
    tracing::info!(address = %bound, "admin server listening");
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(error) = axum::serve(listener, router(probes))
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "admin server failed");
        }
    }))
}
