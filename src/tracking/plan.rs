//! What to tell MLflow about a finished pipeline run, as an ordered list of events.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api::{Dataset, DatasetInput, Tag};
use super::error::TrackingError;
use super::fields::{flatten, key, now_ms};
use crate::models::bundle::Manifest;
use crate::pipeline::report::{Report, StageReport};
use crate::pipeline::Pipeline;
use crate::plot;
use crate::stages::StageKind;

/// One call to the tracking server. Runs are named by local handles (`run`, `tune-trial-3`)
/// until the server has created them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    CreateRun {
        handle: String,
        name: String,
        parent: Option<String>,
        tags: Vec<(String, String)>,
        start_ms: u64,
    },
    LogBatch {
        handle: String,
        params: Vec<(String, String)>,
        metrics: Vec<(String, f64, i64)>,
        tags: Vec<(String, String)>,
        timestamp_ms: u64,
    },
    Upload {
        handle: String,
        dest: String,
        file: PathBuf,
    },
    /// Registers a new version of `model`: the logged model `logged_model` (by handle), else the
    /// artifacts under `dest` of the run.
    RegisterModel {
        handle: String,
        model: String,
        dest: String,
        #[serde(default)]
        logged_model: Option<String>,
    },
    LogInputs {
        handle: String,
        datasets: Vec<DatasetInput>,
    },
    /// An MLflow 3 logged model produced by the run `run`; its handle names it like a run's.
    CreateLoggedModel {
        handle: String,
        run: String,
        name: String,
        model_type: String,
        params: Vec<Tag>,
        tags: Vec<Tag>,
    },
    /// Metrics of the run `handle` that are also the logged model `model`'s, measured on the
    /// data set `dataset` (name, digest).
    LogModelMetrics {
        handle: String,
        model: String,
        metrics: Vec<(String, f64)>,
        dataset: Option<(String, String)>,
        timestamp_ms: u64,
    },
    FinalizeLoggedModel {
        handle: String,
    },
    LogOutputs {
        handle: String,
        model: String,
    },
    /// Ends a run; with `rename`, names it `<rename>-<first 8 characters of its id>`.
    Finish {
        handle: String,
        status: String,
        end_ms: u64,
        #[serde(default)]
        rename: Option<String>,
    },
}

const RUN: &str = "run";

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrackingError + '_ {
    move |source| TrackingError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn read_json(path: &Path) -> Result<Value, TrackingError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn param_text(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // MLflow rejects parameter values over 6000 characters.
    text.chars().take(6000).collect()
}

/// The events recording `report`; plots are drawn into `plots`.
pub fn events(p: &Pipeline, report: &Report, plots: &Path) -> Result<Vec<Event>, TrackingError> {
    // The pipeline file as the repository names it, so that MLflow's source and commit find it.
    let source = std::path::absolute(&p.file)
        .ok()
        .and_then(|f| f.strip_prefix(&p.root).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.file.clone());
    let mut tags = vec![
        ("sentiflow.pipeline".to_string(), p.file.display().to_string()),
        ("mlflow.source.name".into(), source.display().to_string()),
        ("mlflow.source.type".into(), "LOCAL".into()),
        ("mlflow.user".into(), user()),
    ];
    tags.extend(git_tags(&p.root));
    // The run starts when its first stage did.
    let started = report.stages.iter().map(|r| r.started_at).fold(f64::INFINITY, f64::min);
    let start_ms = if started.is_finite() {
        (started * 1000.0) as u64
    } else {
        now_ms()
    };
    let mut out = vec![Event::CreateRun {
        handle: RUN.into(),
        name: p.name.clone(),
        parent: None,
        tags,
        start_ms,
    }];

    let mut params = Vec::new();
    let mut metrics = Vec::new();
    let mut tags = Vec::new();
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
        tags.push((
            key(&format!("sentiflow.state.{}", r.name)),
            format!("{:?}", r.state).to_lowercase(),
        ));
        if let Some(k) = &r.key {
            tags.push((key(&format!("sentiflow.key.{}", r.name)), k.clone()));
        }
        for (path, hash) in &r.inputs {
            if stage.kind.stage().deps().contains(path) {
                tags.push((key(&format!("sentiflow.data.{path}")), hash.clone()));
            }
        }
    }
    out.push(Event::LogBatch {
        handle: RUN.into(),
        params: params.iter().map(|(k, v)| (k.clone(), param_text(v))).collect(),
        metrics,
        tags,
        timestamp_ms: now_ms(),
    });
    let datasets = datasets(p, report);
    // The validation part the exported models were scored on.
    let validation = datasets
        .iter()
        .find(|d| d.tags.iter().any(|t| t.value == "validation"))
        .map(|d| (d.dataset.name.clone(), d.dataset.digest.clone()));
    if !datasets.is_empty() {
        out.push(Event::LogInputs {
            handle: RUN.into(),
            datasets,
        });
    }

    let upload = |dest: String, file: PathBuf| Event::Upload {
        handle: RUN.into(),
        dest,
        file,
    };
    for r in report.stages.iter().filter(|r| r.state.succeeded()) {
        let stage = p.stage(&r.name).expect("reports name stages");
        let name = &r.name;
        match &stage.kind {
            StageKind::Tune(t) => {
                let dir = p.root.join(&t.out);
                let trials = read_json(&dir.join("trials.json"))?;
                out.extend(trial_runs(name, &trials));
                let chart = plots.join(format!("{name}-score_vs_C.png"));
                std::fs::write(&chart, score_chart(name, &trials)).map_err(io(&chart))?;
                out.push(upload(format!("{name}/score_vs_C.png"), chart));
                out.push(upload(format!("{name}/trials.csv"), dir.join("trials.csv")));
                out.push(upload(format!("{name}/best.json"), dir.join("best.json")));
            }
            StageKind::Train(t) => {
                let dir = p.root.join(&t.out);
                out.push(upload(format!("{name}/metrics.json"), dir.join("metrics.json")));
                out.extend(classifier_plots(
                    name,
                    plots,
                    &dir,
                    "metrics.json",
                    "/validation/confusion",
                    &upload,
                )?);
            }
            StageKind::BertFinetune(f) => {
                // Each epoch's scores as steps, so the UI draws the learning curve.
                let report_file = p.root.join(&f.out).join("metrics.json");
                let report = read_json(&report_file)?;
                let mut metrics = Vec::new();
                for e in report["epochs"].as_array().into_iter().flatten() {
                    let step = e["epoch"].as_i64().unwrap_or(0);
                    for k in ["train_loss", "valid_loss", "valid_accuracy"] {
                        if let Some(v) = e[k].as_f64() {
                            metrics.push((key(&format!("{name}.epoch.{k}")), v, step));
                        }
                    }
                }
                out.push(Event::LogBatch {
                    handle: RUN.into(),
                    params: Vec::new(),
                    metrics,
                    tags: Vec::new(),
                    timestamp_ms: now_ms(),
                });
                out.push(upload(format!("{name}/metrics.json"), report_file));
            }
            _ => {}
        }
        if let Some((bundle_name, bundle)) = stage.kind.bundle() {
            let dir = p.root.join(bundle);
            if let StageKind::BertExport(_) = &stage.kind {
                out.extend(classifier_plots(
                    name,
                    plots,
                    &dir,
                    "manifest.json",
                    "/metrics/confusion",
                    &upload,
                )?);
            }
            out.extend(logged_model(name, bundle_name, &dir, validation.clone())?);
            out.push(Event::RegisterModel {
                handle: RUN.into(),
                model: format!("{}-{bundle_name}", p.name),
                dest: name.clone(),
                logged_model: Some(model_handle(name)),
            });
        }
    }
    out.push(Event::Finish {
        handle: RUN.into(),
        status: if report.ok { "FINISHED" } else { "FAILED" }.into(),
        end_ms: now_ms(),
        rename: Some(p.name.clone()),
    });
    Ok(out)
}

fn model_handle(stage: &str) -> String {
    format!("{stage}-model")
}

/// The bundle in `dir`, exported by `stage`, as a logged model of the run: its hyper-parameters,
/// its files (the MLflow model, with its `MLmodel`), and its validation metrics, on the data set
/// `validation` when the run has one.
fn logged_model(
    stage: &str,
    bundle_name: &str,
    dir: &Path,
    validation: Option<(String, String)>,
) -> Result<Vec<Event>, TrackingError> {
    let path = dir.join("manifest.json");
    let manifest: Manifest = serde_json::from_value(read_json(&path)?).map_err(|e| TrackingError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let handle = model_handle(stage);
    let mut flat = Vec::new();
    let parameters = serde_json::to_value(manifest.parameters()).expect("parameters serialize");
    for (k, v) in parameters.as_object().into_iter().flatten() {
        flatten(k, v, &mut flat);
    }
    let params = flat
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| Tag::new(k, param_text(v)))
        .collect();
    let tags = vec![
        Tag::new("sentiflow.stage", stage),
        Tag::new("sentiflow.version", &manifest.version),
        Tag::new("sentiflow.pipeline", &manifest.pipeline),
    ];
    let mut out = vec![Event::CreateLoggedModel {
        handle: handle.clone(),
        run: RUN.into(),
        name: bundle_name.into(),
        model_type: format!("sentiflow-{}", manifest.kind()),
        params,
        tags,
    }];
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|f| f.is_file())
        .collect();
    files.sort();
    for file in files {
        let dest = file
            .file_name()
            .expect("files have names")
            .to_string_lossy()
            .into_owned();
        out.push(Event::Upload {
            handle: handle.clone(),
            dest,
            file,
        });
    }
    let mut flat = Vec::new();
    flatten(stage, &manifest.metrics, &mut flat);
    let metrics: Vec<(String, f64)> = flat.into_iter().filter_map(|(k, v)| Some((k, v.as_f64()?))).collect();
    if !metrics.is_empty() {
        out.push(Event::LogModelMetrics {
            handle: RUN.into(),
            model: handle.clone(),
            metrics,
            dataset: validation,
            timestamp_ms: now_ms(),
        });
    }
    out.push(Event::FinalizeLoggedModel { handle: handle.clone() });
    out.push(Event::LogOutputs {
        handle: RUN.into(),
        model: handle,
    });
    Ok(out)
}

/// The columns of the reviews tables (`Reviews::write_parquet`), as an MLflow schema.
fn reviews_schema() -> String {
    let columns: Vec<Value> = crate::data::COLUMNS
        .iter()
        .map(|(name, kind, required)| json!({"name": name, "type": kind, "required": required}))
        .collect();
    json!({ "mlflow_colspec": columns }).to_string()
}

/// One data set input of the run. MLflow keeps digests of at most 36 characters: the first 16
/// hex digits of sentiflow's SHA-256 identify the content well enough.
fn dataset_input(context: &str, name: String, hash: &str, source: (&str, Value), rows: &Value) -> DatasetInput {
    DatasetInput {
        tags: vec![Tag::new("mlflow.data.context", context)],
        dataset: Dataset {
            name,
            digest: hash.chars().take(16).collect(),
            source_type: source.0.into(),
            source: source.1.to_string(),
            schema: reviews_schema(),
            profile: json!({ "num_rows": rows }).to_string(),
        },
    }
}

/// The data each `load` stage read (context `training`) and the validation part of each split
/// (context `validation`), with the digests sentiflow computed of them.
fn datasets(p: &Pipeline, report: &Report) -> Vec<DatasetInput> {
    let mut out = Vec::new();
    for r in report.stages.iter().filter(|r| r.state.succeeded()) {
        let stage = p.stage(&r.name).expect("reports name stages");
        match &stage.kind {
            StageKind::Load(load) => {
                let Some(hash) = r.inputs.get(&load.path) else {
                    continue;
                };
                let source = match &load.url {
                    Some(url) => ("http", json!({ "url": url })),
                    None => ("local", json!({ "uri": p.root.join(&load.path).display().to_string() })),
                };
                let name = Path::new(&load.path)
                    .file_name()
                    .map_or_else(|| load.path.clone(), |n| n.to_string_lossy().into_owned());
                let rows = r.metrics.get("rows").unwrap_or(&Value::Null);
                out.push(dataset_input("training", name, hash, source, rows));
            }
            StageKind::Split(split) => {
                // `split` writes `train.parquet` and `valid.parquet` into its folder.
                let Some(hash) = out_file_hash(r, &split.out, "valid.parquet") else {
                    continue;
                };
                let path = format!("{}/valid.parquet", split.out.trim_end_matches('/'));
                let source = ("local", json!({ "uri": p.root.join(&path).display().to_string() }));
                let rows = r.metrics.get("valid_rows").unwrap_or(&Value::Null);
                out.push(dataset_input("validation", path, &hash, source, rows));
            }
            _ => {}
        }
    }
    out
}

/// The hash of `file` in the stage's output folder `dir`.
fn out_file_hash(r: &StageReport, dir: &str, file: &str) -> Option<String> {
    let dir = dir.trim_end_matches('/');
    let out = r.outs.iter().find(|a| a.path.trim_end_matches('/') == dir)?;
    Some(out.files.as_ref()?.get(file)?.hash.clone())
}

/// One nested child run per tuning trial: its parameters, the mean and std of each metric, and
/// the per-fold score as steps.
fn trial_runs(stage: &str, trials: &Value) -> Vec<Event> {
    let mut out = Vec::new();
    for t in trials.as_array().into_iter().flatten() {
        let handle = format!("{stage}-trial-{}", t["trial"]);
        out.push(Event::CreateRun {
            handle: handle.clone(),
            name: trial_name(t),
            parent: Some(RUN.into()),
            tags: Vec::new(),
            start_ms: now_ms(),
        });
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
        out.push(Event::LogBatch {
            handle: handle.clone(),
            params: params.iter().map(|(k, v)| (k.clone(), param_text(v))).collect(),
            metrics,
            tags: Vec::new(),
            timestamp_ms: now_ms(),
        });
        out.push(Event::Finish {
            handle,
            status: "FINISHED".into(),
            end_ms: now_ms(),
            rename: None,
        });
    }
    out
}

/// A trial's run name: its model and parameters, then its vectorizer (`nbsvm C=0.1 (vectorize)`).
fn trial_name(t: &Value) -> String {
    let mut name = t["params"]["model"].as_str().unwrap_or("model").to_string();
    for (k, v) in t["params"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "model")
    {
        name.push_str(&format!(" {k}={}", param_text(v)));
    }
    match t["vectorizer"].as_str() {
        Some(v) => format!("{name} ({v})"),
        None => name,
    }
}

/// Mean cross-validated accuracy against C, one line per model family and vectorizer.
fn score_chart(stage: &str, trials: &Value) -> Vec<u8> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for t in trials.as_array().into_iter().flatten() {
        let (Some(c), Some(score)) = (t["params"]["C"].as_f64(), t["accuracy_mean"].as_f64()) else {
            continue;
        };
        let mut label = t["params"]["model"].as_str().unwrap_or("model").to_string();
        if let Some(loss) = t["params"]["loss"].as_str() {
            label = format!("{label}/{loss}");
        }
        let label = format!("{label} {}", t["vectorizer"].as_str().unwrap_or_default());
        match series.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push((c, score)),
            None => series.push((label, vec![(c, score)])),
        }
    }
    plot::score_vs_param(&series, "C", "mean CV accuracy", &format!("{stage}: score vs C"))
}

/// Confusion matrix and ROC curve of a classifier's validation predictions, from the confusion
/// matrix at `pointer` in `dir/metrics_file` and the ROC curve in `dir/predictions.json`.
fn classifier_plots(
    stage: &str,
    plots: &Path,
    dir: &Path,
    metrics_file: &str,
    pointer: &str,
    upload: &dyn Fn(String, PathBuf) -> Event,
) -> Result<Vec<Event>, TrackingError> {
    let metrics = read_json(&dir.join(metrics_file))?;
    let confusion = metrics.pointer(pointer).unwrap_or(&Value::Null);
    let cell = |r: usize, c: usize| confusion[r][c].as_u64().unwrap_or(0);
    let matrix = [[cell(0, 0), cell(0, 1)], [cell(1, 0), cell(1, 1)]];
    let predictions = read_json(&dir.join("predictions.json"))?;
    let roc: Vec<(f64, f64)> = predictions["roc_curve"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pt| Some((pt[0].as_f64()?, pt[1].as_f64()?)))
        .collect();
    let auc = roc
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum::<f64>();
    let mut out = Vec::new();
    for (file, png) in [
        (
            "confusion_matrix.png",
            plot::confusion_matrix(matrix, &format!("{stage}: validation")),
        ),
        ("roc_curve.png", plot::roc_curve(&roc, auc, &format!("{stage}: ROC"))),
    ] {
        let path = plots.join(format!("{stage}-{file}"));
        std::fs::write(&path, png).map_err(io(&path))?;
        out.push(upload(format!("{stage}/{file}"), path));
    }
    Ok(out)
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(root)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// MLflow's git tags (commit, branch, remote), and whether tracked files had changes.
fn git_tags(root: &Path) -> Vec<(String, String)> {
    let Some(commit) = git(root, &["rev-parse", "HEAD"]) else {
        return Vec::new();
    };
    let mut tags = vec![("mlflow.source.git.commit".to_string(), commit)];
    if let Some(branch) = git(root, &["symbolic-ref", "--short", "HEAD"]) {
        tags.push(("mlflow.source.git.branch".into(), branch));
    }
    if let Some(url) = git(root, &["remote", "get-url", "origin"]) {
        tags.push(("mlflow.source.git.repoURL".into(), url));
    }
    if let Some(status) = git(root, &["status", "--porcelain", "--untracked-files=no"]) {
        tags.push(("sentiflow.git.dirty".into(), (!status.is_empty()).to_string()));
    }
    tags
}

/// Who ran the pipeline: `$USER`, `$LOGNAME`, else the account of the process's user id.
fn user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Some(name) = std::env::var(var).ok().filter(|n| !n.is_empty()) {
            return name;
        }
    }
    // SAFETY: getpwuid returns null or a record in static storage, read at once; sentiflow calls
    // no other passwd function meanwhile.
    unsafe {
        let uid = libc::getuid();
        let record = libc::getpwuid(uid);
        if record.is_null() || (*record).pw_name.is_null() {
            return format!("uid {uid}");
        }
        std::ffi::CStr::from_ptr((*record).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}
