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
use std::time::Duration;

use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::serving::Serving;
use crate::drift::{score_bin, Sample};
use crate::models::bundle::Prediction;
use crate::store::{latency_bucket, ModelRow, ShadowCounts, ShadowFigures};
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
    pub fn new(serving: Arc<Serving>) -> Candidate {
        Candidate {
            serving,
            canary: AtomicU8::new(0),
            seen: AtomicU64::new(0),
        }
    }

    /// Follows the database's canary share.
    pub fn set_canary(&self, percent: u8) {
        self.canary.store(percent, Ordering::Relaxed);
    }

    /// Whether this prediction of its name is answered by the candidate.
    pub fn takes_canary(&self) -> bool {
        let percent = self.canary.load(Ordering::Relaxed);
        percent > 0 && picked(self.seen.fetch_add(1, Ordering::Relaxed), percent)
    }
}

/// Texts production answered, for the candidate to score too.
pub struct Job {
    pub candidate: Arc<Candidate>,
    pub texts: Vec<String>,
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

    /// Makes `next` the candidates under evaluation, by name.
    pub fn replace(&self, next: HashMap<String, Arc<Candidate>>) {
        *self.candidates.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// The queue of jobs, for the one worker that scores them.
    pub fn take_jobs(&self) -> Option<mpsc::Receiver<Job>> {
        lock(&self.jobs).take()
    }

    /// The counts gathered since the last call.
    pub fn take_pending(&self) -> HashMap<String, ShadowCounts> {
        std::mem::take(&mut *lock(&self.pending))
    }

    pub fn all(&self) -> Vec<Arc<Candidate>> {
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
        percent: u8,
        metrics: &Metrics,
        candidate: Arc<Candidate>,
        texts: Vec<String>,
        ids: Vec<String>,
        production: Vec<Sample>,
    ) {
        if !picked(self.offered.fetch_add(1, Ordering::Relaxed), percent) {
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
            metrics.shadow_dropped(n);
            lock(&self.pending).entry(version).or_default().dropped += n;
        }
    }

    /// Counts what the candidate said of a job's texts.
    pub fn tally(&self, job: &Job, samples: &[Sample], elapsed: Duration) {
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

/// The registered model MLflow keeps `row` under: `<pipeline>-<name>`.
fn mlflow_model(row: &ModelRow) -> String {
    format!("{}-{}", row.pipeline, row.name)
}

impl Shadow {
    /// MLflow's version of `row`, looked up once it exists.
    fn mlflow_version(&self, tracker: &Tracker, row: &ModelRow) -> Option<ModelVersion> {
        if let Some(found) = lock(&self.mlflow).get(&row.version) {
            return Some(found.clone());
        }
        match tracker.model_version(&mlflow_model(row), &row.version) {
            Ok(Some(found)) => {
                lock(&self.mlflow).insert(row.version.clone(), found.clone());
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
    pub fn alias(&self, tracker: Option<&Tracker>, row: &ModelRow, alias: &str) {
        let Some(tracker) = tracker else {
            return;
        };
        let Some(found) = self.mlflow_version(tracker, row) else {
            return;
        };
        if let Err(e) = tracker.set_alias(&mlflow_model(row), alias, &found.version) {
            tracing::warn!("setting MLflow alias `{alias}` of {}: {e}", row.version);
        }
    }

    /// Logs a candidate's figures to the MLflow run that produced it.
    pub fn log_figures(&self, tracker: &Tracker, row: &ModelRow, f: &ShadowFigures, step: i64) {
        let Some(found) = self.mlflow_version(tracker, row).filter(|v| !v.run_id.is_empty()) else {
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
