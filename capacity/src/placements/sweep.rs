//! Per-node capacity of nodes that are gone.
//!
//! A per-node instance's CSIStorageCapacity objects are owned by its
//! DaemonSet, so that uninstalling volplane (deleting the DaemonSet)
//! removes them all. A node that is deleted leaves its objects behind,
//! though: nothing else owns them, and the scheduler would go on reading
//! them for a segment nobody publishes any more. The placements controller
//! (one central instance, the Lease holder) watches Node metadata and
//! deletes them:
//!
//! - after a node's deletion, the objects labelled with that node's
//!   `managed-by` value (one label-selected list);
//! - after every complete list of the nodes (at start, after a re-list),
//!   every per-node object in its namespace whose node is not in the list,
//!   unless younger than [`MIN_AGE`]: a node's instance may publish before
//!   this watch shows the node.
//!
//! Pure: [`LiveNodes`] turns node events into [`Sweep`]s and says which of
//! the objects found are stale; [`run`] does the I/O.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use tokio::time::Instant;
use tracing::{info, warn};
use volplane_runtime::Leadership;
use volplane_runtime::relist::relisting;

use crate::model::{MANAGED_BY_LABEL, is_per_node, managed_by};

/// Objects younger than this survive a sweep after a list of the nodes.
pub const MIN_AGE: Duration = Duration::from_secs(60);

/// How long node deletions are gathered before their objects are swept.
const GATHER: Duration = Duration::from_secs(2);

/// Whether `created` is at least [`MIN_AGE`] before `now` (unknown: no).
fn old_enough(created: Option<Timestamp>, now: Timestamp) -> bool {
    let min_age = i64::try_from(MIN_AGE.as_secs()).unwrap_or(i64::MAX);
    created.is_some_and(|created| now.as_second() - created.as_second() >= min_age)
}

/// What to sweep.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Sweep {
    /// Every per-node object whose node is not listed (after a list).
    Unlisted,
    /// The objects of this node, deleted.
    Node(String),
}

/// A CSIStorageCapacity object as a sweep sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its name.
    pub name: String,
    /// Its UID: the delete's precondition.
    pub uid: Option<String>,
    /// Its `managed-by` label.
    pub managed_by: Option<String>,
    /// When it was created.
    pub created: Option<Timestamp>,
}

impl Found {
    fn of(object: &PartialObjectMeta<CSIStorageCapacity>) -> Self {
        let meta = &object.metadata;
        Self {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            managed_by: meta.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL)).cloned(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// The nodes as the node watch last showed them completely.
#[derive(Debug, Default)]
pub struct LiveNodes {
    nodes: HashSet<String>,
    /// The list in progress, after an `Init`.
    listing: Option<HashSet<String>>,
    listed: bool,
}

impl LiveNodes {
    /// Takes a node event (by node name); returns the sweep it calls for.
    pub fn apply(&mut self, event: Event<String>) -> Option<Sweep> {
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(node) => {
                self.listing.get_or_insert_with(HashSet::new).insert(node);
            }
            Event::InitDone => {
                // A re-list is the whole truth: nodes it lacks are gone.
                self.nodes = self.listing.take().unwrap_or_default();
                self.listed = true;
                return Some(Sweep::Unlisted);
            }
            Event::Apply(node) => {
                self.nodes.insert(node);
            }
            Event::Delete(node) => {
                self.nodes.remove(&node);
                return self.listed.then_some(Sweep::Node(node));
            }
        }
        None
    }

    /// Whether the nodes were listed completely and no list is in progress.
    pub fn is_current(&self) -> bool {
        self.listed && self.listing.is_none()
    }

    /// Whether some of `found` are per-node objects of no listed node that
    /// a sweep after a list skips for their age at `now`.
    pub fn deferred(&self, found: &[Found], now: Timestamp) -> bool {
        let live = self.live();
        (found.iter()).any(|object| {
            object
                .managed_by
                .as_deref()
                .is_some_and(|value| is_per_node(value) && !live.contains(value))
                && !old_enough(object.created, now)
        })
    }

    fn live(&self) -> HashSet<String> {
        self.nodes.iter().map(|node| managed_by(Some(node))).collect()
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The objects of `found` that `sweep` deletes: per-node objects of no
    /// listed node; after a list, only those at least [`MIN_AGE`] old at `now`.
    pub fn stale<'a>(&self, sweep: &Sweep, found: &'a [Found], now: Timestamp) -> Vec<&'a Found> {
        let live = self.live();
        let wanted = match sweep {
            Sweep::Node(node) => Some(managed_by(Some(node))),
            Sweep::Unlisted => None,
        };
        (found.iter())
            .filter(|object| {
                let Some(value) = object.managed_by.as_deref() else {
                    return false;
                };
                let of_sweep = match &wanted {
                    Some(wanted) => value == wanted,
                    None => old_enough(object.created, now),
                };
                is_per_node(value) && of_sweep && !live.contains(value)
            })
            .collect()
    }

    /// The label selector of the objects `sweep` looks at.
    pub fn selector(sweep: &Sweep) -> String {
        match sweep {
            Sweep::Node(node) => format!("{MANAGED_BY_LABEL}={}", managed_by(Some(node))),
            Sweep::Unlisted => MANAGED_BY_LABEL.to_string(),
        }
    }
}

/// What a sweep came to.
enum Swept {
    /// It deleted this many; `later`: some objects of unlisted nodes were
    /// too young, to be looked at again after [`MIN_AGE`].
    Done { deleted: u64, later: bool },
    /// It could not list: to be tried again.
    Failed,
}

/// How long a failed sweep waits before it is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// The sweeps to run, and when.
#[derive(Default)]
struct Pending {
    sweeps: Vec<Sweep>,
    due: Option<Instant>,
}

impl Pending {
    fn add(&mut self, sweep: Sweep, at: Instant) {
        if !self.sweeps.contains(&sweep) {
            self.sweeps.push(sweep);
        }
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }
}

/// Watches the nodes and, while leading and the nodes are listed
/// completely, deletes the per-node objects in `namespace` of nodes that
/// are gone; `swept` counts the objects deleted.
pub async fn run(
    client: kube::Client,
    namespace: String,
    leadership: Leadership,
    swept: prometheus_client::metrics::counter::Counter,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut nodes = relisting(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watcher::Config::default(),
    );
    let objects = Api::<PartialObjectMeta<CSIStorageCapacity>>::namespaced(client, &namespace);
    let mut live = LiveNodes::default();
    let mut pending = Pending::default();
    tokio::pin!(shutdown);
    loop {
        let leading = leadership.may_write();
        // No decision on a list in progress, nor while another instance leads.
        let wake = pending.due.filter(|_| leading && live.is_current());
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            event = nodes.next() => match event {
                Some(Ok(event)) => {
                    let event = volplane_runtime::index::convert(event, |node| node.metadata.name.unwrap_or_default());
                    if let Some(sweep) = live.apply(event) {
                        pending.add(sweep, Instant::now() + GATHER);
                    }
                }
                Some(Err(error)) => warn!(%error, "node watch failed; listing the nodes again"),
                None => return,
            },
            () = leadership.changed_from(leading) => {}
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    () = sweep_pending(&objects, &live, &leadership, &swept, &mut pending) => {}
                }
            }
        }
    }
}

/// Runs the sweeps due; those cut off by the end of leadership, failed, or
/// with objects too young stay pending.
async fn sweep_pending(
    objects: &Api<PartialObjectMeta<CSIStorageCapacity>>,
    live: &LiveNodes,
    leadership: &Leadership,
    swept: &prometheus_client::metrics::counter::Counter,
    pending: &mut Pending,
) {
    pending.due = None;
    for sweep in std::mem::take(&mut pending.sweeps) {
        let now = Instant::now();
        match leadership.guard(sweep_once(objects, live, &sweep)).await {
            Ok(Swept::Done { deleted, later }) => {
                swept.inc_by(deleted);
                if later {
                    pending.add(Sweep::Unlisted, now + MIN_AGE);
                }
            }
            Ok(Swept::Failed) => pending.add(sweep, now + RETRY),
            // Leadership ended: the next leader, or this one again, sweeps.
            Err(_) => pending.add(sweep, now + GATHER),
        }
    }
}

/// Lists the objects `sweep` looks at and deletes the stale ones.
async fn sweep_once(objects: &Api<PartialObjectMeta<CSIStorageCapacity>>, live: &LiveNodes, sweep: &Sweep) -> Swept {
    let found = match list(objects, &LiveNodes::selector(sweep)).await {
        Ok(found) => found,
        Err(error) => {
            warn!(?sweep, %error, "cannot list CSIStorageCapacity objects to sweep those of gone nodes; retrying");
            return Swept::Failed;
        }
    };
    let now = Timestamp::now();
    let mut deleted = 0;
    for object in live.stale(sweep, &found, now) {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: object.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match objects.delete(&object.name, &params).await {
            Ok(_) => deleted += 1,
            // Gone already, or replaced by a new object of that name.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => warn!(name = %object.name, %error, "cannot delete the capacity of a gone node"),
        }
    }
    if deleted > 0 {
        info!(
            ?sweep,
            deleted,
            nodes = live.len(),
            "deleted the capacity of nodes that are gone"
        );
    }
    Swept::Done {
        deleted,
        later: live.deferred(&found, now),
    }
}

/// Every object matching `selector`, page by page.
async fn list(objects: &Api<PartialObjectMeta<CSIStorageCapacity>>, selector: &str) -> Result<Vec<Found>, kube::Error> {
    let mut found = Vec::new();
    let mut params = ListParams::default().labels(selector).limit(500);
    loop {
        let page = objects.list(&params).await?;
        found.extend(page.items.iter().map(Found::of));
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(found),
        }
    }
}

#[cfg(test)]
#[path = "sweep_tests.rs"]
mod tests;
