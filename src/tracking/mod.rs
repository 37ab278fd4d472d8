//! Experiment tracking in MLflow, through its REST API (no Python in the runner).
//!
//! With `MLFLOW_TRACKING_URI` set, each pipeline run becomes an MLflow run in an experiment named
//! after the pipeline (`<pipeline>-<first 8 characters of the run id>`): stage parameters and
//! metrics (flattened as `stage.name`), stage cache keys as tags, MLflow's source, git and user
//! tags, the data sets it read as inputs (each `load` stage's data for `training`, the split's
//! validation part for `validation`), each tuning trial as a nested child run named after its
//! parameters, artifacts (the tuning table, metrics, and PNG plots: confusion matrix, ROC curve,
//! score against C), and each exported bundle as an MLflow 3 logged model (its files, with the
//! `python_function` flavor, and its validation metrics) registered as a new version of the
//! model `<pipeline>-<bundle name>`.
//!
//! A server that is down or slow never fails a pipeline: the events are sent in order, each
//! retried with backoff for a bounded time; what could not be sent stays in an outbox under
//! `<cache>/tracking/` (with its own copy of the files to upload) and `sentiflow tracking sync`
//! sends it later, resuming where it stopped.

pub mod api;
mod error;
mod fields;
mod plan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::pipeline::report::Report;
use crate::pipeline::Pipeline;
use fields::{key, now_ms};
use plan::Event;

pub use error::TrackingError;

pub struct Tracker {
    base: String,
    agent: ureq::Agent,
}

impl Tracker {
    /// A tracker for `MLFLOW_TRACKING_URI`, when it is set to an HTTP server.
    pub fn from_env() -> Option<Tracker> {
        let uri = std::env::var("MLFLOW_TRACKING_URI").ok()?;
        if !uri.starts_with("http://") && !uri.starts_with("https://") {
            tracing::warn!("MLFLOW_TRACKING_URI={uri}: only http(s) tracking servers are supported; not tracking");
            return None;
        }
        Some(Tracker::new(&uri))
    }

    pub fn new(uri: &str) -> Tracker {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(5)))
                .timeout_global(Some(Duration::from_secs(20)))
                .build(),
        );
        Tracker {
            base: uri.trim_end_matches('/').to_string(),
            agent,
        }
    }

    /// The server's address, which is also its UI's.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<(u16, Value), TrackingError> {
        let url = format!("{}{path}", self.base);
        let err = |message: String| TrackingError::Http {
            url: url.clone(),
            message,
        };
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("PATCH", Some(b)) => self
                .agent
                .patch(&url)
                .header("Content-Type", "application/json")
                .send(b),
            (_, Some(b)) => self.agent.post(&url).header("Content-Type", "application/json").send(b),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut response = result.map_err(|e| err(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| err(e.to_string()))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    fn api(&self, method: &str, path: &str, body: &impl Serialize) -> Result<Value, TrackingError> {
        let body = serde_json::to_string(body).expect("requests serialize");
        let (status, value) = self.call(method, &format!("/api/2.0/mlflow/{path}"), Some(body))?;
        if status >= 300 {
            return Err(TrackingError::Http {
                url: format!("{}/api/2.0/mlflow/{path}", self.base),
                message: format!("HTTP {status}: {value}"),
            });
        }
        Ok(value)
    }

    fn experiment(&self, name: &str) -> Result<String, TrackingError> {
        let path = format!(
            "/api/2.0/mlflow/experiments/get-by-name?experiment_name={}",
            encode(name)
        );
        let (status, value) = self.call("GET", &path, None)?;
        if status < 300 {
            return Ok(value["experiment"]["experiment_id"]
                .as_str()
                .unwrap_or_default()
                .to_string());
        }
        let created = self.api("POST", "experiments/create", &json!({"name": name}))?;
        Ok(created["experiment_id"].as_str().unwrap_or_default().to_string())
    }

    fn create_run(
        &self,
        experiment: &str,
        name: &str,
        tags: Vec<Value>,
        start_ms: u64,
    ) -> Result<(String, String), TrackingError> {
        let run = self.api(
            "POST",
            "runs/create",
            &json!({"experiment_id": experiment, "run_name": name, "start_time": start_ms, "tags": tags}),
        )?;
        let info = &run["run"]["info"];
        Ok((
            info["run_id"].as_str().unwrap_or_default().to_string(),
            info["artifact_uri"].as_str().unwrap_or_default().to_string(),
        ))
    }

    fn log_batch(
        &self,
        run: &str,
        params: &[(String, String)],
        metrics: &[(String, f64, i64)],
        tags: &[(String, String)],
        ts: u64,
    ) -> Result<(), TrackingError> {
        // MLflow takes at most 100 parameters and 1000 metrics a request.
        for chunk in params.chunks(100) {
            let params: Vec<Value> = chunk.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            self.api("POST", "runs/log-batch", &json!({"run_id": run, "params": params}))?;
        }
        for chunk in metrics.chunks(1000) {
            let metrics: Vec<api::Metric> = chunk
                .iter()
                .map(|(key, value, step)| api::Metric {
                    key,
                    value: *value,
                    timestamp: ts,
                    step: *step,
                    model_id: None,
                    dataset_name: None,
                    dataset_digest: None,
                })
                .collect();
            self.api(
                "POST",
                "runs/log-batch",
                &api::LogMetrics {
                    run_id: run,
                    metrics: &metrics,
                },
            )?;
        }
        if !tags.is_empty() {
            let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            self.api("POST", "runs/log-batch", &json!({"run_id": run, "tags": tags}))?;
        }
        Ok(())
    }

    /// Uploads a file as artifact `dest` of the run whose artifact URI is `artifact_uri`
    /// (`mlflow-artifacts:/…`, the server proxying its artifact store).
    fn upload(&self, artifact_uri: &str, dest: &str, file: &Path) -> Result<(), TrackingError> {
        let Some(rest) = artifact_uri.strip_prefix("mlflow-artifacts:/") else {
            return Err(TrackingError::Http {
                url: self.base.clone(),
                message: format!("artifact URI `{artifact_uri}` is not served by the tracking server (start it with --serve-artifacts)"),
            });
        };
        let bytes = std::fs::read(file).map_err(|source| TrackingError::Io {
            path: file.display().to_string(),
            source,
        })?;
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{dest}",
            self.base,
            rest.trim_matches('/')
        );
        let response = self.agent.put(&url).send(&bytes[..]).map_err(|e| TrackingError::Http {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if response.status().as_u16() >= 300 {
            return Err(TrackingError::Http {
                url,
                message: format!("HTTP {}", response.status()),
            });
        }
        Ok(())
    }

    /// Sends one event of `outbox`, recording the ids of the runs it creates.
    fn send(&self, outbox: &mut Outbox, event: &Event) -> Result<(), TrackingError> {
        let run = |outbox: &Outbox, handle: &str| -> Result<(String, String), TrackingError> {
            outbox.runs.get(handle).cloned().ok_or_else(|| TrackingError::Http {
                url: self.base.clone(),
                message: format!("run `{handle}` was never created"),
            })
        };
        match event {
            Event::CreateRun {
                handle,
                name,
                parent,
                tags,
                start_ms,
            } => {
                if outbox.experiment_id.is_none() {
                    outbox.experiment_id = Some(self.experiment(&outbox.experiment)?);
                }
                let mut tags: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
                if let Some(parent) = parent {
                    tags.push(json!({"key": "mlflow.parentRunId", "value": run(outbox, parent)?.0}));
                }
                let experiment = outbox.experiment_id.clone().unwrap_or_default();
                let ids = self.create_run(&experiment, name, tags, *start_ms)?;
                outbox.runs.insert(handle.clone(), ids);
            }
            Event::LogBatch {
                handle,
                params,
                metrics,
                tags,
                timestamp_ms,
            } => self.log_batch(&run(outbox, handle)?.0, params, metrics, tags, *timestamp_ms)?,
            Event::Upload { handle, dest, file } => self.upload(&run(outbox, handle)?.1, dest, file)?,
            Event::RegisterModel {
                handle,
                model,
                dest,
                logged_model,
            } => {
                let (run_id, artifacts) = run(outbox, handle)?;
                let (status, value) = self.call(
                    "POST",
                    "/api/2.0/mlflow/registered-models/create",
                    Some(json!({"name": model}).to_string()),
                )?;
                // 400 RESOURCE_ALREADY_EXISTS: a version is added to the existing model.
                if status >= 300 && value["error_code"] != "RESOURCE_ALREADY_EXISTS" {
                    return Err(TrackingError::Http {
                        url: self.base.clone(),
                        message: format!("creating registered model {model}: HTTP {status}: {value}"),
                    });
                }
                // A logged model is the version; outboxes from before logged models name the
                // bundle's folder among the run's artifacts.
                let logged = logged_model.as_ref().map(|m| run(outbox, m)).transpose()?;
                let request = match &logged {
                    Some((model_id, _)) => api::CreateModelVersion {
                        name: model,
                        source: format!("models:/{model_id}"),
                        run_id: &run_id,
                        model_id: Some(model_id),
                    },
                    None => api::CreateModelVersion {
                        name: model,
                        source: format!("{artifacts}/{dest}"),
                        run_id: &run_id,
                        model_id: None,
                    },
                };
                self.api("POST", "model-versions/create", &request)?;
            }
            Event::LogInputs { handle, datasets } => {
                let run_id = run(outbox, handle)?.0;
                self.api(
                    "POST",
                    "runs/log-inputs",
                    &api::LogInputs {
                        run_id: &run_id,
                        datasets,
                    },
                )?;
            }
            Event::CreateLoggedModel {
                handle,
                run: source_run,
                name,
                model_type,
                params,
                tags,
            } => {
                let run_id = run(outbox, source_run)?.0;
                let experiment_id = outbox.experiment_id.clone().unwrap_or_default();
                let created = self.api(
                    "POST",
                    "logged-models",
                    &api::CreateLoggedModel {
                        experiment_id: &experiment_id,
                        name,
                        model_type,
                        source_run_id: &run_id,
                        params,
                        tags,
                    },
                )?;
                let info = &created["model"]["info"];
                let ids = (
                    info["model_id"].as_str().unwrap_or_default().to_string(),
                    info["artifact_uri"].as_str().unwrap_or_default().to_string(),
                );
                outbox.runs.insert(handle.clone(), ids);
            }
            Event::LogModelMetrics {
                handle,
                model,
                metrics,
                dataset,
                timestamp_ms,
            } => {
                let run_id = run(outbox, handle)?.0;
                let model_id = run(outbox, model)?.0;
                let metrics: Vec<api::Metric> = metrics
                    .iter()
                    .map(|(key, value)| api::Metric {
                        key,
                        value: *value,
                        timestamp: *timestamp_ms,
                        step: 0,
                        model_id: Some(&model_id),
                        dataset_name: dataset.as_ref().map(|d| d.0.as_str()),
                        dataset_digest: dataset.as_ref().map(|d| d.1.as_str()),
                    })
                    .collect();
                self.api(
                    "POST",
                    "runs/log-batch",
                    &api::LogMetrics {
                        run_id: &run_id,
                        metrics: &metrics,
                    },
                )?;
            }
            Event::FinalizeLoggedModel { handle } => {
                let model_id = run(outbox, handle)?.0;
                self.api(
                    "PATCH",
                    &format!("logged-models/{model_id}"),
                    &api::FinalizeLoggedModel {
                        model_id: &model_id,
                        status: "LOGGED_MODEL_READY",
                    },
                )?;
            }
            Event::LogOutputs { handle, model } => {
                let run_id = run(outbox, handle)?.0;
                let model_id = run(outbox, model)?.0;
                self.api(
                    "POST",
                    "runs/outputs",
                    &api::LogOutputs {
                        run_id: &run_id,
                        models: [api::ModelOutput {
                            model_id: &model_id,
                            step: 0,
                        }],
                    },
                )?;
            }
            Event::Finish {
                handle,
                status,
                end_ms,
                rename,
            } => {
                let run_id = run(outbox, handle)?.0;
                let mut update = json!({"run_id": run_id, "status": status, "end_time": end_ms});
                if let Some(name) = rename {
                    update["run_name"] = format!("{name}-{}", &run_id[..run_id.len().min(8)]).into();
                }
                self.api("POST", "runs/update", &update)?;
            }
        }
        Ok(())
    }

    /// Sends the outbox's remaining events in order, retrying each with exponential backoff until
    /// `retry` gives up; on failure the outbox says how far it got.
    fn deliver(&self, outbox: &mut Outbox, retry: &Retry) -> Result<(), TrackingError> {
        let started = Instant::now();
        while outbox.sent < outbox.events.len() {
            let event = outbox.events[outbox.sent].clone();
            let mut delay = retry.first_delay;
            let mut attempt = 1;
            loop {
                match self.send(outbox, &event) {
                    Ok(()) => break,
                    Err(e @ TrackingError::Io { .. }) => return Err(e),
                    Err(e) if attempt >= retry.attempts || started.elapsed() + delay > retry.budget => return Err(e),
                    Err(e) => {
                        tracing::debug!("MLflow: {e}; retrying in {delay:?}");
                        std::thread::sleep(delay);
                        delay *= 2;
                        attempt += 1;
                    }
                }
            }
            outbox.sent += 1;
        }
        Ok(())
    }

    /// Logs one drift evaluation of a served model as step `step` of the run `run` (created, in
    /// the experiment `sentiflow-drift`, when `None`); returns the run id.
    pub fn log_drift(
        &self,
        run: Option<String>,
        model: &str,
        version: &str,
        report: &crate::drift::DriftReport,
        step: i64,
    ) -> Result<String, TrackingError> {
        let run = match run {
            Some(r) => r,
            None => {
                let experiment = self.experiment("sentiflow-drift")?;
                let tags = vec![
                    json!({"key": "sentiflow.model", "value": model}),
                    json!({"key": "sentiflow.version", "value": version}),
                ];
                self.create_run(&experiment, &format!("drift {model} {version}"), tags, now_ms())?
                    .0
            }
        };
        let mut metrics = vec![("samples".to_string(), report.samples as f64, step)];
        for (name, s) in report.statistics.iter() {
            metrics.push((key(name), s.value, step));
        }
        if let Some(rolling) = &report.performance.rolling {
            metrics.push(("feedback_accuracy".into(), rolling.accuracy, step));
        }
        self.log_batch(&run, &[], &metrics, &[], now_ms())?;
        Ok(run)
    }

    /// The version of registered model `model` that is sentiflow's `version` (its logged model
    /// carries the tag `sentiflow.version`), when the pipeline run was tracked.
    pub fn model_version(&self, model: &str, version: &str) -> Result<Option<api::ModelVersion>, TrackingError> {
        let filter = format!("name='{}'", model.replace('\'', ""));
        let path = format!(
            "/api/2.0/mlflow/model-versions/search?filter={}&max_results=1000",
            encode(&filter)
        );
        let found: api::ModelVersions = self.get_json(&path)?;
        for mv in found.model_versions {
            let Some(id) = mv
                .model_id
                .clone()
                .or_else(|| mv.source.strip_prefix("models:/").map(str::to_string))
            else {
                continue;
            };
            let logged: api::LoggedModelAnswer =
                self.get_json(&format!("/api/2.0/mlflow/logged-models/{}", encode(&id)))?;
            if logged
                .model
                .info
                .tags
                .iter()
                .any(|t| t.key == "sentiflow.version" && t.value == version)
            {
                return Ok(Some(mv));
            }
        }
        Ok(None)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, TrackingError> {
        let (status, value) = self.call("GET", path, None)?;
        let err = |message: String| TrackingError::Http {
            url: format!("{}{path}", self.base),
            message,
        };
        if status >= 300 {
            return Err(err(format!("HTTP {status}: {value}")));
        }
        serde_json::from_value(value).map_err(|e| err(format!("unexpected answer: {e}")))
    }

    /// Points `alias` (`production`, `candidate`) of registered model `model` at its version `version`.
    pub fn set_alias(&self, model: &str, alias: &str, version: &str) -> Result<(), TrackingError> {
        let body = api::SetAlias {
            name: model,
            alias,
            version,
        };
        self.api("POST", "registered-models/alias", &body).map(drop)
    }

    /// Logs `metrics` as step `step` of run `run`.
    pub fn log_metrics(&self, run: &str, metrics: &[(String, f64)], step: i64) -> Result<(), TrackingError> {
        let metrics: Vec<(String, f64, i64)> = metrics.iter().map(|(k, v)| (k.clone(), *v, step)).collect();
        self.log_batch(run, &[], &metrics, &[], now_ms())
    }

    /// Records a finished pipeline run; what cannot be sent now is queued under `cache_dir`.
    pub fn record(&self, p: &Pipeline, report: &Report, cache_dir: &Path) -> Result<Delivery, TrackingError> {
        let dir = cache_dir.join("tracking").join(format!(
            "{}-{}-{}",
            now_ms(),
            std::process::id(),
            key(&p.name).replace(['/', ' '], "_")
        ));
        let plots = dir.join("plots");
        std::fs::create_dir_all(&plots).map_err(|source| TrackingError::Io {
            path: plots.display().to_string(),
            source,
        })?;
        let mut outbox = Outbox {
            uri: self.base.clone(),
            experiment: p.name.clone(),
            experiment_id: None,
            events: plan::events(p, report, &plots)?,
            sent: 0,
            runs: BTreeMap::new(),
            error: None,
        };
        match self.deliver(&mut outbox, &Retry::DURING_RUN) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
                Ok(Delivery::Sent {
                    run_id: outbox.runs.get("run").map(|r| r.0.clone()).unwrap_or_default(),
                })
            }
            Err(e) => {
                outbox.error = Some(e.to_string());
                outbox.keep(&dir)?;
                Ok(Delivery::Queued {
                    outbox: dir,
                    pending: outbox.events.len() - outbox.sent,
                    error: e.to_string(),
                })
            }
        }
    }
}

/// How long to keep trying one batch of events.
pub struct Retry {
    pub attempts: u32,
    pub first_delay: Duration,
    /// Total time for all events; a slow server costs at most this.
    pub budget: Duration,
}

impl Retry {
    /// At the end of a pipeline run: a short wait, then the outbox.
    pub const DURING_RUN: Retry = Retry {
        attempts: 4,
        first_delay: Duration::from_millis(250),
        budget: Duration::from_secs(10),
    };
    /// `sentiflow tracking sync`: someone is waiting for it on purpose.
    pub const SYNC: Retry = Retry {
        attempts: 5,
        first_delay: Duration::from_millis(500),
        budget: Duration::from_secs(60),
    };
}

/// What became of a run's tracking.
#[derive(Debug)]
pub enum Delivery {
    Sent {
        run_id: String,
    },
    Queued {
        outbox: PathBuf,
        pending: usize,
        error: String,
    },
}

impl Delivery {
    /// For the run's JSON report.
    pub fn to_json(&self) -> Value {
        match self {
            Delivery::Sent { run_id } => json!({"status": "sent", "run_id": run_id}),
            Delivery::Queued { outbox, pending, error } => {
                json!({"status": "queued", "pending_events": pending, "outbox": outbox, "error": error})
            }
        }
    }
}

/// Events waiting for a tracking server, and how far their delivery got.
#[derive(Debug, Serialize, Deserialize)]
struct Outbox {
    uri: String,
    experiment: String,
    experiment_id: Option<String>,
    events: Vec<Event>,
    /// Events already delivered.
    sent: usize,
    /// Run or logged model handle → (its id, its artifact URI), as the server created them.
    runs: BTreeMap<String, (String, String)>,
    /// Why the last delivery stopped.
    error: Option<String>,
}

impl Outbox {
    /// Saves the outbox in `dir`, with its own links or copies of the files still to upload (the
    /// originals may be overwritten by the next run).
    fn keep(&mut self, dir: &Path) -> Result<(), TrackingError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TrackingError::Io { path, source }
        };
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(io(&files))?;
        for (i, event) in self.events.iter_mut().enumerate().skip(self.sent) {
            if let Event::Upload { file, .. } = event {
                if file.starts_with(dir) {
                    continue;
                }
                let name = format!(
                    "{i}-{}",
                    file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                );
                let copy = files.join(name);
                if std::fs::hard_link(&*file, &copy).is_err() {
                    std::fs::copy(&*file, &copy).map_err(io(file))?;
                }
                *file = copy;
            }
        }
        let path = dir.join("outbox.json");
        let tmp = dir.join("outbox.json.tmp");
        let json = serde_json::to_vec_pretty(self).expect("outboxes serialize");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io(&path))
    }
}

/// The outcome of `sentiflow tracking sync` for one queued run.
pub struct Synced {
    pub outbox: PathBuf,
    pub pipeline: String,
    pub result: Result<String, String>,
    pub pending: usize,
}

/// Sends every queued run under `cache_dir` to its tracking server (or to `uri` when given),
/// oldest first; a delivered outbox is removed.
pub fn sync(cache_dir: &Path, uri: Option<&str>) -> Vec<Synced> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache_dir.join("tracking"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let path = dir.join("outbox.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            // A run that is still recording, or one that died before queueing: nothing to send.
            continue;
        };
        let mut outbox: Outbox = match serde_json::from_str(&text) {
            Ok(o) => o,
            Err(e) => {
                out.push(Synced {
                    outbox: dir,
                    pipeline: String::new(),
                    result: Err(format!("{}: unreadable: {e}", path.display())),
                    pending: 0,
                });
                continue;
            }
        };
        let tracker = Tracker::new(uri.unwrap_or(&outbox.uri));
        let result = tracker.deliver(&mut outbox, &Retry::SYNC);
        let pending = outbox.events.len() - outbox.sent;
        let result = match result {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&dir);
                Ok(outbox.runs.get("run").map(|r| r.0.clone()).unwrap_or_default())
            }
            Err(e) => {
                outbox.error = Some(e.to_string());
                let _ = outbox.keep(&dir);
                Err(e.to_string())
            }
        };
        out.push(Synced {
            outbox: dir,
            pipeline: outbox.experiment,
            result,
            pending,
        });
    }
    out
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
