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

use crate::model::{MANAGED_BY_LABEL, managed_by};

/// Objects younger than this survive a sweep after a list of the nodes.
pub const MIN_AGE: Duration = Duration::from_secs(60);

/// How long node deletions are gathered before their objects are swept.
const GATHER: Duration = Duration::from_secs(2);

/// The prefix of every per-node instance's `managed-by` value.
const PER_NODE_PREFIX: &str = "volplane-";

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
        let live: HashSet<String> = self.nodes.iter().map(|node| managed_by(Some(node))).collect();
        let wanted = match sweep {
            Sweep::Node(node) => Some(managed_by(Some(node))),
            Sweep::Unlisted => None,
        };
        let min_age = i64::try_from(MIN_AGE.as_secs()).unwrap_or(i64::MAX);
        let old_enough = |created: Option<Timestamp>| {
            created.is_some_and(|created| now.as_second() - created.as_second() >= min_age)
        };
        (found.iter())
            .filter(|object| {
                let Some(value) = object.managed_by.as_deref() else {
                    return false;
                };
                let of_sweep = match &wanted {
                    Some(wanted) => value == wanted,
                    None => old_enough(object.created),
                };
                value.starts_with(PER_NODE_PREFIX) && of_sweep && !live.contains(value)
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

/// Watches the nodes and, while leading, deletes the per-node objects in
/// `namespace` of nodes that are gone; `swept` counts the objects deleted.
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
    let mut pending: Vec<Sweep> = Vec::new();
    let mut due: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let leading = leadership.may_write();
        let wake = due.filter(|_| leading);
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            event = nodes.next() => match event {
                Some(Ok(event)) => {
                    let event = volplane_runtime::index::convert(event, |node| node.metadata.name.unwrap_or_default());
                    if let Some(sweep) = live.apply(event) {
                        if !pending.contains(&sweep) {
                            pending.push(sweep);
                        }
                        due.get_or_insert_with(|| Instant::now() + GATHER);
                    }
                }
                Some(Err(error)) => warn!(%error, "node watch failed; listing the nodes again"),
                None => return,
            },
            () = leadership.changed_from(leading) => {}
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                due = None;
                for sweep in std::mem::take(&mut pending) {
                    match leadership.guard(sweep_once(&objects, &live, &sweep)).await {
                        Ok(deleted) => {
                            swept.inc_by(deleted);
                        }
                        // Leadership ended: the next leader, or this one again, sweeps.
                        Err(_) => pending.push(sweep),
                    }
                }
                if !pending.is_empty() {
                    due = Some(Instant::now() + GATHER);
                }
            }
        }
    }
}

/// Lists the objects `sweep` looks at and deletes the stale ones; returns
/// how many went. Failures are reported and left to the next sweep.
async fn sweep_once(objects: &Api<PartialObjectMeta<CSIStorageCapacity>>, live: &LiveNodes, sweep: &Sweep) -> u64 {
    let found = match list(objects, &LiveNodes::selector(sweep)).await {
        Ok(found) => found,
        Err(error) => {
            warn!(?sweep, %error, "cannot list CSIStorageCapacity objects to sweep those of gone nodes");
            return 0;
        }
    };
    let mut deleted = 0;
    for object in live.stale(sweep, &found, Timestamp::now()) {
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
    deleted
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
