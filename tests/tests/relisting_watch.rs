//! volplane-runtime's relisting watch against the API-server double: any
//! error after a list ends in a fresh list, announced by `Init` at once.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::watcher::{self, Event};
use volplane_runtime::relist::relisting;
use volplane_tests::apiserver::ApiServerDouble;
use volplane_tests::wait::within;

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..ConfigMap::default()
    }
}

/// The event names until the next `InitDone`, as `Init`, `+name`, `InitDone`,
/// `error` (live `Apply`/`Delete` as `apply name`/`delete name`).
async fn until_listed(
    stream: &mut futures::stream::BoxStream<'static, Result<Event<ConfigMap>, watcher::Error>>,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let event = within(Duration::from_secs(20), stream.next())
            .await
            .expect("stream ended");
        let name = |cm: &ConfigMap| cm.metadata.name.clone().unwrap_or_default();
        seen.push(match &event {
            Ok(Event::Init) => "Init".to_string(),
            Ok(Event::InitApply(cm)) => format!("+{}", name(cm)),
            Ok(Event::InitDone) => "InitDone".to_string(),
            Ok(Event::Apply(cm)) => format!("apply {}", name(cm)),
            Ok(Event::Delete(cm)) => format!("delete {}", name(cm)),
            Err(_) => "error".to_string(),
        });
        if matches!(event, Ok(Event::InitDone)) {
            return seen;
        }
    }
}

#[tokio::test]
async fn an_error_after_a_list_is_followed_by_init_and_a_complete_list() {
    let double = ApiServerDouble::start().await.expect("double");
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name))
            .await
            .expect("create");
    }
    let mut stream = relisting(api.clone(), watcher::Config::default());
    assert_eq!(until_listed(&mut stream).await, ["Init", "+a", "+b", "InitDone"]);

    // The API server goes away; "a" is deleted through the other one.
    double.cut_off();
    Api::<ConfigMap>::namespaced(double.side_client(), "default")
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let first = within(Duration::from_secs(20), stream.next()).await.expect("event");
    assert!(first.is_err(), "the broken watch reports its error first: {first:?}");
    let next = within(Duration::from_secs(20), stream.next()).await.expect("event");
    assert!(
        matches!(next, Ok(Event::Init)),
        "Init at once after the error: {next:?}"
    );
    double.reconnect();
    let relisted = until_listed(&mut stream).await;
    let listed: Vec<&String> = relisted.iter().filter(|e| e.starts_with('+')).collect();
    assert_eq!(listed, ["+b"], "{relisted:?}");
    assert!(relisted.contains(&"Init".to_string()), "{relisted:?}");
}
