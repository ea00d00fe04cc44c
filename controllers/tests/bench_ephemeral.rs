//! Ephemeral benchmark: 1,000 pods with one generic ephemeral volume each,
//! created at once; the real `volplane` binary against the API-server
//! double. Prints how long after the last pod all PVCs exist and the
//! pod-to-PVC latency distribution (measured here with millisecond
//! precision: pod create returned → PVC seen by a watch). Asserts only
//! correctness.
//!
//! ```sh
//! cargo test --release -p volplane --test bench_ephemeral -- --ignored --nocapture
//! ```
//!
//! `VOLPLANE_BENCH_ARGS` adds flags to volplane's command line, e.g.
//! `--kube-api-qps 0` to measure without the client-side rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use volplane_tests::apiserver::{ApiServerDouble, Verb};

mod support;

const PODS: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (use --release)"]
async fn ephemeral_1000_pods() {
    let double = ApiServerDouble::start().await.expect("double");
    double.enable_garbage_collection(true);
    let client = double.client();
    let (mut child, _kubeconfig) = support::spawn_volplane(&double, &["--controllers", "ephemeral"]);
    let pid = child.id();

    // Record when each PVC appears.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = tokio::spawn({
        let seen = seen.clone();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        async move {
            let mut events = watcher::watcher(claims, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = events.try_next().await {
                if let watcher::Event::Apply(claim) | watcher::Event::InitApply(claim) = event
                    && let Some(name) = claim.metadata.name
                {
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(name)
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    // Wait until volplane watches pods (its first pod list) before the burst.
    let deadline = Instant::now() + Duration::from_secs(30);
    while double.count(Verb::Watch, "pods") == 0 {
        assert!(Instant::now() < deadline, "volplane did not start watching pods");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("pod-{i:04}");
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"containers": [{"name": "c", "image": "i"}],
                             "volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
                                 "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
                (format!("{name}-scratch"), Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let last_pod = created.iter().map(|(_, t)| *t).max().unwrap_or(started);
    println!("created {PODS} pods in {:.2?}", last_pod - started);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if seen.lock().unwrap_or_else(|p| p.into_inner()).len() >= PODS {
            break;
        }
        assert!(Instant::now() < deadline, "not all PVCs were created");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let all_done = seen.values().max().copied().unwrap_or(last_pod);
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(claim, pod_time)| seen.get(claim).map(|t| t.saturating_duration_since(*pod_time)))
        .collect();
    latencies.sort();
    let peak = support::status_kib(pid, "VmHWM:").unwrap_or(0);
    println!(
        "all {PODS} PVCs exist {:.2?} after the last pod ({:.2?} after the first)",
        all_done.saturating_duration_since(last_pod),
        all_done - started
    );
    println!(
        "pod-to-PVC latency: p50 {:.1?}, p90 {:.1?}, p99 {:.1?}, max {:.1?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!("volplane peak memory: {:.1} MiB", peak as f64 / 1024.0);
    let _ = child.kill();
    let _ = child.wait();
    watch.abort();

    assert_eq!(
        double.count(Verb::Create, "persistentvolumeclaims"),
        PODS,
        "exactly one create per volume"
    );
}
