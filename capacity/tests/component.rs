//! The capacity controller with a real kube::Client against the API-server
//! double and the test CSI driver over a unix socket.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, CSIStorageCapacity, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use volplane_capacity::model::{
    DRIVER_CAPACITY_ANNOTATION, DRIVER_LABEL, Enablement, MANAGED_BY_LABEL, ObjectIdentity, RESERVED_ANNOTATION,
    Segment,
};
use volplane_capacity::quantity::format_bytes;
use volplane_capacity::{CapacityConfig, CapacityController, CapacityMetrics, Topology};
use volplane_csi::CsiMethod;
use volplane_runtime::Backoff;
use volplane_runtime::{Leadership, Term};
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::background::Background;
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, labels};
use volplane_tests::wait::{eventually, eventually_some, within};

const DRIVER: &str = "test.csi.volplane.dev";
const NS: &str = "storage";
const GI: i64 = 1 << 30;

/// Tests share the process; one that measures the process's CPU runs alone
/// (it takes this for writing, every other test for reading).
static CPU_MEASURED: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Harness {
    _turn: Turn,
    double: ApiServerDouble,
    driver: TestDriver,
    client: kube::Client,
    metrics: Arc<CapacityMetrics>,
    registry: Registry,
    leadership: Leadership,
    running: Option<Background<volplane_capacity::Result<()>>>,
}

fn config(poll: Duration, topology: Topology, send_topology: bool) -> CapacityConfig {
    CapacityConfig {
        driver: DRIVER.into(),
        send_topology,
        topology,
        volume_events: true,
        identity: ObjectIdentity {
            namespace: NS.into(),
            driver: DRIVER.into(),
            managed_by: "volplane".into(),
            owner: None,
        },
        poll_interval: poll,
        workers: 4,
        include_immediate: false,
        enablement: Enablement::Always,
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        event_target: None,
        instance: "test".into(),
        adopt_from: None,
        node_placements: None,
    }
}

/// A test's hold on [`CPU_MEASURED`].
enum Turn {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl Harness {
    async fn new() -> Self {
        Self::with_turn(Turn::Shared(CPU_MEASURED.read().await)).await
    }

    /// A harness for a test that measures the process's CPU: no other test
    /// of this file runs meanwhile.
    async fn alone() -> Self {
        Self::with_turn(Turn::Alone(CPU_MEASURED.write().await)).await
    }

    async fn with_turn(turn: Turn) -> Self {
        let double = ApiServerDouble::start().await.expect("double");
        let driver = TestDriver::start(DriverConfig {
            name: DRIVER.into(),
            ..DriverConfig::default()
        })
        .await
        .expect("driver");
        let client = double.client();
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace");
        let mut registry = Registry::with_prefix("volplane");
        let metrics = Arc::new(CapacityMetrics::register(&mut registry));
        Self {
            _turn: turn,
            double,
            driver,
            client,
            metrics,
            registry,
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

    async fn start(&mut self, config: CapacityConfig) {
        let controller = CapacityController::new(
            self.client.clone(),
            self.driver.client(Duration::from_secs(5)),
            config,
            self.metrics.clone(),
            self.leadership.clone(),
        );
        let mut ready = controller.readiness();
        self.running = Some(Background::spawn(|shutdown| controller.run(shutdown)));
        within(Duration::from_secs(20), ready.wait_for(|r| *r))
            .await
            .expect("readiness channel");
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop(Duration::from_secs(20)).await.expect("controller result");
        }
    }

    async fn add_node(&self, name: &str, zone: Option<&str>, keys: &[&str]) {
        let mut node_labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())]);
        if let Some(zone) = zone {
            node_labels.insert("zone".into(), zone.into());
        }
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": node_labels}})).expect("node");
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let csinode: CSINode = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name, "topologyKeys": keys}]}
        }))
        .expect("csinode");
        Api::<CSINode>::all(self.client.clone())
            .create(&PostParams::default(), &csinode)
            .await
            .expect("create csinode");
    }

    async fn remove_node(&self, name: &str) {
        Api::<CSINode>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete csinode");
        Api::<Node>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete node");
    }

    async fn add_class(&self, name: &str, mode: &str, params: &[(&str, &str)]) {
        let params: BTreeMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name}, "provisioner": DRIVER, "volumeBindingMode": mode, "parameters": params
        }))
        .expect("class");
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create class");
    }

    fn capacities(&self) -> Api<CSIStorageCapacity> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// (class, zone label, capacity, max) per object, sorted.
    async fn published(&self) -> Vec<(String, Option<String>, String, Option<String>)> {
        let mut rows: Vec<_> = self
            .capacities()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .filter(|o| {
                let l = o.metadata.labels.clone().unwrap_or_default();
                l.get(MANAGED_BY_LABEL).map(String::as_str) == Some("volplane")
                    && l.get(DRIVER_LABEL).map(String::as_str) == Some(DRIVER)
            })
            .map(|o| {
                let zone = o
                    .node_topology
                    .as_ref()
                    .and_then(|t| t.match_labels.as_ref())
                    .and_then(|l| l.get("zone").cloned());
                (
                    o.storage_class_name,
                    zone,
                    o.capacity.map(|q| q.0).unwrap_or_default(),
                    o.maximum_volume_size.map(|q| q.0),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    async fn wait_for_published(&self, what: &str, want: &[(&str, Option<&str>, i64, Option<i64>)]) {
        let mut want: Vec<(String, Option<String>, String, Option<String>)> = want
            .iter()
            .map(|(c, z, cap, max)| {
                (
                    c.to_string(),
                    z.map(str::to_string),
                    format_bytes(*cap),
                    max.map(format_bytes),
                )
            })
            .collect();
        want.sort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.published().await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: still {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text
    }
}

fn zone(z: &str) -> BTreeMap<String, String> {
    labels([("zone", z)])
}

#[tokio::test]
async fn converges_from_empty_with_one_object_per_segment_and_class() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("a"), &["zone"]).await;
    h.add_node("n3", Some("b"), &["zone"]).await;
    h.add_node("no-zone", None, &["zone"]).await;
    h.add_class(
        "fast",
        "WaitForFirstConsumer",
        &[("type", "ssd"), ("csi.storage.k8s.io/fstype", "xfs")],
    )
    .await;
    h.add_class("slow", "WaitForFirstConsumer", &[("type", "hdd")]).await;
    h.add_class("early", "Immediate", &[]).await;
    h.driver.set_capacity(
        Some(zone("a")),
        Some(labels([("type", "ssd")])),
        CapacityAnswer {
            available: 10 * GI,
            maximum: Some(2 * GI),
            minimum: None,
        },
    );
    h.driver
        .set_capacity(Some(zone("b")), None, CapacityAnswer::available(5 * GI));
    h.driver.set_default_capacity(CapacityAnswer::available(GI));

    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    h.wait_for_published(
        "converged",
        &[
            ("fast", Some("a"), 10 * GI, Some(2 * GI)),
            ("fast", Some("b"), 5 * GI, None),
            ("slow", Some("a"), GI, None),
            ("slow", Some("b"), 5 * GI, None),
        ],
    )
    .await;

    let objects = h.capacities().list(&ListParams::default()).await.expect("list").items;
    for o in &objects {
        let name = o.metadata.name.clone().unwrap_or_default();
        assert!(name.starts_with("csisc-"), "{name}");
        let l = o.metadata.labels.clone().unwrap_or_default();
        assert_eq!(l.get(DRIVER_LABEL).map(String::as_str), Some(DRIVER));
        assert_eq!(l.get(MANAGED_BY_LABEL).map(String::as_str), Some("volplane"));
    }
    // Reserved parameters never reach the driver; topology always does.
    let requests = h.driver.capacity_requests();
    assert_eq!(requests.len(), 4, "one GetCapacity per item");
    assert!(
        requests
            .iter()
            .all(|r| !r.parameters.contains_key("csi.storage.k8s.io/fstype"))
    );
    assert!(requests.iter().all(|r| r.accessible_topology.is_some()));
    let text = h.metrics_text();
    assert!(text.contains("volplane_capacity_objects_desired 4"), "{text}");
    assert!(
        text.contains("volplane_capacity_api_writes_total{verb=\"create\"} 4"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test]
async fn nodes_and_classes_coming_and_going_add_and_remove_objects() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    h.wait_for_published("initial", &[("fast", Some("a"), GI, None)]).await;

    h.add_node("n2", Some("b"), &["zone"]).await;
    h.wait_for_published(
        "node added",
        &[("fast", Some("a"), GI, None), ("fast", Some("b"), GI, None)],
    )
    .await;

    h.add_class("slow", "WaitForFirstConsumer", &[]).await;
    h.wait_for_published(
        "class added",
        &[
            ("fast", Some("a"), GI, None),
            ("fast", Some("b"), GI, None),
            ("slow", Some("a"), GI, None),
            ("slow", Some("b"), GI, None),
        ],
    )
    .await;

    h.remove_node("n1").await;
    h.wait_for_published(
        "node removed",
        &[("fast", Some("b"), GI, None), ("slow", Some("b"), GI, None)],
    )
    .await;

    Api::<StorageClass>::all(h.client.clone())
        .delete("fast", &DeleteParams::default())
        .await
        .expect("delete class");
    h.wait_for_published("class deleted", &[("slow", Some("b"), GI, None)])
        .await;
    h.stop().await;
}

#[tokio::test]
async fn a_new_topology_key_lists_the_nodes_again_and_publishes_the_finer_segments() {
    let mut h = Harness::new().await;
    for (name, zone, rack) in [("n1", "a", "r1"), ("n2", "a", "r2")] {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"zone": zone, "rack": rack, "kubernetes.io/hostname": name}}}),
        )
        .expect("node");
        Api::<Node>::all(h.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("node");
    }
    let csinodes = Api::<CSINode>::all(h.client.clone());
    let csinode = |name: &str, keys: &[&str]| -> CSINode {
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name, "topologyKeys": keys}]}}))
        .expect("csinode")
    };
    for name in ["n1", "n2"] {
        csinodes
            .create(&PostParams::default(), &csinode(name, &["zone"]))
            .await
            .expect("csinode");
    }
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    let topologies = || async {
        let mut all: Vec<BTreeMap<String, String>> = h
            .capacities()
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| o.node_topology?.match_labels)
            .collect();
        all.sort();
        all
    };
    let zone_a = BTreeMap::from([("zone".to_string(), "a".to_string())]);
    eventually_some(Duration::from_secs(20), "one object for zone a", || async {
        (topologies().await == [zone_a.clone()]).then_some(())
    })
    .await;

    // A driver upgrade: its nodes now report racks too. The rack labels were
    // not kept, so the Nodes are listed again.
    for name in ["n1", "n2"] {
        let mut upgraded = csinodes.get(name).await.expect("csinode");
        upgraded.spec = csinode(name, &["zone", "rack"]).spec;
        csinodes
            .replace(name, &PostParams::default(), &upgraded)
            .await
            .expect("upgrade");
    }
    let rack = |r: &str| {
        BTreeMap::from([
            ("rack".to_string(), r.to_string()),
            ("zone".to_string(), "a".to_string()),
        ])
    };
    eventually_some(
        Duration::from_secs(20),
        "one object per rack, none for the zone",
        || async { (topologies().await == [rack("r1"), rack("r2")]).then_some(()) },
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn capacity_changes_propagate_and_unchanged_polls_write_nothing() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_millis(300), Topology::Central, true))
        .await;
    h.wait_for_published(
        "initial",
        &[("fast", Some("a"), GI, None), ("fast", Some("b"), GI, None)],
    )
    .await;

    // Several polls of each item with nothing changed: no writes at all.
    let writes = h.double.writes("csistoragecapacities");
    let calls = h.driver.count(CsiMethod::GetCapacity);
    eventually(Duration::from_secs(20), "three more polls per item", || {
        h.driver.count(CsiMethod::GetCapacity) >= calls + 6
    })
    .await;
    assert_eq!(
        h.double.writes("csistoragecapacities"),
        writes,
        "unchanged capacity must not be written"
    );

    h.driver.set_capacity(
        Some(zone("b")),
        None,
        CapacityAnswer {
            available: 3 * GI,
            maximum: Some(GI),
            minimum: None,
        },
    );
    h.wait_for_published(
        "changed",
        &[("fast", Some("a"), GI, None), ("fast", Some("b"), 3 * GI, Some(GI))],
    )
    .await;
    h.stop().await;
}

fn leading(number: u64) -> Term {
    Term::Leading {
        number,
        until: Some(std::time::SystemTime::now() + Duration::from_secs(600)),
    }
}

#[tokio::test]
async fn only_a_leader_calls_the_driver_and_writes_and_a_lost_lease_stops_writes_at_once() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    let term = h.elect_by_hand();
    h.start(config(Duration::from_millis(200), Topology::Central, true))
        .await;

    // A synced follower: caches warm, no driver calls, no writes.
    h.add_class("slow", "WaitForFirstConsumer", &[]).await;
    let watched = h.double.count(Verb::Watch, "csistoragecapacities");
    assert!(watched > 0, "a follower watches");
    eventually(Duration::from_secs(5), "the follower saw the second class", || {
        h.metrics_text().contains("volplane_capacity_objects_desired 2")
    })
    .await;
    assert_eq!(h.driver.count(CsiMethod::GetCapacity), 0, "a follower calls no driver");
    assert_eq!(h.double.writes("csistoragecapacities"), 0, "a follower writes nothing");

    term.send_replace(leading(1));
    h.wait_for_published(
        "the new leader catches up",
        &[("fast", Some("a"), GI, None), ("slow", Some("a"), GI, None)],
    )
    .await;

    // Refreshes are inside a slow driver call when the lease is lost. The
    // delay applies before the answer is chosen, so every refresh that sees
    // the new value is still in the driver at the loss.
    h.driver.set_delay(CsiMethod::GetCapacity, Duration::from_millis(500));
    h.driver.set_default_capacity(CapacityAnswer::available(2 * GI));
    let before = h.driver.count(CsiMethod::GetCapacity);
    eventually(Duration::from_secs(5), "both items in a slow driver call", || {
        h.driver.count(CsiMethod::GetCapacity) >= before + 2
    })
    .await;
    term.send_replace(Term::Following);
    let lost_at = std::time::Instant::now();
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.capacities()
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("someone deletes every object");
    // The follower has seen the new node and the deletions, and every
    // driver call has come back (the histogram counts answers).
    eventually(Duration::from_secs(10), "the follower is up to date and idle", || {
        let text = h.metrics_text();
        let answered: usize = text
            .lines()
            .filter(|l| l.starts_with("volplane_capacity_get_capacity_duration_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
            .sum();
        text.contains("volplane_capacity_objects_desired 4")
            && text.contains("volplane_capacity_objects_current 0")
            && answered == h.driver.count(CsiMethod::GetCapacity)
    })
    .await;
    let late: Vec<_> = h
        .double
        .requests()
        .into_iter()
        .filter(|r| r.resource == "csistoragecapacities" && r.at > lost_at)
        .filter(|r| matches!(r.verb, Verb::Create | Verb::Update | Verb::Patch | Verb::Delete))
        .collect();
    assert!(late.is_empty(), "writes after the lease was lost: {late:?}");
    h.driver.set_delay(CsiMethod::GetCapacity, Duration::ZERO);

    term.send_replace(leading(2));
    h.wait_for_published(
        "the leader again re-creates what is missing, for the new node too",
        &[
            ("fast", Some("a"), 2 * GI, None),
            ("fast", Some("b"), 2 * GI, None),
            ("slow", Some("a"), 2 * GI, None),
            ("slow", Some("b"), 2 * GI, None),
        ],
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn polls_call_get_capacity_once_per_item_per_interval() {
    let mut h = Harness::new().await;
    for i in 0..6 {
        h.add_node(&format!("n{i}"), Some(&format!("z{i}")), &["zone"]).await;
    }
    h.add_class("fast", "WaitForFirstConsumer", &[("tier", "fast")]).await;
    h.add_class("slow", "WaitForFirstConsumer", &[("tier", "slow")]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    let interval = Duration::from_millis(400);
    h.start(config(interval, Topology::Central, true)).await;

    // GetCapacity arrival times per item, an item being (zone, tier).
    let polls = |driver: &TestDriver| {
        let mut per_item: BTreeMap<(String, String), Vec<std::time::Instant>> = BTreeMap::new();
        for (at, request) in driver.timed_capacity_requests() {
            let zone = request
                .accessible_topology
                .as_ref()
                .and_then(|t| t.segments.get("zone").cloned())
                .unwrap_or_default();
            let tier = request.parameters.get("tier").cloned().unwrap_or_default();
            per_item.entry((zone, tier)).or_default().push(at);
        }
        per_item
    };
    // Every one of the 12 items is polled again and again ...
    eventually(Duration::from_secs(30), "every item polled four times", || {
        let per_item = polls(&h.driver);
        per_item.len() == 12 && per_item.values().all(|times| times.len() >= 4)
    })
    .await;
    h.stop().await;

    // ... but never twice within half an interval, however polls line up.
    for (item, times) in polls(&h.driver) {
        for pair in times.windows(2) {
            let gap = pair[1].duration_since(pair[0]);
            assert!(gap >= interval / 2, "{item:?} polled twice within {gap:?}");
        }
    }
}

#[tokio::test]
async fn classes_with_equal_parameters_share_one_get_capacity_call_per_segment() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    // Two classes ask the driver the same question, a third another one.
    h.add_class("fast", "WaitForFirstConsumer", &[("tier", "fast")]).await;
    h.add_class("fast-retain", "WaitForFirstConsumer", &[("tier", "fast")])
        .await;
    h.add_class("slow", "WaitForFirstConsumer", &[("tier", "slow")]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(4 * GI));
    h.driver
        .set_capacity(None, Some(labels([("tier", "slow")])), CapacityAnswer::available(GI));
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    h.wait_for_published(
        "every class in every zone",
        &[
            ("fast", Some("a"), 4 * GI, None),
            ("fast", Some("b"), 4 * GI, None),
            ("fast-retain", Some("a"), 4 * GI, None),
            ("fast-retain", Some("b"), 4 * GI, None),
            ("slow", Some("a"), GI, None),
            ("slow", Some("b"), GI, None),
        ],
    )
    .await;
    assert_eq!(
        h.driver.count(CsiMethod::GetCapacity),
        4,
        "one call per zone and distinct parameters, not one per class"
    );
    h.stop().await;
}

#[tokio::test]
async fn objects_deleted_by_someone_else_are_recreated_and_foreign_objects_untouched() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    // Objects of another manager and another driver, in the same namespace.
    for (name, driver, manager) in [
        ("foreign-1", DRIVER, "someone-else"),
        ("foreign-2", "other.csi", "volplane"),
    ] {
        let object: CSIStorageCapacity = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {DRIVER_LABEL: driver, MANAGED_BY_LABEL: manager}},
            "storageClassName": "fast", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1"
        }))
        .expect("object");
        h.capacities()
            .create(&PostParams::default(), &object)
            .await
            .expect("create foreign");
    }
    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    h.wait_for_published("initial", &[("fast", Some("a"), GI, None)]).await;

    let ours = h
        .capacities()
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}=volplane,{DRIVER_LABEL}={DRIVER}")))
        .await
        .expect("list")
        .items;
    assert_eq!(ours.len(), 1);
    let name = ours[0].metadata.name.clone().expect("name");
    h.capacities()
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    let api = h.capacities();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let items = api
            .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}=volplane,{DRIVER_LABEL}={DRIVER}")))
            .await
            .expect("list")
            .items;
        if items.len() == 1 && items[0].metadata.name.as_deref() != Some(name.as_str()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not re-created: {items:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for foreign in ["foreign-1", "foreign-2"] {
        let o = h.capacities().get(foreign).await.expect("foreign object untouched");
        assert_eq!(o.capacity.map(|q| q.0).as_deref(), Some("1"));
    }
    h.stop().await;
}

#[tokio::test]
async fn driver_errors_keep_the_last_value_and_are_counted() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_millis(200), Topology::Central, true))
        .await;
    h.wait_for_published("initial", &[("fast", Some("a"), GI, None)]).await;

    h.driver
        .fail_next(CsiMethod::GetCapacity, 3, tonic::Code::Unavailable, "backend down");
    h.driver.set_default_capacity(CapacityAnswer::available(-5));
    eventually(Duration::from_secs(20), "failures observed", || {
        let text = h.metrics_text();
        text.contains("grpc_code=\"Unavailable\"") && text.contains("grpc_code=\"invalid_response\"")
    })
    .await;
    // Neither an error nor a negative answer replaced the published value.
    assert_eq!(
        h.published().await,
        [("fast".to_string(), Some("a".to_string()), format_bytes(GI), None)]
    );

    h.driver.set_default_capacity(CapacityAnswer::available(2 * GI));
    h.wait_for_published("recovered", &[("fast", Some("a"), 2 * GI, None)])
        .await;
    h.stop().await;
}

#[tokio::test]
async fn api_conflicts_and_dropped_watches_heal() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_millis(300), Topology::Central, true))
        .await;
    h.wait_for_published("initial", &[("fast", Some("a"), GI, None)]).await;

    h.double
        .fail_next(Some(Verb::Patch), Some("csistoragecapacities"), 2, 409);
    h.driver.set_default_capacity(CapacityAnswer::available(2 * GI));
    h.wait_for_published("after conflicts", &[("fast", Some("a"), 2 * GI, None)])
        .await;

    // While every watch is gone and history expired, a node arrives.
    h.double.force_relist();
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.wait_for_published(
        "after re-list",
        &[("fast", Some("a"), 2 * GI, None), ("fast", Some("b"), 2 * GI, None)],
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn a_restart_adopts_existing_objects_instead_of_duplicating() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    h.wait_for_published(
        "first run",
        &[("fast", Some("a"), GI, None), ("fast", Some("b"), GI, None)],
    )
    .await;
    let names = |items: Vec<CSIStorageCapacity>| {
        let mut names: Vec<String> = items.into_iter().filter_map(|o| o.metadata.name).collect();
        names.sort();
        names
    };
    let before = names(h.capacities().list(&ListParams::default()).await.expect("list").items);
    h.stop().await;

    // A duplicate appears while volplane is down (e.g. an old replica).
    let duplicate: CSIStorageCapacity = serde_json::from_value(json!({
        "metadata": {"name": "csisc-duplicate", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "volplane"}},
        "storageClassName": "fast", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1"
    }))
    .expect("object");
    h.capacities()
        .create(&PostParams::default(), &duplicate)
        .await
        .expect("duplicate");

    h.double.clear_requests();
    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    // One object per item again: the duplicate or its twin was deleted, the
    // rest adopted. (Which twin stays is decided by age, then name.)
    h.wait_for_published(
        "restarted",
        &[("fast", Some("a"), GI, None), ("fast", Some("b"), GI, None)],
    )
    .await;
    let after = names(h.capacities().list(&ListParams::default()).await.expect("list").items);
    assert!(
        after.iter().all(|n| before.contains(n) || n == "csisc-duplicate"),
        "{after:?} vs {before:?}"
    );
    assert_eq!(
        h.double.count(Verb::Create, "csistoragecapacities"),
        0,
        "adopted, not re-created"
    );
    assert_eq!(
        h.double.count(Verb::Delete, "csistoragecapacities"),
        1,
        "exactly the duplicate pair shrank"
    );
    h.stop().await;
}

/// Zones a and b with 4 GiB each in class `fast`, published; polls an hour
/// apart, so only events cause refreshes.
async fn two_zones_polled_hourly() -> Harness {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(4 * GI));
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    h.wait_for_published(
        "initial",
        &[("fast", Some("a"), 4 * GI, None), ("fast", Some("b"), 4 * GI, None)],
    )
    .await;
    h
}

fn volume_in_zone(name: &str, zone: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                 "csi": {"driver": DRIVER, "volumeHandle": name},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "zone", "operator": "In", "values": [zone]}]}]}}}
    }))
    .expect("pv")
}

#[tokio::test]
async fn a_new_volume_refreshes_its_segment_and_class_at_once() {
    let mut h = two_zones_polled_hourly().await;

    // A volume was provisioned in zone a: the driver reports less there.
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(3 * GI));
    let pv = volume_in_zone("pv-1", "a");
    let calls = h.driver.count(CsiMethod::GetCapacity);
    Api::<PersistentVolume>::all(h.client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("pv");
    // With an hour-long poll interval only the PV event can explain this.
    h.wait_for_published(
        "refreshed",
        &[("fast", Some("a"), 3 * GI, None), ("fast", Some("b"), 4 * GI, None)],
    )
    .await;
    assert_eq!(
        h.driver.count(CsiMethod::GetCapacity),
        calls + 1,
        "only the matching item was refreshed"
    );
    h.stop().await;
}

#[tokio::test]
async fn across_an_api_server_gap_everything_changed_meanwhile_comes_out_right() {
    let mut h = Harness::new().await;
    for (node, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c"), ("n4", "d")] {
        h.add_node(node, Some(zone), &["zone"]).await;
    }
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(4 * GI));
    // A volume that is there before volplane starts, deleted during the gap.
    let doomed = volume_in_zone("pv-doomed", "b");
    Api::<PersistentVolume>::all(h.client.clone())
        .create(&PostParams::default(), &doomed)
        .await
        .expect("pv");
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    let foreign: CSIStorageCapacity = serde_json::from_value(json!({
        "metadata": {"name": "someone-elses", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "another-controller"}},
        "storageClassName": "fast", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1"
    }))
    .expect("object");
    h.capacities()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign");
    h.wait_for_published(
        "four zones",
        &[
            ("fast", Some("a"), 4 * GI, None),
            ("fast", Some("b"), 4 * GI, None),
            ("fast", Some("c"), 4 * GI, None),
            ("fast", Some("d"), 4 * GI, None),
        ],
    )
    .await;
    eventually(Duration::from_secs(10), "the foreign object counted", || {
        h.metrics_text().contains("volplane_capacity_foreign_objects 1")
    })
    .await;

    let in_zone_d = (h.capacities().list(&ListParams::default()).await.expect("list").items)
        .into_iter()
        .find(|o| {
            (o.node_topology.as_ref())
                .and_then(|t| t.match_labels.as_ref())
                .is_some_and(|l| l.get("zone").map(String::as_str) == Some("d"))
        })
        .and_then(|o| o.metadata.name)
        .expect("zone d's object");

    // volplane's API server goes away. Through the other one: node n3 is
    // removed, a volume is created in zone a and one deleted in zone b
    // (the driver reports the new values), the foreign object deleted,
    // and someone overwrites zone d's value.
    h.double.cut_off();
    let side = h.double.side_client();
    Api::<CSIStorageCapacity>::namespaced(side.clone(), NS)
        .patch(
            &in_zone_d,
            &PatchParams::default(),
            &Patch::Merge(json!({"capacity": "1"})),
        )
        .await
        .expect("overwrite");
    Api::<CSINode>::all(side.clone())
        .delete("n3", &DeleteParams::default())
        .await
        .expect("csinode");
    Api::<Node>::all(side.clone())
        .delete("n3", &DeleteParams::default())
        .await
        .expect("node");
    let volumes = Api::<PersistentVolume>::all(side.clone());
    volumes
        .create(&PostParams::default(), &volume_in_zone("pv-new", "a"))
        .await
        .expect("pv");
    volumes.delete("pv-doomed", &DeleteParams::default()).await.expect("pv");
    Api::<CSIStorageCapacity>::namespaced(side, NS)
        .delete("someone-elses", &DeleteParams::default())
        .await
        .expect("foreign");
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(3 * GI));
    h.driver
        .set_capacity(Some(zone("b")), None, CapacityAnswer::available(5 * GI));
    h.double.reconnect();

    // With an hour-long poll, only the re-list explains the new values
    // (and zone d's own value back).
    h.wait_for_published(
        "after the gap",
        &[
            ("fast", Some("a"), 3 * GI, None),
            ("fast", Some("b"), 5 * GI, None),
            ("fast", Some("d"), 4 * GI, None),
        ],
    )
    .await;
    eventually(Duration::from_secs(30), "the foreign object forgotten", || {
        h.metrics_text().contains("volplane_capacity_foreign_objects 0")
    })
    .await;
    assert!(
        h.metrics_text().contains("volplane_capacity_watches_relisting 0"),
        "{}",
        h.metrics_text()
    );
    let objects = h.capacities().list(&ListParams::default()).await.expect("list").items;
    assert_eq!(objects.len(), 3, "one object per (segment, class): {objects:#?}");
    h.stop().await;
}

#[tokio::test]
async fn its_own_updates_coming_back_through_the_watch_cause_no_refresh() {
    let mut h = two_zones_polled_hourly().await;

    // Two volumes in zone a at once: a second refresh right behind the
    // first. The store holds only what the watch delivered; volplane's own
    // update, when it comes back, must not look like someone else's edit.
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(2 * GI));
    // A slow driver: the second volume arrives while the first refresh runs.
    h.driver.set_delay(CsiMethod::GetCapacity, Duration::from_millis(300));
    let calls = h.driver.count(CsiMethod::GetCapacity);
    let updates = h.double.count(Verb::Patch, "csistoragecapacities");
    let volumes = Api::<PersistentVolume>::all(h.client.clone());
    for name in ["pv-1", "pv-2"] {
        volumes
            .create(&PostParams::default(), &volume_in_zone(name, "a"))
            .await
            .expect("pv");
    }
    h.wait_for_published(
        "zone a refreshed",
        &[("fast", Some("a"), 2 * GI, None), ("fast", Some("b"), 4 * GI, None)],
    )
    .await;
    // Zone b afterwards: once it is published, zone a's events are long
    // handled, so a refresh caused by volplane's own update would show.
    h.driver
        .set_capacity(Some(zone("b")), None, CapacityAnswer::available(GI));
    volumes
        .create(&PostParams::default(), &volume_in_zone("pv-3", "b"))
        .await
        .expect("pv");
    h.wait_for_published(
        "zone b refreshed",
        &[("fast", Some("a"), 2 * GI, None), ("fast", Some("b"), GI, None)],
    )
    .await;
    assert_eq!(
        h.double.count(Verb::Patch, "csistoragecapacities"),
        updates + 2,
        "one update per changed item, none repeated after a conflict"
    );
    assert_eq!(
        h.driver.count(CsiMethod::GetCapacity) - calls,
        3,
        "zone a twice (the second volume came during the first run), zone b once"
    );
    assert_eq!(h.published().await.len(), 2, "no duplicate objects");
    h.stop().await;
}

#[tokio::test]
async fn a_driver_without_topology_gets_one_segment_for_all_nodes() {
    let mut h = Harness::new().await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    h.start(config(
        Duration::from_secs(60),
        Topology::Fixed(Segment::default()),
        false,
    ))
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let object = loop {
        let items = h.capacities().list(&ListParams::default()).await.expect("list").items;
        if let Some(o) = items.into_iter().next() {
            break o;
        }
        assert!(tokio::time::Instant::now() < deadline, "no object");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let selector = object.node_topology.expect("nodeTopology");
    assert!(
        selector.match_labels.unwrap_or_default().is_empty(),
        "selects every node"
    );
    let requests = h.driver.capacity_requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.accessible_topology.is_none()),
        "no topology sent"
    );
    h.stop().await;
}

#[tokio::test]
async fn per_node_mode_publishes_the_fixed_segment_of_this_node() {
    let mut h = Harness::new().await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(7 * GI));
    let mut cfg = config(Duration::from_secs(60), Topology::Fixed(Segment::new(zone("a"))), true);
    cfg.identity.managed_by = "volplane-n1".into();
    cfg.volume_events = false;
    h.start(cfg).await;
    let api = h.capacities();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let items = api
            .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}=volplane-n1")))
            .await
            .expect("list")
            .items;
        if items.len() == 1 && items[0].capacity.as_ref().map(|q| q.0.as_str()) == Some("7Gi") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not published: {items:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    h.stop().await;
}

/// The owner the events of these tests go to.
fn owner_target() -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some("csi-controller".into()),
        namespace: Some(NS.into()),
        uid: Some("deployment-uid".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_csidriver_switch_turns_publishing_on_and_off_without_a_restart() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[("tier", "fast")]).await;
    h.add_class("slow", "WaitForFirstConsumer", &[("tier", "slow")]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    // An hour between polls: whatever is published comes from the switch itself.
    let mut cfg = config(Duration::from_secs(3600), Topology::Central, true);
    cfg.enablement = Enablement::CsiDriver;
    cfg.event_target = Some(owner_target());
    h.start(cfg).await;

    // No CSIDriver: ready, idle, said once.
    eventually_some(
        Duration::from_secs(20),
        "CapacityTrackingDisabled on the owner",
        || async {
            (volplane_tests::events::count(&h.client, NS, "CapacityTrackingDisabled", "csi-controller").await == 1)
                .then_some(())
        },
    )
    .await;
    assert!(
        h.metrics_text().contains("volplane_capacity_enabled 0"),
        "{}",
        h.metrics_text()
    );
    assert!(h.published().await.is_empty());
    assert_eq!(h.driver.count(CsiMethod::GetCapacity), 0);

    // Switched on: every (segment, class) at once.
    volplane_tests::objects::create(
        &Api::<CSIDriver>::all(h.client.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}),
    )
    .await;
    let all = [
        ("fast", Some("a"), GI, None),
        ("fast", Some("b"), GI, None),
        ("slow", Some("a"), GI, None),
        ("slow", Some("b"), GI, None),
    ];
    h.wait_for_published("every item once the switch is on", &all).await;
    assert!(h.metrics_text().contains("volplane_capacity_enabled 1"));
    eventually_some(
        Duration::from_secs(20),
        "CapacityTrackingEnabled on owner and CSIDriver",
        || async {
            (volplane_tests::events::count(&h.client, NS, "CapacityTrackingEnabled", "csi-controller").await == 1
                && volplane_tests::events::count(&h.client, "default", "CapacityTrackingEnabled", DRIVER).await == 1)
                .then_some(())
        },
    )
    .await;

    // Switched off: volplane's objects go, a foreign one stays.
    h.capacities()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "foreign", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "someone-else"}},
                "storageClassName": "fast", "capacity": "1Ki"}))
            .expect("object"),
        )
        .await
        .expect("foreign object");
    volplane_tests::objects::set_storage_capacity(&h.client, DRIVER, false).await;
    eventually_some(Duration::from_secs(20), "only the foreign object is left", || async {
        let names: Vec<String> = h
            .capacities()
            .list(&ListParams::default())
            .await
            .map(|l| l.items.into_iter().filter_map(|o| o.metadata.name).collect())
            .unwrap_or_default();
        (names == ["foreign"]).then_some(())
    })
    .await;
    assert!(h.metrics_text().contains("volplane_capacity_enabled 0"));
    eventually_some(
        Duration::from_secs(20),
        "CapacityTrackingDisabled on the CSIDriver",
        || async {
            (volplane_tests::events::count(&h.client, "default", "CapacityTrackingDisabled", DRIVER).await == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        volplane_tests::events::count(&h.client, NS, "CapacityTrackingDisabled", "csi-controller").await,
        2
    );
    assert_eq!(
        h.driver.count(CsiMethod::GetCapacity),
        4,
        "one call per item, none while off"
    );

    // And on again, still without a restart.
    volplane_tests::objects::set_storage_capacity(&h.client, DRIVER, true).await;
    h.wait_for_published("every item again", &all).await;
    h.stop().await;
}

#[tokio::test]
async fn a_permanent_driver_error_waits_for_the_next_poll_and_a_transient_one_backs_off() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    let interval = Duration::from_secs(1);
    let mut cfg = config(interval, Topology::Central, true);
    cfg.backoff = Backoff {
        base: Duration::from_millis(10),
        max: interval,
    };
    cfg.event_target = Some(owner_target());
    let gap_after_failure = |h: &Harness| {
        let times: Vec<_> = h
            .driver
            .timed_capacity_requests()
            .into_iter()
            .map(|(at, _)| at)
            .collect();
        times.get(1).map(|second| second.duration_since(times[0]))
    };

    h.driver
        .fail_next(CsiMethod::GetCapacity, 1, tonic::Code::InvalidArgument, "no such pool");
    h.start(cfg.clone()).await;
    h.wait_for_published("published after the next poll", &[("fast", Some("a"), GI, None)])
        .await;
    let gap = gap_after_failure(&h).expect("two calls");
    assert!(
        gap >= interval / 2,
        "InvalidArgument retried after {gap:?}, before the next poll"
    );
    eventually_some(Duration::from_secs(20), "one GetCapacityFailed", || async {
        (volplane_tests::events::count(&h.client, NS, "GetCapacityFailed", "csi-controller").await == 1).then_some(())
    })
    .await;
    h.stop().await;

    h.capacities()
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("clean up");
    h.driver.clear_calls();
    h.driver.fail_next(
        CsiMethod::GetCapacity,
        1,
        tonic::Code::Unavailable,
        "backend restarting",
    );
    h.start(cfg).await;
    h.wait_for_published("published after a quick retry", &[("fast", Some("a"), GI, None)])
        .await;
    let gap = gap_after_failure(&h).expect("two calls");
    assert!(gap < interval / 2, "Unavailable waited {gap:?}, as long as a poll");
    h.stop().await;
}

#[tokio::test]
async fn zero_huge_and_oversized_answers_are_published_as_kubernetes_writes_them() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("full", "WaitForFirstConsumer", &[("pool", "full")]).await;
    h.add_class("huge", "WaitForFirstConsumer", &[("pool", "huge")]).await;
    h.add_class("thin", "WaitForFirstConsumer", &[("pool", "thin")]).await;
    let pool = |name: &str| Some(labels([("pool", name)]));
    h.driver.set_capacity(None, pool("full"), CapacityAnswer::available(0));
    h.driver
        .set_capacity(None, pool("huge"), CapacityAnswer::available(i64::MAX));
    h.driver.set_capacity(
        None,
        pool("thin"),
        CapacityAnswer {
            available: 10 * GI,
            maximum: Some(1 << 40),
            minimum: None,
        },
    );
    h.start(config(Duration::from_secs(60), Topology::Central, true)).await;
    h.wait_for_published(
        "every answer published",
        &[
            ("full", Some("a"), 0, None),
            ("huge", Some("a"), i64::MAX, None),
            ("thin", Some("a"), 10 * GI, Some(1 << 40)),
        ],
    )
    .await;
    let mut written: Vec<(String, String)> = h
        .published()
        .await
        .into_iter()
        .map(|(class, _, capacity, maximum)| (class, format!("{capacity} {}", maximum.unwrap_or_default())))
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            ("full".to_string(), "0 ".to_string()),
            ("huge".to_string(), "9223372036854775807 ".to_string()),
            ("thin".to_string(), "10Gi 1Ti".to_string()),
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn a_follower_follows_the_switch_and_the_next_leader_cleans_up() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    volplane_tests::objects::create(
        &Api::<CSIDriver>::all(h.client.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true}}),
    )
    .await;
    let term = h.elect_by_hand();
    term.send_replace(leading(1));
    let mut cfg = config(Duration::from_secs(3600), Topology::Central, true);
    cfg.enablement = Enablement::CsiDriver;
    h.start(cfg).await;
    h.wait_for_published("the leader publishes", &[("fast", Some("a"), GI, None)])
        .await;

    // Switched off while this replica follows: it says so, writes nothing.
    term.send_replace(Term::Following);
    let writes = h.double.writes("csistoragecapacities");
    volplane_tests::objects::set_storage_capacity(&h.client, DRIVER, false).await;
    eventually(Duration::from_secs(20), "the follower saw the switch", || {
        h.metrics_text().contains("volplane_capacity_enabled 0")
    })
    .await;
    assert_eq!(
        h.double.writes("csistoragecapacities"),
        writes,
        "a follower deletes nothing"
    );
    assert_eq!(h.published().await.len(), 1);

    // Leading again: what is left of the switched-off driver goes.
    term.send_replace(leading(2));
    h.wait_for_published("the leader deletes the objects", &[]).await;
    assert_eq!(h.driver.count(CsiMethod::GetCapacity), 1, "no GetCapacity while off");
    h.stop().await;
}

#[tokio::test]
async fn items_waiting_for_a_busy_worker_do_not_spin_the_loop() {
    let mut h = Harness::alone().await;
    for i in 0..8 {
        h.add_node(&format!("n{i}"), Some(&format!("z{i}")), &["zone"]).await;
    }
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(GI));
    // One worker, a slow driver: seven items are due and wait the whole time.
    h.driver.set_delay(CsiMethod::GetCapacity, Duration::from_millis(400));
    let mut cfg = config(Duration::from_secs(3600), Topology::Central, true);
    cfg.workers = 1;
    let (wall, cpu) = (
        std::time::Instant::now(),
        volplane_tests::process::cpu_seconds(std::process::id()),
    );
    h.start(cfg).await;
    let want: Vec<(String, Option<String>)> = (0..8).map(|i| ("fast".to_string(), Some(format!("z{i}")))).collect();
    let want: Vec<(&str, Option<&str>, i64, Option<i64>)> =
        want.iter().map(|(c, z)| (c.as_str(), z.as_deref(), GI, None)).collect();
    h.wait_for_published("all eight, one at a time", &want).await;
    let (wall, cpu) = (
        wall.elapsed().as_secs_f64(),
        volplane_tests::process::cpu_seconds(std::process::id()) - cpu,
    );
    // A loop that spins while waiting burns a core for the whole 3.2 s.
    assert!(cpu < wall / 3.0, "{cpu:.2} s CPU in {wall:.2} s");
    h.stop().await;
}

/// `config` with `--capacity-adopt external-provisioner`.
fn adopting(config: CapacityConfig) -> CapacityConfig {
    CapacityConfig {
        adopt_from: Some("external-provisioner".into()),
        ..config
    }
}

impl Harness {
    /// An object as csi-provisioner writes it for `zone` and `class`.
    async fn incumbent_object(&self, zone_value: &str, class: &str, capacity: &str) -> CSIStorageCapacity {
        let object: CSIStorageCapacity = serde_json::from_value(json!({
            "metadata": {"generateName": "csisc-", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "external-provisioner"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "csi-controller-5d8f",
                                              "uid": "rs-uid", "controller": true}]},
            "storageClassName": class,
            "nodeTopology": {"matchLabels": {"zone": zone_value}},
            "capacity": capacity,
        }))
        .expect("object");
        self.capacities()
            .create(&PostParams::default(), &object)
            .await
            .expect("incumbent object")
    }

    /// (name, managed-by, class, capacity) of every object, sorted by name.
    async fn all_objects(&self) -> Vec<(String, String, String, String)> {
        let mut rows: Vec<_> = self
            .capacities()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|o| {
                let managed = o
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .remove(MANAGED_BY_LABEL)
                    .unwrap_or_default();
                (
                    o.metadata.name.unwrap_or_default(),
                    managed,
                    o.storage_class_name,
                    o.capacity.map(|q| q.0).unwrap_or_default(),
                )
            })
            .collect();
        rows.sort();
        rows
    }
}

#[tokio::test]
async fn csi_provisioners_objects_are_taken_over_in_place_once_quiet_and_the_obsolete_one_goes() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(7 * GI));
    let a = h.incumbent_object("a", "fast", "100Gi").await;
    let b = h.incumbent_object("b", "fast", "100Gi").await;
    let gone_class = h.incumbent_object("a", "retired", "1Gi").await;
    h.double.clear_requests();
    h.start(adopting(config(Duration::from_millis(300), Topology::Central, true)))
        .await;
    h.wait_for_published(
        "both taken over with the driver's value",
        &[("fast", Some("a"), 7 * GI, None), ("fast", Some("b"), 7 * GI, None)],
    )
    .await;
    let gone_name = gone_class.metadata.name.clone().expect("name");
    eventually_some(
        Duration::from_secs(20),
        "the object of a class volplane does not publish is deleted",
        || async { h.capacities().get_opt(&gone_name).await.ok()?.is_none().then_some(()) },
    )
    .await;
    // In place: the same objects, no create, volplane's owner and labels.
    let names: Vec<String> = h.all_objects().await.into_iter().map(|(name, ..)| name).collect();
    let mut want = vec![
        a.metadata.name.clone().expect("name"),
        b.metadata.name.clone().expect("name"),
    ];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(h.double.count(Verb::Create, "csistoragecapacities"), 0);
    for object in h.capacities().list(&ListParams::default()).await.expect("list").items {
        assert_eq!(
            object.metadata.owner_references, None,
            "volplane's owner: none in this config"
        );
    }
    assert!(
        h.metrics_text()
            .lines()
            .any(|l| l == "volplane_capacity_incumbent_objects 0")
    );
    h.stop().await;
}

#[tokio::test]
async fn a_csi_provisioner_that_still_runs_gets_its_canary_back_and_is_reported() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(7 * GI));
    h.incumbent_object("a", "fast", "7Gi").await;
    h.incumbent_object("b", "fast", "7Gi").await;
    // A running csi-provisioner: an object that leaves its selector is made again.
    let incumbent = {
        let client = h.client.clone();
        tokio::spawn(async move {
            let api: Api<CSIStorageCapacity> = Api::namespaced(client, NS);
            let selector = format!("{MANAGED_BY_LABEL}=external-provisioner");
            loop {
                let theirs = api
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default();
                for zone_value in ["a", "b"] {
                    let has = theirs.iter().any(|o| {
                        o.node_topology
                            .as_ref()
                            .and_then(|t| t.match_labels.as_ref())
                            .and_then(|l| l.get("zone"))
                            == Some(&zone_value.to_string())
                    });
                    if !has {
                        let object: CSIStorageCapacity = serde_json::from_value(json!({
                            "metadata": {"generateName": "csisc-", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "external-provisioner"}},
                            "storageClassName": "fast", "nodeTopology": {"matchLabels": {"zone": zone_value}}, "capacity": "7Gi"}))
                        .expect("object");
                        let _ = api.create(&PostParams::default(), &object).await;
                    }
                }
                // Quick enough to re-create within the 300 ms interval, light
                // enough not to load the other tests of this process.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    h.start(adopting(config(Duration::from_millis(300), Topology::Central, true)))
        .await;
    eventually(Duration::from_secs(20), "reported as still running", || {
        h.metrics_text()
            .lines()
            .any(|l| l == "volplane_capacity_incumbent_running 1")
    })
    .await;
    // The canary is given back: every object is the incumbent's again, one per item.
    let settled = eventually_some(Duration::from_secs(20), "only the incumbent's objects", || async {
        let all = h.all_objects().await;
        (all.len() == 2 && all.iter().all(|(_, managed, ..)| managed == "external-provisioner")).then_some(all)
    })
    .await;
    assert_eq!(settled.len(), 2);
    assert!(
        h.double.count(Verb::Patch, "csistoragecapacities") >= 1,
        "the canary was taken over"
    );
    assert!(
        h.double.count(Verb::Delete, "csistoragecapacities") >= 1,
        "volplane's copy of the canary deleted"
    );
    incumbent.abort();
    h.stop().await;
}

#[tokio::test]
async fn without_adoption_csi_provisioners_objects_are_left_as_they_are() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(7 * GI));
    let theirs = h.incumbent_object("a", "fast", "100Gi").await;
    h.start(config(Duration::from_millis(300), Topology::Central, true))
        .await;
    h.wait_for_published("volplane's own object beside it", &[("fast", Some("a"), 7 * GI, None)])
        .await;
    let untouched = h
        .capacities()
        .get(theirs.metadata.name.as_deref().expect("name"))
        .await
        .expect("theirs");
    assert_eq!(untouched.metadata.resource_version, theirs.metadata.resource_version);
    h.stop().await;
}

#[tokio::test]
async fn objects_of_other_controllers_are_reported_once_and_never_touched() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(7 * GI));
    let foreign: CSIStorageCapacity = serde_json::from_value(json!({
        "metadata": {"name": "hand-made", "labels": {DRIVER_LABEL: DRIVER, MANAGED_BY_LABEL: "someone-else"}},
        "storageClassName": "fast", "nodeTopology": {"matchLabels": {"zone": "a"}}, "capacity": "1Ti"}))
    .expect("object");
    let foreign = h
        .capacities()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign");
    h.start(adopting(config(Duration::from_millis(300), Topology::Central, true)))
        .await;
    h.wait_for_published("volplane's own beside it", &[("fast", Some("a"), 7 * GI, None)])
        .await;
    eventually(Duration::from_secs(20), "counted", || {
        h.metrics_text()
            .lines()
            .any(|l| l == "volplane_capacity_foreign_objects 1")
    })
    .await;
    let untouched = h.capacities().get("hand-made").await.expect("still there");
    assert_eq!(untouched.metadata.resource_version, foreign.metadata.resource_version);
    h.stop().await;
}

fn placed_claim(name: &str, node: &str, class: &str, size: &str) -> k8s_openapi::api::core::v1::PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS, "annotations": {"volume.kubernetes.io/selected-node": node}},
        "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    }))
    .expect("claim")
}

#[tokio::test]
async fn placements_in_flight_reserve_their_bytes_until_the_driver_counts_them() {
    let started = std::time::Instant::now();
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_node("n2", Some("b"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(100 * GI));
    // Hourly polls: only the placements explain what changes.
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    h.wait_for_published(
        "at rest",
        &[("fast", Some("a"), 100 * GI, None), ("fast", Some("b"), 100 * GI, None)],
    )
    .await;
    let claims = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(h.client.clone(), NS);
    let create = |claim| {
        let claims = claims.clone();
        async move { claims.create(&PostParams::default(), &claim).await.expect("claim") }
    };
    // Placed by the scheduler, not provisioned yet: 30Gi of zone a are taken.
    let asked = h.driver.count(CsiMethod::GetCapacity);
    create(placed_claim("c1", "n1", "fast", "30Gi")).await;
    // A class volplane does not publish for reserves nothing.
    create(placed_claim("c-other", "n1", "slow", "50Gi")).await;
    h.wait_for_published(
        "c1 in flight",
        &[("fast", Some("a"), 70 * GI, None), ("fast", Some("b"), 100 * GI, None)],
    )
    .await;
    assert_eq!(
        h.driver.count(CsiMethod::GetCapacity),
        asked,
        "a placement lowers what is published from the driver's last answer, without asking it"
    );
    let reserved_in_a = || async {
        let objects = h.capacities().list(&Default::default()).await.expect("list");
        let in_a = objects.items.into_iter().find(|o| {
            let labels = o.node_topology.as_ref().and_then(|t| t.match_labels.as_ref());
            labels.and_then(|l| l.get("zone")).map(String::as_str) == Some("a")
        });
        let annotations = in_a.and_then(|o| o.metadata.annotations).unwrap_or_default();
        let read = |key: &str| annotations.get(key).cloned();
        (read(DRIVER_CAPACITY_ANNOTATION), read(RESERVED_ANNOTATION))
    };
    assert_eq!(
        reserved_in_a().await,
        (Some("100Gi".to_string()), Some("30Gi".to_string())),
        "the object says what the driver has and what is reserved from it"
    );
    let metrics = h.metrics_text();
    let age = metrics
        .lines()
        .find_map(|l| l.strip_prefix("volplane_capacity_oldest_value_age_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the age of the oldest value");
    assert!(age <= started.elapsed().as_secs_f64(), "no older than the test: {age}");
    // A second placement, given back by the provisioner (provisioning failed).
    create(placed_claim("c2", "n1", "fast", "10Gi")).await;
    h.wait_for_published(
        "c2 in flight too",
        &[("fast", Some("a"), 60 * GI, None), ("fast", Some("b"), 100 * GI, None)],
    )
    .await;
    let unplace = json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": null}}});
    claims
        .patch("c2", &PatchParams::default(), &Patch::Merge(unplace))
        .await
        .expect("unplace");
    h.wait_for_published(
        "c2 given back",
        &[("fast", Some("a"), 70 * GI, None), ("fast", Some("b"), 100 * GI, None)],
    )
    .await;
    // c1's volume is created: the driver counts it, and the claim is bound.
    // Its reservation ends with the driver's next answer, so 30Gi are not
    // counted twice, and never zero times.
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(70 * GI));
    let bind = json!({"spec": {"volumeName": "pv-c1"}});
    claims
        .patch("c1", &PatchParams::default(), &Patch::Merge(bind))
        .await
        .expect("bind");
    eventually(Duration::from_secs(10), "no placement left in flight", || {
        h.metrics_text().contains("volplane_capacity_placements_in_flight 0")
    })
    .await;
    assert_eq!(
        h.published().await[0].2,
        format_bytes(70 * GI),
        "the driver's value alone once it counts the volume"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reserved_in_a().await != (None, None) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "annotations stay: {:?}",
            reserved_in_a().await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A placement whose pod (and claim) is deleted gives its bytes back at once.
    create(placed_claim("c3", "n2", "fast", "20Gi")).await;
    h.wait_for_published(
        "c3 in flight",
        &[("fast", Some("a"), 70 * GI, None), ("fast", Some("b"), 80 * GI, None)],
    )
    .await;
    claims.delete("c3", &DeleteParams::default()).await.expect("delete");
    h.wait_for_published(
        "c3 deleted",
        &[("fast", Some("a"), 70 * GI, None), ("fast", Some("b"), 100 * GI, None)],
    )
    .await;
    assert!(h.metrics_text().contains("volplane_capacity_reserved_bytes 0"));
    h.stop().await;
}

#[tokio::test]
async fn the_age_of_the_oldest_value_grows_while_nothing_is_polled() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(100 * GI));
    // Hourly polls: after the first answer the loop has nothing due.
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    h.wait_for_published("at rest", &[("fast", Some("a"), 100 * GI, None)])
        .await;
    let age = || {
        (h.metrics_text().lines())
            .find_map(|l| {
                l.strip_prefix("volplane_capacity_oldest_value_age_seconds ")?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    eventually(Duration::from_secs(10), "the age above 2 s", || age() >= 2.0).await;
    h.stop().await;
}

#[tokio::test]
async fn a_fall_of_the_drivers_value_ends_a_reservation_before_its_claim_is_bound() {
    let mut h = Harness::new().await;
    h.add_node("n1", Some("a"), &["zone"]).await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver.set_default_capacity(CapacityAnswer::available(100 * GI));
    h.start(config(Duration::from_secs(3600), Topology::Central, true))
        .await;
    h.wait_for_published("at rest", &[("fast", Some("a"), 100 * GI, None)])
        .await;
    let claims = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(h.client.clone(), NS);
    for (name, size) in [("c1", "30Gi"), ("c2", "10Gi")] {
        claims
            .create(&PostParams::default(), &placed_claim(name, "n1", "fast", size))
            .await
            .expect("claim");
    }
    h.wait_for_published("c1 and c2 in flight", &[("fast", Some("a"), 60 * GI, None)])
        .await;
    // c1's volume is created (csi-provisioner binds its claim seconds
    // later); c2 is given back, which asks the driver: its 30Gi fall is
    // c1's volume, counted once, not as 100 - 30 - 30.
    h.driver.set_default_capacity(CapacityAnswer::available(70 * GI));
    let unplace = json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": null}}});
    claims
        .patch("c2", &PatchParams::default(), &Patch::Merge(unplace))
        .await
        .expect("unplace");
    h.wait_for_published("c1's volume counted once", &[("fast", Some("a"), 70 * GI, None)])
        .await;
    eventually(Duration::from_secs(10), "c1 held, reserving nothing", || {
        let metrics = h.metrics_text();
        metrics.contains("volplane_capacity_placements_in_flight 0")
            && metrics.contains("volplane_capacity_reserved_bytes 0")
    })
    .await;
    // Bound and answered after: released, the value stays the driver's.
    let bind = json!({"spec": {"volumeName": "pv-c1"}});
    claims
        .patch("c1", &PatchParams::default(), &Patch::Merge(bind))
        .await
        .expect("bind");
    h.wait_for_published("c1 bound", &[("fast", Some("a"), 70 * GI, None)])
        .await;
    h.stop().await;
}

#[tokio::test]
async fn a_per_node_instance_reserves_what_its_nodes_placements_list() {
    let mut h = Harness::new().await;
    h.add_class("fast", "WaitForFirstConsumer", &[]).await;
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(100 * GI));
    let mut cfg = config(
        Duration::from_secs(3600),
        Topology::Fixed(Segment::new(zone("a"))),
        true,
    );
    cfg.volume_events = false;
    cfg.node_placements = Some("n1".into());
    h.start(cfg).await;
    h.wait_for_published("at rest", &[("fast", Some("a"), 100 * GI, None)])
        .await;
    let maps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(h.client.clone(), NS);
    let list = |node: &str, data: serde_json::Value| {
        serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(json!({
            "metadata": {"name": volplane_capacity::placements::config_map_name(node), "namespace": NS},
            "data": data
        }))
        .expect("configmap")
    };
    // Another node's list is not this instance's business.
    maps.create(
        &PostParams::default(),
        &list("n2", json!({"apps.x": format!("{} fast", 50 * GI)})),
    )
    .await
    .expect("n2");
    // An unreadable entry is skipped; the rest counts.
    let n1 = json!({"apps.c1": format!("{} fast", 30 * GI), "apps.bad": "nonsense"});
    maps.create(&PostParams::default(), &list("n1", n1)).await.expect("n1");
    h.wait_for_published("c1 in flight", &[("fast", Some("a"), 70 * GI, None)])
        .await;
    // c1's volume is created and the claim leaves the list: the driver is
    // asked again and its value alone is published.
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(70 * GI));
    let name = volplane_capacity::placements::config_map_name("n1");
    let bound = json!({"data": {"apps.c1": null, "apps.c2": format!("{} fast", 10 * GI)}});
    maps.patch(&name, &PatchParams::default(), &Patch::Merge(bound))
        .await
        .expect("patch");
    h.wait_for_published("c2 in flight", &[("fast", Some("a"), 60 * GI, None)])
        .await;
    // A bound claim of this node deleted (the central controller's release
    // mark): the driver is asked at once, and then every 250 ms for a
    // while, so the volume's deletion shows within a second although the
    // regular poll is hourly.
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(80 * GI));
    let released = json!({"metadata": {"annotations": {"volplane.io/released": "2026-12-06T05:00:00Z"}}});
    maps.patch(&name, &PatchParams::default(), &Patch::Merge(released))
        .await
        .expect("mark");
    h.wait_for_published("asked at the mark", &[("fast", Some("a"), 70 * GI, None)])
        .await;
    h.driver
        .set_capacity(Some(zone("a")), None, CapacityAnswer::available(90 * GI));
    h.wait_for_published("the deleted volume's bytes", &[("fast", Some("a"), 80 * GI, None)])
        .await;
    // The list goes (its node's ConfigMap deleted): nothing is reserved.
    maps.delete(&name, &DeleteParams::default()).await.expect("delete");
    h.wait_for_published("nothing in flight", &[("fast", Some("a"), 90 * GI, None)])
        .await;
    eventually(Duration::from_secs(10), "no placement held", || {
        h.metrics_text().contains("volplane_capacity_placements_in_flight 0")
    })
    .await;
    h.stop().await;
}
