//! `volplane demo`: the whole story on the embedded control plane, checked
//! through its narration, and the demo's process handling (Ctrl-C, one demo
//! per directory).

mod support;

use std::time::Duration;

use support::Running;

/// The narration with its line breaks and runs of spaces made one space,
/// so that checks do not depend on where text was wrapped.
fn flattened(lines: &[String]) -> String {
    lines.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Fails unless `text` holds each of `parts`, in this order.
fn assert_in_order(text: &str, parts: &[&str]) {
    let mut rest = text;
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => panic!("narration lacks {part:?} (in this order) in:\n{text}"),
        }
    }
}

/// Longer than the demo's own limits (60 s to be ready, 60 s per step), so
/// that a slow run fails with the demo's diagnosis, not the test's.
const STORY_LIMIT: Duration = Duration::from_secs(300);

fn demo(args: &[&str]) -> std::process::Command {
    let mut command = support::volplane();
    command.arg("demo").args(args);
    command
}

#[tokio::test]
async fn demo_once_plays_the_story_as_it_happens_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().display().to_string();
    let mut running = Running::spawn_narrating(demo(&["--once", "--dir", &root]));
    running.wait_for_within("Demo complete.", STORY_LIMIT).await;
    let (exit, lines) = running.exit("the demo exits after its story").await;
    assert_eq!(exit, Some(0), "{}", lines.join("\n"));
    let kubeconfig = format!("{root}/kubeconfig");
    assert_in_order(
        &flattened(&lines),
        &[
            "no real cluster is touched",
            &format!("kubeconfig {kubeconfig}"),
            "node-a: 100Gi fast, 2Ti bulk; node-b: 20Gi fast, 1Ti bulk; node-c: 5Gi fast, 512Gi bulk",
            "capacity-node-a capacity of node-a (per node, like the DaemonSet)",
            &format!(
                "volplane --kubeconfig {kubeconfig} --namespace volplane --http-endpoint 127.0.0.1:0 --controllers capacity --node-deployment --node-name node-a"
            ),
            "controller ephemeral and health, leader-elected",
            "volplane --kubeconfig",
            "--controllers ephemeral,health --pod-name volplane-controller",
            "All 4 volplane processes are ready (/readyz answers 200); the controller-side process was \
             elected leader of volplane-ephemeral and volplane-health-demo.volplane.dev.",
            "Admin servers (/metrics, /readyz): capacity-node-a http://127.0.0.1:",
            "== 1. Capacity",
            "published one CSIStorageCapacity per node and class, owned by the Node",
            "node-a bulk demo.volplane.dev 2Ti 0 2Ti - volplane/csisc-",
            "node-a fast demo.volplane.dev 100Gi 0 100Gi - volplane/csisc-",
            "node-b bulk demo.volplane.dev 1Ti",
            "node-b fast demo.volplane.dev 20Gi",
            "node-c bulk demo.volplane.dev 512Gi",
            "node-c fast demo.volplane.dev 5Gi",
            &format!("KUBECONFIG={kubeconfig} kubectl get csistoragecapacities -n volplane -o go-template="),
            &format!("KUBECONFIG={kubeconfig} kubectl volplane capacity"),
            "== 2. Generic ephemeral volume",
            "Pod default/web asks for a 50Gi generic ephemeral volume \"scratch\" of class fast.",
            "volplane created PVC default/web-scratch",
            "owned by Pod web (controller)",
            "node-a web-scratch fits needs 50Gi, fits capacity 100Gi",
            "node-b web-scratch no needs 50Gi, capacity 20Gi",
            "default/web: its volumes fit only on node-a",
            &format!("KUBECONFIG={kubeconfig} kubectl get pvc -n default -o go-template="),
            "== 3. Pod deleted, claim collected",
            "Pod web deleted; garbage collection removed PVC web-scratch with it",
            "== 4. Volume health",
            "Pod db got PVC db-data from volplane.",
            "db goes to node-a (where volplane's objects say 10Gi of fast fit)",
            "node-a's driver now has 90Gi of fast free. The new PV made volplane refresh node-a's fast capacity",
            "90Gi published",
            "The driver now reports volume vol-",
            "Warning VolumeConditionAbnormal on PVC default/db-data, note \"read errors on 3 sectors of the backing disk\"",
            "annotated health.volplane.dev/abnormal=\"read errors on 3 sectors of the backing disk\"",
            &format!("KUBECONFIG={kubeconfig} kubectl get events.events.k8s.io -A -o go-template="),
            &format!("KUBECONFIG={kubeconfig} kubectl get pv -o go-template="),
            "Normal VolumeConditionNormal on PVC default/db-data",
            "the annotation is gone",
            "== 5. Leader election",
            "volplane-ephemeral volplane-controller_",
            "volplane-health-demo.volplane.dev volplane-controller_",
            &format!("KUBECONFIG={kubeconfig} kubectl get leases -n volplane -o go-template="),
            "The story is over (--once): stopping volplane.",
            "All 4 volplane processes exited 0 and released their Leases.",
            "Demo complete.",
        ],
    );
    for name in ["capacity-node-a", "capacity-node-b", "capacity-node-c", "controller"] {
        let log = std::fs::read_to_string(dir.path().join("logs").join(format!("{name}.log"))).expect("log");
        assert!(log.contains("volplane is ready"), "{name}: {log}");
        assert!(log.contains("termination signal received"), "{name}: {log}");
        assert!(
            !log.contains("stopped leading; no more writes"),
            "a clean step-down: {log}"
        );
    }
}

#[tokio::test]
async fn one_demo_per_directory_and_ctrl_c_in_its_terminal_stops_it_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().display().to_string();
    // As in a terminal: the demo leads its own process group, and Ctrl-C
    // sends SIGINT to the whole group.
    let mut command = demo(&["--dir", &root]);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut first = Running::spawn_narrating(command);
    first.wait_for_within("volplane keeps running", STORY_LIMIT).await;

    let second = demo(&["--once", "--dir", &root]).output().expect("second demo");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "error: another volplane demo is running in {root}; stop it, or give this one its own --dir"
        )),
        "{stderr}"
    );

    let group = format!("-{}", first.pid());
    let sent = std::process::Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .expect("kill");
    assert!(sent.success());
    let (exit, lines) = first.exit("the demo exits after Ctrl-C").await;
    assert_eq!(exit, Some(0), "{}", lines.join("\n"));
    assert_in_order(
        &flattened(&lines),
        &[
            "Ctrl-C stops volplane",
            "Stopping.",
            "All 4 volplane processes exited 0 and released their Leases.",
        ],
    );
    assert!(!flattened(&lines).contains("Demo complete."));
}

#[tokio::test]
async fn the_directory_must_be_new_empty_or_an_earlier_demos() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("logs")).expect("logs");
    std::fs::write(dir.path().join("logs").join("keep.txt"), "mine").expect("a file of the user's");
    let output = demo(&["--once", "--dir", &dir.path().display().to_string()])
        .output()
        .expect("demo");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is neither empty nor an earlier demo's directory; give --dir a new or empty one"),
        "{stderr}"
    );
    assert!(
        dir.path().join("logs").join("keep.txt").exists(),
        "nothing of the user's is removed"
    );
}

#[tokio::test]
async fn a_relative_directory_is_taken_from_the_working_directory() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut command = demo(&["--once", "--dir", "here"]);
    command.current_dir(cwd.path());
    let mut running = Running::spawn_narrating(command);
    running.wait_for_within("Demo complete.", STORY_LIMIT).await;
    let (exit, lines) = running.exit("the demo exits after its story").await;
    assert_eq!(exit, Some(0), "{}", lines.join("\n"));
    let kubeconfig = cwd.path().join("here").join("kubeconfig");
    assert!(
        flattened(&lines).contains(&format!("kubeconfig {}", kubeconfig.display())),
        "absolute in the narration"
    );
}
