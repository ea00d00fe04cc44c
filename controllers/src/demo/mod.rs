//! `volplane demo`: volplane on an embedded control plane. An in-process
//! API server on loopback (the double of the component tests), simulated
//! CSI drivers for three nodes, and volplane's controllers run as child
//! processes of this very binary with production flags (same code paths,
//! leader election included); then a narrated story. Compiled in only
//! with the `demo` cargo feature.
//!
//! - [`scenario`]: the simulated cluster and the kubectl commands (pure);
//! - [`cluster`]: the API server with the scenario's objects, the drivers;
//! - [`processes`]: the volplane processes;
//! - [`story`]: the acts, each waiting for volplane's answer in the API.

pub mod cluster;
pub mod processes;
pub mod scenario;
pub mod story;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use kube::api::Api;

use crate::args::DemoArgs;
use cluster::EmbeddedCluster;
use processes::VolplaneProcesses;
use story::{Narrator, Story};

/// How long the volplane processes may take to report ready, together.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// How the demo ended when nothing failed.
enum Ending {
    /// `--once`: the story is over.
    Once,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

/// Runs the demo until Ctrl-C (or, with `--once`, until the story is over).
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => std::path::absolute(dir).with_context(|| format!("cannot resolve --dir {}", dir.display()))?,
        None => default_dir(),
    };
    let cluster = EmbeddedCluster::start(&dir).await?;
    let mut processes = VolplaneProcesses::start(&cluster)?;
    let ending = perform(&cluster, &mut processes, args.once).await;
    let narrator = Narrator::new(&cluster.kubeconfig);
    if matches!(ending, Ok(Ending::Interrupted)) {
        narrator.say("\nStopping.");
    }
    let failed = processes.stop().await;
    let logs = cluster.logs();
    let ending = ending.with_context(|| format!("the demo failed (volplane's logs are in {})", logs.display()))?;
    anyhow::ensure!(
        failed.is_empty(),
        "volplane did not stop cleanly (logs in {}): {}",
        logs.display(),
        failed.join("; ")
    );
    let leases = Api::namespaced(cluster.client.clone(), scenario::VOLPLANE_NAMESPACE);
    let held = story::held_leases(&leases).await?;
    anyhow::ensure!(held.is_empty(), "Leases still held after volplane stopped: {held:?}");
    narrator.say(&format!(
        "All {} volplane processes exited 0 and released their Leases.",
        processes.all.len()
    ));
    if matches!(ending, Ending::Once) {
        narrator.say("Demo complete.");
    }
    Ok(())
}

/// Introduces the processes, waits until they are ready and lead, plays
/// the story, and then (without `--once`) keeps everything running until
/// Ctrl-C. A volplane process that ends on its own ends the demo.
async fn perform(cluster: &EmbeddedCluster, processes: &mut VolplaneProcesses, once: bool) -> anyhow::Result<Ending> {
    let story = Story::new(cluster);
    let narrator = Narrator::new(&cluster.kubeconfig);
    let interrupted = crate::startup::wait_for_termination();
    tokio::pin!(interrupted);
    story.introduce(processes);
    tokio::select! {
        biased;
        signal = &mut interrupted => return signal.map(|()| Ending::Interrupted),
        ready = processes.ready(READY_LIMIT) => ready?,
    }
    let Some(leaders) = unless_stopped(processes, interrupted.as_mut(), story.leaders()).await? else {
        return Ok(Ending::Interrupted);
    };
    narrator.say(&format!(
        "\nAll {} volplane processes are ready (/readyz answers 200); the controller-side process \
         was elected leader of {}.",
        processes.all.len(),
        leaders.join(" and ")
    ));
    let admins: Vec<String> = processes
        .all
        .iter()
        .filter_map(|p| Some(format!("{} http://{}", p.name, p.admin?)))
        .collect();
    narrator.say(&format!("Admin servers (/metrics, /readyz): {}.", admins.join(", ")));
    let started = processes.started;
    if unless_stopped(processes, interrupted.as_mut(), story.play(started))
        .await?
        .is_none()
    {
        return Ok(Ending::Interrupted);
    }
    if once {
        narrator.say("\nThe story is over (--once): stopping volplane.");
        return Ok(Ending::Once);
    }
    narrator.say(&format!(
        "\nThe story is over; volplane keeps running. Explore with the commands above, or any kubectl \
         command with KUBECONFIG={} in front; README's Demo section has a pod of your own to try. \
         volplane's logs are in {}.\n\
         Ctrl-C stops volplane (each process gets SIGTERM and releases its Leases), then the API server.",
        scenario::shell_word(&cluster.kubeconfig.to_string_lossy()),
        cluster.logs().display()
    ));
    unless_stopped(
        processes,
        interrupted.as_mut(),
        std::future::pending::<anyhow::Result<()>>(),
    )
    .await?;
    Ok(Ending::Interrupted)
}

/// Runs `step` until it is done (`Some`), a stop signal arrives (`None`),
/// or a volplane process ends by itself (an error).
async fn unless_stopped<T>(
    processes: &mut VolplaneProcesses,
    interrupted: Pin<&mut impl Future<Output = anyhow::Result<()>>>,
    step: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        biased;
        signal = interrupted => signal.map(|()| None),
        error = processes.first_exit() => Err(error),
        done = step => done.map(Some),
    }
}

/// The default `--dir`: `<temp dir>/volplane-demo`.
fn default_dir() -> PathBuf {
    std::env::temp_dir().join("volplane-demo")
}
