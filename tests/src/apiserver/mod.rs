//! An in-process Kubernetes API-server double for component tests.
//!
//! A real HTTP server on 127.0.0.1 that a normal `kube::Client` (and
//! kube-runtime's watchers, reflectors and controllers) talks to. It keeps
//! objects in memory and behaves like the real API server where controllers
//! depend on it:
//!
//! - discovery (`/version`, `/api`, `/apis`, resource lists), namespaced and
//!   cluster-scoped paths for the kinds in [`resources::KINDS`];
//! - list with `labelSelector` (equality and set-based), `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`, `spec.nodeName`, …), `limit` /
//!   `continue` (every page read from the first page's snapshot, a token
//!   too old for the kept snapshots answered 410 Expired), and a
//!   `resourceVersion` on every object and list (a list's is its first
//!   page's);
//! - watch from a resourceVersion (replayed from history), from "" / "0" with
//!   synthetic ADDED events for what exists, bookmarks when asked for, an
//!   `ERROR` 410 Expired event for a compacted revision, objects that stop
//!   (start) matching a selector delivered as DELETED (ADDED);
//! - create (409 AlreadyExists, `generateName`, uid / creationTimestamp /
//!   generation filled in, 422 for invalid names and label values, 404 for a
//!   missing namespace), replace with optimistic concurrency (409 Conflict),
//!   JSON merge patch and JSON patch, the `/status` subresource, delete
//!   (deletionTimestamp while finalizers remain, preconditions), delete
//!   collection;
//! - optional garbage collection ([`ApiServerDouble::enable_garbage_collection`]);
//! - fault injection ([`ApiServerDouble::fail_next`], latency, dropping all
//!   watches, compaction, a main door cut off while a side door serves, as
//!   two API servers on one etcd) and a request log.
//!
//! Limits — it is a test double, not a product: no authentication,
//! authorization or admission (no quota, no webhooks, no defaulting, no
//! schema validation beyond names and labels); strategic merge patch and
//! server-side apply are approximated by JSON merge patch (lists are
//! replaced, no field managers); core/v1 lists show events.k8s.io/v1
//! events too (converted), but a core/v1 watch does not; pods are deleted at once (no graceful termination, no kubelet);
//! foreground deletion is treated as background; dry-run is ignored.

mod http;
pub mod resources;
pub mod selector;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use store::{Change, Store};

/// An API verb, as the request log and fault injection name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

/// One resource request the double served (discovery is not logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The verb.
    pub verb: Verb,
    /// The API group, empty for the core group.
    pub group: String,
    /// The resource's plural, e.g. `csistoragecapacities`.
    pub resource: String,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// The object name in the path, if any.
    pub name: Option<String>,
    /// The subresource, e.g. `status`.
    pub subresource: Option<String>,
    /// The `labelSelector` of a list or watch, if any.
    pub label_selector: Option<String>,
    /// The `fieldSelector` of a list or watch, if any.
    pub field_selector: Option<String>,
    /// When the request arrived.
    pub at: std::time::Instant,
    /// The client's `User-Agent` header.
    pub user_agent: String,
}

#[derive(Clone, Debug)]
struct Fault {
    verb: Option<Verb>,
    resource: Option<String>,
    remaining: usize,
    code: u16,
}

#[derive(Debug)]
struct Shared {
    /// Lists under way: the items of each first page's snapshot, which its
    /// `continue` tokens read (as the real API server reads etcd at the
    /// first page's revision), oldest first.
    snapshots: Mutex<std::collections::VecDeque<(u64, Snapshot)>>,
    next_snapshot: AtomicU64,
    /// Whether the main door is cut off (an API server away).
    cut: watch::Sender<bool>,
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    revision: AtomicU64,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Duration>,
    /// Extra latency of every list (each page) of a resource, by plural.
    list_latency: Mutex<std::collections::HashMap<String, Duration>>,
    drop_watches: watch::Sender<u64>,
    requests: Mutex<Vec<RequestRecord>>,
    bookmark_interval: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The items of a list at one revision.
#[derive(Debug)]
struct Snapshot {
    revision: u64,
    items: Vec<serde_json::Value>,
}

/// Continue tokens kept at most; an older one answers 410 Expired.
const SNAPSHOTS: usize = 64;

/// A running double; dropping it stops the server.
///
/// It has two doors on one store, as two kube-apiservers share one etcd:
/// the main one ([`client`](Self::client)), which
/// [`cut_off`](Self::cut_off) takes away, and a side door
/// ([`side_client`](Self::side_client)) that stays, for changing things
/// while a controller on the main door cannot see them.
#[derive(Debug)]
pub struct ApiServerDouble {
    address: SocketAddr,
    side_address: SocketAddr,
    side_server: JoinHandle<()>,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ApiServerDouble {
    /// Starts a double on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let side_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let side_address = side_listener.local_addr()?;
        let store = Store::new();
        let (changes, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            revision: AtomicU64::new(store.revision()),
            store: Mutex::new(store),
            snapshots: Mutex::new(std::collections::VecDeque::new()),
            next_snapshot: AtomicU64::new(1),
            cut: watch::channel(false).0,
            changes,
            faults: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
            list_latency: Mutex::new(std::collections::HashMap::new()),
            drop_watches: watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            bookmark_interval: Duration::from_secs(2),
        });
        let app = http::router(shared.clone(), true);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let side_app = http::router(shared.clone(), false);
        let side_server = tokio::spawn(async move {
            let _ = axum::serve(side_listener, side_app).await;
        });
        Ok(Self {
            address,
            side_address,
            side_server,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client for the double's main door, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        client_for(&self.url())
    }

    /// A client for the side door, which [`cut_off`](Self::cut_off) leaves open.
    pub fn side_client(&self) -> kube::Client {
        client_for(&format!("http://{}", self.side_address))
    }

    /// Cuts the main door off, as an API server that went away: its watch
    /// streams end and every request to it answers 500 until
    /// [`reconnect`](Self::reconnect). The side door keeps serving.
    pub fn cut_off(&self) {
        self.shared.cut.send_replace(true);
    }

    /// Opens the main door again as an API server restarted on a fresh
    /// watch cache: every revision handed out so far is expired, so a
    /// watcher's re-watch gets 410 Gone and it must re-list.
    pub fn reconnect(&self) {
        self.force_relist();
        self.shared.cut.send_replace(false);
    }

    /// A kubeconfig file's text pointing at the double (namespace `default`).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             users:\n- name: double\n  user:\n    token: double\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\n\
             current-context: double\n",
            self.url()
        )
    }

    /// Turns the garbage collector on or off (off by default).
    pub fn enable_garbage_collection(&self, enabled: bool) {
        lock(&self.shared.store).garbage_collection = enabled;
    }

    /// The next `times` requests of `verb` on `resource` (plural; `None` = any) fail with HTTP `code`.
    pub fn fail_next(&self, verb: Option<Verb>, resource: Option<&str>, times: usize, code: u16) {
        lock(&self.shared.faults).push(Fault {
            verb,
            resource: resource.map(str::to_string),
            remaining: times,
            code,
        });
    }

    /// Drops every pending injected failure.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Adds `latency` before every list page of `resource` (plural) is
    /// served: a large collection whose re-list takes long.
    pub fn set_list_latency(&self, resource: &str, latency: Duration) {
        lock(&self.shared.list_latency).insert(resource.to_string(), latency);
    }

    /// Adds `latency` before every request is handled.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }

    /// Ends every open watch stream (clients must re-watch or re-list).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|generation| *generation += 1);
    }

    /// Forgets the change history: re-watches from an old revision get 410 and must re-list.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Expires every revision handed out so far and drops all watches:
    /// every watcher's re-watch gets 410 Expired and it must re-list.
    pub fn force_relist(&self) {
        let revision = {
            let mut store = lock(&self.shared.store);
            store.expire_history();
            store.revision()
        };
        self.shared.revision.store(revision, Ordering::SeqCst);
        self.drop_watches();
    }

    /// The current resourceVersion.
    pub fn revision(&self) -> u64 {
        self.shared.revision.load(Ordering::SeqCst)
    }

    /// Every resource request so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests of `verb` on `resource` (plural) were served.
    pub fn count(&self, verb: Verb, resource: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .count()
    }

    /// How many writes (create, update, patch, delete) on `resource` were served.
    pub fn writes(&self, resource: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| {
                r.resource == resource
                    && matches!(
                        r.verb,
                        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection
                    )
            })
            .count()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        self.drop_watches();
        self.server.abort();
        self.side_server.abort();
    }
}

fn client_for(url: &str) -> kube::Client {
    let uri = match url.parse() {
        Ok(uri) => uri,
        Err(error) => panic!("double URL {url} is not a URI: {error}"),
    };
    match kube::Client::try_from(kube::Config::new(uri)) {
        Ok(client) => client,
        Err(error) => panic!("cannot build a client for the double: {error}"),
    }
}
