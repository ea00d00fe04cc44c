//! e2e: `volplane demo` looked at as README's "Looking around" tells a
//! user to: each of its commands run by `sh` with the shipped kubectl (and
//! `kubectl-volplane` on `PATH`) against the demo's kubeconfig, its output
//! checked. Ignored unless `VOLPLANE_E2E_BIN_DIR` is set (for kubectl).

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use support::Running;
use volplane_tests::e2e::bin_dir;
use volplane_tests::wait::eventually_some;

/// The kubeconfig README's demo commands name (the default `--dir`).
const README_KUBECONFIG: &str = "/tmp/volplane-demo/kubeconfig";

/// README's demo commands: the lines of its Demo section that start with
/// the default kubeconfig, in order.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let section = readme
        .split("\n## Demo\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Demo section");
    let prefix = format!("KUBECONFIG={README_KUBECONFIG} kubectl ");
    section
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// The lines of `text` with runs of whitespace made one space.
fn squeezed(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Checks what README's `command` printed after the story (and, for the
/// pod of one's own, after the steps before it).
fn check(command: &str, out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    if command.contains("get csistoragecapacities") {
        let mut got = lines.clone();
        got.sort_unstable();
        let mut expected = vec![
            "bulk\tdemo.volplane.dev/node=node-a\t2Ti\tNode/node-a",
            "bulk\tdemo.volplane.dev/node=node-b\t1Ti\tNode/node-b",
            "bulk\tdemo.volplane.dev/node=node-c\t512Gi\tNode/node-c",
            // db's 10Gi came off node-a's 100Gi.
            "fast\tdemo.volplane.dev/node=node-a\t90Gi\tNode/node-a",
            "fast\tdemo.volplane.dev/node=node-b\t20Gi\tNode/node-b",
            "fast\tdemo.volplane.dev/node=node-c\t5Gi\tNode/node-c",
        ];
        expected.sort_unstable();
        assert_eq!(got, expected, "{command}");
    } else if command.ends_with("kubectl volplane capacity") {
        let rows = squeezed(out);
        assert_eq!(
            rows[0], "NODE CLASS DRIVER CAPACITY RESERVED FROM DRIVER MAX VOLUME SIZE OBJECT MANAGED-BY AGE",
            "{out}"
        );
        let expected = [
            "node-a bulk demo.volplane.dev 2Ti 0 2Ti - volplane/csisc-",
            "node-a fast demo.volplane.dev 90Gi 0 90Gi - volplane/csisc-",
            "node-b bulk demo.volplane.dev 1Ti 0 1Ti - volplane/csisc-",
            "node-b fast demo.volplane.dev 20Gi 0 20Gi - volplane/csisc-",
            "node-c bulk demo.volplane.dev 512Gi 0 512Gi - volplane/csisc-",
            "node-c fast demo.volplane.dev 5Gi 0 5Gi - volplane/csisc-",
        ];
        assert_eq!(rows.len(), 1 + expected.len(), "{out}");
        for (row, start) in rows[1..].iter().zip(expected) {
            assert!(row.starts_with(start), "{row:?} should start with {start:?}");
        }
    } else if command.contains("get pvc -n default") {
        let fields: Vec<&str> = out.trim_end().split('\t').collect();
        assert_eq!(fields[..3], ["db-data", "10Gi", "Pod/db"], "{out:?}");
        assert!(fields[3].starts_with("pvc-"), "db-data is bound: {out:?}");
    } else if command.contains("get events.events.k8s.io") {
        assert!(
            lines.contains(&"default/db-data\tVolumeConditionAbnormal\tread errors on 3 sectors of the backing disk"),
            "{out}"
        );
        assert!(
            lines.contains(&"default/db-data\tVolumeConditionNormal\tthe CSI driver reports the volume healthy again"),
            "{out}"
        );
        assert_eq!(lines.len(), 2, "one event per change: {out}");
    } else if command.contains("get pv -o") {
        assert_eq!(out, "", "the volume recovered: no PV is held abnormal");
    } else if command.contains("get leases") {
        let held: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
        let names: Vec<&str> = held.iter().map(|f| f[0]).collect();
        assert_eq!(
            names,
            ["volplane-ephemeral", "volplane-health-demo.volplane.dev"],
            "{out}"
        );
        for fields in held {
            assert!(fields[1].starts_with("volplane-controller_"), "{out}");
        }
    } else if command.contains("kubectl run cache") {
        assert_eq!(out, "pod/cache created\n");
    } else if command.ends_with("kubectl volplane why cache") {
        assert!(
            out.contains("claim cache-tmp (volume tmp, class bulk, 700Gi): PVC, not bound yet"),
            "{out}"
        );
        assert!(
            out.trim_end()
                .ends_with("default/cache: its volumes fit on 2 of 3 nodes: node-a, node-b"),
            "{out}"
        );
    } else if command.ends_with("kubectl delete pod cache") {
        assert!(out.starts_with("pod \"cache\" deleted"), "{out}");
    } else {
        panic!("no expected output for README's {command}");
    }
}

/// Runs `line` with `sh`, kubectl and kubectl-volplane on `PATH` and
/// nothing else of this environment.
fn run(line: &str, home: &Path) -> String {
    let plugin = Path::new(env!("CARGO_BIN_EXE_kubectl-volplane"));
    let path = format!(
        "{}:{}:/usr/bin:/bin",
        bin_dir().display(),
        plugin.parent().expect("plugin directory").display()
    );
    let output = std::process::Command::new("sh")
        .args(["-c", line])
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .output()
        .expect("run sh");
    assert!(
        output.status.success(),
        "{line}\nfailed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

async fn client(kubeconfig: &Path) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("the demo's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

#[tokio::test]
#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
async fn readme_commands_show_the_demo_with_the_shipped_kubectl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("home");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut command = support::volplane();
    command.arg("demo").arg("--dir").arg(dir.path());
    let mut demo = Running::spawn_narrating(command);
    demo.wait_for_within("volplane keeps running", Duration::from_secs(120))
        .await;

    let commands = readme_commands();
    let narrated: Vec<String> = demo
        .seen()
        .iter()
        .filter_map(|line| line.strip_prefix("    "))
        .filter(|line| line.starts_with("KUBECONFIG="))
        .map(|line| line.replacen(&kubeconfig.display().to_string(), README_KUBECONFIG, 1))
        .collect();
    assert_eq!(narrated.len(), 6, "{narrated:#?}");
    for line in &narrated {
        assert!(
            commands.contains(line),
            "the narration's {line} is not in README's Demo section"
        );
    }

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client(&kubeconfig).await, "default");
    assert_eq!(commands.len(), 9, "{commands:#?}");
    for readme_line in &commands {
        let line = readme_line.replacen(README_KUBECONFIG, &kubeconfig.display().to_string(), 1);
        check(readme_line, &run(&line, home.path()));
        if readme_line.contains("kubectl run cache") {
            // Typed by hand, the next command comes later than this.
            eventually_some(Duration::from_secs(30), "volplane creates cache-tmp", || async {
                claims.get_opt("cache-tmp").await.ok().flatten()
            })
            .await;
        }
    }
    let gone = claims.get_opt("cache-tmp").await.expect("read cache-tmp");
    assert!(gone.is_none(), "deleting the pod removes its claim");

    let (exit, lines) = demo.stop_with("INT").await;
    assert_eq!(exit, Some(0), "{}", lines.join("\n"));
}
