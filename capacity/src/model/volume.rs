//! The driver's PersistentVolumes as the central capacity controller
//! reads them: which (segment, class) a volume's creation or deletion
//! changes.

use k8s_openapi::api::core::v1::{NodeSelectorTerm, PersistentVolume, VolumeNodeAffinity};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{Labels, Segment};

/// A PersistentVolume as the central capacity controller reads it: its
/// driver, class and node affinity.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeObject {
    /// Name and resource version.
    #[serde(deserialize_with = "volplane_runtime::slim::metadata")]
    pub metadata: ObjectMeta,
    /// What decides the items it affects.
    pub spec: Option<VolumeSpec>,
}

volplane_runtime::slim_resource!(VolumeObject, PersistentVolume);

/// The part of a PV's spec the capacity controller reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// `csi.driver`.
    pub csi: Option<VolumeDriver>,
    /// `storageClassName`.
    pub storage_class_name: Option<String>,
    /// `nodeAffinity`.
    pub node_affinity: Option<VolumeNodeAffinity>,
}

/// `spec.csi` of a PV, cut to the driver.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeDriver {
    /// The CSI driver.
    pub driver: String,
}

/// Whether `pv` is a volume of `driver`.
pub fn is_volume_of(pv: &VolumeObject, driver: &str) -> bool {
    pv.spec.as_ref().and_then(|s| s.csi.as_ref()).map(|c| c.driver.as_str()) == Some(driver)
}

/// The class and node affinity terms of `pv` when it is a volume of
/// `driver` with a class: what decides the items it affects.
pub fn volume_placement<'a>(pv: &'a VolumeObject, driver: &str) -> Option<(&'a str, &'a [NodeSelectorTerm])> {
    let spec = pv.spec.as_ref().filter(|_| is_volume_of(pv, driver))?;
    let class = spec.storage_class_name.as_deref()?;
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    Some((class, terms))
}

/// The segments each of `terms` names exactly, when every term is made of
/// single-value `In` expressions (provisioners write a volume's segment so).
pub fn exact_segments(terms: &[NodeSelectorTerm]) -> Option<Vec<Segment>> {
    terms
        .iter()
        .map(exact_segment)
        .collect::<Option<Vec<_>>>()
        .filter(|s| !s.is_empty())
}

/// The segment a node selector term names exactly: only `In` expressions
/// with one value each.
fn exact_segment(term: &NodeSelectorTerm) -> Option<Segment> {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let labels: Option<Labels> = expressions
        .iter()
        .map(|expr| match (expr.operator.as_str(), expr.values.as_deref()) {
            ("In", Some([value])) => Some((expr.key.clone(), value.clone())),
            _ => None,
        })
        .collect();
    labels.filter(|l| !l.is_empty()).map(Segment::new)
}

/// Whether any of `terms` admits `segment` (no terms: every segment). Only
/// `In` can be decided from a segment; other operators admit.
pub fn admits(terms: &[NodeSelectorTerm], segment: &Segment) -> bool {
    terms.is_empty()
        || terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|expr| match segment.labels().get(&expr.key) {
                    Some(value) if expr.operator == "In" => expr.values.iter().flatten().any(|v| v == value),
                    _ => true,
                })
        })
}
