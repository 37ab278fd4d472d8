//! The lock file beside each pipeline (`demo.yaml` → `demo.lock`): what every stage's last
//! successful run used and produced, in a stable order so `git diff` shows what changed. It
//! holds results only: a rerun that produces the same outputs leaves it byte-identical, so
//! timings live in the run report, the database and MLflow instead.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::key::{canonical, stage_inputs};
use super::report::StageReport;
use super::{lock_path, yaml, Pipeline};
use crate::cache::{write_atomic, Artifact, CacheError, Hasher, Metrics};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LockFile {
    pub pipeline: String,
    pub stages: BTreeMap<String, LockedStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedStage {
    pub kind: String,
    pub version: u32,
    pub key: String,
    pub params: Value,
    /// Input path → content hash.
    pub inputs: BTreeMap<String, String>,
    /// Output path → content hash.
    pub outs: BTreeMap<String, String>,
    pub metrics: Metrics,
}

/// Whether metric `name` is a timing (`…_seconds`): it changes from run to run, so it stays in
/// the run report and MLflow and out of the lock file.
fn is_timing(name: &str) -> bool {
    name.ends_with("_seconds")
}

const HEADER: &str = "# Written by `sentiflow run`: the inputs, parameters and outputs of each stage's last run.\n";

/// The pipeline's lock file, or an empty one when there is none or it cannot be read.
pub fn read(p: &Pipeline) -> LockFile {
    std::fs::read_to_string(lock_path(&p.file))
        .ok()
        .and_then(|s| yaml::parse(&s).ok())
        .and_then(|d| serde_json::from_value(d.value).ok())
        .unwrap_or_default()
}

/// Keeps the lock file up to date while a pipeline runs: the first stage that finishes is
/// written at once, later ones at most once a second, and all at the end. A run killed halfway
/// leaves a lock file at most a second behind (the stages it misses are in the cache), and a run
/// of thousands of stages does not rewrite the whole file after each one.
pub struct Writer {
    path: std::path::PathBuf,
    lock: LockFile,
    written: String,
    flushed: Option<std::time::Instant>,
}

const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writer {
    /// Starts from the current lock file, without the stages no longer in the pipeline.
    pub fn open(p: &Pipeline) -> Writer {
        let path = lock_path(&p.file);
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lock = read(p);
        lock.pipeline = p.name.clone();
        lock.stages.retain(|name, _| p.stage(name).is_some());
        Writer {
            path,
            lock,
            written,
            flushed: None,
        }
    }

    /// Records a stage that ran or was restored (others keep their last entry), and writes the
    /// file if the last write is a second old.
    pub fn record(&mut self, p: &Pipeline, r: &StageReport) -> Result<(), CacheError> {
        if r.state.succeeded() {
            let kind = &p.stage(&r.name).expect("reports name stages").kind;
            self.lock.stages.insert(
                r.name.clone(),
                LockedStage {
                    kind: kind.name().to_string(),
                    version: kind.stage().version(),
                    key: r.key.clone().unwrap_or_default(),
                    params: canonical(&kind.params()),
                    inputs: r.inputs.clone(),
                    outs: r.outs.iter().map(|a| (a.path.clone(), a.hash.clone())).collect(),
                    metrics: r
                        .metrics
                        .iter()
                        .filter(|(name, _)| !is_timing(name))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                },
            );
        }
        if self.flushed.is_some_and(|at| at.elapsed() < FLUSH_EVERY) {
            return Ok(());
        }
        self.flush()
    }

    /// Writes the file if its text changed (it also drops stages no longer in the pipeline).
    pub fn flush(&mut self) -> Result<(), CacheError> {
        let value = serde_json::to_value(&self.lock).expect("lock files serialize");
        let text = format!("{HEADER}{}", yaml::to_yaml(&value));
        if text != self.written {
            write_atomic(&self.path, text.as_bytes())?;
            self.written = text;
        }
        self.flushed = Some(std::time::Instant::now());
        Ok(())
    }

    /// The cache keys of every recorded stage.
    pub fn keys(&self) -> std::collections::BTreeSet<String> {
        self.lock.stages.values().map(|s| s.key.clone()).collect()
    }
}

/// Why a stage would run again, or that it would not.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Staleness {
    UpToDate,
    NeverRun,
    CodeChanged { locked: u32, current: u32 },
    ParamsChanged { params: Vec<String> },
    InputChanged { path: String },
    UpstreamStale { stage: String },
    OutputMissing { path: String },
    OutputModified { path: String },
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Staleness::UpToDate => write!(f, "up to date"),
            Staleness::NeverRun => write!(f, "stale: never run"),
            Staleness::CodeChanged { locked, current } => {
                write!(f, "stale: code changed (version {locked} -> {current})")
            }
            Staleness::ParamsChanged { params } => {
                write!(f, "stale: params changed ({})", params.join(", "))
            }
            Staleness::InputChanged { path } => write!(f, "stale: input changed ({path})"),
            Staleness::UpstreamStale { stage } => {
                write!(f, "stale: upstream stage `{stage}` is stale")
            }
            Staleness::OutputMissing { path } => write!(f, "stale: output missing ({path})"),
            Staleness::OutputModified { path } => write!(f, "stale: output modified ({path})"),
        }
    }
}

/// Each stage's staleness, in an order where a stage follows those it needs.
pub fn status(p: &Pipeline, hasher: &Hasher) -> Vec<(String, Staleness)> {
    let lock = read(p);
    let mut result: BTreeMap<usize, Staleness> = BTreeMap::new();
    for i in p.dag.topo_order() {
        let s = &p.stages[i];
        let state = (|| {
            let Some(locked) = lock.stages.get(&s.name) else {
                return Staleness::NeverRun;
            };
            let version = s.kind.stage().version();
            if locked.version != version {
                return Staleness::CodeChanged {
                    locked: locked.version,
                    current: version,
                };
            }
            let params = canonical(&s.kind.params());
            if params != locked.params {
                return Staleness::ParamsChanged {
                    params: changed_keys(&locked.params, &params),
                };
            }
            if let Some(n) = p.dag.needs(i).find(|n| result.get(n) != Some(&Staleness::UpToDate)) {
                return Staleness::UpstreamStale {
                    stage: p.stages[n].name.clone(),
                };
            }
            let upstream: BTreeMap<String, Vec<Artifact>> = p
                .dag
                .needs(i)
                .map(|n| {
                    let name = &p.stages[n].name;
                    let outs = lock.stages[name]
                        .outs
                        .iter()
                        .map(|(path, hash)| Artifact {
                            path: path.clone(),
                            hash: hash.clone(),
                            size: 0,
                            files: None,
                        })
                        .collect();
                    (name.clone(), outs)
                })
                .collect();
            let inputs = match stage_inputs(p, i, hasher, &upstream) {
                Ok(inputs) => inputs,
                Err((path, _)) => return Staleness::InputChanged { path },
            };
            if let Some(path) = inputs
                .iter()
                .find(|(k, v)| locked.inputs.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .or_else(|| locked.inputs.keys().find(|k| !inputs.contains_key(*k)).cloned())
            {
                return Staleness::InputChanged { path };
            }
            for (path, hash) in &locked.outs {
                match hasher.artifact(&p.root, path) {
                    Err(_) => return Staleness::OutputMissing { path: path.clone() },
                    Ok(a) if &a.hash != hash => return Staleness::OutputModified { path: path.clone() },
                    Ok(_) => {}
                }
            }
            Staleness::UpToDate
        })();
        result.insert(i, state);
    }
    p.dag
        .topo_order()
        .into_iter()
        .map(|i| (p.stages[i].name.clone(), result[&i].clone()))
        .collect()
}

fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return vec!["with".into()];
    };
    let mut keys: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    keys
}
