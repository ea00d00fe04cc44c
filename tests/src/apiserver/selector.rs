//! Label and field selectors, as the API server parses and matches them.

use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value`, `key==value`
    Equals(String, String),
    /// `key!=value` (also true when the key is absent)
    NotEquals(String, String),
    /// `key in (a,b)`
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent)
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    DoesNotExist(String),
}

/// A parsed label selector: all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    /// Parses the `labelSelector` query parameter.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(raw)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_term(term)?);
        }
        Ok(Self(requirements))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_terms(raw: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in raw.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in {raw:?}"))?
            }
            ',' if depth == 0 => {
                terms.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {raw:?}"));
    }
    terms.push(&raw[start..]);
    Ok(terms)
}

fn parse_set(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values) in {term:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key.trim().to_string()));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key.trim().to_string(), value.trim().to_string()));
    }
    if let Some((key, value)) = term.split_once("==") {
        return Ok(Requirement::Equals(key.trim().to_string(), value.trim().to_string()));
    }
    if let Some((key, value)) = term.split_once('=') {
        return Ok(Requirement::Equals(key.trim().to_string(), value.trim().to_string()));
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim().to_string();
    let rest = words.next().unwrap_or_default().trim();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key));
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(Requirement::NotIn(key, parse_set(set, term)?));
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(Requirement::In(key, parse_set(set, term)?));
    }
    Err(format!("cannot parse label selector term {term:?}"))
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

/// Fields the double can select on (the real API server allows a per-kind list).
const SUPPORTED_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.phase",
    "spec.volumeName",
    "involvedObject.kind",
    "involvedObject.name",
    "involvedObject.uid",
    "regarding.name",
    "regarding.uid",
];

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = field.trim();
            if !SUPPORTED_FIELDS.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Whether `object` satisfies every term; a missing field reads as "".
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |v, part| v.get(part))
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equality_and_set_based_requirements() {
        let l = labels(&[
            ("app", "db"),
            ("tier", "gold"),
            ("csi.storage.k8s.io/drivername", "x.csi"),
        ]);
        let cases = [
            ("", true),
            ("app=db", true),
            ("app==db", true),
            ("app!=db", false),
            ("app!=web", true),
            ("missing!=x", true),
            ("app in (db, web)", true),
            ("app in (web)", false),
            ("app notin (web)", true),
            ("missing notin (web)", true),
            ("app notin (db)", false),
            ("tier", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("app=db,tier in (gold,silver),!missing", true),
            ("csi.storage.k8s.io/drivername=x.csi", true),
        ];
        for (raw, want) in cases {
            let selector = LabelSelector::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(selector.matches(&l), want, "{raw}");
        }
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        for raw in ["app in (a", "app in a", "app)"] {
            assert!(LabelSelector::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn field_selectors_on_nested_fields() {
        let pod = serde_json::json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let select = |raw: &str| FieldSelector::parse(raw).expect("valid").matches(&pod);
        assert!(select("metadata.name=p"));
        assert!(select("metadata.namespace==ns,spec.nodeName=n1"));
        assert!(!select("spec.nodeName=n2"));
        assert!(select("spec.nodeName!=n2"));
        assert!(select("status.phase="));
        assert!(FieldSelector::parse("spec.unknownField=x").is_err());
    }
}
