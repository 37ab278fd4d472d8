//! What each route does, between its typed request and its typed answer. Work that touches the
//! database, files or a model goes through `Ctx::blocking` (or a model's own worker).

use std::sync::{Arc, LazyLock};

use warp::http::{HeaderValue, StatusCode};
use warp::hyper::body::Bytes;

use super::api::*;
use super::context::{Answer, Ctx, Reply};
use super::error::ApiError;
use crate::models::bundle::{Explanation, Model, Prediction};
use crate::pipeline::Pipeline;
use crate::serve::service::app::App;
use crate::serve::service::drift::{DriftOverview, Gauges, Made};
use crate::serve::service::metrics::CONTENT_TYPE;
use crate::serve::service::runs::{self, no_run};
use crate::serve::service::serving::Serving;
use crate::serve::service::training::{available, find_pipeline};
use crate::store::{CanaryChange, ModelStatus, PromotedBy, PromotionReason, RunFilter, RunStatus, Trigger};

/// The web interface: one self-contained page (HTML, CSS and JavaScript, no build step) that
/// talks to this API.
const UI: &str = include_str!("ui.html");

/// The page's Content-Security-Policy: its one inline script allowed by hash, so no injected
/// script runs; inline styles (the page sets `style` attributes); everything else from this
/// server only; never in a frame.
static UI_CSP: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine;
    use sha2::Digest;
    let script = UI
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .expect("ui.html has an inline <script>");
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    format!(
        "default-src 'self'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

pub async fn page(_: &Ctx) -> Answer {
    Ok(
        Reply::with_type(HeaderValue::from_static("text/html; charset=utf-8"), UI)
            .header("content-security-policy", UI_CSP.as_str())
            .header("x-frame-options", "DENY"),
    )
}

/// Swagger UI, from the files built into the binary, reading `/openapi.json`; the validator
/// badge (a request to swagger.io) is off, so the page works with no network.
static DOCS_CONFIG: LazyLock<Arc<utoipa_swagger_ui::Config<'static>>> = LazyLock::new(|| {
    Arc::new(
        utoipa_swagger_ui::Config::from("/openapi.json")
            .validator_url("none")
            .try_it_out_enabled(true)
            .persist_authorization(true),
    )
});

/// Swagger UI's policy: its scripts and styles from this server only (it sets inline styles).
const DOCS_CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                        object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn docs(ctx: &Ctx) -> Answer {
    // The page loads its files relative to itself, so it must be read from `/docs/`.
    if ctx.params.is_empty() && !ctx.path.ends_with('/') {
        return Ok(
            Reply::with_type(HeaderValue::from_static("text/plain; charset=utf-8"), "")
                .status(StatusCode::PERMANENT_REDIRECT)
                .header("location", "/docs/"),
        );
    }
    let file = ctx.params.first().map(String::as_str).unwrap_or("");
    let not_found = || ApiError::not_found("not_found", format!("no file {} in the API documentation", ctx.path));
    let found = utoipa_swagger_ui::serve(file, DOCS_CONFIG.clone())
        .map_err(|e| ApiError::internal(format!("serving the API documentation: {e}")))?
        .ok_or_else(not_found)?;
    let content_type = HeaderValue::from_str(&found.content_type).map_err(|_| not_found())?;
    Ok(Reply::with_type(content_type, found.bytes.into_owned())
        .header("content-security-policy", DOCS_CSP)
        .header("x-frame-options", "DENY"))
}

pub async fn metrics(ctx: &Ctx) -> Answer {
    // The drift gauges evaluate every model's window: not on a connection's thread.
    let text = ctx
        .blocking(|app| app.metrics.render(Gauges(app.drift_overview())))
        .await?;
    Ok(Reply::with_type(HeaderValue::from_static(CONTENT_TYPE), text))
}

pub async fn health(ctx: &Ctx) -> Answer {
    Ok(Reply::json(&Health {
        status: HealthStatus::Ok,
        started_at: ctx.app.started,
    }))
}

pub async fn ready(ctx: &Ctx) -> Answer {
    let models = ctx.app.model_names();
    let ready = !models.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(Reply::json(&Ready { ready, models }).status(status))
}

/// `document` is built once, when the routes are: it depends only on them, the types and the
/// settings.
pub async fn openapi(_: &Ctx, document: Bytes) -> Answer {
    Ok(Reply::with_type(HeaderValue::from_static("application/json"), document))
}

pub async fn best_model_parameter(ctx: &Ctx, query: String) -> Answer {
    let q: ModelQuery = ctx.query(&query)?;
    let serving = ctx.app.served(&q.model)?;
    let m = &serving.bundle.manifest;
    Ok(Reply::json(&BestModelParameter {
        model: m.name.clone(),
        version: m.version.clone(),
        pipeline: m.pipeline.clone(),
        run_id: serving.row.run_id.clone(),
        kind: m.kind().to_string(),
        parameters: m.parameters(),
        cv: m.tuning().map(|t| CrossValidation {
            metric: t.metric,
            mean: t.mean,
            std: t.std,
            folds: t.folds,
            vectorizer_stage: t.vectorizer,
        }),
        validation: m.figures(),
    }))
}

/// Texts up to this many bytes in all are scored on the request's thread: a TF-IDF score of
/// them takes less time than handing them to a blocking thread and back.
const INLINE_SCORING_BYTES: usize = 4096;

pub async fn prediction(ctx: &Ctx, body: Bytes) -> Answer {
    let app = &ctx.app;
    let request: PredictionRequest = ctx.json(&body)?;
    let (texts, single) = match (request.text, request.texts) {
        (Some(text), None) => (vec![text], true),
        (None, Some(texts)) => (texts, false),
        (None, None) => return Err(ApiError::field("text", "missing: send `text` or `texts`")),
        (Some(_), Some(_)) => return Err(ApiError::field("text", "send either `text` or `texts`, not both")),
    };
    let max = app.config.max_batch;
    if texts.is_empty() || texts.len() > max {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_batch",
            format!("`texts` must hold 1 to {max} texts, got {}", texts.len()),
        ));
    }
    for (i, t) in texts.iter().enumerate() {
        let field = if single {
            "text".to_string()
        } else {
            format!("texts[{i}]")
        };
        if t.trim().is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "empty_text",
                format!("`{field}` is empty"),
            ));
        }
        let chars = t.chars().count();
        if chars > app.config.max_text_chars {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "text_too_long",
                format!(
                    "`{field}` has {chars} characters; the limit is {}",
                    app.config.max_text_chars
                ),
            ));
        }
    }
    let name = request.model.unwrap_or_else(|| "tfidf".to_string());
    let explain = request.explain.unwrap_or(false);
    let serving = app.served(&name)?;
    // A candidate answers its canary's share; production answers the rest, and the candidate
    // scores a share of those in the background.
    let candidate = app.shadow.candidate(&name);
    let canary = candidate.as_ref().is_some_and(|c| c.takes_canary());
    let serving = match (&candidate, canary) {
        (Some(c), true) => c.serving.clone(),
        _ => serving,
    };
    let bytes: usize = texts.iter().map(String::len).sum();
    let (samples, explanations) = if serving.batcher.is_some() {
        // An ONNX model runs on its batching worker.
        let samples = serving.predict_batched(&texts).await?;
        let none = samples.iter().map(|_| None).collect();
        (samples, none)
    } else if bytes <= INLINE_SCORING_BYTES {
        score_now(&serving, &texts, explain)?
    } else {
        let (serving, texts) = (serving.clone(), texts.clone());
        ctx.blocking(move |_| score_now(&serving, &texts, explain)).await??
    };
    let version = serving.row.version.clone();
    let mut predictions: Vec<Scored> = Vec::with_capacity(texts.len());
    for (i, ((s, text), explanation)) in samples.iter().zip(&texts).zip(explanations).enumerate() {
        let p = Prediction::from_score(s.score);
        let id = format!("{}-{i}", ctx.id);
        app.metrics.prediction(&name, &version, p.label);
        let made = Made {
            model: name.clone(),
            version: version.clone(),
            label: p.label,
        };
        app.journal.add(id.clone(), made, s, text, app.config.store_texts);
        predictions.push(Scored {
            id,
            label: Sentiment::of(p.label),
            score: p.score,
            probabilities: Probabilities {
                negative: 1.0 - p.score,
                positive: p.score,
            },
            explanation,
        });
    }
    if let (Some(candidate), false) = (candidate, canary) {
        let ids = predictions.iter().map(|p| p.id.clone()).collect();
        app.shadow
            .offer(app.config.shadow_percent, &app.metrics, candidate, texts, ids, samples);
    }
    let answer = if single {
        PredictionResponse {
            one: predictions.pop(),
            predictions: None,
            model: name.clone(),
            version: version.clone(),
        }
    } else {
        PredictionResponse {
            one: None,
            predictions: Some(predictions),
            model: name.clone(),
            version: version.clone(),
        }
    };
    Ok(Reply::json(&answer).served(&name, &version))
}

type Scores = Result<(Vec<crate::drift::Sample>, Vec<Option<Explanation>>), ApiError>;

/// Scores `texts` with a model that runs in the calling thread and, when asked, explains them.
fn score_now(serving: &Serving, texts: &[String], explain: bool) -> Scores {
    let samples = serving.predict_now(texts)?;
    let explanations = match (&serving.bundle.model, explain) {
        (Model::Tfidf(m), true) => texts.iter().map(|t| Some(m.explain(t, 8))).collect(),
        _ => texts.iter().map(|_| None).collect(),
    };
    Ok((samples, explanations))
}

pub async fn feedback(ctx: &Ctx, body: Bytes) -> Answer {
    let request: FeedbackRequest = ctx.json(&body)?;
    let answer = ctx.blocking(move |app| record_feedback(app, request)).await??;
    Ok(Reply::json(&answer))
}

fn record_feedback(app: &App, request: FeedbackRequest) -> Result<FeedbackResponse, ApiError> {
    let id = request.prediction_id;
    let made = match app.journal.find(&id) {
        Some(m) => Some((m.model, m.version, m.label.to_string())),
        None => app.store.prediction(&id)?,
    };
    let Some((model, version, predicted)) = made else {
        return Err(ApiError::not_found(
            "not_found",
            format!("no prediction `{id}` (ids are in `POST /prediction` answers)"),
        ));
    };
    let label = request.label;
    let correct = predicted == label.as_str();
    if !app.store.add_feedback(&id, label.as_str(), correct)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_feedback",
            format!("prediction `{id}` already has feedback"),
        ));
    }
    if let Some(serving) = app.serving(&model).filter(|s| s.row.version == version) {
        serving.monitor.feedback(correct);
    }
    app.shadow.feedback(&id, label.as_str());
    Ok(FeedbackResponse {
        prediction_id: id,
        model,
        version,
        predicted: Sentiment::of(&predicted),
        label,
        correct,
    })
}

pub async fn pipelines(ctx: &Ctx) -> Answer {
    let answer = ctx.blocking(list_pipelines).await?;
    Ok(Reply::json(&answer))
}

pub async fn drift(ctx: &Ctx, query: String) -> Answer {
    let q: DriftQuery = ctx.query(&query)?;
    let answer = ctx
        .blocking(move |app| -> Result<DriftOverview, ApiError> {
            let mut report = app.drift_overview();
            if let Some(HistoryFlag::Yes) = q.history {
                report.history = Some(app.store.drift_history(100)?);
            }
            Ok(report)
        })
        .await??;
    Ok(Reply::json(&answer))
}

pub async fn models(ctx: &Ctx) -> Answer {
    let models = ctx
        .blocking(|app| -> Result<Vec<ModelEntry>, ApiError> {
            let gate = app.config.promotion.as_ref();
            app.store
                .models()?
                .into_iter()
                .map(|row| -> Result<ModelEntry, ApiError> {
                    let gate = match (&gate, row.status) {
                        (Some(g), ModelStatus::Candidate) => Some(g.check(&app.shadow_figures(&row)?)),
                        _ => None,
                    };
                    Ok(ModelEntry { row, gate })
                })
                .collect()
        })
        .await??;
    Ok(Reply::json(&Models { models }))
}

pub async fn promote(ctx: &Ctx) -> Answer {
    let version = ctx.param(0).to_string();
    let promoted = ctx
        .blocking(move |app| app.promote(&version, PromotionReason::by(PromotedBy::Manual)))
        .await??;
    Ok(Reply::json(&Promoted { promoted }))
}

/// The `404` of a version that is not registered.
pub fn no_version(version: &str) -> ApiError {
    ApiError::not_found(
        "model_not_found",
        format!("no model version `{version}`; registered versions are in `GET /models`"),
    )
}

/// The `409` of an action on a version that is not a candidate.
fn not_candidate(version: &str, status: ModelStatus, action: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_a_candidate",
        format!(
            "model version `{version}` is {}; only a candidate can {action} (see `GET /models`)",
            status.as_str()
        ),
    )
}

pub async fn shadow_report(ctx: &Ctx) -> Answer {
    let version = ctx.param(0).to_string();
    let report = ctx
        .blocking(move |app| -> Result<ShadowReport, ApiError> {
            let row = app.store.model(&version)?.ok_or_else(|| no_version(&version))?;
            let figures = app.shadow_figures(&row)?;
            Ok(ShadowReport {
                gate: app.config.promotion.as_ref().map(|g| g.check(&figures)),
                version: row.version,
                model: row.name,
                canary_percent: row.canary_percent,
                figures,
            })
        })
        .await??;
    Ok(Reply::json(&report))
}

pub async fn reject(ctx: &Ctx) -> Answer {
    let version = ctx.param(0).to_string();
    let rejected = ctx
        .blocking(move |app| -> Result<_, ApiError> {
            match app.store.reject(&version)? {
                None => return Err(no_version(&version)),
                Some(ModelStatus::Candidate) => app.follow_candidates(),
                Some(other) => return Err(not_candidate(&version, other, "be rejected")),
            }
            app.store.model(&version)?.ok_or_else(|| no_version(&version))
        })
        .await??;
    Ok(Reply::json(&Rejected { rejected }))
}

pub async fn canary(ctx: &Ctx, body: Bytes) -> Answer {
    let request: CanaryRequest = ctx.json(&body)?;
    let percent = request.percent;
    if !(1..=50).contains(&percent) && percent != 100 {
        return Err(ApiError::field(
            "percent",
            format!("{percent} is not a canary share: send 1 to 50, or 100 (all predictions)"),
        ));
    }
    set_canary(ctx, percent).await
}

pub async fn canary_stop(ctx: &Ctx) -> Answer {
    set_canary(ctx, 0).await
}

async fn set_canary(ctx: &Ctx, percent: u8) -> Answer {
    let version = ctx.param(0).to_string();
    let canary = ctx
        .blocking(move |app| -> Result<Canary, ApiError> {
            let name = match app.store.set_canary(&version, percent)? {
                CanaryChange::Set { name } => name,
                CanaryChange::NotFound => return Err(no_version(&version)),
                CanaryChange::NotCandidate(status) => return Err(not_candidate(&version, status, "answer a canary")),
                CanaryChange::NotEvaluated { name, evaluated } => {
                    let why = match evaluated {
                        Some(newest) => format!(
                            "the candidate under evaluation of `{name}` is its newest, `{newest}`; reject that \
                             one first, or start the canary on it"
                        ),
                        None => format!("`{name}` has no production version for a canary to share predictions with"),
                    };
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "not_under_evaluation",
                        format!("model version `{version}` cannot answer a canary: {why}"),
                    ));
                }
            };
            app.follow_candidates();
            // Answered only once the canary routes here: a candidate this server cannot load
            // gets no share, and its canary is taken back.
            let routed = app.shadow.candidate(&name).is_some_and(|c| c.serving.row.version == version);
            if percent > 0 && !routed {
                app.store.set_canary(&version, 0)?;
                app.follow_candidates();
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "bundle_unavailable",
                    format!("model version `{version}` cannot be loaded here, so it cannot answer a canary; the server's log says why"),
                ));
            }
            Ok(Canary { version, percent })
        })
        .await??;
    Ok(Reply::json(&canary))
}

pub async fn training(ctx: &Ctx, body: Bytes) -> Answer {
    let request: TrainingRequest = ctx.json(&body)?;
    let app = ctx.app.clone();
    let pipeline = request.pipeline.clone();
    let id = ctx
        .blocking(move |_| runs::start(&app, request, Trigger::Api, None))
        .await??;
    let location = format!("/training/{id}");
    let started = TrainingStarted {
        id,
        pipeline,
        status: RunStatus::Running,
    };
    Ok(Reply::json(&started)
        .status(StatusCode::ACCEPTED)
        .header("location", location))
}

pub async fn training_status(ctx: &Ctx) -> Answer {
    let id = ctx.param(0).to_string();
    let run = ctx.blocking(move |app| run_status(app, &id)).await??;
    Ok(Reply::json(&run))
}

pub async fn training_logs(ctx: &Ctx) -> Answer {
    let id = ctx.param(0).to_string();
    let logs = ctx.blocking(move |app| run_logs(app, &id)).await??;
    Ok(Reply::json(&logs))
}

pub async fn training_list(ctx: &Ctx, query: String) -> Answer {
    let q: TrainingQuery = ctx.query(&query)?;
    let runs = ctx.blocking(move |app| list_runs(app, q)).await??;
    Ok(Reply::json(&runs))
}

pub async fn training_cancel(ctx: &Ctx) -> Answer {
    let id = ctx.param(0).to_string();
    ctx.blocking({
        let id = id.clone();
        move |app| runs::cancel(app, &id)
    })
    .await??;
    Ok(Reply::json(&TrainingCancelled {
        id,
        status: RunStatus::Cancelled,
    }))
}

/// `GET /pipelines`: each pipeline the server may run, with its parameters and its stages.
fn list_pipelines(app: &App) -> Pipelines {
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

/// `GET /training/{id}`: the run and each stage's last state.
fn run_status(app: &App, id: &str) -> Result<TrainingRun, ApiError> {
    let run = app.store.run(id)?.ok_or_else(|| no_run(id))?;
    let mut stages = std::collections::BTreeMap::new();
    for e in run.events {
        // A placement holds for the rest of the stage's events.
        let placed: Option<&StageOutcome> = stages.get(&e.stage);
        let placement = e.placement.or_else(|| placed.and_then(|s| s.placement.clone()));
        let outcome = StageOutcome {
            state: e.state,
            duration_ms: e.duration_ms,
            metrics: e.metrics,
            error: e.error,
            placement,
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
fn list_runs(app: &App, query: TrainingQuery) -> Result<TrainingRuns, ApiError> {
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

/// `GET /training/{id}/logs`.
fn run_logs(app: &App, id: &str) -> Result<TrainingLogs, ApiError> {
    if app.store.run(id)?.is_none() {
        return Err(no_run(id).into());
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
