//! Shared by the benchmarks: running the real binary against the double and
//! reading its memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;
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
    let mut command = Command::new(env!("CARGO_BIN_EXE_volplane"));
    command
        .env_clear()
        .env("RUST_LOG", "warn")
        .arg("--kubeconfig")
        .arg(kubeconfig);
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
