//! `sentiflow completions SHELL`: prints a shell completion script.

use clap::CommandFactory;

use super::{exit, Cli};

pub(super) fn completions(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    clap_complete::generate(shell, &mut Cli::command(), "sentiflow", &mut std::io::stdout());
    Ok(exit::OK)
}
