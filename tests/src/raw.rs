//! The API server's own limit for the benchmarks: how fast it takes
//! creates from the leanest client this project can write — request bodies
//! serialized before the clock starts, a fixed number of requests in
//! flight over kept-alive connections, answers read to the end (so
//! connections are reused) but never parsed.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use kube::client::Body;

/// POSTs every one of `bodies` (JSON) to `path` with `in_flight` requests
/// at a time over `client`'s connection pool, and returns how long they
/// took. Fails on the first answer that is not a success.
pub async fn create_all(
    client: &kube::Client,
    path: &str,
    bodies: Vec<Vec<u8>>,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let requests = bodies
        .into_iter()
        .map(|body| request(http::Method::POST, path, "application/json", body))
        .collect::<anyhow::Result<_>>()?;
    send_all(client, requests, in_flight).await
}

/// One request with a JSON body of `content_type`.
pub fn request(
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> anyhow::Result<http::Request<Body>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .context("request")
}

/// Sends every one of `requests` with `in_flight` at a time over `client`'s
/// connection pool, and returns how long they took. Fails on the first
/// answer that is not a success.
pub async fn send_all(
    client: &kube::Client,
    requests: Vec<http::Request<Body>>,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut answers = futures::stream::iter(requests)
        .map(|request| async move {
            let response = client.send(request).await?;
            let status = response.status();
            let body = response.into_body().collect_bytes().await?;
            anyhow::Ok((status, body))
        })
        .buffer_unordered(in_flight.max(1));
    while let Some(answer) = answers.next().await {
        let (status, body) = answer?;
        if !status.is_success() {
            bail!("the API server answered {status}: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(started.elapsed())
}
