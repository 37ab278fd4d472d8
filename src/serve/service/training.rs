//! Training runs in progress on this server, and the checks a run passes before it starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::config::Config;
use super::error::{Failure, Kind};
use super::policy::RetrainPolicy;
use crate::cache::{Cache, Remote};
use crate::executors::Executors;
use crate::pipeline::{real_path, Pipeline};
use crate::store::{RunStatus, Store};

/// A run in progress.
pub struct Running {
    pub id: String,
    /// The engine's stop flag, checked between and within stages.
    pub stop: Arc<AtomicBool>,
    /// Set with `stop` when the run was cancelled, so it ends `cancelled`, not `interrupted`.
    pub cancelled: Arc<AtomicBool>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

/// Training runs in progress, by pipeline name.
#[derive(Default)]
pub struct Trainer {
    running: Mutex<HashMap<String, Running>>,
}

/// How long a stopping server waits for its trainings to reach a point where they can stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Trainer {
    /// The runs of this server by pipeline, held while a run is decided and started so that a
    /// pipeline never starts twice here.
    pub fn runs(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels run `id` when this server runs it: it stops at the engine's next stop check.
    pub fn cancel(&self, id: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(run) = running.values().find(|r| r.id == id) else {
            return false;
        };
        run.cancelled.store(true, Ordering::SeqCst);
        run.stop.store(true, Ordering::SeqCst);
        true
    }

    /// Asks every run to stop and waits, at most `STOP_GRACE`, for each to record how it ended.
    /// A run still going then (a stage computing without checking for a stop) is recorded as
    /// interrupted here, and ends with the process.
    pub fn stop_all(&self, store: &Store) {
        let runs: Vec<_> = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running
                .values_mut()
                .map(|run| {
                    run.stop.store(true, Ordering::SeqCst);
                    (run.id.clone(), run.thread.take())
                })
                .collect()
        };
        let deadline = std::time::Instant::now() + STOP_GRACE;
        for (id, handle) in runs {
            let Some(handle) = handle else { continue };
            while !handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::warn!("training run {id} did not stop within {STOP_GRACE:?}; recording it as interrupted");
                if let Err(e) = store.finish_run(&id, RunStatus::Interrupted, Some("the server stopped")) {
                    tracing::error!("recording the end of run {id}: {e}");
                }
            }
        }
    }
}

/// Codes of the refusals the retraining policy tells apart.
pub const ALREADY_RUNNING: &str = "already_running";
pub const COOLING_DOWN: &str = "cooling_down";

/// Refuses a retraining policy whose pipeline is not among the pipeline files.
pub fn check_policy(config: &Config, policy: &RetrainPolicy) -> anyhow::Result<()> {
    let dir = &config.pipelines;
    if find_pipeline(dir, &policy.pipeline).is_none() {
        anyhow::bail!(
            "retraining policy: no pipeline `{}` in {}; available: {:?} (set `retrain.pipeline` or --retrain-pipeline)",
            policy.pipeline,
            dir.display(),
            available(dir)
        );
    }
    tracing::info!(
        "retraining {} on {:?}, every {}, at most once per {}",
        policy.pipeline,
        policy.on,
        policy.every.map_or("(never)".to_string(), |e| e.to_string()),
        policy.cooldown
    );
    Ok(())
}

/// Finds `name` among the pipeline files: names are matched against the directory listing and
/// never used to build a path.
pub fn find_pipeline(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.extension().is_some_and(|x| x == "yaml") && p.file_stem().is_some_and(|s| s.to_string_lossy() == name)
    })
}

pub fn available(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// Characters a parameter value that reaches a shell command may hold: enough for names,
/// numbers and paths, none that the shell would interpret.
pub fn shell_safe(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._,:/=+-@%".contains(c))
}

/// Refuses a run whose stages would read files outside the project root and the directories
/// `--data-dirs` allows: an API key must not reach the rest of the machine through `params`.
pub fn check_reads(config: &Config, output_dirs: &[PathBuf], pipeline: &Pipeline) -> Result<(), Failure> {
    // What a training may write (`--output-dirs`), it may read back.
    let allowed: Vec<PathBuf> = std::iter::once(pipeline.root.clone())
        .chain(config.data_dirs.iter().cloned())
        .chain(output_dirs.iter().cloned())
        .map(|d| real_path(&d))
        .collect();
    for stage in &pipeline.stages {
        for dep in stage.kind.stage().deps() {
            let real = real_path(&pipeline.root.join(&dep));
            if !allowed.iter().any(|a| real.starts_with(a)) {
                return Err(Failure::new(
                    Kind::Forbidden,
                    "data_not_allowed",
                    format!(
                        "stage `{}` would read `{dep}`, which is outside the project root and the allowed data \
                         directories; move the data under the project root, or start the server with \
                         `--data-dirs DIR` (SENTIFLOW_DATA_DIRS)",
                        stage.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Where the server's training runs send stages: the settings file's executors, and the remote
/// cache that carries their inputs and outputs.
#[derive(Default)]
pub struct Offload {
    pub executors: Executors,
    /// The remote cache's URL and the team's secret that signs its entries.
    pub remote_cache: Option<(String, Option<String>)>,
}

impl Offload {
    /// `cache` with the remote cache attached, when there is one.
    pub fn attach(&self, cache: Cache) -> Result<Cache, String> {
        match &self.remote_cache {
            Some((url, secret)) => Remote::open(url, secret.as_deref())
                .map(|r| cache.with_remote(r))
                .map_err(|e| e.to_string()),
            None => Ok(cache),
        }
    }
}
