use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::claim::SELECTED_NODE;
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
    in_flight.answered(&item("n1", "fast"), asked_before, 0);
    assert_eq!(in_flight.reserved(&item("n1", "fast")), 10 * GI);
    let asked_after = in_flight.now();
    // Another claim placed after the question keeps its reservation.
    in_flight.apply(key("b"), placed("n1", "fast", GI), item_of);
    in_flight.apply(key("b"), Claimed::Bound, item_of);
    in_flight.answered(&item("n1", "fast"), asked_after, 0);
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
fn a_fall_of_the_drivers_value_ends_the_reservations_of_the_volumes_in_it() {
    let n1 = item("n1", "fast");
    let mut in_flight = InFlight::default();
    for name in ["a", "b", "c"] {
        in_flight.apply(key(name), placed("n1", "fast", 10 * GI), item_of);
    }
    // One volume created (a, the first placed, is taken for it).
    in_flight.answered(&n1, in_flight.now(), 10 * GI);
    assert_eq!(in_flight.reserved(&n1), 20 * GI);
    // 15Gi more: one more 10Gi volume; the 5Gi left fits no request.
    in_flight.answered(&n1, in_flight.now(), 15 * GI);
    assert_eq!(in_flight.reserved(&n1), 10 * GI);
    assert_eq!((in_flight.len(), in_flight.reserving()), (3, 1), "all held until bound");
    // The same answer again (published from the last one) moves nothing.
    in_flight.answered(&n1, in_flight.now(), 0);
    assert_eq!(in_flight.reserved(&n1), 10 * GI);
    // a bound and answered after: released; its volume was in an earlier fall.
    in_flight.apply(key("a"), Claimed::Bound, item_of);
    in_flight.answered(&n1, in_flight.now(), 0);
    assert_eq!((in_flight.len(), in_flight.reserved(&n1)), (2, 10 * GI));
    // b given back: its volume was not created, so the fall taken for it was c's.
    in_flight.apply(key("b"), Claimed::Unplaced, item_of);
    assert_eq!((in_flight.reserved(&n1), in_flight.reserving()), (0, 0));
    assert_eq!(in_flight.items().collect::<Vec<_>>(), vec![(&n1, 0)]);
}

#[test]
fn a_fall_goes_to_bound_claims_first_and_their_own_volumes_are_not_counted_twice() {
    let n1 = item("n1", "fast");
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    in_flight.apply(key("b"), placed("n1", "fast", 10 * GI), item_of);
    // b was bound first; the question was asked before its binding was seen.
    let asked = in_flight.now();
    in_flight.apply(key("b"), Claimed::Bound, item_of);
    in_flight.answered(&n1, asked, 10 * GI);
    assert_eq!(in_flight.reserved(&n1), 10 * GI, "the fall is b's, not a's");
    // Asked after b's binding, the same fall seen once more covers b alone.
    let mut again = InFlight::default();
    again.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    again.apply(key("b"), placed("n1", "fast", 10 * GI), item_of);
    again.apply(key("b"), Claimed::Bound, item_of);
    again.answered(&n1, again.now(), 10 * GI);
    assert_eq!(
        (again.len(), again.reserved(&n1)),
        (1, 10 * GI),
        "b released, a reserves"
    );
}

#[test]
fn a_fall_put_down_to_the_wrong_claim_is_taken_back_when_the_right_one_is_bound() {
    let n1 = item("n1", "fast");
    let mut in_flight = InFlight::default();
    in_flight.apply(key("a"), placed("n1", "fast", 10 * GI), item_of);
    in_flight.apply(key("b"), placed("n1", "fast", 10 * GI), item_of);
    // b's volume was created first; the fall is taken for a's (placed first).
    in_flight.answered(&n1, in_flight.now(), 10 * GI);
    assert_eq!(in_flight.reserved(&n1), 10 * GI);
    // b bound: its volume was not one put down to a fall, so a's was not created.
    in_flight.apply(key("b"), Claimed::Bound, item_of);
    in_flight.answered(&n1, in_flight.now(), 0);
    assert_eq!(
        (in_flight.len(), in_flight.reserved(&n1)),
        (1, 10 * GI),
        "a reserves again"
    );
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
                        in_flight.answered(&item, moments[asked_step], 0);
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

/// A claim of the driver model: where it was placed and whether its
/// volume exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Placed,
    Created,
    Bound,
}

#[derive(Clone, Debug)]
enum DriverOp {
    Place(usize, usize),
    /// The provisioner creates the volume of a placed claim.
    Create(usize),
    Bind(usize),
    /// A placed claim given back (provisioning failed) or deleted.
    Drop(usize),
    /// A bound claim deleted: its volume goes, the driver's value rises.
    DeleteBound(usize),
    /// The driver is asked for node n and answers at once.
    Answer(usize),
}

fn driver_op() -> impl Strategy<Value = DriverOp> {
    prop_oneof![
        (0usize..8, 0usize..2).prop_map(|(c, n)| DriverOp::Place(c, n)),
        (0usize..8).prop_map(DriverOp::Create),
        (0usize..8).prop_map(DriverOp::Bind),
        (0usize..8).prop_map(DriverOp::Drop),
        (0usize..8).prop_map(DriverOp::DeleteBound),
        (0usize..2).prop_map(DriverOp::Answer),
    ]
}

proptest! {
    /// A driver whose value falls by each volume created (in any order)
    /// and rises by each deleted: after every answer, what is reserved is
    /// never less than the requests of the placements whose volumes do not
    /// exist yet (the scheduler is never shown their room), and, while no
    /// deletion hid a fall, exactly that (no volume counts twice).
    #[test]
    fn a_driver_falling_by_its_volumes_never_leaves_a_placement_unreserved(
        ops in prop::collection::vec(driver_op(), 0..100),
    ) {
        const SIZE: i64 = 10 * GI;
        let mut in_flight = InFlight::default();
        let mut stage: BTreeMap<usize, (usize, Stage)> = BTreeMap::new();
        let mut driver = [1000 * GI; 2];
        // Every item was answered before any placement (volplane publishes
        // before it follows placements).
        let mut last_answer = driver;
        let mut hidden = [false; 2];
        for (step, op) in ops.into_iter().enumerate() {
            let claim = |c: usize| key(&format!("c{c}"));
            match op {
                DriverOp::Place(c, n) if !stage.contains_key(&c) => {
                    in_flight.apply(claim(c), placed(&format!("n{n}"), "fast", SIZE), item_of);
                    stage.insert(c, (n, Stage::Placed));
                }
                DriverOp::Create(c) => if let Some((n, s)) = stage.get_mut(&c) && *s == Stage::Placed {
                    *s = Stage::Created;
                    driver[*n] -= SIZE;
                }
                DriverOp::Bind(c) => if let Some((_, s)) = stage.get_mut(&c) && *s == Stage::Created {
                    *s = Stage::Bound;
                    in_flight.apply(claim(c), Claimed::Bound, item_of);
                }
                DriverOp::Drop(c) if stage.get(&c).is_some_and(|(_, s)| *s == Stage::Placed) => {
                    in_flight.apply(claim(c), Claimed::Unplaced, item_of);
                    stage.remove(&c);
                }
                DriverOp::DeleteBound(c) => if let Some((n, Stage::Bound)) = stage.get(&c).copied() {
                    in_flight.delete(&claim(c));
                    stage.remove(&c);
                    driver[n] += SIZE;
                    hidden[n] = true;
                }
                DriverOp::Answer(n) => {
                    let fell = (last_answer[n] - driver[n]).max(0);
                    last_answer[n] = driver[n];
                    in_flight.answered(&item(&format!("n{n}"), "fast"), in_flight.now(), fell);
                    let waiting = stage.values().filter(|(on, s)| *on == n && *s == Stage::Placed).count();
                    let expected = SIZE * i64::try_from(waiting).expect("a few claims");
                    let reserved = in_flight.reserved(&item(&format!("n{n}"), "fast"));
                    prop_assert!(reserved >= expected, "node {} after step {}: {} < {}", n, step, reserved, expected);
                    if !hidden[n] {
                        prop_assert_eq!(reserved, expected, "node {} after step {}", n, step);
                    }
                }
                _ => {}
            }
        }
    }
}
