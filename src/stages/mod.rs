//! Stage kinds: what a stage of each `uses:` value does. Every kind implements [`Stage`]; the
//! engine only knows that trait, so adding a kind means adding a variant to [`StageKind`].

mod command;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use command::Command;

/// Numbers a stage reports (accuracy, row counts, …), recorded in the lock file.
pub type Metrics = Map<String, Value>;

/// What a running stage may use from the engine.
pub struct Context<'a> {
    /// The project root; relative paths in parameters are relative to it.
    pub root: &'a Path,
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// Output paths of the stages this one needs, by stage name.
    pub upstream: &'a BTreeMap<String, Vec<PathBuf>>,
    /// Set when the run is being interrupted; long work checks it and returns `Cancelled`.
    pub cancel: &'a AtomicBool,
    /// Writes one line to the stage's log.
    pub log: &'a (dyn Fn(&str) + Sync),
}

impl Context<'_> {
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("`{command}` exited with {status}")]
    CommandFailed { command: String, status: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Cancelled,
    #[error("{0}")]
    Invalid(String),
}

impl StageError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The behaviour shared by every stage kind.
pub trait Stage {
    /// The implementation version: bump it when the kind's code changes what it writes, so
    /// cached results of the old code are not reused.
    fn version(&self) -> u32;
    /// Files and directories the stage reads, relative to the project root.
    fn deps(&self) -> Vec<String>;
    /// Files and directories the stage writes, relative to the project root.
    fn outs(&self) -> Vec<String>;
    /// Does the work. Outputs must exist under `outs()` when it returns `Ok`.
    fn run(&self, ctx: &Context) -> Result<Metrics, StageError>;
}

/// The names accepted by `uses:`.
pub const KINDS: &[&str] = &["command"];

/// Every stage kind, selected by `uses:` with its parameters under `with:`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "uses", content = "with", rename_all = "snake_case")]
pub enum StageKind {
    /// A shell command with declared dependencies and outputs.
    Command(Command),
}

impl StageKind {
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Command(_) => "command",
        }
    }

    pub fn stage(&self) -> &dyn Stage {
        match self {
            StageKind::Command(s) => s,
        }
    }

    /// The kind's parameters as JSON, for cache keys and the lock file.
    pub fn params(&self) -> Value {
        match serde_json::to_value(self).expect("stage parameters serialize") {
            Value::Object(mut m) => m.remove("with").unwrap_or(Value::Null),
            other => other,
        }
    }
}
