use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use proptest::prelude::*;

use super::*;

/// Objects named by the index tests: a version in the data, and a label
/// that makes the index ignore them (as a controller ignores another
/// driver's PVs).
fn object(name: &str, version: u64, ignored: bool) -> ConfigMap {
    let labels = ignored.then(|| [("ignored".to_string(), "true".to_string())].into());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some("ns".to_string()),
            labels,
            ..ObjectMeta::default()
        },
        data: Some([("version".to_string(), version.to_string())].into()),
        ..ConfigMap::default()
    }
}

fn version(object: &ConfigMap) -> u64 {
    object
        .data
        .as_ref()
        .and_then(|data| data.get("version"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ignored(object: &ConfigMap) -> bool {
    object
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key("ignored"))
}

/// An index as controllers write them: it holds the versions of the
/// objects it cares about and drops one that stops mattering.
#[derive(Default)]
struct Versions {
    held: BTreeMap<ObjectKey, u64>,
    deletes: Vec<ObjectKey>,
}

impl Index<ConfigMap> for Versions {
    fn apply(&mut self, object: ConfigMap) {
        let Some(key) = ObjectKey::of(&object) else { return };
        if ignored(&object) {
            self.held.remove(&key);
        } else {
            self.held.insert(key, version(&object));
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        self.deletes.push(key.clone());
        self.held.remove(key);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.held.keys().cloned().collect()
    }
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::namespaced("ns", name)
}

fn listed(feed: &mut Feed, index: &mut Versions, objects: Vec<ConfigMap>) -> Fed {
    assert_eq!(feed.feed(Event::Init, index), Fed::Listing);
    for object in objects {
        assert_eq!(feed.feed(Event::InitApply(object), index), Fed::Listing);
        assert!(!feed.is_current());
    }
    feed.feed(Event::InitDone, index)
}

#[test]
fn a_feed_is_current_only_after_its_first_list_ends() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    assert!(!feed.is_current());
    assert_eq!(feed.feed(Event::Init, &mut index), Fed::Listing);
    assert!(!feed.is_current());
    assert!(!feed.is_relisting(), "a first list is not a re-list");
    assert_eq!(
        feed.feed(Event::InitDone, &mut index),
        Fed::Listed {
            first: true,
            removed: 0
        }
    );
    assert!(feed.is_current());
}

#[test]
fn a_relist_deletes_what_vanished_during_the_gap() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    listed(
        &mut feed,
        &mut index,
        vec![object("a", 1, false), object("b", 1, false)],
    );
    // The watch broke; "a" was deleted and "c" created while it was away.
    assert!(!feed.is_relisting());
    assert_eq!(feed.feed(Event::Init, &mut index), Fed::Listing);
    assert!(!feed.is_current());
    assert!(feed.is_relisting());
    feed.feed(Event::InitApply(object("b", 2, false)), &mut index);
    feed.feed(Event::InitApply(object("c", 1, false)), &mut index);
    assert_eq!(
        feed.feed(Event::InitDone, &mut index),
        Fed::Listed {
            first: false,
            removed: 1
        }
    );
    assert_eq!(index.deletes, vec![key("a")]);
    assert_eq!(index.held, [(key("b"), 2), (key("c"), 1)].into());
    assert!(feed.is_current());
    assert!(!feed.is_relisting());
}

#[test]
fn a_list_that_starts_over_judges_by_the_last_complete_one() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    listed(&mut feed, &mut index, vec![object("a", 1, false)]);
    feed.feed(Event::Init, &mut index);
    feed.feed(Event::InitApply(object("a", 1, false)), &mut index);
    feed.feed(Event::InitApply(object("b", 1, false)), &mut index);
    // The list failed on its second page; the next one no longer has "a" or "b".
    feed.feed(Event::Init, &mut index);
    feed.feed(Event::InitApply(object("c", 1, false)), &mut index);
    feed.feed(Event::InitDone, &mut index);
    assert_eq!(index.held, [(key("c"), 1)].into());
}

#[test]
fn live_events_apply_and_delete_with_their_keys() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    listed(&mut feed, &mut index, vec![]);
    assert_eq!(
        feed.feed(Event::Apply(object("a", 1, false)), &mut index),
        Fed::Applied(key("a"))
    );
    assert_eq!(
        feed.feed(Event::Delete(object("a", 1, false)), &mut index),
        Fed::Deleted(key("a"))
    );
    assert!(index.held.is_empty());
    assert!(feed.is_current());
}

#[test]
fn an_object_without_a_name_changes_nothing() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    let mut unnamed = object("a", 1, false);
    unnamed.metadata.name = None;
    assert_eq!(feed.feed(Event::InitApply(unnamed.clone()), &mut index), Fed::Unnamed);
    unnamed.metadata.name = Some(String::new());
    assert_eq!(feed.feed(Event::Apply(unnamed.clone()), &mut index), Fed::Unnamed);
    assert_eq!(feed.feed(Event::Delete(unnamed), &mut index), Fed::Unnamed);
    assert!(index.held.is_empty());
}

#[test]
fn an_ignored_object_is_not_reported_vanished() {
    let mut feed = Feed::new("test");
    let mut index = Versions::default();
    listed(&mut feed, &mut index, vec![object("a", 1, true), object("b", 1, false)]);
    let fed = listed(&mut feed, &mut index, vec![object("b", 1, false)]);
    assert_eq!(
        fed,
        Fed::Listed {
            first: false,
            removed: 0
        }
    );
    assert!(index.deletes.is_empty());
}

#[test]
fn keys_display_as_kubectl_names_them() {
    assert_eq!(key("a").to_string(), "ns/a");
    assert_eq!(ObjectKey::cluster("pv-1").to_string(), "pv-1");
}

/// What happens to the collection, and to the watch, in one step.
#[derive(Clone, Debug)]
enum Step {
    /// An object is created or changed.
    Put { name: u8, ignored: bool },
    /// An object is deleted.
    Remove { name: u8 },
    /// The watch breaks; `changes` happen unseen; the re-list brings the
    /// objects in `order`'s order, and fails after `fail_after` of them
    /// when set (with `more` changes before the list that completes).
    Gap {
        changes: Vec<Step>,
        order: Vec<u8>,
        fail_after: Option<usize>,
        more: Vec<Step>,
    },
}

fn change() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..8, any::<bool>()).prop_map(|(name, ignored)| Step::Put { name, ignored }),
        (0u8..8).prop_map(|name| Step::Remove { name }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => change(),
        1 => (
            prop::collection::vec(change(), 0..10),
            Just((0u8..8).collect::<Vec<u8>>()).prop_shuffle(),
            prop::option::of(0usize..8),
            prop::collection::vec(change(), 0..5),
        )
            .prop_map(|(changes, order, fail_after, more)| Step::Gap { changes, order, fail_after, more }),
    ]
}

/// The collection as the API server holds it: name → (version, ignored).
type Collection = BTreeMap<u8, (u64, bool)>;

fn name(n: u8) -> String {
    format!("object-{n}")
}

/// Changes the collection; returns the event a live watch would deliver.
fn change_collection(collection: &mut Collection, step: &Step, clock: &mut u64) -> Option<Event<ConfigMap>> {
    *clock += 1;
    match *step {
        Step::Put { name: n, ignored } => {
            collection.insert(n, (*clock, ignored));
            Some(Event::Apply(object(&name(n), *clock, ignored)))
        }
        Step::Remove { name: n } => collection
            .remove(&n)
            .map(|(version, ignored)| Event::Delete(object(&name(n), version, ignored))),
        Step::Gap { .. } => None,
    }
}

/// The index computed from scratch: every object of the collection the
/// index does not ignore.
fn from_scratch(collection: &Collection) -> BTreeMap<ObjectKey, u64> {
    collection
        .iter()
        .filter(|(_, (_, ignored))| !ignored)
        .map(|(n, (version, _))| (key(&name(*n)), *version))
        .collect()
}

fn relist(feed: &mut Feed, index: &mut Versions, collection: &Collection, order: &[u8], stop: Option<usize>) {
    assert_eq!(feed.feed(Event::Init, index), Fed::Listing);
    let listed = order.iter().filter_map(|n| collection.get(n).map(|entry| (*n, *entry)));
    for (count, (n, (version, ignored))) in listed.enumerate() {
        if stop == Some(count) {
            return;
        }
        assert_eq!(
            feed.feed(Event::InitApply(object(&name(n), version, ignored)), index),
            Fed::Listing
        );
        assert!(!feed.is_current(), "current in the middle of a list");
    }
    if stop.is_some() {
        // The list failed on its last page: no InitDone for it.
        return;
    }
    let held_before = index.keys();
    let fed = feed.feed(Event::InitDone, index);
    let expected_removed = held_before
        .iter()
        .filter(|k| {
            !order
                .iter()
                .any(|n| collection.contains_key(n) && **k == key(&name(*n)))
        })
        .count();
    assert_eq!(
        fed,
        Fed::Listed {
            first: false,
            removed: expected_removed
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// After every live event and at the end of every re-list, the index
    /// holds exactly what a from-scratch read of the collection holds;
    /// during a list it is never current.
    #[test]
    fn the_index_matches_the_collection_after_any_events_and_gaps(steps in prop::collection::vec(step(), 1..40)) {
        let mut collection = Collection::new();
        let mut clock = 0;
        let mut feed = Feed::new("test");
        let mut index = Versions::default();
        prop_assert_eq!(listed(&mut feed, &mut index, vec![]), Fed::Listed { first: true, removed: 0 });
        for step in &steps {
            match step {
                Step::Gap { changes, order, fail_after, more } => {
                    for change in changes {
                        change_collection(&mut collection, change, &mut clock);
                    }
                    if fail_after.is_some() {
                        relist(&mut feed, &mut index, &collection, order, *fail_after);
                        prop_assert!(!feed.is_current());
                        for change in more {
                            change_collection(&mut collection, change, &mut clock);
                        }
                    }
                    relist(&mut feed, &mut index, &collection, order, None);
                }
                live => {
                    if let Some(event) = change_collection(&mut collection, live, &mut clock) {
                        feed.feed(event, &mut index);
                    }
                }
            }
            prop_assert!(feed.is_current());
            prop_assert_eq!(&index.held, &from_scratch(&collection));
        }
    }
}
