//! Taking over csi-provisioner's CSIStorageCapacity objects in place
//! (`--capacity-adopt external-provisioner`): the pure rules.
//!
//! csi-provisioner's objects carry `csi.storage.k8s.io/managed-by:
//! external-provisioner` (central) or `external-provisioner-<node>` (per
//! node). When its capacity tracking is switched off nothing deletes them,
//! and kube-scheduler accepts a node if *any* object says the volume fits:
//! a stale, larger value would override volplane's. volplane takes each one
//! over with one update (its labels, owner and the driver's current value),
//! so a (segment, class) never has no object, or two that disagree.
//!
//! A running csi-provisioner writes only when a value changes, so silence
//! does not prove it stopped. The [`Gate`] decides when adopting is safe:
//! its objects must have been unchanged for a full poll interval; then one
//! object is adopted as a canary and watched for another interval. A
//! csi-provisioner that still runs re-creates an object that leaves its
//! selector at once: then volplane gives the canary back (deletes its copy,
//! leaving the incumbent's), says so once, and tries again only after the
//! objects have been quiet again, waiting twice as long each time (at most
//! an hour). Without a re-creation the gate opens and every object is
//! adopted.

use std::time::Duration;

use tokio::time::Instant;

use crate::model::WorkItem;

/// `csi.storage.k8s.io/managed-by` of csi-provisioner's objects: central,
/// or of `node` in per-node mode. `None` where csi-provisioner shortens the
/// value (a node name past 42 characters): volplane does not guess its
/// shortening and adopts nothing there.
pub fn incumbent_managed_by(node: Option<&str>) -> Option<String> {
    let value = match node {
        None => "external-provisioner".to_string(),
        Some(node) => format!("external-provisioner-{node}"),
    };
    let valid = value.len() <= 63 && value.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    valid.then_some(value)
}

/// The longest wait between canaries.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Where the takeover stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the incumbent's objects to be quiet.
    Waiting,
    /// One object adopted; watching for the incumbent to re-create it.
    Canary {
        /// The canary's item.
        item: WorkItem,
        /// When it was adopted.
        at: Instant,
    },
    /// Adopting every object.
    Open,
}

/// When volplane may adopt the incumbent's objects.
#[derive(Clone, Debug)]
pub struct Gate {
    interval: Duration,
    stage: Stage,
    /// When an incumbent object last appeared or changed.
    last_change: Instant,
    /// Canaries the incumbent re-created in a row.
    failures: u32,
    /// No canary before this.
    not_before: Instant,
}

/// What an incumbent object that appeared means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appeared {
    /// Nothing special: the quiet period starts again.
    Change,
    /// The incumbent re-created the canary's object: it still runs. Give the
    /// canary back and say so.
    StillRunning,
}

impl Gate {
    /// A gate that starts waiting at `now`; `interval` is the poll interval.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            stage: Stage::Waiting,
            last_change: now,
            failures: 0,
            not_before: now,
        }
    }

    /// The current stage.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// An incumbent object was written by someone else (changed, or new for
    /// `item`). While a canary stands or the gate is open, that is the
    /// incumbent at work: it still runs.
    pub fn appeared(&mut self, now: Instant) -> Appeared {
        self.last_change = now;
        if self.stage != Stage::Waiting {
            self.failures = self.failures.saturating_add(1);
            let backoff = self
                .interval
                .saturating_mul(2u32.saturating_pow(self.failures))
                .min(MAX_BACKOFF.max(self.interval));
            self.not_before = now + backoff;
            self.stage = Stage::Waiting;
            return Appeared::StillRunning;
        }
        Appeared::Change
    }

    /// Whether a canary may be adopted now: waiting, quiet for a full
    /// interval, and past the backoff.
    pub fn canary_due(&self, now: Instant) -> bool {
        self.stage == Stage::Waiting && now.duration_since(self.last_change) >= self.interval && now >= self.not_before
    }

    /// The canary `item` is being adopted now.
    pub fn start_canary(&mut self, item: WorkItem, now: Instant) {
        self.stage = Stage::Canary { item, at: now };
    }

    /// The canary's write landed at `now`: its interval counts from here.
    pub fn canary_written(&mut self, item: &WorkItem, now: Instant) {
        if let Stage::Canary { item: canary, at } = &mut self.stage
            && canary == item
        {
            *at = now;
        }
    }

    /// Back to waiting from `now` (the canary's write failed, or this
    /// instance just started leading and knows nothing of the interval
    /// before); failures and their backoff stay.
    pub fn restart(&mut self, now: Instant) {
        self.stage = Stage::Waiting;
        self.last_change = now;
    }

    /// Nothing to adopt as a canary (no incumbent object stands for an item
    /// volplane publishes): the rest may go.
    pub fn open(&mut self) {
        self.stage = Stage::Open;
    }

    /// Opens the gate once the canary has stood a full interval. Returns
    /// whether it opened now.
    pub fn tick(&mut self, now: Instant) -> bool {
        if let Stage::Canary { at, .. } = &self.stage
            && now.duration_since(*at) >= self.interval
        {
            self.stage = Stage::Open;
            self.failures = 0;
            return true;
        }
        false
    }

    /// Whether `item`'s incumbent object may be adopted now.
    pub fn may_adopt(&self, item: &WorkItem) -> bool {
        match &self.stage {
            Stage::Open => true,
            Stage::Canary { item: canary, .. } => canary == item,
            Stage::Waiting => false,
        }
    }

    /// Whether the incumbent's objects that stand for nothing volplane
    /// publishes, or duplicate its own, may be deleted now.
    pub fn may_delete(&self) -> bool {
        self.stage == Stage::Open
    }

    /// When the gate next needs looking at.
    pub fn next_wake(&self) -> Option<Instant> {
        match &self.stage {
            Stage::Waiting => Some((self.last_change + self.interval).max(self.not_before)),
            Stage::Canary { at, .. } => Some(*at + self.interval),
            Stage::Open => None,
        }
    }
}

#[cfg(test)]
mod tests;
