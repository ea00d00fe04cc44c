//! The embedded cluster: the in-process API server with the scenario's
//! objects, and the simulated CSI drivers on unix sockets.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::Api;
use serde_json::json;
use volplane_csi::ControllerCapability;
use volplane_tests::apiserver::ApiServerDouble;
use volplane_tests::driver::{CapacityAnswer, DriverConfig, TestDriver, labels};
use volplane_tests::objects::try_create;

use super::scenario::{self, CLASSES, DRIVER, NODES, NodeSpace, TOPOLOGY_KEY, VOLPLANE_NAMESPACE};

/// The file whose lock marks a directory as a running demo's.
const LOCK_FILE: &str = "demo.lock";

/// The API server, the cluster's objects and the drivers.
pub struct EmbeddedCluster {
    /// The demo's directory (absolute).
    pub dir: PathBuf,
    /// The kubeconfig of the API server.
    pub kubeconfig: PathBuf,
    /// The in-process API server.
    pub api_server: ApiServerDouble,
    /// A client of it.
    pub client: kube::Client,
    /// Each node's driver instance, in the order of [`NODES`].
    pub node_drivers: Vec<TestDriver>,
    /// The driver instance of the controller side (volumes and their health).
    pub controller_driver: TestDriver,
    _lock: File,
}

impl std::fmt::Debug for EmbeddedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCluster")
            .field("dir", &self.dir)
            .field("api_server", &self.api_server)
            .finish_non_exhaustive()
    }
}

impl EmbeddedCluster {
    /// Takes `dir` (absolute) for this demo, starts the API server with the
    /// scenario's objects and the drivers.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let lock = take_directory(dir)?;
        let api_server = ApiServerDouble::start()
            .await
            .context("cannot start the in-process API server")?;
        api_server.enable_garbage_collection(true);
        let kubeconfig = dir.join("kubeconfig");
        write_private(&kubeconfig, &api_server.kubeconfig())?;
        let client = api_server.client();
        create_objects(&client).await?;
        let sockets = dir.join("csi");
        let mut node_drivers = Vec::new();
        for node in NODES {
            node_drivers.push(start_node_driver(&sockets, node).await?);
        }
        let controller_driver = start_driver(&sockets.join("controller.sock"), controller_driver_config()).await?;
        Ok(Self {
            dir: dir.to_path_buf(),
            kubeconfig,
            api_server,
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

    /// The socket of the driver instance on `node` (`None`: the controller side's).
    pub fn socket(&self, node: Option<&str>) -> PathBuf {
        self.dir
            .join("csi")
            .join(format!("{}.sock", node.unwrap_or("controller")))
    }

    /// Where volplane's processes log.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// Takes `dir` for this demo: created (mode 0700) if missing; refused if it
/// belongs to another user, holds anything but an earlier demo's files, or
/// is locked by a running demo. The earlier demo's sockets, logs and
/// kubeconfig go.
fn take_directory(dir: &Path) -> anyhow::Result<File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let owner = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .uid();
    if owner != rustix::process::getuid().as_raw() {
        anyhow::bail!(
            "{} belongs to another user; give the demo a --dir of your own",
            dir.display()
        );
    }
    let lock_path = dir.join(LOCK_FILE);
    let is_demo = lock_path.exists();
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .next()
        .is_none();
    if !is_demo && !empty {
        anyhow::bail!(
            "{} is neither empty nor an earlier demo's directory; give --dir a new or empty one",
            dir.display()
        );
    }
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

/// Writes `text` to a new file `path` readable only by this user; an
/// earlier file (or a link planted there) is removed first, never followed.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("cannot replace {}", path.display())),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The namespace of volplane's objects, the nodes (labelled with their
/// topology), the driver's CSIDriver with `storageCapacity: true`, and its
/// WaitForFirstConsumer classes.
async fn create_objects(client: &kube::Client) -> anyhow::Result<()> {
    try_create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": VOLPLANE_NAMESPACE}}),
    )
    .await?;
    for node in NODES {
        try_create(
            &Api::<Node>::all(client.clone()),
            json!({"metadata": {"name": node.name,
                                "labels": {TOPOLOGY_KEY: node.name, "kubernetes.io/hostname": node.name}}}),
        )
        .await?;
    }
    try_create(
        &Api::<CSIDriver>::all(client.clone()),
        json!({"metadata": {"name": DRIVER}, "spec": {"storageCapacity": true, "attachRequired": false}}),
    )
    .await?;
    for class in CLASSES {
        try_create(
            &Api::<StorageClass>::all(client.clone()),
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
    let config = DriverConfig {
        name: DRIVER.into(),
        vendor_version: "demo".into(),
        node_id: node.name.into(),
        node_topology: Some(labels([(TOPOLOGY_KEY, node.name)])),
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
        CapacityAnswer::available(scenario::gib(free_gib)),
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
