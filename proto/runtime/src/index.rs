//! Indexes fed by watches. A controller keeps what it decides on in
//! indexes with [`Index::apply`], [`Index::delete`] and [`Index::reset`];
//! one [`Feed`] per watch turns the watcher's events into those calls, so
//! no controller handles `Init` / `InitDone` itself.
//!
//! A list is a complete truth. kube's watcher lists at its start and again
//! after a 410 Gone (an API server restarted on a fresh watch cache, a
//! compacted revision) or a failed list; whatever the index held that the
//! list did not bring vanished meanwhile, and the feed deletes it. While a
//! list runs the index mixes old and new objects, so the feed says it is
//! not [current](Feed::is_current) and the controller holds back every
//! decision that depends on it.
//!
//! The shape is kubert's `index` (linkerd's controllers) with one change:
//! a list's objects are applied as they arrive instead of being collected
//! for one `reset(objects, removed)` call, so a 50,000-pod re-list is never
//! held twice; `reset` receives only what vanished.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::Resource;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use tracing::{debug, info};

/// What names an object in its collection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The namespace; empty for a cluster-scoped object.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// The key of an object in `namespace`.
    pub fn namespaced(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a cluster-scoped object.
    pub fn cluster(name: impl Into<String>) -> Self {
        Self::namespaced(String::new(), name)
    }

    /// The key of `object`; `None` when it has no name (never from a real
    /// API server, but outside input is not trusted).
    pub fn of<K: Resource>(object: &K) -> Option<Self> {
        let meta = object.meta();
        let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
        Some(Self::namespaced(meta.namespace.clone().unwrap_or_default(), name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// What a feed can name: a Kubernetes object, or what a controller made of
/// one before feeding it (an [`Entry`](crate::entries::Entry), a node cut
/// to a few labels).
pub trait Keyed {
    /// The key; `None` when the object has no name.
    fn key(&self) -> Option<ObjectKey>;
}

impl<K: Resource> Keyed for K {
    fn key(&self) -> Option<ObjectKey> {
        ObjectKey::of(self)
    }
}

/// The same event about what `convert` makes of its object (a list's
/// start and end pass through).
pub fn convert<K, T>(event: Event<K>, convert: impl FnOnce(K) -> T) -> Event<T> {
    match event {
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(convert(object)),
        Event::InitDone => Event::InitDone,
        Event::Apply(object) => Event::Apply(convert(object)),
        Event::Delete(object) => Event::Delete(convert(object)),
    }
}

/// A controller's view of one watched collection.
pub trait Index<K> {
    /// `object` was listed, created or changed.
    fn apply(&mut self, object: K);
    /// The object under `key` is gone (it may be one the index never held).
    fn delete(&mut self, key: &ObjectKey);
    /// Every key the index holds something for: what a list may find
    /// vanished. An object the index ignored (not this driver's, say)
    /// need not be here.
    fn keys(&self) -> Vec<ObjectKey>;
    /// Whether the index holds nothing (then a list cannot find anything
    /// vanished, and the feed keeps no record of what it brought).
    fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }
    /// A list ended: each object it brought was applied as it came, and
    /// `removed` are the keys the index held that it did not bring.
    fn reset(&mut self, removed: Vec<ObjectKey>) {
        for key in &removed {
            self.delete(key);
        }
    }
}

/// What one watch event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fed {
    /// An object was created or changed (outside a list).
    Applied(ObjectKey),
    /// An object was deleted (outside a list).
    Deleted(ObjectKey),
    /// A list began or brought an object: decisions on the index wait.
    Listing,
    /// A list ended; the index is the complete truth again.
    Listed {
        /// Whether this was the watch's first list.
        first: bool,
        /// How many held keys the list did not bring (deleted).
        removed: usize,
    },
    /// An event for an object without a name: nothing was done.
    Unnamed,
}

/// Feeds one watch's events into an index and knows whether it is current.
///
/// What a list brought is kept as hashes of the keys (8 bytes each, with a
/// per-process random hasher), and not at all when the index was empty at
/// the list's start: a 50,000-pod list adds a few hundred kilobytes, not
/// a copy of every name.
#[derive(Debug)]
pub struct Feed {
    watch: &'static str,
    /// The list under way; `None` between lists.
    listing: Option<Listing>,
    lists: u64,
    hasher: RandomState,
}

/// A list under way: hashes of the keys it brought so far, or `None` when
/// the index was empty at its start (nothing can have vanished).
#[derive(Debug)]
struct Listing {
    seen: Option<HashSet<u64>>,
}

impl Feed {
    /// A feed for the watch named `watch` (in logs). Until its first list
    /// ends it is not current.
    pub fn new(watch: &'static str) -> Self {
        Self {
            watch,
            listing: Some(Listing { seen: None }),
            lists: 0,
            hasher: RandomState::new(),
        }
    }

    /// Whether the index is a complete view: a list has ended and no
    /// other is under way.
    pub fn is_current(&self) -> bool {
        self.lists > 0 && self.listing.is_none()
    }

    /// Whether a list is under way after an earlier one ended (the
    /// watch came back from an error, or started over).
    pub fn is_relisting(&self) -> bool {
        self.lists > 0 && self.listing.is_some()
    }

    /// Applies one watch event to `index`.
    pub fn feed<K: Keyed, I: Index<K> + ?Sized>(&mut self, event: Event<K>, index: &mut I) -> Fed {
        match event {
            Event::Init => {
                if self.lists > 0 {
                    info!(watch = self.watch, "re-listing; decisions that depend on it wait");
                }
                // A list that restarts before its end starts over: only the
                // last complete one tells what vanished.
                let seen = (!index.is_empty()).then(HashSet::new);
                self.listing = Some(Listing { seen });
                Fed::Listing
            }
            Event::InitApply(object) => self.listed_one(object, index),
            Event::InitDone => self.list_ended(index),
            Event::Apply(object) => {
                let Some(key) = object.key() else {
                    return Fed::Unnamed;
                };
                if let Some(Listing { seen: Some(seen) }) = &mut self.listing {
                    // Not sent by kube's watcher during a list; kept correct anyway.
                    seen.insert(self.hasher.hash_one(&key));
                }
                index.apply(object);
                Fed::Applied(key)
            }
            Event::Delete(object) => {
                let Some(key) = object.key() else {
                    return Fed::Unnamed;
                };
                if let Some(Listing { seen: Some(seen) }) = &mut self.listing {
                    seen.remove(&self.hasher.hash_one(&key));
                }
                index.delete(&key);
                Fed::Deleted(key)
            }
        }
    }

    fn listed_one<K: Keyed, I: Index<K> + ?Sized>(&mut self, object: K, index: &mut I) -> Fed {
        let Some(key) = object.key() else {
            return Fed::Unnamed;
        };
        if let Some(Listing { seen: Some(seen) }) = &mut self.listing {
            seen.insert(self.hasher.hash_one(&key));
        }
        index.apply(object);
        Fed::Listing
    }

    fn list_ended<K, I: Index<K> + ?Sized>(&mut self, index: &mut I) -> Fed {
        let seen = self.listing.take().and_then(|listing| listing.seen);
        let removed: Vec<ObjectKey> = match &seen {
            Some(seen) => (index.keys().into_iter())
                .filter(|key| !seen.contains(&self.hasher.hash_one(key)))
                .collect(),
            // Empty when the list began: nothing vanished.
            None => Vec::new(),
        };
        let first = self.lists == 0;
        self.lists += 1;
        let count = removed.len();
        if first {
            debug!(watch = self.watch, "listed");
        } else {
            info!(watch = self.watch, removed = count, "re-listed");
        }
        index.reset(removed);
        Fed::Listed { first, removed: count }
    }
}

/// Watches every `K` in the cluster (with `config`'s selectors), listing
/// again after any error ([`relisting`](crate::relist::relisting)); each
/// event or error becomes a signal of the controller's loop.
pub fn watch_all<K, S>(
    client: &kube::Client,
    config: watcher::Config,
    signal: impl Fn(Result<Event<K>, watcher::Error>) -> S + Send + 'static,
) -> BoxStream<'static, S>
where
    K: Resource<DynamicType = ()> + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    S: Send + 'static,
{
    crate::relist::relisting(Api::<K>::all(client.clone()), config)
        .map(signal)
        .boxed()
}

#[cfg(test)]
mod tests;
