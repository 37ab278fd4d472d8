//! Training runs: `POST /training` and the retraining policy start a pipeline run in the
//! background, one per pipeline at a time, recorded in the database stage by stage; exported
//! bundles are registered and, when better, promoted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::app::App;
use super::error::{Failure, Kind};
use super::training::{available, check_reads, find_pipeline, shell_safe, Running, ALREADY_RUNNING, COOLING_DOWN};
use crate::cache::Cache;
use crate::executors::Placement;
use crate::pipeline::exec::{self, Observer, Options};
use crate::pipeline::report::{StageReport, State};
use crate::pipeline::{Override, ParamValue, Pipeline, Stage};
use crate::store::{EventState, NewRun, RunStatus, Trigger};
use crate::tracking::Delivery;

/// The body of `POST /training`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = example_training_request())]
pub struct TrainingRequest {
    /// A pipeline of `GET /pipelines`.
    pub pipeline: String,
    /// Parameter overrides, as typed JSON scalars (never parsed as YAML).
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
    /// Stages to run, with what they need (all when empty).
    #[serde(default)]
    pub stages: Vec<String>,
}

fn example_training_request() -> Value {
    serde_json::json!({"pipeline": "imdb", "params": {"seed": 7}})
}

/// Starts a run of `request` for `trigger`: `POST /training`, and the retraining policy, which
/// passes its `cooldown` (see [`crate::store::Store::create_run`]).
pub fn start(
    app: &Arc<App>,
    request: TrainingRequest,
    trigger: Trigger,
    cooldown: Option<std::time::Duration>,
) -> Result<String, Failure> {
    let name = request.pipeline.as_str();
    let dir = &app.config.pipelines;
    let file = find_pipeline(dir, name).ok_or_else(|| {
        Failure::new(
            Kind::NotFound,
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
        Some((unknown, problem)) => Failure::new(
            Kind::NotFound,
            "unknown_parameter",
            format!(
                "pipeline `{name}` declares no parameter `{unknown}`; {}",
                problem.hint.as_deref().unwrap_or_default()
            ),
        ),
        None => Failure::new(Kind::Unprocessable, "invalid_pipeline", d.to_string()),
    })?;
    if let Some(unknown) = request.stages.iter().find(|s| pipeline.stage(s).is_none()) {
        return Err(Failure::new(
            Kind::NotFound,
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
            return Err(Failure::field(
                &format!("params.{param}"),
                format!(
                    "the value reaches the shell command of stage `{}`; values set through the API that do may hold only letters, digits and `._,:/=+-@%`",
                    stage.name
                ),
            ));
        }
    }
    check_reads(&app.config, &app.output_dirs, &pipeline)?;
    pipeline
        .check_placement(&app.offload.executors, app.offload.remote_cache.is_some())
        .map_err(|d| Failure::new(Kind::Unprocessable, "invalid_pipeline", d.to_string()))?;
    let stages = request.stages;
    let mut running = app.training.runs();
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
            return Err(Failure {
                run: Some(other.clone()),
                ..Failure::new(
                    Kind::Conflict,
                    ALREADY_RUNNING,
                    format!("pipeline `{name}` is already being trained by run `{other}`"),
                )
            })
        }
        NewRun::Cooling(until) => {
            return Err(Failure::new(
                Kind::Conflict,
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
                app.training.runs().remove(&name);
            })
            .map_err(|e| Failure::internal(format!("cannot start a training thread: {e}")))?
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
    Ok(id)
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
            .add_event(self.id, stage, EventState::Running, 0, &Value::Null, None, None);
        self.keep("run_event", r);
    }

    fn placed(&self, stage: &str, placement: &Placement) {
        let r = self.app.store.add_event(
            self.id,
            stage,
            EventState::Running,
            0,
            &Value::Null,
            None,
            Some(placement),
        );
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
            r.placement.as_ref(),
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
        let cache = app
            .offload
            .attach(Cache::open(&app.cache_dir).map_err(|e| e.to_string())?)?;
        let opts = Options {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            force: false,
            targets: stages,
            output_dirs: app.output_dirs.clone(),
            executors: app.offload.executors.clone(),
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

/// A `404` for an unknown run id.
pub fn no_run(id: &str) -> Failure {
    Failure::not_found("not_found", format!("no training run `{id}`"))
}

/// `POST /training/{id}/cancel`: a run of this server stops at the engine's next stop check;
/// the run of another server is cancelled by it when it next renews its leases.
pub fn cancel(app: &App, id: &str) -> Result<(), Failure> {
    let run = app.store.run(id)?.ok_or_else(|| no_run(id))?;
    let not_running = |status: RunStatus| {
        Failure::new(
            Kind::Conflict,
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
    Ok(())
}
