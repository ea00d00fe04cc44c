//! Placements in flight: claims the scheduler has placed on a node
//! (`volume.kubernetes.io/selected-node`) whose volume is not provisioned
//! yet. Pure: claim events in, bytes reserved per item out.
//!
//! kube-scheduler compares each claim with a published object alone and
//! subtracts nothing for the claims it placed a moment ago (KEP-1472 lists
//! that as a non-goal; kubernetes/kubernetes#111755, topolvm/topolvm#117,
//! kubernetes-csi/external-provisioner#697): in a burst, every pod sees the
//! same free space and the driver refuses the ones that do not fit. What
//! volplane publishes for an item is the driver's value less what the
//! item's placements in flight reserve, so the scheduler is never shown
//! more than the driver has left.
//!
//! A claim reserves its requested bytes from the moment it is placed until
//! - it is deleted, or its `selected-node` is removed (the provisioner
//!   gave it back: provisioning failed and the pod is scheduled again); or
//! - it is bound **and** the driver answered a question asked after that:
//!   only then does the driver's own value cover the new volume; or
//! - the driver's value fell by its bytes since it was placed: its volume
//!   was created, and is in the driver's value (see [`InFlight::answered`]).
//!   csi-provisioner binds a claim seconds after its CreateVolume (its
//!   client is rate-limited), and counting both for those seconds made a
//!   node in a burst publish nothing while it had room.
//!
//! Until one of these, both may count, and less is published for that
//! moment, never more.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use volplane_runtime::{Index, Keyed, ObjectKey};

use crate::claim::{ClaimObject, Claimed, claimed};
use crate::model::{PublishedCapacity, WorkItem};

/// The driver's value less what is reserved: never more than the driver
/// has left (a maximum volume size is capped at what is left too, as the
/// scheduler reads the maximum alone when it is set).
pub fn less_reserved(value: PublishedCapacity, reserved: i64) -> PublishedCapacity {
    if reserved <= 0 {
        return value;
    }
    let capacity = value.capacity.saturating_sub(reserved).max(0);
    PublishedCapacity {
        capacity,
        maximum_volume_size: value.maximum_volume_size.map(|maximum| maximum.min(capacity)),
    }
}

/// A moment of the index: an answer to a question asked at or after the
/// moment a claim was seen bound covers the claim.
pub type Moment = u64;

/// A claim held: placed on `node`, for `class`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    node: Arc<str>,
    class: Arc<str>,
    bytes: i64,
    /// The item it counts for, when its node is in a segment of a class
    /// published for.
    item: Option<WorkItem>,
    /// When it was seen bound.
    bound_at: Option<Moment>,
    /// When it was placed (as held now).
    placed_at: Moment,
    /// Whether a fall of the driver's value was put down to its volume:
    /// it reserves nothing more.
    created: bool,
}

impl Held {
    /// The bytes it reserves now.
    fn reserving(&self) -> i64 {
        if self.created { 0 } else { self.bytes }
    }
}

/// Bytes reserved for one item, and by which claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Reserved {
    bytes: i64,
    /// How many of `claims` reserve bytes.
    reserving: usize,
    /// Every claim held for the item.
    claims: BTreeSet<ObjectKey>,
}

/// The placements in flight, by claim, with what they reserve per item.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    claims: HashMap<ObjectKey, Held>,
    reserved: HashMap<WorkItem, Reserved>,
    now: Moment,
}

impl InFlight {
    /// The current moment: what a question asked now is asked at.
    pub fn now(&self) -> Moment {
        self.now
    }

    /// Bytes reserved for `item`.
    pub fn reserved(&self, item: &WorkItem) -> i64 {
        self.reserved.get(item).map_or(0, |r| r.bytes)
    }

    /// How many claims are held (placed, or bound and not covered yet).
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// How many claims reserve bytes for an item now (a claim of a class
    /// not published for, or on a node in no segment, is held but reserves
    /// nothing).
    pub fn reserving(&self) -> usize {
        self.reserved.values().map(|r| r.reserving).sum()
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Every held claim's key.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.claims.keys()
    }

    /// Items with something reserved, and how much.
    pub fn items(&self) -> impl Iterator<Item = (&WorkItem, i64)> {
        self.reserved.iter().map(|(item, r)| (item, r.bytes))
    }

    /// The claim under `key` says `claimed`; `item_of` says which item a
    /// (node, class) counts for now. Returns the items to refresh: those
    /// whose reservation changed, and that of a claim just bound (its
    /// driver's value is asked again, which ends the reservation).
    pub fn apply(
        &mut self,
        key: ObjectKey,
        claimed: Claimed,
        item_of: impl Fn(&str, &str) -> Option<WorkItem>,
    ) -> Vec<WorkItem> {
        self.now += 1;
        match claimed {
            Claimed::Placed { node, class, bytes } => {
                if let Some(held) = self.claims.get(&key)
                    && *held.node == *node
                    && *held.class == *class
                    && held.bytes == bytes
                    && held.bound_at.is_none()
                {
                    return Vec::new();
                }
                let mut refresh = self.release(&key);
                let item = item_of(&node, &class);
                let held = Held {
                    node: node.into(),
                    class: class.into(),
                    bytes,
                    item,
                    bound_at: None,
                    placed_at: self.now,
                    created: false,
                };
                refresh.extend(self.hold(key, held));
                refresh
            }
            Claimed::Bound => match self.claims.get_mut(&key) {
                Some(held) if held.bound_at.is_none() => {
                    held.bound_at = Some(self.now);
                    held.item.clone().into_iter().collect()
                }
                _ => Vec::new(),
            },
            Claimed::Unplaced => self.release(&key),
        }
    }

    /// The claim under `key` is gone. Returns the item whose reservation changed.
    pub fn delete(&mut self, key: &ObjectKey) -> Vec<WorkItem> {
        self.now += 1;
        self.release(key)
    }

    /// The driver answered for `item` a question asked at `asked`, its
    /// value `fell` bytes below its previous answer (0 when it rose or
    /// there was none).
    ///
    /// The claims seen bound by then are in its value, and reserve no
    /// more. Their volumes not put down to an earlier fall are taken from
    /// this one; what is left is put down to the volumes of claims still
    /// held, bound ones first, then in the order they were placed, each
    /// whose request fits in what is left: those reserve nothing more
    /// either. When the bound claims' volumes are more than the fall, an
    /// earlier fall was put down to claims whose volumes were not created
    /// (the provisioner took them out of order): the last placed of those
    /// reserve again, as much as is missing.
    ///
    /// A fall from anything else (a volume volplane does not see, another
    /// class in the same pool) is taken for a placement's and ends its
    /// reservation early; a rise hiding a fall keeps reservations longer.
    /// Either way, never more than the driver has left is published.
    pub fn answered(&mut self, item: &WorkItem, asked: Moment, fell: i64) {
        let Some(reserved) = self.reserved.get(item) else {
            return;
        };
        let covered: Vec<ObjectKey> = (reserved.claims.iter())
            .filter(|key| {
                (self.claims.get(*key))
                    .and_then(|held| held.bound_at)
                    .is_some_and(|bound| bound <= asked)
            })
            .cloned()
            .collect();
        let mut left = fell;
        for key in covered {
            if let Some(held) = self.remove(&key) {
                left = left.saturating_sub(held.reserving());
            }
        }
        self.settle(item, left);
    }

    /// A fall of `bytes` (above zero) is put down to the volumes of
    /// `item`'s standing claims (see [`put_down_to`]); `bytes` below zero
    /// were put down wrongly, and are taken back (see [`taken_back`]).
    fn settle(&mut self, item: &WorkItem, bytes: i64) {
        let Some(reserved) = self.reserved.get(item).filter(|_| bytes != 0) else {
            return;
        };
        let standing = (reserved.claims.iter())
            .filter_map(|key| Some((key.clone(), self.claims.get(key)?)))
            .collect();
        let marks = if bytes > 0 {
            put_down_to(standing, bytes)
        } else {
            taken_back(standing, bytes.saturating_neg())
        };
        for (key, created) in marks {
            self.mark(&key, created);
        }
    }

    /// The claim under `key` has its volume in the driver's value
    /// (`created`), or not.
    fn mark(&mut self, key: &ObjectKey, created: bool) {
        let Some(held) = self.claims.get_mut(key) else {
            return;
        };
        if held.created == created {
            return;
        }
        held.created = created;
        let (bytes, item) = (held.bytes, held.item.clone());
        let Some(reserved) = item.and_then(|item| self.reserved.get_mut(&item)) else {
            return;
        };
        if created {
            reserved.bytes = reserved.bytes.saturating_sub(bytes);
            reserved.reserving = reserved.reserving.saturating_sub(1);
        } else {
            reserved.bytes = reserved.bytes.saturating_add(bytes);
            reserved.reserving += 1;
        }
    }

    /// Segments or classes changed: every claim counts again for the item
    /// `item_of` says. Returns the items whose reservation changed.
    pub fn relocate(&mut self, item_of: impl Fn(&str, &str) -> Option<WorkItem>) -> Vec<WorkItem> {
        let before = std::mem::take(&mut self.reserved);
        let claims = std::mem::take(&mut self.claims);
        for (key, mut held) in claims {
            held.item = item_of(&held.node, &held.class);
            self.hold(key, held);
        }
        let mut changed: Vec<WorkItem> = (before.iter())
            .filter(|(item, r)| self.reserved.get(*item).map(|now| now.bytes) != Some(r.bytes))
            .map(|(item, _)| item.clone())
            .collect();
        changed.extend(
            (self.reserved.keys())
                .filter(|item| !before.contains_key(*item))
                .cloned(),
        );
        changed
    }

    fn hold(&mut self, key: ObjectKey, held: Held) -> Option<WorkItem> {
        let item = held.item.clone();
        if let Some(item) = &item {
            let reserved = self.reserved.entry(item.clone()).or_default();
            if !held.created {
                reserved.bytes = reserved.bytes.saturating_add(held.bytes);
                reserved.reserving += 1;
            }
            reserved.claims.insert(key.clone());
        }
        self.claims.insert(key, held);
        item
    }

    /// Releases the claim under `key`; a fall put down to its volume is
    /// another's when it was given back or deleted unbound, and the fall
    /// its volume made was put down to another's when it was bound and
    /// deleted before an answer covered it.
    fn release(&mut self, key: &ObjectKey) -> Vec<WorkItem> {
        let Some(held) = self.remove(key) else {
            return Vec::new();
        };
        let Some(item) = held.item else {
            return Vec::new();
        };
        match (held.created, held.bound_at) {
            (true, None) => self.settle(&item, held.bytes),
            (false, Some(_)) => self.settle(&item, held.bytes.saturating_neg()),
            _ => {}
        }
        vec![item]
    }

    /// Takes the claim under `key` out of the index.
    fn remove(&mut self, key: &ObjectKey) -> Option<Held> {
        let held = self.claims.remove(key)?;
        let item = held.item.as_ref()?;
        if let Some(reserved) = self.reserved.get_mut(item) {
            if !held.created {
                reserved.bytes = reserved.bytes.saturating_sub(held.bytes);
                reserved.reserving = reserved.reserving.saturating_sub(1);
            }
            reserved.claims.remove(key);
            if reserved.claims.is_empty() {
                self.reserved.remove(item);
            }
        }
        Some(held)
    }
}

/// The standing claims whose volumes a fall of `left` bytes is put down
/// to: bound ones first, then in the order they were placed, each whose
/// request fits in what is left.
fn put_down_to(mut standing: Vec<(ObjectKey, &Held)>, mut left: i64) -> Vec<(ObjectKey, bool)> {
    standing.retain(|(_, held)| !held.created);
    standing.sort_by_key(|(_, held)| (held.bound_at.is_none(), held.placed_at));
    let mut created = Vec::new();
    for (key, held) in standing {
        if held.bytes <= left {
            left -= held.bytes;
            created.push((key, true));
        }
    }
    created
}

/// The claims an earlier fall was put down to wrongly, `missing` bytes of
/// them: the last placed of those not bound, until as much reserves again.
fn taken_back(mut standing: Vec<(ObjectKey, &Held)>, mut missing: i64) -> Vec<(ObjectKey, bool)> {
    standing.retain(|(_, held)| held.created && held.bound_at.is_none());
    standing.sort_by_key(|(_, held)| std::cmp::Reverse(held.placed_at));
    let mut again = Vec::new();
    for (key, held) in standing {
        if missing <= 0 {
            break;
        }
        missing -= held.bytes;
        again.push((key, false));
    }
    again
}

/// An [`InFlight`] as a claim watch feeds it, with how a (node, class)
/// maps to an item now, gathering the items to refresh.
pub struct ClaimsOf<'a, F> {
    /// The index fed.
    pub in_flight: &'a mut InFlight,
    /// The item a (node, class) counts for.
    pub item_of: F,
    /// Items whose reservation changed, or whose claim was just bound.
    pub refresh: Vec<WorkItem>,
}

impl<F> fmt::Debug for ClaimsOf<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimsOf")
            .field("in_flight", &self.in_flight)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&str, &str) -> Option<WorkItem>> Index<ClaimObject> for ClaimsOf<'_, F> {
    fn apply(&mut self, claim: ClaimObject) {
        if let Some(key) = claim.key() {
            let refresh = self.in_flight.apply(key, claimed(&claim), &self.item_of);
            self.refresh.extend(refresh);
        }
    }

    fn delete(&mut self, key: &ObjectKey) {
        let refresh = self.in_flight.delete(key);
        self.refresh.extend(refresh);
    }

    fn keys(&self) -> Vec<ObjectKey> {
        self.in_flight.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests;
