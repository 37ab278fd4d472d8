//! Candidates under evaluation. With a promotion gate, a newly registered version of a served
//! name is loaded beside production and scores a share of its name's predictions in the
//! background (shadow traffic), off the request's path: a bounded queue feeds one worker, and a
//! prediction that finds the queue full is dropped from the shadow and counted, never delayed.
//! The counts are added to the database every few seconds, where every replica adds its own;
//! after each flush the gate is checked and a candidate that meets it is promoted. A candidate
//! may also answer a share of the predictions itself (a canary).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::error::ApiError;
use super::{App, Serving};
use crate::drift::{score_bin, Sample};
use crate::models::bundle::Prediction;
use crate::store::{latency_bucket, ModelRow, ModelStatus, PromotedBy, PromotionReason, ShadowCounts, ShadowFigures};
use crate::tracking::api::ModelVersion;
use crate::tracking::Tracker;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the `n`th event (from 0) is among `percent` of them, evenly spread: exactly
/// `percent` of every 100 consecutive events.
fn picked(n: u64, percent: u8) -> bool {
    let p = u64::from(percent);
    (n + 1) * p / 100 > n * p / 100
}

/// A candidate loaded beside the production version of its name.
pub struct Candidate {
    pub serving: Arc<Serving>,
    /// The share of its name's predictions it answers (the database's, followed).
    canary: AtomicU8,
    /// Predictions of its name so far, for the canary's split.
    seen: AtomicU64,
}

impl Candidate {
    /// Whether this prediction of its name is answered by the candidate.
    pub fn takes_canary(&self) -> bool {
        let percent = self.canary.load(Ordering::Relaxed);
        percent > 0 && picked(self.seen.fetch_add(1, Ordering::Relaxed), percent)
    }
}

/// Texts production answered, for the candidate to score too.
struct Job {
    candidate: Arc<Candidate>,
    texts: Vec<String>,
    ids: Vec<String>,
    production: Vec<Sample>,
}

/// Both labels of a shadowed prediction, for its feedback.
struct Link {
    version: String,
    candidate: &'static str,
    production: &'static str,
}

/// Shadowed predictions whose feedback is counted (the newest).
const LINKS: usize = 100_000;

pub struct Shadow {
    candidates: RwLock<HashMap<String, Arc<Candidate>>>,
    queue: mpsc::Sender<Job>,
    /// Taken by the worker when the server starts.
    jobs: Mutex<Option<mpsc::Receiver<Job>>>,
    /// Counts not yet added to the database, by candidate version.
    pending: Mutex<HashMap<String, ShadowCounts>>,
    links: Mutex<(HashMap<String, Link>, VecDeque<String>)>,
    /// Predictions offered to the shadow, for `--shadow-percent`.
    offered: AtomicU64,
    /// MLflow's version of each sentiflow version, once found.
    mlflow: Mutex<HashMap<String, ModelVersion>>,
}

impl Shadow {
    pub fn new(queue: usize) -> Shadow {
        let (queue, jobs) = mpsc::channel(queue.clamp(1, 1 << 24));
        Shadow {
            candidates: RwLock::default(),
            queue,
            jobs: Mutex::new(Some(jobs)),
            pending: Mutex::default(),
            links: Mutex::default(),
            offered: AtomicU64::new(0),
            mlflow: Mutex::default(),
        }
    }

    pub fn candidate(&self, name: &str) -> Option<Arc<Candidate>> {
        self.candidates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Candidate>> {
        self.candidates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Hands texts production answered to the candidate of their name, unless the share or the
    /// queue says otherwise; returns at once.
    pub fn offer(
        &self,
        app: &App,
        candidate: Arc<Candidate>,
        texts: Vec<String>,
        ids: Vec<String>,
        production: Vec<Sample>,
    ) {
        if !picked(self.offered.fetch_add(1, Ordering::Relaxed), app.config.shadow_percent) {
            return;
        }
        let version = candidate.serving.row.version.clone();
        let n = texts.len() as u64;
        let job = Job {
            candidate,
            texts,
            ids,
            production,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(job) {
            app.metrics.shadow_dropped(n);
            lock(&self.pending).entry(version).or_default().dropped += n;
        }
    }

    /// Counts what the candidate said of a job's texts.
    fn tally(&self, job: &Job, samples: &[Sample], elapsed: Duration) {
        let version = &job.candidate.serving.row.version;
        let mut links = Vec::with_capacity(samples.len());
        {
            let mut pending = lock(&self.pending);
            let counts = pending.entry(version.clone()).or_default();
            for ((c, p), id) in samples.iter().zip(&job.production).zip(&job.ids) {
                let (cl, pl) = (
                    Prediction::from_score(c.score).label,
                    Prediction::from_score(p.score).label,
                );
                counts.shadowed += 1;
                counts.agreed += u64::from(cl == pl);
                counts.candidate_scores[score_bin(c.score)] += 1;
                counts.production_scores[score_bin(p.score)] += 1;
                links.push((id.clone(), cl, pl));
            }
            *counts
                .latency
                .entry(latency_bucket(elapsed.as_micros() as u64))
                .or_default() += 1;
        }
        let mut l = lock(&self.links);
        for (id, candidate, production) in links {
            if l.1.len() == LINKS {
                if let Some(old) = l.1.pop_front() {
                    l.0.remove(&old);
                }
            }
            l.1.push_back(id.clone());
            let link = Link {
                version: version.clone(),
                candidate,
                production,
            };
            l.0.insert(id, link);
        }
    }

    /// Counts the feedback `label` of prediction `id` when it was shadowed.
    pub fn feedback(&self, id: &str, label: &str) {
        let Some((version, candidate, production)) = lock(&self.links)
            .0
            .get(id)
            .map(|l| (l.version.clone(), l.candidate, l.production))
        else {
            return;
        };
        let mut pending = lock(&self.pending);
        let counts = pending.entry(version).or_default();
        counts.feedback += 1;
        counts.candidate_correct += u64::from(candidate == label);
        counts.production_correct += u64::from(production == label);
    }
}

impl App {
    /// Loads the candidate under evaluation of each name as the database has them (with a
    /// promotion gate, or while it answers a canary), and drops those promoted or rejected since.
    pub(super) fn follow_candidates(&self) {
        let rows = match self.store.candidates() {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("reading the candidates: {e}"),
        };
        let mut next = HashMap::new();
        // Without a gate, a candidate is loaded only to answer its canary.
        let gate = self.config.promotion.is_some();
        for row in rows.into_iter().filter(|r| gate || r.canary_percent > 0) {
            let loaded = self
                .shadow
                .candidate(&row.name)
                .filter(|c| c.serving.row.version == row.version);
            let candidate = match loaded {
                Some(c) => c,
                None => match self.registry.load(&row) {
                    Ok(bundle) => {
                        tracing::info!(
                            "shadowing candidate {} version {} beside production",
                            row.name,
                            row.version
                        );
                        Arc::new(Candidate {
                            serving: self.serving_of(row.clone(), bundle),
                            canary: AtomicU8::new(0),
                            seen: AtomicU64::new(0),
                        })
                    }
                    Err(e) => {
                        let mut failed = self.unloadable.lock().unwrap_or_else(|p| p.into_inner());
                        if failed.insert(row.version.clone()) {
                            tracing::error!("candidate {} of {} cannot be loaded here: {e}", row.version, row.name);
                        }
                        continue;
                    }
                },
            };
            candidate.canary.store(row.canary_percent, Ordering::Relaxed);
            next.insert(row.name.clone(), candidate);
        }
        *self.shadow.candidates.write().unwrap_or_else(|p| p.into_inner()) = next;
    }
}

/// Scores the queued jobs with their candidates, one at a time, until the server stops.
pub async fn work(app: Arc<App>) {
    let Some(mut jobs) = lock(&app.shadow.jobs).take() else {
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
                .unwrap_or_else(|e| Err(ApiError::internal(e.to_string())))
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
pub async fn flush_every(app: Arc<App>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut step = 0i64;
    loop {
        tick.tick().await;
        step += 1;
        let app = app.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || flush(&app, step)).await {
            tracing::error!("flushing the shadow counts: {e}");
        }
    }
}

/// Adds the counts gathered since the last save to the database (also when the server stops,
/// so a restart loses none); returns them.
pub fn save(app: &App) -> HashMap<String, ShadowCounts> {
    let pending = std::mem::take(&mut *lock(&app.shadow.pending));
    for (version, counts) in &pending {
        if let Err(e) = app.store.add_shadow(version, counts) {
            tracing::error!("saving the shadow counts of {version}: {e}");
            app.metrics.store_failure("shadow_counts");
        }
    }
    pending
}

fn flush(app: &App, step: i64) {
    let pending = save(app);
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
        let figures = match figures(app, &row) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("reading the shadow figures of {version}: {}", e.message);
                continue;
            }
        };
        if let (Some(t), true) = (&app.tracker, pending.contains_key(version)) {
            log_figures(app, t, &row, &figures, step);
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

/// The shadow figures of `row`, every server's counts together.
pub fn figures(app: &App, row: &ModelRow) -> Result<ShadowFigures, ApiError> {
    let production = app
        .serving(&row.name)
        .map(|s| s.row.version.clone())
        .filter(|v| *v != row.version);
    Ok(app.store.shadow(&row.version)?.figures(production))
}

/// `GET /models/{version}/shadow`.
pub fn report(app: &App, version: &str) -> Result<super::api::ShadowReport, ApiError> {
    let row = app
        .store
        .model(version)?
        .ok_or_else(|| super::handlers::no_version(version))?;
    let figures = figures(app, &row)?;
    Ok(super::api::ShadowReport {
        gate: app.config.promotion.as_ref().map(|g| g.check(&figures)),
        version: row.version,
        model: row.name,
        canary_percent: row.canary_percent,
        figures,
    })
}

/// The registered model MLflow keeps `row` under: `<pipeline>-<name>`.
fn mlflow_model(row: &ModelRow) -> String {
    format!("{}-{}", row.pipeline, row.name)
}

/// MLflow's version of `row`, looked up once it exists.
fn mlflow_version(app: &App, tracker: &Tracker, row: &ModelRow) -> Option<ModelVersion> {
    if let Some(found) = lock(&app.shadow.mlflow).get(&row.version) {
        return Some(found.clone());
    }
    match tracker.model_version(&mlflow_model(row), &row.version) {
        Ok(Some(found)) => {
            lock(&app.shadow.mlflow).insert(row.version.clone(), found.clone());
            Some(found)
        }
        Ok(None) => {
            tracing::warn!(
                "MLflow has no version of {} for {} (was its training tracked?)",
                mlflow_model(row),
                row.version
            );
            None
        }
        Err(e) => {
            tracing::warn!("finding {} in MLflow: {e}", row.version);
            None
        }
    }
}

/// Points MLflow's `alias` of the registered model at `row`'s version, when tracking is on; a
/// failure is a warning.
pub fn alias(app: &App, row: &ModelRow, alias: &str) {
    let Some(tracker) = &app.tracker else {
        return;
    };
    let Some(found) = mlflow_version(app, tracker, row) else {
        return;
    };
    if let Err(e) = tracker.set_alias(&mlflow_model(row), alias, &found.version) {
        tracing::warn!("setting MLflow alias `{alias}` of {}: {e}", row.version);
    }
}

/// Logs a candidate's figures to the MLflow run that produced it.
fn log_figures(app: &App, tracker: &Tracker, row: &ModelRow, f: &ShadowFigures, step: i64) {
    let Some(found) = mlflow_version(app, tracker, row).filter(|v| !v.run_id.is_empty()) else {
        return;
    };
    let mut metrics = vec![
        ("shadow_count".to_string(), f.shadowed as f64),
        ("shadow_dropped".into(), f.dropped as f64),
        ("shadow_feedback".into(), f.feedback as f64),
    ];
    let known = [
        ("shadow_agreement", f.agreement),
        ("shadow_psi", f.psi),
        ("shadow_accuracy", f.accuracy),
        ("shadow_production_accuracy", f.production_accuracy),
        ("shadow_latency_p50_ms", f.latency_p50_ms),
        ("shadow_latency_p99_ms", f.latency_p99_ms),
    ];
    metrics.extend(known.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))));
    if let Err(e) = tracker.log_metrics(&found.run_id, &metrics, step) {
        tracing::warn!("shadow figures of {} not sent to MLflow: {e}", row.version);
    }
}

#[cfg(test)]
mod tests {
    use super::picked;

    #[test]
    fn a_share_is_exact_over_each_hundred_and_spread() {
        for percent in [1u8, 10, 33, 50, 100] {
            let hits: Vec<u64> = (0..1000).filter(|&n| picked(n, percent)).collect();
            assert_eq!(hits.len(), usize::from(percent) * 10);
            if percent == 10 {
                assert!(hits.windows(2).all(|w| w[1] - w[0] == 10), "{hits:?}");
            }
        }
        assert!(!(0..1000).any(|n| picked(n, 0)));
    }
}
