//! The plainest index: one small value per object of a collection, by
//! name, that says what each event replaced.
//!
//! A controller turns each watched object into the value it keeps (an
//! [`Entry`]: a hundred bytes instead of the object) and feeds the entries
//! through a [`Feed`](crate::Feed); after each event it takes the
//! [`Change`]s and compares what was with what is. A list's objects and
//! what it found vanished come out as changes too, so "created while the
//! watch was away" and "deleted while it was away" need no code of their own.

use std::collections::HashMap;
use std::collections::hash_map;

use crate::index::{Index, Keyed, ObjectKey};

/// What a controller keeps of one object, with the object's key; `None`
/// when it keeps nothing of it (another driver's volume, say): an entry
/// held under the key goes.
#[derive(Clone, Debug)]
pub struct Entry<V> {
    /// The object's key.
    pub key: ObjectKey,
    /// What is kept of it.
    pub value: Option<V>,
}

impl<V> Entry<V> {
    /// The entry for `object`, keeping `value`. An object without a name
    /// (never from a real API server) makes an entry the feed passes over.
    pub fn of<K: Keyed>(object: &K, value: Option<V>) -> Self {
        Self {
            key: object.key().unwrap_or_else(|| ObjectKey::cluster("")),
            value,
        }
    }
}

impl<V> Keyed for Entry<V> {
    fn key(&self) -> Option<ObjectKey> {
        (!self.key.name.is_empty()).then(|| self.key.clone())
    }
}

/// What one entry's event did: the value held before it (`None`: there
/// was none); what is held now is [`Entries::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change<V> {
    /// The object's name.
    pub name: String,
    /// What was held before.
    pub before: Option<V>,
}

/// Values by object name, of one namespace (or of a cluster-scoped
/// collection), with the changes the last events made.
#[derive(Clone, Debug)]
pub struct Entries<V> {
    namespace: String,
    values: HashMap<String, V>,
    changes: Vec<Change<V>>,
}

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self::in_namespace("")
    }
}

impl<V> Entries<V> {
    /// Entries of objects in `namespace` (empty: cluster-scoped objects).
    pub fn in_namespace(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            values: HashMap::new(),
            changes: Vec::new(),
        }
    }

    /// The value held for `name`.
    pub fn get(&self, name: &str) -> Option<&V> {
        self.values.get(name)
    }

    /// Whether a value is held for `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// Every name with its value.
    pub fn iter(&self) -> hash_map::Iter<'_, String, V> {
        self.values.iter()
    }

    /// How many values are held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Takes the value for `name` out, outside any event (no change is
    /// recorded): the controller knows better than the watch, for now.
    pub fn take(&mut self, name: &str) -> Option<V> {
        self.values.remove(name)
    }

    /// The changes the events fed since the last call made, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change<V>> {
        std::mem::take(&mut self.changes)
    }
}

impl<'a, V> IntoIterator for &'a Entries<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = hash_map::Iter<'a, String, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.values.iter()
    }
}

impl<V> Index<Entry<V>> for Entries<V> {
    fn apply(&mut self, Entry { key, value }: Entry<V>) {
        let before = match value {
            Some(value) => self.values.insert(key.name.clone(), value),
            None => match self.values.remove(&key.name) {
                Some(before) => Some(before),
                // Nothing held, nothing kept: no change.
                None => return,
            },
        };
        self.changes.push(Change { name: key.name, before });
    }

    fn delete(&mut self, key: &ObjectKey) {
        if let Some(before) = self.values.remove(&key.name) {
            self.changes.push(Change {
                name: key.name.clone(),
                before: Some(before),
            });
        }
    }

    fn keys(&self) -> Vec<ObjectKey> {
        (self.values.keys())
            .map(|name| ObjectKey::namespaced(self.namespace.clone(), name.clone()))
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests;
