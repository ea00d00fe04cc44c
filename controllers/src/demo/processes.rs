//! volplane itself in the demo: child processes of this very binary,
//! started with production flags as the DaemonSet and the Deployment in
//! `deploy/` start them.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use super::cluster::EmbeddedCluster;
use super::scenario::{NODES, VOLPLANE_NAMESPACE, shell_word};

/// The capacity poll interval of the per-node processes.
pub const CAPACITY_POLL: Duration = Duration::from_secs(5);
/// The health check interval of the controller-side process.
pub const HEALTH_CHECK: Duration = Duration::from_secs(2);
/// The controller-side process's pod name (its Lease identity begins with it).
pub const CONTROLLER_POD: &str = "volplane-controller";
/// How long a volplane process may take to stop after SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long the lines of a failed process's log shown are.
const LOG_TAIL: usize = 20;
/// The admin server's startup log line, before its address.
const ADMIN_LISTENING: &str = "admin server listening address=";

/// One volplane process.
#[derive(Debug)]
pub struct VolplaneProcess {
    /// Its name in the narration and its log file's.
    pub name: String,
    /// What it runs, in words.
    pub role: String,
    /// Its whole command line, as a shell would take it.
    pub command_line: String,
    /// Its log file.
    pub log: PathBuf,
    /// Its admin HTTP server, once read from its log.
    pub admin: Option<SocketAddr>,
    child: tokio::process::Child,
    /// Its end has been reported already.
    ended: bool,
}

/// The volplane processes of the demo.
#[derive(Debug)]
pub struct VolplaneProcesses {
    /// Per-node capacity processes, then the controller-side process.
    pub all: Vec<VolplaneProcess>,
    /// When they were started.
    pub started: Instant,
}

impl VolplaneProcesses {
    /// Starts volplane as a cluster would: per node `--node-deployment`
    /// with capacity next to that node's driver (no election), and one
    /// controller-side process with ephemeral and health (elected).
    pub fn start(cluster: &EmbeddedCluster) -> anyhow::Result<Self> {
        let program = std::env::current_exe().context("cannot find this volplane binary")?;
        let started = Instant::now();
        let mut all = Vec::new();
        for node in NODES {
            let address = format!("unix://{}", cluster.socket(Some(node.name)).display());
            let pod = format!("volplane-{}", node.name);
            let poll = humantime::format_duration(CAPACITY_POLL).to_string();
            let args = [
                "--controllers",
                "capacity",
                "--node-deployment",
                "--node-name",
                node.name,
                "--pod-name",
                &pod,
                "--csi-address",
                &address,
                "--capacity-poll-interval",
                &poll,
                // No pods here: the Node owns its objects.
                "--capacity-owner",
                "node",
            ];
            let role = format!("capacity of {} (per node, like the DaemonSet)", node.name);
            all.push(spawn(
                &program,
                cluster,
                &format!("capacity-{}", node.name),
                role,
                &args,
            )?);
        }
        let address = format!("unix://{}", cluster.socket(None).display());
        let check = humantime::format_duration(HEALTH_CHECK).to_string();
        let args = [
            "--controllers",
            "ephemeral,health",
            "--pod-name",
            CONTROLLER_POD,
            "--csi-address",
            &address,
            "--health-monitor-interval",
            &check,
        ];
        let role = "ephemeral and health, leader-elected (like the Deployment)".to_string();
        all.push(spawn(&program, cluster, "controller", role, &args)?);
        Ok(Self { all, started })
    }

    /// Waits until every process answers `/readyz` with 200, all within
    /// `limit`; a process that ends first is an error.
    pub async fn ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for process in &mut self.all {
            loop {
                if let Some(status) = process.child.try_wait()? {
                    return Err(process.end(status));
                }
                process.admin = process.admin.or_else(|| admin_address(&process.log));
                if let Some(admin) = process.admin
                    && ready(admin).await
                {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("{}", process.log_tail());
                    anyhow::bail!("volplane {} is not ready after {limit:?}", process.name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Completes when a process ends, which it must not before the demo
    /// stops it: an error naming it (its log's tail goes to stderr).
    pub async fn first_exit(&mut self) -> anyhow::Error {
        let waits = self.all.iter_mut().filter(|p| !p.ended).map(|process| {
            Box::pin(async move {
                match process.child.wait().await {
                    Ok(status) => process.end(status),
                    Err(error) => anyhow::anyhow!("cannot wait for volplane {}: {error}", process.name),
                }
            })
        });
        let waits: Vec<_> = waits.collect();
        if waits.is_empty() {
            std::future::pending::<()>().await;
        }
        futures::future::select_all(waits).await.0
    }

    /// SIGTERM to every running process, then waits for each to exit
    /// (SIGKILL after [`STOP_LIMIT`]). Returns what went wrong, per process
    /// not already reported.
    pub async fn stop(&mut self) -> Vec<String> {
        for process in self.all.iter().filter(|p| !p.ended) {
            let pid = process.child.id().and_then(|id| i32::try_from(id).ok());
            if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let waits = self.all.iter_mut().filter(|p| !p.ended).map(|process| async move {
            match tokio::time::timeout(STOP_LIMIT, process.child.wait()).await {
                Ok(Ok(status)) if status.success() => None,
                Ok(Ok(status)) => Some(process.end(status).to_string()),
                Ok(Err(error)) => Some(format!("cannot wait for volplane {}: {error}", process.name)),
                Err(_) => {
                    let _ = process.child.kill().await;
                    Some(format!(
                        "volplane {} did not stop within {STOP_LIMIT:?}; killed",
                        process.name
                    ))
                }
            }
        });
        futures::future::join_all(waits).await.into_iter().flatten().collect()
    }
}

impl VolplaneProcess {
    /// Marks the process ended, shows its log's tail on stderr, and says so.
    fn end(&mut self, status: ExitStatus) -> anyhow::Error {
        self.ended = true;
        eprintln!("{}", self.log_tail());
        anyhow::anyhow!(
            "volplane {} ended ({status}); its log is {}",
            self.name,
            self.log.display()
        )
    }

    fn log_tail(&self) -> String {
        format!(
            "--- the last lines of {}:\n{}",
            self.log.display(),
            volplane_tests::process::log_tail(&self.log, LOG_TAIL)
        )
    }
}

/// Starts `program` (this binary) as `name` with the demo's kubeconfig,
/// namespace, an admin server on a free port and `args`, its output in
/// `logs/<name>.log`. The environment is cleared (no KUBECONFIG or other
/// setting of the user's leaks in) but for `RUST_LOG`. It runs in its own
/// process group, so that only the demo stops it (a Ctrl-C in the terminal
/// reaches the demo alone), and it is killed if the demo dies: spawned
/// from the main thread, whose end is the demo's (`PR_SET_PDEATHSIG`).
fn spawn(
    program: &Path,
    cluster: &EmbeddedCluster,
    name: &str,
    role: String,
    args: &[&str],
) -> anyhow::Result<VolplaneProcess> {
    let log = cluster.logs().join(format!("{name}.log"));
    let file = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let mut all_args = vec![
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        VOLPLANE_NAMESPACE,
        "--http-endpoint",
        "127.0.0.1:0",
    ];
    all_args.extend_from_slice(args);
    let mut command = std::process::Command::new(program);
    command
        .env_clear()
        .args(&all_args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // The admin address is read from the log: that line stays in.
    if let Some(filter) = std::env::var("RUST_LOG").ok().filter(|f| !f.trim().is_empty()) {
        command.env("RUST_LOG", format!("{filter},volplane::admin=info"));
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    volplane_tests::process::dies_with_test(&mut command);
    let child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start volplane {name}"))?;
    let words: Vec<String> = all_args.iter().map(|a| shell_word(a)).collect();
    Ok(VolplaneProcess {
        name: name.to_string(),
        role,
        command_line: format!("volplane {}", words.join(" ")),
        log,
        admin: None,
        child,
        ended: false,
    })
}

/// The admin server's address, from its startup line in `log`.
fn admin_address(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains(ADMIN_LISTENING))?;
    line.split(ADMIN_LISTENING)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
