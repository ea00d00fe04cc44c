//! `kubectl_complete-volplane`: completion of `kubectl volplane` the way
//! kubectl (1.26 and later) asks a plugin for it. kubectl runs the
//! executable named `kubectl_complete-<plugin>` from `PATH` with the words
//! typed after `kubectl volplane`, the last being the one to complete
//! (empty for a new word), and reads Cobra's answer: a candidate per line
//! (`value<TAB>description`), then `:<directive>`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;

use clap::CommandFactory as _;

use super::PluginArgs;

/// Cobra's `ShellCompDirectiveNoFileComp`: no file names beside the candidates.
const NO_FILE_COMPLETION: u32 = 4;

/// The candidates for `words` (as kubectl passes them), in Cobra's format.
pub fn answer(words: Vec<OsString>) -> String {
    let mut args = vec![OsString::from("kubectl-volplane")];
    args.extend(words);
    if args.len() == 1 {
        args.push(OsString::new());
    }
    let current = args.len() - 1;
    let candidates = clap_complete::engine::complete(&mut PluginArgs::command(), args, current, None);
    let mut out = String::new();
    for candidate in candidates.iter().flatten().filter(|c| !c.is_hide_set()) {
        let value = candidate.get_value().to_string_lossy();
        // A tab or newline would break the protocol's lines.
        let value = value.replace(['\t', '\n'], " ");
        match candidate.get_help().map(|help| help.to_string()) {
            Some(help) => {
                let help = help.lines().next().unwrap_or_default().replace('\t', " ");
                let _ = writeln!(out, "{value}\t{help}");
            }
            None => {
                let _ = writeln!(out, "{value}");
            }
        }
    }
    let _ = writeln!(out, ":{NO_FILE_COMPLETION}");
    out
}

/// The executable: prints [`answer`] for its arguments.
pub fn main() -> ExitCode {
    print!("{}", answer(std::env::args_os().skip(1).collect()));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(words: &[&str]) -> Vec<String> {
        let out = answer(words.iter().map(OsString::from).collect());
        let mut lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.pop(), Some(":4"), "ends with the directive: {out}");
        lines
            .iter()
            .map(|l| l.split('\t').next().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn a_new_word_lists_the_subcommands() {
        let values = values(&[""]);
        for subcommand in ["capacity", "why", "health"] {
            assert!(values.contains(&subcommand.to_string()), "{subcommand} in {values:?}");
        }
        assert_eq!(values, self::values(&[]), "no word at all is a new word");
    }

    #[test]
    fn a_prefix_narrows_and_flags_complete_after_a_subcommand() {
        assert_eq!(values(&["ca"]), ["capacity"]);
        let flags = values(&["capacity", "--cl"]);
        assert_eq!(flags, ["--class"]);
        let outputs = values(&["capacity", "-o", ""]);
        assert_eq!(outputs, ["wide", "json", "yaml"]);
    }
}
