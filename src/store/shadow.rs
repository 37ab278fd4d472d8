//! Shadow traffic of candidates: the counts each server adds, summed over every server, and the
//! figures they give.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::db::Store;
use super::error::StoreError;
use super::sql::params;
use crate::drift::{psi, SCORE_BINS};

/// What a candidate's shadow traffic shows so far, over every server of the database; null
/// where nothing measures it yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowFigures {
    /// The version it was compared with (the production one).
    pub production_version: Option<String>,
    /// Predictions the candidate also scored.
    pub shadowed: u64,
    /// Predictions not shadowed because the shadow queue was full.
    pub dropped: u64,
    /// Share of shadowed predictions where the candidate's label is production's.
    pub agreement: Option<f64>,
    pub disagreement: Option<f64>,
    /// Population stability index of the candidate's scores against production's.
    pub psi: Option<f64>,
    /// Shadowed predictions that received feedback.
    pub feedback: u64,
    /// The candidate's accuracy on those.
    pub accuracy: Option<f64>,
    /// Production's accuracy on the same predictions.
    pub production_accuracy: Option<f64>,
    pub accuracy_gain: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// Additive counts of a candidate's shadow traffic: what one server adds at a flush, or their
/// sum over every server. Stored as one row per counter (see [`ShadowCounts::named`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowCounts {
    pub shadowed: u64,
    pub dropped: u64,
    pub agreed: u64,
    pub feedback: u64,
    pub candidate_correct: u64,
    pub production_correct: u64,
    pub candidate_scores: [u64; SCORE_BINS],
    pub production_scores: [u64; SCORE_BINS],
    /// Candidate latencies by bucket ([`latency_bucket`]).
    pub latency: BTreeMap<u32, u64>,
}

/// The latency bucket of `micros`: quarter octaves, so a percentile read back is within 19%.
pub fn latency_bucket(micros: u64) -> u32 {
    ((micros.max(1) as f64).log2() * 4.0).floor() as u32
}

/// The upper bound of latency bucket `b`, in milliseconds.
fn latency_bound_ms(b: u32) -> f64 {
    2f64.powf(f64::from(b + 1) / 4.0) / 1000.0
}

impl ShadowCounts {
    /// The non-zero counters, by their stored names.
    fn named(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("shadowed".to_string(), self.shadowed),
            ("dropped".into(), self.dropped),
            ("agreed".into(), self.agreed),
            ("feedback".into(), self.feedback),
            ("candidate_correct".into(), self.candidate_correct),
            ("production_correct".into(), self.production_correct),
        ];
        for (i, n) in self.candidate_scores.iter().enumerate() {
            out.push((format!("candidate_score.{i}"), *n));
        }
        for (i, n) in self.production_scores.iter().enumerate() {
            out.push((format!("production_score.{i}"), *n));
        }
        for (b, n) in &self.latency {
            out.push((format!("latency.{b}"), *n));
        }
        out.retain(|(_, n)| *n > 0);
        out
    }

    /// Adds a stored counter; names this version does not know are ignored.
    fn add_named(&mut self, name: &str, n: u64) {
        let bin = |i: &str| i.parse::<usize>().ok().filter(|i| *i < SCORE_BINS);
        match name.split_once('.') {
            None => match name {
                "shadowed" => self.shadowed += n,
                "dropped" => self.dropped += n,
                "agreed" => self.agreed += n,
                "feedback" => self.feedback += n,
                "candidate_correct" => self.candidate_correct += n,
                "production_correct" => self.production_correct += n,
                _ => {}
            },
            Some(("candidate_score", i)) => {
                if let Some(i) = bin(i) {
                    self.candidate_scores[i] += n;
                }
            }
            Some(("production_score", i)) => {
                if let Some(i) = bin(i) {
                    self.production_scores[i] += n;
                }
            }
            Some(("latency", b)) => {
                if let Ok(b) = b.parse() {
                    *self.latency.entry(b).or_default() += n;
                }
            }
            Some(_) => {}
        }
    }

    /// The figures these counts give.
    pub fn figures(&self, production_version: Option<String>) -> ShadowFigures {
        let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
        let agreement = share(self.agreed, self.shadowed);
        let accuracy = share(self.candidate_correct, self.feedback);
        let production_accuracy = share(self.production_correct, self.feedback);
        let shares = |bins: &[u64]| -> Vec<f64> {
            let total: u64 = bins.iter().sum();
            bins.iter().map(|&n| n as f64 / total.max(1) as f64).collect()
        };
        let percentile = |q: f64| -> Option<f64> {
            let total: u64 = self.latency.values().sum();
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            self.latency.iter().find_map(|(b, n)| {
                seen += n;
                (seen >= rank).then(|| latency_bound_ms(*b))
            })
        };
        ShadowFigures {
            production_version,
            shadowed: self.shadowed,
            dropped: self.dropped,
            agreement,
            disagreement: agreement.map(|a| 1.0 - a),
            psi: (self.shadowed > 0).then(|| psi(&shares(&self.production_scores), &shares(&self.candidate_scores))),
            feedback: self.feedback,
            accuracy,
            production_accuracy,
            accuracy_gain: accuracy.zip(production_accuracy).map(|(c, p)| c - p),
            latency_p50_ms: percentile(0.5),
            latency_p99_ms: percentile(0.99),
        }
    }
}

impl Store {
    /// Adds a server's shadow counts of candidate `version` to those of every server.
    pub fn add_shadow(&self, version: &str, counts: &ShadowCounts) -> Result<(), StoreError> {
        let named = counts.named();
        self.write(|tx| {
            for (counter, n) in &named {
                tx.execute(
                    "INSERT INTO shadow_counts (version, counter, n) VALUES (?1, ?2, ?3)
                     ON CONFLICT (version, counter) DO UPDATE SET n = shadow_counts.n + excluded.n",
                    params![version, counter, *n as i64],
                )?;
            }
            Ok(())
        })
    }

    /// The shadow counts of `version`, summed over every server.
    pub fn shadow(&self, version: &str) -> Result<ShadowCounts, StoreError> {
        self.write(|tx| {
            let mut counts = ShadowCounts::default();
            for r in tx.query(
                "SELECT counter, n FROM shadow_counts WHERE version = ?1",
                params![version],
            )? {
                counts.add_named(&r.text(0)?, r.int(1)?.max(0) as u64);
            }
            Ok(counts)
        })
    }
}
