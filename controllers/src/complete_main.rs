use std::process::ExitCode;

fn main() -> ExitCode {
    volplane::plugin::complete::main()
}
