//! The ephemeral controller with a real kube::Client against the API-server double.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use volplane_ephemeral::{EphemeralConfig, EphemeralController, EphemeralMetrics, ReleaseMode};
use volplane_runtime::{Backoff, Leadership, Term};
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::background::Background;
use volplane_tests::wait::{eventually, within};

struct Harness {
    double: ApiServerDouble,
    client: kube::Client,
    registry: Registry,
    metrics: Arc<EphemeralMetrics>,
    leadership: Leadership,
    release: ReleaseMode,
    release_delay: Duration,
    create_delay: Duration,
    running: Option<Background<Result<(), volplane_ephemeral::Error>>>,
}

impl Harness {
    async fn new() -> Self {
        let double = ApiServerDouble::start().await.expect("double");
        double.enable_garbage_collection(true);
        let client = double.client();
        let mut registry = Registry::with_prefix("volplane");
        let metrics = Arc::new(EphemeralMetrics::register(&mut registry));
        Self {
            double,
            client,
            registry,
            metrics,
            leadership: Leadership::unconditional(),
            release: ReleaseMode::default(),
            release_delay: Duration::from_secs(1),
            create_delay: Duration::ZERO,
            running: None,
        }
    }

    /// Hands leadership to the test: following until the test says otherwise.
    fn elect_by_hand(&mut self) -> tokio::sync::watch::Sender<Term> {
        let (term, receiver) = tokio::sync::watch::channel(Term::Following);
        self.leadership = Leadership::new(receiver);
        term
    }

    async fn start(&mut self, retry_base: Duration) {
        let controller = EphemeralController::new(
            self.client.clone(),
            EphemeralConfig {
                workers: 8,
                instance: "test".into(),
                backoff: Backoff {
                    base: retry_base,
                    max: Duration::from_secs(300),
                },
                release: self.release,
                release_delay: self.release_delay,
                create_delay: self.create_delay,
            },
            self.metrics.clone(),
            self.leadership.clone(),
        );
        let mut ready = controller.readiness();
        self.running = Some(Background::spawn(|shutdown| controller.run(shutdown)));
        within(Duration::from_secs(20), ready.wait_for(|r| *r))
            .await
            .expect("readiness");
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(20)).await.expect("result");
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "default")
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), "default")
    }

    async fn create_pod(&self, name: &str, volumes: &[&str]) -> Pod {
        let volumes: Vec<serde_json::Value> = volumes
            .iter()
            .map(|v| {
                json!({"name": v, "ephemeral": {"volumeClaimTemplate": {
                    "metadata": {"labels": {"volume": v}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                             "resources": {"requests": {"storage": "4Gi"}}}}}})
            })
            .collect();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "i"}], "volumes": volumes}}))
        .expect("pod");
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    async fn claim_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .claims()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        names.sort();
        names
    }

    async fn wait_for_claims(&self, what: &str, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.claim_names().await;
            if got == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {got:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn warnings(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), "default")
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .collect()
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text
    }
}

fn leading(number: u64) -> Term {
    Term::Leading {
        number,
        until: Some(std::time::SystemTime::now() + Duration::from_secs(600)),
    }
}

#[tokio::test]
async fn only_a_leader_creates_claims_and_a_new_leader_catches_up_on_skipped_pods() {
    let mut h = Harness::new().await;
    let term = h.elect_by_hand();
    h.start(Duration::from_millis(50)).await;
    let skipped = |h: &Harness| -> u64 {
        h.metrics_text()
            .lines()
            .find(|l| l.starts_with("volplane_ephemeral_reconciles_total{outcome=\"not_leading\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    h.create_pod("early", &["data"]).await;
    eventually(Duration::from_secs(5), "the follower looked at the pod", || {
        skipped(&h) >= 1
    })
    .await;
    assert!(h.claim_names().await.is_empty(), "a follower creates nothing");

    term.send_replace(leading(1));
    h.wait_for_claims("the leader catches up", &["early-data"]).await;

    term.send_replace(Term::Following);
    let lost_at = std::time::Instant::now();
    let before = skipped(&h);
    h.create_pod("while-following", &["data"]).await;
    eventually(Duration::from_secs(5), "the follower skipped the new pod", || {
        skipped(&h) > before
    })
    .await;
    let creates_since = |h: &Harness| {
        h.double
            .requests()
            .into_iter()
            .filter(|r| r.resource == "persistentvolumeclaims" && r.verb == Verb::Create && r.at > lost_at)
            .count()
    };
    assert_eq!(creates_since(&h), 0, "no create after the lease was lost");

    term.send_replace(leading(2));
    h.wait_for_claims(
        "the next term handles the skipped pod",
        &["early-data", "while-following-data"],
    )
    .await;
    assert_eq!(creates_since(&h), 1, "exactly one create for the skipped pod");
    h.stop().await;
}

#[tokio::test]
async fn a_pod_with_three_ephemeral_volumes_gets_three_correct_claims() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(100)).await;
    let pod = h.create_pod("web", &["a", "b", "c"]).await;
    h.wait_for_claims("three claims", &["web-a", "web-b", "web-c"]).await;
    for claim in h.claims().list(&ListParams::default()).await.expect("list").items {
        let owners = claim.metadata.owner_references.clone().expect("owner");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Pod");
        assert_eq!(owners[0].name, "web");
        assert_eq!(Some(&owners[0].uid), pod.metadata.uid.as_ref());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        let volume = claim
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix("web-"))
            .expect("name");
        assert_eq!(
            claim
                .metadata
                .labels
                .unwrap_or_default()
                .get("volume")
                .map(String::as_str),
            Some(volume)
        );
        assert_eq!(claim.spec.and_then(|s| s.storage_class_name).as_deref(), Some("fast"));
    }
    assert!(h.warnings().await.is_empty());
    assert!(h.metrics_text().contains("volplane_ephemeral_claims_created_total 3"));
    h.stop().await;
}

#[tokio::test]
async fn a_foreign_claim_is_reported_never_touched_and_replaced_once_deleted() {
    let mut h = Harness::new().await;
    let foreign: PersistentVolumeClaim =
        serde_json::from_value(json!({"metadata": {"name": "db-data", "labels": {"owner": "someone"}}})).expect("pvc");
    h.claims()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign");
    // A long retry delay: only the PVC watch can make the controller act in time.
    h.start(Duration::from_secs(60)).await;
    h.create_pod("db", &["data", "logs"]).await;

    // The other volume is handled although one fails.
    h.wait_for_claims("logs created, data conflicting", &["db-data", "db-logs"])
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let warning = loop {
        if let Some(w) = h.warnings().await.into_iter().next() {
            break w;
        }
        assert!(tokio::time::Instant::now() < deadline, "no warning event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(warning.reason.as_deref(), Some("EphemeralClaimConflict"));
    assert_eq!(warning.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("db"));
    assert!(
        warning.note.as_deref().unwrap_or_default().contains("db-data"),
        "{warning:?}"
    );
    assert!(
        by_reason(&h.metrics_text(), "volplane_ephemeral_claim_failures_total", "conflict") >= 1,
        "the conflict is counted"
    );
    let untouched = h.claims().get("db-data").await.expect("foreign");
    assert_eq!(
        untouched
            .metadata
            .labels
            .unwrap_or_default()
            .get("owner")
            .map(String::as_str),
        Some("someone")
    );
    assert!(untouched.metadata.owner_references.is_none());
    assert_eq!(h.double.count(Verb::Update, "persistentvolumeclaims"), 0);
    assert_eq!(h.double.count(Verb::Patch, "persistentvolumeclaims"), 0);

    h.claims()
        .delete("db-data", &DeleteParams::default())
        .await
        .expect("delete foreign");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(claim) = h.claims().get("db-data").await
            && claim
                .metadata
                .owner_references
                .is_some_and(|o| o.iter().any(|r| r.name == "db"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not re-created after the foreign claim went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn an_existing_claim_owned_by_the_pod_is_success_without_a_write_or_event() {
    let mut h = Harness::new().await;
    let pod = h.create_pod("app", &["v"]).await;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "app-v",
        "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "app", "uid": pod.metadata.uid,
                             "controller": true, "blockOwnerDeletion": true}]}}))
    .expect("pvc");
    h.claims().create(&PostParams::default(), &claim).await.expect("claim");
    h.double.clear_requests();
    h.start(Duration::from_millis(100)).await;
    // A second pod proves the controller is working meanwhile.
    h.create_pod("other", &["v"]).await;
    h.wait_for_claims("other's claim", &["app-v", "other-v"]).await;
    assert_eq!(
        h.double.count(Verb::Create, "persistentvolumeclaims"),
        1,
        "only other-v"
    );
    assert!(h.warnings().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn forbidden_and_invalid_creates_are_counted_by_reason_and_retried() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(50)).await;
    h.double
        .fail_next(Some(Verb::Create), Some("persistentvolumeclaims"), 1, 403);
    h.double
        .fail_next(Some(Verb::Create), Some("persistentvolumeclaims"), 1, 422);
    h.create_pod("quota", &["v"]).await;
    h.wait_for_claims("created after retries", &["quota-v"]).await;
    let text = h.metrics_text();
    assert!(
        text.contains("volplane_ephemeral_claim_failures_total{reason=\"forbidden\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("volplane_ephemeral_claim_failures_total{reason=\"invalid\"} 1"),
        "{text}"
    );
    let reasons: Vec<String> = h.warnings().await.into_iter().filter_map(|e| e.reason).collect();
    assert!(
        reasons.iter().all(|r| r == "EphemeralClaimFailed") && !reasons.is_empty(),
        "{reasons:?}"
    );
    h.stop().await;
}

/// `volplane_ephemeral_claims_failing{reason}` in `text`.
fn failing(text: &str, reason: &str) -> i64 {
    by_reason(text, "volplane_ephemeral_claims_failing", reason)
}

/// The sample `family{reason}` in `text`; its series exist from the start.
fn by_reason(text: &str, family: &str, reason: &str) -> i64 {
    let prefix = format!("{family}{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
}

#[tokio::test]
async fn pods_whose_claims_keep_failing_are_counted_until_they_pass_or_go() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(50)).await;
    assert_eq!(failing(&h.metrics_text(), "forbidden"), 0);
    // Every create refused (quota) until the test lets them through.
    h.double
        .fail_next(Some(Verb::Create), Some("persistentvolumeclaims"), 100_000, 403);
    h.create_pod("a", &["v"]).await;
    h.create_pod("b", &["v"]).await;
    eventually(Duration::from_secs(10), "two pods failing", || {
        failing(&h.metrics_text(), "forbidden") == 2
    })
    .await;
    // A pod that goes is no longer failing.
    h.pods().delete("b", &Default::default()).await.expect("delete b");
    eventually(Duration::from_secs(10), "one pod failing", || {
        failing(&h.metrics_text(), "forbidden") == 1
    })
    .await;
    // The quota is raised: the retry passes.
    h.double.clear_faults();
    h.wait_for_claims("a's claim after the retry", &["a-v"]).await;
    eventually(Duration::from_secs(10), "no pod failing", || {
        failing(&h.metrics_text(), "forbidden") == 0
    })
    .await;
    let text = h.metrics_text();
    for reason in ["conflict", "invalid", "other"] {
        assert_eq!(failing(&text, reason), 0, "{reason}");
    }
    h.stop().await;
}

#[tokio::test]
async fn dropped_watches_cause_no_duplicate_creates() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(100)).await;
    for i in 0..5 {
        h.create_pod(&format!("p{i}"), &["v"]).await;
    }
    h.wait_for_claims("five claims", &["p0-v", "p1-v", "p2-v", "p3-v", "p4-v"])
        .await;
    let creates = h.double.count(Verb::Create, "persistentvolumeclaims");
    let lists = h.double.count(Verb::List, "pods");
    h.double.force_relist();
    eventually(Duration::from_secs(20), "pods re-listed", || {
        h.double.count(Verb::List, "pods") > lists
    })
    .await;
    h.create_pod("after", &["v"]).await;
    h.wait_for_claims("six claims", &["after-v", "p0-v", "p1-v", "p2-v", "p3-v", "p4-v"])
        .await;
    assert_eq!(h.double.count(Verb::Create, "persistentvolumeclaims"), creates + 1);
    h.stop().await;
}

#[tokio::test]
async fn across_an_api_server_gap_no_claim_is_made_for_a_pod_deleted_meanwhile() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(100)).await;
    // More pods than one list page (kube's watcher asks for 500 a page).
    const PODS: usize = 1_200;
    let pod_api = h.pods();
    futures::stream::iter(0..PODS)
        .for_each_concurrent(32, |i| {
            let pod_api = pod_api.clone();
            async move {
                pod_api
                    .create(&PostParams::default(), &ephemeral_pod(&format!("p{i:04}")))
                    .await
                    .expect("create pod");
            }
        })
        .await;
    wait_until(Duration::from_secs(60), "every pod has its claim", || async {
        h.claim_names().await.len() == PODS
    })
    .await;

    // volplane's API server goes away; through the other one half the pods
    // are deleted (the garbage collector takes their claims) and new ones
    // arrive. Back, the pod re-list takes pages long after the claim
    // re-list ended.
    h.double.cut_off();
    let side: Api<Pod> = Api::namespaced(h.double.side_client(), "default");
    for i in (0..PODS).step_by(2) {
        side.delete(&format!("p{i:04}"), &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    for i in 0..20 {
        side.create(&PostParams::default(), &ephemeral_pod(&format!("new{i:02}")))
            .await
            .expect("create pod");
    }
    let creates = h.double.count(Verb::Create, "persistentvolumeclaims");
    h.double.set_list_latency("pods", Duration::from_millis(500));
    h.double.reconnect();

    let mut want: Vec<String> = (1..PODS).step_by(2).map(|i| format!("p{i:04}-v")).collect();
    want.extend((0..20).map(|i| format!("new{i:02}-v")));
    want.sort();
    wait_until(
        Duration::from_secs(30),
        "the remaining and the new pods have their claims",
        || async { h.claim_names().await == want },
    )
    .await;
    assert_eq!(
        h.double.count(Verb::Create, "persistentvolumeclaims") - creates,
        20,
        "claims were created for pods deleted during the gap"
    );
    h.stop().await;
}

fn ephemeral_pod(name: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "i"}],
                 "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}))
    .expect("pod")
}

#[tokio::test]
async fn finished_and_terminating_pods_get_no_claims_and_deleted_pods_take_theirs() {
    let mut h = Harness::new().await;
    // A pod that finished while the controller was down gets no claim.
    let done: Pod = serde_json::from_value(json!({"metadata": {"name": "done"},
        "spec": {"containers": [], "volumes": [{"name": "v", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}))
    .expect("pod");
    h.pods().create(&PostParams::default(), &done).await.expect("pod");
    h.pods()
        .patch_status(
            "done",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .expect("status");
    h.start(Duration::from_millis(100)).await;
    h.create_pod("live", &["v"]).await;
    h.wait_for_claims("live only", &["live-v"]).await;

    h.pods()
        .delete("live", &DeleteParams::default())
        .await
        .expect("delete pod");
    h.wait_for_claims("collected with the pod", &[]).await;
    h.stop().await;
}

#[tokio::test]
async fn a_claim_deleted_under_an_active_pod_is_created_again() {
    let mut h = Harness::new().await;
    // A long retry delay: only the claim watch can make the controller act in time.
    h.start(Duration::from_secs(60)).await;
    let pod = h.create_pod("app", &["v"]).await;
    h.wait_for_claims("the claim", &["app-v"]).await;
    h.claims()
        .delete("app-v", &DeleteParams::default())
        .await
        .expect("delete claim");
    eventually(Duration::from_secs(20), "created again", || {
        h.double.count(Verb::Create, "persistentvolumeclaims") == 2
    })
    .await;
    let again = h.claims().get("app-v").await.expect("claim");
    assert_eq!(
        again.metadata.owner_references.unwrap_or_default()[0].uid,
        pod.metadata.uid.unwrap_or_default()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_restart_with_every_claim_in_place_creates_nothing() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(100)).await;
    let names: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
    for name in &names {
        h.create_pod(name, &["v"]).await;
    }
    let claims: Vec<String> = names.iter().map(|n| format!("{n}-v")).collect();
    let claims: Vec<&str> = claims.iter().map(String::as_str).collect();
    h.wait_for_claims("twenty claims", &claims).await;
    h.stop().await;
    let creates = h.double.count(Verb::Create, "persistentvolumeclaims");

    h.start(Duration::from_millis(100)).await;
    h.create_pod("after", &["v"]).await;
    let mut all = claims.clone();
    all.insert(0, "after-v");
    h.wait_for_claims("the new pod's claim", &all).await;
    assert_eq!(
        h.double.count(Verb::Create, "persistentvolumeclaims"),
        creates + 1,
        "only the new pod's claim"
    );
    h.stop().await;
}

/// Waits until `check` resolves to true, failing after `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    volplane_tests::wait::eventually_some(limit, what, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await;
}

impl Harness {
    /// Writes `status` as the kubelet would, through the status subresource.
    async fn set_pod_status(&self, pod: &str, status: serde_json::Value) {
        self.pods()
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await
            .expect("pod status");
    }

    /// Adds PVC protection's finalizer, as its admission plugin does.
    async fn protect(&self, claim: &str) {
        self.claims()
            .patch(
                claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["kubernetes.io/pvc-protection"]}})),
            )
            .await
            .expect("finalizer");
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), "default")
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    fn metric(&self, line_start: &str) -> Option<f64> {
        self.metrics_text()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// A claim that is there, not being deleted, its finalizers intact.
    async fn assert_untouched(&self, claim: &str) {
        let claim = self.claims().get(claim).await.expect("still there");
        assert!(claim.metadata.deletion_timestamp.is_none(), "{claim:?}");
        assert_eq!(
            claim.metadata.finalizers.as_deref(),
            Some(&["kubernetes.io/pvc-protection".to_string()][..]),
            "{claim:?}"
        );
    }
}

/// The status the kubelet writes on an admission rejection.
fn rejected() -> serde_json::Value {
    json!({"phase": "Failed", "reason": "OutOfcpu",
           "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 64000, used: 0, capacity: 2000"})
}

fn succeeded() -> serde_json::Value {
    json!({"phase": "Succeeded", "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": {"exitCode": 0, "finishedAt": "2026-01-01T00:00:00Z"}}}]})
}

#[tokio::test]
async fn a_rejected_pods_claim_is_deleted_its_protection_lifted_and_announced() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(50)).await;
    h.create_pod("job", &["scratch"]).await;
    h.wait_for_claims("the claim", &["job-scratch"]).await;
    h.protect("job-scratch").await;
    h.set_pod_status("job", rejected()).await;
    h.wait_for_claims("released", &[]).await;
    let deletes: Vec<_> = h
        .double
        .requests()
        .into_iter()
        .filter(|r| r.resource == "persistentvolumeclaims" && r.verb == Verb::Delete)
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(
        h.double.count(Verb::Patch, "persistentvolumeclaims"),
        2,
        "the test's finalizer, then volplane lifting it"
    );
    let released = volplane_tests::wait::eventually_some(Duration::from_secs(10), "the event", || async {
        h.events("EphemeralVolumeReleased").await.into_iter().next()
    })
    .await;
    assert_eq!(released.type_.as_deref(), Some("Normal"));
    assert_eq!(released.regarding.and_then(|r| r.name).as_deref(), Some("job"));
    let note = released.note.unwrap_or_default();
    assert!(note.contains("job-scratch") && note.contains("OutOfcpu"), "{note}");
    assert_eq!(
        h.metric("volplane_ephemeral_released_total{reason=\"rejected\"}"),
        Some(1.0)
    );
    assert!(h.warnings().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn each_mode_releases_what_it_says_and_nothing_else() {
    let mut h = Harness::new().await;
    for release in [ReleaseMode::Never, ReleaseMode::Rejected, ReleaseMode::Terminated] {
        h.release = release;
        h.start(Duration::from_millis(50)).await;
        let tag = format!("{release:?}").to_lowercase();
        let (done, failed) = (format!("done-{tag}"), format!("failed-{tag}"));
        h.create_pod(&done, &["v"]).await;
        h.create_pod(&failed, &["v"]).await;
        let (done_claim, failed_claim) = (format!("{done}-v"), format!("{failed}-v"));
        for claim in [&done_claim, &failed_claim] {
            wait_until(Duration::from_secs(20), "the claim", || async {
                h.claims().get_opt(claim).await.ok().flatten().is_some()
            })
            .await;
            h.protect(claim).await;
        }
        h.set_pod_status(&done, succeeded()).await;
        h.set_pod_status(&failed, rejected()).await;
        // A pod created afterwards proves the loop has seen both statuses.
        let probe = format!("probe-{tag}");
        h.create_pod(&probe, &["v"]).await;
        let probe_claim = format!("{probe}-v");
        wait_until(Duration::from_secs(20), "the probe's claim", || async {
            h.claims().get_opt(&probe_claim).await.ok().flatten().is_some()
        })
        .await;
        let gone = |claim: String| {
            let claims = h.claims();
            async move { claims.get_opt(&claim).await.ok().flatten().is_none() }
        };
        match release {
            ReleaseMode::Never => {
                h.assert_untouched(&done_claim).await;
                h.assert_untouched(&failed_claim).await;
            }
            ReleaseMode::Rejected => {
                wait_until(Duration::from_secs(20), "the rejected pod's claim released", || {
                    gone(failed_claim.clone())
                })
                .await;
                h.assert_untouched(&done_claim).await;
            }
            ReleaseMode::Terminated => {
                // The container finished long ago: the 1 s delay has passed.
                wait_until(Duration::from_secs(20), "both released", || async {
                    gone(failed_claim.clone()).await && gone(done_claim.clone()).await
                })
                .await;
                // The Succeeded pods of every round so far: the claims the
                // earlier modes kept go now.
                for earlier in ["done-never-v", "done-rejected-v"] {
                    wait_until(
                        Duration::from_secs(20),
                        "earlier rounds' Succeeded pods released",
                        || gone(earlier.to_string()),
                    )
                    .await;
                }
                assert_eq!(
                    h.metric("volplane_ephemeral_released_total{reason=\"terminated\"}"),
                    Some(3.0)
                );
            }
        }
        h.stop().await;
    }
}

#[tokio::test]
async fn claims_that_are_not_the_finished_pods_own_are_never_touched() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(50)).await;
    // A finished pod whose claim name is taken by another pod's claim (the
    // same name, another UID: a live pod's, or garbage collection takes it),
    // and one whose claim name is taken by a PVC nobody owns.
    let keeper = h.create_pod("keeper", &[]).await;
    let other_uid = keeper.metadata.uid.clone().expect("uid");
    for (pod, owner) in [("reused", Some(other_uid.as_str())), ("unowned", None)] {
        let owners = owner
            .map(|uid| json!([{"apiVersion": "v1", "kind": "Pod", "name": "keeper", "uid": uid, "controller": true}]));
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": format!("{pod}-v"),
            "finalizers": ["kubernetes.io/pvc-protection"], "ownerReferences": owners}}))
        .expect("pvc");
        h.claims().create(&PostParams::default(), &claim).await.expect("claim");
        h.create_pod(pod, &["v"]).await;
        h.set_pod_status(pod, rejected()).await;
    }
    // A running pod's claim.
    h.create_pod("running", &["v"]).await;
    h.wait_for_claims("running's claim", &["reused-v", "running-v", "unowned-v"])
        .await;
    h.protect("running-v").await;
    h.set_pod_status("running", json!({"phase": "Running"})).await;
    // A rejected pod released afterwards proves the others were decided.
    h.create_pod("probe", &["v"]).await;
    h.wait_for_claims("the probe's claim", &["probe-v", "reused-v", "running-v", "unowned-v"])
        .await;
    h.set_pod_status("probe", rejected()).await;
    h.wait_for_claims("the probe released", &["reused-v", "running-v", "unowned-v"])
        .await;
    for claim in ["reused-v", "running-v", "unowned-v"] {
        h.assert_untouched(claim).await;
    }
    assert_eq!(
        h.double.count(Verb::Delete, "persistentvolumeclaims"),
        1,
        "the probe's only"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_claim_waits_while_its_node_lists_the_volume_in_use_and_goes_when_it_stops() {
    let mut h = Harness::new().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(h.client.clone());
    let in_use = "kubernetes.io/csi/attach.example.com^vol-1";
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({"metadata": {"name": "n1"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "volumesInUse": [in_use]}}))
    .expect("node");
    nodes.create(&PostParams::default(), &node).await.expect("node");
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "pv-1"},
        "spec": {"csi": {"driver": "attach.example.com", "volumeHandle": "vol-1"}}}))
    .expect("pv");
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(h.client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("pv");
    h.start(Duration::from_millis(50)).await;
    h.create_pod("db", &["data"]).await;
    h.pods()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n1"}})),
        )
        .await
        .expect("bound");
    h.wait_for_claims("the claim", &["db-data"]).await;
    h.protect("db-data").await;
    h.claims()
        .patch(
            "db-data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeName": "pv-1"}})),
        )
        .await
        .expect("bound claim");
    h.set_pod_status("db", rejected()).await;
    eventually(Duration::from_secs(20), "the claim waits for its node", || {
        h.metric("volplane_ephemeral_releases_waiting") == Some(1.0)
    })
    .await;
    h.assert_untouched("db-data").await;
    // Another volume of the node's changes nothing.
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"volumesInUse": [in_use, "kubernetes.io/csi/attach.example.com^vol-2"]}})),
        )
        .await
        .expect("node status");
    // Decided again (the PV read again), still waiting.
    let pv_reads = h.double.count(Verb::Get, "persistentvolumes");
    wait_until(Duration::from_secs(20), "decided again after the node changed", || {
        let more = h.double.count(Verb::Get, "persistentvolumes") > pv_reads;
        async move { more }
    })
    .await;
    h.create_pod("probe", &["v"]).await;
    h.wait_for_claims("the probe's claim", &["db-data", "probe-v"]).await;
    h.assert_untouched("db-data").await;
    // The kubelet is done with it.
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"volumesInUse": ["kubernetes.io/csi/attach.example.com^vol-2"]}})),
        )
        .await
        .expect("node status");
    h.wait_for_claims("released once the node stops listing it", &["probe-v"])
        .await;
    assert_eq!(h.metric("volplane_ephemeral_releases_waiting"), Some(0.0));
    h.stop().await;
}

#[tokio::test]
async fn a_claim_another_pod_mounts_by_name_waits_until_that_pod_has_finished() {
    let mut h = Harness::new().await;
    h.start(Duration::from_millis(50)).await;
    h.create_pod("producer", &["out"]).await;
    h.wait_for_claims("the claim", &["producer-out"]).await;
    h.protect("producer-out").await;
    // The next step of the workflow reads the result through the claim.
    let reader: Pod = serde_json::from_value(json!({"metadata": {"name": "reader"},
        "spec": {"containers": [{"name": "c", "image": "i"}],
                 "volumes": [{"name": "in", "persistentVolumeClaim": {"claimName": "producer-out"}}]}}))
    .expect("pod");
    h.pods().create(&PostParams::default(), &reader).await.expect("reader");
    h.set_pod_status("reader", json!({"phase": "Running"})).await;
    h.set_pod_status("producer", rejected()).await;
    wait_until(Duration::from_secs(20), "the claim waits for its reader", || {
        let waiting = h.metric("volplane_ephemeral_releases_waiting") == Some(1.0);
        async move { waiting }
    })
    .await;
    h.assert_untouched("producer-out").await;
    assert_eq!(h.double.count(Verb::Delete, "persistentvolumeclaims"), 0);
    // The reader finishes: the claim goes.
    h.set_pod_status("reader", succeeded()).await;
    h.wait_for_claims("released once nobody mounts it", &[]).await;
    assert_eq!(h.metric("volplane_ephemeral_releases_waiting"), Some(0.0));
    h.stop().await;
}

#[tokio::test]
async fn an_admitted_pods_claim_waits_the_delay_after_its_last_container_finished() {
    let mut h = Harness::new().await;
    h.release = ReleaseMode::Terminated;
    h.release_delay = Duration::from_secs(2);
    h.start(Duration::from_millis(50)).await;
    h.create_pod("batch", &["v"]).await;
    h.wait_for_claims("the claim", &["batch-v"]).await;
    h.protect("batch-v").await;
    let finished = k8s_openapi::jiff::Timestamp::now();
    let status = json!({"phase": "Succeeded", "containerStatuses": [{"name": "c", "image": "i", "imageID": "",
        "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "finishedAt": finished.to_string()}}}]});
    let written = std::time::Instant::now();
    h.set_pod_status("batch", status).await;
    h.wait_for_claims("released after the delay", &[]).await;
    // finishedAt has whole seconds: the release is due at most 1 s early.
    let after = written.elapsed();
    assert!(
        after >= Duration::from_secs(1),
        "released {after:?} after the pod finished"
    );
    h.stop().await;
}

#[tokio::test]
async fn with_a_create_delay_the_other_controller_goes_first_and_nothing_is_created_twice() {
    let mut h = Harness::new().await;
    h.create_delay = Duration::from_millis(500);
    h.start(Duration::from_millis(50)).await;
    // kube-controller-manager's controller creates this pod's claim at once.
    let pod = h.create_pod("first", &["v"]).await;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "first-v",
        "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "first", "uid": pod.metadata.uid,
                             "controller": true, "blockOwnerDeletion": true}]}}))
    .expect("pvc");
    h.claims().create(&PostParams::default(), &claim).await.expect("claim");
    // Nobody creates this one's: volplane does, after the delay.
    let created = std::time::Instant::now();
    h.create_pod("second", &["v"]).await;
    h.wait_for_claims("the second pod's claim", &["first-v", "second-v"])
        .await;
    let after = created.elapsed();
    assert!(after >= Duration::from_millis(500), "created {after:?} after the pod");
    assert_eq!(
        h.double.count(Verb::Create, "persistentvolumeclaims"),
        2,
        "the other controller's and volplane's one: no AlreadyExists race"
    );
    assert!(h.warnings().await.is_empty());
    h.stop().await;
}
