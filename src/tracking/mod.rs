//! Experiment tracking in MLflow, through its REST API (no Python in the runner).
//!
//! With `MLFLOW_TRACKING_URI` set, each pipeline run becomes an MLflow run in an experiment named
//! after the pipeline: stage parameters and metrics (flattened as `stage.name`), stage cache keys
//! as tags, each tuning trial as a nested child run, the exported bundles and the tuning table as
//! artifacts, and each bundle as a new version of a registered model `<pipeline>-<bundle name>`.
//! A server that is down never fails the pipeline: the run is reported as not tracked.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::pipeline::exec::{Report, State};
use crate::pipeline::Pipeline;
use crate::stages::StageKind;

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("MLflow at {url}: {message}")]
    Http { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Tracker {
    base: String,
    agent: ureq::Agent,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// MLflow keys allow letters, digits, `_`, `-`, `.`, ` ` and `/`.
fn key(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-. /".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `{"a": {"b": 1}}` → `[("a.b", 1)]`; lists and strings become parameter strings.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&format!("{prefix}.{k}"), v, out)),
        other => out.push((key(prefix), other.clone())),
    }
}

fn param_text(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // MLflow rejects parameter values over 6000 characters.
    text.chars().take(6000).collect()
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
                .timeout_global(Some(Duration::from_secs(60)))
                .build(),
        );
        Tracker {
            base: uri.trim_end_matches('/').to_string(),
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), TrackingError> {
        let url = format!("{}{path}", self.base);
        let err = |message: String| TrackingError::Http {
            url: url.clone(),
            message,
        };
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.to_string()),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut response = result.map_err(|e| err(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| err(e.to_string()))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    fn api(&self, method: &str, path: &str, body: Value) -> Result<Value, TrackingError> {
        let (status, value) = self.call(method, &format!("/api/2.0/mlflow/{path}"), Some(&body))?;
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
        let created = self.api("POST", "experiments/create", json!({"name": name}))?;
        Ok(created["experiment_id"].as_str().unwrap_or_default().to_string())
    }

    fn create_run(&self, experiment: &str, name: &str, tags: Vec<Value>) -> Result<(String, String), TrackingError> {
        let run = self.api(
            "POST",
            "runs/create",
            json!({"experiment_id": experiment, "run_name": name, "start_time": now_ms(), "tags": tags}),
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
        params: &[(String, Value)],
        metrics: &[(String, f64, i64)],
        tags: &[(String, String)],
    ) -> Result<(), TrackingError> {
        let ts = now_ms();
        // MLflow takes at most 100 parameters and 1000 metrics a request.
        for chunk in params.chunks(100) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": param_text(v)}))
                .collect();
            self.api("POST", "runs/log-batch", json!({"run_id": run, "params": params}))?;
        }
        for chunk in metrics.chunks(1000) {
            let metrics: Vec<Value> = chunk
                .iter()
                .map(|(k, v, step)| json!({"key": k, "value": v, "timestamp": ts, "step": step}))
                .collect();
            self.api("POST", "runs/log-batch", json!({"run_id": run, "metrics": metrics}))?;
        }
        if !tags.is_empty() {
            let tags: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            self.api("POST", "runs/log-batch", json!({"run_id": run, "tags": tags}))?;
        }
        Ok(())
    }

    fn finish(&self, run: &str, ok: bool) -> Result<(), TrackingError> {
        let status = if ok { "FINISHED" } else { "FAILED" };
        self.api(
            "POST",
            "runs/update",
            json!({"run_id": run, "status": status, "end_time": now_ms()}),
        )?;
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

    fn upload_dir(&self, artifact_uri: &str, dest: &str, dir: &Path) -> Result<(), TrackingError> {
        let entries = std::fs::read_dir(dir).map_err(|source| TrackingError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().expect("files have names").to_string_lossy().into_owned();
            self.upload(artifact_uri, &format!("{dest}/{name}"), &f)?;
        }
        Ok(())
    }

    /// Records a finished pipeline run; returns the MLflow run id.
    pub fn log_run(&self, p: &Pipeline, report: &Report) -> Result<String, TrackingError> {
        let experiment = self.experiment(&p.name)?;
        let mut tags = vec![json!({"key": "sentiflow.pipeline", "value": p.file.display().to_string()})];
        if let Some(commit) = git_commit(&p.root) {
            tags.push(json!({"key": "mlflow.source.git.commit", "value": commit}));
        }
        let (run, artifacts) = self.create_run(&experiment, &p.name, tags)?;

        let mut params = Vec::new();
        let mut metrics = Vec::new();
        let mut stage_tags = Vec::new();
        for (name, value) in &p.params {
            params.push((key(&format!("params.{name}")), value.clone()));
        }
        for r in &report.stages {
            let stage = p.stage(&r.name).expect("reports name stages");
            flatten(&r.name, &stage.kind.params(), &mut params);
            let mut flat = Vec::new();
            flatten(&r.name, &Value::Object(r.metrics.clone()), &mut flat);
            metrics.extend(flat.into_iter().filter_map(|(k, v)| v.as_f64().map(|v| (k, v, 0))));
            metrics.push((key(&format!("{}.duration_s", r.name)), r.duration_ms as f64 / 1000.0, 0));
            stage_tags.push((
                key(&format!("sentiflow.state.{}", r.name)),
                format!("{:?}", r.state).to_lowercase(),
            ));
            if let Some(k) = &r.key {
                stage_tags.push((key(&format!("sentiflow.key.{}", r.name)), k.clone()));
            }
            for (path, hash) in &r.inputs {
                if stage.kind.stage().deps().contains(path) {
                    stage_tags.push((key(&format!("sentiflow.data.{path}")), hash.clone()));
                }
            }
        }
        self.log_batch(&run, &params, &metrics, &stage_tags)?;

        for r in report
            .stages
            .iter()
            .filter(|r| matches!(r.state, State::Ran | State::Cached))
        {
            let stage = p.stage(&r.name).expect("reports name stages");
            match &stage.kind {
                StageKind::Tune(t) => {
                    let dir = p.root.join(&t.out);
                    self.log_trials(&experiment, &run, &r.name, &dir.join("trials.json"))?;
                    self.upload(&artifacts, &format!("{}/trials.csv", r.name), &dir.join("trials.csv"))?;
                    self.upload(&artifacts, &format!("{}/best.json", r.name), &dir.join("best.json"))?;
                }
                StageKind::Train(t) => {
                    self.upload(
                        &artifacts,
                        &format!("{}/metrics.json", r.name),
                        &p.root.join(&t.out).join("metrics.json"),
                    )?;
                }
                StageKind::Export(e) => {
                    let dest = &r.name;
                    self.upload_dir(&artifacts, dest, &p.root.join(&e.out))?;
                    let model = format!("{}-{}", p.name, e.name);
                    let (status, _) = self.call(
                        "POST",
                        "/api/2.0/mlflow/registered-models/create",
                        Some(&json!({"name": model})),
                    )?;
                    if status >= 300 && status != 400 {
                        return Err(TrackingError::Http {
                            url: self.base.clone(),
                            message: format!("creating registered model {model}: HTTP {status}"),
                        });
                    }
                    self.api(
                        "POST",
                        "model-versions/create",
                        json!({"name": model, "source": format!("{artifacts}/{dest}"), "run_id": run}),
                    )?;
                }
                _ => {}
            }
        }
        self.finish(&run, report.ok)?;
        Ok(run)
    }

    /// One nested child run per tuning trial, with its parameters, mean and std of each metric,
    /// and the per-fold score as steps.
    fn log_trials(&self, experiment: &str, parent: &str, stage: &str, table: &Path) -> Result<(), TrackingError> {
        let text = std::fs::read_to_string(table).map_err(|source| TrackingError::Io {
            path: table.display().to_string(),
            source,
        })?;
        let trials: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        for t in trials {
            let name = format!("{stage}-trial-{}", t["trial"]);
            let tags = vec![json!({"key": "mlflow.parentRunId", "value": parent})];
            let (run, _) = self.create_run(experiment, &name, tags)?;
            let mut params = Vec::new();
            flatten("model", &t["params"], &mut params);
            params.push(("vectorizer".into(), t["vectorizer"].clone()));
            let mut metrics: Vec<(String, f64, i64)> = t
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.ends_with("_mean") || k.ends_with("_std"))
                .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v, 0)))
                .collect();
            for (i, v) in t["folds"].as_array().into_iter().flatten().enumerate() {
                if let Some(v) = v.as_f64() {
                    metrics.push(("fold_score".into(), v, i as i64));
                }
            }
            self.log_batch(&run, &params, &metrics, &[])?;
            self.finish(&run, true)?;
        }
        Ok(())
    }
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

fn git_commit(root: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
