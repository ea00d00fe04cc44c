//! The ephemeral controller with a real kube::Client against the API-server double.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use volplane_ephemeral::{EphemeralConfig, EphemeralController, EphemeralMetrics};
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
    assert!(h.metrics_text().contains("reason=\"conflict\""));
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
