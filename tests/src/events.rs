//! Reading events.k8s.io/v1 events back in tests.

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};

/// One occurrence of an event: (reason, the regarding object's name, note).
pub type Occurrence = (String, String, String);

/// Every occurrence of the events in `namespace`, in list order. kube's
/// recorder folds repeats of an identical event into one object with a
/// series count; each repeat counts here, so "announced once" means once.
pub async fn occurrences(client: &kube::Client, namespace: &str) -> kube::Result<Vec<Occurrence>> {
    let events = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    Ok(events
        .items
        .into_iter()
        .flat_map(|e| {
            let count = e.series.as_ref().map_or(1, |s| usize::try_from(s.count).unwrap_or(1));
            let occurrence = (
                e.reason.unwrap_or_default(),
                e.regarding.and_then(|r| r.name).unwrap_or_default(),
                e.note.unwrap_or_default(),
            );
            std::iter::repeat_n(occurrence, count)
        })
        .collect())
}

/// How many occurrences of `reason` about the object named `regarding` are
/// in `namespace` (events about cluster-scoped objects land in `default`);
/// 0 while the API server does not answer.
pub async fn count(client: &kube::Client, namespace: &str, reason: &str, regarding: &str) -> usize {
    occurrences(client, namespace)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|(r, about, _)| r == reason && about == regarding)
        .count()
}
