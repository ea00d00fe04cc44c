//! The capacity controller's pure model: which (segment, class) pairs need
//! a CSIStorageCapacity object, what each object must look like, and how
//! the objects that exist map onto that. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::storage::v1::{CSIDriver, CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference, Time};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::quantity::{format_bytes, parse_bytes};
use volplane_runtime::text;

mod reservation;
mod volume;
pub use reservation::{DRIVER_CAPACITY_ANNOTATION, Publication, RESERVED_ANNOTATION, Reservation};
pub use volume::{VolumeDriver, VolumeObject, VolumeSpec, admits, exact_segments, is_volume_of, volume_placement};

/// Label naming the CSI driver of a CSIStorageCapacity object.
pub const DRIVER_LABEL: &str = "csi.storage.k8s.io/drivername";
/// Label naming the instance that manages a CSIStorageCapacity object.
pub const MANAGED_BY_LABEL: &str = "csi.storage.k8s.io/managed-by";
/// StorageClass parameters with this prefix are for the CO, never sent to the driver.
pub const RESERVED_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
/// The node label that identifies one node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// `generateName` of the objects volplane creates.
pub const GENERATE_NAME: &str = "csisc-";

/// String key/value pairs: node labels, topology segments, parameters.
pub type Labels = BTreeMap<String, String>;

/// A topology segment: the node labels a capacity applies to. Empty means
/// every node. Cheap to clone: work items, queues and indexes share one
/// copy of the labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment(Arc<Labels>);

impl Segment {
    /// The segment of these labels.
    pub fn new(labels: Labels) -> Self {
        Self(Arc::new(labels))
    }

    /// A segment from pairs.
    pub fn from_pairs<const N: usize>(pairs: [(&str, &str); N]) -> Self {
        Self::new(pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// Its labels.
    pub fn labels(&self) -> &Labels {
        &self.0
    }
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{all nodes}");
        }
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{{{}}}", pairs.join(","))
    }
}

/// What turns capacity tracking on (`--capacity-enablement`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enablement {
    /// The driver's CSIDriver object: `spec.storageCapacity: true`, the
    /// switch kube-scheduler reads.
    #[default]
    CsiDriver,
    /// Always publish (external-provisioner's behaviour), e.g. to have every
    /// object in place before the switch is flipped.
    Always,
}

/// Whether capacity is tracked now, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// Objects are published.
    Enabled,
    /// There is no CSIDriver object named after the driver.
    NoCsiDriver,
    /// The CSIDriver has `spec.storageCapacity` false or unset.
    SwitchedOff,
}

/// Whether capacity is tracked, given the enablement and the driver's
/// CSIDriver object (if there is one).
pub fn tracking(enablement: Enablement, csidriver: Option<&CSIDriver>) -> Tracking {
    match (enablement, csidriver) {
        (Enablement::Always, _) => Tracking::Enabled,
        (Enablement::CsiDriver, None) => Tracking::NoCsiDriver,
        (Enablement::CsiDriver, Some(object)) if object.spec.storage_capacity == Some(true) => Tracking::Enabled,
        (Enablement::CsiDriver, Some(_)) => Tracking::SwitchedOff,
    }
}

impl Tracking {
    /// Whether objects are published.
    pub fn enabled(self) -> bool {
        self == Self::Enabled
    }

    /// For logs and events: what volplane does now, why, and how to change it.
    pub fn explanation(self, driver: &str) -> String {
        let enable = format!(
            "enable it with `kubectl patch csidriver {driver} --type merge -p '{{\"spec\":{{\"storageCapacity\":true}}}}'` \
             (or run volplane with --capacity-enablement always)"
        );
        match self {
            Self::Enabled => format!(
                "capacity tracking is on for CSI driver {driver}: CSIStorageCapacity objects are published \
                 and kube-scheduler places pods with late-bound volumes on them"
            ),
            Self::NoCsiDriver => text::event_note(&format!(
                "capacity tracking is off for CSI driver {driver}: there is no CSIDriver object named {driver}, \
                 so kube-scheduler ignores storage capacity; volplane publishes no CSIStorageCapacity objects \
                 and deletes its own. Create the CSIDriver with spec.storageCapacity: true"
            )),
            Self::SwitchedOff => text::event_note(&format!(
                "capacity tracking is off for CSI driver {driver}: its CSIDriver has spec.storageCapacity false, \
                 so kube-scheduler ignores storage capacity; volplane publishes no CSIStorageCapacity objects \
                 and deletes its own; {enable}"
            )),
        }
    }

    /// The event reason announcing this state.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Enabled => "CapacityTrackingEnabled",
            Self::NoCsiDriver | Self::SwitchedOff => "CapacityTrackingDisabled",
        }
    }
}

/// One unit of work: the capacity of one storage class in one segment.
/// Cheap to clone (two shared pointers).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkItem {
    /// Where.
    pub segment: Segment,
    /// Which StorageClass (by name).
    pub class: Arc<str>,
}

impl std::fmt::Display for WorkItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {}", self.class, self.segment)
    }
}

/// The per-node segment: the driver's `NodeGetInfo` topology, or — for a
/// driver without topology support or topology — just this node.
pub fn per_node_segment(node: &str, accessible_topology: Option<&Labels>) -> Segment {
    match accessible_topology.filter(|t| !t.is_empty()) {
        Some(topology) => Segment::new(topology.clone()),
        None => Segment::new(Labels::from([(HOSTNAME_LABEL.to_string(), node.to_string())])),
    }
}

/// Why `segment` cannot be a CSIStorageCapacity `nodeTopology` (the API
/// server would reject every object for it), or `None` when it can: each
/// key a qualified name, each value a label value.
pub fn invalid_segment(segment: &Segment) -> Option<String> {
    segment.labels().iter().find_map(|(key, value)| {
        if let Some(why) = invalid_label_key(key) {
            return Some(format!(
                "topology key {:?} is not a valid label key: {why}",
                text::cut(key, 300)
            ));
        }
        invalid_label_value(value).map(|why| {
            format!(
                "topology value {:?} of key {key} is not a valid label value: {why}",
                text::cut(value, 300)
            )
        })
    })
}

/// Kubernetes' rule for a label value: at most 63 characters, empty or
/// alphanumeric at both ends with `-`, `_` and `.` between.
fn invalid_label_value(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return None;
    }
    invalid_name_part(value)
}

/// Kubernetes' rule for a label key: an optional DNS subdomain prefix and
/// `/`, then a name part as for values (not empty).
fn invalid_label_key(key: &str) -> Option<&'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            return Some("its prefix must be a lower-case DNS subdomain of at most 253 characters");
        }
    }
    if name.is_empty() {
        return Some("its name part must not be empty");
    }
    invalid_name_part(name)
}

fn invalid_name_part(part: &str) -> Option<&'static str> {
    if part.len() > 63 {
        return Some("it must be at most 63 characters");
    }
    let inner_ok = part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    let ends_ok = part.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && part.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    (!inner_ok || !ends_ok)
        .then_some("it must consist of alphanumerics, '-', '_' or '.', and begin and end alphanumeric")
}

/// The GetCapacity parameters of `class` if volplane publishes capacity for
/// it: its provisioner is `driver` and it binds late (or early binding is
/// included). Reserved `csi.storage.k8s.io/` keys are removed.
pub fn capacity_parameters(class: &StorageClass, driver: &str, include_immediate: bool) -> Option<Labels> {
    if class.provisioner != driver {
        return None;
    }
    let late = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    if !late && !include_immediate {
        return None;
    }
    Some(
        class
            .parameters
            .iter()
            .flatten()
            .filter(|(key, _)| !key.starts_with(RESERVED_PARAMETER_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// Every (segment, class) pair.
pub fn work_items<'a>(
    segments: impl IntoIterator<Item = &'a Segment>,
    classes: impl IntoIterator<Item = &'a Arc<str>> + Clone,
) -> BTreeSet<WorkItem> {
    segments
        .into_iter()
        .flat_map(|segment| {
            classes.clone().into_iter().map(move |class| WorkItem {
                segment: segment.clone(),
                class: class.clone(),
            })
        })
        .collect()
}

/// Eight hex digits of the SHA-256 of `text`: what a name shortened to a
/// limit ends with, so that two long names stay apart.
pub fn short_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How every per-node instance's `managed-by` value starts ([`managed_by`]).
pub const PER_NODE_MANAGED_BY_PREFIX: &str = "volplane-";

/// Whether `managed_by` is a per-node instance's value.
pub fn is_per_node(managed_by: &str) -> bool {
    managed_by.starts_with(PER_NODE_MANAGED_BY_PREFIX)
}

/// The `managed-by` label value: `volplane`, or `volplane-<node>` in
/// per-node mode, shortened with a hash to a valid label value.
pub fn managed_by(node: Option<&str>) -> String {
    const MAX: usize = 63;
    let Some(node) = node else {
        return "volplane".to_string();
    };
    let full = format!("{PER_NODE_MANAGED_BY_PREFIX}{node}");
    if full.len() <= MAX && full.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()) {
        return full;
    }
    let hash = short_hash(node);
    let keep = MAX - hash.len() - 1;
    format!("{}-{hash}", text::prefix(&full, keep))
}

/// The `drivername` label value: the driver name when it is a valid label
/// value (CSI names are at most 63 characters), else shortened like [`managed_by`].
pub fn driver_label_value(driver: &str) -> String {
    if driver.len() <= 63 {
        return driver.to_string();
    }
    format!("{}-{}", text::prefix(driver, 54), short_hash(driver))
}

/// A capacity as published: bytes, both sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedCapacity {
    /// `.capacity`
    pub capacity: i64,
    /// `.maximumVolumeSize`, omitted when unset.
    pub maximum_volume_size: Option<i64>,
}

/// The note of the Warning event for a refresh of `item` that failed.
pub fn refresh_failure_note(item: &WorkItem, error: &dyn std::fmt::Display) -> String {
    text::event_note(&format!(
        "GetCapacity for storage class {} in {} failed: {error}",
        item.class, item.segment
    ))
}

/// What every object volplane writes carries besides its item and capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectIdentity {
    /// Namespace of the objects.
    pub namespace: String,
    /// `drivername` label value.
    pub driver: String,
    /// `managed-by` label value.
    pub managed_by: String,
    /// The one owner reference, if any.
    pub owner: Option<OwnerReference>,
}

impl ObjectIdentity {
    /// The label selector matching exactly this identity's objects.
    pub fn selector(&self) -> String {
        format!("{DRIVER_LABEL}={},{MANAGED_BY_LABEL}={}", self.driver, self.managed_by)
    }

    fn owner_references(&self) -> Option<Vec<OwnerReference>> {
        self.owner.clone().map(|o| vec![o])
    }
}

fn quantity(bytes: i64) -> Quantity {
    Quantity(format_bytes(bytes))
}

/// A new object for `item`, publishing `publication`.
pub fn new_object(
    item: &WorkItem,
    publication: impl Into<Publication>,
    identity: &ObjectIdentity,
) -> CSIStorageCapacity {
    let Publication { value, reservation } = publication.into();
    CSIStorageCapacity {
        metadata: ObjectMeta {
            generate_name: Some(GENERATE_NAME.to_string()),
            namespace: Some(identity.namespace.clone()),
            annotations: Reservation::annotations(reservation),
            labels: Some(Labels::from([
                (DRIVER_LABEL.to_string(), identity.driver.clone()),
                (MANAGED_BY_LABEL.to_string(), identity.managed_by.clone()),
            ])),
            owner_references: identity.owner_references(),
            ..ObjectMeta::default()
        },
        node_topology: Some(LabelSelector {
            match_labels: Some(item.segment.labels().clone()),
            match_expressions: None,
        }),
        storage_class_name: item.class.to_string(),
        capacity: Some(quantity(value.capacity)),
        maximum_volume_size: value.maximum_volume_size.map(quantity),
    }
}

/// A CSIStorageCapacity as volplane reads it from the API server: what its
/// decisions need, nothing else (no managed fields, no annotations but
/// volplane's own).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityObject {
    /// Name, UID, resource version, creation time, labels, volplane's
    /// annotations, owner references.
    #[serde(deserialize_with = "volplane_runtime::slim::metadata")]
    pub metadata: ObjectMeta,
    /// `nodeTopology`.
    pub node_topology: Option<LabelSelector>,
    /// `storageClassName`.
    #[serde(default)]
    pub storage_class_name: String,
    /// `capacity`.
    pub capacity: Option<Quantity>,
    /// `maximumVolumeSize`.
    pub maximum_volume_size: Option<Quantity>,
}

volplane_runtime::slim_resource!(CapacityObject, CSIStorageCapacity);

/// What volplane keeps of one of its objects between watch events: about a
/// hundred bytes, where the object itself is kilobytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownObject {
    /// For delete preconditions.
    pub uid: Option<String>,
    /// The resource version (opaque: only compared for equality).
    pub version: Option<String>,
    /// When it was created: the oldest of duplicates stays.
    pub created: Option<Time>,
    /// The capacity it publishes, when it parses.
    pub published: Option<PublishedCapacity>,
    /// The reservation its annotations state.
    pub reservation: Option<Reservation>,
    /// Whether it is exactly what volplane writes for `published`: the
    /// quantities in canonical spelling, volplane's two labels, and exactly
    /// the configured owner reference.
    pub conforming: bool,
}

impl KnownObject {
    /// What to keep of `object`, judged against `identity`.
    pub fn of(object: &CapacityObject, identity: &ObjectIdentity) -> Self {
        let published = published_capacity(object);
        let spelled = published.is_some_and(|value| {
            object.capacity.as_ref() == Some(&quantity(value.capacity))
                && object.maximum_volume_size == value.maximum_volume_size.map(quantity)
        });
        let labels = object.metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key));
        let labels_ok =
            label(DRIVER_LABEL) == Some(&identity.driver) && label(MANAGED_BY_LABEL) == Some(&identity.managed_by);
        let owners_ok = object.metadata.owner_references.as_deref().unwrap_or_default()
            == identity.owner_references().as_deref().unwrap_or_default();
        Self {
            uid: object.metadata.uid.clone(),
            version: object.metadata.resource_version.clone(),
            created: object.metadata.creation_timestamp.clone(),
            published,
            reservation: Reservation::read(object.metadata.annotations.as_ref()),
            conforming: spelled && labels_ok && owners_ok,
        }
    }
}

/// Whether an object known as `known` must be written to publish `value`:
/// the value differs, or the object is not exactly what volplane writes
/// (another spelling of the same value is rewritten once, to the form the
/// API server keeps; after that nothing is written).
pub fn needs_update(known: &KnownObject, value: PublishedCapacity) -> bool {
    known.published != Some(value) || !known.conforming
}

/// The JSON merge patch that makes the object known as `known` publish
/// `publication` with volplane's labels and owner, when [`needs_update`]
/// or its reservation differs; else `None`. Other labels and metadata are
/// kept; owner references are replaced, never appended to; the resource
/// version it was decided on is a precondition (the API server answers a
/// conflict if it changed).
pub fn update_patch(
    known: &KnownObject,
    publication: impl Into<Publication>,
    identity: &ObjectIdentity,
) -> Option<Value> {
    let Publication { value, reservation } = publication.into();
    if !needs_update(known, value) && known.reservation == reservation {
        return None;
    }
    let mut metadata = json!({
        "labels": {DRIVER_LABEL: identity.driver, MANAGED_BY_LABEL: identity.managed_by},
        "ownerReferences": identity.owner_references(),
    });
    if reservation.is_some() || known.reservation.is_some() {
        metadata["annotations"] = Reservation::patch(reservation);
    }
    if let Some(version) = &known.version {
        metadata["resourceVersion"] = json!(version);
    }
    Some(json!({
        "metadata": metadata,
        "capacity": quantity(value.capacity),
        "maximumVolumeSize": value.maximum_volume_size.map(quantity),
    }))
}

/// The patch that makes another controller's object (csi-provisioner's,
/// before the takeover) publish `value`, and nothing more: its labels,
/// owner and annotations stay, so it stays theirs. The resource version it
/// was decided on is a precondition. `None` when it publishes `value`.
pub fn value_patch(known: &KnownObject, value: PublishedCapacity) -> Option<Value> {
    if known.published == Some(value) {
        return None;
    }
    let mut patch = json!({
        "capacity": quantity(value.capacity),
        "maximumVolumeSize": value.maximum_volume_size.map(quantity),
    });
    if let Some(version) = &known.version {
        patch["metadata"] = json!({"resourceVersion": version});
    }
    Some(patch)
}

/// The work item an existing object stands for, if it has volplane's shape
/// (a `nodeTopology` of plain `matchLabels`).
pub fn item_of(object: &CapacityObject) -> Option<WorkItem> {
    let topology = object.node_topology.as_ref()?;
    if topology.match_expressions.as_ref().is_some_and(|e| !e.is_empty()) {
        return None;
    }
    Some(WorkItem {
        segment: Segment::new(topology.match_labels.clone().unwrap_or_default()),
        class: object.storage_class_name.as_str().into(),
    })
}

/// The capacity an existing object publishes, when it parses.
pub fn published_capacity(object: &CapacityObject) -> Option<PublishedCapacity> {
    let capacity = parse_bytes(&object.capacity.as_ref()?.0)?;
    let maximum_volume_size = match &object.maximum_volume_size {
        Some(q) => Some(parse_bytes(&q.0)?),
        None => None,
    };
    Some(PublishedCapacity {
        capacity,
        maximum_volume_size,
    })
}

/// Whether `seen`, a newer version of `known` delivered by the watch,
/// needs a refresh: its published capacity differs from what `known`
/// published, or it is no longer what volplane writes for that value
/// (labels, owner, spelling). `known` without a readable capacity always
/// needs one.
pub fn changed_by_others(known: &KnownObject, seen: &KnownObject) -> bool {
    known.published.is_none() || seen.published != known.published || !seen.conforming
}

/// How the objects that exist map onto the items that should.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// The object (by name) that stands for each desired item.
    pub adopt: BTreeMap<WorkItem, String>,
    /// Objects to delete: duplicates and objects for items no longer desired.
    pub delete: Vec<String>,
    /// Desired items without an object.
    pub missing: BTreeSet<WorkItem>,
}

/// One existing object (already filtered to volplane's labels), as
/// [`reconcile_objects`] reads it.
#[derive(Clone, Copy, Debug)]
pub struct Existing<'a> {
    /// Its name.
    pub name: &'a str,
    /// The item its shape stands for (`None`: not volplane's shape).
    pub item: Option<&'a WorkItem>,
    /// When it was created.
    pub created: Option<&'a Time>,
}

/// Maps existing objects onto the `desired` items. Among duplicates the
/// oldest object (creation time, then name) is kept.
pub fn reconcile_objects<'a>(
    desired: impl IntoIterator<Item = WorkItem>,
    is_desired: impl Fn(&WorkItem) -> bool,
    existing: impl IntoIterator<Item = Existing<'a>>,
) -> Reconciliation {
    let mut ordered: Vec<Existing<'a>> = existing.into_iter().collect();
    ordered.sort_by(|a, b| (a.created.map(|t| t.0), a.name).cmp(&(b.created.map(|t| t.0), b.name)));
    let mut result = Reconciliation::default();
    for object in ordered {
        match object.item {
            Some(item) if is_desired(item) && !result.adopt.contains_key(item) => {
                result.adopt.insert(item.clone(), object.name.to_string());
            }
            _ => result.delete.push(object.name.to_string()),
        }
    }
    result.missing = desired.into_iter().filter(|i| !result.adopt.contains_key(i)).collect();
    result
}

#[cfg(test)]
mod tests;
