//! The CSI client against the scriptable test driver over a real unix socket.

use std::time::Duration;

use tonic::Code;
use volplane_csi::{
    CapacityQuery, CapacityReport, ControllerCapability, CsiClient, CsiError, CsiMethod, NodeCapability,
};
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, TestVolume, labels};
use volplane_tests::wait::within;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn probe_until_ready_succeeds_when_the_driver_starts_late() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("late.sock");
    let client = CsiClient::new(
        format!("unix:{}", socket.display()).parse().expect("address"),
        CALL_TIMEOUT,
    );

    let probing = tokio::spawn({
        let client = client.clone();
        async move { client.probe_until_ready(Some(Duration::from_secs(30))).await }
    });
    // The scenario: nothing listens for a while, so the first probes fail.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !probing.is_finished(),
        "probe must keep retrying while no driver listens"
    );
    let driver = TestDriver::start_at(&socket, DriverConfig::default())
        .await
        .expect("driver");

    within(Duration::from_secs(20), probing)
        .await
        .expect("join")
        .expect("driver becomes ready");
    assert!(driver.count(CsiMethod::Probe) >= 1);
}

#[tokio::test]
async fn probe_until_ready_waits_for_a_driver_that_reports_not_ready() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.set_ready(false);
    let client = driver.client(CALL_TIMEOUT);
    let probing = tokio::spawn(async move { client.probe_until_ready(None).await });

    // Wait (with a deadline) until the driver has answered "not ready" twice.
    within(Duration::from_secs(10), async {
        while driver.count(CsiMethod::Probe) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!probing.is_finished());
    driver.set_ready(true);
    within(Duration::from_secs(20), probing)
        .await
        .expect("join")
        .expect("ready");
}

#[tokio::test]
async fn probe_until_ready_gives_up_with_the_last_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("missing.sock");
    let client = CsiClient::new(socket.display().to_string().parse().expect("address"), CALL_TIMEOUT);
    let err = within(
        Duration::from_secs(10),
        client.probe_until_ready(Some(Duration::from_millis(500))),
    )
    .await
    .expect_err("nothing listens");
    let text = err.to_string();
    assert!(matches!(err, CsiError::NotReadyWithin { .. }), "{text}");
    assert!(text.contains("missing.sock"), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
}

#[tokio::test]
async fn a_delayed_call_fails_at_its_deadline_as_retryable() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.set_delay(CsiMethod::GetCapacity, Duration::from_secs(30));
    let client = driver.client(Duration::from_millis(200));
    let err = within(Duration::from_secs(10), client.get_capacity(&CapacityQuery::default()))
        .await
        .expect_err("must time out");
    assert!(
        matches!(
            err,
            CsiError::DeadlineExceeded {
                method: CsiMethod::GetCapacity,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.code(), Some(Code::DeadlineExceeded));

    // The deadline is per call: a prompt call on the same client still works.
    driver.set_delay(CsiMethod::GetCapacity, Duration::ZERO);
    within(Duration::from_secs(10), client.get_capacity(&CapacityQuery::default()))
        .await
        .expect("prompt call succeeds");
}

#[tokio::test]
async fn the_deadline_is_sent_to_the_driver() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.set_delay(CsiMethod::Probe, Duration::from_secs(30));
    let client = driver.client(Duration::from_millis(300));
    let err = within(Duration::from_secs(10), client.probe())
        .await
        .expect_err("times out");
    assert!(matches!(err, CsiError::DeadlineExceeded { .. }), "{err}");
    // grpc-timeout as the driver saw it: at most 300ms in some unit.
    let sent = driver.deadlines().pop().flatten().expect("grpc-timeout header sent");
    assert!(["300m", "300000u", "300000000n"].contains(&sent.as_str()), "{sent}");
}

#[tokio::test]
async fn driver_info_reads_every_capability() {
    let driver = TestDriver::start(DriverConfig {
        name: "hostpath.csi.k8s.io".into(),
        vendor_version: "v1.2.3".into(),
        controller_service: true,
        topology: true,
        controller_capabilities: vec![
            ControllerCapability::GetCapacity,
            ControllerCapability::ListVolumes,
            ControllerCapability::GetVolume,
            ControllerCapability::VolumeCondition,
        ],
        node_capabilities: Some(vec![NodeCapability::GetVolumeStats, NodeCapability::VolumeCondition]),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    let info = within(Duration::from_secs(10), driver.client(CALL_TIMEOUT).driver_info())
        .await
        .expect("driver info");
    assert_eq!(info.name, "hostpath.csi.k8s.io");
    assert_eq!(info.vendor_version, "v1.2.3");
    assert!(info.plugin.controller_service);
    assert!(info.supports_topology());
    for capability in [
        ControllerCapability::GetCapacity,
        ControllerCapability::ListVolumes,
        ControllerCapability::GetVolume,
        ControllerCapability::VolumeCondition,
    ] {
        assert!(info.has_controller(capability), "{capability:?}");
    }
    assert!(!info.has_controller(ControllerCapability::CreateDeleteVolume));
    assert!(info.has_node(NodeCapability::GetVolumeStats));
    assert!(info.has_node(NodeCapability::VolumeCondition));
    assert!(!info.has_node(NodeCapability::StageUnstageVolume));
    assert_eq!(
        info.controller_names(),
        ["LIST_VOLUMES", "GET_CAPACITY", "VOLUME_CONDITION", "GET_VOLUME"]
    );
}

#[tokio::test]
async fn driver_info_without_controller_or_node_service() {
    let driver = TestDriver::start(DriverConfig {
        controller_service: false,
        topology: false,
        controller_capabilities: vec![ControllerCapability::GetCapacity],
        node_capabilities: None,
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    let info = within(Duration::from_secs(10), driver.client(CALL_TIMEOUT).driver_info())
        .await
        .expect("driver info");
    assert!(!info.plugin.controller_service);
    assert!(!info.supports_topology());
    // Controller capabilities are not even asked for without CONTROLLER_SERVICE.
    assert!(info.controller.is_empty());
    assert_eq!(driver.count(CsiMethod::ControllerGetCapabilities), 0);
    assert_eq!(info.node, None);
}

#[tokio::test]
async fn driver_errors_surface_with_the_right_kind() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    let client = driver.client(CALL_TIMEOUT);
    let cases = [
        (Code::Unavailable, true),
        (Code::ResourceExhausted, true),
        (Code::Aborted, true),
        (Code::Internal, true),
        (Code::InvalidArgument, false),
        (Code::NotFound, false),
        (Code::FailedPrecondition, false),
        (Code::PermissionDenied, false),
        (Code::Unimplemented, false),
    ];
    for (code, retryable) in cases {
        driver.fail_next(CsiMethod::GetCapacity, 1, code, "scripted failure");
        let err = within(Duration::from_secs(10), client.get_capacity(&CapacityQuery::default()))
            .await
            .expect_err("scripted failure");
        assert_eq!(err.code(), Some(code), "{err}");
        assert_eq!(err.is_retryable(), retryable, "{code:?}");
        assert!(err.to_string().contains("scripted failure"), "{err}");
    }
    // Failures were one-shot: the next call succeeds.
    within(Duration::from_secs(10), client.get_capacity(&CapacityQuery::default()))
        .await
        .expect("succeeds after scripted failures");
}

#[tokio::test]
async fn get_capacity_round_trips_parameters_topology_and_both_sizes() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    let zone_a = labels([("topology.example.com/zone", "a"), ("topology.example.com/rack", "r1")]);
    let fast = labels([("type", "fast"), ("replicas", "3")]);
    driver.set_default_capacity(CapacityAnswer::available(1));
    driver.set_capacity(
        Some(zone_a.clone()),
        Some(fast.clone()),
        CapacityAnswer {
            available: 10 << 30,
            maximum: Some(4 << 30),
            minimum: Some(1 << 20),
        },
    );
    let client = driver.client(CALL_TIMEOUT);

    let query = CapacityQuery {
        parameters: fast.clone(),
        topology: Some(zone_a.clone()),
    };
    let report = within(Duration::from_secs(10), client.get_capacity(&query))
        .await
        .expect("capacity");
    assert_eq!(
        report,
        CapacityReport {
            available_capacity: 10 << 30,
            maximum_volume_size: Some(4 << 30),
            minimum_volume_size: Some(1 << 20),
        }
    );

    // Another topology falls through to the default answer, sizes unset.
    let other = CapacityQuery {
        parameters: fast.clone(),
        topology: Some(labels([("topology.example.com/zone", "b")])),
    };
    let report = within(Duration::from_secs(10), client.get_capacity(&other))
        .await
        .expect("capacity");
    assert_eq!(report.available_capacity, 1);
    assert_eq!(report.maximum_volume_size, None);

    // Without topology, no accessible_topology is sent at all.
    let flat = CapacityQuery {
        parameters: fast.clone(),
        topology: None,
    };
    within(Duration::from_secs(10), client.get_capacity(&flat))
        .await
        .expect("capacity");

    let requests = driver.capacity_requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].parameters, fast);
    assert_eq!(
        requests[0].accessible_topology.as_ref().map(|t| &t.segments),
        Some(&zone_a)
    );
    assert_eq!(requests[2].accessible_topology, None);
    assert!(requests.iter().all(|r| r.volume_capabilities.is_empty()));
}

#[tokio::test]
async fn negative_capacity_from_the_driver_is_rejected() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.set_default_capacity(CapacityAnswer {
        available: -1,
        maximum: None,
        minimum: None,
    });
    let err = within(
        Duration::from_secs(10),
        driver.client(CALL_TIMEOUT).get_capacity(&CapacityQuery::default()),
    )
    .await
    .expect_err("negative");
    assert!(matches!(err, CsiError::InvalidResponse { .. }), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn the_client_reconnects_after_the_driver_restarts() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("restart.sock");
    drop(driver);
    let first = TestDriver::start_at(&socket, DriverConfig::default())
        .await
        .expect("driver");
    let client = first.client(CALL_TIMEOUT);
    within(Duration::from_secs(10), client.probe())
        .await
        .expect("first driver answers");

    first.stop().await;
    let err = within(Duration::from_secs(10), client.probe())
        .await
        .expect_err("driver is gone");
    assert!(err.is_retryable(), "{err}");

    let second = TestDriver::start_at(&socket, DriverConfig::default())
        .await
        .expect("driver");
    within(Duration::from_secs(10), async {
        while client.probe().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(second.count(CsiMethod::Probe) >= 1);
}

#[tokio::test]
async fn list_volumes_pages_with_next_token_and_rejects_a_stale_token() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    for i in 0..25 {
        driver.put_volume(
            &format!("vol-{i:03}"),
            TestVolume {
                capacity_bytes: 1 << 30,
                condition: (i == 7).then(|| (true, "disk failed".to_string())),
                ..TestVolume::default()
            },
        );
    }
    let client = driver.client(CALL_TIMEOUT);
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = within(Duration::from_secs(10), client.list_volumes(10, token.as_deref()))
            .await
            .expect("page");
        pages += 1;
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.into_iter().map(|e| {
            let abnormal = e.status.and_then(|s| s.volume_condition).is_some_and(|c| c.abnormal);
            (e.volume.map(|v| v.volume_id).unwrap_or_default(), abnormal)
        }));
        match page.next_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert_eq!(
        seen.iter().filter(|(_, abnormal)| *abnormal).collect::<Vec<_>>(),
        [&("vol-007".to_string(), true)]
    );

    let err = within(Duration::from_secs(10), client.list_volumes(10, Some("no-such-volume")))
        .await
        .expect_err("stale token");
    assert_eq!(err.code(), Some(Code::Aborted));
    assert!(err.is_retryable());
}

#[tokio::test]
async fn controller_get_volume_reports_condition_and_not_found() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.put_volume(
        "vol-1",
        TestVolume {
            condition: Some((true, "read-only file system".into())),
            published_node_ids: vec!["node-1".into()],
            ..TestVolume::default()
        },
    );
    let client = driver.client(CALL_TIMEOUT);
    let response = within(Duration::from_secs(10), client.controller_get_volume("vol-1"))
        .await
        .expect("volume");
    let status = response.status.expect("status");
    assert_eq!(status.published_node_ids, ["node-1"]);
    let condition = status.volume_condition.expect("condition");
    assert!(condition.abnormal);
    assert_eq!(condition.message, "read-only file system");

    let err = within(Duration::from_secs(10), client.controller_get_volume("vol-2"))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn node_get_info_and_volume_stats() {
    let driver = TestDriver::start(DriverConfig {
        node_id: "worker-7".into(),
        node_topology: Some(labels([("topology.example.com/node", "worker-7")])),
        node_capabilities: Some(vec![NodeCapability::GetVolumeStats]),
        ..DriverConfig::default()
    })
    .await
    .expect("driver");
    driver.put_volume(
        "vol-1",
        TestVolume {
            bytes: Some((10, 100, 90)),
            inodes: Some((5, 50, 45)),
            ..TestVolume::default()
        },
    );
    let client = driver.client(CALL_TIMEOUT);
    let info = within(Duration::from_secs(10), client.node_get_info())
        .await
        .expect("info");
    assert_eq!(info.node_id, "worker-7");
    assert_eq!(
        info.accessible_topology.map(|t| t.segments),
        Some(labels([("topology.example.com/node", "worker-7")]))
    );
    let stats = within(
        Duration::from_secs(10),
        client.node_get_volume_stats("vol-1", "/var/lib/kubelet/x"),
    )
    .await
    .expect("stats");
    assert_eq!(stats.usage.len(), 2);
    assert_eq!(
        (stats.usage[0].available, stats.usage[0].total, stats.usage[0].used),
        (10, 100, 90)
    );
    assert_eq!(
        driver.calls().last().map(|c| c.method()),
        Some(CsiMethod::NodeGetVolumeStats)
    );
}

/// What an observer of the client heard: (method, code) per call.
#[derive(Debug, Default)]
struct Heard(std::sync::Mutex<Vec<(CsiMethod, Code)>>);

impl volplane_csi::CallObserver for Heard {
    fn call_ended(&self, method: CsiMethod, code: Code, _elapsed: Duration) {
        self.0.lock().expect("lock").push((method, code));
    }
}

#[tokio::test]
async fn an_observer_hears_every_call_with_its_code_also_one_given_up_on() {
    let driver = TestDriver::start(DriverConfig::default()).await.expect("driver");
    driver.set_default_capacity(CapacityAnswer::available(1 << 30));
    let heard = std::sync::Arc::new(Heard::default());
    let client = driver.client(CALL_TIMEOUT).observed_by(heard.clone());
    client.probe().await.expect("probe");
    driver.fail_next(CsiMethod::GetCapacity, 1, Code::ResourceExhausted, "busy");
    client.get_capacity(&CapacityQuery::default()).await.expect_err("busy");
    // The caller gives up before the driver answers: heard as Canceled.
    driver.set_delay(CsiMethod::GetCapacity, Duration::from_secs(30));
    let query = CapacityQuery::default();
    let given_up = tokio::time::timeout(Duration::from_millis(200), client.get_capacity(&query));
    assert!(given_up.await.is_err(), "still waiting for the driver");
    let heard = heard.0.lock().expect("lock").clone();
    assert_eq!(
        heard,
        [
            (CsiMethod::Probe, Code::Ok),
            (CsiMethod::GetCapacity, Code::ResourceExhausted),
            (CsiMethod::GetCapacity, Code::Cancelled),
        ]
    );
}
