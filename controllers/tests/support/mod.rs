//! Shared by the binary's tests and benchmarks: running the real binary
//! against the double, reading its log lines, admin endpoints and memory.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::mpsc;
use volplane_tests::apiserver::ApiServerDouble;

/// Starts `volplane` against `double` with `args`, plus any flags in
/// `VOLPLANE_BENCH_ARGS` (e.g. `--kube-api-qps 0`). Keep the returned
/// directory alive: it holds the kubeconfig.
pub fn spawn_volplane(double: &ApiServerDouble, args: &[&str]) -> (Child, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, double.kubeconfig()).expect("kubeconfig");
    let child = command(&kubeconfig)
        .args(args)
        .args(
            std::env::var("VOLPLANE_BENCH_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn volplane");
    (child, dir)
}

fn command(kubeconfig: &Path) -> Command {
    let mut command = volplane();
    command.env("RUST_LOG", "warn").arg("--kubeconfig").arg(kubeconfig);
    command
}

/// A `/proc/<pid>/status` figure in KiB, e.g. `VmRSS:` or `VmHWM:` (peak).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `volplane` with a clean environment: only what the test sets leaks in.
/// It dies with the test thread that spawns it.
pub fn volplane() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_volplane"));
    command.env_clear().env("RUST_LOG", "info");
    volplane_tests::process::dies_with_test(&mut command);
    command
}

/// A running volplane with its stderr lines streamed.
pub struct Running {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub fn start(kubeconfig: &Path, args: &[&str]) -> Self {
        let mut command = volplane();
        command.arg("--kubeconfig").arg(kubeconfig).args(args);
        Self::spawn(command)
    }

    /// Runs `command` (normally from [`volplane`]) with stderr streamed.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn volplane");
        let lines = stderr_lines(&mut child);
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Runs `command` with stdout streamed (and stderr passed through):
    /// for `volplane demo`, which narrates on stdout.
    pub fn spawn_narrating(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn volplane");
        let stdout = child.stdout.take().expect("stdout piped");
        Self {
            child,
            lines: lines_of(stdout),
            seen: Vec::new(),
        }
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits for the process to end after a SIGKILL.
    pub fn reap(mut self) {
        let _ = self.child.wait();
    }

    /// Whether the process has ended.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub async fn wait_for(&mut self, needle: &str) -> String {
        wait_for_line(&mut self.lines, needle, &mut self.seen).await
    }

    /// Like [`Running::wait_for`], with its own limit.
    pub async fn wait_for_within(&mut self, needle: &str, limit: Duration) -> String {
        wait_for_line_within(&mut self.lines, needle, &mut self.seen, limit).await
    }

    /// The admin server's address, from its "listening" log line.
    pub async fn admin_address(&mut self) -> SocketAddr {
        let listening = self.wait_for("admin server listening").await;
        listening
            .split("address=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {listening:?}"))
    }

    /// Sends SIGTERM and returns the exit code (the test fails if it takes over 30 s).
    pub async fn terminate(self) -> (Option<i32>, Vec<String>) {
        self.stop_with("TERM").await
    }

    /// Sends `signal` (`TERM`, `INT`) and returns the exit code and every
    /// line seen (the test fails if it takes over 30 s).
    pub async fn stop_with(self, signal: &str) -> (Option<i32>, Vec<String>) {
        self.signal(signal);
        self.exit(&format!("volplane exits after SIG{signal}")).await
    }

    /// Waits for the process to exit by itself (the test fails after 30 s
    /// naming `what`); its exit code and every line seen.
    pub async fn exit(mut self, what: &str) -> (Option<i32>, Vec<String>) {
        let exit = volplane_tests::wait::eventually_some(Duration::from_secs(30), what, || {
            std::future::ready(self.child.try_wait().expect("wait"))
        })
        .await;
        let mut seen = std::mem::take(&mut self.seen);
        seen.extend(std::iter::from_fn(|| self.lines.try_recv().ok()));
        (exit.code(), seen)
    }
}

impl Drop for Running {
    /// A test that fails half-way leaves no volplane behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Streams a child's stderr lines into a channel.
pub fn stderr_lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    lines_of(child.stderr.take().expect("stderr piped"))
}

/// Streams the lines of `output` (a child's pipe) into a channel.
pub fn lines_of(output: impl Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub async fn wait_for_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    wait_for_line_within(lines, needle, seen, Duration::from_secs(30)).await
}

pub async fn wait_for_line_within(
    lines: &mut mpsc::UnboundedReceiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
    limit: Duration,
) -> String {
    let found = tokio::time::timeout(limit, async {
        while let Some(line) = lines.recv().await {
            seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        _ => panic!(
            "no log line containing {needle:?} within {limit:?}; saw:\n{}",
            seen.join("\n")
        ),
    }
}

pub fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect admin server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: volplane\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

/// The sum of the samples of `metric` whose labels include `labels`, scraped
/// from the admin server at `address` (0 when there are none).
pub fn metric_value(address: SocketAddr, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, text) = http_get(address, "/metrics");
    assert_eq!(status, 200, "/metrics: {text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The holder of Lease `name`, if it has one.
pub async fn lease_holder(leases: &kube::Api<k8s_openapi::api::coordination::v1::Lease>, name: &str) -> Option<String> {
    leases
        .get(name)
        .await
        .ok()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// A pod `name` with one generic ephemeral volume `data` (1Gi, the default
/// class), so its claim is `<name>-data`.
pub fn ephemeral_pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({"metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                 "volumes": [{"name": "data", "ephemeral": {"volumeClaimTemplate": {"spec": {
                     "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}}]}}))
    .expect("pod")
}

/// Waits until volplane at `admin` has counted `sweeps` more health checks
/// with `result`.
pub async fn wait_for_health_checks(admin: SocketAddr, result: &str, sweeps: f64) {
    let start = metric_value(admin, "volplane_health_checks_total", &[("result", result)]);
    volplane_tests::wait::eventually(Duration::from_secs(30), "more sweeps", || {
        metric_value(admin, "volplane_health_checks_total", &[("result", result)]) >= start + sweeps
    })
    .await;
}

/// A real control plane with a second kube-apiserver on its etcd and
/// kube-controller-manager moved to it, with `namespaces` created; and a
/// client of the second. volplane goes on the first (the one a test
/// kills); everything that must go on meanwhile reaches the second.
pub async fn two_api_servers(
    options: volplane_tests::e2e::Options,
    namespaces: &[&str],
) -> (volplane_tests::e2e::ControlPlane, kube::Client) {
    let plane = volplane_tests::e2e::ControlPlane::start_with(&volplane_tests::e2e::bin_dir(), options)
        .await
        .expect("control plane starts");
    plane.start_second_api_server().await.expect("a second API server");
    plane
        .move_controller_manager_to_second()
        .expect("kube-controller-manager on the second API server");
    let other = plane.second_client().expect("a client of the second API server");
    for namespace in namespaces {
        volplane_tests::objects::create(
            &kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(plane.client()),
            serde_json::json!({"metadata": {"name": namespace}}),
        )
        .await;
    }
    (plane, other)
}
