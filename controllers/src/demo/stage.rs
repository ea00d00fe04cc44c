//! The stage: the in-process API server with the cluster's objects, the
//! simulated CSI drivers, and volplane itself — child processes of this
//! binary started with production flags, as a DaemonSet and a Deployment
//! would start them.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use volplane_csi::ControllerCapability;
use volplane_tests::apiserver::ApiServerDouble;
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, labels};

use super::script::{self, CLASSES, DRIVER, NODES, NodeSpace, TOPOLOGY_KEY, VOLPLANE_NAMESPACE};

/// How long a volplane process may take to report ready.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long a volplane process may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// The capacity poll interval of the demo's per-node instances.
pub const CAPACITY_POLL: Duration = Duration::from_secs(5);
/// The health check interval of the demo's controller-side instance.
pub const HEALTH_CHECK: Duration = Duration::from_secs(2);

/// The controller-side instance's pod name (its Lease identity begins with it).
pub const CONTROLLER_POD: &str = "volplane-controller";

/// The API server, the cluster's objects and the drivers.
pub struct Stage {
    /// The demo's directory.
    pub dir: PathBuf,
    /// The kubeconfig of the double.
    pub kubeconfig: PathBuf,
    /// The in-process API server.
    pub double: ApiServerDouble,
    /// A client of it.
    pub client: kube::Client,
    /// Each node's driver instance, in the order of [`NODES`].
    pub node_drivers: Vec<TestDriver>,
    /// The driver instance of the controller side (volumes and their health).
    pub controller_driver: TestDriver,
    _lock: File,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("dir", &self.dir)
            .field("double", &self.double)
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Takes `dir` for this demo, starts the API server with the cluster's
    /// objects and the drivers.
    pub async fn build(dir: &Path) -> anyhow::Result<Self> {
        let lock = take_directory(dir)?;
        let double = ApiServerDouble::start()
            .await
            .context("cannot start the in-process API server")?;
        double.enable_garbage_collection(true);
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, double.kubeconfig())
            .with_context(|| format!("cannot write {}", kubeconfig.display()))?;
        let client = double.client();
        create_cluster(&client).await?;
        let sockets = dir.join("csi");
        let mut node_drivers = Vec::new();
        for node in NODES {
            node_drivers.push(start_node_driver(&sockets, node).await?);
        }
        let controller_driver = start_driver(&sockets.join("controller.sock"), controller_driver_config()).await?;
        Ok(Self {
            dir: dir.to_path_buf(),
            kubeconfig,
            double,
            client,
            node_drivers,
            controller_driver,
            _lock: lock,
        })
    }

    /// The driver instance on `node`.
    pub fn node_driver(&self, node: &str) -> Option<&TestDriver> {
        NODES
            .iter()
            .position(|n| n.name == node)
            .and_then(|i| self.node_drivers.get(i))
    }
}

/// Creates `dir` with its `csi/` and `logs/` folders and locks it, so two
/// demos never share sockets; stale sockets and logs of an earlier run go.
fn take_directory(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock_path = dir.join("demo.lock");
    let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another volplane demo is running in {}; stop it, or give this one its own --dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    for folder in ["csi", "logs"] {
        let path = dir.join(folder);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot clear {}", path.display()))?;
        }
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
    }
    Ok(lock)
}

async fn create<K>(api: Api<K>, value: serde_json::Value) -> anyhow::Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(value)?;
    let name = object.meta().name.clone().unwrap_or_default();
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("cannot create {} {name}", K::kind(&())))?;
    Ok(())
}

/// The namespace of volplane's objects, the nodes (labelled with their
/// topology), the driver's CSIDriver with `storageCapacity: true`, and its
/// WaitForFirstConsumer classes.
async fn create_cluster(client: &kube::Client) -> anyhow::Result<()> {
    create(
        Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": VOLPLANE_NAMESPACE}}),
    )
    .await?;
    for node in NODES {
        create(
            Api::<Node>::all(client.clone()),
            json!({"metadata": {"name": node.name,
                                "labels": {TOPOLOGY_KEY: node.name, "kubernetes.io/hostname": node.name}}}),
        )
        .await?;
    }
    create(
        Api::<CSIDriver>::all(client.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true, "attachRequired": false}}),
    )
    .await?;
    for class in CLASSES {
        create(
            Api::<StorageClass>::all(client.clone()),
            json!({"metadata": {"name": class.name}, "provisioner": DRIVER,
                   "parameters": {"type": class.media}, "volumeBindingMode": "WaitForFirstConsumer"}),
        )
        .await?;
    }
    Ok(())
}

async fn start_driver(socket: &Path, config: DriverConfig) -> anyhow::Result<TestDriver> {
    TestDriver::start_at(socket, config)
        .await
        .with_context(|| format!("cannot start the simulated CSI driver at {}", socket.display()))
}

/// A node's driver instance: it reports its node in `NodeGetInfo` and
/// answers GetCapacity per class for its own topology.
async fn start_node_driver(sockets: &Path, node: NodeSpace) -> anyhow::Result<TestDriver> {
    let topology = labels([(TOPOLOGY_KEY, node.name)]);
    let config = DriverConfig {
        name: DRIVER.into(),
        vendor_version: "demo".into(),
        node_id: node.name.into(),
        node_topology: Some(topology),
        ..DriverConfig::default()
    };
    let driver = start_driver(&sockets.join(format!("{}.sock", node.name)), config).await?;
    for (class, free) in CLASSES.iter().zip(node.free_gib) {
        set_free(&driver, node, class.media, free);
    }
    Ok(driver)
}

/// Makes `driver` (on `node`) report `free_gib` for the class of `media`.
pub fn set_free(driver: &TestDriver, node: NodeSpace, media: &str, free_gib: i64) {
    driver.set_capacity(
        Some(labels([(TOPOLOGY_KEY, node.name)])),
        Some(labels([("type", media)])),
        CapacityAnswer::available(script::gib(free_gib)),
    );
}

/// The controller side: ControllerGetVolume with volume conditions.
fn controller_driver_config() -> DriverConfig {
    DriverConfig {
        name: DRIVER.into(),
        vendor_version: "demo".into(),
        controller_capabilities: vec![ControllerCapability::GetVolume, ControllerCapability::VolumeCondition],
        node_id: "controller".into(),
        ..DriverConfig::default()
    }
}

/// One volplane process.
#[derive(Debug)]
pub struct Instance {
    /// Its name in the narration and its log file's.
    pub name: String,
    /// What it runs, in words.
    pub role: String,
    /// Its flags (the kubeconfig aside).
    pub args: Vec<String>,
    /// Its log file.
    pub log: PathBuf,
    /// Its admin HTTP server.
    pub admin: SocketAddr,
    child: tokio::process::Child,
}

/// The volplane processes of the demo.
#[derive(Debug)]
pub struct Cast {
    /// Per-node capacity instances, then the controller-side instance.
    pub instances: Vec<Instance>,
    /// When they were started.
    pub started: tokio::time::Instant,
}

impl Cast {
    /// Starts volplane as a cluster would: per node `--node-deployment`
    /// with capacity next to that node's driver (no election), and one
    /// controller-side instance with ephemeral and health (elected).
    pub fn start(stage: &Stage) -> anyhow::Result<Self> {
        let program = std::env::current_exe().context("cannot find this volplane binary")?;
        let started = tokio::time::Instant::now();
        let mut instances = Vec::new();
        for node in NODES {
            let socket = stage.dir.join("csi").join(format!("{}.sock", node.name));
            let args = strings(&[
                "--controllers",
                "capacity",
                "--node-deployment",
                "--node-name",
                node.name,
                "--pod-name",
                &format!("volplane-{}", node.name),
                "--csi-address",
                &format!("unix://{}", socket.display()),
                "--capacity-poll-interval",
                &humantime::format_duration(CAPACITY_POLL).to_string(),
            ]);
            let role = format!("capacity of {} (per-node, like the DaemonSet)", node.name);
            instances.push(spawn(&program, stage, &format!("capacity-{}", node.name), role, args)?);
        }
        let socket = stage.dir.join("csi").join("controller.sock");
        let args = strings(&[
            "--controllers",
            "ephemeral,health",
            "--pod-name",
            CONTROLLER_POD,
            "--csi-address",
            &format!("unix://{}", socket.display()),
            "--health-monitor-interval",
            &humantime::format_duration(HEALTH_CHECK).to_string(),
        ]);
        let role = "ephemeral and health, leader-elected (like the Deployment)".to_string();
        instances.push(spawn(&program, stage, "controller", role, args)?);
        Ok(Self { instances, started })
    }

    /// Waits until every instance answers `/readyz` with 200.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        for instance in &mut self.instances {
            let deadline = tokio::time::Instant::now() + READY_LIMIT;
            loop {
                if let Some(status) = instance.child.try_wait()? {
                    anyhow::bail!("{}", instance.ended(status));
                }
                if ready(instance.admin).await {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "volplane {} is not ready after {READY_LIMIT:?}; its log:\n{}",
                        instance.name,
                        volplane_tests::process::log_tail(&instance.log, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Completes when an instance ends, which it must not before the demo
    /// stops it: the error says which and shows its log.
    pub async fn first_exit(&mut self) -> anyhow::Error {
        let waits = self.instances.iter_mut().map(|i| {
            Box::pin(async move {
                match i.child.wait().await {
                    Ok(status) => i.ended(status),
                    Err(error) => format!("cannot wait for volplane {}: {error}", i.name),
                }
            })
        });
        let (message, _, _) = futures::future::select_all(waits).await;
        anyhow::anyhow!(message)
    }

    /// SIGTERM to every instance, then waits for each to exit (SIGKILL
    /// after [`STOP_LIMIT`]). Returns the instances that did not exit 0.
    pub async fn stop(&mut self) -> Vec<String> {
        for instance in &self.instances {
            let pid = instance.child.id().and_then(|id| i32::try_from(id).ok());
            if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let waits = self.instances.iter_mut().map(|i| async move {
            match tokio::time::timeout(STOP_LIMIT, i.child.wait()).await {
                Ok(Ok(status)) if status.success() => None,
                Ok(Ok(status)) => Some(i.ended(status)),
                Ok(Err(error)) => Some(format!("cannot wait for volplane {}: {error}", i.name)),
                Err(_) => {
                    let _ = i.child.kill().await;
                    Some(format!(
                        "volplane {} did not stop within {STOP_LIMIT:?}; killed",
                        i.name
                    ))
                }
            }
        });
        futures::future::join_all(waits).await.into_iter().flatten().collect()
    }
}

impl Instance {
    fn ended(&self, status: ExitStatus) -> String {
        format!(
            "volplane {} ended ({status}); its log ({}):\n{}",
            self.name,
            self.log.display(),
            volplane_tests::process::log_tail(&self.log, 20)
        )
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Starts `program` (this binary) with the demo's kubeconfig, namespace,
/// an admin port and `args`, its output in `logs/<name>.log`. The
/// environment is cleared (no KUBECONFIG or other setting of the user's
/// leaks in) but for `RUST_LOG`; the process dies with the demo.
fn spawn(program: &Path, stage: &Stage, name: &str, role: String, args: Vec<String>) -> anyhow::Result<Instance> {
    let admin = free_port()?;
    let log = stage.dir.join("logs").join(format!("{name}.log"));
    let file = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut command = std::process::Command::new(program);
    command
        .env_clear()
        .arg("--kubeconfig")
        .arg(&stage.kubeconfig)
        .args(["--namespace", VOLPLANE_NAMESPACE])
        .args(["--http-endpoint", &admin.to_string()])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        command.env("RUST_LOG", filter);
    }
    volplane_tests::process::dies_with_test(&mut command);
    let child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start volplane {name}"))?;
    Ok(Instance {
        name: name.to_string(),
        role,
        args,
        log,
        admin,
        child,
    })
}

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?)
}

/// Whether `GET /readyz` on `admin` answers 200.
async fn ready(admin: SocketAddr) -> bool {
    let answer = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: volplane\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), answer).await,
        Ok(Ok(head)) if head.ends_with(b" 200")
    )
}
