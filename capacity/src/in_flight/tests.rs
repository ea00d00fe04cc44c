use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::model::Segment;

const GI: i64 = 1 << 30;

fn item(node: &str, class: &str) -> WorkItem {
    WorkItem {
        segment: Segment::from_pairs([("kubernetes.io/hostname", node)]),
        class: class.into(),
    }
}

/// Every node is its own segment; class "other" is not published for.
fn item_of(node: &str, class: &str) -> Option<WorkItem> {
    (class != "other").then(|| item(node, class))
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::namespaced("ns", name)
}

fn placed(node: &str, class: &str, bytes: i64) -> Claimed {
    Claimed::Placed {
        node: node.into(),
        class: class.into(),
        bytes,
    }
}

#[test]
fn placed_claims_reserve_their_requests_on_their_node_and_class() {
    let mut in_flight = InFlight::default();
    assert_eq!(
        in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of),
        vec![item("n1", "fast")]
    );
    in_flight.apply(key("b"), placed("n1", "fast", 5 * GI), item_of);
    in_flight.apply(key("c"), placed("n2", "fast", 7 * GI), item_of);
    assert_eq!(in_flight.apply(key("d"), placed("n1", "other", GI), item_of), vec![]);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 15 * GI);
    assert_eq!(in_flight.reserved(&item("n2", "fast")), 7 * GI);
    assert_eq!(
        (in_flight.len(), in_flight.reserving()),
        (4, 3),
        "the other class's claim reserves nothing"
    );
    assert_eq!(in_flight.reserved(&item("n3", "fast")), 0);
    // The same event again changes nothing and refreshes nothing.
    assert_eq!(
        in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of),
        vec![]
    );
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 15 * GI);
}

#[test]
fn a_bound_claim_reserves_until_an_answer_asked_after_its_binding() {
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    let asked_before = in_flight.now();
    assert_eq!(
        in_flight.apply(key("a"), Claimed::Bound, item_of),
        vec![item("n1", "fast")],
        "asked again"
    );
    // An answer to a question asked before the binding does not have the volume in it.
    in_flight.answered(&item("n1", "fast"), asked_before);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 10 * GI);
    let asked_after = in_flight.now();
    // Another claim placed after the question keeps its reservation.
    in_flight.apply(key("b"), placed("n1", "fast", GI), item_of);
    in_flight.apply(key("b"), Claimed::Bound, item_of);
    in_flight.answered(&item("n1", "fast"), asked_after);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), GI);
    assert_eq!(in_flight.len(), 1);
}

#[test]
fn a_claim_given_back_or_deleted_frees_its_reservation_at_once() {
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    in_flight.apply(key("b"), placed("n1", "fast", 10 * GI), item_of);
    // The provisioner removed selected-node (provisioning failed).
    assert_eq!(
        in_flight.apply(key("a"), Claimed::Unplaced, item_of),
        vec![item("n1", "fast")]
    );
    assert_eq!(in_flight.delete(&key("b")), vec![item("n1", "fast")]);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 0);
    assert!(in_flight.is_empty());
    assert_eq!(in_flight.items().count(), 0, "no empty entries are kept");
    assert_eq!(in_flight.delete(&key("never-seen")), vec![]);
}

#[test]
fn a_claim_placed_again_elsewhere_moves_its_reservation() {
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    let refreshed = in_flight.apply(key("a"), placed("n2", "fast", 10 * GI), item_of);
    assert_eq!(refreshed, vec![item("n1", "fast"), item("n2", "fast")]);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 0);
    assert_eq!(in_flight.reserved(&item("n2", "fast")), 10 * GI);
}

#[test]
fn relocating_counts_each_claim_for_the_item_it_belongs_to_now() {
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), |_, _| None);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 0, "node in no segment yet");
    assert_eq!(in_flight.relocate(item_of), vec![item("n1", "fast")]);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 10 * GI);
    assert_eq!(in_flight.relocate(item_of), vec![], "nothing moved");
    assert_eq!(in_flight.relocate(|_, _| None), vec![item("n1", "fast")]);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 0);
}

#[test]
fn less_reserved_is_never_negative_and_caps_the_maximum_volume_size() {
    let value = PublishedCapacity {
        capacity: 100 * GI,
        maximum_volume_size: Some(80 * GI),
    };
    assert_eq!(less_reserved(value, 0), value);
    assert_eq!(
        less_reserved(value, 30 * GI),
        PublishedCapacity {
            capacity: 70 * GI,
            maximum_volume_size: Some(70 * GI)
        }
    );
    assert_eq!(
        less_reserved(value, 500 * GI),
        PublishedCapacity {
            capacity: 0,
            maximum_volume_size: Some(0)
        }
    );
    let huge = PublishedCapacity {
        capacity: i64::MIN + 1,
        maximum_volume_size: None,
    };
    assert_eq!(less_reserved(huge, i64::MAX).capacity, 0, "no overflow");
}

fn claim(value: serde_json::Value) -> ClaimObject {
    serde_json::from_value(value).expect("claim")
}

#[test]
fn a_claim_is_read_for_its_placement_and_other_annotations_are_skipped() {
    let placed_claim = claim(json!({
        "metadata": {"name": "c", "namespace": "ns", "annotations": {
            SELECTED_NODE: "n1", "big": "x".repeat(100_000), "volume.kubernetes.io/storage-provisioner": "d"}},
        "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "10Gi"}}}
    }));
    assert_eq!(
        placed_claim.metadata.annotations.as_ref().map(BTreeMap::len),
        Some(1),
        "only selected-node kept"
    );
    assert_eq!(claimed(&placed_claim), placed("n1", "fast", 10 * GI));
    let bound = claim(json!({
        "metadata": {"name": "c", "annotations": {SELECTED_NODE: "n1"}},
        "spec": {"storageClassName": "fast", "volumeName": "pv-1", "resources": {"requests": {"storage": "10Gi"}}}
    }));
    assert_eq!(claimed(&bound), Claimed::Bound);
    for unplaced in [
        json!({"metadata": {"name": "c"}, "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}}),
        json!({"metadata": {"name": "c", "annotations": {SELECTED_NODE: "n1"}}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}),
        json!({"metadata": {"name": "c", "annotations": {SELECTED_NODE: "n1"}}, "spec": {"storageClassName": "fast"}}),
        json!({"metadata": {"name": "c", "annotations": {SELECTED_NODE: "n1"}}, "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "-1"}}}}),
        json!({"metadata": {"name": "c", "annotations": {SELECTED_NODE: ""}}, "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}}),
        json!({"metadata": {"name": "c", "annotations": null}}),
        json!({"metadata": {"name": "c"}}),
    ] {
        assert_eq!(claimed(&claim(unplaced.clone())), Claimed::Unplaced, "{unplaced}");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Place(usize, usize, usize, i64),
    Bind(usize),
    GiveBack(usize),
    Delete(usize),
    /// An answer for node n's item, asked `ago` operations ago.
    Answer(usize, usize),
    /// Node n leaves (or rejoins) every segment.
    Toggle(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..6, 0usize..3, 0usize..2, 1i64..20).prop_map(|(c, n, k, b)| Op::Place(c, n, k, b * GI)),
        (0usize..6).prop_map(Op::Bind),
        (0usize..6).prop_map(Op::GiveBack),
        (0usize..6).prop_map(Op::Delete),
        (0usize..3, 0usize..4).prop_map(|(n, ago)| Op::Answer(n, ago)),
        (0usize..3).prop_map(Op::Toggle),
    ]
}

/// A claim as the oracle holds it: where, how much, and at which step it
/// was seen bound.
#[derive(Clone, Debug)]
struct Truth {
    node: String,
    class: &'static str,
    bytes: i64,
    bound_at: Option<usize>,
}

proptest! {
    /// Step by step, what is reserved per item equals the sum, computed
    /// from scratch, of the requests of the claims placed there that no
    /// answer asked after their binding covers; nothing is ever negative.
    #[test]
    fn reservations_equal_a_sum_from_scratch(ops in prop::collection::vec(op(), 0..80)) {
        let classes = ["fast", "other"];
        let mut in_flight = InFlight::default();
        let mut truth: BTreeMap<usize, Truth> = BTreeMap::new();
        let mut away = [false; 3];
        // The index's moment after each step, to ask "a few steps ago".
        let mut moments: Vec<Moment> = vec![in_flight.now()];
        for (step, op) in ops.into_iter().enumerate() {
            let resolve = |away: [bool; 3]| {
                move |node: &str, class: &str| {
                    let n: usize = node.trim_start_matches('n').parse().ok()?;
                    if away[n] { None } else { item_of(node, class) }
                }
            };
            match op {
                Op::Place(c, n, k, bytes) => {
                    let node = format!("n{n}");
                    in_flight.apply(key(&format!("c{c}")), placed(&node, classes[k], bytes), resolve(away));
                    let same = truth.get(&c).is_some_and(|t| t.node == node && t.class == classes[k] && t.bytes == bytes && t.bound_at.is_none());
                    if !same {
                        truth.insert(c, Truth { node, class: classes[k], bytes, bound_at: None });
                    }
                }
                Op::Bind(c) => {
                    in_flight.apply(key(&format!("c{c}")), Claimed::Bound, resolve(away));
                    if let Some(t) = truth.get_mut(&c) && t.bound_at.is_none() {
                        t.bound_at = Some(step);
                    }
                }
                Op::GiveBack(c) => {
                    in_flight.apply(key(&format!("c{c}")), Claimed::Unplaced, resolve(away));
                    truth.remove(&c);
                }
                Op::Delete(c) => {
                    in_flight.delete(&key(&format!("c{c}")));
                    truth.remove(&c);
                }
                Op::Answer(n, ago) => {
                    let asked_step = moments.len().saturating_sub(1 + ago);
                    let node = format!("n{n}");
                    if let Some(item) = resolve(away)(&node, "fast") {
                        in_flight.answered(&item, moments[asked_step]);
                        // Asked after step `asked_step - 1` was applied.
                        truth.retain(|_, t| !(t.node == node && t.class == "fast"
                            && t.bound_at.is_some_and(|b| b < asked_step)));
                    }
                }
                Op::Toggle(n) => {
                    away[n] = !away[n];
                    in_flight.relocate(resolve(away));
                }
            }
            moments.push(in_flight.now());
            for (n, gone) in away.iter().enumerate() {
                let node = format!("n{n}");
                let expected: i64 = if *gone { 0 } else {
                    truth.values().filter(|t| t.node == node && t.class == "fast").map(|t| t.bytes).sum()
                };
                prop_assert_eq!(in_flight.reserved(&item(&node, "fast")), expected, "node {} after step {}", n, step);
                prop_assert_eq!(in_flight.reserved(&item(&node, "other")), 0);
            }
            prop_assert_eq!(in_flight.len(), truth.len());
        }
    }
}
