use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use kube::runtime::watcher::Event;
use proptest::prelude::*;

use super::*;
use crate::index::{Fed, Feed};

fn object(name: &str, version: u64, ignored: bool) -> ConfigMap {
    let mut data = BTreeMap::from([("version".to_string(), version.to_string())]);
    if ignored {
        data.insert("ignored".to_string(), String::new());
    }
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some("ns".to_string()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// What a controller keeps of an object: its version, or nothing for the
/// ones it ignores.
fn entry(object: ConfigMap) -> Entry<u64> {
    let data = object.data.clone().unwrap_or_default();
    let kept = (!data.contains_key("ignored")).then(|| data.get("version").and_then(|v| v.parse().ok()).unwrap_or(0));
    Entry::of(&object, kept)
}

fn feed(feed: &mut Feed, entries: &mut Entries<u64>, event: Event<ConfigMap>) -> Fed {
    feed.feed(crate::index::convert(event, entry), entries)
}

fn list(f: &mut Feed, entries: &mut Entries<u64>, objects: Vec<ConfigMap>) -> Fed {
    feed(f, entries, Event::Init);
    for object in objects {
        feed(f, entries, Event::InitApply(object));
    }
    feed(f, entries, Event::InitDone)
}

#[test]
fn each_event_says_what_it_replaced() {
    let mut f = Feed::new("test");
    let mut entries = Entries::in_namespace("ns");
    list(&mut f, &mut entries, vec![object("a", 1, false)]);
    assert_eq!(
        entries.take_changes(),
        vec![Change {
            name: "a".into(),
            before: None
        }]
    );
    feed(&mut f, &mut entries, Event::Apply(object("a", 2, false)));
    assert_eq!(
        entries.take_changes(),
        vec![Change {
            name: "a".into(),
            before: Some(1)
        }]
    );
    assert_eq!(entries.get("a"), Some(&2));
    feed(&mut f, &mut entries, Event::Delete(object("a", 2, false)));
    assert_eq!(
        entries.take_changes(),
        vec![Change {
            name: "a".into(),
            before: Some(2)
        }]
    );
    assert!(entries.is_empty());
}

#[test]
fn an_object_that_stops_mattering_goes_and_one_never_kept_changes_nothing() {
    let mut f = Feed::new("test");
    let mut entries = Entries::in_namespace("ns");
    list(&mut f, &mut entries, vec![object("a", 1, false), object("b", 1, true)]);
    assert_eq!(entries.len(), 1);
    entries.take_changes();
    feed(&mut f, &mut entries, Event::Apply(object("a", 2, true)));
    feed(&mut f, &mut entries, Event::Apply(object("b", 2, true)));
    assert_eq!(
        entries.take_changes(),
        vec![Change {
            name: "a".into(),
            before: Some(1)
        }]
    );
    assert!(!entries.contains_key("a"));
}

#[test]
fn a_relist_reports_what_vanished_as_a_change() {
    let mut f = Feed::new("test");
    let mut entries = Entries::in_namespace("ns");
    list(&mut f, &mut entries, vec![object("a", 1, false), object("b", 1, false)]);
    entries.take_changes();
    let fed = list(&mut f, &mut entries, vec![object("b", 1, false)]);
    assert_eq!(
        fed,
        Fed::Listed {
            first: false,
            removed: 1
        }
    );
    let changes = entries.take_changes();
    assert!(
        changes.contains(&Change {
            name: "a".into(),
            before: Some(1)
        }),
        "{changes:?}"
    );
    assert_eq!(
        entries.iter().map(|(n, v)| (n.as_str(), *v)).collect::<Vec<_>>(),
        vec![("b", 1)]
    );
}

#[test]
fn unnamed_objects_and_taken_values_record_nothing() {
    let mut f = Feed::new("test");
    let mut entries = Entries::in_namespace("ns");
    list(&mut f, &mut entries, vec![object("a", 1, false)]);
    entries.take_changes();
    assert_eq!(
        feed(&mut f, &mut entries, Event::Apply(object("", 1, false))),
        Fed::Unnamed
    );
    assert_eq!(entries.take("a"), Some(1));
    assert!(entries.take_changes().is_empty());
    assert_eq!(entries.keys(), Vec::<ObjectKey>::new());
}

/// One step: an object put or removed (seen live), or a gap in which
/// `unseen` puts and removes happen, followed by a complete re-list.
#[derive(Clone, Debug)]
enum Step {
    Put(u8, bool),
    Remove(u8),
    Gap(Vec<(u8, Option<bool>)>),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6, any::<bool>()).prop_map(|(n, ignored)| Step::Put(n, ignored)),
        (0u8..6).prop_map(Step::Remove),
        prop::collection::vec((0u8..6, prop::option::of(any::<bool>())), 0..8).prop_map(Step::Gap),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// After any step the entries are what a from-scratch read keeps, and
    /// the changes name every entry that differs from before the step,
    /// each first with the value it had then.
    #[test]
    fn changes_tell_every_difference(steps in prop::collection::vec(step(), 1..30)) {
        let mut collection: BTreeMap<u8, (u64, bool)> = BTreeMap::new();
        let mut clock = 0u64;
        let mut f = Feed::new("test");
        let mut entries = Entries::in_namespace("ns");
        list(&mut f, &mut entries, vec![]);
        for step in steps {
            let before: BTreeMap<String, u64> = entries.iter().map(|(n, v)| (n.clone(), *v)).collect();
            clock += 1;
            match step {
                Step::Put(n, ignored) => {
                    collection.insert(n, (clock, ignored));
                    feed(&mut f, &mut entries, Event::Apply(object(&format!("o{n}"), clock, ignored)));
                }
                Step::Remove(n) => {
                    if let Some((version, ignored)) = collection.remove(&n) {
                        feed(&mut f, &mut entries, Event::Delete(object(&format!("o{n}"), version, ignored)));
                    }
                }
                Step::Gap(unseen) => {
                    for (n, put) in unseen {
                        clock += 1;
                        match put {
                            Some(ignored) => collection.insert(n, (clock, ignored)),
                            None => collection.remove(&n),
                        };
                    }
                    let listed = collection.iter().map(|(n, (v, i))| object(&format!("o{n}"), *v, *i)).collect();
                    list(&mut f, &mut entries, listed);
                }
            }
            let expected: BTreeMap<String, u64> = (collection.iter())
                .filter(|(_, (_, ignored))| !ignored)
                .map(|(n, (v, _))| (format!("o{n}"), *v))
                .collect();
            let now: BTreeMap<String, u64> = entries.iter().map(|(n, v)| (n.clone(), *v)).collect();
            prop_assert_eq!(&now, &expected);
            let mut first: BTreeMap<String, Option<u64>> = BTreeMap::new();
            for change in entries.take_changes() {
                first.entry(change.name).or_insert(change.before);
            }
            for name in before.keys().chain(now.keys()) {
                if before.get(name) != now.get(name) {
                    prop_assert_eq!(first.get(name), Some(&before.get(name).copied()), "{}", name);
                }
            }
            for (name, was) in &first {
                prop_assert_eq!(was, &before.get(name).copied());
            }
        }
    }
}
