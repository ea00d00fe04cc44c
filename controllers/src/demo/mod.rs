//! `volplane demo`: volplane on an embedded control plane. An in-process
//! API server on loopback (the double of the component tests), simulated
//! CSI drivers for three nodes, and volplane's controllers run as child
//! processes of this very binary with production flags (same code paths,
//! leader election included); then a narrated story. Compiled in only
//! with the `demo` cargo feature.
//!
//! - [`script`]: the simulated cluster and the kubectl commands (pure);
//! - [`stage`]: the API server, the drivers and the volplane processes;
//! - [`story`]: the acts, each waiting for volplane's answer in the API.

pub mod script;
pub mod stage;
pub mod story;

use std::path::PathBuf;

use anyhow::Context as _;
use kube::api::Api;

use crate::args::DemoArgs;
use stage::{Cast, Stage};
use story::{Narrator, Story};

/// How the demo ended when nothing failed.
enum Ending {
    /// `--once`: the story is over.
    Once,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

/// Runs the demo until Ctrl-C (or, with `--once`, until the story is over).
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let stage = Stage::build(&dir).await?;
    let mut cast = Cast::start(&stage)?;
    let logs = stage.dir.join("logs");
    let ending = perform(&stage, &mut cast, args.once).await;
    let narrator = Narrator::new(&stage.kubeconfig);
    if matches!(ending, Ok(Ending::Interrupted)) {
        narrator.say("\nStopping.");
    }
    let failed = cast.stop().await;
    for failure in &failed {
        eprintln!("{failure}");
    }
    let ending = ending.with_context(|| format!("the demo failed (volplane's logs are in {})", logs.display()))?;
    anyhow::ensure!(
        failed.is_empty(),
        "{} volplane processes did not stop cleanly (logs in {})",
        failed.len(),
        logs.display()
    );
    let leases = Api::namespaced(stage.client.clone(), script::VOLPLANE_NAMESPACE);
    let held = story::held_leases(&leases).await?;
    anyhow::ensure!(held.is_empty(), "Leases still held after volplane stopped: {held:?}");
    narrator.say(&format!(
        "All {} volplane processes exited 0 and released their Leases.",
        cast.instances.len()
    ));
    if matches!(ending, Ending::Once) {
        narrator.say("Demo complete.");
    }
    Ok(())
}

/// `<temp dir>/volplane-demo`.
fn default_dir() -> PathBuf {
    std::env::temp_dir().join("volplane-demo")
}

/// Introduces the cast, waits until it is ready, plays the story, and then
/// (without `--once`) keeps everything running until Ctrl-C. A volplane
/// process that ends on its own ends the demo with its log.
async fn perform(stage: &Stage, cast: &mut Cast, once: bool) -> anyhow::Result<Ending> {
    let story = Story::new(stage);
    let narrator = Narrator::new(&stage.kubeconfig);
    let interrupted = crate::startup::wait_for_termination();
    tokio::pin!(interrupted);
    story.introduce(cast);
    tokio::select! {
        ready = cast.ready() => ready?,
        signal = &mut interrupted => return signal.map(|()| Ending::Interrupted),
    }
    let leaders = tokio::select! {
        held = story.leaders() => held?,
        error = cast.first_exit() => return Err(error),
        signal = &mut interrupted => return signal.map(|()| Ending::Interrupted),
    };
    narrator.say(&format!(
        "\nAll {} volplane processes are ready (/readyz answers 200); the controller-side instance \
         was elected leader of {}.",
        cast.instances.len(),
        leaders.join(" and ")
    ));
    tokio::select! {
        played = story.play(cast.started) => played?,
        error = cast.first_exit() => return Err(error),
        signal = &mut interrupted => return signal.map(|()| Ending::Interrupted),
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
        script::shell_word(&stage.kubeconfig),
        stage.dir.join("logs").display()
    ));
    tokio::select! {
        error = cast.first_exit() => Err(error),
        signal = &mut interrupted => signal.map(|()| Ending::Interrupted),
    }
}
