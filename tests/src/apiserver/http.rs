//! HTTP routing of the double: path parsing, verbs, watch streams, errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::resources::{KINDS, ResourceKind, find};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Change, ChangeType, DeleteOptions, Patch, labels_of};
use super::{RequestRecord, Shared, Verb, lock};

/// `cuttable`: the main door, which [`Shared::cut`] closes.
pub(super) fn router(shared: Arc<Shared>, cuttable: bool) -> Router {
    Router::new().fallback(handle).with_state(Door { shared, cuttable })
}

#[derive(Clone)]
struct Door {
    shared: Arc<Shared>,
    cuttable: bool,
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn status_body(error: &ApiError) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": error.message,
        "reason": error.reason,
        "code": error.code,
    })
}

fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &status_body(error))
}

fn injected(code: u16) -> ApiError {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    ApiError::new(code, reason, format!("injected failure ({code} {reason})"))
}

/// A request for a resource, parsed from the path.
#[derive(Debug)]
struct Target {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    if rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && let Some(kind) = find(group, version, rest[2]).filter(|k| KINDS[*k].namespaced)
    {
        return Some(Target {
            kind,
            namespace: Some(rest[1].to_string()),
            name: rest.get(3).map(|s| s.to_string()),
            subresource: rest.get(4).map(|s| s.to_string()),
        })
        .filter(|_| rest.len() <= 5);
    }
    let kind = find(group, version, rest.first()?)?;
    if rest.len() > 3 {
        return None;
    }
    Some(Target {
        kind,
        namespace: None,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn discovery(segments: &[&str]) -> Option<Value> {
    let groups = || {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for k in KINDS.iter().filter(|k| !k.group.is_empty()) {
            if !seen.contains(&(k.group, k.version)) {
                seen.push((k.group, k.version));
            }
        }
        seen
    };
    let group_json = |group: &str, version: &str| {
        let gv = format!("{group}/{version}");
        json!({"name": group, "versions": [{"groupVersion": gv, "version": version}],
               "preferredVersion": {"groupVersion": gv, "version": version}})
    };
    let resource_list =
        |group: &str, version: &str| {
            let resources: Vec<Value> = KINDS
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .flat_map(|k| {
                let verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
                let main = json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
                                   "kind": k.kind, "verbs": verbs, "shortNames": k.short_names});
                let status = k.status.then(|| {
                    json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                           "kind": k.kind, "verbs": ["get", "patch", "update"]})
                });
                std::iter::once(main).chain(status)
            })
            .collect();
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
        };
    match segments {
        ["version"] => Some(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-volplane-double", "gitCommit": "0",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "n/a",
            "compiler": "n/a", "platform": "linux/amd64"
        })),
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        ["apis"] => Some(json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": groups().into_iter().map(|(g, v)| group_json(g, v)).collect::<Vec<_>>()})),
        ["apis", group] => groups().into_iter().find(|(g, _)| g == group).map(|(g, v)| {
            let mut value = group_json(g, v);
            value["kind"] = json!("APIGroup");
            value["apiVersion"] = json!("v1");
            value
        }),
        ["api", "v1"] => Some(resource_list("", "v1")),
        ["apis", group, version] if groups().contains(&(*group, *version)) => Some(resource_list(group, version)),
        _ => None,
    }
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "true" || v == "1")
}

async fn handle(
    State(Door { shared, cuttable }): State<Door>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if cuttable && *shared.cut.borrow() {
        // 500, not 503: kube's client retries a 503 for minutes itself,
        // where a client of an API server that is away sees its error.
        return error_response(&ApiError::new(500, "InternalError", "the API server is away"));
    }
    let path = uri.path().trim_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if matches!(segments.as_slice(), ["healthz"] | ["readyz"] | ["livez"]) {
        return "ok".into_response();
    }
    if method == Method::GET
        && let Some(value) = discovery(&segments)
    {
        return json_response(StatusCode::OK, &value);
    }
    let target = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => parse_target("", "v1", rest),
        ["apis", group, version, rest @ ..] if !rest.is_empty() => parse_target(group, version, rest),
        _ => None,
    };
    let Some(target) = target else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    if target
        .subresource
        .as_deref()
        .is_some_and(|s| s != "status" || !KINDS[target.kind].status)
    {
        return error_response(&ApiError::new(404, "NotFound", "subresource not found"));
    }
    let query = query_map(&uri);
    let verb = match (&method, &target.name) {
        (&Method::GET, Some(_)) => Verb::Get,
        (&Method::GET, None) if is_true(query.get("watch")) => Verb::Watch,
        (&Method::GET, None) => Verb::List,
        (&Method::POST, None) => Verb::Create,
        (&Method::PUT, Some(_)) => Verb::Update,
        (&Method::PATCH, Some(_)) => Verb::Patch,
        (&Method::DELETE, Some(_)) => Verb::Delete,
        (&Method::DELETE, None) => Verb::DeleteCollection,
        _ => {
            return error_response(&ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not allowed here"),
            ));
        }
    };
    lock(&shared.requests).push(RequestRecord {
        verb,
        group: KINDS[target.kind].group.to_string(),
        resource: KINDS[target.kind].plural.to_string(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: target.subresource.clone(),
        label_selector: query.get("labelSelector").filter(|s| !s.is_empty()).cloned(),
        field_selector: query.get("fieldSelector").filter(|s| !s.is_empty()).cloned(),
        at: std::time::Instant::now(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    });
    let mut latency = *lock(&shared.latency);
    if verb == Verb::List {
        latency += lock(&shared.list_latency)
            .get(KINDS[target.kind].plural)
            .copied()
            .unwrap_or_default();
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = take_fault(&shared, verb, KINDS[target.kind].plural) {
        if verb == Verb::Watch && code == 410 {
            // The real API server reports an expired revision inside the
            // watch stream (HTTP 200, one ERROR event), not as an HTTP status.
            let line = event_line("ERROR", &status_body(&injected(code)));
            return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], line).into_response();
        }
        if code == 429 {
            // As kube-apiserver's flow control and max-in-flight filters answer.
            let mut response = error_response(&injected(code));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
        return error_response(&injected(code));
    }
    let result = match verb {
        Verb::Watch => return watch(shared, target, &query, cuttable),
        Verb::List => list(&shared, &target, &query),
        Verb::Get => get(&shared, &target),
        Verb::Create => create(&shared, &target, &body),
        Verb::Update => update(&shared, &target, &body),
        Verb::Patch => patch(&shared, &target, &query, &headers, &body),
        Verb::Delete => delete(&shared, &target, &query, &body),
        Verb::DeleteCollection => delete_collection(&shared, &target, &query),
    };
    match result {
        Ok((code, value)) => json_response(code, &value),
        Err(error) => error_response(&error),
    }
}

fn take_fault(shared: &Shared, verb: Verb, resource: &str) -> Option<u16> {
    let mut faults = lock(&shared.faults);
    let fault = faults.iter_mut().find(|f| {
        f.remaining > 0 && f.verb.is_none_or(|v| v == verb) && f.resource.as_deref().is_none_or(|r| r == resource)
    })?;
    fault.remaining -= 1;
    let code = fault.code;
    faults.retain(|f| f.remaining > 0);
    Some(code)
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, "BadRequest", format!("cannot decode the body: {e}")))
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::new(400, "BadRequest", format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::new(400, "BadRequest", e))?;
    Ok((labels, fields))
}

/// Runs a store operation under the lock and publishes what it changed.
fn mutate<T>(shared: &Shared, op: impl FnOnce(&mut super::store::Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
    let mut store = lock(&shared.store);
    let outcome = op(&mut store);
    let changes = store.take_pending();
    shared.revision.store(store.revision(), Ordering::SeqCst);
    // Published while the store is locked, so a watch that subscribes under
    // the lock sees every change exactly once: in history or live.
    for change in changes {
        let _ = shared.changes.send(change);
    }
    outcome
}

type Answer = Result<(StatusCode, Value), ApiError>;

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Answer {
    let rk = &KINDS[target.kind];
    let (revision, items, token) = match query.get("continue").filter(|t| !t.is_empty()) {
        Some(token) => continued(shared, token)?,
        None => {
            let (labels, fields) = selectors(query)?;
            let store = lock(&shared.store);
            let mut items = store.list(target.kind, target.namespace.as_deref(), &labels, &fields);
            if (rk.group, rk.plural) == ("", "events")
                && let Some(new_kind) = find("events.k8s.io", "v1", "events")
            {
                // One object, two APIs, as on the real API server: events
                // written through events.k8s.io/v1 are read here too.
                let all = FieldSelector::default();
                let written = store.list(new_kind, target.namespace.as_deref(), &labels, &all);
                items.extend(written.iter().map(core_event).filter(|e| fields.matches(e)));
            }
            (store.revision(), items, None)
        }
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    let mut items = items;
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        metadata["remainingItemCount"] = json!(rest.len());
        metadata["continue"] = json!(keep_snapshot(shared, token, revision, rest));
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", rk.kind), "apiVersion": rk.api_version(), "metadata": metadata, "items": items}),
    ))
}

/// An events.k8s.io/v1 Event as core/v1 shows it.
fn core_event(event: &Value) -> Value {
    let regarding = &event["regarding"];
    let series = event
        .get("series")
        .filter(|s| !s.is_null())
        .map(|series| json!({"count": series["count"], "lastObservedTime": series["lastObservedTime"]}));
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": event["metadata"],
        "involvedObject": regarding,
        "reason": event["reason"],
        "message": event["note"],
        "type": event["type"],
        "eventTime": event["eventTime"],
        "series": series,
        "reportingComponent": event["reportingController"],
        "reportingInstance": event["reportingInstance"],
        "action": event["action"],
    })
}

/// The rest of a list a `continue` token stands for: its snapshot's
/// revision and items, and the snapshot's id to keep paging it.
fn continued(shared: &Shared, token: &str) -> Result<(u64, Vec<Value>, Option<u64>), ApiError> {
    let expired = || {
        ApiError::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        )
    };
    let id: u64 = token
        .parse()
        .map_err(|_| ApiError::new(400, "BadRequest", "invalid continue token"))?;
    let mut snapshots = lock(&shared.snapshots);
    let at = snapshots.iter().position(|(key, _)| *key == id).ok_or_else(expired)?;
    let (_, snapshot) = snapshots.remove(at).ok_or_else(expired)?;
    Ok((snapshot.revision, snapshot.items, Some(id)))
}

/// Keeps `rest` for the next page; returns its token.
fn keep_snapshot(shared: &Shared, id: Option<u64>, revision: u64, rest: Vec<Value>) -> String {
    let id = id.unwrap_or_else(|| shared.next_snapshot.fetch_add(1, Ordering::SeqCst));
    let mut snapshots = lock(&shared.snapshots);
    snapshots.push_back((id, super::Snapshot { revision, items: rest }));
    while snapshots.len() > super::SNAPSHOTS {
        snapshots.pop_front();
    }
    id.to_string()
}

fn namespace_of(target: &Target) -> &str {
    target.namespace.as_deref().unwrap_or("")
}

fn name_of(target: &Target) -> &str {
    target.name.as_deref().unwrap_or("")
}

fn get(shared: &Shared, target: &Target) -> Answer {
    let store = lock(&shared.store);
    Ok((
        StatusCode::OK,
        store.get(target.kind, namespace_of(target), name_of(target))?,
    ))
}

fn create(shared: &Shared, target: &Target, body: &Bytes) -> Answer {
    let object = parse_body(body)?;
    let created = mutate(shared, |store| store.create(target.kind, namespace_of(target), object))?;
    Ok((StatusCode::CREATED, created))
}

fn update(shared: &Shared, target: &Target, body: &Bytes) -> Answer {
    let object = parse_body(body)?;
    let status_only = target.subresource.is_some();
    let updated = mutate(shared, |store| {
        store.update(target.kind, namespace_of(target), name_of(target), object, status_only)
    })?;
    Ok((StatusCode::OK, updated))
}

fn patch(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Answer {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let value = parse_body(body)?;
    let patch = match content_type.as_str() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => Patch::Merge(value),
        "application/json-patch+json" => Patch::Json(value),
        "application/apply-patch+yaml" => Patch::Apply {
            body: value,
            force: is_true(query.get("force")),
        },
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    };
    let status_only = target.subresource.is_some();
    let patched = mutate(shared, |store| {
        store.patch(
            target.kind,
            namespace_of(target),
            name_of(target),
            patch,
            status_only,
            query.get("fieldManager").map(String::as_str),
        )
    })?;
    Ok((StatusCode::OK, patched))
}

fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let body = if body.is_empty() { json!({}) } else { parse_body(body)? };
    let policy = body["propagationPolicy"]
        .as_str()
        .map(str::to_string)
        .or_else(|| query.get("propagationPolicy").cloned());
    Ok(DeleteOptions {
        uid: body["preconditions"]["uid"].as_str().map(str::to_string),
        resource_version: body["preconditions"]["resourceVersion"].as_str().map(str::to_string),
        orphan: policy.as_deref() == Some("Orphan"),
    })
}

fn delete(shared: &Shared, target: &Target, query: &HashMap<String, String>, body: &Bytes) -> Answer {
    let options = delete_options(query, body)?;
    let rk: &ResourceKind = &KINDS[target.kind];
    let (object, still_there) = mutate(shared, |store| {
        store.delete(target.kind, namespace_of(target), name_of(target), &options)
    })?;
    if still_there {
        return Ok((StatusCode::OK, object));
    }
    Ok((
        StatusCode::OK,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": name_of(target), "kind": rk.plural, "uid": object["metadata"]["uid"]}}),
    ))
}

fn delete_collection(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Answer {
    let rk = &KINDS[target.kind];
    let (labels, fields) = selectors(query)?;
    let deleted = mutate(shared, |store| {
        let victims = store.list(target.kind, target.namespace.as_deref(), &labels, &fields);
        let mut deleted = Vec::new();
        for victim in victims {
            let ns = victim["metadata"]["namespace"].as_str().unwrap_or("").to_string();
            let name = victim["metadata"]["name"].as_str().unwrap_or("").to_string();
            if let Ok((object, _)) = store.delete(target.kind, &ns, &name, &DeleteOptions::default()) {
                deleted.push(object);
            }
        }
        Ok(deleted)
    })?;
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", rk.kind), "apiVersion": rk.api_version(), "metadata": {}, "items": deleted}),
    ))
}

/// What a watch wants to see.
struct WatchFilter {
    kind: usize,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(&labels_of(object)) && self.fields.matches(object)
    }

    /// The event type this watcher sees for a change, if any.
    fn event_for(&self, change: &Change) -> Option<&'static str> {
        if change.kind != self.kind || self.namespace.as_deref().is_some_and(|ns| ns != change.namespace) {
            return None;
        }
        let now = self.matches(&change.object);
        match change.change {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Deleted => now.then_some("DELETED"),
            ChangeType::Modified => {
                let before = change.previous.as_ref().is_none_or(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(shared: Arc<Shared>, target: Target, query: &HashMap<String, String>, cuttable: bool) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(error) => return error_response(&error),
    };
    let filter = WatchFilter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        labels,
        fields,
    };
    let rk = KINDS[target.kind];
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let send_initial = is_true(query.get("sendInitialEvents"));
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let requested = query.get("resourceVersion").cloned().unwrap_or_default();

    // Everything the stream starts with is decided under the store lock,
    // together with the subscription, so no change falls between them.
    let mut opening: Vec<Bytes> = Vec::new();
    let (mut live, mut last_sent, expired) = {
        let store = lock(&shared.store);
        let live = shared.changes.subscribe();
        let current = store.revision();
        if requested.is_empty() || requested == "0" || send_initial {
            for object in store.list(target.kind, target.namespace.as_deref(), &filter.labels, &filter.fields) {
                opening.push(event_line("ADDED", &object));
            }
            if send_initial {
                opening.push(event_line(
                    "BOOKMARK",
                    &json!({"kind": rk.kind, "apiVersion": rk.api_version(),
                            "metadata": {"resourceVersion": current.to_string(),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}}),
                ));
            }
            (live, current, false)
        } else {
            match requested.parse::<u64>().ok().map(|rv| (rv, store.changes_since(rv))) {
                Some((_, Ok(changes))) => {
                    for change in changes {
                        if let Some(kind) = filter.event_for(&change) {
                            opening.push(event_line(kind, &change.object));
                        }
                    }
                    (live, current, false)
                }
                _ => (live, current, true),
            }
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let mut dropped = shared.drop_watches.subscribe();
    let mut cut = shared.cut.subscribe();
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        if expired {
            let gone = status_body(&ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {requested} ({last_sent})"),
            ));
            let _ = tx.send(Ok(event_line("ERROR", &gone))).await;
            return;
        }
        for line in opening {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                // First: nothing reaches a watch of a door that was cut off.
                biased;
                Ok(()) = cut.changed(), if cuttable => {
                    let away = *cut.borrow_and_update();
                    if away {
                        return;
                    }
                }
                received = live.recv() => match received {
                    Ok(change) => {
                        if change.revision <= last_sent {
                            continue;
                        }
                        last_sent = change.revision;
                        if let Some(kind) = filter.event_for(&change)
                            && tx.send(Ok(event_line(kind, &change.object))).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind is closed; it re-watches from its last revision.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let rv = shared.revision.load(Ordering::SeqCst).max(last_sent);
                    let bookmark = json!({"kind": rk.kind, "apiVersion": rk.api_version(),
                                          "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(Ok(event_line("BOOKMARK", &bookmark))).await.is_err() {
                        return;
                    }
                }
                _ = dropped.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response()
}
