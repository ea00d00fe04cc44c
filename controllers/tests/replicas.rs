//! Two volplane replicas against the API-server double: one writer, a
//! handover when the holder pauses, dies or is told to stop, and no write
//! from a deposed holder.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::{Running, http_get};
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::wait::{eventually, eventually_some};

const LEASE: &str = "volplane-ephemeral";

struct Cluster {
    api: ApiServerDouble,
    client: kube::Client,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl Cluster {
    async fn start() -> Self {
        let api = ApiServerDouble::start().await.expect("double");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
        Self {
            client: api.client(),
            api,
            _dir: dir,
            kubeconfig,
        }
    }

    fn replica(&self, name: &str, timing: &[&str]) -> Running {
        let mut args = vec![
            "--controllers",
            "ephemeral",
            "--pod-name",
            name,
            "--http-endpoint",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(timing);
        Running::start(&self.kubeconfig, &args)
    }

    /// The current holder's identity, once there is one.
    async fn holder(&self, limit: Duration) -> String {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "default");
        eventually_some(limit, "a lease holder", || {
            let leases = leases.clone();
            async move { support::lease_holder(&leases, LEASE).await }
        })
        .await
    }

    async fn create_pods(&self, prefix: &str, count: usize) -> Vec<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let mut claims = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "busybox"}],
                         "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {
                             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}
            }))
            .expect("pod");
            pods.create(&PostParams::default(), &pod).await.expect("create pod");
            claims.push(format!("{name}-data"));
        }
        claims
    }

    async fn claims(&self) -> Vec<String> {
        let mut names: Vec<String> = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|l| l.items.into_iter().filter_map(|c| c.metadata.name).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn wait_for_claims(&self, want: &[String], limit: Duration) {
        let mut want = want.to_vec();
        want.sort();
        let deadline = Instant::now() + limit;
        loop {
            let got = self.claims().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "claims after {limit:?}: {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The identities (from the User-Agent) that created claims, with when.
    fn claim_creators(&self) -> Vec<(String, Instant)> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.resource == "persistentvolumeclaims" && r.verb == Verb::Create)
            .map(|r| (r.user_agent, r.at))
            .collect()
    }
}

fn leading_gauge(replica_admin: std::net::SocketAddr) -> Option<i64> {
    let (_, metrics) = http_get(replica_admin, "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("volplane_leader_election_leading{{lease=\"{LEASE}\"}}")))?;
    line.rsplit(' ').next()?.parse().ok()
}

const FAST: [&str; 6] = [
    "--leader-election-lease-duration",
    "3s",
    "--leader-election-renew-deadline",
    "2s",
    "--leader-election-retry-period",
    "1s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_and_a_paused_or_killed_holder_is_replaced_without_late_writes() {
    let cluster = Cluster::start().await;
    let mut a = cluster.replica("replica-a", &FAST);
    let mut b = cluster.replica("replica-b", &FAST);
    let admin_a = a.admin_address().await;
    let admin_b = b.admin_address().await;
    // Both replicas sync their caches, leader or not.
    a.wait_for("volplane is ready").await;
    b.wait_for("volplane is ready").await;

    let first = cluster.holder(Duration::from_secs(10)).await;
    let ((mut holder, holder_admin), (mut standby, standby_admin)) = if first.starts_with("replica-a_") {
        ((a, admin_a), (b, admin_b))
    } else {
        ((b, admin_b), (a, admin_a))
    };
    let mut expected = cluster.create_pods("first", 5).await;
    cluster.wait_for_claims(&expected, Duration::from_secs(10)).await;
    let creators = cluster.claim_creators();
    assert!(
        creators.iter().all(|(agent, _)| agent.contains(&first)),
        "only the holder {first} creates claims: {creators:?}"
    );
    assert_eq!(leading_gauge(standby_admin), Some(0), "the standby does not lead");

    // The holder freezes (a long GC pause, a stopped VM): its lease expires
    // and the standby takes over within one lease duration plus a retry.
    holder.signal("STOP");
    let second = eventually_some(Duration::from_secs(5), "the standby takes the lease", || {
        let cluster = &cluster;
        let first = first.clone();
        async move { Some(cluster.holder(Duration::from_secs(1)).await).filter(|h| *h != first) }
    })
    .await;
    expected.extend(cluster.create_pods("while-paused", 3).await);
    cluster.wait_for_claims(&expected, Duration::from_secs(10)).await;

    // The old holder wakes up deposed: it must not write a single claim.
    holder.signal("CONT");
    let resumed = Instant::now();
    eventually(Duration::from_secs(10), "the old holder knows it does not lead", || {
        leading_gauge(holder_admin) == Some(0)
    })
    .await;
    expected.extend(cluster.create_pods("after-resume", 3).await);
    cluster.wait_for_claims(&expected, Duration::from_secs(10)).await;
    let late: Vec<_> = cluster
        .claim_creators()
        .into_iter()
        .filter(|(agent, at)| agent.contains(&first) && *at > resumed)
        .collect();
    assert!(late.is_empty(), "the deposed holder wrote after resuming: {late:?}");
    assert!(
        cluster.claim_creators().len() >= expected.len(),
        "every claim was created by a request"
    );

    // The new holder dies without releasing anything: the first one,
    // caches still warm, takes over after expiry.
    std::mem::swap(&mut holder, &mut standby);
    holder.signal("KILL");
    holder.reap();
    eventually_some(Duration::from_secs(8), "the first replica leads again", || {
        let cluster = &cluster;
        let second = second.clone();
        async move { Some(cluster.holder(Duration::from_secs(1)).await).filter(|h| *h != second) }
    })
    .await;
    expected.extend(cluster.create_pods("after-kill", 2).await);
    cluster.wait_for_claims(&expected, Duration::from_secs(10)).await;
    let (code, _) = standby.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_releases_the_lease_to_the_standby_at_once() {
    let cluster = Cluster::start().await;
    // Default timing: a 15 s lease, so a handover within seconds can only
    // come from the release.
    let mut a = cluster.replica("replica-a", &[]);
    let mut b = cluster.replica("replica-b", &[]);
    a.wait_for("volplane is ready").await;
    b.wait_for("volplane is ready").await;
    let first = cluster.holder(Duration::from_secs(10)).await;
    let (holder, standby) = if first.starts_with("replica-a_") {
        (a, b)
    } else {
        (b, a)
    };

    let load = {
        let client = cluster.client.clone();
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, "default");
            for i in 0..200 {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("load-{i}")},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}],
                             "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {
                                 "spec": {"accessModes": ["ReadWriteOnce"]}}}}]}
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
            }
        })
    };
    eventually(Duration::from_secs(10), "the holder is busy creating claims", || {
        !cluster.claim_creators().is_empty()
    })
    .await;
    let (code, lines) = holder.terminate().await;
    assert_eq!(code, Some(0), "{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("lease released")),
        "{}",
        lines.join("\n")
    );
    let second = cluster.holder(Duration::from_secs(1)).await;
    let second = if second == first {
        eventually_some(Duration::from_secs(5), "the standby takes the released lease", || {
            let cluster = &cluster;
            let first = first.clone();
            async move { Some(cluster.holder(Duration::from_secs(1)).await).filter(|h| *h != first) }
        })
        .await
    } else {
        second
    };
    load.await.expect("load");
    let expected: Vec<String> = (0..200).map(|i| format!("load-{i}-data")).collect();
    cluster.wait_for_claims(&expected, Duration::from_secs(20)).await;
    assert_ne!(first, second);
    let (code, _) = standby.terminate().await;
    assert_eq!(code, Some(0));
}
