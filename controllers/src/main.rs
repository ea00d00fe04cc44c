use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    volplane::main().await
}
