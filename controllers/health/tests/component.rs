//! The health controllers with a real kube::Client against the API-server
//! double and the test CSI driver over a unix socket.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use volplane_csi::{ControllerCapability, CsiMethod, NodeCapability};
use volplane_health::model::{
    ABNORMAL_ANNOTATION, REASON_ABNORMAL, REASON_NODE_FAILED, REASON_NODE_RECOVERED, REASON_NORMAL,
};
use volplane_health::{HealthConfig, HealthController, HealthMetrics, NodeHealthAgent, NodeHealthConfig, Source};
use volplane_runtime::Leadership;
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::background::Background;
use volplane_tests::driver::{DriverConfig, TestDriver, TestVolume};
use volplane_tests::objects;
use volplane_tests::wait::{eventually, within};

const DRIVER: &str = "health.csi.volplane.dev";
const NS: &str = "apps";

struct Harness {
    double: ApiServerDouble,
    driver: TestDriver,
    client: kube::Client,
    registry: Registry,
    metrics: Arc<HealthMetrics>,
    /// The controller's fallback source.
    fallback: Option<Source>,
    running: Option<Background<()>>,
}

fn driver_config(capabilities: Vec<ControllerCapability>) -> DriverConfig {
    DriverConfig {
        name: DRIVER.into(),
        controller_capabilities: capabilities,
        node_capabilities: Some(vec![NodeCapability::GetVolumeStats, NodeCapability::VolumeCondition]),
        node_id: "n1".into(),
        ..DriverConfig::default()
    }
}

/// Healthy, 300 of 1000 bytes and 10 of 100 inodes used.
fn healthy() -> TestVolume {
    TestVolume {
        bytes: Some((700, 1000, 300)),
        inodes: Some((90, 100, 10)),
        ..TestVolume::healthy()
    }
}

fn sick(message: &str) -> TestVolume {
    TestVolume {
        condition: TestVolume::abnormal(message).condition,
        ..healthy()
    }
}

impl Harness {
    async fn new(capabilities: Vec<ControllerCapability>) -> Self {
        let double = ApiServerDouble::start().await.expect("double");
        let driver = TestDriver::start(driver_config(capabilities)).await.expect("driver");
        let client = double.client();
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns");
        Api::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
        let mut registry = Registry::with_prefix("volplane");
        let metrics = Arc::new(HealthMetrics::register(&mut registry));
        Self {
            double,
            driver,
            client,
            registry,
            metrics,
            fallback: None,
            running: None,
        }
    }

    async fn start(&mut self, source: Source, node_failure_threshold: Option<Duration>, leadership: Leadership) {
        let controller = HealthController::new(
            self.client.clone(),
            self.driver.client(Duration::from_millis(500)),
            HealthConfig {
                driver: DRIVER.into(),
                source,
                fallback: self.fallback.clone(),
                node_failure_threshold,
                instance: "test".into(),
            },
            self.metrics.clone(),
            leadership,
        );
        let mut ready = controller.readiness();
        self.running = Some(Background::spawn(|shutdown| controller.run(shutdown)));
        within(Duration::from_secs(20), ready.wait_for(|r| *r))
            .await
            .expect("ready");
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(20)).await;
        }
    }

    /// A bound PV of `driver` for the claim `claim` (handle `h-<pv>`), and the claim.
    async fn bound_pv(&self, pv: &str, driver: &str, claim: &str) {
        Api::<PersistentVolume>::all(self.client.clone())
            .create(&PostParams::default(), &objects::bound_pv(pv, driver, NS, claim))
            .await
            .expect("create pv");
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &objects::bound_claim(claim, NS, pv))
            .await
            .expect("create claim");
    }

    async fn set_phase(&self, pv: &str, phase: &str) {
        Api::<PersistentVolume>::all(self.client.clone())
            .patch_status(
                pv,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            )
            .await
            .expect("pv status");
    }

    /// (reason, object name, note) of every occurrence of an event.
    async fn events(&self) -> Vec<(String, String, String)> {
        volplane_tests::events::occurrences(&self.client, NS)
            .await
            .expect("events")
    }

    async fn wait_for_events(&self, what: &str, reason: &str, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events().await;
            if events.iter().filter(|(r, _, _)| r == reason).count() >= count {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {events:#?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn count_events(&self, reason: &str) -> usize {
        self.events().await.iter().filter(|(r, _, _)| r == reason).count()
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text
    }

    /// The value of `volplane_health_checks_total{result}` (its series
    /// exist from the start).
    fn checks(&self, result: &str) -> u64 {
        let prefix = format!("volplane_health_checks_total{{result=\"{result}\"}} ");
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
    }

    /// Waits until `sweeps` more complete ListVolumes sweeps have run.
    async fn wait_for_sweeps(&self, sweeps: u64) {
        let count = |text: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with("volplane_health_sweep_duration_seconds_count"))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let start = count(&self.metrics_text());
        eventually(Duration::from_secs(30), "more sweeps", || {
            count(&self.metrics_text()) >= start + sweeps
        })
        .await;
    }
}

fn list_mode(interval_ms: u64, page_size: i32) -> Source {
    Source::ListVolumes {
        interval: Duration::from_millis(interval_ms),
        page_size,
    }
}

#[tokio::test]
async fn paged_sweeps_over_10000_volumes_announce_each_change_once() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    for i in 0..10_000 {
        h.driver.put_volume(&format!("h-bulk-{i:05}"), healthy());
    }
    for i in 0..5 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
        h.bound_pv(&format!("pv-{i}"), DRIVER, &format!("claim-{i}")).await;
    }
    h.driver.put_volume("h-pv-0", sick("disk failed"));
    h.driver.put_volume("h-pv-1", sick("fs read-only"));
    // Volumes of another driver, unbound PVs and in-tree PVs are ignored.
    h.bound_pv("other", "other.csi.example", "other-claim").await;
    h.bound_pv("unbound", DRIVER, "unbound-claim").await;
    h.set_phase("unbound", "Available").await;

    h.start(list_mode(200, 500), None, Leadership::unconditional()).await;
    h.wait_for_events("two abnormal volumes", REASON_ABNORMAL, 2).await;
    let events = h.events().await;
    let mut abnormal: Vec<(&str, &str)> = events
        .iter()
        .filter(|(r, _, _)| r == REASON_ABNORMAL)
        .map(|(_, claim, note)| (claim.as_str(), note.as_str()))
        .collect();
    abnormal.sort_unstable();
    assert_eq!(abnormal, [("claim-0", "disk failed"), ("claim-1", "fs read-only")]);
    // Every page was asked with the bound and followed to the end.
    let pages = h
        .driver
        .calls()
        .into_iter()
        .filter(|c| matches!(c, volplane_tests::driver::Call::ListVolumes(r) if r.max_entries == 500))
        .count();
    assert!(pages >= 21, "10,005 volumes take 21 pages of 500 (saw {pages} calls)");

    // Unchanged conditions over more sweeps: no more events.
    h.wait_for_sweeps(3).await;
    assert_eq!(h.events().await.len(), 2, "{:#?}", h.events().await);
    let text = h.metrics_text();
    assert!(
        text.contains("volplane_health_abnormal_volumes{namespace=\"apps\",persistentvolumeclaim=\"claim-0\"} 1"),
        "{text}"
    );
    assert!(!text.contains("persistentvolumeclaim=\"claim-2\""), "{text}");
    let pv: PersistentVolume = Api::all(h.client.clone()).get("pv-0").await.expect("pv");
    assert_eq!(
        pv.metadata
            .annotations
            .unwrap_or_default()
            .get(ABNORMAL_ANNOTATION)
            .map(String::as_str),
        Some("disk failed")
    );

    // Recovery: one Normal event; the annotation and the gauge go.
    h.driver.put_volume("h-pv-0", healthy());
    h.wait_for_events("recovery", REASON_NORMAL, 1).await;
    h.wait_for_sweeps(3).await;
    assert_eq!(h.count_events(REASON_NORMAL).await, 1);
    assert_eq!(h.count_events(REASON_ABNORMAL).await, 2);
    let pv: PersistentVolume = Api::all(h.client.clone()).get("pv-0").await.expect("pv");
    assert!(
        !pv.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(ABNORMAL_ANNOTATION)
    );
    assert!(!h.metrics_text().contains("persistentvolumeclaim=\"claim-0\"} 1"));

    // A volume the driver forgot is abnormal, with a clear message.
    assert!(h.driver.remove_volume("h-pv-2"));
    h.wait_for_events("vanished volume", REASON_ABNORMAL, 3).await;
    let events = h.events().await;
    let (_, claim, note) = events.iter().rfind(|(r, _, _)| r == REASON_ABNORMAL).expect("event");
    assert_eq!(claim, "claim-2");
    assert!(
        note.contains("h-pv-2") && note.contains("missing from ListVolumes"),
        "{note}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_restarted_controller_does_not_announce_known_conditions_again() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    // A message longer than an annotation keeps: compared truncated.
    let long = format!("disk failed: {}", "x".repeat(1500));
    h.driver.put_volume("h-pv-0", sick(&long));
    h.bound_pv("pv-0", DRIVER, "claim-0").await;
    // The first annotation write fails after the event went out: it is
    // written again after the next check, the event is not.
    h.double.fail_next(Some(Verb::Patch), Some("persistentvolumes"), 1, 500);
    h.start(list_mode(100, 0), None, Leadership::unconditional()).await;
    h.wait_for_events("abnormal", REASON_ABNORMAL, 1).await;
    let pvs: Api<PersistentVolume> = Api::all(h.client.clone());
    let recorded = volplane_tests::wait::eventually_some(Duration::from_secs(10), "the annotation is written", || {
        let pvs = pvs.clone();
        async move { volplane_health::model::announced(&pvs.get("pv-0").await.ok()?) }
    })
    .await;
    assert!(
        matches!(&recorded, volplane_health::model::Condition::Abnormal(m) if m.starts_with("disk failed: xxx") && m.len() <= volplane_runtime::text::ANNOTATION_VALUE_MAX_BYTES && m.ends_with(volplane_runtime::text::CUT_MARKER)),
        "{recorded:?}"
    );
    h.stop().await;
    let patches = h.double.count(Verb::Patch, "persistentvolumes");

    h.start(list_mode(100, 0), None, Leadership::unconditional()).await;
    h.wait_for_sweeps(3).await;
    assert_eq!(h.count_events(REASON_ABNORMAL).await, 1, "{:#?}", h.events().await);
    assert_eq!(
        h.double.count(Verb::Patch, "persistentvolumes"),
        patches,
        "an annotation that matches is not written again"
    );
    h.stop().await;
}

#[tokio::test]
async fn across_an_api_server_gap_a_deleted_pv_is_forgotten_and_a_new_condition_announced_once() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    h.driver.put_volume("h-pv-keep", healthy());
    // The volume that goes during the gap is abnormal before it: announced
    // once, with its gauge set.
    h.driver.put_volume("h-pv-gone", sick("worn out"));
    h.bound_pv("pv-keep", DRIVER, "claim-keep").await;
    h.bound_pv("pv-gone", DRIVER, "claim-gone").await;
    h.start(list_mode(100, 0), None, Leadership::unconditional()).await;
    h.wait_for_events("the worn-out volume", REASON_ABNORMAL, 1).await;
    let gone_gauge = "persistentvolumeclaim=\"claim-gone\"} 1";
    eventually(Duration::from_secs(10), "its gauge is set", || {
        h.metrics_text().contains(gone_gauge)
    })
    .await;

    // volplane's API server goes away; through the other one the claim
    // and PV of one volume are deleted (and the driver's volume with
    // them), and the other volume turns abnormal.
    h.double.cut_off();
    let side = h.double.side_client();
    Api::<PersistentVolumeClaim>::namespaced(side.clone(), NS)
        .delete("claim-gone", &DeleteParams::default())
        .await
        .expect("delete claim");
    Api::<PersistentVolume>::all(side)
        .delete("pv-gone", &DeleteParams::default())
        .await
        .expect("delete pv");
    h.driver.remove_volume("h-pv-gone");
    h.driver.put_volume("h-pv-keep", sick("disk failed"));

    h.double.reconnect();
    let reconnected = std::time::Instant::now();
    h.wait_for_events("the abnormal volume", REASON_ABNORMAL, 2).await;
    eventually(Duration::from_secs(30), "the deleted volume's gauge goes", || {
        !h.metrics_text().contains(gone_gauge)
    })
    .await;
    h.wait_for_sweeps(5).await;
    let events = h.events().await;
    let abnormal: Vec<&str> = (events.iter())
        .filter(|(reason, _, _)| reason == REASON_ABNORMAL)
        .map(|(_, claim, _)| claim.as_str())
        .collect();
    // One each: the deleted volume's from before the gap, none after it.
    assert_eq!(abnormal.len(), 2, "{events:#?}");
    assert!(
        abnormal.contains(&"claim-keep") && abnormal.contains(&"claim-gone"),
        "{events:#?}"
    );
    assert!(!h.metrics_text().contains(gone_gauge), "{}", h.metrics_text());
    let writes_to_gone = h
        .double
        .requests()
        .into_iter()
        .filter(|r| r.at > reconnected && r.name.as_deref() == Some("pv-gone") && r.verb == Verb::Patch)
        .count();
    assert_eq!(writes_to_gone, 0, "the deleted PV is written to");
    h.stop().await;
}

#[tokio::test]
async fn a_volume_bound_during_a_sweep_is_judged_by_the_next_one() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    h.driver.put_volume("h-pv-0", healthy());
    h.bound_pv("pv-0", DRIVER, "claim-0").await;
    h.driver.set_delay(CsiMethod::ListVolumes, Duration::from_millis(300));
    h.start(list_mode(1000, 0), None, Leadership::unconditional()).await;
    h.wait_for_sweeps(1).await;
    // A sweep is in flight (300 ms per page) when the PV appears; its
    // volume is not in that listing (nor in any later one).
    let listed = h.driver.count(CsiMethod::ListVolumes);
    eventually(Duration::from_secs(10), "the next sweep starts", || {
        h.driver.count(CsiMethod::ListVolumes) > listed
    })
    .await;
    h.bound_pv("pv-late", DRIVER, "claim-late").await;
    h.wait_for_sweeps(1).await;
    assert_eq!(
        h.checks("missing"),
        0,
        "the sweep that began before the volume was bound judged it: {}",
        h.metrics_text()
    );
    assert!(h.events().await.is_empty());
    // The next sweep began after: missing, reported once.
    h.wait_for_events("missing after a whole sweep", REASON_ABNORMAL, 1)
        .await;
    let events = h.events().await;
    assert_eq!(events[0].1, "claim-late");
    h.stop().await;
}

#[tokio::test]
async fn stale_tokens_restart_the_sweep_and_errors_keep_conditions() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    for i in 0..30 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
    }
    h.driver.put_volume("h-pv-0", sick("bad"));
    h.bound_pv("pv-0", DRIVER, "claim-0").await;
    // The first sweep fails on its second page (ABORTED: restart), the
    // next one times out: no false "missing" in either case.
    h.driver
        .fail_next(CsiMethod::ListVolumes, 1, tonic::Code::Aborted, "token expired");
    h.start(list_mode(100, 10), None, Leadership::unconditional()).await;
    h.wait_for_events("abnormal after a restarted sweep", REASON_ABNORMAL, 1)
        .await;
    h.driver.set_delay(CsiMethod::ListVolumes, Duration::from_millis(700));
    eventually(Duration::from_secs(10), "a failed sweep is counted", || {
        h.checks("error") >= 1
    })
    .await;
    h.driver.set_delay(CsiMethod::ListVolumes, Duration::ZERO);
    h.wait_for_sweeps(2).await;
    let events = h.events().await;
    assert_eq!(events.len(), 1, "nothing announced from failed sweeps: {events:#?}");
    h.stop().await;
}

#[tokio::test]
async fn an_unimplemented_list_falls_back_to_get_volume_and_is_not_called_again() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::GetVolume,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    h.driver.put_volume("h-pv-0", sick("bad"));
    h.bound_pv("pv-0", DRIVER, "claim-0").await;
    h.driver
        .fail_next(CsiMethod::ListVolumes, 100, tonic::Code::Unimplemented, "no");
    h.fallback = Some(Source::GetVolume {
        interval: Duration::from_millis(50),
        workers: 2,
    });
    h.start(list_mode(50, 0), None, Leadership::unconditional()).await;
    h.wait_for_events("abnormal through the fallback", REASON_ABNORMAL, 1)
        .await;
    // Ten fallback checks take at least ten list intervals: ListVolumes
    // was asked once only.
    eventually(Duration::from_secs(10), "ten fallback checks", || {
        h.driver.count(CsiMethod::ControllerGetVolume) >= 10
    })
    .await;
    assert_eq!(h.driver.count(CsiMethod::ListVolumes), 1);
    let text = h.metrics_text();
    assert!(
        text.contains("volplane_health_source{source=\"get_volume\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("volplane_health_checks_total{result=\"unimplemented\"} 1"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_unimplemented_driver_stops_checks_and_the_controller_stays_up() {
    let mut h = Harness::new(vec![
        ControllerCapability::GetVolume,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    for i in 0..3 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
        h.bound_pv(&format!("pv-{i}"), DRIVER, &format!("claim-{i}")).await;
    }
    // pv-0 was announced abnormal by an earlier run (its annotation).
    Api::<PersistentVolume>::all(h.client.clone())
        .patch(
            "pv-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ABNORMAL_ANNOTATION: "old"}}})),
        )
        .await
        .expect("annotate");
    h.driver
        .fail_next(CsiMethod::ControllerGetVolume, 100, tonic::Code::Unimplemented, "no");
    h.start(
        Source::GetVolume {
            interval: Duration::from_millis(50),
            workers: 1,
        },
        None,
        Leadership::unconditional(),
    )
    .await;
    eventually(Duration::from_secs(10), "checks stopped", || {
        h.metrics_text().contains("volplane_health_source{source=\"none\"} 1")
    })
    .await;
    // Still serving: a volume that is released leaves the gauge.
    assert!(h.metrics_text().contains("persistentvolumeclaim=\"claim-0\"} 1"));
    h.set_phase("pv-0", "Released").await;
    eventually(Duration::from_secs(10), "the released volume is forgotten", || {
        !h.metrics_text().contains("persistentvolumeclaim=\"claim-0\"")
    })
    .await;
    // One worker: the first call failed and no other followed.
    assert_eq!(h.driver.count(CsiMethod::ControllerGetVolume), 1);
    assert!(h.events().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn get_volume_checks_each_bound_volume_once_per_interval() {
    let mut h = Harness::new(vec![
        ControllerCapability::GetVolume,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    for i in 0..20 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
        h.bound_pv(&format!("pv-{i}"), DRIVER, &format!("claim-{i}")).await;
    }
    h.driver.put_volume("h-pv-3", sick("slow disk"));
    let interval = Duration::from_millis(400);
    h.start(
        Source::GetVolume { interval, workers: 4 },
        None,
        Leadership::unconditional(),
    )
    .await;
    h.wait_for_events("abnormal", REASON_ABNORMAL, 1).await;
    // Missing: NotFound from ControllerGetVolume.
    assert!(h.driver.remove_volume("h-pv-5"));
    h.wait_for_events("missing", REASON_ABNORMAL, 2).await;
    let events = h.events().await;
    assert!(
        events
            .iter()
            .any(|(_, claim, note)| claim == "claim-5" && note.contains("NotFound")),
        "{events:#?}"
    );

    // An unbound volume is not checked; bound again, it is.
    h.set_phase("pv-7", "Released").await;
    let calls_for = |h: &Harness, handle: &str| {
        h.driver
            .calls()
            .into_iter()
            .filter(|c| matches!(c, volplane_tests::driver::Call::ControllerGetVolume(r) if r.volume_id == handle))
            .count()
    };
    let before = h.driver.count(CsiMethod::ControllerGetVolume);
    eventually(Duration::from_secs(10), "three more intervals", || {
        h.driver.count(CsiMethod::ControllerGetVolume) >= before + 3 * 19
    })
    .await;
    let released = calls_for(&h, "h-pv-7");
    h.set_phase("pv-7", "Bound").await;
    eventually(Duration::from_secs(10), "checked again once bound", || {
        calls_for(&h, "h-pv-7") > released
    })
    .await;

    // Timing: calls to one volume are at least an interval apart.
    let timed: Vec<std::time::Instant> = h
        .driver
        .timed_calls()
        .into_iter()
        .filter(|(c, _)| matches!(c, volplane_tests::driver::Call::ControllerGetVolume(r) if r.volume_id == "h-pv-1"))
        .map(|(_, at)| at)
        .collect();
    assert!(timed.len() >= 3, "{timed:?}");
    for pair in timed.windows(2) {
        assert!(
            pair[1] - pair[0] >= interval - Duration::from_millis(20),
            "checked twice within an interval: {timed:?}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn a_follower_calls_no_driver() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    h.driver.put_volume("h-pv-0", sick("bad"));
    h.bound_pv("pv-0", DRIVER, "claim-0").await;
    let (term, receiver) = tokio::sync::watch::channel(volplane_runtime::Term::Following);
    h.start(list_mode(50, 0), None, Leadership::new(receiver)).await;
    // Synced while following: no call. Then leading: the sweep starts.
    assert_eq!(h.driver.count(CsiMethod::ListVolumes), 0);
    term.send_replace(volplane_runtime::Term::Leading {
        number: 1,
        until: Some(std::time::SystemTime::now() + Duration::from_secs(600)),
    });
    h.wait_for_events("abnormal once leading", REASON_ABNORMAL, 1).await;
    h.stop().await;
}

async fn node(client: &kube::Client, name: &str, ready: &str, since_secs_ago: i64) {
    let at = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(since_secs_ago);
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).expect("node");
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await.expect("get").is_none() {
        nodes.create(&PostParams::default(), &node).await.expect("node");
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": ready,
                "lastTransitionTime": at.to_string()}]}})),
        )
        .await
        .expect("node status");
}

async fn pod_on(client: &kube::Client, name: &str, node: &str, claims: &[&str]) {
    Api::<Pod>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &objects::pod_using(name, NS, node, claims))
        .await
        .expect("pod");
}

#[tokio::test]
async fn a_node_not_ready_past_the_threshold_is_reported_on_its_volumes_only() {
    let mut h = Harness::new(vec![
        ControllerCapability::ListVolumes,
        ControllerCapability::VolumeCondition,
    ])
    .await;
    for i in 0..3 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
        h.bound_pv(&format!("pv-{i}"), DRIVER, &format!("claim-{i}")).await;
    }
    h.bound_pv("foreign", "other.csi.example", "foreign-claim").await;
    node(&h.client, "n1", "True", 3600).await;
    node(&h.client, "n2", "True", 3600).await;
    pod_on(&h.client, "web-1", "n1", &["claim-0", "foreign-claim"]).await;
    pod_on(&h.client, "web-2", "n1", &["claim-0", "claim-1"]).await;
    pod_on(&h.client, "db", "n2", &["claim-2"]).await;
    h.start(
        list_mode(60_000, 0),
        Some(Duration::from_millis(500)),
        Leadership::unconditional(),
    )
    .await;

    // n1 stops reporting; the threshold counts from the transition.
    node(&h.client, "n1", "Unknown", 0).await;
    h.wait_for_events("NodeFailed on n1's volumes", REASON_NODE_FAILED, 2)
        .await;
    let events = h.events().await;
    let mut failed: Vec<(&str, &str)> = events
        .iter()
        .filter(|(r, _, _)| r == REASON_NODE_FAILED)
        .map(|(_, claim, note)| (claim.as_str(), note.as_str()))
        .collect();
    failed.sort_unstable();
    assert_eq!(failed.len(), 2, "{events:#?}");
    assert_eq!(failed[0].0, "claim-0");
    assert!(
        failed[0].1.contains("apps/web-1, apps/web-2") && failed[0].1.contains("n1"),
        "{}",
        failed[0].1
    );
    assert_eq!(failed[1].0, "claim-1");
    // A pod that turns up there later: only its new volume is reported.
    h.driver.put_volume("h-pv-3", healthy());
    h.bound_pv("pv-3", DRIVER, "claim-3").await;
    pod_on(&h.client, "web-3", "n1", &["claim-1", "claim-3"]).await;
    h.wait_for_events("NodeFailed on the new volume", REASON_NODE_FAILED, 3)
        .await;
    let events = h.events().await;
    let failed: Vec<&str> = events
        .iter()
        .filter(|(r, _, _)| r == REASON_NODE_FAILED)
        .map(|(_, claim, _)| claim.as_str())
        .collect();
    assert_eq!(failed.iter().filter(|c| **c == "claim-1").count(), 1, "{events:#?}");
    assert_eq!(failed.iter().filter(|c| **c == "claim-3").count(), 1, "{events:#?}");

    // A restarted controller takes the announced failures from the PV
    // annotations: no second NodeFailed, and the recovery is still reported.
    eventually(Duration::from_secs(10), "the failures are recorded on the PVs", || {
        h.double.count(Verb::Patch, "persistentvolumes") >= 3
    })
    .await;
    h.stop().await;
    h.metrics.failed_nodes.set(-1);
    h.start(
        list_mode(60_000, 0),
        Some(Duration::from_millis(500)),
        Leadership::unconditional(),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the restarted controller knows n1 failed",
        || h.metrics_text().contains("volplane_health_failed_nodes 1"),
    )
    .await;

    // Back to Ready: one NodeRecovered per volume.
    node(&h.client, "n1", "True", 0).await;
    h.wait_for_events("NodeRecovered", REASON_NODE_RECOVERED, 3).await;
    assert_eq!(h.count_events(REASON_NODE_FAILED).await, 3);

    // A failed node that is deleted: no panic, no recovery event.
    node(&h.client, "n2", "False", 10).await;
    h.wait_for_events("NodeFailed on n2", REASON_NODE_FAILED, 4).await;
    assert!(h.metrics_text().contains("volplane_health_failed_nodes 1"));
    Api::<Node>::all(h.client.clone())
        .delete("n2", &DeleteParams::default())
        .await
        .expect("delete node");
    Api::<Pod>::namespaced(h.client.clone(), NS)
        .delete("db", &DeleteParams::default())
        .await
        .expect("delete pod");
    eventually(Duration::from_secs(10), "the deleted node is forgotten", || {
        h.metrics_text().contains("volplane_health_failed_nodes 0")
    })
    .await;
    // Back under the same name and Ready: nothing to recover.
    node(&h.client, "n2", "True", 0).await;
    node(&h.client, "n3", "False", 0).await;
    h.stop().await;
    // Everything dispatched has been written now: one of each per volume.
    let mut reported: Vec<(String, String)> = h
        .events()
        .await
        .into_iter()
        .filter(|(r, _, _)| r == REASON_NODE_FAILED || r == REASON_NODE_RECOVERED)
        .map(|(r, claim, _)| (r, claim))
        .collect();
    reported.sort_unstable();
    let expected: Vec<(String, String)> = [
        (REASON_NODE_FAILED, "claim-0"),
        (REASON_NODE_FAILED, "claim-1"),
        (REASON_NODE_FAILED, "claim-2"),
        (REASON_NODE_FAILED, "claim-3"),
        (REASON_NODE_RECOVERED, "claim-0"),
        (REASON_NODE_RECOVERED, "claim-1"),
        (REASON_NODE_RECOVERED, "claim-3"),
    ]
    .into_iter()
    .map(|(r, c)| (r.to_string(), c.to_string()))
    .collect();
    assert_eq!(reported, expected);
    // Recovered and deleted nodes leave no annotation behind.
    for pv in Api::<PersistentVolume>::all(h.client.clone())
        .list(&ListParams::default())
        .await
        .expect("pvs")
        .items
    {
        assert_eq!(
            volplane_health::model::announced_node_failure(&pv),
            None,
            "{:?}",
            pv.metadata.name
        );
    }
}

#[tokio::test]
async fn the_node_agent_reports_usage_and_warns_each_pod_once_per_change() {
    let h = Harness::new(vec![]).await;
    for i in 0..2 {
        h.driver.put_volume(&format!("h-pv-{i}"), healthy());
        h.bound_pv(&format!("pv-{i}"), DRIVER, &format!("claim-{i}")).await;
    }
    pod_on(&h.client, "a", "n1", &["claim-0"]).await;
    pod_on(&h.client, "b", "n1", &["claim-0", "claim-1"]).await;
    pod_on(&h.client, "elsewhere", "n2", &["claim-1"]).await;
    let running = start_node_agent(&h).await;
    eventually(Duration::from_secs(10), "usage metrics", || {
        let text = h.metrics_text();
        text.contains(
            "volplane_health_volume_bytes{namespace=\"apps\",persistentvolumeclaim=\"claim-0\",usage=\"used\"} 300",
        ) && text.contains(
            "volplane_health_volume_inodes{namespace=\"apps\",persistentvolumeclaim=\"claim-1\",usage=\"total\"} 100",
        )
    })
    .await;
    let paths: Vec<String> = h.driver.volume_stats_paths();
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with("/var/lib/kubelet/pods/") && p.ends_with("/mount")),
        "{paths:?}"
    );

    h.driver.put_volume("h-pv-0", sick("I/O errors"));
    h.wait_for_events("a warning on each pod using the volume", REASON_ABNORMAL, 2)
        .await;
    let before = h.driver.count(CsiMethod::NodeGetVolumeStats);
    eventually(Duration::from_secs(10), "more rounds", || {
        h.driver.count(CsiMethod::NodeGetVolumeStats) >= before + 6
    })
    .await;
    let events = h.events().await;
    let pods: Vec<&str> = events
        .iter()
        .filter(|(r, _, _)| r == REASON_ABNORMAL)
        .map(|(_, target, _)| target.as_str())
        .collect();
    assert_eq!(pods.len(), 2, "once per pod: {events:#?}");
    assert!(pods.contains(&"a") && pods.contains(&"b"), "{pods:?}");
    assert!(
        h.metrics_text()
            .contains("volplane_health_node_volume_abnormal{namespace=\"apps\",persistentvolumeclaim=\"claim-0\"} 1")
    );

    // The DaemonSet's pod is replaced (a rollout): the new agent remembers
    // what the pods' events say and announces nothing again...
    running.stop(Duration::from_secs(10)).await;
    let running = start_node_agent(&h).await;
    let before = h.driver.count(CsiMethod::NodeGetVolumeStats);
    eventually(Duration::from_secs(10), "rounds of the new agent", || {
        h.driver.count(CsiMethod::NodeGetVolumeStats) >= before + 6
    })
    .await;
    assert_eq!(h.count_events(REASON_ABNORMAL).await, 2, "{:#?}", h.events().await);
    // ...but a recovery while no agent ran, once per pod.
    running.stop(Duration::from_secs(10)).await;
    h.driver.put_volume("h-pv-0", healthy());
    let running = start_node_agent(&h).await;
    h.wait_for_events("a recovery on each pod", REASON_NORMAL, 2).await;
    let before = h.driver.count(CsiMethod::NodeGetVolumeStats);
    eventually(Duration::from_secs(10), "more rounds", || {
        h.driver.count(CsiMethod::NodeGetVolumeStats) >= before + 6
    })
    .await;
    assert_eq!(h.count_events(REASON_NORMAL).await, 2, "{:#?}", h.events().await);
    assert_eq!(h.count_events(REASON_ABNORMAL).await, 2, "{:#?}", h.events().await);
    running.stop(Duration::from_secs(10)).await;
}

/// A node agent for node n1, ready.
async fn start_node_agent(h: &Harness) -> Background<()> {
    let agent = NodeHealthAgent::new(
        h.client.clone(),
        h.driver.client(Duration::from_secs(2)),
        NodeHealthConfig {
            driver: DRIVER.into(),
            node: "n1".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
            interval: Duration::from_millis(100),
            workers: 4,
            conditions: true,
            instance: "n1".into(),
        },
        h.metrics.clone(),
    );
    let mut ready = agent.readiness();
    let running = Background::spawn(|shutdown| agent.run(shutdown));
    within(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("ready");
    running
}
