//! e2e: an API server that does not serve an API volplane needs (here
//! CSIStorageCapacity, switched off with kube-apiserver's
//! `--runtime-config`, as on a release before 1.24): volplane's capacity
//! controller does not start and says so in one line naming the API; a
//! controller that does without it starts. Ignored unless
//! `VOLPLANE_E2E_BIN_DIR` is set; see README.md.

mod support;

use support::Running;
use volplane_tests::e2e::{ControlPlane, Options, bin_dir};

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_api_ends_the_start_with_one_line_naming_it() {
    let plane = ControlPlane::start_with(
        &bin_dir(),
        Options {
            runtime_config: Some("storage.k8s.io/v1/csistoragecapacities=false"),
            ..Options::default()
        },
    )
    .await
    .expect("control plane starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("csi.sock").display().to_string();
    let capacity = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=capacity",
            "--csi-address",
            &socket,
            "--namespace",
            "default",
        ],
    );
    let (code, lines) = capacity.exit("volplane exits at start").await;
    assert_eq!(code, Some(1), "{lines:#?}");
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {lines:#?}");
    assert!(
        errors[0].contains("storage.k8s.io/v1 csistoragecapacities") && errors[0].contains("1.24 or later"),
        "{}",
        errors[0]
    );
    assert!(
        !lines.iter().any(|l| l.contains("CSI driver")),
        "it stops before it waits for the driver: {lines:#?}"
    );

    let mut ephemeral = Running::start(
        plane.kubeconfig(),
        &[
            "--controllers=ephemeral",
            "--namespace",
            "default",
            "--http-endpoint",
            "127.0.0.1:0",
        ],
    );
    ephemeral.wait_for("volplane is ready").await;
    let (code, _) = ephemeral.terminate().await;
    assert_eq!(code, Some(0));
}
