//! The server's background work: following the other servers of its database, storing
//! predictions and drift evaluations, retraining on a drift alert or a schedule, and scoring
//! and judging candidates on shadow traffic. Each loop runs until the server stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::app::App;
use super::drift::{ModelDrift, RECENT};
use super::error::Failure;
use super::policy::{RetrainOn, RetrainPolicy};
use super::runs::{self, TrainingRequest};
use super::training::{ALREADY_RUNNING, COOLING_DOWN};
use crate::drift::Status;
use crate::store::{ModelStatus, PromotedBy, PromotionReason, Retention, ShadowCounts, Trigger};

/// Starts every loop on the current tokio runtime.
pub fn spawn(app: &Arc<App>) {
    tokio::spawn(watch(
        app.clone(),
        Duration::from_secs(app.config.drift_period_s.max(1)),
    ));
    tokio::spawn(follow(app.clone()));
    tokio::spawn(schedule(app.clone()));
    tokio::spawn(shadow_work(app.clone()));
    // Shadow counts reach the database (and the gate is checked) with each drift evaluation,
    // and at least every 5 s.
    tokio::spawn(shadow_flush_every(
        app.clone(),
        Duration::from_secs(app.config.drift_period_s.clamp(1, 5)),
    ));
}

/// What a stopping server does once its last request is answered: its trainings record how they
/// ended, and the shadow counts not yet stored are added to the database.
pub fn finish(app: &App) {
    app.training.stop_all(&app.store);
    shadow_save(app);
}

/// Keeps this server in step with the others on its database: a version promoted anywhere is
/// served here within a fraction of a second of its commit (PostgreSQL's notifications, SQLite's
/// `data_version`), with a full check every few seconds in case a notification was lost; the
/// leases of this server's runs are renewed at a third of their length.
async fn follow(app: Arc<App>) {
    const TICK: Duration = Duration::from_millis(200);
    const FULL_CHECK: Duration = Duration::from_secs(5);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut renewed, mut checked) = (Instant::now(), Instant::now());
    let mut seen = None;
    loop {
        tick.tick().await;
        let changes = app.store.outside_changes().ok();
        let changed = changes.is_none() || changes != seen;
        seen = changes;
        let renew = renewed.elapsed() >= app.config.run_lease() / 3;
        let check = changed || checked.elapsed() >= FULL_CHECK;
        if renew {
            renewed = Instant::now();
        }
        if check {
            checked = Instant::now();
        }
        if renew || check {
            let app = app.clone();
            let work = tokio::task::spawn_blocking(move || {
                if renew {
                    app.keep_leases();
                }
                if check {
                    app.follow_production();
                    app.follow_candidates();
                }
            });
            if let Err(e) = work.await {
                tracing::error!("following the database: {e}");
            }
        }
    }
}

/// Every `period`: writes the predictions made since the last time, stores an evaluation of each
/// model, and logs it to MLflow when `MLFLOW_TRACKING_URI` is set.
async fn watch(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut mlflow_runs: HashMap<String, String> = HashMap::new();
    let mut step = 0i64;
    loop {
        tick.tick().await;
        step += 1;
        let app2 = app.clone();
        let runs = std::mem::take(&mut mlflow_runs);
        mlflow_runs = tokio::task::spawn_blocking(move || evaluate_once(&app2, runs, step))
            .await
            .unwrap_or_default();
    }
}

fn evaluate_once(app: &Arc<App>, mut mlflow_runs: HashMap<String, String>, step: i64) -> HashMap<String, String> {
    let (rows, skipped) = app.journal.take_unsaved();
    if skipped > 0 {
        tracing::warn!("{skipped} predictions of this period were not stored (at most {RECENT} a period)");
    }
    if let Err(e) = app.store.add_predictions(&rows) {
        tracing::error!("saving {} predictions: {e}", rows.len());
        app.metrics.store_failure("predictions");
    }
    let keep = Retention {
        rows: app.config.keep_predictions,
        days: app.config.keep_days,
    };
    match app.store.prune(keep) {
        Ok(n) => app.metrics.stored_predictions(n),
        Err(e) => {
            tracing::error!("pruning stored predictions: {e}");
            app.metrics.store_failure("prune");
        }
    }
    let report = app.drift_overview();
    for (model, drift) in &report.models {
        let ModelDrift::Window(w) = drift else { continue };
        if w.report.samples == 0 {
            continue;
        }
        let version = &w.version;
        if let Err(e) = app.store.add_drift(model, &app.replica, w) {
            tracing::error!("saving the drift evaluation of {model}: {e}");
            app.metrics.store_failure("drift_evaluation");
        }
        if let Some(t) = &app.tracker {
            let key = format!("{model} {version}");
            match t.log_drift(mlflow_runs.get(&key).cloned(), model, version, &w.report, step) {
                Ok(run) => {
                    mlflow_runs.insert(key, run);
                }
                Err(e) => tracing::warn!("drift of {model} not sent to MLflow: {e}"),
            }
        }
    }
    let alerts: Vec<&str> = report
        .models
        .iter()
        .filter(|(_, d)| matches!(d, ModelDrift::Window(w) if w.report.samples > 0 && w.report.status == Status::Alert))
        .map(|(m, _)| m.as_str())
        .collect();
    if !alerts.is_empty() {
        drift_alert(app, &alerts);
    }
    mlflow_runs
}

/// Starts a run of the policy's pipeline for `trigger` exactly as `POST /training` does, unless
/// the pipeline is being trained or an automatic run of it started within the cooldown (the
/// database decides both, so replicas agree and a restart forgets nothing); logs and counts
/// the decision.
fn retrain(app: &Arc<App>, policy: &RetrainPolicy, trigger: Trigger) {
    let request = TrainingRequest {
        pipeline: policy.pipeline.clone(),
        params: policy.params.clone(),
        stages: Vec::new(),
    };
    let (pipeline, on) = (&policy.pipeline, trigger.as_str());
    let outcome = match runs::start(app, request, trigger, Some(policy.cooldown.0)) {
        Ok(id) => {
            tracing::info!("retraining {pipeline} on {on}: started run {id}");
            "started"
        }
        Err(e) if e.code == COOLING_DOWN => {
            tracing::info!("retraining {pipeline} on {on}: skipped: {}", e.message);
            "cooldown"
        }
        Err(e) if e.code == ALREADY_RUNNING => {
            tracing::info!("retraining {pipeline} on {on}: skipped: busy ({})", e.message);
            "busy"
        }
        Err(e) => {
            tracing::warn!("retraining {pipeline} on {on}: cannot start: {}", e.message);
            "failed"
        }
    };
    app.metrics.retrain(on, outcome);
}

/// A drift evaluation found `models` in alert: retrains when the policy says so.
fn drift_alert(app: &Arc<App>, models: &[&str]) {
    let Some(policy) = app
        .config
        .retrain
        .as_ref()
        .filter(|p| p.on.contains(&RetrainOn::DriftAlert))
    else {
        return;
    };
    tracing::info!("drift alert of {models:?}");
    retrain(app, policy, Trigger::Drift);
}

/// With `every` in the policy: a scheduled run once `every` has passed since the last scheduled
/// run of the pipeline in the database (or since this server started, when there is none).
async fn schedule(app: Arc<App>) {
    let Some(policy) = app.config.retrain.clone() else {
        return;
    };
    let Some(every) = policy.every else {
        return;
    };
    let since_start = chrono::Utc::now();
    let every_chrono = chrono::Duration::from_std(every.0).unwrap_or(chrono::Duration::MAX);
    let mut tick = tokio::time::interval((every.0 / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let (app, policy) = (app.clone(), policy.clone());
        let work = tokio::task::spawn_blocking(move || {
            let last = match app.store.last_run_at(&policy.pipeline, Trigger::Schedule) {
                Ok(last) => last
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                    .map_or(since_start, |t| t.with_timezone(&chrono::Utc)),
                Err(e) => return tracing::warn!("reading the last scheduled run of {}: {e}", policy.pipeline),
            };
            if last
                .checked_add_signed(every_chrono)
                .is_some_and(|due| chrono::Utc::now() >= due)
            {
                retrain(&app, &policy, Trigger::Schedule);
            }
        });
        if let Err(e) = work.await {
            tracing::error!("the retraining schedule: {e}");
        }
    }
}

/// Scores the queued jobs with their candidates, one at a time, until the server stops.
async fn shadow_work(app: Arc<App>) {
    let Some(mut jobs) = app.shadow.take_jobs() else {
        return;
    };
    while let Some(mut job) = jobs.recv().await {
        let started = Instant::now();
        let serving = job.candidate.serving.clone();
        let scored = if serving.batcher.is_some() {
            serving.predict_batched(&job.texts).await
        } else {
            // Scored on a blocking thread, and handed back for the tally.
            let texts = std::mem::take(&mut job.texts);
            tokio::task::spawn_blocking(move || serving.predict_now(&texts))
                .await
                .unwrap_or_else(|e| Err(Failure::internal(e.to_string())))
        };
        match scored {
            Ok(samples) => app.shadow.tally(&job, &samples, started.elapsed()),
            Err(e) => tracing::warn!(
                "candidate {} failed on shadow traffic: {}",
                job.candidate.serving.row.version,
                e.message
            ),
        }
    }
}

/// Every `period`: adds this server's counts to the database, then promotes each candidate whose
/// figures (every server's) meet the gate, and logs them to the candidate's MLflow run.
async fn shadow_flush_every(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut step = 0i64;
    loop {
        tick.tick().await;
        step += 1;
        let app = app.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shadow_flush(&app, step)).await {
            tracing::error!("flushing the shadow counts: {e}");
        }
    }
}

/// Adds the counts gathered since the last save to the database (also when the server stops,
/// so a restart loses none); returns them.
fn shadow_save(app: &App) -> HashMap<String, ShadowCounts> {
    let pending = app.shadow.take_pending();
    for (version, counts) in &pending {
        if let Err(e) = app.store.add_shadow(version, counts) {
            tracing::error!("saving the shadow counts of {version}: {e}");
            app.metrics.store_failure("shadow_counts");
        }
    }
    pending
}

fn shadow_flush(app: &App, step: i64) {
    let pending = shadow_save(app);
    let Some(gate) = &app.config.promotion else {
        return;
    };
    for candidate in app.shadow.all() {
        let version = &candidate.serving.row.version;
        // Another server may have promoted or rejected it since it was loaded here.
        let row = match app.store.model(version) {
            Ok(Some(row)) if row.status == ModelStatus::Candidate => row,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("reading candidate {version}: {e}");
                continue;
            }
        };
        let figures = match app.shadow_figures(&row) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("reading the shadow figures of {version}: {}", e.message);
                continue;
            }
        };
        if let (Some(t), true) = (&app.tracker, pending.contains_key(version)) {
            app.shadow.log_figures(t, &row, &figures, step);
        }
        if !gate.check(&figures).met || app.config.no_auto_promote {
            continue;
        }
        let reason = PromotionReason {
            by: PromotedBy::Gate,
            shadow: Some(figures),
        };
        match app.promote(version, reason) {
            Ok(_) => tracing::info!(
                "candidate {} version {version} met the promotion gate: promoted",
                row.name
            ),
            Err(e) => tracing::warn!("promoting candidate {version}: {}", e.message),
        }
    }
}
