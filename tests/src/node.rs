//! A real node for the e2e suite: containerd, a kubelet and the hostpath
//! CSI driver registered with it, next to a [`ControlPlane`] started with
//! [`Options::node`](crate::e2e::Options::node).
//!
//! [`ControlPlane::start_node`] needs root and Debian's `containerd`,
//! `runc`, `containernetworking-plugins` and `busybox-static` (it says so
//! when they are missing). It
//!
//! - takes the machine's node lock (the kubelet's ports 10250 and 10248 and
//!   the pods' bridge are fixed: one node per machine; a second test waits),
//!   then removes whatever a killed earlier run left behind;
//! - creates cgroups below the test process's own (in every cgroup v1
//!   hierarchy): `runtime` for containerd and the kubelet, `pods` as the
//!   kubelet's cgroup root, so that every process the node starts, shims and
//!   containers included, can be found and killed;
//! - starts containerd with its state in [`NODE_DIR`], imports three images
//!   written here ([`crate::image`]): the pause container, busybox, and
//!   volplane ([`VOLPLANE_IMAGE`]: the binary it is given, normally the
//!   release binary, with the shared libraries it loads, as user 65532 like
//!   `deploy/Dockerfile`'s distroless image);
//! - starts hostpathplugin with its socket in the kubelet's plugin directory
//!   and csi-node-driver-registrar, then the kubelet as node [`NODE_NAME`],
//!   and waits until the node is Ready, untainted and its CSINode lists the
//!   driver;
//! - plays kube-proxy for the one Service pods use: a DNAT rule sends the
//!   `kubernetes` Service's address (10.0.0.1:443, what the kubelet puts in
//!   every pod's `KUBERNETES_SERVICE_HOST`/`_PORT`) to the API server on the
//!   bridge's gateway, so in-cluster clients work unchanged.
//!
//! containerd, the kubelet, the driver and the registrar die with the test
//! (like every e2e process); their exit fails every wait, and every wait that
//! times out shows their logs' tails. Dropping the [`RealNode`] kills
//! everything in its cgroups, deletes the DNAT rule and the bridge, unmounts
//! everything under [`NODE_DIR`] (deepest first), removes the cgroups, the
//! few fixed paths the kubelet and containerd create and the directory. The
//! same clean-up runs when the next node starts, for a test binary that was
//! killed (`kill -9`) before it could clean up.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::Api;

use crate::e2e::{ControlPlane, HostPath, find_binary};
use crate::image::{ImageConfig, ImageFile, shared_libraries, write_image};
use crate::process::Process;

/// The node's name. The API server reaches a kubelet by its node's name (for
/// `kubectl logs` and `exec`); here only `localhost` resolves to it.
pub const NODE_NAME: &str = "localhost";
/// Where the node keeps everything: fixed, as there is one node per machine.
pub const NODE_DIR: &str = "/tmp/volplane-e2e-node";
/// The kubelet's root directory (what `/var/lib/kubelet` is on a real node).
pub const KUBELET_DIR: &str = "/tmp/volplane-e2e-node/kubelet";
/// The hostpath driver's state directory: one directory per volume.
pub const HOSTPATH_STATE_DIR: &str = "/tmp/volplane-e2e-node/hostpath";
/// volplane's image, from the release binary (see [`volplane_release_binary`]).
pub const VOLPLANE_IMAGE: &str = "localhost/volplane:e2e";
/// A busybox image (`/bin/sh` and every applet) for test pods.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:e2e";
const PAUSE_IMAGE: &str = "localhost/pause:e2e";

/// Held while a node runs, by any test binary on the machine.
const LOCK_FILE: &str = "/tmp/volplane-e2e-node.lock";
/// Written first: the cgroup path the node's processes live under.
const CGROUP_RECORD: &str = "cgroup";
/// The cgroup (below the test's own) holding everything the node starts.
const CGROUP_NAME: &str = "volplane-e2e-node";
const BRIDGE: &str = "cnie2e0";
/// The bridge's address on the host: pods reach the host there.
pub const GATEWAY: &str = "10.88.0.1";
/// The `kubernetes` Service (first address of the control plane's range).
const KUBERNETES_SERVICE: &str = "10.0.0.1";
const RULE_COMMENT: &str = "volplane-e2e-node";
/// How long the node may take to come up.
const START_LIMIT: Duration = Duration::from_secs(90);

/// A running node; see the module documentation.
pub struct RealNode {
    plane_processes: Arc<crate::e2e::Processes>,
    cgroups: Cgroups,
    hostpath: Option<HostPath>,
    registrar: Option<Process>,
    _lock: File,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode").field("dir", &NODE_DIR).finish()
    }
}

impl RealNode {
    /// The hostpath driver serving this node (its socket is in the
    /// kubelet's plugin directory).
    pub fn hostpath(&self) -> &HostPath {
        self.hostpath.as_ref().expect("the driver runs while the node does")
    }

    /// The processes in the node's cgroups: containerd, the kubelet, shims, containers.
    pub fn process_ids(&self) -> BTreeSet<u32> {
        self.cgroups.process_ids()
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The kubelet first, so it starts nothing again; then the runtime.
        self.plane_processes.stop_one("kubelet");
        self.plane_processes.stop_one("containerd");
        self.registrar.take();
        self.hostpath.take();
        if let Err(error) = clean_up(&self.cgroups) {
            eprintln!("e2e: the node's clean-up left something behind: {error:#}");
        }
    }
}

impl ControlPlane {
    /// Starts the machine's real node; see the module documentation. The
    /// control plane must have been started with
    /// [`Options::node`](crate::e2e::Options::node).
    ///
    /// The volplane image holds `volplane_binary` (normally
    /// [`volplane_release_binary`]) and the shared libraries it loads.
    pub async fn start_node(&self, volplane_binary: &Path) -> anyhow::Result<RealNode> {
        check_requirements()?;
        let lock = take_node_lock().await?;
        clean_up_leftovers().context("remove what an earlier node left behind")?;
        let dir = Path::new(NODE_DIR);
        for sub in [
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet/manifests",
            "kubelet/pod-logs",
            "images",
        ] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("create {NODE_DIR}/{sub}"))?;
        }
        let cgroups = Cgroups::below_own()?;
        std::fs::write(dir.join(CGROUP_RECORD), cgroups.relative.to_string_lossy().as_bytes())?;
        cgroups.create()?;
        // From here on, dropping the node cleans up whatever was started.
        let mut node = RealNode {
            plane_processes: self.processes(),
            cgroups,
            hostpath: None,
            registrar: None,
            _lock: lock,
        };
        add_service_rule(self.api_port())?;
        self.write_node_configuration(&node.cgroups)?;
        self.start_in_cgroup(
            &node.cgroups,
            "containerd",
            &["--config", &path(dir, "containerd.toml")],
        )?;
        self.wait_for_containerd().await?;
        self.import_images(volplane_binary).await?;
        let plugin_dir = Path::new(KUBELET_DIR).join("plugins").join(HostPath::DRIVER);
        std::fs::create_dir_all(&plugin_dir)?;
        let socket = plugin_dir.join("csi.sock");
        std::fs::create_dir_all(Path::new(KUBELET_DIR).join("plugins_registry"))?;
        node.hostpath = Some(
            self.run_hostpath(
                NODE_NAME,
                socket.clone(),
                PathBuf::from(HOSTPATH_STATE_DIR),
                &[("fast", "100Gi"), ("slow", "10Gi")],
            )
            .await?,
        );
        node.registrar = Some(self.start_registered_process(
            "csi-node-driver-registrar",
            "csi-node-driver-registrar",
            &[
                format!("--csi-address={}", socket.display()),
                format!("--kubelet-registration-path={}", socket.display()),
                format!("--plugin-registration-path={KUBELET_DIR}/plugins_registry"),
            ],
        )?);
        self.start_in_cgroup(
            &node.cgroups,
            "kubelet",
            &[
                "--config",
                &path(dir, "kubelet.yaml"),
                "--kubeconfig",
                &self.kubeconfig().display().to_string(),
                "--hostname-override",
                NODE_NAME,
                "--root-dir",
                KUBELET_DIR,
                "--cert-dir",
                &path(dir, "kubelet-pki"),
            ],
        )?;
        self.wait_for_node().await?;
        self.wait_for_service_account("default").await?;
        Ok(node)
    }

    /// Waits until `namespace`'s `default` ServiceAccount exists: before,
    /// the ServiceAccount admission plugin refuses pods there.
    pub async fn wait_for_service_account(&self, namespace: &str) -> anyhow::Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        self.wait_node(
            Duration::from_secs(30),
            &format!("ServiceAccount {namespace}/default"),
            || {
                let accounts = accounts.clone();
                async move { matches!(accounts.get_opt("default").await, Ok(Some(_))).then_some(()) }
            },
        )
        .await
    }

    /// Starts the node's `binary` (containerd or kubelet) in the runtime
    /// cgroup, watched like the control plane's processes.
    fn start_in_cgroup(&self, cgroups: &Cgroups, binary: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = find_binary(self.bin_dir(), binary)?;
        let mut command = Command::new(program);
        command.args(args);
        let process = Process::spawn_command(binary, command, self.log_path(binary))?;
        let pid = process.pid();
        self.watch_process(process);
        cgroups.enter_runtime(pid)
    }

    /// containerd's configuration, the bridge network and the kubelet's.
    fn write_node_configuration(&self, cgroups: &Cgroups) -> anyhow::Result<()> {
        let dir = Path::new(NODE_DIR);
        let fill = |template: &str| {
            template
                .replace("@DIR@", NODE_DIR)
                .replace("@CGROOT@", &format!("/{}/pods", cgroups.relative.display()))
        };
        std::fs::write(dir.join("containerd.toml"), fill(CONTAINERD_CONFIG))?;
        std::fs::write(dir.join("cni/net.d/10-e2e.conflist"), fill(CNI_CONFIG))?;
        std::fs::write(dir.join("kubelet.yaml"), fill(KUBELET_CONFIG))?;
        Ok(())
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut command = Command::new("ctr");
        command
            .args([
                "--address",
                &format!("{NODE_DIR}/containerd/containerd.sock"),
                "--namespace",
                "k8s.io",
            ])
            .args(args);
        crate::process::dies_with_test(&mut command)
            .stdin(std::process::Stdio::null())
            .output()
            .context("run ctr")
    }

    async fn wait_for_containerd(&self) -> anyhow::Result<()> {
        self.wait_node(Duration::from_secs(30), "containerd to answer", || async {
            self.ctr(&["version"]).ok().filter(|o| o.status.success()).map(|_| ())
        })
        .await
    }

    /// Writes and imports the pause, busybox and volplane images.
    async fn import_images(&self, binary: &Path) -> anyhow::Result<()> {
        let images = Path::new(NODE_DIR).join("images");
        let pause = ImageConfig {
            name: PAUSE_IMAGE.into(),
            entrypoint: vec!["/pause".into()],
            user: String::new(),
        };
        let busybox = ImageConfig {
            name: BUSYBOX_IMAGE.into(),
            entrypoint: vec!["/bin/sh".into()],
            user: String::new(),
        };
        let applets = busybox_applets()?;
        if !binary.is_file() {
            bail!("volplane's binary {} for the image is missing", binary.display());
        }
        let mut volplane_files = vec![ImageFile::new(binary, "/usr/local/bin/volplane")];
        for library in shared_libraries(binary)? {
            let path = library.display().to_string();
            volplane_files.push(ImageFile::new(library, &path));
        }
        // As deploy/Dockerfile: the binary at /usr/local/bin, user nonroot.
        let volplane = ImageConfig {
            name: VOLPLANE_IMAGE.into(),
            entrypoint: vec!["/usr/local/bin/volplane".into()],
            user: "65532:65532".into(),
        };
        let built = [
            (
                pause,
                vec![ImageFile::new(find_binary(self.bin_dir(), "pause")?, "/pause")],
            ),
            (
                busybox,
                vec![ImageFile {
                    source: "/bin/busybox".into(),
                    path: "/bin/busybox".into(),
                    links: applets,
                }],
            ),
            (volplane, volplane_files),
        ];
        for (config, files) in built {
            let archive = images.join(format!("{}.tar", config.name.replace(['/', ':'], "_")));
            write_image(&archive, &config, &files).with_context(|| format!("write image {}", config.name))?;
            let output = self.ctr(&["images", "import", &archive.display().to_string()])?;
            if !output.status.success() {
                bail!(
                    "ctr images import {} failed: {}",
                    config.name,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let _ = std::fs::remove_file(&archive);
        }
        Ok(())
    }

    /// Waits until the node is Ready, carries no taint and its CSINode
    /// lists the hostpath driver (registered through the registrar).
    async fn wait_for_node(&self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client());
        let csinodes: Api<CSINode> = Api::all(self.client());
        self.wait_node(
            START_LIMIT,
            "node localhost Ready, untainted, with the hostpath driver",
            || {
                let (nodes, csinodes) = (nodes.clone(), csinodes.clone());
                async move {
                    let node = nodes.get_opt(NODE_NAME).await.ok()??;
                    let ready = node
                        .status
                        .as_ref()?
                        .conditions
                        .as_ref()?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    let tainted = node.spec.as_ref()?.taints.as_ref().is_some_and(|t| !t.is_empty());
                    let csinode = csinodes.get_opt(NODE_NAME).await.ok()??;
                    let registered = csinode.spec.drivers.iter().any(|d| d.name == HostPath::DRIVER);
                    (ready && !tainted && registered).then_some(())
                }
            },
        )
        .await
    }

    /// Polls `check` for up to `limit`; the error names `what` and carries
    /// the tails of the registered logs (the node's and the control plane's).
    async fn wait_node<T, F, Fut>(&self, limit: Duration, what: &str, check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        match crate::wait::until(limit, what, check).await {
            Ok((value, _)) => Ok(value),
            Err(error) => bail!(crate::wait::with_logs(format!("{error:#}"))),
        }
    }
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Fails with what to install when the node cannot run here.
fn check_requirements() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let mut missing: Vec<String> = ["containerd", "ctr", "runc", "ip", "iptables", "umount", "ldd"]
        .into_iter()
        .filter(|program| find_binary(Path::new("/nonexistent"), program).is_err())
        .map(str::to_string)
        .collect();
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).is_file() {
            missing.push(format!("/usr/lib/cni/{plugin}"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox".into());
    }
    if !root || !missing.is_empty() {
        bail!(
            "the real node needs root (it runs containerd and a kubelet, mounts volumes, makes cgroups) and \
             Debian's packages: apt-get install -y containerd runc containernetworking-plugins busybox-static \
             iptables (root: {root}; missing: {missing:?})"
        );
    }
    Ok(())
}

/// The machine's node lock, waited for up to ten minutes.
async fn take_node_lock() -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("open {LOCK_FILE}"))?;
    let limit = Duration::from_secs(600);
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    eprintln!("e2e: another test's node runs on this machine; waiting for {LOCK_FILE}");
                    told = true;
                }
                if started.elapsed() > limit {
                    bail!("another node held {LOCK_FILE} for {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(error).context(format!("lock {LOCK_FILE}")),
        }
    }
}

/// Cleans up after a node whose test binary did not (killed): its cgroup
/// path is recorded in [`NODE_DIR`]. Called with the node lock held.
fn clean_up_leftovers() -> anyhow::Result<()> {
    let recorded = std::fs::read_to_string(Path::new(NODE_DIR).join(CGROUP_RECORD)).ok();
    let leftover = Path::new(NODE_DIR).exists() || recorded.is_some() || bridge_exists();
    if !leftover {
        return Ok(());
    }
    eprintln!("e2e: removing what an earlier node left behind ({NODE_DIR})");
    let cgroups = Cgroups {
        relative: recorded.map(|r| PathBuf::from(r.trim())).unwrap_or_default(),
        hierarchies: v1_hierarchies(),
    };
    clean_up(&cgroups)
}

/// Kills everything in the node's cgroups, deletes the Service rule and the
/// bridge, unmounts and removes [`NODE_DIR`], removes the cgroups and the
/// fixed paths. Errors name what is left.
fn clean_up(cgroups: &Cgroups) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    if !cgroups.relative.as_os_str().is_empty() {
        cgroups.kill_all();
    }
    if let Err(error) = delete_service_rules() {
        problems.push(format!("{error:#}"));
    }
    if bridge_exists() {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        if bridge_exists() {
            problems.push(format!("the bridge {BRIDGE} is still there"));
        }
    }
    let mounts = unmount_below(Path::new(NODE_DIR));
    if !mounts.is_empty() {
        problems.push(format!("still mounted: {mounts:?}"));
    } else if Path::new(NODE_DIR).exists()
        && let Err(error) = std::fs::remove_dir_all(NODE_DIR)
    {
        problems.push(format!("cannot remove {NODE_DIR}: {error}"));
    }
    if !cgroups.relative.as_os_str().is_empty() {
        let left = cgroups.remove();
        if !left.is_empty() {
            problems.push(format!("cgroups not removed: {left:?}"));
        }
    }
    remove_fixed_paths();
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(problems.join("; "))
    }
}

/// What a node left on the machine: processes in its cgroups, mounts below
/// [`NODE_DIR`], the directory, the bridge, the Service rule, its cgroups,
/// the fixed paths. Empty once a node was cleaned up.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(cgroups) = Cgroups::below_own() {
        let alive: Vec<u32> = cgroups
            .process_ids()
            .into_iter()
            .filter(|pid| !is_zombie(*pid))
            .collect();
        if !alive.is_empty() {
            left.push(format!("processes {alive:?}"));
        }
        left.extend(
            cgroups
                .directories()
                .iter()
                .map(|dir| format!("cgroup {}", dir.display())),
        );
    }
    left.extend(
        mounts_below(Path::new(NODE_DIR))
            .iter()
            .map(|m| format!("mount {}", m.display())),
    );
    if Path::new(NODE_DIR).exists() {
        left.push(format!("directory {NODE_DIR}"));
    }
    if bridge_exists() {
        left.push(format!("bridge {BRIDGE}"));
    }
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S", "PREROUTING"])
        .output();
    if rules.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(RULE_COMMENT)) {
        left.push("the Service DNAT rule".into());
    }
    left.extend(
        fixed_paths()
            .iter()
            .filter(|p| p.exists())
            .map(|p| format!("path {}", p.display())),
    );
    left
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn is_alive(pid: u32) -> bool {
    !is_zombie(pid)
}

/// The paths outside [`NODE_DIR`] the kubelet and containerd create, once
/// no kubelet or containerd runs: `/var/lib/kubelet/device-plugins`,
/// `/var/log/containers`, `/var/log/pods`, `/run/containerd/{s,fifo,runc}`
/// and CNI's result cache for the node's network.
pub fn fixed_paths() -> Vec<PathBuf> {
    [
        "/var/lib/kubelet/device-plugins",
        "/var/lib/kubelet",
        "/var/log/containers",
        "/var/log/pods",
        "/run/containerd/s",
        "/run/containerd/fifo",
        "/run/containerd/runc",
        "/run/containerd",
        "/var/lib/cni/results",
        "/var/lib/cni",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

fn remove_fixed_paths() {
    if process_named("kubelet") || process_named("containerd") {
        eprintln!("e2e: another kubelet or containerd runs on this machine; leaving its paths alone");
        return;
    }
    // Directories of runtime state (sockets, FIFOs, results) go with their
    // contents; the parents only when empty.
    for owned in [
        "/var/lib/kubelet/device-plugins",
        "/run/containerd/s",
        "/run/containerd/fifo",
        "/run/containerd/runc",
    ] {
        let _ = std::fs::remove_dir_all(owned);
    }
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("e2e-") || name.starts_with("cni-loopback-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    for directory in ["/var/log/containers", "/var/log/pods"] {
        if let Ok(entries) = std::fs::read_dir(directory) {
            for entry in entries.flatten() {
                let into_node = std::fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(NODE_DIR));
                if into_node {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    for parent in [
        "/var/lib/kubelet",
        "/var/log/containers",
        "/var/log/pods",
        "/run/containerd",
        "/var/lib/cni/results",
        "/var/lib/cni",
    ] {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Whether a process whose command name is `name` runs on the machine.
fn process_named(name: &str) -> bool {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|entry| {
        let Some(pid) = entry.file_name().to_str().and_then(|pid| pid.parse::<u32>().ok()) else {
            return false;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        comm.trim() == name && is_alive(pid)
    })
}

fn bridge_exists() -> bool {
    Path::new("/sys/class/net").join(BRIDGE).exists()
}

/// The DNAT rule that makes the `kubernetes` Service reach the API server.
fn service_rule(api_port: u16) -> Vec<String> {
    [
        "PREROUTING",
        "-d",
        &format!("{KUBERNETES_SERVICE}/32"),
        "-p",
        "tcp",
        "--dport",
        "443",
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{GATEWAY}:{api_port}"),
    ]
    .into_iter()
    .map(str::to_string)
    .collect()
}

fn add_service_rule(api_port: u16) -> anyhow::Result<()> {
    iptables(
        &[
            &["-t", "nat", "-A"][..],
            &service_rule(api_port).iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    )
}

/// Deletes every rule carrying the node's comment.
fn delete_service_rules() -> anyhow::Result<()> {
    let output = Command::new("iptables")
        .args(["-t", "nat", "-S", "PREROUTING"])
        .output()
        .context("run iptables")?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(rule) = line.strip_prefix("-A ")
            && line.contains(RULE_COMMENT)
        {
            let mut args = vec!["-t", "nat", "-D"];
            args.extend(rule.split_whitespace().map(|a| a.trim_matches('"')));
            iptables(&args)?;
        }
    }
    Ok(())
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("iptables").args(args).output().context("run iptables")?;
    if !output.status.success() {
        bail!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first,
/// until nothing is (mounts can be stacked); returns what stays mounted.
fn unmount_below(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..10 {
        let mut mounts = mounts_below(dir);
        if mounts.is_empty() {
            return mounts;
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in &mounts {
            let _ = Command::new("umount").arg("-l").arg(mount).output();
        }
    }
    mounts_below(dir)
}

/// Mount points at or below `dir`, from `/proc/self/mountinfo`.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_mount_path(escaped)))
        .filter(|mount| mount.starts_with(dir))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mount_path(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(std::str::from_utf8(digits).unwrap_or("x"), 8)
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of the cgroup v1 hierarchies, and of the unified (v2)
/// one mounted beside them, where runc also makes the containers' cgroups.
fn v1_hierarchies() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            matches!(fields.get(2), Some(&"cgroup" | &"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .collect()
}

/// The node's cgroup, `relative` to the root of every v1 hierarchy.
#[derive(Debug)]
struct Cgroups {
    relative: PathBuf,
    hierarchies: Vec<PathBuf>,
}

impl Cgroups {
    /// Below the test process's own memory cgroup (where its memory is
    /// accounted), in every hierarchy.
    fn below_own() -> anyhow::Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let memory = own
            .lines()
            .find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
            })
            .context("no cgroup v1 memory hierarchy: the node needs cgroup v1 (these machines have it)")?;
        let hierarchies = v1_hierarchies();
        if hierarchies.is_empty() {
            bail!("no cgroup v1 hierarchy is mounted");
        }
        Ok(Self {
            relative: Path::new(memory.trim_start_matches('/')).join(CGROUP_NAME),
            hierarchies,
        })
    }

    fn runtime(&self) -> PathBuf {
        self.relative.join("runtime")
    }

    /// Creates the node's cgroup with `runtime` and `pods` in every
    /// hierarchy; a new cpuset level gets its parent's CPUs and memory nodes.
    fn create(&self) -> anyhow::Result<()> {
        for hierarchy in &self.hierarchies {
            for leaf in [self.runtime(), self.relative.join("pods")] {
                let mut current = hierarchy.clone();
                for part in leaf.components() {
                    let parent = current.clone();
                    current.push(part);
                    if current.exists() {
                        continue;
                    }
                    std::fs::create_dir(&current).with_context(|| format!("create cgroup {}", current.display()))?;
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
                            std::fs::write(current.join(file), value.trim())
                                .with_context(|| format!("write {}", current.join(file).display()))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the runtime cgroup of every hierarchy.
    fn enter_runtime(&self, pid: u32) -> anyhow::Result<()> {
        for hierarchy in &self.hierarchies {
            let procs = hierarchy.join(self.runtime()).join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).with_context(|| format!("move {pid} into {}", procs.display()))?;
        }
        Ok(())
    }

    /// Every cgroup directory of the node, deepest first.
    fn directories(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&entry.path(), out);
                    }
                }
            }
            out.push(dir.to_path_buf());
        }
        let mut out = Vec::new();
        for hierarchy in &self.hierarchies {
            let root = hierarchy.join(&self.relative);
            if root.is_dir() {
                walk(&root, &mut out);
            }
        }
        out
    }

    /// The processes in the node's cgroups.
    fn process_ids(&self) -> BTreeSet<u32> {
        self.directories()
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Kills every process in the node's cgroups until none is left (ten
    /// seconds at most: a killed process leaves its cgroup when reaped).
    fn kill_all(&self) {
        let started = std::time::Instant::now();
        loop {
            let pids = self.process_ids();
            let alive: Vec<u32> = pids.into_iter().filter(|pid| !is_zombie(*pid)).collect();
            if alive.is_empty() || started.elapsed() > Duration::from_secs(10) {
                return;
            }
            for pid in alive {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the node's cgroups, deepest first, retrying while they
    /// empty; returns those left.
    fn remove(&self) -> Vec<PathBuf> {
        let started = std::time::Instant::now();
        loop {
            for dir in self.directories() {
                let _ = std::fs::remove_dir(&dir);
            }
            let left = self.directories();
            if left.is_empty() || started.elapsed() > Duration::from_secs(10) {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A zombie is dead but not yet reaped (PID 1 reaps orphans late here).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| status.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
        .unwrap_or(true)
}

/// The applets of `/bin/busybox`, as links in `/bin`.
fn busybox_applets() -> anyhow::Result<Vec<String>> {
    let output = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("run busybox --list")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|applet| !applet.is_empty() && *applet != "busybox")
        .map(|applet| format!("/bin/{applet}"))
        .collect())
}

/// volplane's release binary, built now (`cargo build --release --locked
/// -p volplane`, nothing to do when it is up to date) unless
/// `VOLPLANE_E2E_IMAGE_BINARY` names a binary to use instead.
pub fn volplane_release_binary() -> anyhow::Result<PathBuf> {
    if let Some(binary) = std::env::var_os("VOLPLANE_E2E_IMAGE_BINARY").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(binary));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--release", "--locked", "-p", "volplane", "--bin", "volplane"]);
    let output = crate::process::dies_with_test(&mut command)
        .output()
        .context("run cargo build --release")?;
    if !output.status.success() {
        bail!(
            "cargo build --release -p volplane failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    Ok(target.join("release").join("volplane"))
}

/// containerd 1.6 (Debian bookworm) in [`NODE_DIR`]: no systemd, cgroupfs.
/// `restrict_oom_score_adj`: this machine lacks CAP_SYS_RESOURCE, and the
/// pause container asks for an OOM score adjustment of -998.
const CONTAINERD_CONFIG: &str = r#"version = 2
root = "@DIR@/containerd/root"
state = "@DIR@/containerd/state"
[grpc]
  address = "@DIR@/containerd/containerd.sock"
[ttrpc]
  address = "@DIR@/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:e2e"
  enable_cdi = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "@DIR@/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "@DIR@/cni/net.d"
"#;

/// The pods' network: a bridge whose gateway is the host.
const CNI_CONFIG: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cnie2e0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "@DIR@/cni/ipam"}}
  ]
}
"#;

/// The kubelet: cgroup v1 with cgroupfs (containerd 1.6 cannot tell it the
/// driver), below the test's cgroup; loopback only, anonymous access for
/// the API server's `logs`/`exec`.
const KUBELET_CONFIG: &str = r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: @CGROOT@
containerRuntimeEndpoint: unix://@DIR@/containerd/containerd.sock
failSwapOn: false
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
staticPodPath: @DIR@/kubelet/manifests
podLogsDir: @DIR@/kubelet/pod-logs
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
nodeStatusUpdateFrequency: 10s
makeIPTablesUtilChains: false
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/tmp/tab\011x\134y"), "/tmp/tab\tx\\y");
        assert_eq!(unescape_mount_path(r"/tmp/trailing\04"), r"/tmp/trailing\04");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn the_service_rule_sends_the_kubernetes_service_to_the_gateway() {
        let rule = service_rule(6443).join(" ");
        assert_eq!(
            rule,
            "PREROUTING -d 10.0.0.1/32 -p tcp --dport 443 -m comment --comment volplane-e2e-node -j DNAT \
             --to-destination 10.88.0.1:6443"
        );
    }
}
