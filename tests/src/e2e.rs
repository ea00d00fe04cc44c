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
//!   `node-lifecycle-controller` (there are no kubelets: fake nodes stay
//!   Ready) and, unless [`Options::kcm_ephemeral`] asks for it,
//!   `ephemeral-volume-controller` (volplane's is under test);
//! - kube-scheduler runs with defaults.
//!
//! A test can cut clients off from the API server while the cluster goes
//! on: [`ControlPlane::start_second_api_server`] runs a second
//! kube-apiserver on the same etcd (see [`ControlPlane::second_client`]),
//! [`ControlPlane::kill_api_server`] kills the first with SIGKILL and
//! [`ControlPlane::restart_api_server`] brings it back on its old port with
//! its old certificate, so every client and kubeconfig of it reconnects.
//!
//! Every process is a [`Process`]: it dies with the test, also when the test
//! binary is killed. A watchdog fails every wait of the test at once, with
//! the tail of its log, when one of them exits. Everything is stopped and the
//! directory deleted when the [`ControlPlane`] is dropped, also when a test
//! fails (set `VOLPLANE_E2E_KEEP=1` to keep the directory and its logs);
//! directories of test binaries that were killed are removed by the next
//! start. Control planes in one test binary run one at a time.
//!
//! The e2e tests are marked `#[cfg_attr(not(volplane_e2e), ignore = ...)]`:
//! the build scripts of the test crates set `volplane_e2e` when
//! `VOLPLANE_E2E_BIN_DIR` is set at build time, so without it they are
//! listed as ignored, never as passed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};

use crate::process::Process;

/// Environment variable naming the directory with the control-plane binaries.
pub const BIN_DIR_ENV: &str = "VOLPLANE_E2E_BIN_DIR";

const TEMP_PREFIX: &str = "volplane-e2e-";

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The binaries directory from `VOLPLANE_E2E_BIN_DIR` (at run time, else
/// as it was at build time). Only e2e tests, which are ignored without it, call this.
pub fn bin_dir() -> PathBuf {
    std::env::var_os(BIN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| option_env!("VOLPLANE_E2E_BIN_DIR").map(PathBuf::from))
        .unwrap_or_else(|| panic!("{BIN_DIR_ENV} is not set"))
}

/// How often [`ControlPlane::start_with`] tries when a port was taken.
const START_ATTEMPTS: u32 = 3;

/// How long a kube-apiserver may take to answer `/readyz` with `ok`.
const API_SERVER_READY_LIMIT: Duration = Duration::from_secs(90);

/// How long [`ControlPlane::restart_api_server`] tries again while another
/// process holds the first API server's port.
const PORT_RETAKE_LIMIT: Duration = Duration::from_secs(30);

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `error` says a component could not bind its port.
fn port_taken(error: &anyhow::Error) -> bool {
    format!("{error:#}").contains("address already in use")
}

/// `name` in `bin_dir`, else on `PATH`.
pub fn find_binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
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

/// Removes the directories of earlier e2e runs whose test binary is gone
/// (killed before it could clean up).
fn remove_abandoned_directories() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// How the control plane is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep kube-controller-manager's own ephemeral-volume-controller on.
    pub kcm_ephemeral: bool,
    /// Write the API server's audit log (every request, metadata level);
    /// read it with [`ControlPlane::audit_log`].
    pub audit: bool,
    /// Ready the control plane for a real node ([`ControlPlane::start_node`]):
    /// the API server also listens on the pods' bridge (it binds every
    /// address, still serving its self-signed certificate, which names the
    /// `kubernetes` Service's IP), the ServiceAccount admission plugin is on
    /// (pods get tokens; a pod is refused until its namespace's `default`
    /// ServiceAccount exists), and kube-controller-manager runs its node
    /// lifecycle controller and publishes the API server's certificate as
    /// every namespace's `kube-root-ca.crt`.
    pub node: bool,
    /// kube-apiserver's `--runtime-config`, e.g.
    /// `storage.k8s.io/v1/csistoragecapacities=false`: an API server that
    /// lacks an API volplane needs.
    pub runtime_config: Option<&'static str>,
}

/// The processes of a control plane, watched for unexpected exits.
#[derive(Debug, Default)]
pub(crate) struct Processes {
    list: SyncMutex<Vec<Process>>,
    stopping: AtomicBool,
}

impl Processes {
    fn push(&self, process: Process) {
        if let Ok(mut list) = self.list.lock() {
            list.push(process);
        }
    }

    /// The first process that has exited, with its status and log tail.
    fn first_exit(&self) -> Option<String> {
        let mut list = self.list.lock().ok()?;
        list.iter_mut().find_map(|p| {
            let status = p.exited()?;
            Some(format!(
                "{} exited with {status}; last lines of its log:\n{}",
                p.name(),
                p.log_tail(30)
            ))
        })
    }

    /// Watches every 100 ms until stopped; on an exit, fails the test's waits.
    fn watch(self: Arc<Self>) {
        std::thread::spawn(move || {
            while !self.stopping.load(Ordering::Relaxed) {
                if let Some(message) = self.first_exit() {
                    if !self.stopping.load(Ordering::Relaxed) {
                        eprintln!("e2e: {message}");
                        crate::wait::fail_waits(format!("e2e control plane failed: {message}"));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }

    /// Takes process `name` out of the watched set: the watchdog, which
    /// looks only at the set, then takes its exit for no failure.
    fn take(&self, name: &str) -> Option<Process> {
        let mut list = self.list.lock().ok()?;
        let index = list.iter().position(|p| p.name() == name)?;
        Some(list.remove(index))
    }

    /// Takes process `name` out of the watched set (its exit is then no
    /// failure) and kills it.
    pub(crate) fn stop_one(&self, name: &str) -> bool {
        let Some(mut process) = self.take(name) else {
            return false;
        };
        process.kill();
        true
    }

    /// Kills everything, the last started first (etcd last).
    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Ok(mut list) = self.list.lock() {
            while let Some(mut process) = list.pop() {
                process.kill();
            }
        }
    }
}

/// A running control plane.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    bin_dir: PathBuf,
    processes: Arc<Processes>,
    url: String,
    token: String,
    kubeconfig: PathBuf,
    client: kube::Client,
    /// What every kube-apiserver of this plane is started with (set once etcd runs).
    api_setup: Option<ApiServerSetup>,
    /// The second kube-apiserver, once [`ControlPlane::start_second_api_server`] started it.
    second: OnceLock<SecondApiServer>,
    /// Whether a start of the second kube-apiserver is under way or done.
    second_claimed: AtomicBool,
    /// How often the first kube-apiserver was restarted (names its old logs).
    api_server_restarts: AtomicU32,
    _turn: MutexGuard<'static, ()>,
}

/// One of the control plane's kube-apiservers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiServer {
    /// The one [`ControlPlane::url`] names, which every component uses.
    First,
    /// The one [`ControlPlane::start_second_api_server`] adds.
    Second,
}

impl ApiServer {
    /// Its process name, which also names its log.
    fn name(self) -> &'static str {
        match self {
            Self::First => "kube-apiserver",
            Self::Second => "kube-apiserver-2",
        }
    }

    /// Its `--cert-dir`, in the control plane's directory.
    fn cert_dir(self) -> &'static str {
        match self {
            Self::First => "apiserver-certs",
            Self::Second => "apiserver-2-certs",
        }
    }

    /// Its audit log, in the control plane's directory.
    fn audit_log(self) -> &'static str {
        match self {
            Self::First => "audit.log",
            Self::Second => "audit-2.log",
        }
    }
}

/// The inputs of [`ControlPlane::api_server_args`].
#[derive(Debug, Clone)]
struct ApiServerSetup {
    etcd_url: String,
    keys: Credentials,
    options: Options,
}

/// The second kube-apiserver's address and admin access.
struct SecondApiServer {
    url: String,
    kubeconfig: PathBuf,
    client: kube::Client,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
    /// from `bin_dir` and waits until the API server is ready.
    pub async fn start(bin_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin_dir, Options::default()).await
    }

    /// [`ControlPlane::start`] with `options`. The ports are picked free,
    /// but another process may bind one before the component does (every
    /// outgoing connection of a parallel test takes one too): then the whole
    /// plane starts again on new ports, up to [`START_ATTEMPTS`] times.
    pub async fn start_with(bin_dir: &Path, options: Options) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(bin_dir, options.clone()).await {
                Err(error) if attempt < START_ATTEMPTS && port_taken(&error) => {
                    eprintln!("e2e: a port was taken before the control plane bound it; starting again on new ports");
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    async fn start_once(bin_dir: &Path, options: Options) -> anyhow::Result<Self> {
        let turn = ONE_AT_A_TIME.lock().await;
        crate::wait::clear_failure();
        remove_abandoned_directories();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let root = dir.path().to_path_buf();
        let api_port = free_port()?;
        let token = "volplane-e2e-admin-token".to_string();
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&url, &token))?;
        let processes = Arc::new(Processes::default());
        Arc::clone(&processes).watch();
        let mut plane = Self {
            dir: Some(dir),
            bin_dir: bin_dir.to_path_buf(),
            processes,
            url,
            token,
            kubeconfig,
            client: client_for(&root.join("kubeconfig")).await?,
            api_setup: None,
            second: OnceLock::new(),
            second_claimed: AtomicBool::new(false),
            api_server_restarts: AtomicU32::new(0),
            _turn: turn,
        };
        let keys = plane.write_credentials()?;
        let etcd_url = plane.start_etcd()?;
        if options.audit {
            std::fs::write(plane.audit_policy_path(), AUDIT_POLICY)?;
        }
        plane.api_setup = Some(ApiServerSetup {
            etcd_url,
            keys: keys.clone(),
            options: options.clone(),
        });
        plane
            .run_api_server(ApiServer::First, api_port, &plane.client, &plane.url)
            .await?;
        plane.start_controller_manager(&keys, &options)?;
        plane.start_scheduler()?;
        Ok(plane)
    }

    /// Writes the service-account key pair and the static token file.
    fn write_credentials(&self) -> anyhow::Result<Credentials> {
        // kube-apiserver 1.36 reads verification keys only as PEM public keys
        // (or RSA/EC private keys), not as PKCS#8: give it the public half.
        let key = rcgen::KeyPair::generate().context("generate the service-account key")?;
        let signing_key = self.root().join("sa.key");
        std::fs::write(&signing_key, key.serialize_pem())?;
        let public_key = self.root().join("sa.pub");
        std::fs::write(&public_key, key.public_key_pem())?;
        let tokens = self.root().join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{},volplane-e2e-admin,volplane-e2e-admin,system:masters\n", self.token),
        )?;
        Ok(Credentials {
            signing_key,
            public_key,
            tokens,
        })
    }

    fn start_etcd(&self) -> anyhow::Result<String> {
        let etcd_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        self.spawn(
            "etcd",
            &[
                "--name=volplane-e2e".into(),
                format!("--data-dir={}", self.root().join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=volplane-e2e={peer_url}"),
                "--unsafe-no-fsync=true".into(),
            ],
        )?;
        Ok(etcd_url)
    }

    /// kube-apiserver's arguments for `server` on `port`. Both servers get
    /// the same but for the port, the certificate directory and the audit
    /// log, and the second leaves the `kubernetes` Service's endpoints to
    /// the first (advertising the same address on another port, it would
    /// rewrite them in turn with the first).
    fn api_server_args(&self, server: ApiServer, port: u16) -> anyhow::Result<Vec<String>> {
        let setup = self
            .api_setup
            .as_ref()
            .context("kube-apiserver's arguments are asked for before etcd runs")?;
        let keys = &setup.keys;
        let mut args = vec![
            format!("--etcd-servers={}", setup.etcd_url),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", self.api_server_cert_dir(server).display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", keys.public_key.display()),
            format!("--service-account-signing-key-file={}", keys.signing_key.display()),
            format!("--token-auth-file={}", keys.tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
        ];
        if setup.options.audit {
            args.extend([
                format!("--audit-policy-file={}", self.audit_policy_path().display()),
                format!("--audit-log-path={}", self.audit_log_path(server).display()),
                "--audit-log-mode=blocking".to_string(),
            ]);
        }
        if setup.options.node {
            // Pods reach it on the bridge's gateway, through the `kubernetes`
            // Service's rule (see `node`); the endpoint it advertises for that
            // Service may not be a loopback address.
            args.push("--bind-address=0.0.0.0".into());
            args.push(format!("--advertise-address={}", crate::node::GATEWAY));
        } else {
            args.push("--bind-address=127.0.0.1".into());
            args.push("--advertise-address=127.0.0.1".into());
            // Without a kubelet nothing mounts tokens: pods need no ServiceAccount.
            args.push("--disable-admission-plugins=ServiceAccount".into());
        }
        if server == ApiServer::Second {
            args.push("--endpoint-reconciler-type=none".into());
        }
        if let Some(config) = setup.options.runtime_config {
            args.push(format!("--runtime-config={config}"));
        }
        Ok(args)
    }

    /// Starts kube-apiserver `server` on `port` and waits until it answers
    /// `/readyz` through `client` (of `url`); only then is it watched like
    /// the other processes, so a start that fails (a port taken) fails
    /// this call alone, with its log's tail, not every wait of the test.
    async fn run_api_server(
        &self,
        server: ApiServer,
        port: u16,
        client: &kube::Client,
        url: &str,
    ) -> anyhow::Result<()> {
        let name = server.name();
        let binary = find_binary(&self.bin_dir, "kube-apiserver")?;
        let args = self.api_server_args(server, port)?;
        let mut process = Process::spawn(name, &binary, &args, self.log_path(name))?;
        crate::wait::show_log_on_failure(name, process.log_path());
        self.wait_until_ready(&mut process, client, url, API_SERVER_READY_LIMIT)
            .await?;
        self.processes.push(process);
        Ok(())
    }

    /// The certificate directory of `server`, where it writes its self-signed serving certificate.
    fn api_server_cert_dir(&self, server: ApiServer) -> PathBuf {
        self.root().join(server.cert_dir())
    }

    fn audit_policy_path(&self) -> PathBuf {
        self.root().join("audit-policy.yaml")
    }

    fn audit_log_path(&self, server: ApiServer) -> PathBuf {
        self.root().join(server.audit_log())
    }

    /// Every request in the API server's audit log so far (started with
    /// [`Options::audit`]); a watch shows once its response has started.
    pub fn audit_log(&self) -> anyhow::Result<Vec<AuditRecord>> {
        read_audit_log(&self.audit_log_path(ApiServer::First))
    }

    /// [`ControlPlane::audit_log`] of the second kube-apiserver, which writes its own.
    pub fn second_audit_log(&self) -> anyhow::Result<Vec<AuditRecord>> {
        read_audit_log(&self.audit_log_path(ApiServer::Second))
    }

    fn start_controller_manager(&self, keys: &Credentials, options: &Options) -> anyhow::Result<()> {
        self.start_controller_manager_at(&self.kubeconfig, keys, options)
    }

    /// Moves kube-controller-manager to the second kube-apiserver (same
    /// controllers and keys): its garbage collector, PV controller and PV
    /// protection go on while the first is away, as they would in a
    /// cluster where the controller manager reaches another API server.
    pub fn move_controller_manager_to_second(&self) -> anyhow::Result<()> {
        let second = self.second.get().context("the second kube-apiserver is not running")?;
        let setup = self.api_setup.as_ref().context("the control plane is not set up")?;
        self.stop_controller_manager()?;
        self.start_controller_manager_at(&second.kubeconfig, &setup.keys, &setup.options)
    }

    fn start_controller_manager_at(
        &self,
        kubeconfig: &Path,
        keys: &Credentials,
        options: &Options,
    ) -> anyhow::Result<()> {
        // Fake nodes have no kubelet to renew their leases: the node
        // lifecycle controller would mark them NotReady. A real node does.
        let controllers = match (options.kcm_ephemeral, options.node) {
            (true, false) => "--controllers=*,-node-lifecycle-controller",
            (false, false) => "--controllers=*,-ephemeral-volume-controller,-node-lifecycle-controller",
            (true, true) => "--controllers=*",
            (false, true) => "--controllers=*,-ephemeral-volume-controller",
        };
        let kubeconfig = kubeconfig.display();
        let mut node_args = Vec::new();
        if options.node {
            node_args.push(format!("--root-ca-file={}", self.api_server_certificate().display()));
        }
        self.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kubeconfig}"),
                controllers.into(),
                "--leader-elect=false".into(),
                format!("--secure-port={}", free_port()?),
                "--bind-address=127.0.0.1".into(),
                format!("--service-account-private-key-file={}", keys.signing_key.display()),
                "--use-service-account-credentials=false".into(),
                "--cluster-name=volplane-e2e".into(),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
            ]
            .into_iter()
            .chain(node_args)
            .collect::<Vec<String>>(),
        )
    }

    /// The API server's self-signed serving certificate, followed by the CA
    /// that signed it (what in-cluster clients must trust).
    pub fn api_server_certificate(&self) -> PathBuf {
        self.api_server_cert_dir(ApiServer::First).join("apiserver.crt")
    }

    /// [`ControlPlane::api_server_certificate`] of the second kube-apiserver
    /// (its own, in its own certificate directory).
    pub fn second_api_server_certificate(&self) -> PathBuf {
        self.api_server_cert_dir(ApiServer::Second).join("apiserver.crt")
    }

    /// The port the API server serves on.
    pub fn api_port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or(443)
    }

    fn start_scheduler(&self) -> anyhow::Result<()> {
        let kubeconfig = self.kubeconfig.display();
        self.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                format!("--secure-port={}", free_port()?),
                "--bind-address=127.0.0.1".into(),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
            ],
        )
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), |d| d.path())
    }

    /// Starts a control-plane component `name` from the binaries directory;
    /// its exit fails the test.
    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<()> {
        let binary = find_binary(&self.bin_dir, name)?;
        let process = Process::spawn(name, &binary, args, self.log_path(name))?;
        self.watch_process(process);
        Ok(())
    }

    /// Adds `process` to the control plane's: its exit fails every wait of
    /// the test, and every wait that times out shows its log's tail.
    pub(crate) fn watch_process(&self, process: Process) {
        crate::wait::show_log_on_failure(process.name(), process.log_path());
        self.processes.push(process);
    }

    /// The watched processes (the node stops its own).
    pub(crate) fn processes(&self) -> Arc<Processes> {
        Arc::clone(&self.processes)
    }

    /// Starts `binary` (a name in the binaries directory, or a path) as a
    /// helper of the test, logging into the control plane's directory.
    /// Unlike the control plane itself, it may exit: the test owns it.
    pub fn start_process(&self, name: &str, binary: &str, args: &[String]) -> anyhow::Result<Process> {
        let program = if binary.contains('/') {
            PathBuf::from(binary)
        } else {
            find_binary(&self.bin_dir, binary)?
        };
        Process::spawn(name, &program, args, self.log_path(name))
    }

    /// [`ControlPlane::start_process`], and its log shown by every wait that
    /// times out (the test still owns it: its exit fails nothing).
    pub(crate) fn start_registered_process(
        &self,
        name: &str,
        binary: &str,
        args: &[String],
    ) -> anyhow::Result<Process> {
        let process = self.start_process(name, binary, args)?;
        crate::wait::show_log_on_failure(name, process.log_path());
        Ok(process)
    }

    /// The log file of the process started as `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root().join(format!("{name}.log"))
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        crate::process::log_tail(&self.log_path(name), lines)
    }

    /// The binaries directory.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs the shipped `kubectl` with the admin kubeconfig and `args`.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let kubectl = find_binary(&self.bin_dir, "kubectl")?;
        let mut command = std::process::Command::new(kubectl);
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        let output = crate::process::dies_with_test(&mut command)
            .stdin(std::process::Stdio::null())
            .output()
            .context("run kubectl")?;
        Ok(output)
    }

    /// Runs kubectl and returns its stdout; fails with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.kubectl(args)?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits until kube-apiserver `process` (not watched yet) answers
    /// `/readyz` at `url` with `ok` through `client`; fails when it or a
    /// watched process exits, or after `limit`, with their logs' tails.
    async fn wait_until_ready(
        &self,
        process: &mut Process,
        client: &kube::Client,
        url: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let name = process.name().to_string();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = process.exited() {
                bail!(
                    "while starting {name}: it exited with {status}; last lines of its log:\n{}",
                    process.log_tail(30)
                );
            }
            if let Some(exit) = self.processes.first_exit() {
                bail!("while starting {name}: {exit}");
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            let answer = tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await;
            // Still running: the answer is its own, not another server's
            // that took the port it failed to bind.
            if let Ok(Ok(text)) = answer
                && text.trim() == "ok"
                && process.exited().is_none()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let mut message = format!("{name} at {url} not ready within {limit:?}");
                let _ = write!(message, "\n--- {name}\n{}", process.log_tail(30));
                let _ = write!(message, "\n--- etcd\n{}", self.log_tail("etcd", 10));
                bail!(message);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A new admin client with its own connections (for parallel load).
    pub async fn new_client(&self) -> anyhow::Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    /// Stops the control plane's own kube-controller-manager (for a restart
    /// with other flags through [`ControlPlane::start_controller_manager_with`]).
    pub fn stop_controller_manager(&self) -> anyhow::Result<()> {
        if !self.processes.stop_one("kube-controller-manager") {
            bail!("kube-controller-manager is not running");
        }
        Ok(())
    }

    /// Starts a second kube-apiserver on the same etcd, with the first's
    /// arguments but its own port and certificate directory, and waits until it is ready.
    ///
    /// Its exit fails every wait of the test, like the other processes'. It
    /// shares the first's credentials ([`ControlPlane::token`]); reach it
    /// through [`ControlPlane::second_client`] or
    /// [`ControlPlane::second_kubeconfig`].
    pub async fn start_second_api_server(&self) -> anyhow::Result<()> {
        if self.second_claimed.swap(true, Ordering::SeqCst) {
            bail!("the second kube-apiserver was already started");
        }
        match self.launch_second_api_server().await {
            Ok(second) => {
                // Only the call that claimed it gets here: the cell is empty.
                let _ = self.second.set(second);
                Ok(())
            }
            Err(error) => {
                self.second_claimed.store(false, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// Starts the second kube-apiserver on a free port, on new ones while
    /// a port is taken before it binds it (up to [`START_ATTEMPTS`] times).
    async fn launch_second_api_server(&self) -> anyhow::Result<SecondApiServer> {
        let kubeconfig = self.root().join("kubeconfig-2");
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let url = format!("https://127.0.0.1:{port}");
            std::fs::write(&kubeconfig, kubeconfig_text(&url, &self.token))
                .with_context(|| format!("write {}", kubeconfig.display()))?;
            let client = client_for(&kubeconfig).await?;
            match self.run_api_server(ApiServer::Second, port, &client, &url).await {
                Err(error) if attempt < START_ATTEMPTS && port_taken(&error) => {
                    eprintln!("e2e: port {port} was taken before the second kube-apiserver bound it; trying another");
                    attempt += 1;
                }
                Err(error) => return Err(error.context("start the second kube-apiserver")),
                Ok(()) => {
                    return Ok(SecondApiServer {
                        url,
                        kubeconfig,
                        client,
                    });
                }
            }
        }
    }

    fn second_api_server(&self) -> anyhow::Result<&SecondApiServer> {
        self.second
            .get()
            .context("the second kube-apiserver was not started (ControlPlane::start_second_api_server)")
    }

    /// An admin client of the second kube-apiserver (the token of [`ControlPlane::client`]).
    pub fn second_client(&self) -> anyhow::Result<kube::Client> {
        Ok(self.second_api_server()?.client.clone())
    }

    /// The admin kubeconfig file of the second kube-apiserver.
    pub fn second_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        Ok(self.second_api_server()?.kubeconfig.clone())
    }

    /// The second kube-apiserver's URL.
    pub fn second_url(&self) -> anyhow::Result<String> {
        Ok(self.second_api_server()?.url.clone())
    }

    /// Kills the first kube-apiserver with SIGKILL and reaps it; that exit fails no wait.
    ///
    /// Its clients see their connections break and new ones refused until
    /// [`ControlPlane::restart_api_server`]; the second one, if started,
    /// keeps serving the cluster.
    pub fn kill_api_server(&self) -> anyhow::Result<()> {
        let name = ApiServer::First.name();
        // Out of the watched set before it dies: the watchdog never sees the exit.
        let mut process = self
            .processes
            .take(name)
            .with_context(|| format!("{name} is not running (killed already?)"))?;
        let pid = process.pid();
        process.kill();
        if process.exited().is_none() {
            bail!("{name} (pid {pid}) did not end after SIGKILL");
        }
        Ok(())
    }

    /// Starts the first kube-apiserver again (killing it first if it runs)
    /// with its old arguments, port and certificate, and waits until it is ready.
    ///
    /// Every client and kubeconfig of [`ControlPlane::url`] reconnects to
    /// it. Its watch cache starts fresh from etcd: watches resumed from
    /// before get "410 Gone". The log of the run that ended is kept as
    /// `kube-apiserver.before-restart-<n>.log`. While another process holds
    /// the port, it tries again for up to [`PORT_RETAKE_LIMIT`].
    pub async fn restart_api_server(&self) -> anyhow::Result<()> {
        let name = ApiServer::First.name();
        self.processes.stop_one(name);
        let restart = self.api_server_restarts.fetch_add(1, Ordering::SeqCst) + 1;
        let log = self.log_path(name);
        if log.exists() {
            let kept = self.root().join(format!("{name}.before-restart-{restart}.log"));
            std::fs::rename(&log, &kept).with_context(|| format!("move {} to {}", log.display(), kept.display()))?;
        }
        let port = self.api_port();
        // A client with no connections from before the kill.
        let client = client_for(&self.kubeconfig).await?;
        let deadline = tokio::time::Instant::now() + PORT_RETAKE_LIMIT;
        loop {
            match self.run_api_server(ApiServer::First, port, &client, &self.url).await {
                Err(error) if port_taken(&error) && tokio::time::Instant::now() < deadline => {
                    eprintln!("e2e: port {port} of {name} is taken by another process; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error.context(format!("restart {name} on port {port}"))),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// The service-account signing key kube-controller-manager is given.
    pub fn service_account_key(&self) -> PathBuf {
        self.root().join("sa.key")
    }

    /// Starts an extra kube-controller-manager running only `controllers`,
    /// with `extra` flags (e.g. `--kube-api-qps=200`), as a test helper.
    pub fn start_controller_manager_with(
        &self,
        name: &str,
        controllers: &str,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        let kubeconfig = self.kubeconfig.display();
        let mut args = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--controllers={controllers}"),
            "--leader-elect=false".into(),
            format!("--secure-port={}", free_port()?),
            "--bind-address=127.0.0.1".into(),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        self.start_process(name, "kube-controller-manager", &args)
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

/// Every request at metadata level; a watch is logged when its response
/// starts, so watches still open are seen.
const AUDIT_POLICY: &str =
    "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n";

/// The requests in the audit log at `path`.
fn read_audit_log(path: &Path) -> anyhow::Result<Vec<AuditRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read the audit log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|event| AuditRecord::of(&event))
        .collect())
}

/// One request from the API server's audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// `get`, `list`, `watch`, `create`, …
    pub verb: String,
    /// Who asked, e.g. `system:serviceaccount:volplane:volplane-capacity-node`.
    pub user: String,
    /// The client's `User-Agent`, e.g. `volplane/0.1.0 (…)`.
    pub user_agent: String,
    /// The resource's plural.
    pub resource: String,
    /// The namespace in the request, if any.
    pub namespace: Option<String>,
    /// The object's name, if the request named one.
    pub name: Option<String>,
    /// The request's `labelSelector`, if any.
    pub label_selector: Option<String>,
    /// The request's `fieldSelector`, if any.
    pub field_selector: Option<String>,
    /// The response's HTTP status code.
    pub code: Option<u16>,
}

impl AuditRecord {
    fn of(event: &serde_json::Value) -> Self {
        let text = |value: &serde_json::Value| value.as_str().map(str::to_string);
        let uri = event["requestURI"].as_str().unwrap_or_default();
        let query = uri.split_once('?').map_or("", |(_, query)| query);
        let parameter = |key: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, v)| k == key && !v.is_empty())
                .map(|(_, v)| v.into_owned())
        };
        Self {
            verb: text(&event["verb"]).unwrap_or_default(),
            user: text(&event["user"]["username"]).unwrap_or_default(),
            user_agent: text(&event["userAgent"]).unwrap_or_default(),
            resource: text(&event["objectRef"]["resource"]).unwrap_or_default(),
            namespace: text(&event["objectRef"]["namespace"]),
            name: text(&event["objectRef"]["name"]),
            label_selector: parameter("labelSelector"),
            field_selector: parameter("fieldSelector"),
            code: event["responseStatus"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok()),
        }
    }

    /// Whether the request changed something.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// A list or watch of a whole collection: no name, no label or field
    /// selector.
    pub fn is_unselected_read(&self) -> bool {
        matches!(self.verb.as_str(), "list" | "watch")
            && self.name.is_none()
            && self.label_selector.is_none()
            && self.field_selector.is_none()
    }
}

/// The files [`ControlPlane::write_credentials`] wrote.
#[derive(Debug, Clone)]
struct Credentials {
    signing_key: PathBuf,
    public_key: PathBuf,
    tokens: PathBuf,
}

impl ControlPlane {
    /// Sets node `name`'s Ready condition to `status` (`True`, `False`,
    /// `Unknown`) with `reason`, as changed at `since` — what a kubelet, or
    /// its silence, would report.
    pub async fn set_node_ready(
        &self,
        name: &str,
        status: &str,
        reason: &str,
        since: std::time::SystemTime,
    ) -> anyhow::Result<()> {
        let since = humantime::format_rfc3339_seconds(since).to_string();
        Api::<Node>::all(self.client())
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": status,
                    "reason": reason, "lastTransitionTime": since, "lastHeartbeatTime": since}]}})),
            )
            .await
            .with_context(|| format!("set node {name} Ready={status}"))?;
        Ok(())
    }

    /// A fake node whose topology label and CSINode match hostpathplugin's for `name`.
    pub async fn add_hostpath_node(&self, name: &str) -> anyhow::Result<()> {
        let labels = BTreeMap::from([(HostPath::TOPOLOGY_KEY.to_string(), name.to_string())]);
        self.add_node(name, &labels, Some((HostPath::DRIVER, &[HostPath::TOPOLOGY_KEY])))
            .await
    }

    /// hostpathplugin's CSIDriver with `storageCapacity: true` and two
    /// WaitForFirstConsumer StorageClasses, `fast` and `slow`, selecting its
    /// pools of those names.
    pub async fn create_hostpath_classes(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
        let driver: CSIDriver = serde_json::from_value(
            json!({"metadata": {"name": HostPath::DRIVER}, "spec": {"storageCapacity": true, "attachRequired": false}}),
        )?;
        Api::<CSIDriver>::all(self.client())
            .create(&PostParams::default(), &driver)
            .await
            .context("create the CSIDriver")?;
        for kind in ["fast", "slow"] {
            let class: StorageClass = serde_json::from_value(json!({"metadata": {"name": kind},
                "provisioner": HostPath::DRIVER, "volumeBindingMode": "WaitForFirstConsumer",
                "parameters": {"kind": kind}}))?;
            Api::<StorageClass>::all(self.client())
                .create(&PostParams::default(), &class)
                .await
                .with_context(|| format!("create StorageClass {kind}"))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("second_url", &self.second.get().map(|second| &second.url))
            .field("dir", &self.dir.as_ref().map(|d| d.path().to_path_buf()))
            .finish()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.processes.stop();
        crate::wait::clear_failure();
        crate::wait::forget_logs();
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

/// The real CSI driver `hostpathplugin` (csi-driver-host-path) for one node.
#[derive(Debug)]
pub struct HostPath {
    node: String,
    socket: PathBuf,
    state_dir: PathBuf,
    process: Process,
}

impl HostPath {
    /// The driver name hostpathplugin registers.
    pub const DRIVER: &'static str = "hostpath.csi.k8s.io";
    /// The topology key of its NodeGetInfo, valued with the node name.
    pub const TOPOLOGY_KEY: &'static str = "topology.hostpath.csi/node";

    /// The node it serves.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The socket address, as volplane's `--csi-address` takes it.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the driver keeps its volumes: one directory per volume id.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Whether the driver process has ended.
    pub fn exited(&mut self) -> bool {
        self.process.exited().is_some()
    }

    /// Kills the driver and removes its socket, as a driver pod that is
    /// gone leaves its clients.
    pub fn vanish(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl ControlPlane {
    /// Starts hostpathplugin for `node` with pools `capacities` (`kind` →
    /// quantity, e.g. `("fast", "100Gi")`), serving on a socket in the
    /// control plane's directory, and waits for its socket.
    pub async fn start_hostpath(&self, node: &str, capacities: &[(&str, &str)]) -> anyhow::Result<HostPath> {
        let dir = self.scratch(&format!("hostpath-{node}"))?;
        let socket = dir.join("csi.sock");
        let state_dir = dir.join("state");
        self.run_hostpath(node, socket, state_dir, capacities).await
    }

    /// Starts the shipped `csi-provisioner` as `name` against `driver`, with
    /// `NAMESPACE` (where it writes CSIStorageCapacity objects) and `extra`
    /// arguments, e.g. `--enable-capacity`.
    pub fn start_csi_provisioner(
        &self,
        name: &str,
        driver: &HostPath,
        namespace: &str,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        self.start_csi_provisioner_as(name, driver, &self.kubeconfig, &[("NAMESPACE", namespace)], extra)
    }

    /// [`ControlPlane::start_csi_provisioner`] with another `kubeconfig`
    /// (another identity) and environment `env` (e.g. `NODE_NAME` for
    /// `--node-deployment`).
    pub fn start_csi_provisioner_as(
        &self,
        name: &str,
        driver: &HostPath,
        kubeconfig: &Path,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        let binary = find_binary(&self.bin_dir, "csi-provisioner")?;
        let mut command = std::process::Command::new(binary);
        command
            .envs(env.iter().copied())
            .arg(format!("--csi-address={}", driver.socket().display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(extra);
        Process::spawn_command(name, command, self.log_path(name))
    }

    /// Stops `driver` and starts it again on the same socket and state with
    /// new `capacities`, as a driver upgrade or node restart would.
    pub async fn restart_hostpath(&self, driver: HostPath, capacities: &[(&str, &str)]) -> anyhow::Result<HostPath> {
        let HostPath {
            node,
            socket,
            state_dir,
            mut process,
        } = driver;
        process.kill();
        self.run_hostpath(&node, socket, state_dir, capacities).await
    }

    pub(crate) async fn run_hostpath(
        &self,
        node: &str,
        socket: PathBuf,
        state_dir: PathBuf,
        capacities: &[(&str, &str)],
    ) -> anyhow::Result<HostPath> {
        let _ = std::fs::remove_file(&socket);
        let mut args = vec![
            format!("--endpoint=unix://{}", socket.display()),
            format!("--nodeid={node}"),
            format!("--statedir={}", state_dir.display()),
        ];
        args.extend(
            capacities
                .iter()
                .map(|(kind, size)| format!("--capacity={kind}={size}")),
        );
        let name = format!("hostpathplugin-{node}");
        let mut process = self.start_process(&name, "hostpathplugin", &args)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = process.exited() {
                bail!("{name} exited with {status}:\n{}", process.log_tail(30));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} did not create {} within 30s", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(HostPath {
            node: node.to_string(),
            socket,
            state_dir,
            process,
        })
    }
}
