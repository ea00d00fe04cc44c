//! Shell completion: `volplane completion bash|zsh|fish` prints a script
//! the shell runs; kubectl (the shipped one, 1.26 and later) completes
//! `kubectl volplane` through the `kubectl_complete-volplane` executable on
//! `PATH`. The kubectl test is ignored unless `VOLPLANE_E2E_BIN_DIR` is
//! set; see README.md.

use std::path::Path;
use std::process::{Command, Output};

fn volplane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_volplane"))
        .args(args)
        .output()
        .expect("run volplane")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn each_shell_gets_its_script() {
    let bash = stdout(&volplane(&["completion", "bash"]));
    assert!(bash.contains("complete -F _volplane"), "{bash}");
    let zsh = stdout(&volplane(&["completion", "zsh"]));
    assert!(zsh.starts_with("#compdef volplane"), "{zsh}");
    let fish = stdout(&volplane(&["completion", "fish"]));
    assert!(fish.contains("complete -c volplane"), "{fish}");
    let refused = volplane(&["completion", "tcsh"]);
    assert_eq!(refused.status.code(), Some(2), "an unknown shell is a usage error");
    let flagged = volplane(&["--csi-address", "/x.sock", "completion", "bash"]);
    assert_eq!(flagged.status.code(), Some(2), "completion takes only the shell");
}

/// Bash itself, running the script's function for a half-typed flag.
#[test]
fn bash_completes_a_flag_from_the_script() {
    let script = stdout(&volplane(&["completion", "bash"]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("volplane.bash");
    std::fs::write(&file, script).expect("write the script");
    let probe = format!(
        "source {}; COMP_WORDS=(volplane --capacity-own); COMP_CWORD=1; _volplane volplane --capacity-own volplane; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.display()
    );
    let output = Command::new("bash").args(["-c", &probe]).output().expect("run bash");
    let words = stdout(&output);
    assert_eq!(words.lines().collect::<Vec<_>>(), ["--capacity-owner"], "{words}");
}

/// Where kubectl finds the plugin and its completion: both on `PATH`.
fn plugin_path(dir: &Path) -> String {
    for (name, binary) in [
        ("kubectl-volplane", env!("CARGO_BIN_EXE_kubectl-volplane")),
        (
            "kubectl_complete-volplane",
            env!("CARGO_BIN_EXE_kubectl_complete-volplane"),
        ),
    ] {
        std::os::unix::fs::symlink(binary, dir.join(name)).expect("link the binary");
    }
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

fn kubectl_complete(path: &str, words: &[&str]) -> Vec<String> {
    let kubectl = volplane_tests::e2e::bin_dir().join("kubectl");
    let output = Command::new(kubectl)
        .args(["__complete", "volplane"])
        .args(words)
        .env("PATH", path)
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .expect("run kubectl");
    let out = stdout(&output);
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(
        lines.pop().as_deref(),
        Some(":4"),
        "Cobra's directive, no file names: {out}"
    );
    lines
        .iter()
        .map(|l| l.split('\t').next().unwrap_or_default().to_string())
        .collect()
}

#[cfg_attr(not(volplane_e2e), ignore = "e2e: needs VOLPLANE_E2E_BIN_DIR, see README")]
#[test]
fn kubectl_completes_kubectl_volplane() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = plugin_path(dir.path());
    let subcommands = kubectl_complete(&path, &[""]);
    for subcommand in ["capacity", "why", "health"] {
        assert!(
            subcommands.contains(&subcommand.to_string()),
            "{subcommand} in {subcommands:?}"
        );
    }
    assert_eq!(kubectl_complete(&path, &["capacity", "--cl"]), ["--class"]);
    assert_eq!(kubectl_complete(&path, &["health", "-o", ""]), ["wide", "json", "yaml"]);
}
