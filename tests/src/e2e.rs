//! The e2e harness: a throwaway Kubernetes control plane on loopback.
//!
//! When `VOLPLANE_E2E_BIN_DIR` names a directory holding `etcd` (or etcd is
//! on `PATH`), `kube-apiserver`, `kube-controller-manager` and
//! `kube-scheduler`, [`ControlPlane::start`] runs them in a temporary
//! directory on free 127.0.0.1 ports:
//!
//! - it generates a service-account signing key, a static admin token
//!   (group `system:masters`) and a kubeconfig;
//! - kube-apiserver serves with RBAC authorization and its own self-signed
//!   certificate; the ServiceAccount admission plugin is off so pods can be
//!   created the moment a namespace exists;
//! - kube-controller-manager runs every controller except
//!   `ephemeral-volume-controller` (volplane's is under test) and
//!   `node-lifecycle-controller` (there are no kubelets: fake nodes stay Ready);
//! - kube-scheduler runs with defaults.
//!
//! Everything is stopped and deleted when the [`ControlPlane`] is dropped,
//! also when a test fails (set `VOLPLANE_E2E_KEEP=1` to keep the directory
//! and its logs). Control planes in one test binary run one at a time.
//!
//! Without `VOLPLANE_E2E_BIN_DIR`, [`bin_dir_or_skip`] prints one line saying
//! the test was skipped and why, and the test passes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, MutexGuard};

/// Environment variable naming the directory with the control-plane binaries.
pub const BIN_DIR_ENV: &str = "VOLPLANE_E2E_BIN_DIR";
/// Optional: a real CSI driver binary to use instead of the test driver.
pub const CSI_DRIVER_ENV: &str = "VOLPLANE_E2E_CSI_DRIVER";
/// Optional: arguments for that driver; `{endpoint}` and `{node}` are replaced.
pub const CSI_DRIVER_ARGS_ENV: &str = "VOLPLANE_E2E_CSI_DRIVER_ARGS";

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The binaries directory, or `None` after printing why `test` is skipped.
pub fn bin_dir_or_skip(test: &str) -> Option<PathBuf> {
    match std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            // Written to stderr directly, not through print!, so the test
            // runner's output capture does not hide it.
            let _ = writeln!(
                std::io::stderr(),
                "skipped e2e test {test}: {BIN_DIR_ENV} is not set (point it at a directory with etcd, \
                 kube-apiserver, kube-controller-manager and kube-scheduler to run it)"
            );
            None
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let candidate = bin_dir.join(name);
    if candidate.is_file() {
        return Ok(candidate);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("{name} not found in {} or on PATH", bin_dir.display())
}

/// A running control plane.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    processes: Vec<(String, Child)>,
    url: String,
    token: String,
    kubeconfig: PathBuf,
    client: kube::Client,
    _turn: MutexGuard<'static, ()>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
    /// from `bin_dir` and waits until the API server is ready.
    pub async fn start(bin_dir: &Path) -> anyhow::Result<Self> {
        let turn = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::Builder::new().prefix("volplane-e2e-").tempdir()?;
        let root = dir.path().to_path_buf();
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let token = "volplane-e2e-admin-token".to_string();

        let key = rcgen::KeyPair::generate().context("generate the service-account key")?;
        let sa_key = root.join("sa.key");
        std::fs::write(&sa_key, key.serialize_pem())?;
        let tokens = root.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{token},volplane-e2e-admin,volplane-e2e-admin,system:masters\n"),
        )?;
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&url, &token))?;

        let mut plane = Self {
            dir: Some(dir),
            processes: Vec::new(),
            url: url.clone(),
            token,
            kubeconfig: kubeconfig.clone(),
            client: client_for(&kubeconfig).await?,
            _turn: turn,
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        plane.spawn(
            "etcd",
            &find_binary(bin_dir, "etcd")?,
            &[
                "--name=volplane-e2e".into(),
                format!("--data-dir={}", root.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=volplane-e2e={peer_url}"),
            ],
        )?;
        plane.spawn(
            "kube-apiserver",
            &find_binary(bin_dir, "kube-apiserver")?,
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", root.join("apiserver-certs").display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", sa_key.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!("--token-auth-file={}", tokens.display()),
                "--authorization-mode=RBAC".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=true".into(),
            ],
        )?;
        plane.wait_until_ready(Duration::from_secs(90)).await?;

        let kcm_port = free_port()?;
        plane.spawn(
            "kube-controller-manager",
            &find_binary(bin_dir, "kube-controller-manager")?,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                "--controllers=*,-ephemeral-volume-controller,-node-lifecycle-controller".into(),
                "--leader-elect=false".into(),
                format!("--secure-port={kcm_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--service-account-private-key-file={}", sa_key.display()),
                "--use-service-account-credentials=false".into(),
                "--cluster-name=volplane-e2e".into(),
                format!("--authentication-kubeconfig={}", kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kubeconfig.display()),
            ],
        )?;
        let scheduler_port = free_port()?;
        plane.spawn(
            "kube-scheduler",
            &find_binary(bin_dir, "kube-scheduler")?,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                format!("--secure-port={scheduler_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--authentication-kubeconfig={}", kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kubeconfig.display()),
            ],
        )?;
        Ok(plane)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), |d| d.path())
    }

    fn spawn(&mut self, name: &str, binary: &Path, args: &[String]) -> anyhow::Result<()> {
        let log_path = self.root().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        self.processes.push((name.to_string(), child));
        Ok(())
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.root().join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn wait_until_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            for (name, child) in &mut self.processes {
                if let Some(status) = child.try_wait()? {
                    let name = name.clone();
                    bail!(
                        "{name} exited with {status} while starting:\n{}",
                        self.log_tail(&name, 30)
                    );
                }
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(text) = self.client.request_text(request).await
                && text.trim() == "ok"
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let mut message = format!("kube-apiserver at {} not ready within {limit:?}", self.url);
                let _ = write!(message, "\n--- kube-apiserver\n{}", self.log_tail("kube-apiserver", 30));
                let _ = write!(message, "\n--- etcd\n{}", self.log_tail("etcd", 10));
                bail!(message);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// An admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin kubeconfig file (for running the volplane binary).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Creates every object in the YAML file `path` (namespaced ones in
    /// `namespace`), as `kubectl create -n <namespace> -f` would.
    pub async fn create_from_file(&self, path: &Path, namespace: &str) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).with_context(|| format!("parse {}", path.display()))?;
        for document in documents {
            let (group, version) = match document["apiVersion"].as_str().unwrap_or_default().split_once('/') {
                Some((group, version)) => (group.to_string(), version.to_string()),
                None => (
                    String::new(),
                    document["apiVersion"].as_str().unwrap_or_default().to_string(),
                ),
            };
            let kind = document["kind"].as_str().unwrap_or_default().to_string();
            let gvk = kube::core::GroupVersionKind::gvk(&group, &version, &kind);
            let (resource, capabilities) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .with_context(|| format!("{}: unknown kind {kind}", path.display()))?;
            let object: kube::api::DynamicObject = serde_json::from_value(document)?;
            let api: Api<kube::api::DynamicObject> = match capabilities.scope {
                kube::discovery::Scope::Namespaced => Api::namespaced_with(self.client(), namespace, &resource),
                kube::discovery::Scope::Cluster => Api::all_with(self.client(), &resource),
            };
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("{}: create {kind} {:?}", path.display(), object.metadata.name))?;
        }
        Ok(())
    }

    /// A kubeconfig that authenticates as the ServiceAccount
    /// `namespace/name` with a token from the TokenRequest API (not admin).
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request: TokenRequest =
            serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))?;
        let issued = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
        let token = issued.status.map(|s| s.token).context("TokenRequest without a token")?;
        let path = self.scratch("kubeconfigs")?.join(format!("{namespace}-{name}"));
        std::fs::write(
            &path,
            kubeconfig_text(&self.url, &token).replace("namespace: default", &format!("namespace: {namespace}")),
        )?;
        Ok(path)
    }

    /// A scratch directory inside the control plane's temporary directory.
    pub fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.root().join(name);
        std::fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// Registers a fake node: Ready, untainted, with room for pods and a
    /// CSINode listing `driver` with `topology_keys` (when a driver is given).
    pub async fn add_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        driver: Option<(&str, &[&str])>,
    ) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client());
        let mut all_labels = labels.clone();
        all_labels.insert("kubernetes.io/hostname".into(), name.into());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": all_labels},
            "spec": {}
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .context("create node")?;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "fake node", "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"}
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .context("mark node ready")?;
        // Node admission taints new nodes not-ready; without a kubelet nothing clears it.
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": null}})),
            )
            .await
            .context("clear node taints")?;
        if let Some((driver, keys)) = driver {
            let csinodes: Api<CSINode> = Api::all(self.client());
            let csinode: CSINode = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"drivers": [{"name": driver, "nodeID": name, "topologyKeys": keys}]}
            }))?;
            csinodes
                .create(&PostParams::default(), &csinode)
                .await
                .context("create CSINode")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir.as_ref().map(|d| d.path().to_path_buf()))
            .field(
                "processes",
                &self.processes.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stop in reverse order of start: etcd last.
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.start_kill();
        }
        for (_, child) in self.processes.iter_mut().rev() {
            if let Some(pid) = child.id() {
                // Reap synchronously so no process outlives the test.
                let _ = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("while kill -0 {pid} 2>/dev/null; do sleep 0.05; done"))
                    .status();
            }
        }
        if std::env::var_os("VOLPLANE_E2E_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            println!("kept e2e directory {}", kept.display());
        }
    }
}

fn kubeconfig_text(url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
         users:\n- name: admin\n  user:\n    token: {token}\n\
         contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\n    namespace: default\n\
         current-context: e2e\n"
    )
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A real CSI driver binary named by `VOLPLANE_E2E_CSI_DRIVER`, if any:
/// the program and its arguments for `endpoint` and `node`.
pub fn real_csi_driver(endpoint: &str, node: &str) -> Option<(PathBuf, Vec<String>)> {
    let binary = std::env::var_os(CSI_DRIVER_ENV).filter(|v| !v.is_empty())?;
    let template =
        std::env::var(CSI_DRIVER_ARGS_ENV).unwrap_or_else(|_| "--endpoint={endpoint} --nodeid={node}".into());
    let args = template
        .split_whitespace()
        .map(|a| a.replace("{endpoint}", endpoint).replace("{node}", node))
        .collect();
    Some((PathBuf::from(binary), args))
}
