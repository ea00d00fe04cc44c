//! e2e: volplane under API Priority and Fairness on a real control plane.
//! The shipped FlowSchemas (`deploy/flowcontrol`) put volplane's bulk work on
//! its own priority level and its lease calls on `leader-election`; the test
//! squeezes that level to almost nothing and creates pods faster than the
//! claims can be written. Ignored unless `VOLPLANE_E2E_BIN_DIR` is set.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::flowcontrol::v1::PriorityLevelConfiguration;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{Running, metric_value};
use volplane_tests::e2e::{ControlPlane, bin_dir};
use volplane_tests::wait::eventually_some;

const NAMESPACE: &str = "volplane";

fn deploy(dir: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir)
        .to_string_lossy()
        .into_owned()
}

async fn create_pods(client: &kube::Client, prefix: &str, count: usize) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let creates = (0..count).map(|i| {
        let pods = pods.clone();
        async move {
            let pod = support::ephemeral_pod(&format!("{prefix}-{i}"));
            pods.create(&PostParams::default(), &pod).await.expect("create pod");
        }
    });
    futures::future::join_all(creates).await;
}

/// Waits until every pod has exactly its one claim, owned by it.
async fn wait_for_claims(client: &kube::Client, pods: usize, what: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let all = eventually_some(Duration::from_secs(180), what, || async {
        let items = claims.list(&ListParams::default()).await.ok()?.items;
        (items.len() >= pods).then_some(items)
    })
    .await;
    assert_eq!(all.len(), pods, "one claim per pod, none twice");
    for claim in all {
        let owners = claim.metadata.owner_references.unwrap_or_default();
        let name = claim.metadata.name.unwrap_or_default();
        assert_eq!(owners.len(), 1, "{name}");
        assert_eq!(format!("{}-data", owners[0].name), name);
    }
}

async fn set_shares(client: &kube::Client, shares: i32, limit_response: serde_json::Value) {
    Api::<PriorityLevelConfiguration>::all(client.clone())
        .patch(
            "volplane",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"limited": {
                "nominalConcurrencyShares": shares, "lendablePercent": 0, "borrowingLimitPercent": 0,
                "limitResponse": limit_response}}})),
        )
        .await
        .expect("patch the priority level");
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squeezed_by_flow_control_volplane_slows_down_loses_nothing_and_keeps_its_lease() {
    let plane = ControlPlane::start(&bin_dir()).await.expect("control plane starts");
    let client = plane.client();
    plane
        .kubectl_ok(&["apply", "-f", &deploy("namespace.yaml")])
        .expect("namespace");
    plane
        .kubectl_ok(&["apply", "-k", &deploy("ephemeral")])
        .expect("ephemeral RBAC");
    plane
        .kubectl_ok(&["apply", "-k", &deploy("flowcontrol")])
        .expect("the shipped FlowSchemas");
    // One share of the server, nothing borrowed, excess rejected with 429.
    set_shares(&client, 1, json!({"type": "Reject", "queuing": null})).await;
    let kubeconfig = plane
        .service_account_kubeconfig(NAMESPACE, "volplane-ephemeral")
        .await
        .expect("token");
    let mut volplane = Running::start(
        &kubeconfig,
        &[
            "--controllers=ephemeral",
            "--namespace",
            NAMESPACE,
            "--pod-name",
            "volplane-squeezed",
            "--http-endpoint",
            "127.0.0.1:0",
            "--leader-election-lease-duration",
            "4s",
            "--leader-election-renew-deadline",
            "3s",
            "--leader-election-retry-period",
            "1s",
        ],
    );
    let admin = volplane.admin_address().await;
    let decision = volplane.wait_for("API Priority and Fairness").await;
    assert!(decision.contains("no client-side rate limit"), "{decision}");
    volplane.wait_for("started leading").await;
    assert_eq!(metric_value(admin, "volplane_api_flow_control", &[]), 1.0);
    assert_eq!(metric_value(admin, "volplane_api_client_qps", &[]), 0.0);

    create_pods(&client, "squeezed", 300).await;
    wait_for_claims(&client, 300, "every claim, through the squeeze").await;
    let throttled = metric_value(
        admin,
        "volplane_api_retries_total",
        &[("verb", "POST"), ("code", "429")],
    );
    assert!(throttled > 0.0, "the priority level was not tight enough to throttle");
    let lease = [("lease", "volplane-ephemeral")];
    assert_eq!(
        metric_value(admin, "volplane_leader_election_transitions_total", &lease),
        1.0,
        "the leader lost its lease while throttled"
    );
    assert_eq!(metric_value(admin, "volplane_ephemeral_claim_failures_total", &[]), 0.0);

    // The limit is lifted: the next pods are served without waiting.
    set_shares(
        &client,
        30,
        json!({"type": "Queue", "queuing": {"queues": 64, "handSize": 6, "queueLengthLimit": 50}}),
    )
    .await;
    create_pods(&client, "lifted", 100).await;
    wait_for_claims(&client, 400, "every claim once the limit is lifted").await;
    assert_eq!(
        metric_value(admin, "volplane_leader_election_transitions_total", &lease),
        1.0
    );
    let warnings: Vec<_> = volplane_tests::events::occurrences(&client, "default")
        .await
        .expect("events")
        .into_iter()
        .filter(|(reason, _, _)| reason.starts_with("EphemeralClaim"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    eprintln!("throttled creates retried: {throttled}");
    let (code, lines) = volplane.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
}
