//! The watched volumes: every bound PV of this driver with what its
//! annotations say was announced. An index fed by the PV watch; a re-list
//! forgets the PVs that vanished meanwhile (no event, no gauge, no write).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolume;
use tokio::time::Instant;
use volplane_runtime::{Index, ObjectKey};

use crate::metrics::{HealthMetrics, claim_labels};
use crate::model::{self, Condition, Watched};

/// The watched volumes by PV name.
pub(crate) struct Volumes {
    driver: String,
    metrics: Arc<HealthMetrics>,
    watched: BTreeMap<String, Watched>,
    /// What was last announced per PV (seeded from the annotation).
    announced: HashMap<String, Condition>,
    /// What each watched PV's annotation says now (from the watch).
    recorded: HashMap<String, Option<Condition>>,
    /// When each PV started being watched: a sweep that began earlier may
    /// have listed the driver before the volume existed, so it cannot call
    /// the volume missing.
    watched_since: HashMap<String, Instant>,
    /// The failed node each PV's annotation names (what some leader
    /// announced).
    node_failures: HashMap<String, String>,
    /// PVs that started or stopped being watched since the loop last took
    /// them (it schedules or drops their checks and writes).
    started: Vec<String>,
    stopped: Vec<String>,
}

impl Volumes {
    pub(crate) fn new(driver: String, metrics: Arc<HealthMetrics>) -> Self {
        Self {
            driver,
            metrics,
            watched: BTreeMap::new(),
            announced: HashMap::new(),
            recorded: HashMap::new(),
            watched_since: HashMap::new(),
            node_failures: HashMap::new(),
            started: Vec::new(),
            stopped: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.watched.len()
    }

    pub(crate) fn get(&self, pv: &str) -> Option<&Watched> {
        self.watched.get(pv)
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, pv: &str) -> bool {
        self.watched.contains_key(pv)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.watched.keys()
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Watched> {
        self.watched.values()
    }

    /// What was last announced for `pv`.
    pub(crate) fn announced(&self, pv: &str) -> Option<&Condition> {
        self.announced.get(pv)
    }

    /// `condition` was announced for `pv` (if it is still watched).
    pub(crate) fn set_announced(&mut self, pv: String, condition: Condition) {
        if self.watched.contains_key(&pv) {
            self.announced.insert(pv, condition);
        }
    }

    /// The condition `pv`'s annotation records.
    pub(crate) fn recorded(&self, pv: &str) -> Option<&Condition> {
        self.recorded.get(pv).and_then(Option::as_ref)
    }

    /// Whether `pv` started being watched after `at`.
    pub(crate) fn watched_after(&self, pv: &str, at: Instant) -> bool {
        self.watched_since.get(pv).is_some_and(|since| *since > at)
    }

    /// The failed nodes the PV annotations name: (PV's volume, node).
    pub(crate) fn node_failures(&self) -> impl Iterator<Item = (&Watched, &String)> {
        self.node_failures
            .iter()
            .filter_map(|(pv, node)| self.watched.get(pv).map(|volume| (volume, node)))
    }

    /// The PVs that started and stopped being watched since the last call.
    pub(crate) fn take_changes(&mut self) -> (Vec<String>, Vec<String>) {
        (std::mem::take(&mut self.started), std::mem::take(&mut self.stopped))
    }

    fn watch(&mut self, name: String, pv: &PersistentVolume, watched: Watched) {
        if !self.announced.contains_key(&name)
            && let Some(condition) = model::announced(pv)
        {
            self.metrics
                .abnormal
                .get_or_create(&claim_labels(&watched.namespace, &watched.claim))
                .set(1);
            self.announced.insert(name.clone(), condition);
        }
        self.recorded.insert(name.clone(), model::announced(pv));
        self.watched_since.entry(name.clone()).or_insert_with(Instant::now);
        match model::announced_node_failure(pv) {
            Some(node) => self.node_failures.insert(name.clone(), node),
            None => self.node_failures.remove(&name),
        };
        if self.watched.insert(name.clone(), watched).is_none() {
            self.started.push(name);
        }
    }

    fn forget(&mut self, name: &str) {
        if let Some(watched) = self.watched.remove(name) {
            self.metrics
                .abnormal
                .remove(&claim_labels(&watched.namespace, &watched.claim));
            self.stopped.push(name.to_string());
        }
        self.announced.remove(name);
        self.recorded.remove(name);
        self.watched_since.remove(name);
        self.node_failures.remove(name);
    }
}

impl Index<PersistentVolume> for Volumes {
    fn apply(&mut self, pv: PersistentVolume) {
        let Some(name) = pv.metadata.name.clone() else {
            return;
        };
        match model::watched(&pv, &self.driver) {
            Some(watched) => self.watch(name, &pv, watched),
            // Unbound, released or not ours (any more): not watched.
            None => self.forget(&name),
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.forget(&key.name);
    }

    fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.watched.keys().map(ObjectKey::cluster).collect()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use prometheus_client::registry::Registry;
    use serde_json::json;
    use volplane_runtime::Feed;

    use super::*;

    fn pv(name: &str, driver: &str, abnormal: Option<&str>) -> PersistentVolume {
        let annotations = abnormal.map(|message| json!({model::ABNORMAL_ANNOTATION: message}));
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"csi": {"driver": driver, "volumeHandle": format!("handle-{name}")},
                     "claimRef": {"namespace": "ns", "name": format!("claim-{name}")}},
            "status": {"phase": "Bound"}
        }))
        .expect("pv")
    }

    fn volumes() -> (Volumes, Arc<HealthMetrics>) {
        let metrics = Arc::new(HealthMetrics::register(&mut Registry::default()));
        (Volumes::new("d.example.com".into(), metrics.clone()), metrics)
    }

    fn abnormal_gauges(metrics: &HealthMetrics, pv: &str) -> i64 {
        metrics
            .abnormal
            .get(&claim_labels("ns", &format!("claim-{pv}")))
            .map_or(0, |gauge| gauge.get())
    }

    #[test]
    fn a_pv_deleted_during_a_gap_is_forgotten_with_its_gauge() {
        let (mut volumes, metrics) = volumes();
        let mut feed = Feed::new("volumes");
        feed.feed(Event::Init, &mut volumes);
        feed.feed(Event::InitApply(pv("a", "d.example.com", Some("lost"))), &mut volumes);
        feed.feed(Event::InitApply(pv("b", "d.example.com", None)), &mut volumes);
        feed.feed(Event::InitDone, &mut volumes);
        assert_eq!(abnormal_gauges(&metrics, "a"), 1);
        assert_eq!(volumes.take_changes().0.len(), 2);
        // "a" was deleted while the watch was away.
        feed.feed(Event::Init, &mut volumes);
        feed.feed(Event::InitApply(pv("b", "d.example.com", None)), &mut volumes);
        assert!(volumes.contains("a"), "decided only when the list ends");
        feed.feed(Event::InitDone, &mut volumes);
        assert!(!volumes.contains("a"));
        assert!(volumes.announced("a").is_none());
        assert_eq!(abnormal_gauges(&metrics, "a"), 0);
        assert_eq!(volumes.take_changes(), (vec![], vec!["a".to_string()]));
    }

    #[test]
    fn another_drivers_pv_is_neither_watched_nor_reported_vanished() {
        let (mut volumes, _) = volumes();
        let mut feed = Feed::new("volumes");
        feed.feed(Event::Init, &mut volumes);
        feed.feed(Event::InitApply(pv("a", "other.example.com", None)), &mut volumes);
        feed.feed(Event::InitDone, &mut volumes);
        assert_eq!(volumes.len(), 0);
        assert!(volumes.keys().is_empty());
    }
}
