//! `POST /training`: pipeline runs in the background, one per pipeline at a time, recorded in
//! the database stage by stage; exported bundles are registered and, when better, promoted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use warp::http::StatusCode;

use super::api::{
    LogLine, PipelineInfo, Pipelines, StageInfo, StageOutcome, TrainingCancelled, TrainingLogs, TrainingQuery,
    TrainingRequest, TrainingRun, TrainingRuns, TrainingStarted,
};
use super::config::Config;
use super::error::ApiError;
use super::policy::RetrainPolicy;
use super::App;
use crate::cache::Cache;
use crate::pipeline::exec::{self, Observer, Options};
use crate::pipeline::report::{StageReport, State};
use crate::pipeline::{real_path, Override, Pipeline, Stage};
use crate::store::{EventState, NewRun, RunFilter, RunStatus, Trigger};
use crate::tracking::Delivery;

/// A run in progress.
struct Running {
    id: String,
    /// The engine's stop flag, checked between and within stages.
    stop: Arc<AtomicBool>,
    /// Set with `stop` when the run was cancelled, so it ends `cancelled`, not `interrupted`.
    cancelled: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Training runs in progress, by pipeline name.
#[derive(Default)]
pub struct Trainer {
    running: Mutex<HashMap<String, Running>>,
}

/// How long a stopping server waits for its trainings to reach a point where they can stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Trainer {
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
    pub fn stop_all(&self, app: &App) {
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
                if let Err(e) = app
                    .store
                    .finish_run(&id, RunStatus::Interrupted, Some("the server stopped"))
                {
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
fn find_pipeline(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.extension().is_some_and(|x| x == "yaml") && p.file_stem().is_some_and(|s| s.to_string_lossy() == name)
    })
}

fn available(dir: &std::path::Path) -> Vec<String> {
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

/// `GET /pipelines`: each pipeline the server may run, with its parameters and its stages.
pub fn list(app: &App) -> Pipelines {
    let dir = &app.config.pipelines;
    let pipelines = available(dir)
        .into_iter()
        .filter_map(|name| {
            let file = find_pipeline(dir, &name)?;
            Some(match Pipeline::load(&file, &[]) {
                Ok(p) => PipelineInfo {
                    name,
                    params: Some(
                        p.params
                            .into_iter()
                            .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
                            .collect(),
                    ),
                    stages: Some(
                        p.stages
                            .iter()
                            .map(|s| StageInfo {
                                name: s.name.clone(),
                                kind: s.kind.name().to_string(),
                                needs: s.needs.clone(),
                            })
                            .collect(),
                    ),
                    error: None,
                },
                Err(d) => PipelineInfo {
                    name,
                    params: None,
                    stages: None,
                    error: Some(d.to_string()),
                },
            })
        })
        .collect();
    Pipelines { pipelines }
}

/// Characters a parameter value that reaches a shell command may hold: enough for names,
/// numbers and paths, none that the shell would interpret.
fn shell_safe(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._,:/=+-@%".contains(c))
}

/// Refuses a run whose stages would read files outside the project root and the directories
/// `--data-dirs` allows: an API key must not reach the rest of the machine through `params`.
fn check_reads(app: &App, pipeline: &Pipeline) -> Result<(), ApiError> {
    // What a training may write (`--output-dirs`), it may read back.
    let allowed: Vec<PathBuf> = std::iter::once(pipeline.root.clone())
        .chain(app.config.data_dirs.iter().cloned())
        .chain(app.output_dirs.iter().cloned())
        .map(|d| real_path(&d))
        .collect();
    for stage in &pipeline.stages {
        for dep in stage.kind.stage().deps() {
            let real = real_path(&pipeline.root.join(&dep));
            if !allowed.iter().any(|a| real.starts_with(a)) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
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

/// Starts a run of `request` for `trigger`: `POST /training`, and the retraining policy, which
/// passes its `cooldown` (see [`crate::store::Store::create_run`]).
pub fn start(
    app: &Arc<App>,
    request: TrainingRequest,
    trigger: Trigger,
    cooldown: Option<std::time::Duration>,
) -> Result<TrainingStarted, ApiError> {
    let name = request.pipeline.as_str();
    let dir = &app.config.pipelines;
    let file = find_pipeline(dir, name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "pipeline_not_found",
            format!("no pipeline `{name}`; available: {:?}", available(dir)),
        )
    })?;
    let overrides: Vec<Override> = request
        .params
        .iter()
        .map(|(k, v)| Override {
            name: k.clone(),
            value: v.clone(),
        })
        .collect();
    // Unknown names are "not found", like an unknown pipeline; other problems make it invalid.
    let pipeline = Pipeline::load(&file, &overrides).map_err(|d| match d.unknown_parameter() {
        Some((unknown, problem)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_parameter",
            format!(
                "pipeline `{name}` declares no parameter `{unknown}`; {}",
                problem.hint.as_deref().unwrap_or_default()
            ),
        ),
        None => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", d.to_string()),
    })?;
    if let Some(unknown) = request.stages.iter().find(|s| pipeline.stage(s).is_none()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_stage",
            format!("pipeline `{name}` has no stage `{unknown}`"),
        ));
    }
    // A value is interpolated into a shell command as its text, verbatim.
    for (param, value) in overrides
        .iter()
        .filter_map(|o| Some((&o.name, pipeline.params.get(&o.name)?)))
    {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if shell_safe(&text) {
            continue;
        }
        let reaches_shell = |s: &&Stage| {
            let shell = s.kind.stage().shell_fields();
            s.param_uses
                .iter()
                .any(|u| &u.param == param && shell.contains(&u.field.as_str()))
        };
        if let Some(stage) = pipeline.stages.iter().find(reaches_shell) {
            return Err(ApiError::field(
                &format!("params.{param}"),
                format!(
                    "the value reaches the shell command of stage `{}`; values set through the API that do may hold only letters, digits and `._,:/=+-@%`",
                    stage.name
                ),
            ));
        }
    }
    check_reads(app, &pipeline)?;
    let stages = request.stages;
    let mut running = app.training.running.lock().unwrap_or_else(|p| p.into_inner());
    let id = format!(
        "run-{}",
        &crate::cache::sha256_hex(
            format!(
                "{name}{:?}{}{}",
                std::time::SystemTime::now(),
                std::process::id(),
                app.replica
            )
            .as_bytes()
        )[..16]
    );
    // The database decides, so that one run per pipeline holds across every server sharing it.
    let created = app.store.create_run(
        &id,
        name,
        trigger,
        &json!(request.params),
        &json!(stages),
        &app.replica,
        app.config.run_lease(),
        cooldown,
    )?;
    match created {
        NewRun::Created => {}
        NewRun::Busy(other) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ALREADY_RUNNING,
                format!("pipeline `{name}` is already being trained by run `{other}`"),
            )
            .with_header("location", format!("/training/{other}")))
        }
        NewRun::Cooling(until) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                COOLING_DOWN,
                format!("cooldown until {until} (an automatic run of `{name}` started less than the cooldown ago)"),
            ))
        }
    }
    let (stop, cancelled) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let handle = {
        let (app, id, stop, cancelled) = (app.clone(), id.clone(), stop.clone(), cancelled.clone());
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("train-{name}"))
            .spawn(move || {
                // Everything the run logs names it.
                let _span = tracing::info_span!("training", run_id = %id, pipeline = %name).entered();
                yield_to_requests(app.config.training_nice);
                tracing::info!(trigger = trigger.as_str(), "training started");
                run(&app, &id, &pipeline, stages, &stop, &cancelled);
                app.training
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
            })
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("cannot start a training thread: {e}"),
                )
            })?
    };
    running.insert(
        name.to_string(),
        Running {
            id: id.clone(),
            stop,
            cancelled,
            thread: Some(handle),
        },
    );
    Ok(TrainingStarted {
        id,
        pipeline: name.to_string(),
        status: RunStatus::Running,
    })
}

/// Lowers the calling thread's priority to `nice`. On Linux the nice value is per thread and is
/// inherited by the threads and processes it starts, so the run's stage pool and programs run
/// at it too, and requests keep their latency while a training computes.
fn yield_to_requests(nice: i32) {
    // SAFETY: gettid and setpriority on the calling thread only.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        tracing::warn!(
            "lowering the training's priority: {}; it competes with requests",
            std::io::Error::last_os_error()
        );
    }
}

/// Records what the engine reports into the run's rows.
struct Recorder<'a> {
    app: &'a App,
    id: &'a str,
}

impl Recorder<'_> {
    /// Run events are bookkeeping beside the run: a failed write is logged and counted, and the
    /// run goes on.
    fn keep(&self, what: &'static str, result: Result<(), crate::store::StoreError>) {
        if let Err(e) = result {
            tracing::warn!("recording run {}: {e}", self.id);
            self.app.metrics.store_failure(what);
        }
    }
}

impl Observer for Recorder<'_> {
    fn started(&self, stage: &str) {
        // Stages run on the engine's threads, outside the run's span: name the run.
        tracing::info!(run_id = self.id, stage, "stage started");
        let r = self
            .app
            .store
            .add_event(self.id, stage, EventState::Running, 0, &Value::Null, None);
        self.keep("run_event", r);
    }

    fn finished(&self, r: &StageReport) {
        tracing::info!(run_id = self.id, stage = %r.name, state = ?r.state, duration_ms = r.duration_ms, "stage finished");
        let written = self.app.store.add_event(
            self.id,
            &r.name,
            r.state.into(),
            r.duration_ms,
            &Value::Object(r.metrics.clone()),
            r.error.as_deref(),
        );
        self.keep("run_event", written);
        // The run's log tells the whole story: a failed stage's error is in it too.
        if let Some(error) = &r.error {
            let r = self.app.store.add_log(self.id, &r.name, &format!("error: {error}"));
            self.keep("run_log", r);
        }
    }

    fn log(&self, stage: &str, line: &str) {
        let r = self.app.store.add_log(self.id, stage, line);
        self.keep("run_log", r);
    }

    fn warn(&self, message: &str) {
        tracing::warn!(run_id = self.id, "{message}");
        let r = self.app.store.add_log(self.id, "", message);
        self.keep("run_log", r);
    }
}

fn run(app: &App, id: &str, pipeline: &Pipeline, stages: Vec<String>, stop: &AtomicBool, cancelled: &AtomicBool) {
    let recorder = Recorder { app, id };
    let outcome = (|| -> Result<(RunStatus, Option<String>), String> {
        let cache = Cache::open(&app.cache_dir).map_err(|e| e.to_string())?;
        let opts = Options {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            force: false,
            targets: stages,
            output_dirs: app.output_dirs.clone(),
        };
        let report = exec::run(pipeline, &cache, &opts, stop, &recorder).map_err(|e| e.to_string())?;
        if let Some(tracker) = &app.tracker {
            match tracker.record(pipeline, &report, cache.dir()) {
                Ok(Delivery::Sent { run_id }) => {
                    recorder.log("", &format!("tracked as MLflow run {run_id}"));
                    recorder.keep("run_mlflow_id", app.store.set_mlflow_run(id, &run_id));
                }
                Ok(Delivery::Queued { pending, error, .. }) => recorder.warn(&format!(
                    "MLflow did not take the run ({error}); {pending} events queued: send them with `sentiflow tracking sync`"
                )),
                Err(e) => recorder.warn(&format!("the run was not recorded in MLflow: {e}")),
            }
        }
        for s in &report.stages {
            let Some(stage) = pipeline.stage(&s.name) else {
                continue;
            };
            if let Some((_, out)) = stage.kind.bundle().filter(|_| s.state.succeeded()) {
                match app.registry.register(&app.store, &pipeline.root.join(out), Some(id)) {
                    Ok(row) => match app.maybe_promote(&row) {
                        Ok(true) => recorder.log("", &format!("model {} version {} promoted", row.name, row.version)),
                        Ok(false) => {
                            recorder.log("", &format!("model {} version {} registered", row.name, row.version))
                        }
                        Err(e) => recorder.warn(&format!("promoting {}: {}", row.version, e.message)),
                    },
                    Err(e) => recorder.warn(&format!("registering {out}: {e}")),
                }
            }
        }
        Ok(if report.interrupted && cancelled.load(Ordering::SeqCst) {
            (RunStatus::Cancelled, Some("cancelled on request".into()))
        } else if report.interrupted {
            (RunStatus::Interrupted, Some("the run was stopped".into()))
        } else if report.ok {
            (RunStatus::Succeeded, None)
        } else {
            let failed: Vec<String> = report
                .stages
                .iter()
                .filter(|s| s.state == State::Failed)
                .map(|s| format!("{}: {}", s.name, s.error.clone().unwrap_or_default()))
                .collect();
            (RunStatus::Failed, Some(failed.join("; ")))
        })
    })();
    let (status, error) = outcome.unwrap_or_else(|e| (RunStatus::Failed, Some(e)));
    tracing::info!(
        run_id = id,
        status = status.as_str(),
        error = error.as_deref(),
        "training finished"
    );
    app.metrics.training(status.as_str());
    if let Err(e) = app.store.finish_run(id, status, error.as_deref()) {
        tracing::error!("recording the end of run {id}: {e}");
    }
}

fn no_run(id: &str) -> ApiError {
    ApiError::not_found("not_found", format!("no training run `{id}`"))
}

/// `GET /training/{id}`: the run and each stage's last state.
pub fn status(app: &App, id: &str) -> Result<TrainingRun, ApiError> {
    let run = app.store.run(id)?.ok_or_else(|| no_run(id))?;
    let mut stages = std::collections::BTreeMap::new();
    for e in run.events {
        let outcome = StageOutcome {
            state: e.state,
            duration_ms: e.duration_ms,
            metrics: e.metrics,
            error: e.error,
        };
        stages.insert(e.stage, outcome);
    }
    Ok(TrainingRun {
        id: run.id,
        pipeline: run.pipeline,
        status: run.status,
        trigger: run.trigger,
        error: run.error,
        params: run.params,
        stages,
        created_at: run.created_at,
        finished_at: run.finished_at,
        mlflow_run_id: run.mlflow_run_id,
    })
}

/// Most runs one `GET /training` answer lists.
pub const MAX_LIMIT: u32 = 100;

/// `GET /training`: the runs the query selects, newest first.
pub fn list_runs(app: &App, query: TrainingQuery) -> Result<TrainingRuns, ApiError> {
    if !(1..=MAX_LIMIT).contains(&query.limit) {
        return Err(ApiError::field(
            "limit",
            format!(
                "{} is out of range: list 1 to {MAX_LIMIT} runs a page, with `offset` for the next",
                query.limit
            ),
        ));
    }
    let filter = RunFilter {
        pipeline: query.pipeline,
        status: query.status,
        trigger: query.trigger,
        limit: query.limit,
        offset: query.offset,
    };
    let (runs, total) = app.store.runs(&filter)?;
    Ok(TrainingRuns {
        runs,
        total,
        limit: filter.limit,
        offset: filter.offset,
        mlflow_ui: app.tracker.as_ref().map(|t| t.base().to_string()),
    })
}

/// `POST /training/{id}/cancel`: a run of this server stops at the engine's next stop check;
/// the run of another server is cancelled by it when it next renews its leases.
pub fn cancel(app: &App, id: &str) -> Result<TrainingCancelled, ApiError> {
    let run = app.store.run(id)?.ok_or_else(|| no_run(id))?;
    let not_running = |status: RunStatus| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!("run `{id}` is not running: it ended `{}`", status.as_str()),
        )
    };
    if run.status != RunStatus::Running {
        return Err(not_running(run.status));
    }
    if !app.training.cancel(id) && !app.store.request_cancel(id)? {
        // It ended between the two reads.
        let status = app.store.run(id)?.map_or(RunStatus::Interrupted, |r| r.status);
        return Err(not_running(status));
    }
    tracing::info!(run_id = id, "training run cancelled on request");
    Ok(TrainingCancelled {
        id: id.to_string(),
        status: RunStatus::Cancelled,
    })
}

/// `GET /training/{id}/logs`.
pub fn logs(app: &App, id: &str) -> Result<TrainingLogs, ApiError> {
    if app.store.run(id)?.is_none() {
        return Err(no_run(id));
    }
    let lines = app
        .store
        .logs(id)?
        .into_iter()
        .filter_map(|l| serde_json::from_value::<LogLine>(l).ok())
        .collect();
    Ok(TrainingLogs {
        id: id.to_string(),
        lines,
    })
}
