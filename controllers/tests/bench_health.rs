//! Health benchmark: 10,000 bound PVs of one driver (and 1,000 of another)
//! in ListVolumes mode, the real `volplane` binary against the API-server
//! double and the test driver, 1% of the volumes abnormal. Prints its
//! figures; asserts only correctness (no timing assertions).
//!
//! ```sh
//! cargo test --release -p volplane --test bench_health -- --ignored --nocapture
//! ```
//!
//! `VOLPLANE_BENCH_ARGS` adds flags to volplane's command line, e.g.
//! `--health-list-page-size 100`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume};
use kube::api::{Api, PostParams};
use serde_json::json;
use volplane_csi::{ControllerCapability, CsiMethod};
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::driver::{Call, DriverConfig, TestDriver, TestVolume};
use volplane_tests::objects;
use volplane_tests::wait::timed;

mod support;

const DRIVER: &str = "bench-health.csi.volplane.dev";
const VOLUMES: usize = 10_000;
const FOREIGN: usize = 1_000;
const ABNORMAL_EVERY: usize = 100;
const PAGE: i32 = 500;

/// The first-page ListVolumes calls (no token): one per sweep started.
fn sweeps_started(driver: &TestDriver) -> Vec<Instant> {
    driver
        .timed_calls()
        .into_iter()
        .filter(|(call, _)| matches!(call, Call::ListVolumes(r) if r.starting_token.is_empty()))
        .map(|(_, at)| at)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture (use --release)"]
async fn health_10000_volumes_list_mode() {
    let double = ApiServerDouble::start().await.expect("double");
    let driver = TestDriver::start(DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: vec![
            ControllerCapability::ListVolumes,
            ControllerCapability::GetVolume,
            ControllerCapability::VolumeCondition,
        ],
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    let client = double.client();

    let seeding = Instant::now();
    for ns in ["bench", "apps"] {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("ns");
    }
    for i in 0..VOLUMES {
        let volume = if i % ABNORMAL_EVERY == 0 {
            TestVolume::abnormal("bench: disk failed")
        } else {
            TestVolume::healthy()
        };
        driver.put_volume(&format!("h-pv-{i:05}"), volume);
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    futures::stream::iter((0..VOLUMES + FOREIGN).map(|i| {
        let pvs = pvs.clone();
        async move {
            let driver = if i < VOLUMES { DRIVER } else { "other.csi.example" };
            let pv = objects::bound_pv(&format!("pv-{i:05}"), driver, "apps", &format!("claim-{i:05}"));
            pvs.create(&PostParams::default(), &pv).await.expect("pv");
        }
    }))
    .buffer_unordered(32)
    .collect::<()>()
    .await;
    println!(
        "seeded {VOLUMES} bound PVs of the driver ({} abnormal) and {FOREIGN} of another driver in {:.2?}",
        VOLUMES / ABNORMAL_EVERY,
        seeding.elapsed()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, double.kubeconfig()).expect("kubeconfig");
    let interval = Duration::from_secs(5);
    let page = PAGE.to_string();
    let address = driver.address();
    let extra = std::env::var("VOLPLANE_BENCH_ARGS").unwrap_or_default();
    let mut args = vec![
        "--controllers",
        "health",
        "--csi-address",
        &address,
        "--namespace",
        "bench",
        "--health-list-interval",
        "5s",
        "--health-list-page-size",
        &page,
    ];
    args.extend(extra.split_whitespace());
    let mut running = support::Running::start(&kubeconfig, &args);
    running.wait_for("volplane is ready").await;
    let pid = running.pid();

    // The first sweep: from its first page to every abnormal volume
    // announced (event written and PV annotated).
    let abnormal = VOLUMES / ABNORMAL_EVERY;
    timed(Duration::from_secs(60), "the first sweep starts", || {
        !sweeps_started(&driver).is_empty()
    })
    .await;
    let first = sweeps_started(&driver)[0];
    timed(Duration::from_secs(120), "every abnormal volume announced", || {
        double.count(Verb::Create, "events") >= abnormal && double.count(Verb::Patch, "persistentvolumes") >= abnormal
    })
    .await;
    let announced = first.elapsed();
    let pages: Vec<Instant> = driver
        .timed_calls()
        .into_iter()
        .filter(|(call, _)| matches!(call, Call::ListVolumes(_)))
        .map(|(_, at)| at)
        .collect();
    let pages_per_sweep = VOLUMES.div_ceil(PAGE as usize);
    let last_page = pages[pages_per_sweep - 1];
    println!(
        "first sweep: {pages_per_sweep} pages of {PAGE} over {VOLUMES} volumes listed in {:.2?}; \
         all {abnormal} abnormal volumes announced (event + PV annotation) {:.2?} after the first page",
        last_page - first,
        announced
    );

    // Steady state: three more sweeps with nothing changed.
    let writes_before = double.writes("events") + double.writes("persistentvolumes");
    let sweeps_before = sweeps_started(&driver).len();
    let steady = Instant::now();
    // The fourth sweep starting means the three before it are complete.
    timed(interval * 8, "three more sweeps", || {
        sweeps_started(&driver).len() >= sweeps_before + 4
    })
    .await;
    let writes = double.writes("events") + double.writes("persistentvolumes") - writes_before;
    let starts = sweeps_started(&driver);
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    let rss = support::status_kib(pid, "VmRSS:").unwrap_or(0);
    let peak = support::status_kib(pid, "VmHWM:").unwrap_or(0);
    println!(
        "steady state: 3 sweeps in {:.2?} (sweep starts {:?} apart), {writes} API writes, {} GetVolume calls",
        steady.elapsed(),
        gaps,
        driver.count(CsiMethod::ControllerGetVolume)
    );
    println!(
        "volplane memory: RSS {:.1} MiB, peak RSS {:.1} MiB",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let (code, _) = running.terminate().await;
    assert_eq!(code, Some(0));

    assert_eq!(writes, 0, "unchanged conditions are not written");
    assert_eq!(
        double.count(Verb::Create, "events"),
        abnormal,
        "one event per abnormal volume"
    );
    assert_eq!(
        double.count(Verb::Patch, "persistentvolumes"),
        abnormal,
        "one annotation per abnormal volume"
    );
    assert_eq!(driver.count(CsiMethod::ControllerGetVolume), 0, "ListVolumes mode only");
}
