//! `POST /training`: pipeline runs in the background, one per pipeline at a time, recorded in
//! the database stage by stage; exported bundles are registered and, when better, promoted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use warp::http::{HeaderValue, StatusCode};

use super::{json_response, ApiError, ApiResult, App};
use crate::cache::Cache;
use crate::pipeline::exec::{self, Observer, Options, StageReport, State};
use crate::pipeline::Pipeline;
use crate::tracking::{Delivery, Tracker};

/// A run in progress: its id, its stop flag and its thread.
type Running = (String, Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

/// Training runs in progress, by pipeline name.
#[derive(Default)]
pub struct Trainer {
    running: Mutex<HashMap<String, Running>>,
}

impl Trainer {
    /// Asks every run to stop and waits for each to record how it ended.
    pub fn stop_all(&self) {
        let handles: Vec<_> = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running
                .values_mut()
                .map(|(_, cancel, handle)| {
                    cancel.store(true, Ordering::SeqCst);
                    handle.take()
                })
                .collect()
        };
        for h in handles.into_iter().flatten() {
            let _ = h.join();
        }
    }
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
pub fn list(app: &App) -> ApiResult {
    let dir = &app.config.pipelines;
    let pipelines: Vec<Value> = available(dir)
        .into_iter()
        .filter_map(|name| {
            let file = find_pipeline(dir, &name)?;
            Some(match Pipeline::load(&file, &[]) {
                Ok(p) => json!({
                    "name": name,
                    "params": p.params,
                    "stages": p.stages.iter().map(|s| json!({"name": s.name, "kind": s.kind.name(), "needs": s.needs})).collect::<Vec<_>>(),
                }),
                Err(d) => json!({"name": name, "error": d.to_string()}),
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "pipelines": pipelines })))
}

/// Turns a JSON parameter value into the `NAME=VALUE` form `--set` takes.
fn override_of(name: &str, value: &Value) -> Result<String, ApiError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(super::bad_field(
                &format!("params.{name}"),
                "must be a string, number or boolean",
            ))
        }
    };
    Ok(format!("{name}={text}"))
}

pub fn start(app: &Arc<App>, request: &Value) -> ApiResult {
    let name = request["pipeline"]
        .as_str()
        .ok_or_else(|| super::bad_field("pipeline", "missing or not a string"))?;
    let dir = &app.config.pipelines;
    let file = find_pipeline(dir, name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "pipeline_not_found",
            format!("no pipeline `{name}`; available: {:?}", available(dir)),
        )
    })?;
    let overrides: Vec<String> = match &request["params"] {
        Value::Null => Vec::new(),
        Value::Object(m) => m.iter().map(|(k, v)| override_of(k, v)).collect::<Result<_, _>>()?,
        _ => return Err(super::bad_field("params", "must be an object")),
    };
    let stages: Vec<String> = match &request["stages"] {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| super::bad_field(&format!("stages[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(super::bad_field("stages", "must be an array of stage names")),
    };
    // Unknown names are "not found", like an unknown pipeline; other problems make it invalid.
    let declared = Pipeline::load(&file, &[])
        .map_err(|d| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", d.to_string()))?;
    if let Some(unknown) = request["params"]
        .as_object()
        .and_then(|m| m.keys().find(|k| !declared.params.contains_key(*k)))
    {
        let known: Vec<&String> = declared.params.keys().collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_parameter",
            format!("pipeline `{name}` declares no parameter `{unknown}`; it declares {known:?}"),
        ));
    }
    if let Some(unknown) = stages.iter().find(|s| declared.stage(s).is_none()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_stage",
            format!("pipeline `{name}` has no stage `{unknown}`"),
        ));
    }
    let pipeline = Pipeline::load(&file, &overrides)
        .map_err(|d| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", d.to_string()))?;
    let mut running = app.training.running.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((id, _, _)) = running.get(name) {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            "already_running",
            format!("pipeline `{name}` is already being trained by run `{id}`"),
        );
        e.headers.push(("location", format!("/training/{id}")));
        return Err(e);
    }
    let id = format!(
        "run-{}",
        &crate::cache::sha256_hex(format!("{name}{:?}{}", std::time::SystemTime::now(), std::process::id()).as_bytes())
            [..16]
    );
    app.store.create_run(&id, name, &request["params"], &json!(stages))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let handle = {
        let (app, id, cancel) = (app.clone(), id.clone(), cancel.clone());
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("train-{name}"))
            .spawn(move || {
                run(&app, &id, &pipeline, stages, &cancel);
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
    running.insert(name.to_string(), (id.clone(), cancel, Some(handle)));
    let mut r = json_response(
        StatusCode::ACCEPTED,
        &json!({"id": id, "pipeline": name, "status": "running"}),
    );
    r.headers_mut().insert(
        "location",
        HeaderValue::from_str(&format!("/training/{id}")).expect("ids are ASCII"),
    );
    Ok(r)
}

/// Records what the engine reports into the run's rows.
struct Recorder<'a> {
    app: &'a App,
    id: &'a str,
}

impl Observer for Recorder<'_> {
    fn started(&self, stage: &str) {
        let _ = self
            .app
            .store
            .add_event(self.id, stage, "running", 0, &Value::Null, None);
    }

    fn finished(&self, r: &StageReport) {
        let state = serde_json::to_value(r.state).expect("states serialize");
        let _ = self.app.store.add_event(
            self.id,
            &r.name,
            state.as_str().unwrap_or("unknown"),
            r.duration_ms,
            &Value::Object(r.metrics.clone()),
            r.error.as_deref(),
        );
    }

    fn log(&self, stage: &str, line: &str) {
        let _ = self.app.store.add_log(self.id, stage, line);
    }

    fn warn(&self, message: &str) {
        tracing::warn!("{message}");
        let _ = self.app.store.add_log(self.id, "", message);
    }
}

fn run(app: &App, id: &str, pipeline: &Pipeline, stages: Vec<String>, cancel: &AtomicBool) {
    let recorder = Recorder { app, id };
    let outcome = (|| -> Result<(&str, Option<String>), String> {
        let cache = Cache::open(&app.cache_dir).map_err(|e| e.to_string())?;
        let opts = Options {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            force: false,
            targets: stages,
        };
        let report = exec::run(pipeline, &cache, &opts, cancel, &recorder).map_err(|e| e.to_string())?;
        if let Some(tracker) = Tracker::from_env() {
            match tracker.record(pipeline, &report, cache.dir()) {
                Ok(Delivery::Sent { run_id }) => recorder.log("", &format!("tracked as MLflow run {run_id}")),
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
            if let (Some((_, out)), State::Ran | State::Cached) = (stage.kind.bundle(), s.state) {
                match app.register(&pipeline.root.join(out), Some(id)) {
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
        Ok(if report.interrupted {
            ("interrupted", Some("the run was stopped".into()))
        } else if report.ok {
            ("succeeded", None)
        } else {
            let failed: Vec<String> = report
                .stages
                .iter()
                .filter(|s| s.state == State::Failed)
                .map(|s| format!("{}: {}", s.name, s.error.clone().unwrap_or_default()))
                .collect();
            ("failed", Some(failed.join("; ")))
        })
    })();
    let (status, error) = outcome.unwrap_or_else(|e| ("failed", Some(e)));
    app.metrics.training(status);
    if let Err(e) = app.store.finish_run(id, status, error.as_deref()) {
        tracing::error!("recording the end of run {id}: {e}");
    }
}

pub fn status(app: &App, id: &str) -> ApiResult {
    let run = app
        .store
        .run(id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no training run `{id}`")))?;
    let mut stages = serde_json::Map::new();
    for e in &run.events {
        let name = e["stage"].as_str().unwrap_or_default().to_string();
        stages.insert(
            name,
            json!({"state": e["state"], "duration_ms": e["duration_ms"], "metrics": e["metrics"], "error": e["error"]}),
        );
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": run.id, "pipeline": run.pipeline, "status": run.status, "error": run.error, "params": run.params,
                "stages": stages, "created_at": run.created_at, "finished_at": run.finished_at}),
    ))
}
