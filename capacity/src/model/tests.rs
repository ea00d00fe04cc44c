use proptest::prelude::*;
use serde_json::json;

use super::*;

const DRIVER: &str = "hostpath.csi.k8s.io";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn class(name: &str, provisioner: &str, mode: Option<&str>, params: &[(&str, &str)]) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        provisioner: provisioner.into(),
        volume_binding_mode: mode.map(str::to_string),
        parameters: Some(labels(params)),
        ..StorageClass::default()
    }
}

fn identity(owner: Option<OwnerReference>) -> ObjectIdentity {
    ObjectIdentity {
        namespace: "storage".into(),
        driver: DRIVER.into(),
        managed_by: "volplane".into(),
        owner,
    }
}

fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn item(zone: &str, class: &str) -> WorkItem {
    WorkItem {
        segment: Segment::from_pairs([("zone", zone)]),
        class: class.into(),
    }
}

fn existing(name: &str, item: &WorkItem, created_secs: i64) -> CSIStorageCapacity {
    let mut object = new_object(
        item,
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(None),
    );
    object.metadata.name = Some(name.into());
    object.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(created_secs).expect("timestamp"),
    ));
    object
}

/// `object` as the watch delivers it to volplane: the slim type.
fn slim(object: &CSIStorageCapacity) -> CapacityObject {
    serde_json::from_value(serde_json::to_value(object).expect("json")).expect("slim")
}

/// What volplane keeps of `object`.
fn known(object: &CSIStorageCapacity, identity: &ObjectIdentity) -> KnownObject {
    KnownObject::of(&slim(object), identity)
}

/// `object` after volplane's update for `value`, as the API server applies
/// the merge patch; `None` when no write is needed.
fn updated(
    object: &CSIStorageCapacity,
    value: PublishedCapacity,
    identity: &ObjectIdentity,
) -> Option<CSIStorageCapacity> {
    let patch = update_patch(&known(object, identity), value, identity)?;
    let mut json = serde_json::to_value(object).expect("json");
    json_patch::merge(&mut json, &patch);
    Some(serde_json::from_value(json).expect("patched object"))
}

#[test]
fn per_node_segment_falls_back_to_the_hostname() {
    assert_eq!(
        per_node_segment("worker-1", Some(&labels(&[("zone", "a")]))),
        Segment::from_pairs([("zone", "a")])
    );
    assert_eq!(
        per_node_segment("worker-1", None),
        Segment::from_pairs([(HOSTNAME_LABEL, "worker-1")])
    );
    assert_eq!(
        per_node_segment("worker-1", Some(&Labels::new())),
        Segment::from_pairs([(HOSTNAME_LABEL, "worker-1")])
    );
}

#[test]
fn classes_are_filtered_by_provisioner_and_binding_mode() {
    let late = class("late", DRIVER, Some("WaitForFirstConsumer"), &[("type", "ssd")]);
    let immediate = class("now", DRIVER, Some("Immediate"), &[]);
    let defaulted = class("default-mode", DRIVER, None, &[]);
    let foreign = class("foreign", "other.csi", Some("WaitForFirstConsumer"), &[]);
    assert_eq!(
        capacity_parameters(&late, DRIVER, false),
        Some(labels(&[("type", "ssd")]))
    );
    assert_eq!(capacity_parameters(&immediate, DRIVER, false), None);
    assert_eq!(capacity_parameters(&defaulted, DRIVER, false), None);
    assert_eq!(capacity_parameters(&immediate, DRIVER, true), Some(Labels::new()));
    assert_eq!(capacity_parameters(&defaulted, DRIVER, true), Some(Labels::new()));
    assert_eq!(capacity_parameters(&foreign, DRIVER, true), None);
}

#[test]
fn reserved_parameters_are_not_sent() {
    let c = class(
        "c",
        DRIVER,
        Some("WaitForFirstConsumer"),
        &[
            ("csi.storage.k8s.io/provisioner-secret-name", "s"),
            ("csi.storage.k8s.io/fstype", "ext4"),
            ("pool", "gold"),
            ("example.com/csi.storage.k8s.io", "kept"),
        ],
    );
    assert_eq!(
        capacity_parameters(&c, DRIVER, false),
        Some(labels(&[("pool", "gold"), ("example.com/csi.storage.k8s.io", "kept")]))
    );
}

#[test]
fn a_new_object_has_the_documented_shape() {
    let item = WorkItem {
        segment: Segment::from_pairs([("zone", "a")]),
        class: "fast".into(),
    };
    let o = new_object(
        &item,
        PublishedCapacity {
            capacity: 10 << 30,
            maximum_volume_size: Some(1 << 30),
        },
        &identity(Some(owner("Deployment", "csi", "u1"))),
    );
    assert_eq!(o.metadata.generate_name.as_deref(), Some("csisc-"));
    assert_eq!(o.metadata.namespace.as_deref(), Some("storage"));
    assert_eq!(
        o.metadata.labels,
        Some(labels(&[(DRIVER_LABEL, DRIVER), (MANAGED_BY_LABEL, "volplane")]))
    );
    assert_eq!(o.metadata.owner_references.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        o.node_topology.and_then(|t| t.match_labels),
        Some(labels(&[("zone", "a")]))
    );
    assert_eq!(o.storage_class_name, "fast");
    assert_eq!(o.capacity, Some(Quantity("10Gi".into())));
    assert_eq!(o.maximum_volume_size, Some(Quantity("1Gi".into())));
    let unset = new_object(
        &item,
        PublishedCapacity {
            capacity: 0,
            maximum_volume_size: None,
        },
        &identity(None),
    );
    assert_eq!(unset.maximum_volume_size, None);
    assert_eq!(unset.metadata.owner_references, None);
}

#[test]
fn an_unchanged_capacity_needs_no_write() {
    let value = PublishedCapacity {
        capacity: 4_000_000_000,
        maximum_volume_size: Some(10 << 30),
    };
    let object = new_object(&item("a", "fast"), value, &identity(None));
    assert_eq!(object.capacity, Some(Quantity("3906250Ki".into())));
    assert!(!needs_update(&known(&object, &identity(None)), value));
    assert_eq!(updated(&object, value, &identity(None)), None);
}

#[test]
fn a_write_is_needed_when_labels_or_owner_drift() {
    let value = PublishedCapacity {
        capacity: 1 << 30,
        maximum_volume_size: None,
    };
    let mut object = new_object(&item("a", "fast"), value, &identity(None));
    object.metadata.labels = None;
    assert!(needs_update(&known(&object, &identity(None)), value), "labels gone");
    let object = new_object(&item("a", "fast"), value, &identity(None));
    let bigger = PublishedCapacity {
        capacity: 2 << 30,
        ..value
    };
    assert!(
        needs_update(&known(&object, &identity(None)), bigger),
        "capacity changed"
    );
    let owned = identity(Some(owner("Deployment", "volplane", "uid-1")));
    assert!(needs_update(&known(&object, &owned), value), "owner added");
}

#[test]
fn the_same_value_in_another_spelling_is_rewritten_once_then_never() {
    let value = PublishedCapacity {
        capacity: 4_000_000_000,
        maximum_volume_size: Some(10 << 30),
    };
    let mut object = new_object(&item("a", "fast"), value, &identity(None));
    // Written by an older volplane or by hand: equal values, other text.
    object.capacity = Some(Quantity("4G".into()));
    object.maximum_volume_size = Some(Quantity("10737418240".into()));
    assert_eq!(published_capacity(&slim(&object)), Some(value), "compared by value");
    let rewritten = updated(&object, value, &identity(None)).expect("rewritten to the stored form");
    assert_eq!(rewritten.capacity, Some(Quantity("3906250Ki".into())));
    assert_eq!(rewritten.maximum_volume_size, Some(Quantity("10Gi".into())));
    assert_eq!(updated(&rewritten, value, &identity(None)), None);
}

#[test]
fn a_changed_capacity_or_maximum_is_rewritten() {
    let before = PublishedCapacity {
        capacity: 100,
        maximum_volume_size: Some(50),
    };
    let object = new_object(&item("a", "fast"), before, &identity(None));
    let after = PublishedCapacity {
        capacity: 200,
        maximum_volume_size: None,
    };
    let rewritten = updated(&object, after, &identity(None)).expect("changed");
    assert_eq!(rewritten.capacity, Some(Quantity("200".into())));
    assert_eq!(rewritten.maximum_volume_size, None);
    assert_eq!(updated(&rewritten, after, &identity(None)), None);
}

#[test]
fn a_foreign_or_stale_owner_reference_is_replaced_never_appended() {
    let ours = owner("Deployment", "csi-controller", "new-uid");
    let mut object = new_object(
        &item("a", "fast"),
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(None),
    );
    object.metadata.owner_references = Some(vec![
        owner("Deployment", "csi-controller", "old-uid"),
        owner("StatefulSet", "someone-else", "x"),
    ]);
    let rewritten = updated(
        &object,
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(Some(ours.clone())),
    )
    .expect("owner changes");
    assert_eq!(rewritten.metadata.owner_references, Some(vec![ours]));
    // And back to no owner: the references go entirely.
    let unowned = updated(
        &rewritten,
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(None),
    )
    .expect("owner removed");
    assert_eq!(unowned.metadata.owner_references, None);
}

#[test]
fn foreign_labels_are_kept_and_ours_restored() {
    let mut object = new_object(
        &item("a", "fast"),
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(None),
    );
    let mut l = object.metadata.labels.clone().unwrap_or_default();
    l.insert("team".into(), "storage".into());
    l.insert(MANAGED_BY_LABEL.into(), "tampered".into());
    object.metadata.labels = Some(l);
    let rewritten = updated(
        &object,
        PublishedCapacity {
            capacity: 1,
            maximum_volume_size: None,
        },
        &identity(None),
    )
    .expect("label fixed");
    let l = rewritten.metadata.labels.unwrap_or_default();
    assert_eq!(l.get("team").map(String::as_str), Some("storage"));
    assert_eq!(l.get(MANAGED_BY_LABEL).map(String::as_str), Some("volplane"));
}

/// [`reconcile_objects`] over full objects, as their slim copies.
fn reconcile(desired: &BTreeSet<WorkItem>, objects: &[CSIStorageCapacity]) -> Reconciliation {
    let slims: Vec<CapacityObject> = objects.iter().map(slim).collect();
    let items: Vec<Option<WorkItem>> = slims.iter().map(item_of).collect();
    reconcile_objects(
        desired.iter().cloned(),
        |item| desired.contains(item),
        slims.iter().zip(&items).map(|(o, item)| Existing {
            name: o.metadata.name.as_deref().unwrap_or_default(),
            item: item.as_ref(),
            created: o.metadata.creation_timestamp.as_ref(),
        }),
    )
}

#[test]
fn reconciliation_adopts_the_oldest_and_deletes_duplicates_and_obsolete() {
    let desired: BTreeSet<WorkItem> = [item("a", "fast"), item("b", "fast"), item("c", "fast")].into();
    let objects = [
        existing("csisc-new", &item("a", "fast"), 200),
        existing("csisc-old", &item("a", "fast"), 100),
        existing("csisc-b", &item("b", "fast"), 100),
        existing("csisc-gone-class", &item("b", "slow"), 100),
        existing("csisc-gone-zone", &item("z", "fast"), 100),
    ];
    let plan = reconcile(&desired, &objects);
    assert_eq!(
        plan.adopt,
        BTreeMap::from([
            (item("a", "fast"), "csisc-old".to_string()),
            (item("b", "fast"), "csisc-b".to_string())
        ])
    );
    let mut deleted = plan.delete.clone();
    deleted.sort();
    assert_eq!(deleted, ["csisc-gone-class", "csisc-gone-zone", "csisc-new"]);
    assert_eq!(plan.missing, [item("c", "fast")].into());
}

#[test]
fn objects_with_match_expressions_are_not_ours_in_shape() {
    let mut object = existing("x", &item("a", "fast"), 1);
    object.node_topology = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![Default::default()]),
    });
    assert_eq!(item_of(&slim(&object)), None);
    object.node_topology = None;
    assert_eq!(item_of(&slim(&object)), None);
}

#[test]
fn managed_by_fits_a_label_value_for_any_node_name() {
    assert_eq!(managed_by(None), "volplane");
    assert_eq!(managed_by(Some("worker-1")), "volplane-worker-1");
    let long = format!("{}.example.internal", "n".repeat(80));
    let value = managed_by(Some(&long));
    assert!(value.len() <= 63, "{value}");
    assert!(value.starts_with("volplane-nnnn"), "{value}");
    assert_ne!(
        managed_by(Some(&format!("{long}1"))),
        managed_by(Some(&format!("{long}2")))
    );
}

#[test]
fn pv_events_refresh_only_matching_items() {
    let pv = |driver: &str, class: Option<&str>, zone: Option<&str>| -> VolumeObject {
        let affinity = zone.map(|z| {
            json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": [z]}]}]}})
        });
        serde_json::from_value(json!({
            "metadata": {"name": "pv"},
            "spec": {"csi": {"driver": driver, "volumeHandle": "v"}, "storageClassName": class,
                     "nodeAffinity": affinity, "capacity": {"storage": "1Gi"}}
        }))
        .expect("pv")
    };
    let segments = [
        Segment::from_pairs([("zone", "a")]),
        Segment::from_pairs([("zone", "b")]),
    ];
    let admitted = |pv: &VolumeObject| -> Option<(String, Vec<Segment>)> {
        let (class, terms) = volume_placement(pv, DRIVER)?;
        Some((
            class.to_string(),
            segments.iter().filter(|s| admits(terms, s)).cloned().collect(),
        ))
    };
    assert_eq!(
        admitted(&pv(DRIVER, Some("fast"), Some("a"))),
        Some(("fast".into(), vec![segments[0].clone()]))
    );
    assert_eq!(
        admitted(&pv(DRIVER, Some("fast"), None)),
        Some(("fast".into(), segments.to_vec()))
    );
    assert_eq!(admitted(&pv("other", Some("fast"), Some("a"))), None);
    assert_eq!(admitted(&pv(DRIVER, None, Some("a"))), None);
    let in_a = pv(DRIVER, Some("fast"), Some("a"));
    let (_, terms) = volume_placement(&in_a, DRIVER).expect("placed");
    assert_eq!(exact_segments(terms), Some(vec![segments[0].clone()]), "named exactly");
}

fn arb_item() -> impl Strategy<Value = WorkItem> {
    (0..4u8, 0..3u8).prop_map(|(zone, class)| item(&format!("z{zone}"), &format!("c{class}")))
}

proptest! {
    #[test]
    fn reconciliation_accounts_for_every_object_exactly_once(
        desired in proptest::collection::btree_set(arb_item(), 0..12),
        existing_items in proptest::collection::vec((arb_item(), 0..5i64), 0..20),
    ) {
        let objects: Vec<CSIStorageCapacity> = existing_items
            .iter()
            .enumerate()
            .map(|(i, (item, t))| existing(&format!("o{i}"), item, *t))
            .collect();
        let plan = reconcile(&desired, &objects);
        // Adopted items are desired and their objects stand for them.
        for (item, name) in &plan.adopt {
            prop_assert!(desired.contains(item));
            let object = objects.iter().find(|o| o.metadata.name.as_deref() == Some(name));
            prop_assert_eq!(object.map(slim).as_ref().and_then(item_of), Some(item.clone()));
        }
        // Each object is adopted or deleted, never both, never neither.
        for object in &objects {
            let name = object.metadata.name.clone().unwrap_or_default();
            let adopted = plan.adopt.values().any(|n| *n == name);
            let deleted = plan.delete.contains(&name);
            prop_assert!(adopted != deleted, "{} adopted={} deleted={}", name, adopted, deleted);
        }
        // Missing is exactly desired minus adopted.
        let expected: BTreeSet<WorkItem> = desired.iter().filter(|i| !plan.adopt.contains_key(*i)).cloned().collect();
        prop_assert_eq!(&plan.missing, &expected);
    }

    #[test]
    fn an_update_is_idempotent(
        capacity in 0..i64::MAX,
        old_capacity in 0..i64::MAX,
        maximum in proptest::option::of(0..i64::MAX),
        old_maximum in proptest::option::of(0..i64::MAX),
        with_owner in any::<bool>(),
    ) {
        let ident = identity(with_owner.then(|| owner("Deployment", "d", "u")));
        let old = new_object(&item("a", "c"), PublishedCapacity { capacity: old_capacity, maximum_volume_size: old_maximum }, &identity(None));
        let value = PublishedCapacity { capacity, maximum_volume_size: maximum };
        let once = updated(&old, value, &ident).unwrap_or(old);
        prop_assert_eq!(updated(&once, value, &ident), None);
        prop_assert_eq!(published_capacity(&slim(&once)), Some(value));
    }

    #[test]
    fn managed_by_is_always_a_valid_label_value(node in "[a-z0-9]([a-z0-9.-]{0,200}[a-z0-9])?") {
        let value = managed_by(Some(&node));
        prop_assert!(value.len() <= 63);
        prop_assert!(value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        prop_assert!(value.as_bytes()[0].is_ascii_alphanumeric());
        prop_assert!(value.as_bytes()[value.len() - 1].is_ascii_alphanumeric());
        prop_assert_eq!(value.clone(), managed_by(Some(&node)));
    }
}

#[test]
fn segments_the_api_server_would_reject_are_named_with_the_reason() {
    let valid = [
        Segment::from_pairs([("topology.hostpath.csi/node", "node-0")]),
        Segment::from_pairs([("zone", "")]),
        Segment::from_pairs([("kubernetes.io/hostname", "a.b-c_d")]),
        Segment::default(),
    ];
    for segment in valid {
        assert_eq!(invalid_segment(&segment), None, "{segment}");
    }
    let long = "x".repeat(64);
    let invalid = [
        (Segment::from_pairs([("zone", "a b")]), "not a valid label value"),
        (Segment::from_pairs([("zone", "zöne")]), "not a valid label value"),
        (Segment::from_pairs([("zone", long.as_str())]), "at most 63"),
        (Segment::from_pairs([("zone", "-a")]), "begin and end"),
        (Segment::from_pairs([("", "a")]), "must not be empty"),
        (Segment::from_pairs([("Bad.Prefix/zone", "a")]), "DNS subdomain"),
        (Segment::from_pairs([("a/", "a")]), "must not be empty"),
        (Segment::from_pairs([("ä", "a")]), "not a valid label key"),
    ];
    for (segment, why) in invalid {
        let reason = invalid_segment(&segment).unwrap_or_else(|| panic!("{segment} accepted"));
        assert!(reason.contains(why), "{segment}: {reason}");
    }
}

mod any_text {
    use proptest::prelude::*;
    use volplane_runtime::text::EVENT_NOTE_MAX_BYTES;

    use super::*;

    proptest! {
        /// Class names, segments and driver errors of any length and script
        /// make a note the API server accepts, and never panic.
        #[test]
        fn refresh_failure_notes_fit(class in any::<String>(), key in any::<String>(), value in any::<String>(),
                                     error in any::<String>(), repeat in 1usize..300) {
            let item = WorkItem {
                segment: Segment::new(Labels::from([(key.repeat(repeat), value.repeat(repeat))])),
                class: class.repeat(repeat).into(),
            };
            let note = refresh_failure_note(&item, &error.repeat(repeat));
            prop_assert!(note.len() <= EVENT_NOTE_MAX_BYTES);
            prop_assert!(note.starts_with("GetCapacity for storage class "));
        }

        /// Any segment gets an answer; the reason, if any, stays short.
        #[test]
        fn segment_checks_never_panic(key in any::<String>(), value in any::<String>(), repeat in 1usize..200) {
            let segment = Segment::new(Labels::from([(key.repeat(repeat), value.repeat(repeat))]));
            if let Some(reason) = invalid_segment(&segment) {
                prop_assert!(reason.len() < 1024, "{}", reason.len());
            }
        }

        #[test]
        fn managed_by_and_driver_labels_fit_a_label_value_for_any_name(node in any::<String>(), repeat in 1usize..40) {
            let node = node.repeat(repeat);
            let managed = managed_by(Some(&node));
            prop_assert!(managed.len() <= 63);
            let driver = driver_label_value(&node);
            prop_assert!(driver.len() <= 63);
        }
    }
}

#[test]
fn a_newer_version_needs_a_refresh_only_when_someone_else_changed_it() {
    let value = PublishedCapacity {
        capacity: 1 << 30,
        maximum_volume_size: None,
    };
    let id = identity(None);
    let ours = new_object(&item("a", "fast"), value, &id);
    let mut relabelled = ours.clone();
    relabelled
        .metadata
        .labels
        .get_or_insert_default()
        .insert("team".into(), "storage".into());
    assert!(
        !changed_by_others(&known(&ours, &id), &known(&relabelled, &id)),
        "a foreign label is not ours to fix"
    );
    let mut edited = ours.clone();
    edited.capacity = Some(Quantity("5Gi".into()));
    assert!(
        changed_by_others(&known(&ours, &id), &known(&edited, &id)),
        "capacity edited by hand"
    );
    let mut unlabelled = ours.clone();
    unlabelled.metadata.labels = None;
    assert!(
        changed_by_others(&known(&ours, &id), &known(&unlabelled, &id)),
        "volplane's labels removed"
    );
    let mut unreadable = ours.clone();
    unreadable.capacity = Some(Quantity("lots".into()));
    assert!(
        changed_by_others(&known(&unreadable, &id), &known(&ours, &id)),
        "nothing known to compare with"
    );
}

#[test]
fn the_update_patch_carries_the_version_it_was_decided_on() {
    let value = PublishedCapacity {
        capacity: 1 << 30,
        maximum_volume_size: None,
    };
    let id = identity(None);
    let mut object = new_object(&item("a", "fast"), value, &id);
    object.metadata.resource_version = Some("42".into());
    let patch = update_patch(
        &known(&object, &id),
        PublishedCapacity {
            capacity: 1 << 20,
            maximum_volume_size: None,
        },
        &id,
    )
    .expect("changed");
    assert_eq!(patch["metadata"]["resourceVersion"], json!("42"));
    assert_eq!(patch["capacity"], json!("1Mi"));
    assert_eq!(patch["maximumVolumeSize"], Value::Null, "removed when unset");
}

#[test]
fn what_volplane_keeps_of_an_object_is_small() {
    // The object itself (managed fields, labels, topology) is kilobytes;
    // per object only this and a name are kept.
    assert!(
        std::mem::size_of::<KnownObject>() <= 128,
        "{}",
        std::mem::size_of::<KnownObject>()
    );
}

#[test]
fn a_value_patch_changes_the_value_alone_and_keeps_the_object_theirs() {
    let theirs_identity = ObjectIdentity {
        managed_by: "external-provisioner".into(),
        ..identity(Some(owner("Deployment", "csi-provisioner", "u-1")))
    };
    let mut object = existing("csisc-theirs", &item("a", "fast"), 100);
    object.metadata = ObjectMeta {
        resource_version: Some("41".into()),
        ..new_object(
            &item("a", "fast"),
            PublishedCapacity {
                capacity: 100 << 30,
                maximum_volume_size: None,
            },
            &theirs_identity,
        )
        .metadata
    };
    object.capacity = Some(quantity(100 << 30));
    let ours = identity(None);
    let shrunk = PublishedCapacity {
        capacity: 50 << 30,
        maximum_volume_size: Some(10 << 30),
    };
    let patch = value_patch(&known(&object, &ours), shrunk).expect("a patch");
    let mut json = serde_json::to_value(&object).expect("json");
    json_patch::merge(&mut json, &patch);
    let patched: CSIStorageCapacity = serde_json::from_value(json).expect("patched");
    assert_eq!(patched.capacity, Some(quantity(50 << 30)));
    assert_eq!(patched.maximum_volume_size, Some(quantity(10 << 30)));
    assert_eq!(
        patched.metadata.labels, object.metadata.labels,
        "still csi-provisioner's labels"
    );
    assert_eq!(patched.metadata.owner_references, object.metadata.owner_references);
    assert_eq!(
        patch["metadata"],
        json!({"resourceVersion": "41"}),
        "decided on version 41"
    );
    let unchanged = PublishedCapacity {
        capacity: 100 << 30,
        maximum_volume_size: None,
    };
    assert_eq!(
        value_patch(&known(&object, &ours), unchanged),
        None,
        "no write for the same value"
    );
}
