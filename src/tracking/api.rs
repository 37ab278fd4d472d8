//! Request bodies of MLflow's REST API (`/api/2.0/mlflow/…`), as its protocol buffers spell them.

use serde::{Deserialize, Serialize};

/// A run tag, an input tag, or a logged model's tag or parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

impl Tag {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Tag {
        Tag {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// A data set a run used: `tags` hold its context (`mlflow.data.context`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInput {
    pub tags: Vec<Tag>,
    pub dataset: Dataset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    /// At most 36 characters.
    pub digest: String,
    /// `local` or `http`, with `source` the JSON of `{"uri": …}` or `{"url": …}`.
    pub source_type: String,
    pub source: String,
    /// The JSON of `{"mlflow_colspec": [{"name", "type", "required"}, …]}`.
    pub schema: String,
    /// The JSON of `{"num_rows": …}`.
    pub profile: String,
}

/// `runs/log-inputs`.
#[derive(Serialize)]
pub struct LogInputs<'a> {
    pub run_id: &'a str,
    pub datasets: &'a [DatasetInput],
}

/// A metric of `runs/log-batch`; with `model_id`, also one of that logged model's metrics,
/// measured on the data set `dataset_name`/`dataset_digest`.
#[derive(Serialize)]
pub struct Metric<'a> {
    pub key: &'a str,
    pub value: f64,
    pub timestamp: u64,
    pub step: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<&'a str>,
}

/// `runs/log-batch` with metrics only.
#[derive(Serialize)]
pub struct LogMetrics<'a> {
    pub run_id: &'a str,
    pub metrics: &'a [Metric<'a>],
}

/// `POST logged-models`: an MLflow 3 logged model, produced by the run `source_run_id`.
#[derive(Serialize)]
pub struct CreateLoggedModel<'a> {
    pub experiment_id: &'a str,
    pub name: &'a str,
    pub model_type: &'a str,
    pub source_run_id: &'a str,
    pub params: &'a [Tag],
    pub tags: &'a [Tag],
}

/// `PATCH logged-models/{model_id}`: its artifacts are all uploaded.
#[derive(Serialize)]
pub struct FinalizeLoggedModel<'a> {
    pub model_id: &'a str,
    pub status: &'static str,
}

/// `runs/outputs`: the logged models a run produced.
#[derive(Serialize)]
pub struct LogOutputs<'a> {
    pub run_id: &'a str,
    pub models: [ModelOutput<'a>; 1],
}

#[derive(Serialize)]
pub struct ModelOutput<'a> {
    pub model_id: &'a str,
    pub step: i64,
}

/// `model-versions/create`; with `model_id`, the version is that logged model.
#[derive(Serialize)]
pub struct CreateModelVersion<'a> {
    pub name: &'a str,
    pub source: String,
    pub run_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<&'a str>,
}

/// `registered-models/alias`: points `alias` of registered model `name` at `version`.
#[derive(Serialize)]
pub struct SetAlias<'a> {
    pub name: &'a str,
    pub alias: &'a str,
    pub version: &'a str,
}

/// The answer to `model-versions/search`.
#[derive(Debug, Default, Deserialize)]
pub struct ModelVersions {
    #[serde(default)]
    pub model_versions: Vec<ModelVersion>,
}

/// A version of a registered model.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelVersion {
    pub version: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub model_id: Option<String>,
}

/// The answer to `GET logged-models/{id}`.
#[derive(Debug, Deserialize)]
pub struct LoggedModelAnswer {
    pub model: LoggedModel,
}

#[derive(Debug, Deserialize)]
pub struct LoggedModel {
    pub info: LoggedModelInfo,
}

#[derive(Debug, Deserialize)]
pub struct LoggedModelInfo {
    #[serde(default)]
    pub tags: Vec<Tag>,
}
