//! The placements controller against the API-server double: claims the
//! scheduler placed become each node's ConfigMap, and per-node capacity
//! instances reserve what their node's lists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use serde_json::json;
use volplane_capacity::placements::config_map_name;
use volplane_capacity::placements::publisher::{PlacementsController, PlacementsMetrics};
use volplane_runtime::Leadership;
use volplane_tests::apiserver::ApiServerDouble;
use volplane_tests::background::Background;
use volplane_tests::wait::{eventually_some, within};

const NS: &str = "volplane";

fn claim(name: &str, node: &str, size: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "annotations": {"volume.kubernetes.io/selected-node": node}},
        "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    }))
    .expect("claim")
}

async fn create<K>(api: &Api<K>, object: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).expect("object");
    api.create(&PostParams::default(), &object).await.expect("create");
}

/// The data of `node`'s ConfigMap once it equals `want`.
async fn wait_for_list(maps: &Api<ConfigMap>, node: &str, want: &[(&str, &str)]) -> ConfigMap {
    let want: BTreeMap<String, String> = want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    eventually_some(
        Duration::from_secs(10),
        &format!("{node}'s placements {want:?}"),
        || {
            let maps = maps.clone();
            let want = want.clone();
            let name = config_map_name(node);
            async move {
                let map = maps.get_opt(&name).await.ok().flatten()?;
                (map.data.clone().unwrap_or_default() == want).then_some(map)
            }
        },
    )
    .await
}

#[tokio::test]
async fn each_nodes_config_map_lists_the_claims_placed_there_until_they_are_bound() {
    let double = ApiServerDouble::start().await.expect("double");
    let client = double.client();
    for ns in [NS, "apps"] {
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": ns}}),
        )
        .await;
    }
    for node in ["n1", "n2"] {
        create(&Api::<Node>::all(client.clone()), json!({"metadata": {"name": node}})).await;
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "apps");
    // Placed before the controller starts: found by its list.
    claims
        .create(&PostParams::default(), &claim("early", "n1", "1Gi"))
        .await
        .expect("claim");
    let metrics = Arc::new(PlacementsMetrics::register(&mut Registry::default()));
    let controller = PlacementsController::new(client.clone(), NS, metrics.clone(), Leadership::unconditional());
    let mut ready = controller.readiness();
    let running = Background::spawn(|shutdown| controller.run(shutdown));
    within(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("ready");
    let maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let first = wait_for_list(&maps, "n1", &[("apps.early", "1073741824 fast")]).await;
    let owner = first.metadata.owner_references.unwrap_or_default();
    assert_eq!(owner.len(), 1);
    assert_eq!(
        (owner[0].kind.as_str(), owner[0].name.as_str()),
        ("Node", "n1"),
        "deleted with its node"
    );

    for (name, node) in [("a", "n1"), ("b", "n2"), ("c", "n2")] {
        claims
            .create(&PostParams::default(), &claim(name, node, "10Gi"))
            .await
            .expect("claim");
    }
    // A placement on a node that does not exist gets no ConfigMap.
    claims
        .create(&PostParams::default(), &claim("ghost", "n9", "10Gi"))
        .await
        .expect("claim");
    wait_for_list(
        &maps,
        "n1",
        &[("apps.early", "1073741824 fast"), ("apps.a", "10737418240 fast")],
    )
    .await;
    wait_for_list(
        &maps,
        "n2",
        &[("apps.b", "10737418240 fast"), ("apps.c", "10737418240 fast")],
    )
    .await;
    // Bound, given back, deleted: each leaves its node's list.
    let bind = json!({"spec": {"volumeName": "pv-a"}});
    claims
        .patch("a", &PatchParams::default(), &Patch::Merge(bind))
        .await
        .expect("bind");
    let unplace = json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": null}}});
    claims
        .patch("b", &PatchParams::default(), &Patch::Merge(unplace))
        .await
        .expect("unplace");
    claims.delete("early", &DeleteParams::default()).await.expect("delete");
    wait_for_list(&maps, "n1", &[]).await;
    wait_for_list(&maps, "n2", &[("apps.c", "10737418240 fast")]).await;
    // Someone else's edit is undone.
    let edit = json!({"data": {"apps.c": "1 fast", "apps.x": "5 fast"}});
    maps.patch(&config_map_name("n2"), &PatchParams::default(), &Patch::Merge(edit))
        .await
        .expect("edit");
    wait_for_list(&maps, "n2", &[("apps.c", "10737418240 fast")]).await;
    // A bound claim placed on n1 deleted: its volume is about to be, and
    // n1's instance is told by the release mark. Deleting a claim that
    // was never bound (b, c) marks nothing.
    let released = |map: Option<ConfigMap>| {
        map.and_then(|m| m.metadata.annotations)
            .and_then(|a| a.get("volplane.io/released").cloned())
    };
    assert_eq!(released(maps.get_opt(&config_map_name("n1")).await.expect("get")), None);
    claims.delete("a", &DeleteParams::default()).await.expect("delete");
    let mark = eventually_some(Duration::from_secs(10), "n1's release mark", || async {
        released(maps.get_opt(&config_map_name("n1")).await.ok().flatten())
    })
    .await;
    claims.delete("b", &DeleteParams::default()).await.expect("delete");
    claims
        .create(&PostParams::default(), &claim("d", "n2", "1Gi"))
        .await
        .expect("claim");
    let n2 = wait_for_list(
        &maps,
        "n2",
        &[("apps.c", "10737418240 fast"), ("apps.d", "1073741824 fast")],
    )
    .await;
    assert_eq!(released(Some(n2)), None, "b was never bound");
    assert_eq!(
        released(maps.get_opt(&config_map_name("n1")).await.expect("get")),
        Some(mark),
        "one mark per deletion"
    );
    assert!(maps.get_opt(&config_map_name("n9")).await.expect("get").is_none());
    assert_eq!(
        metrics.in_flight.get(),
        3,
        "c, d, and ghost on a node that does not exist"
    );
    running.stop(Duration::from_secs(10)).await;
}
