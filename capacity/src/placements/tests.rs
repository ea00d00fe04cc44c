use serde_json::json;

use super::*;

fn claim(name: &str, node: Option<&str>, class: &str, size: &str, volume: Option<&str>) -> ClaimObject {
    let annotations = node.map(|node| json!({"volume.kubernetes.io/selected-node": node}));
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
        "spec": {"storageClassName": class, "volumeName": volume, "resources": {"requests": {"storage": size}}}
    }))
    .expect("claim")
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn a_node_name_makes_a_valid_config_map_name_of_any_length() {
    assert_eq!(config_map_name("n1"), "volplane-placements-n1");
    let long = format!("{}.{}", "a".repeat(200), "b".repeat(52));
    let name = config_map_name(&long);
    assert!(name.len() <= 253, "{}", name.len());
    assert_ne!(
        name,
        config_map_name(&format!("{}.{}", "a".repeat(200), "c".repeat(52)))
    );
    let dotted = format!("{}.{}", "a".repeat(232), "b".repeat(20));
    let name = config_map_name(&dotted);
    assert!(name.len() <= 253);
    assert!(
        name.split('.')
            .all(|label| label.starts_with(|c: char| c.is_ascii_alphanumeric())
                && label.ends_with(|c: char| c.is_ascii_alphanumeric())),
        "{name}"
    );
}

#[test]
fn placements_survive_the_round_trip_through_config_map_data() {
    let placed = BTreeMap::from([
        (
            ObjectKey::namespaced("ns", "c.1"),
            Placed {
                class: "fast".into(),
                bytes: 10 << 30,
            },
        ),
        (
            ObjectKey::namespaced("other", "c2"),
            Placed {
                class: "slow".into(),
                bytes: 1,
            },
        ),
    ]);
    let written = to_data(&placed);
    assert_eq!(written, data(&[("ns.c.1", "10737418240 fast"), ("other.c2", "1 slow")]));
    let (read, bad) = from_data("n1", &written);
    assert!(bad.is_empty());
    assert_eq!(
        read,
        vec![
            (
                ObjectKey::namespaced("ns", "c.1"),
                Claimed::Placed {
                    node: "n1".into(),
                    class: "fast".into(),
                    bytes: 10 << 30
                }
            ),
            (
                ObjectKey::namespaced("other", "c2"),
                Claimed::Placed {
                    node: "n1".into(),
                    class: "slow".into(),
                    bytes: 1
                }
            ),
        ]
    );
    let (read, bad) = from_data(
        "n1",
        &data(&[
            ("nodot", "1 fast"),
            ("ns.a", "x fast"),
            ("ns.b", "-5 fast"),
            ("ns.c", "5"),
            ("ns.d", "5 "),
            ("ns.e", "7 fast"),
        ]),
    );
    assert_eq!(read.len(), 1);
    assert_eq!(bad, vec!["nodot", "ns.a", "ns.b", "ns.c", "ns.d"]);
}

#[test]
fn the_patch_adds_changes_and_removes_whatever_the_object_may_hold() {
    let seen = data(&[("ns.a", "1 fast"), ("ns.b", "2 fast")]);
    let written = data(&[("ns.b", "3 fast"), ("ns.c", "4 fast")]);
    let desired = data(&[("ns.b", "3 fast"), ("ns.d", "5 fast")]);
    assert_eq!(
        data_patch(&[&seen, &written], &desired),
        Some(json!({"data": {"ns.a": null, "ns.b": "3 fast", "ns.c": null, "ns.d": "5 fast"}}))
    );
    assert_eq!(data_patch(&[&desired], &desired), None, "nothing to change");
    assert_eq!(
        data_patch(&[], &desired),
        Some(json!({"data": {"ns.b": "3 fast", "ns.d": "5 fast"}}))
    );
    assert_eq!(data_patch(&[], &BTreeMap::new()), None);
}

#[test]
fn claims_are_followed_by_node_and_each_change_marks_its_nodes() {
    let mut by_node = ByNode::default();
    by_node.apply(claim("a", Some("n1"), "fast", "10Gi", None));
    by_node.apply(claim("b", Some("n1"), "fast", "1Gi", None));
    by_node.apply(claim("c", None, "fast", "1Gi", None));
    assert_eq!(by_node.take_changed(), BTreeSet::from(["n1".to_string()]));
    assert_eq!(by_node.on("n1").map(BTreeMap::len), Some(2));
    // The same again: no change.
    by_node.apply(claim("a", Some("n1"), "fast", "10Gi", None));
    assert!(by_node.take_changed().is_empty());
    // Placed again elsewhere: both nodes change.
    by_node.apply(claim("a", Some("n2"), "fast", "10Gi", None));
    assert_eq!(
        by_node.take_changed(),
        BTreeSet::from(["n1".to_string(), "n2".to_string()])
    );
    // Bound, then deleted.
    by_node.apply(claim("a", Some("n2"), "fast", "10Gi", Some("pv-a")));
    by_node.delete(&ObjectKey::namespaced("ns", "b"));
    assert_eq!(
        by_node.take_changed(),
        BTreeSet::from(["n1".to_string(), "n2".to_string()])
    );
    assert!(
        by_node.on("n1").is_none() && by_node.on("n2").is_none(),
        "empty nodes are not kept"
    );
    assert!(by_node.is_empty());
    assert!(Index::<ClaimObject>::keys(&by_node).is_empty());
}

#[test]
fn a_deleted_bound_claim_marks_its_node_released_and_nothing_else_does() {
    let mut by_node = ByNode::default();
    by_node.deleted(&claim("a", Some("n1"), "fast", "1Gi", Some("pv-a")), "t1");
    by_node.deleted(&claim("b", Some("n2"), "fast", "1Gi", None), "t1");
    by_node.deleted(&claim("c", None, "fast", "1Gi", Some("pv-c")), "t1");
    assert_eq!(by_node.released_on("n1").map(String::as_str), Some("t1"));
    assert_eq!(by_node.released_on("n2"), None, "never bound: no volume to delete");
    assert_eq!(by_node.take_changed(), BTreeSet::from(["n1".to_string()]));
    by_node.deleted(&claim("d", Some("n1"), "fast", "1Gi", Some("pv-d")), "t2");
    assert_eq!(by_node.released_on("n1").map(String::as_str), Some("t2"));
    // Written with an older mark: the newer one stays until written too,
    // and then the ConfigMap alone keeps it (nothing kept per node).
    by_node.release_written("n1", Some(&"t1".to_string()));
    assert_eq!(by_node.released_on("n1").map(String::as_str), Some("t2"));
    by_node.release_written("n1", Some(&"t2".to_string()));
    assert_eq!(by_node.released_on("n1"), None);
}

#[test]
fn the_release_mark_is_patched_when_any_known_state_lacks_it() {
    let known = |released: Option<&str>| KnownMap {
        node: "n1".into(),
        data: data(&[("ns.a", "1 fast")]),
        released: released.map(str::to_string),
    };
    let desired = known(Some("t2"));
    assert_eq!(map_patch(&[&desired], &desired), None);
    assert_eq!(
        map_patch(&[&desired, &known(Some("t1"))], &desired),
        Some(json!({"metadata": {"annotations": {"volplane.io/released": "t2"}}}))
    );
    // No mark desired (a restart forgot it): the object's is left alone.
    assert_eq!(map_patch(&[&known(Some("t1"))], &known(None)), None);
    let mut more = known(Some("t2"));
    more.data.insert("ns.b".into(), "2 fast".into());
    assert_eq!(
        map_patch(&[&known(None)], &more),
        Some(json!({"data": {"ns.b": "2 fast"}, "metadata": {"annotations": {"volplane.io/released": "t2"}}}))
    );
}
