//! `sentiflow completions SHELL`: prints a shell completion script.

use super::exit;

/// `command` is the whole command line's definition, which the script completes.
pub(super) fn completions(shell: clap_complete::Shell, mut command: clap::Command) -> anyhow::Result<i32> {
    clap_complete::generate(shell, &mut command, "sentiflow", &mut std::io::stdout());
    Ok(exit::OK)
}
