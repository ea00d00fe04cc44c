//! The double's in-memory object store: synchronous, no I/O.
//!
//! Objects are JSON values keyed by (kind, namespace, name). Every change
//! bumps one global resourceVersion and is kept in a bounded history that
//! watches replay from; asking for a revision older than the history is
//! answered like the real API server answers a compacted revision (410).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::resources::{KINDS, NAMESPACES, ResourceKind};
use super::selector::{FieldSelector, LabelSelector};

/// Identifies an object: index into [`KINDS`], namespace ("" if cluster-scoped), name.
pub type Key = (usize, String, String);

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct Change {
    /// The resourceVersion the change produced.
    pub revision: u64,
    /// Index into [`KINDS`].
    pub kind: usize,
    /// Namespace ("" if cluster-scoped).
    pub namespace: String,
    /// Added, modified or deleted.
    pub change: ChangeType,
    /// The object after the change (for deletes: its last state).
    pub object: Value,
    /// The object before a modification, so selector watches can tell
    /// "stopped matching" from "changed".
    pub previous: Option<Value>,
}

/// An API error in the shape of a `metav1.Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `reason`, e.g. `AlreadyExists`.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource_label(kind)),
        )
    }

    fn invalid(kind: &ResourceKind, name: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(422, "Invalid", format!("{} \"{name}\" is invalid: {detail}", kind.kind))
    }

    fn conflict(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                resource_label(kind)
            ),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
}

fn resource_label(kind: &ResourceKind) -> String {
    if kind.group.is_empty() {
        kind.plural.to_string()
    } else {
        format!("{}.{}", kind.plural, kind.group)
    }
}

/// A patch body by content type.
#[derive(Clone, Debug)]
pub enum Patch {
    /// `application/merge-patch+json`, and strategic merge patch (approximated: lists are replaced).
    Merge(Value),
    /// `application/json-patch+json`.
    Json(Value),
    /// `application/apply-patch+yaml`, approximated as a merge patch that
    /// creates when missing. Without `force` it is refused with 409 Conflict
    /// when it would change a field another field manager set last.
    Apply {
        /// The applied configuration.
        body: Value,
        /// `?force=true`: take fields over from other managers.
        force: bool,
    },
}

/// A watch asked for history that is gone; it must re-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The oldest revision a watch may still start from.
    pub oldest: u64,
}

/// What a delete may require.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `propagationPolicy: Orphan`: dependents are left alone.
    pub orphan: bool,
}

/// The store. One per double.
#[derive(Debug)]
pub struct Store {
    objects: BTreeMap<Key, Value>,
    uids: HashMap<String, Key>,
    revision: u64,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    compacted: u64,
    counter: u64,
    seed: RandomState,
    /// Garbage collection of dependents whose owners are all gone.
    pub garbage_collection: bool,
    pending: Vec<Arc<Change>>,
    /// Field path (JSON pointer) → the field manager that set it last, per
    /// object; only patches with a `fieldManager` record it.
    owners: HashMap<Key, BTreeMap<String, String>>,
}

/// The leaf fields of a patch body outside `apiVersion`, `kind` and
/// `metadata`, as JSON pointers with their values.
fn field_leaves(body: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(prefix: String, value: &'a Value, out: &mut Vec<(String, &'a Value)>) {
        match value.as_object() {
            Some(map) if !map.is_empty() => {
                for (field, inner) in map {
                    walk(
                        format!("{prefix}/{}", field.replace('~', "~0").replace('/', "~1")),
                        inner,
                        out,
                    );
                }
            }
            _ => out.push((prefix, value)),
        }
    }
    let mut out = Vec::new();
    if let Some(map) = body.as_object() {
        for (field, value) in map {
            if !matches!(field.as_str(), "apiVersion" | "kind" | "metadata") {
                walk(format!("/{field}"), value, &mut out);
            }
        }
    }
    out
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn meta(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object).and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    match object.get_mut("metadata").and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable!("metadata was just made an object"),
    }
}

/// The object's labels as a map (non-string values are ignored).
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    meta(object)
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn owner_uids(object: &Value) -> Vec<String> {
    meta(object)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has_finalizers(object: &Value) -> bool {
    meta(object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// DNS-1123 subdomain: what most object names must be.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A label value: at most 63 characters, alphanumeric at both ends, `-_.` inside.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && value.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric))
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

fn validate_labels(kind: &ResourceKind, name: &str, object: &Value) -> Result<(), ApiError> {
    let Some(labels) = meta(object).and_then(|m| m.get("labels")) else {
        return Ok(());
    };
    let Some(labels) = labels.as_object() else {
        return Err(ApiError::bad_request("metadata.labels must be an object"));
    };
    for (key, value) in labels {
        if !is_label_key(key) {
            return Err(ApiError::invalid(
                kind,
                name,
                format!("metadata.labels: Invalid value: {key:?}: invalid label key"),
            ));
        }
        match value.as_str() {
            Some(v) if is_label_value(v) => {}
            _ => {
                return Err(ApiError::invalid(
                    kind,
                    name,
                    format!(
                        "metadata.labels: Invalid value: {value}: a valid label must be 63 characters or less, begin and end with an alphanumeric character"
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store holding the namespaces every cluster has.
    pub fn new() -> Self {
        let mut store = Self {
            objects: BTreeMap::new(),
            uids: HashMap::new(),
            revision: 0,
            history: VecDeque::new(),
            history_limit: 100_000,
            compacted: 0,
            counter: 0,
            seed: RandomState::new(),
            garbage_collection: false,
            pending: Vec::new(),
            owners: HashMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let created = store.create(NAMESPACES, "", json!({"metadata": {"name": ns}}));
            debug_assert!(created.is_ok());
        }
        store.pending.clear();
        store
    }

    /// The current resourceVersion.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Changes made since the last call, oldest first (for broadcasting).
    pub fn take_pending(&mut self) -> Vec<Arc<Change>> {
        std::mem::take(&mut self.pending)
    }

    /// Forgets the history: watches from any earlier revision get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.revision;
    }

    /// Makes every revision handed out so far expire: the next watch from
    /// any of them gets 410, so clients must re-list.
    pub fn expire_history(&mut self) {
        self.revision += 1;
        self.compact();
    }

    /// Changes after `revision`, or [`Expired`] when they were compacted away.
    pub fn changes_since(&self, revision: u64) -> Result<Vec<Arc<Change>>, Expired> {
        if revision < self.compacted {
            return Err(Expired { oldest: self.compacted });
        }
        Ok(self.history.iter().filter(|c| c.revision > revision).cloned().collect())
    }

    fn unique(&mut self) -> u64 {
        self.counter += 1;
        self.seed.hash_one(self.counter)
    }

    fn new_uid(&mut self) -> String {
        let a = self.unique();
        let b = self.unique();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52 & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    fn generated_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.unique();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn record(&mut self, kind: usize, namespace: &str, change: ChangeType, object: Value, previous: Option<Value>) {
        let change = Arc::new(Change {
            revision: self.revision,
            kind,
            namespace: namespace.to_string(),
            change,
            object,
            previous,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision;
            }
        }
        self.pending.push(change);
    }

    fn bump(&mut self, object: &mut Value) {
        self.revision += 1;
        meta_mut(object).insert("resourceVersion".into(), Value::String(self.revision.to_string()));
    }

    fn check_scope(&self, kind: usize, namespace: &str) -> Result<&'static ResourceKind, ApiError> {
        let rk = &KINDS[kind];
        if rk.namespaced && namespace.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{} is namespaced: a namespace is required",
                rk.plural
            )));
        }
        if !rk.namespaced && !namespace.is_empty() {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("{} is not namespaced", rk.plural),
            ));
        }
        Ok(rk)
    }

    /// Creates an object (201 in HTTP terms).
    pub fn create(&mut self, kind: usize, namespace: &str, mut object: Value) -> Result<Value, ApiError> {
        let rk = self.check_scope(kind, namespace)?;
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(ns) = meta_str(&object, "namespace").filter(|ns| !ns.is_empty())
            && ns != namespace
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({ns}) does not match the namespace sent on the request ({namespace})"
            )));
        }
        if rk.namespaced
            && !self
                .objects
                .contains_key(&(NAMESPACES, String::new(), namespace.to_string()))
        {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            ));
        }
        let name = match meta_str(&object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(&object, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let prefix = prefix.to_string();
                    loop {
                        let candidate = format!("{prefix}{}", self.generated_suffix());
                        if !self
                            .objects
                            .contains_key(&(kind, namespace.to_string(), candidate.clone()))
                        {
                            break candidate;
                        }
                    }
                }
                None => {
                    return Err(ApiError::invalid(
                        rk,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if !is_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                rk,
                &name,
                "metadata.name: Invalid value: a lowercase RFC 1123 subdomain is required",
            ));
        }
        validate_labels(rk, &name, &object)?;
        let key = (kind, namespace.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource_label(rk)),
            ));
        }
        let uid = self.new_uid();
        let map = object
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("not an object"))?;
        map.insert("apiVersion".into(), Value::String(rk.api_version()));
        map.insert("kind".into(), Value::String(rk.kind.to_string()));
        let m = meta_mut(&mut object);
        m.insert("name".into(), Value::String(name.clone()));
        if rk.namespaced {
            m.insert("namespace".into(), Value::String(namespace.to_string()));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), Value::String(uid.clone()));
        m.insert("creationTimestamp".into(), Value::String(now()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        m.remove("managedFields");
        self.bump(&mut object);
        self.uids.insert(uid, key.clone());
        self.objects.insert(key, object.clone());
        self.record(kind, namespace, ChangeType::Added, object.clone(), None);
        // The garbage collector also takes what is created with owners that
        // are all gone already (a controller acting on a stale cache), as
        // kube-controller-manager's does once its graph sees the object.
        let owners = owner_uids(&object);
        if self.garbage_collection && !owners.is_empty() && self.all_gone(&owners) {
            let _ = self.delete(kind, namespace, &name, &DeleteOptions::default());
        }
        Ok(object)
    }

    /// Reads one object.
    pub fn get(&self, kind: usize, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&KINDS[kind], name))
    }

    /// Lists objects of a kind, in one namespace or all, filtered by selectors, ordered by (namespace, name).
    pub fn list(
        &self,
        kind: usize,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        let start = (kind, namespace.unwrap_or_default().to_string(), String::new());
        self.objects
            .range(start..)
            .take_while(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|wanted| wanted == ns))
            .map(|(_, object)| object)
            .filter(|object| labels.matches(&labels_of(object)) && fields.matches(object))
            .cloned()
            .collect()
    }

    /// Whether an object with this UID exists.
    pub fn uid_exists(&self, uid: &str) -> bool {
        self.uids.contains_key(uid)
    }

    /// Replaces an object (PUT), or only its status with `status_only`.
    pub fn update(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        mut object: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let rk = self.check_scope(kind, namespace)?;
        let key = (kind, namespace.to_string(), name.to_string());
        let current = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rk, name))?;
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(body_name) = meta_str(&object, "name").filter(|n| !n.is_empty())
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta_str(&object, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(rk, name));
        }
        if let Some(uid) = meta_str(&object, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&current, "uid")
        {
            return Err(ApiError::conflict(rk, name));
        }
        let mut next = if status_only {
            let mut next = current.clone();
            match object.get("status") {
                Some(status) => next["status"] = status.clone(),
                None => {
                    if let Some(map) = next.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            next
        } else {
            validate_labels(rk, name, &object)?;
            if rk.status {
                // With a status subresource, the main resource cannot change status.
                match current.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        if let Some(map) = object.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
            object
        };
        // Fields the client cannot change.
        let generation = meta(&current)
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let spec_changed = !status_only && next.get("spec") != current.get("spec");
        let preserved: Vec<(&str, Option<Value>)> = ["uid", "creationTimestamp", "deletionTimestamp"]
            .into_iter()
            .map(|field| (field, meta(&current).and_then(|m| m.get(field)).cloned()))
            .collect();
        if let Some(map) = next.as_object_mut() {
            map.insert("apiVersion".into(), Value::String(rk.api_version()));
            map.insert("kind".into(), Value::String(rk.kind.to_string()));
        }
        let m = meta_mut(&mut next);
        m.insert("name".into(), Value::String(name.to_string()));
        if rk.namespaced {
            m.insert("namespace".into(), Value::String(namespace.to_string()));
        }
        for (field, value) in preserved {
            match value {
                Some(v) => m.insert(field.into(), v),
                None => m.remove(field),
            };
        }
        m.insert(
            "generation".into(),
            json!(if spec_changed { generation + 1 } else { generation }),
        );
        m.remove("managedFields");
        if next == current {
            // A no-op write does not bump the resourceVersion, as in the real API server.
            return Ok(current);
        }
        self.bump(&mut next);
        if meta(&next).is_some_and(|m| m.contains_key("deletionTimestamp")) && !has_finalizers(&next) {
            self.remove(&key, next.clone(), false);
            return Ok(next);
        }
        self.objects.insert(key, next.clone());
        self.record(kind, namespace, ChangeType::Modified, next.clone(), Some(current));
        Ok(next)
    }

    /// Applies a patch (PATCH), to the whole object or only its status.
    pub fn patch(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        patch: Patch,
        status_only: bool,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let rk = self.check_scope(kind, namespace)?;
        let key = (kind, namespace.to_string(), name.to_string());
        let current = match self.get(kind, namespace, name) {
            Ok(current) => current,
            Err(error) => {
                if let Patch::Apply { body, .. } = patch {
                    // Server-side apply creates what does not exist.
                    let created = self.create(kind, namespace, body.clone())?;
                    self.record_owners(&key, &body, manager);
                    return Ok(created);
                }
                return Err(error);
            }
        };
        if let Patch::Apply { body, force: false } = &patch {
            let owners = self.owners.get(&key);
            for (path, value) in field_leaves(body) {
                let owner = owners.and_then(|o| o.get(&path)).map(String::as_str);
                let current_value = current.pointer(&path).filter(|v| !v.is_null());
                if current_value.is_some_and(|v| v != value) && owner.is_some_and(|o| Some(o) != manager) {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with 1 conflict: conflict with \"{}\": {path}",
                            owner.unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        let mut next = current.clone();
        match &patch {
            Patch::Merge(body) | Patch::Apply { body, .. } => {
                if !body.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                json_patch::merge(&mut next, body);
            }
            Patch::Json(body) => {
                let ops: json_patch::Patch = serde_json::from_value(body.clone())
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut next, &ops).map_err(|e| ApiError::invalid(rk, name, e))?;
            }
        }
        // A resourceVersion in the patch is a precondition, as in the real API server.
        let wanted_rv = match &patch {
            Patch::Merge(body) | Patch::Apply { body, .. } => meta_str(body, "resourceVersion").map(str::to_string),
            Patch::Json(_) => None,
        };
        match wanted_rv {
            Some(rv) if Some(rv.as_str()) != meta_str(&current, "resourceVersion") => {
                return Err(ApiError::conflict(rk, name));
            }
            _ => {
                let rv = meta_str(&current, "resourceVersion").map(str::to_string);
                if let Some(rv) = rv {
                    meta_mut(&mut next).insert("resourceVersion".into(), Value::String(rv));
                }
            }
        }
        let patched = self.update(kind, namespace, name, next, status_only)?;
        if let Patch::Merge(body) | Patch::Apply { body, .. } = &patch {
            self.record_owners(&key, body, manager);
        }
        Ok(patched)
    }

    fn record_owners(&mut self, key: &Key, body: &Value, manager: Option<&str>) {
        let Some(manager) = manager else {
            return;
        };
        let owners = self.owners.entry(key.clone()).or_default();
        for (path, value) in field_leaves(body) {
            if value.is_null() {
                owners.remove(&path);
            } else {
                owners.insert(path, manager.to_string());
            }
        }
    }

    /// Deletes an object: removes it, or with finalizers marks it with a
    /// deletionTimestamp. Returns the object and whether it is still there.
    pub fn delete(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let rk = self.check_scope(kind, namespace)?;
        let key = (kind, namespace.to_string(), name.to_string());
        let current = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rk, name))?;
        if options
            .uid
            .as_deref()
            .is_some_and(|uid| Some(uid) != meta_str(&current, "uid"))
        {
            return Err(ApiError::conflict(rk, name));
        }
        if options
            .resource_version
            .as_deref()
            .is_some_and(|rv| Some(rv) != meta_str(&current, "resourceVersion"))
        {
            return Err(ApiError::conflict(rk, name));
        }
        if has_finalizers(&current) {
            if meta(&current).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                return Ok((current, true));
            }
            let mut next = current.clone();
            meta_mut(&mut next).insert("deletionTimestamp".into(), Value::String(now()));
            self.bump(&mut next);
            self.objects.insert(key, next.clone());
            self.record(kind, namespace, ChangeType::Modified, next.clone(), Some(current));
            return Ok((next, true));
        }
        let mut last = current;
        self.bump(&mut last);
        self.remove(&key, last.clone(), options.orphan);
        Ok((last, false))
    }

    fn remove(&mut self, key: &Key, last: Value, orphan: bool) {
        self.objects.remove(key);
        self.owners.remove(key);
        let uid = meta_str(&last, "uid").unwrap_or_default().to_string();
        self.uids.remove(&uid);
        self.record(key.0, &key.1, ChangeType::Deleted, last, None);
        if key.0 == NAMESPACES {
            // Namespace deletion takes its contents with it.
            let contents: Vec<Key> = self
                .objects
                .keys()
                .filter(|(k, ns, _)| KINDS[*k].namespaced && *ns == key.2)
                .cloned()
                .collect();
            for content in contents {
                let _ = self.delete(content.0, &content.1, &content.2, &DeleteOptions::default());
            }
        }
        if self.garbage_collection && !orphan {
            self.collect_dependents_of(&uid);
        }
    }

    /// Whether no object with any of these uids exists.
    fn all_gone(&self, uids: &[String]) -> bool {
        uids.iter().all(|uid| !self.uids.contains_key(uid))
    }

    /// Deletes objects owned by `uid` whose every owner is now gone.
    fn collect_dependents_of(&mut self, uid: &str) {
        let orphans: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, object)| {
                let owners = owner_uids(object);
                owners.iter().any(|o| o == uid) && self.all_gone(&owners)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in orphans {
            let _ = self.delete(key.0, &key.1, &key.2, &DeleteOptions::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::resources::find;
    use super::*;

    fn pods() -> usize {
        find("", "v1", "pods").expect("pods")
    }

    fn pvcs() -> usize {
        find("", "v1", "persistentvolumeclaims").expect("pvcs")
    }

    #[test]
    fn create_fills_metadata_and_rejects_duplicates() {
        let mut store = Store::new();
        let pod = store
            .create(pods(), "default", json!({"metadata": {"name": "p"}, "spec": {}}))
            .expect("created");
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["apiVersion"], "v1");
        assert_eq!(pod["metadata"]["namespace"], "default");
        assert!(pod["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        assert_eq!(pod["metadata"]["resourceVersion"], store.revision().to_string());
        let err = store
            .create(pods(), "default", json!({"metadata": {"name": "p"}}))
            .expect_err("duplicate");
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
    }

    #[test]
    fn generate_name_makes_distinct_names() {
        let mut store = Store::new();
        let names: std::collections::BTreeSet<String> = (0..50)
            .map(|_| {
                let o = store
                    .create(pods(), "default", json!({"metadata": {"generateName": "csisc-"}}))
                    .expect("created");
                o["metadata"]["name"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(names.len(), 50);
        assert!(names.iter().all(|n| n.starts_with("csisc-") && n.len() == 11));
    }

    #[test]
    fn invalid_names_labels_and_missing_namespaces_are_rejected() {
        let mut store = Store::new();
        let err = store
            .create(pods(), "default", json!({"metadata": {"name": "Bad_Name"}}))
            .expect_err("bad name");
        assert_eq!(err.code, 422);
        let long = "x".repeat(64);
        let err = store
            .create(
                pods(),
                "default",
                json!({"metadata": {"name": "p", "labels": {"k": long}}}),
            )
            .expect_err("long label");
        assert_eq!(err.code, 422);
        let err = store
            .create(pods(), "nowhere", json!({"metadata": {"name": "p"}}))
            .expect_err("no ns");
        assert_eq!(err.code, 404);
    }

    #[test]
    fn stale_replace_is_a_conflict_and_status_is_guarded() {
        let mut store = Store::new();
        let created = store
            .create(
                pods(),
                "default",
                json!({"metadata": {"name": "p"}, "spec": {"a": 1}, "status": {"phase": "Pending"}}),
            )
            .expect("created");
        let mut first = created.clone();
        first["spec"]["a"] = json!(2);
        first["status"]["phase"] = json!("Running");
        let updated = store.update(pods(), "default", "p", first, false).expect("update");
        // The main resource cannot change status.
        assert_eq!(updated["status"]["phase"], "Pending");
        assert_eq!(updated["metadata"]["generation"], 2);
        let mut stale = created;
        stale["spec"]["a"] = json!(3);
        let err = store.update(pods(), "default", "p", stale, false).expect_err("stale");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let status = store
            .patch(
                pods(),
                "default",
                "p",
                Patch::Merge(json!({"status": {"phase": "Running"}})),
                true,
                None,
            )
            .expect("status patch");
        assert_eq!(status["status"]["phase"], "Running");
    }

    #[test]
    fn apply_without_force_conflicts_with_fields_of_another_manager() {
        let mut store = Store::new();
        let leases = KINDS.iter().position(|k| k.plural == "leases").expect("leases");
        store
            .create(leases, "default", json!({"metadata": {"name": "l"}, "spec": {}}))
            .expect("created");
        let apply = |holder: &str| Patch::Apply {
            body: json!({"spec": {"holderIdentity": holder, "leaseDurationSeconds": 3}}),
            force: false,
        };
        store
            .patch(leases, "default", "l", apply("a"), false, Some("manager-a"))
            .expect("a takes the free lease");
        let err = store
            .patch(leases, "default", "l", apply("b"), false, Some("manager-b"))
            .expect_err("b conflicts");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        // Re-applying the same value is no conflict.
        store
            .patch(leases, "default", "l", apply("a"), false, Some("manager-b"))
            .expect("same value");
        // Clearing the field (a merge patch by its manager) frees it.
        store
            .patch(
                leases,
                "default",
                "l",
                Patch::Merge(json!({"spec": {"holderIdentity": null}})),
                false,
                Some("manager-a"),
            )
            .expect("release");
        let taken = store
            .patch(leases, "default", "l", apply("b"), false, Some("manager-b"))
            .expect("b takes the released lease");
        assert_eq!(taken["spec"]["holderIdentity"], "b");
    }

    #[test]
    fn finalizers_delay_deletion_until_removed() {
        let mut store = Store::new();
        store
            .create(
                pvcs(),
                "default",
                json!({"metadata": {"name": "c", "finalizers": ["kubernetes.io/pvc-protection"]}}),
            )
            .expect("created");
        let (object, still_there) = store
            .delete(pvcs(), "default", "c", &DeleteOptions::default())
            .expect("delete");
        assert!(still_there);
        assert!(object["metadata"]["deletionTimestamp"].is_string());
        store
            .patch(
                pvcs(),
                "default",
                "c",
                Patch::Merge(json!({"metadata": {"finalizers": null}})),
                false,
                None,
            )
            .expect("patch");
        assert_eq!(store.get(pvcs(), "default", "c").expect_err("gone").code, 404);
    }

    #[test]
    fn garbage_collection_removes_dependents_of_deleted_owners() {
        let mut store = Store::new();
        store.garbage_collection = true;
        let pod = store
            .create(pods(), "default", json!({"metadata": {"name": "p"}}))
            .expect("pod");
        let uid = pod["metadata"]["uid"].clone();
        store
            .create(
                pvcs(),
                "default",
                json!({"metadata": {"name": "p-data", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": uid, "controller": true}]}}),
            )
            .expect("pvc");
        store
            .create(pvcs(), "default", json!({"metadata": {"name": "other"}}))
            .expect("pvc");
        store
            .delete(pods(), "default", "p", &DeleteOptions::default())
            .expect("delete");
        assert_eq!(store.get(pvcs(), "default", "p-data").expect_err("collected").code, 404);
        assert!(store.get(pvcs(), "default", "other").is_ok());
    }

    #[test]
    fn garbage_collection_takes_what_is_created_for_an_owner_already_gone() {
        let mut store = Store::new();
        store.garbage_collection = true;
        let pod = store
            .create(pods(), "default", json!({"metadata": {"name": "p"}}))
            .expect("pod");
        let uid = pod["metadata"]["uid"].clone();
        store
            .delete(pods(), "default", "p", &DeleteOptions::default())
            .expect("delete");
        let start = store.revision();
        let late = json!({"metadata": {"name": "p-data", "ownerReferences": [
            {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": uid, "controller": true}]}});
        store
            .create(pvcs(), "default", late)
            .expect("created, as the API server would");
        assert_eq!(store.get(pvcs(), "default", "p-data").expect_err("collected").code, 404);
        let changes: Vec<ChangeType> = store
            .changes_since(start)
            .expect("history")
            .iter()
            .map(|c| c.change)
            .collect();
        assert_eq!(changes, [ChangeType::Added, ChangeType::Deleted], "watchers see both");
        store.garbage_collection = false;
        let kept = json!({"metadata": {"name": "kept", "ownerReferences": [
            {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": uid}]}});
        store.create(pvcs(), "default", kept).expect("pvc");
        assert!(
            store.get(pvcs(), "default", "kept").is_ok(),
            "no collector, no collection"
        );
    }

    #[test]
    fn history_replays_changes_and_compaction_expires_old_revisions() {
        let mut store = Store::new();
        let start = store.revision();
        store
            .create(pods(), "default", json!({"metadata": {"name": "a"}}))
            .expect("a");
        store
            .create(pods(), "default", json!({"metadata": {"name": "b"}}))
            .expect("b");
        let changes = store.changes_since(start).expect("in history");
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.change == ChangeType::Added));
        store.compact();
        assert!(store.changes_since(start).is_err());
        assert!(store.changes_since(store.revision()).expect("current").is_empty());
    }

    #[test]
    fn a_no_op_update_keeps_the_resource_version() {
        let mut store = Store::new();
        let created = store
            .create(pods(), "default", json!({"metadata": {"name": "a"}}))
            .expect("a");
        let again = store
            .update(pods(), "default", "a", created.clone(), false)
            .expect("update");
        assert_eq!(
            again["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
    }

    #[test]
    fn label_keys_and_values() {
        assert!(is_label_value("volplane-abc.def_1"));
        assert!(!is_label_value("-x"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_label_key("csi.storage.k8s.io/managed-by"));
        assert!(!is_label_key("Bad Prefix/x"));
    }
}
