use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;

const DRIVER: &str = "d.example.com";

fn csinode(name: &str, driver: &str, keys: &[&str]) -> CSINode {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"drivers": [{"name": driver, "nodeID": name, "topologyKeys": keys}]}}))
    .expect("csinode")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The segments computed from scratch, as the Go incumbent does on every
/// event: for each CSINode listing the driver with keys, those keys'
/// values from its Node's labels; nodes without Node or a key skipped.
fn from_scratch(nodes: &BTreeMap<String, Labels>, csinodes: &BTreeMap<String, CSINode>) -> BTreeSet<Segment> {
    (csinodes.keys())
        .filter_map(|name| node_segment(nodes, csinodes, name))
        .collect()
}

/// The segment of one node, from scratch.
fn node_segment(nodes: &BTreeMap<String, Labels>, csinodes: &BTreeMap<String, CSINode>, name: &str) -> Option<Segment> {
    let keys = (csinodes.get(name)?.spec.drivers.iter())
        .find(|d| d.name == DRIVER)
        .and_then(|d| d.topology_keys.as_ref())
        .filter(|keys| !keys.is_empty())?;
    segment_labels(keys, nodes.get(name)?).map(Segment::new)
}

/// A watch of Nodes as the I/O runs it: labels cut to the index's keys.
fn apply_node(index: &mut TopologyIndex, name: &str, all: &Labels) -> Applied {
    let keys = index.keys();
    index.apply_node(name, kept_labels(Some(all), &keys), keys)
}

fn current(index: &TopologyIndex) -> BTreeSet<Segment> {
    index.segments().cloned().collect()
}

#[test]
fn nodes_of_one_zone_share_a_segment_that_goes_with_the_last_of_them() {
    let mut index = TopologyIndex::new(DRIVER);
    assert!(index.apply_csinode(&csinode("n1", DRIVER, &["zone"])).nodes_stale);
    index.apply_csinode(&csinode("n2", DRIVER, &["zone"]));
    let first = apply_node(&mut index, "n1", &labels(&[("zone", "a"), ("other", "x")]));
    assert_eq!(first.added, vec![Segment::from_pairs([("zone", "a")])]);
    let second = apply_node(&mut index, "n2", &labels(&[("zone", "a")]));
    assert_eq!(second, Applied::default(), "zone a exists already");
    assert_eq!(index.delete_node("n1"), Applied::default(), "n2 is still in zone a");
    let last = index.delete_csinode("n2");
    assert_eq!(last.removed, vec![Segment::from_pairs([("zone", "a")])]);
    assert!(index.is_empty());
}

#[test]
fn a_label_change_moves_a_node_to_another_segment() {
    let mut index = TopologyIndex::new(DRIVER);
    index.apply_csinode(&csinode("n1", DRIVER, &["zone"]));
    apply_node(&mut index, "n1", &labels(&[("zone", "a")]));
    let moved = apply_node(&mut index, "n1", &labels(&[("zone", "b")]));
    assert_eq!(moved.added, vec![Segment::from_pairs([("zone", "b")])]);
    assert_eq!(moved.removed, vec![Segment::from_pairs([("zone", "a")])]);
    let unchanged = apply_node(&mut index, "n1", &labels(&[("zone", "b"), ("status", "changed")]));
    assert_eq!(
        unchanged,
        Applied::default(),
        "a change of other labels changes nothing"
    );
}

#[test]
fn only_the_drivers_topology_keys_are_kept_per_node() {
    let mut index = TopologyIndex::new(DRIVER);
    index.apply_csinode(&csinode("n1", DRIVER, &["zone"]));
    index.apply_csinode(&csinode("n2", "other.example.com", &["rack"]));
    assert_eq!(*index.keys(), BTreeSet::from(["zone".to_string()]));
    let kept = kept_labels(
        Some(&labels(&[("zone", "a"), ("rack", "1"), ("kubernetes.io/os", "linux")])),
        &index.keys(),
    );
    assert_eq!(kept, labels(&[("zone", "a")]));
}

#[test]
fn a_new_topology_key_keeps_nodes_in_place_until_their_labels_come_again() {
    let mut index = TopologyIndex::new(DRIVER);
    index.apply_csinode(&csinode("n1", DRIVER, &["zone"]));
    let all = labels(&[("zone", "a"), ("rack", "1")]);
    apply_node(&mut index, "n1", &all);
    // A driver upgrade adds a key: the stored labels cannot tell its value.
    let upgraded = index.apply_csinode(&csinode("n1", DRIVER, &["zone", "rack"]));
    assert!(upgraded.nodes_stale, "the Nodes must be listed again");
    assert!(upgraded.added.is_empty() && upgraded.removed.is_empty(), "{upgraded:?}");
    assert_eq!(current(&index), BTreeSet::from([Segment::from_pairs([("zone", "a")])]));
    // The Nodes listed again with the new keys.
    let relisted = apply_node(&mut index, "n1", &all);
    assert_eq!(
        relisted.added,
        vec![Segment::from_pairs([("rack", "1"), ("zone", "a")])]
    );
    assert_eq!(relisted.removed, vec![Segment::from_pairs([("zone", "a")])]);
}

#[derive(Clone, Debug)]
enum Op {
    Node(usize, Option<&'static str>, Option<&'static str>),
    DeleteNode(usize),
    CsiNode(usize, &'static [&'static str], bool),
    DeleteCsiNode(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let value = |values: &'static [&'static str]| prop::option::of(prop::sample::select(values));
    let keys: &'static [&'static [&'static str]] = &[&[], &["zone"], &["zone", "rack"], &["rack"]];
    prop_oneof![
        (0usize..5, value(&["a", "b"]), value(&["1", "2"])).prop_map(|(n, z, r)| Op::Node(n, z, r)),
        (0usize..5).prop_map(Op::DeleteNode),
        (0usize..5, prop::sample::select(keys), any::<bool>()).prop_map(|(n, k, ours)| Op::CsiNode(n, k, ours)),
        (0usize..5).prop_map(Op::DeleteCsiNode),
    ]
}

proptest! {
    /// Event by event, the index holds exactly the segments a rebuild from
    /// scratch gives, and the added/removed changes it reports add up to them.
    #[test]
    fn incremental_segments_equal_a_rebuild_from_scratch(ops in prop::collection::vec(op(), 0..60)) {
        let mut index = TopologyIndex::new(DRIVER);
        let mut nodes: BTreeMap<String, Labels> = BTreeMap::new();
        let mut csinodes: BTreeMap<String, CSINode> = BTreeMap::new();
        let mut followed: BTreeSet<Segment> = BTreeSet::new();
        for op in ops {
            let mut changes = vec![];
            match op {
                Op::Node(n, zone, rack) => {
                    let name = format!("n{n}");
                    let mut all = labels(&[("kubernetes.io/hostname", &name)]);
                    all.extend(zone.map(|z| ("zone".to_string(), z.to_string())));
                    all.extend(rack.map(|r| ("rack".to_string(), r.to_string())));
                    changes.push(apply_node(&mut index, &name, &all));
                    nodes.insert(name, all);
                }
                Op::DeleteNode(n) => {
                    let name = format!("n{n}");
                    changes.push(index.delete_node(&name));
                    nodes.remove(&name);
                }
                Op::CsiNode(n, keys, ours) => {
                    let name = format!("n{n}");
                    let object = csinode(&name, if ours { DRIVER } else { "other.example.com" }, keys);
                    let applied = index.apply_csinode(&object);
                    let stale = applied.nodes_stale;
                    changes.push(applied);
                    csinodes.insert(name, object);
                    if stale {
                        // The I/O lists the Nodes again with the new keys.
                        for (name, all) in &nodes {
                            changes.push(apply_node(&mut index, name, all));
                        }
                    }
                }
                Op::DeleteCsiNode(n) => {
                    let name = format!("n{n}");
                    changes.push(index.delete_csinode(&name));
                    csinodes.remove(&name);
                }
            }
            for change in changes {
                for segment in change.removed {
                    prop_assert!(followed.remove(&segment), "removed twice: {segment}");
                }
                for segment in change.added {
                    prop_assert!(followed.insert(segment.clone()), "added twice: {segment}");
                }
            }
            let expected = from_scratch(&nodes, &csinodes);
            prop_assert_eq!(&current(&index), &expected);
            for n in 0..5 {
                let name = format!("n{n}");
                prop_assert_eq!(index.segment_of(&name).cloned(), node_segment(&nodes, &csinodes, &name));
            }
            prop_assert_eq!(&followed, &expected);
        }
    }
}
