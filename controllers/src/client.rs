//! How volplane talks to the API server: API Priority and Fairness instead
//! of a fixed client-side ceiling when the server has it, and retries —
//! `429` with `Retry-After`, server errors, broken connections — for every
//! request (reads, writes, watches, lease calls).
//!
//! The decisions are pure functions ([`retry_delay`], [`flow_control_in`]);
//! [`Retry`] applies them as a tower retry policy below kube's `Client`.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use kube::client::Body;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tower::BoxError;
use tower::retry::Policy;
use tower::util::rng::{HasherRng, Rng as _};

/// Response headers the API server sets on every request API Priority and
/// Fairness classified.
pub const FLOW_CONTROL_HEADERS: [&str; 2] = ["x-kubernetes-pf-flowschema-uid", "x-kubernetes-pf-prioritylevel-uid"];

/// Whether a response was classified by API Priority and Fairness.
pub fn flow_control_in(headers: &HeaderMap) -> bool {
    FLOW_CONTROL_HEADERS.iter().any(|name| headers.contains_key(*name))
}

/// How often and how long to retry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff; it doubles per retry.
    pub base: Duration,
    /// No wait is longer, `Retry-After` included.
    pub max: Duration,
}

impl RetryConfig {
    /// For the controllers' requests: patient (about a minute in all), since
    /// a failure returned to a controller only means it retries later itself.
    pub const CONTROLLERS: Self = Self {
        max_retries: 10,
        base: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
    /// For the first contact at startup: a few quick tries, then a clear error.
    pub const STARTUP: Self = Self {
        max_retries: 2,
        base: Duration::from_millis(100),
        max: Duration::from_millis(500),
    };
    /// For lease calls: quick, a renewal must succeed within the renew
    /// deadline or not at all.
    pub const LEASES: Self = Self {
        max_retries: 3,
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
}

/// What an attempt ended with, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt<'a> {
    /// The server answered with this status (and maybe `Retry-After`).
    Answered {
        /// The status code.
        status: StatusCode,
        /// The raw `Retry-After` header.
        retry_after: Option<&'a str>,
    },
    /// No connection: the request was never sent.
    NotConnected,
    /// The connection broke or timed out: the server may have acted on it.
    Broken,
}

impl Attempt<'_> {
    /// The `code` label of the retries metric.
    pub fn label(&self) -> String {
        match self {
            Self::Answered { status, .. } => status.as_u16().to_string(),
            Self::NotConnected => "connect".into(),
            Self::Broken => "connection".into(),
        }
    }
}

/// The wait before retry number `attempt + 1`, or `None` to give up or
/// because the outcome is final. `jitter` in `[0, 1)` spreads retries of
/// many clients.
///
/// - `429` (flow control or max-in-flight rejected it before any work) and
///   `503` are retried for every method, after `Retry-After` when given;
/// - other server errors and broken connections are retried for
///   idempotent methods only: a `POST` may have created the object, and
///   each controller recognises its own object on its next pass instead;
/// - a request that never left (no connection) is retried for every method.
pub fn retry_delay(
    config: &RetryConfig,
    method: &Method,
    outcome: Attempt<'_>,
    attempt: u32,
    jitter: f64,
) -> Option<Duration> {
    if attempt >= config.max_retries {
        return None;
    }
    let idempotent = method != Method::POST;
    let retry_after = match outcome {
        Attempt::Answered { status, retry_after } => {
            let always = matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE);
            let server_error = status.is_server_error();
            if !(always || (server_error && idempotent)) {
                return None;
            }
            retry_after.and_then(|value| value.trim().parse::<u64>().ok())
        }
        Attempt::NotConnected => None,
        Attempt::Broken if idempotent => None,
        Attempt::Broken => return None,
    };
    let backoff = config.base.saturating_mul(2u32.saturating_pow(attempt)).min(config.max);
    let wait = match retry_after {
        Some(seconds) => Duration::from_secs(seconds).min(config.max),
        None => backoff,
    };
    // Up to a fifth more, so clients told the same Retry-After do not return together.
    Some(
        wait.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0))
            .min(config.max.mul_f64(1.2)),
    )
}

/// How an error from below kube's client reads for [`retry_delay`].
fn attempt_of_error(error: &BoxError) -> Attempt<'static> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(current) = source {
        if let Some(client) = current.downcast_ref::<hyper_util::client::legacy::Error>()
            && client.is_connect()
        {
            return Attempt::NotConnected;
        }
        source = current.source();
    }
    Attempt::Broken
}

/// The API client metrics (`volplane_api_*`).
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// Retried requests by verb (HTTP method) and code (status, `connect`, `connection`).
    pub retries: Family<RetryLabels, Counter>,
    /// 1 when the API server does API Priority and Fairness.
    pub flow_control: Gauge,
    /// The client-side limit in requests per second; 0 for none.
    pub client_qps: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Labels of `volplane_api_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The HTTP method.
    pub verb: String,
    /// The status code, or `connect` / `connection`.
    pub code: String,
}

impl ApiMetrics {
    /// Registers the metrics under `volplane_api_*`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Arc::new(Self::default());
        let sub = registry.sub_registry_with_prefix("api");
        sub.register(
            "retries",
            "API requests retried, by verb and code (429: throttled by the API server)",
            metrics.retries.clone(),
        );
        sub.register(
            "flow_control",
            "1 when the API server does API Priority and Fairness (X-Kubernetes-PF-* response headers)",
            metrics.flow_control.clone(),
        );
        sub.register(
            "client_qps",
            "the client-side request limit in requests per second; 0: none, flow control is the API server's",
            metrics.client_qps.clone(),
        );
        metrics
    }
}

/// The tower retry policy: one per request (cloned), counting its attempts.
#[derive(Clone)]
pub struct Retry {
    config: RetryConfig,
    attempt: u32,
    rng: HasherRng,
    metrics: Arc<ApiMetrics>,
}

impl std::fmt::Debug for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("config", &self.config)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Retry {
    /// A policy for a client.
    pub fn new(config: RetryConfig, metrics: Arc<ApiMetrics>) -> Self {
        Self {
            config,
            attempt: 0,
            rng: HasherRng::new(),
            metrics,
        }
    }
}

impl<B> Policy<Request<Body>, Response<B>, BoxError> for Retry {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Body>,
        result: &mut Result<Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        let outcome = match result {
            Ok(response) if response.status().is_success() => return None,
            Ok(response) => Attempt::Answered {
                status: response.status(),
                retry_after: response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            },
            Err(error) => attempt_of_error(error),
        };
        let jitter = self.rng.next_f64();
        let wait = retry_delay(&self.config, request.method(), outcome, self.attempt, jitter)?;
        self.attempt += 1;
        self.metrics
            .retries
            .get_or_create(&RetryLabels {
                verb: request.method().to_string(),
                code: outcome.label(),
            })
            .inc();
        tracing::debug!(method = %request.method(), path = %request.uri().path(), code = %outcome.label(),
                        attempt = self.attempt, ?wait, "retrying API request");
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        // Streaming bodies cannot be replayed; kube's requests have whole bodies.
        let body = request.body().try_clone()?;
        let mut copy = Request::builder()
            .method(request.method().clone())
            .uri(request.uri().clone())
            .version(request.version())
            .body(body)
            .ok()?;
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: RetryConfig = RetryConfig::CONTROLLERS;

    fn answered(code: u16, retry_after: Option<&str>) -> Attempt<'_> {
        Attempt::Answered {
            status: StatusCode::from_u16(code).expect("status"),
            retry_after,
        }
    }

    #[test]
    fn throttling_waits_as_long_as_the_server_says_with_jitter() {
        let wait = retry_delay(&C, &Method::POST, answered(429, Some("2")), 0, 0.0);
        assert_eq!(wait, Some(Duration::from_secs(2)));
        let jittered = retry_delay(&C, &Method::GET, answered(429, Some("2")), 0, 0.5).expect("retried");
        assert_eq!(jittered, Duration::from_millis(2200));
        // No (or an unreadable) Retry-After: exponential backoff.
        assert_eq!(
            retry_delay(&C, &Method::GET, answered(429, None), 3, 0.0),
            Some(Duration::from_millis(800))
        );
        assert_eq!(
            retry_delay(&C, &Method::GET, answered(429, Some("soon")), 0, 0.0),
            Some(Duration::from_millis(100))
        );
        // An absurd Retry-After is capped.
        assert_eq!(
            retry_delay(&C, &Method::GET, answered(429, Some("86400")), 0, 0.0),
            Some(C.max)
        );
    }

    #[test]
    fn server_errors_and_broken_connections_are_retried_only_when_repeating_is_safe() {
        for code in [500, 502, 504] {
            assert!(
                retry_delay(&C, &Method::GET, answered(code, None), 0, 0.0).is_some(),
                "{code}"
            );
            assert!(
                retry_delay(&C, &Method::PUT, answered(code, None), 0, 0.0).is_some(),
                "{code}"
            );
            assert_eq!(
                retry_delay(&C, &Method::POST, answered(code, None), 0, 0.0),
                None,
                "{code}"
            );
        }
        assert!(retry_delay(&C, &Method::POST, answered(503, None), 0, 0.0).is_some());
        assert!(retry_delay(&C, &Method::DELETE, Attempt::Broken, 0, 0.0).is_some());
        assert_eq!(retry_delay(&C, &Method::POST, Attempt::Broken, 0, 0.0), None);
        assert!(retry_delay(&C, &Method::POST, Attempt::NotConnected, 0, 0.0).is_some());
    }

    #[test]
    fn client_errors_are_final_and_retries_run_out() {
        for code in [400, 401, 403, 404, 409, 410, 422] {
            assert_eq!(
                retry_delay(&C, &Method::GET, answered(code, None), 0, 0.0),
                None,
                "{code}"
            );
        }
        assert!(retry_delay(&C, &Method::GET, answered(503, None), C.max_retries - 1, 0.0).is_some());
        assert_eq!(
            retry_delay(&C, &Method::GET, answered(503, None), C.max_retries, 0.0),
            None
        );
        // Backoff doubles up to the cap, never beyond it with jitter.
        let waits: Vec<Duration> = (0..C.max_retries)
            .filter_map(|attempt| retry_delay(&C, &Method::GET, Attempt::Broken, attempt, 0.999))
            .collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= C.max.mul_f64(1.2)), "{waits:?}");
    }

    #[test]
    fn flow_control_is_read_from_either_header() {
        let mut headers = HeaderMap::new();
        assert!(!flow_control_in(&headers));
        headers.insert("X-Kubernetes-PF-PriorityLevel-UID", "u".parse().expect("value"));
        assert!(flow_control_in(&headers));
    }
}
