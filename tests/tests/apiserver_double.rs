//! kube-runtime and a real `kube::Client` against the API-server double.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use serde_json::json;
use volplane_tests::apiserver::{ApiServerDouble, Verb};
use volplane_tests::wait::{eventually, within};

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), value.to_string())])),
        ..ConfigMap::default()
    }
}

fn api_status(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn a_watcher_sees_create_update_delete_in_order() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let mut events = watcher::watcher(api.clone(), watcher::Config::default()).boxed();

    // The initial list of an empty namespace completes first.
    loop {
        match within(Duration::from_secs(10), events.try_next()).await.expect("watch") {
            Some(Event::InitDone) => break,
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    api.create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect("create");
    let mut updated = api.get("a").await.expect("get");
    updated.data = Some(BTreeMap::from([("k".to_string(), "2".to_string())]));
    api.replace("a", &PostParams::default(), &updated)
        .await
        .expect("replace");
    api.delete("a", &DeleteParams::default()).await.expect("delete");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        match within(Duration::from_secs(10), events.try_next()).await.expect("watch") {
            Some(Event::Apply(cm)) => seen.push(format!("apply {}", cm.data.unwrap_or_default()["k"])),
            Some(Event::Delete(cm)) => seen.push(format!("delete {}", cm.metadata.name.unwrap_or_default())),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    assert_eq!(seen, ["apply 1", "apply 2", "delete a"]);
}

#[tokio::test]
async fn a_reflector_heals_after_watches_drop_and_history_is_compacted() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector::reflector(writer, watcher::watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
    let task = tokio::spawn(stream);
    within(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready");

    api.create(&PostParams::default(), &config_map("before", "1"))
        .await
        .expect("create");
    eventually(Duration::from_secs(10), "reflector sees 'before'", || {
        reader.state().len() == 1
    })
    .await;
    let lists_before = double.count(Verb::List, "configmaps");

    // Drop every watch and answer the re-watch with 410 Gone, as a real API
    // server does for a compacted revision: the watcher must re-list.
    double.fail_next(Some(Verb::Watch), Some("configmaps"), 1, 410);
    double.drop_watches();
    api.create(&PostParams::default(), &config_map("during", "1"))
        .await
        .expect("create");
    api.delete("before", &DeleteParams::default()).await.expect("delete");

    eventually(Duration::from_secs(20), "reflector converges after re-list", || {
        let names: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|cm| cm.metadata.name.clone())
            .collect();
        names == ["during"]
    })
    .await;
    assert!(
        double.count(Verb::List, "configmaps") > lists_before,
        "a re-list happened"
    );

    // The same through expiry of every revision handed out so far.
    let lists_before = double.count(Verb::List, "configmaps");
    double.force_relist();
    api.create(&PostParams::default(), &config_map("after", "1"))
        .await
        .expect("create");
    eventually(
        Duration::from_secs(20),
        "reflector converges after forced re-list",
        || reader.state().len() == 2 && double.count(Verb::List, "configmaps") > lists_before,
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn a_stale_replace_gets_409_conflict() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let created = api
        .create(&PostParams::default(), &config_map("c", "1"))
        .await
        .expect("create");
    let mut first = created.clone();
    first.data = Some(BTreeMap::from([("k".to_string(), "2".to_string())]));
    api.replace("c", &PostParams::default(), &first)
        .await
        .expect("first replace");
    let mut stale = created;
    stale.data = Some(BTreeMap::from([("k".to_string(), "3".to_string())]));
    let error = api
        .replace("c", &PostParams::default(), &stale)
        .await
        .expect_err("stale");
    assert_eq!(api_status(error), (409, "Conflict".to_string()));
    assert_eq!(api.get("c").await.expect("get").data.unwrap_or_default()["k"], "2");
}

#[tokio::test]
async fn create_conflicts_generate_names_and_validates_labels() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<CSIStorageCapacity> = Api::namespaced(double.client(), "default");
    let capacity = |labels: BTreeMap<String, String>| CSIStorageCapacity {
        metadata: ObjectMeta {
            generate_name: Some("csisc-".into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        storage_class_name: "fast".into(),
        ..CSIStorageCapacity::default()
    };
    let created = api
        .create(
            &PostParams::default(),
            &capacity(BTreeMap::from([("a".into(), "b".into())])),
        )
        .await
        .expect("create");
    let name = created.metadata.name.expect("generated name");
    assert!(name.starts_with("csisc-") && name.len() > "csisc-".len(), "{name}");
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());

    let too_long = capacity(BTreeMap::from([("a".into(), "x".repeat(64))]));
    let error = api
        .create(&PostParams::default(), &too_long)
        .await
        .expect_err("invalid label");
    assert_eq!(api_status(error).0, 422);

    let cm: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    cm.create(&PostParams::default(), &config_map("x", "1"))
        .await
        .expect("create");
    let error = cm
        .create(&PostParams::default(), &config_map("x", "1"))
        .await
        .expect_err("exists");
    assert_eq!(api_status(error), (409, "AlreadyExists".to_string()));

    let elsewhere: Api<ConfigMap> = Api::namespaced(double.client(), "missing");
    let error = elsewhere
        .create(&PostParams::default(), &config_map("x", "1"))
        .await
        .expect_err("no ns");
    assert_eq!(api_status(error).0, 404);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let double = ApiServerDouble::start().await.expect("double");
    let client = double.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("other".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .expect("namespace");
    for (ns, name, node, tier) in [
        ("default", "a", "n1", "gold"),
        ("default", "b", "n2", "silver"),
        ("other", "c", "n1", "bronze"),
    ] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"tier": tier}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("create");
    }
    let all: Api<Pod> = Api::all(client.clone());
    let names = |list: kube::core::ObjectList<Pod>| {
        list.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(all.list(&ListParams::default()).await.expect("list")),
        ["a", "b", "c"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("spec.nodeName=n1"))
                .await
                .expect("list")
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("tier in (gold,bronze)"))
                .await
                .expect("list")
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            all.list(
                &ListParams::default()
                    .labels("tier!=gold")
                    .fields("metadata.namespace=default")
            )
            .await
            .expect("list")
        ),
        ["b"]
    );
    // Paging with limit/continue returns everything exactly once.
    let first = all.list(&ListParams::default().limit(2)).await.expect("page 1");
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = all
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(
        names(first).into_iter().chain(names(second)).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
}

#[tokio::test]
async fn patches_and_the_status_subresource() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<PersistentVolumeClaim> = Api::namespaced(double.client(), "default");
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .expect("pvc");
    api.create(&PostParams::default(), &pvc).await.expect("create");

    let merged = api
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(merged.metadata.labels.unwrap_or_default()["x"], "y");

    let json_patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]))
            .expect("ops");
    let patched = api
        .patch("data", &PatchParams::default(), &Patch::<()>::Json(json_patch))
        .await
        .expect("json patch");
    assert_eq!(patched.metadata.annotations.unwrap_or_default()["a"], "b");

    // Status cannot change through the main resource, only through /status.
    let ignored = api
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await
        .expect("patch");
    assert!(ignored.status.and_then(|s| s.phase).is_none());
    let bound = api
        .patch_status(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await
        .expect("status patch");
    assert_eq!(bound.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
}

#[tokio::test]
async fn garbage_collection_removes_pvcs_of_a_deleted_pod() {
    let double = ApiServerDouble::start().await.expect("double");
    double.enable_garbage_collection(true);
    let client = double.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": []}})).expect("pod");
    let pod = pods.create(&PostParams::default(), &pod).await.expect("pod");
    let owned = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("p-scratch".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: "p".into(),
                uid: pod.metadata.uid.clone().expect("uid"),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        ..PersistentVolumeClaim::default()
    };
    pvcs.create(&PostParams::default(), &owned).await.expect("pvc");
    pods.delete("p", &DeleteParams::default()).await.expect("delete pod");
    let error = pvcs.get("p-scratch").await.expect_err("collected");
    assert_eq!(api_status(error).0, 404);
}

#[tokio::test]
async fn injected_faults_fail_exactly_the_next_requests_and_are_logged() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    double.fail_next(Some(Verb::Create), Some("configmaps"), 2, 403);
    for _ in 0..2 {
        let error = api
            .create(&PostParams::default(), &config_map("f", "1"))
            .await
            .expect_err("injected");
        assert_eq!(api_status(error), (403, "Forbidden".to_string()));
    }
    api.create(&PostParams::default(), &config_map("f", "1"))
        .await
        .expect("third succeeds");
    assert_eq!(double.count(Verb::Create, "configmaps"), 3);
    assert_eq!(double.writes("configmaps"), 3);
    assert_eq!(double.count(Verb::Get, "configmaps"), 0);
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_gets_410() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    api.create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect("create");
    let old = double.revision().to_string();
    api.create(&PostParams::default(), &config_map("b", "1"))
        .await
        .expect("create");
    double.compact();
    let mut stream = api
        .watch(&kube::api::WatchParams::default().timeout(5), &old)
        .await
        .expect("watch opens")
        .boxed();
    let first = within(Duration::from_secs(10), stream.next()).await;
    match first {
        Some(Ok(kube::core::WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        Some(Err(kube::Error::Api(status))) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Expired, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_lists_the_short_names_kubectl_resolves() {
    let double = ApiServerDouble::start().await.expect("double");
    let request = http::Request::get("/api/v1").body(Vec::new()).expect("request");
    let list: serde_json::Value = double.client().request(request).await.expect("GET /api/v1");
    let names = |plural: &str| -> Vec<String> {
        let resource = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == plural)
            .unwrap_or_else(|| panic!("{plural} is served"));
        let names: Option<Vec<String>> = serde_json::from_value(resource["shortNames"].clone()).expect("a list");
        names.unwrap_or_default()
    };
    assert_eq!(names("persistentvolumeclaims"), ["pvc"]);
    assert_eq!(names("persistentvolumes"), ["pv"]);
    assert_eq!(names("pods"), ["po"]);
    assert!(names("pods/status").is_empty());
}

#[tokio::test]
async fn continue_tokens_page_through_the_first_pages_snapshot() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    for name in ["a", "b", "c", "d"] {
        api.create(&PostParams::default(), &config_map(name, "1"))
            .await
            .expect("create");
    }
    let first = api.list(&ListParams::default().limit(2)).await.expect("page 1");
    let revision = first.metadata.resource_version.clone().expect("revision");
    // Changes after the first page are not in the later ones...
    api.delete("d", &DeleteParams::default()).await.expect("delete d");
    api.create(&PostParams::default(), &config_map("e", "1"))
        .await
        .expect("create e");
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    let names: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .filter_map(|cm| cm.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(second.metadata.resource_version.as_deref(), Some(revision.as_str()));
    assert!(second.metadata.continue_.is_none());
    // ...and a watch from the list's revision replays them.
    let mut stream = api
        .watch(&kube::api::WatchParams::default().timeout(5), &revision)
        .await
        .expect("watch")
        .boxed();
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        match within(Duration::from_secs(10), stream.next()).await {
            Some(Ok(kube::core::WatchEvent::Deleted(cm))) => {
                replayed.push(format!("deleted {}", cm.metadata.name.unwrap_or_default()))
            }
            Some(Ok(kube::core::WatchEvent::Added(cm))) => {
                replayed.push(format!("added {}", cm.metadata.name.unwrap_or_default()))
            }
            other => panic!("expected the replayed changes, got {other:?}"),
        }
    }
    assert_eq!(replayed, ["deleted d", "added e"]);
}

#[tokio::test]
async fn a_continue_token_older_than_the_kept_snapshots_gets_410() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name, "1"))
            .await
            .expect("create");
    }
    let first = api.list(&ListParams::default().limit(1)).await.expect("page 1");
    let token = first.metadata.continue_.clone().expect("token");
    for _ in 0..100 {
        api.list(&ListParams::default().limit(1)).await.expect("other lists");
    }
    let error = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .expect_err("expired");
    assert_eq!(api_status(error), (410, "Expired".to_string()));
}

#[tokio::test]
async fn a_cut_off_main_door_refuses_while_the_side_door_changes_things() {
    let double = ApiServerDouble::start().await.expect("double");
    let main: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let side: Api<ConfigMap> = Api::namespaced(double.side_client(), "default");
    main.create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect("create");
    let before = double.revision().to_string();
    let mut watch = main
        .watch(&kube::api::WatchParams::default().timeout(30), &before)
        .await
        .expect("watch")
        .boxed();
    double.cut_off();
    // The main door's watch ends without the change...
    side.delete("a", &DeleteParams::default())
        .await
        .expect("delete through the side door");
    assert!(
        within(Duration::from_secs(10), watch.next()).await.is_none(),
        "the cut watch delivered an event"
    );
    let error = main.get("a").await.expect_err("the main door is away");
    assert_eq!(api_status(error).0, 500);
    // ...and back, a watch from before the gap must re-list.
    double.reconnect();
    let mut again = main
        .watch(&kube::api::WatchParams::default().timeout(5), &before)
        .await
        .expect("watch")
        .boxed();
    match within(Duration::from_secs(10), again.next()).await {
        Some(Ok(kube::core::WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    assert!(main.get_opt("a").await.expect("get").is_none());
}
