//! `sentiflow stage exec KEY`: runs one stage on a machine an executor chose. It takes the
//! stage's description and inputs from the remote cache, runs the same stage code as a local
//! run, and puts the outputs back, the run entry last: a worker killed midway publishes no
//! result, and the next attempt starts over.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::exec::{Unfinished, Work};
use super::key::cache_key;
use super::task::{trial_key, Task};
use crate::cache::{Cache, CacheError, RunEntry, Transfer};
use crate::stages::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "this worker runs sentiflow {mine}, the client {client}: a stage's result must not depend on which \
         machine ran it, so install sentiflow {client} on the cluster's nodes (or use its image), or run the \
         client at {mine}"
    )]
    Version { mine: String, client: String },
    #[error("the remote cache {url} has no task {key}: the client stores it before submitting the job; is this the client's --remote-cache?")]
    NoTask { url: String, key: String },
    #[error("task {key} in the remote cache is not readable: {reason}")]
    BadTask { key: String, reason: String },
    #[error(
        "task {key}: this worker computes the key {computed} for it; the stage's code or inputs differ from the \
         client's"
    )]
    KeyMismatch { key: String, computed: String },
    #[error("stage `{stage}`: {message}")]
    Stage { stage: String, message: String },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// How a worker's run ended well.
pub enum Done {
    /// The remote cache had the result already (an earlier attempt finished it).
    Already,
    /// It ran the stage and published its result.
    Ran { transfer: Transfer },
}

/// Runs the task stored under `key` in `cache`'s remote (only its trial `trial`, for a search
/// whose trials are jobs), in a scratch project under `scratch`. `cache` is the worker's own (a
/// scratch directory too): only the remote is shared.
pub fn exec(
    cache: &Cache,
    key: &str,
    trial: Option<usize>,
    client_version: &str,
    scratch: &Path,
    cancel: &AtomicBool,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Done, WorkerError> {
    let mine = env!("CARGO_PKG_VERSION");
    if client_version != mine {
        return Err(WorkerError::Version {
            mine: mine.into(),
            client: client_version.into(),
        });
    }
    let result_key = match trial {
        Some(i) => trial_key(key, i),
        None => key.to_string(),
    };
    if cache.remote_has(&result_key)? {
        log(&format!("the remote cache has the result of {result_key} already"));
        return Ok(Done::Already);
    }
    let url = cache.remote().map(|r| r.url().to_string()).unwrap_or_default();
    let bytes = cache.task(key)?.ok_or_else(|| WorkerError::NoTask {
        url: url.clone(),
        key: key.into(),
    })?;
    let task: Task = serde_json::from_slice(&bytes).map_err(|e| WorkerError::BadTask {
        key: key.into(),
        reason: e.to_string(),
    })?;
    let foreign = |outs: &[crate::cache::Artifact]| {
        let entry = RunEntry {
            stage: String::new(),
            kind: String::new(),
            outs: outs.to_vec(),
            metrics: Default::default(),
            duration_ms: 0,
        };
        entry.check_foreign()
    };
    let mut inputs = BTreeMap::new();
    for outs in task.needs.iter().map(|n| &n.outs).chain(std::iter::once(&task.deps)) {
        foreign(outs).map_err(|reason| WorkerError::BadTask {
            key: key.into(),
            reason,
        })?;
        let got = cache.fetch_artifacts(outs, key)?;
        if got.objects > 0 {
            log(&format!("fetched {} input objects ({} bytes)", got.objects, got.bytes));
        }
        cache.restore(scratch, outs)?;
        inputs.extend(outs.iter().map(|a| (a.path.clone(), a.hash.clone())));
    }
    let kind = &task.kind;
    let computed = cache_key(kind.name(), kind.stage().version(), &kind.params(), &inputs);
    if computed != key {
        return Err(WorkerError::KeyMismatch {
            key: key.into(),
            computed,
        });
    }
    let mut upstream = Vec::new();
    for n in &task.needs {
        let kind = crate::stages::KINDS
            .iter()
            .copied()
            .find(|k| *k == n.kind)
            .ok_or_else(|| WorkerError::BadTask {
                key: key.into(),
                reason: format!("stage `{}` is of unknown kind `{}`", n.name, n.kind),
            })?;
        upstream.push(Upstream {
            name: n.name.clone(),
            kind,
            outs: n.outs.iter().map(|a| scratch.join(&a.path)).collect(),
        });
    }
    let what = trial.map(|i| format!("trial {i} of ")).unwrap_or_default();
    log(&format!(
        "running {what}stage `{}` of pipeline `{}` ({})",
        task.stage,
        task.pipeline,
        kind.name()
    ));
    let work = Work {
        root: scratch,
        pipeline: &task.pipeline,
        stage: &task.stage,
        kind,
        upstream: &upstream,
        inputs: &inputs,
        trials: None,
    };
    let unfinished = |e| match e {
        Unfinished::Interrupted => WorkerError::Interrupted,
        Unfinished::Failed(message) => WorkerError::Stage {
            stage: task.stage.clone(),
            message,
        },
    };
    let entry = match trial {
        Some(i) => {
            let (outs, duration_ms) = work.perform_trial(cache, cancel, log, i).map_err(unfinished)?;
            RunEntry {
                stage: format!("{} trial {i}", task.stage),
                kind: kind.name().to_string(),
                outs,
                metrics: Default::default(),
                duration_ms,
            }
        }
        None => {
            let (outs, metrics, duration_ms) = work.perform(cache, cancel, log).map_err(unfinished)?;
            RunEntry {
                stage: task.stage.clone(),
                kind: kind.name().to_string(),
                outs,
                metrics,
                duration_ms,
            }
        }
    };
    cache.record(&result_key, &entry)?;
    let transfer = cache.push(&result_key, &entry)?;
    Ok(Done::Ran { transfer })
}
