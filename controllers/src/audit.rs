//! One debug line per write the process sends to the API server.

use kube::client::Body;
use tower::util::MapRequestLayer;
use tracing::debug;

/// A write request, described from its method and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiWrite<'a> {
    /// `create`, `update`, `patch`, `delete` or `deletecollection`.
    pub verb: &'static str,
    /// The resource (plural, with its group), e.g. `csistoragecapacities.storage.k8s.io`.
    pub resource: String,
    /// The namespace, if namespaced.
    pub namespace: Option<&'a str>,
    /// The object name with any subresource, e.g. `p/status`.
    pub name: Option<String>,
}

/// Describes a write to a resource path; `None` for reads and other paths.
pub fn describe<'a>(method: &http::Method, path: &'a str) -> Option<ApiWrite<'a>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, more @ ..] if !more.is_empty() => (Some(*namespace), more),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [resource] => (*resource, None),
        [resource, name] => (*resource, Some((*name).to_string())),
        [resource, name, subresource] => (*resource, Some(format!("{name}/{subresource}"))),
        _ => return None,
    };
    let verb = match (method, &name) {
        (&http::Method::POST, None) => "create",
        (&http::Method::PUT, Some(_)) => "update",
        (&http::Method::PATCH, Some(_)) => "patch",
        (&http::Method::DELETE, Some(_)) => "delete",
        (&http::Method::DELETE, None) => "deletecollection",
        _ => return None,
    };
    let resource = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    Some(ApiWrite {
        verb,
        resource,
        namespace,
        name,
    })
}

fn log_write(request: http::Request<Body>) -> http::Request<Body> {
    if let Some(write) = describe(request.method(), request.uri().path()) {
        debug!(
            verb = write.verb,
            resource = %write.resource,
            namespace = write.namespace.unwrap_or(""),
            name = write.name.as_deref().unwrap_or(""),
            "API write"
        );
    }
    request
}

/// The client layer that logs every write at debug level.
pub fn layer() -> MapRequestLayer<fn(http::Request<Body>) -> http::Request<Body>> {
    MapRequestLayer::new(log_write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn writes_are_described_with_resource_namespace_and_name() {
        assert_eq!(
            describe(
                &Method::POST,
                "/apis/storage.k8s.io/v1/namespaces/kube-system/csistoragecapacities"
            ),
            Some(ApiWrite {
                verb: "create",
                resource: "csistoragecapacities.storage.k8s.io".into(),
                namespace: Some("kube-system"),
                name: None
            })
        );
        assert_eq!(
            describe(&Method::PUT, "/api/v1/namespaces/default/pods/p/status"),
            Some(ApiWrite {
                verb: "update",
                resource: "pods".into(),
                namespace: Some("default"),
                name: Some("p/status".into())
            })
        );
        assert_eq!(
            describe(&Method::DELETE, "/api/v1/nodes/n1").map(|w| (w.verb, w.resource, w.namespace)),
            Some(("delete", "nodes".to_string(), None))
        );
        assert_eq!(
            describe(&Method::PATCH, "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l").map(|w| w.verb),
            Some("patch")
        );
    }

    #[test]
    fn reads_and_other_paths_are_not_writes() {
        assert_eq!(describe(&Method::GET, "/api/v1/namespaces/default/pods/p"), None);
        assert_eq!(describe(&Method::POST, "/version"), None);
        assert_eq!(describe(&Method::PUT, "/api/v1/namespaces/default/pods"), None);
    }
}
