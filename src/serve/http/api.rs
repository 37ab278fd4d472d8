//! The API's request and response bodies: what handlers read and write, and what the OpenAPI
//! document describes (both come from these types).

use crate::executors::Placement;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::models::bundle::{Explanation, Figures, Parameters};
use crate::pipeline::ParamValue;
use crate::serve::service::policy::GateVerdict;
pub use crate::serve::service::runs::TrainingRequest;
use crate::store::{ModelRow, RunStatus, RunSummary, ShadowFigures, Trigger};

/// A field that may be left out but, when sent, holds a value (`null` is refused, not read as
/// absent, so a client's mistake is named).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The body of `POST /prediction`: `text` or `texts`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(example = example_prediction_request())]
pub struct PredictionRequest {
    /// One review to score.
    #[serde(default, deserialize_with = "present")]
    pub text: Option<String>,
    /// Several reviews, scored in one batch.
    #[serde(default, deserialize_with = "present")]
    pub texts: Option<Vec<String>>,
    /// The served model to use.
    #[serde(default, deserialize_with = "present")]
    #[schemars(default = "default_model", with = "String")]
    pub model: Option<String>,
    /// Add each text's most influential terms (TF-IDF models).
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "bool")]
    pub explain: Option<bool>,
}

fn default_model() -> &'static str {
    "tfidf"
}

fn example_prediction_request() -> Value {
    serde_json::json!({"text": "A moving, beautifully acted film with a sharp and funny script."})
}

/// A sentiment label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sentiment {
    Negative,
    Positive,
}

impl Sentiment {
    pub fn of(label: &str) -> Sentiment {
        if label == "positive" {
            Sentiment::Positive
        } else {
            Sentiment::Negative
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sentiment::Negative => "negative",
            Sentiment::Positive => "positive",
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Probabilities {
    pub negative: f64,
    pub positive: f64,
}

/// The prediction for one text.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Scored {
    /// Names this prediction in `POST /feedback`.
    pub id: String,
    pub label: Sentiment,
    /// The probability of `positive`.
    pub score: f64,
    pub probabilities: Probabilities,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

/// The answer to `POST /prediction`: the prediction's fields for `text`, `predictions` for
/// `texts`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(example = example_prediction())]
pub struct PredictionResponse {
    #[serde(flatten)]
    pub one: Option<Scored>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Vec<Scored>>,
    pub model: String,
    pub version: String,
}

fn example_prediction() -> Value {
    serde_json::json!({"id": "6745f0c1-2a", "label": "positive", "score": 0.93,
        "probabilities": {"negative": 0.07, "positive": 0.93}, "model": "tfidf", "version": "tfidf-3f9a2c1d"})
}

/// The body of `POST /feedback`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// An `id` from a `POST /prediction` answer.
    pub prediction_id: String,
    /// The true label.
    pub label: Sentiment,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FeedbackResponse {
    pub prediction_id: String,
    pub model: String,
    pub version: String,
    pub predicted: Sentiment,
    pub label: Sentiment,
    pub correct: bool,
}

/// The query of `GET /best_model_parameter`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ModelQuery {
    /// The served model.
    #[serde(default = "model_default")]
    #[schemars(default = "default_model")]
    pub model: String,
}

fn model_default() -> String {
    default_model().to_string()
}

/// The query of `GET /drift`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct DriftQuery {
    /// `1`: add the last stored evaluations.
    pub history: Option<HistoryFlag>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum HistoryFlag {
    #[serde(rename = "1")]
    Yes,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Health {
    pub status: HealthStatus,
    /// When the server started, in seconds since the Unix epoch.
    pub started_at: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Ready {
    /// Whether a model is served.
    pub ready: bool,
    pub models: Vec<String>,
}

/// The answer to `GET /best_model_parameter`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(example = example_best())]
pub struct BestModelParameter {
    pub model: String,
    pub version: String,
    pub pipeline: String,
    /// The training run that produced it, when trained through the API.
    pub run_id: Option<String>,
    pub kind: String,
    /// The hyper-parameters of the model and its features.
    pub parameters: Parameters,
    /// The cross-validation of the tuning that chose them, if the model was tuned.
    pub cv: Option<CrossValidation>,
    /// Metrics on the validation split.
    pub validation: Figures,
}

fn example_best() -> Value {
    serde_json::json!({"model": "tfidf", "version": "tfidf-3f9a2c1d", "pipeline": "imdb", "run_id": null,
        "kind": "tfidf", "parameters": {"model": {"kind": "logistic_regression", "c": 4.0},
        "vectorizer": {"ngram_range": [1, 2], "min_df": 2}},
        "cv": {"metric": "accuracy", "mean": 0.9113, "std": 0.0045, "folds": 5, "vectorizer_stage": "vectorize"},
        "validation": {"accuracy": 0.9201}})
}

/// A tuning's cross-validated score of the chosen parameters.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CrossValidation {
    pub metric: String,
    pub mean: f64,
    pub std: f64,
    pub folds: usize,
    pub vectorizer_stage: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Models {
    pub models: Vec<ModelEntry>,
}

/// A registered version; a candidate's says where it stands with the promotion gate.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ModelEntry {
    #[serde(flatten)]
    pub row: ModelRow,
    /// Candidates, with a promotion gate: whether their shadow figures meet it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateVerdict>,
}

/// The answer to `GET /models/{version}/shadow`: the version's shadow figures so far, over
/// every server.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ShadowReport {
    pub version: String,
    pub model: String,
    #[serde(flatten)]
    pub figures: ShadowFigures,
    pub canary_percent: u8,
    /// Whether the figures meet the promotion gate (null when the server has none).
    pub gate: Option<GateVerdict>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Rejected {
    pub rejected: ModelRow,
}

/// The body of `POST /models/{version}/canary`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CanaryRequest {
    /// The share of its name's predictions the candidate answers: 1 to 50, or 100.
    pub percent: u8,
}

/// A candidate's canary share (0: none).
#[derive(Debug, Serialize, JsonSchema)]
pub struct Canary {
    pub version: String,
    pub percent: u8,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Promoted {
    pub promoted: ModelRow,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Pipelines {
    pub pipelines: Vec<PipelineInfo>,
}

/// A pipeline the server may run; `error` instead of the rest when it does not validate.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PipelineInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Its parameters and their declared values.
    pub params: Option<BTreeMap<String, ParamValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StageInfo {
    pub name: String,
    pub kind: String,
    pub needs: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TrainingStarted {
    pub id: String,
    pub pipeline: String,
    pub status: RunStatus,
}

/// A training run and its stages.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TrainingRun {
    pub id: String,
    pub pipeline: String,
    pub status: RunStatus,
    /// What started it.
    pub trigger: Trigger,
    pub error: Option<String>,
    /// The parameters the run was asked for.
    pub params: BTreeMap<String, ParamValue>,
    /// Each stage's last state, by name.
    pub stages: BTreeMap<String, StageOutcome>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// The MLflow run it was tracked as, when tracking is on.
    pub mlflow_run_id: Option<String>,
}

/// The query of `GET /training`: every filter given must match.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingQuery {
    /// Runs of this pipeline.
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    /// What started the runs.
    pub trigger: Option<Trigger>,
    /// Runs per page, 1 to 100.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub limit: u32,
    /// Runs to skip, newest first.
    #[serde(default)]
    pub offset: u64,
}

fn default_limit() -> u32 {
    20
}

/// The answer to `GET /training`: a page of runs, newest first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TrainingRuns {
    pub runs: Vec<RunSummary>,
    /// Runs the filters select, over all pages.
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
    /// The MLflow server runs are tracked on, when tracking is on: a run's page is
    /// `{mlflow_ui}/#/runs/{mlflow_run_id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlflow_ui: Option<String>,
}

/// The answer to `POST /training/{id}/cancel`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TrainingCancelled {
    pub id: String,
    /// Always `cancelled`: the run stops at the engine's next stop check.
    pub status: RunStatus,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StageOutcome {
    pub state: String,
    pub duration_ms: u64,
    pub metrics: Figures,
    pub error: Option<String>,
    /// Where an executor runs or ran it: engine, job, node and the engine's page of the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TrainingLogs {
    pub id: String,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    pub seq: i64,
    pub stage: String,
    pub line: String,
    pub at: String,
}

/// The shape of `GET /openapi.json` (the document itself is built in `openapi`): an OpenAPI 3.1
/// document, whose operations and schemas are JSON objects of the specification's own shapes.
#[derive(Debug, Serialize, JsonSchema)]
pub struct OpenApiDocument {
    pub openapi: String,
    pub info: OpenApiInfo,
    /// Path → method → operation.
    pub paths: BTreeMap<String, BTreeMap<String, serde_json::Map<String, Value>>>,
    /// `schemas` and `securitySchemes`, by name.
    pub components: BTreeMap<String, BTreeMap<String, serde_json::Map<String, Value>>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct OpenApiInfo {
    pub title: String,
    pub version: String,
    pub description: String,
}
