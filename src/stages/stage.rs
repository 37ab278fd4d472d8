//! What every stage kind is: the [`Stage`] trait, the [`Context`] the engine runs it in, and how it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::cache::Metrics;

/// A finished stage that the running one needs.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: &'static str,
    /// Absolute paths of its outputs.
    pub outs: Vec<PathBuf>,
}

/// What a running stage may use from the engine.
pub struct Context<'a> {
    /// The project root; relative paths in parameters are relative to it.
    pub root: &'a Path,
    pub pipeline: &'a str,
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// The stages this one needs, finished.
    pub upstream: &'a [Upstream],
    /// Input path → content hash: what the stage's cache key covers.
    pub inputs: &'a BTreeMap<String, String>,
    /// Set when the run is being interrupted; long work checks it and returns `Cancelled`.
    pub cancel: &'a AtomicBool,
    /// Writes one line to the stage's log.
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Where a search's trials run when they are jobs of an executor; `None`: here.
    pub trials: Option<&'a dyn Trials>,
}

/// Runs a search's trials elsewhere, each as a job that runs [`Stage::run_trial`].
pub trait Trials: Sync {
    /// The results of trials `0..n`, in order.
    fn run(&self, n: usize) -> Result<Vec<Vec<u8>>, StageError>;
}

impl Context<'_> {
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The needed stages of one of `kinds`.
    pub fn upstream_of(&self, kinds: &[&str]) -> Vec<&Upstream> {
        self.upstream.iter().filter(|u| kinds.contains(&u.kind)).collect()
    }

    /// The one needed stage of one of `kinds`; an error names what is missing or ambiguous.
    pub fn single_upstream(&self, kinds: &[&str]) -> Result<&Upstream, StageError> {
        match self.upstream_of(kinds).as_slice() {
            [one] => Ok(one),
            [] => Err(StageError::Invalid(format!(
                "stage `{}` must need a stage of kind {}",
                self.stage,
                kinds.join(" or ")
            ))),
            many => Err(StageError::Invalid(format!(
                "stage `{}` needs several stages of kind {} ({}); it takes exactly one",
                self.stage,
                kinds.join(" or "),
                many.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The first output of the one needed stage of one of `kinds`.
    pub fn input(&self, kinds: &[&str]) -> Result<PathBuf, StageError> {
        let up = self.single_upstream(kinds)?;
        up.outs
            .first()
            .cloned()
            .ok_or_else(|| StageError::Invalid(format!("stage `{}` has no output", up.name)))
    }

    pub fn info(&self, line: &str) {
        (self.log)(line)
    }

    pub fn check_cancel(&self) -> Result<(), StageError> {
        if self.cancel.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
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
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Vectorizer(#[from] crate::models::tfidf::TfidfError),
    #[error(transparent)]
    Bundle(#[from] crate::models::bundle::BundleError),
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
    /// Files and directories the stage reads, relative to the project root, besides the outputs
    /// of the stages it needs.
    fn deps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Files and directories the stage writes, relative to the project root.
    fn outs(&self) -> Vec<String>;
    /// The fields of `with` whose text a shell interprets.
    fn shell_fields(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks parameters that serde cannot (run when the pipeline is validated).
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
    /// Makes the dependencies available before they are hashed (e.g. downloads a data set).
    fn prepare(&self, _root: &Path, _log: &(dyn Fn(&str) + Sync)) -> Result<(), StageError> {
        Ok(())
    }
    /// Does the work. Outputs must exist under `outs()` when it returns `Ok`.
    fn run(&self, ctx: &Context) -> Result<Metrics, StageError>;
    /// Whether its work is trials that can run apart (a search), with [`Stage::run_trial`].
    fn has_trials(&self) -> bool {
        false
    }
    /// Runs trial `i` alone and gives its result, which [`Stage::run`] gathers through
    /// [`Context::trials`].
    fn run_trial(&self, _ctx: &Context, _i: usize) -> Result<Vec<u8>, StageError> {
        Err(StageError::Invalid(
            "this kind of stage has no trials to run apart".into(),
        ))
    }
}

/// Writes JSON to `path`, pretty-printed.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), StageError> {
    let bytes = serde_json::to_vec_pretty(value).expect("values serialize");
    std::fs::write(path, bytes).map_err(|e| StageError::io(path, e))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))
}
