//! The `volplane` binary: command line, logging, admin HTTP server and the
//! startup sequence that connects to the API server and the CSI driver;
//! and the `kubectl-volplane` plugin ([`plugin`]).

pub mod admin;
pub mod args;
pub mod audit;
pub mod capacity;
pub mod client;
pub mod csi_calls;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod exposition;
pub mod health;
pub mod idle;
pub mod logging;
pub mod plugin;
pub mod process;
pub mod startup;

use std::process::ExitCode;

/// Parses the command line, runs volplane and turns any failure into one
/// `error: …` line on stderr and a non-zero exit code.
pub async fn main() -> ExitCode {
    let args = match args::Args::parse_checked() {
        Ok(args) => args,
        Err(error) => return args::report_usage_error(error),
    };
    let demo = match &args.command {
        // A script on stdout, no logging.
        Some(args::Command::Completion(completion)) => {
            let mut command = <args::Args as clap::CommandFactory>::command();
            clap_complete::generate(completion.shell, &mut command, "volplane", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(args::Command::Demo(demo)) => Some(demo.clone()),
        None => None,
    };
    if let Err(error) = logging::init(args.log_format) {
        eprintln!("error: {error:#}");
        return ExitCode::FAILURE;
    }
    let outcome = match demo {
        Some(demo) => run_demo(&demo).await,
        None => startup::run(args).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_line(&error));
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
async fn run_demo(demo: &args::DemoArgs) -> anyhow::Result<()> {
    demo::run(demo).await
}

/// The production build has no demo: its server and drivers stay out.
#[cfg(not(feature = "demo"))]
async fn run_demo(_: &args::DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "this volplane was built without the demo (cargo feature `demo`); run it with: cargo run -p volplane --features demo -- demo"
    )
}

/// The error and its causes on one line, each cause once: many library
/// errors already repeat their source in their own message.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn error_line_skips_causes_already_in_the_message() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = anyhow::Error::new(io)
            .context("failed to read /k: No such file or directory")
            .context("cannot read kubeconfig /k");
        assert_eq!(
            error_line(&error),
            "cannot read kubeconfig /k: failed to read /k: No such file or directory"
        );
    }

    #[test]
    fn error_line_is_one_line() {
        let error = anyhow::anyhow!("first\nsecond").context("outer");
        assert_eq!(error_line(&error), "outer: first second");
    }
}
