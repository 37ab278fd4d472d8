//! What to tell MLflow about a finished pipeline run, as an ordered list of events.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{flatten, key, now_ms, TrackingError};
use crate::pipeline::report::Report;
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
    RegisterModel {
        handle: String,
        model: String,
        dest: String,
    },
    Finish {
        handle: String,
        status: String,
        end_ms: u64,
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
    let mut tags = vec![("sentiflow.pipeline".to_string(), p.file.display().to_string())];
    if let Some(commit) = git_commit(&p.root) {
        tags.push(("mlflow.source.git.commit".into(), commit));
    }
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
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io(&dir))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file())
                .collect();
            files.sort();
            for f in files {
                let file_name = f.file_name().expect("files have names").to_string_lossy().into_owned();
                out.push(upload(format!("{name}/{file_name}"), f));
            }
            out.push(Event::RegisterModel {
                handle: RUN.into(),
                model: format!("{}-{bundle_name}", p.name),
                dest: name.clone(),
            });
        }
    }
    out.push(Event::Finish {
        handle: RUN.into(),
        status: if report.ok { "FINISHED" } else { "FAILED" }.into(),
        end_ms: now_ms(),
    });
    Ok(out)
}

/// One nested child run per tuning trial: its parameters, the mean and std of each metric, and
/// the per-fold score as steps.
fn trial_runs(stage: &str, trials: &Value) -> Vec<Event> {
    let mut out = Vec::new();
    for t in trials.as_array().into_iter().flatten() {
        let handle = format!("{stage}-trial-{}", t["trial"]);
        out.push(Event::CreateRun {
            handle: handle.clone(),
            name: handle.clone(),
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
        });
    }
    out
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
