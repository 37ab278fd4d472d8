//! What the client and an engine exchange about one stage: the job, where it runs, how it ended.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resources::Resources;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("{file}:{line}:{col}: {message}")]
    Settings {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The engine cannot be reached or refused the job.
    #[error("{0}")]
    Engine(String),
    /// No machine of the cluster can meet the stage's request.
    #[error("{0}")]
    Impossible(String),
    /// The job ended without a result.
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Cancelled,
}

/// Where a stage ran: which engine, which of its jobs, on which node, and the engine's page of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Placement {
    /// The executor's name in the settings file.
    pub executor: String,
    /// `ray` or `slurm`.
    pub engine: String,
    /// The engine's id of the job: Ray's submission id, Slurm's job id.
    pub job: String,
    /// The node the job ran on, as the engine names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The engine's own page of the job (Ray's dashboard).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A stage to send to an engine: the worker command and what it needs.
pub struct Job<'a> {
    /// The executor's name in the settings file.
    pub executor: &'a str,
    pub stage: &'a str,
    /// The key of the job's result: the stage's cache key, or a trial's. The job's name derives
    /// from it, so a client that runs again finds its job.
    pub key: &'a str,
    /// The stage's cache key, under which the worker finds its description and inputs.
    pub task: &'a str,
    /// The trial of the stage's search the job runs; `None`: the whole stage.
    pub trial: Option<usize>,
    pub resources: &'a Resources,
    /// The remote cache URL the worker reads and writes.
    pub remote_cache: &'a str,
    /// Where the client keeps what it needs of a job (Slurm's output files on a shared disk).
    pub state_dir: PathBuf,
}

impl Job<'_> {
    /// The job's name at the engine: the same for every client running this stage.
    pub fn name(&self) -> String {
        format!("sentiflow-{}", &self.key[..20])
    }

    /// The worker's command line, after the program.
    pub fn worker_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "stage".into(),
            "exec".into(),
            "--remote-cache".into(),
            self.remote_cache.into(),
            "--client-version".into(),
            env!("CARGO_PKG_VERSION").into(),
        ];
        if let Some(i) = self.trial {
            args.extend(["--trial".into(), i.to_string()]);
        }
        args.push(self.task.into());
        args
    }
}

/// What an engine tells the client while a job runs.
pub trait Watch: Sync {
    /// The job was accepted (or an earlier one found) under this placement.
    fn placed(&self, placement: &Placement);
    /// A line of the job's log.
    fn log(&self, line: &str);
    /// Whether the run is being interrupted: the job is then stopped.
    fn cancelled(&self) -> bool;
}

/// A cancel flag and two callbacks as a [`Watch`].
pub struct Watcher<'a> {
    pub cancel: &'a AtomicBool,
    pub placed: &'a (dyn Fn(&Placement) + Sync),
    pub log: &'a (dyn Fn(&str) + Sync),
}

impl Watch for Watcher<'_> {
    fn placed(&self, placement: &Placement) {
        (self.placed)(placement)
    }
    fn log(&self, line: &str) {
        (self.log)(line)
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How often a running job is looked at.
pub(super) const POLL: Duration = Duration::from_millis(500);

/// The last `n` lines of `log`, for an error.
pub(super) fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The variables a worker needs to reach the remote cache, from this process's environment.
pub fn forwarded_env(extra: &[String]) -> BTreeMap<String, String> {
    const NAMES: [&str; 8] = [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ALLOW_HTTP",
        "SENTIFLOW_REMOTE_CACHE_SECRET",
    ];
    NAMES
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect()
}

/// `arg` as one word of a POSIX shell (engines run the worker command through one).
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_a_shell_would_split_or_expand_them() {
        assert_eq!(shell_quote("s3://team/cache"), "s3://team/cache");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }
}
