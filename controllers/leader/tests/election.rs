//! Two candidates for one Lease on the API-server double: exactly one
//! leads, a graceful stop hands over at once, a vanished leader is
//! replaced after expiry, failing renewals end the term.

use std::sync::Arc;
use std::time::Duration;

use volplane_leader::{ElectionConfig, ElectionMetrics, Elector};
use volplane_runtime::Leadership;
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::background::Background;
use volplane_tests::wait::eventually;

const LEASE: Duration = Duration::from_secs(3);

fn config(identity: &str) -> ElectionConfig {
    ElectionConfig {
        lease_name: "volplane-test".into(),
        namespace: "default".into(),
        identity: identity.into(),
        lease_duration: LEASE,
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_secs(1),
    }
}

fn candidate(double: &ApiServerDouble, identity: &str) -> (Leadership, Background<()>) {
    let elector = Elector::new(
        double.client(),
        double.client(),
        config(identity),
        Arc::new(ElectionMetrics::default()),
    );
    let leadership = elector.leadership();
    (leadership, Background::spawn(|shutdown| elector.run(shutdown)))
}

/// Which of the two leads, once exactly one does.
async fn single_leader(a: &Leadership, b: &Leadership, limit: Duration) -> bool {
    eventually(limit, "exactly one leader", || a.may_write() != b.may_write()).await;
    a.may_write()
}

#[tokio::test]
async fn exactly_one_candidate_leads_and_a_graceful_stop_hands_over_at_once() {
    let double = ApiServerDouble::start().await.expect("double");
    let (a, run_a) = candidate(&double, "a");
    let (b, run_b) = candidate(&double, "b");
    let a_leads = single_leader(&a, &b, LEASE * 2).await;
    // It stays that way over several renewals.
    for _ in 0..30 {
        assert!(!(a.may_write() && b.may_write()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.may_write(), a_leads);

    let (mut leader, leader_run, follower, follower_run) = if a_leads {
        (a, run_a, b, run_b)
    } else {
        (b, run_b, a, run_a)
    };
    let stopped = tokio::time::Instant::now();
    leader_run.stop(Duration::from_secs(5)).await;
    volplane_tests::wait::within(Duration::from_secs(1), leader.lost()).await;
    eventually(LEASE, "the follower takes the released lease", || follower.may_write()).await;
    assert!(
        stopped.elapsed() < LEASE,
        "handover after a release took {:?}, as long as an expiry",
        stopped.elapsed()
    );
    follower_run.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_vanished_leader_is_replaced_after_its_lease_expires() {
    let double = ApiServerDouble::start().await.expect("double");
    let (a, run_a) = candidate(&double, "a");
    eventually(LEASE * 2, "a leads alone", || a.may_write()).await;
    let (b, run_b) = candidate(&double, "b");
    // A crash: the task is gone without releasing anything.
    drop(run_a);
    let mut a_view = a.clone();
    volplane_tests::wait::within(LEASE * 2, a_view.lost()).await;
    eventually(LEASE * 3, "b takes over after expiry", || b.may_write()).await;
    run_b.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn failing_renewals_end_the_term_before_anyone_else_may_take_over() {
    let double = ApiServerDouble::start().await.expect("double");
    let (a, run_a) = candidate(&double, "a");
    eventually(LEASE * 2, "a leads", || a.may_write()).await;
    // Every lease request fails from now on.
    double.fail_next(None, Some("leases"), 1_000, 500);
    let failing_since = tokio::time::Instant::now();
    let mut a_view = a.clone();
    volplane_tests::wait::within(LEASE * 2, a_view.lost()).await;
    assert!(
        failing_since.elapsed() < LEASE,
        "a leader whose renewals fail must stop before its lease can expire (took {:?})",
        failing_since.elapsed()
    );
    double.clear_faults();
    eventually(LEASE * 3, "a leads again once requests work", || a.may_write()).await;
    assert!(double.count(Verb::Patch, "leases") > 0);
    run_a.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_term_lasts_while_renewals_succeed_with_the_lease_watch_broken() {
    let double = ApiServerDouble::start().await.expect("double");
    // Renewals go through the side door; the watch through the main one,
    // which goes away.
    let elector = Elector::new(
        double.side_client(),
        double.client(),
        config("a"),
        Arc::new(ElectionMetrics::default()),
    );
    let leadership = elector.leadership();
    let run = Background::spawn(|shutdown| elector.run(shutdown));
    eventually(LEASE * 2, "a leads", || leadership.may_write()).await;
    double.cut_off();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(double.side_client(), "default");
    let renew_time = || async {
        leases
            .get("volplane-test")
            .await
            .ok()
            .and_then(|lease| lease.spec?.renew_time)
            .map(|t| t.0)
    };
    let start = renew_time().await.expect("renewed");
    // Three renew deadlines of renewals (one a second) with the watch away:
    // the term never ends, not even for a moment.
    let mut watching = leadership.clone();
    let ended = tokio::spawn(async move { watching.lost().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let renewed = renew_time().await.expect("renewed");
        if renewed.duration_since(start).as_secs() >= 6 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "renewals stopped");
        assert!(!ended.is_finished(), "the term ended while renewals succeed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!ended.is_finished(), "the term ended while renewals succeed");
    assert!(leadership.may_write());
    ended.abort();
    double.reconnect();
    run.stop(Duration::from_secs(5)).await;
}
