//! Drift monitoring: reference statistics a bundle carries from its validation split, the same
//! statistics over a window of live predictions, and the comparison of the two.
//!
//! Statistics: the histogram of predicted P(positive) (10 equal bins), the positive-prediction
//! rate, the distribution of text lengths (characters, in the reference's quintile bins), and the
//! rate of tokens the model does not know (out-of-vocabulary words for TF-IDF, `[UNK]` for BERT).
//! Distributions are compared by the population stability index (PSI), the positive rate by its
//! absolute shift and the unknown-token rate by its ratio; labelled feedback gives a rolling
//! accuracy against the validation accuracy.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const SCORE_BINS: usize = 10;
/// Length bins are the reference's quintiles: finer bins make PSI noisy on windows of a few
/// hundred texts.
const LENGTH_BINS: usize = 5;
/// Below this many predictions a window is not judged.
pub const MIN_SAMPLES: usize = 30;

/// What is measured of one scored text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// P(positive).
    pub score: f64,
    pub chars: usize,
    /// Tokens the model does not know, and all tokens.
    pub unknown: usize,
    pub tokens: usize,
}

/// A bundle's reference statistics (`drift.json`), from its validation predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub samples: usize,
    /// Share of predictions in each tenth of [0, 1].
    pub score_hist: Vec<f64>,
    pub positive_rate: f64,
    /// Inner bin edges of text length (characters): the reference's quintiles.
    pub length_edges: Vec<f64>,
    pub length_hist: Vec<f64>,
    pub unknown_rate: f64,
    pub accuracy: f64,
}

pub fn score_bin(score: f64) -> usize {
    ((score * SCORE_BINS as f64) as usize).min(SCORE_BINS - 1)
}

fn length_bin(edges: &[f64], chars: usize) -> usize {
    edges.iter().take_while(|&&e| chars as f64 > e).count()
}

fn shares(counts: &[usize]) -> Vec<f64> {
    let total = counts.iter().sum::<usize>().max(1) as f64;
    counts.iter().map(|&c| c as f64 / total).collect()
}

fn unknown_rate(samples: &[Sample]) -> f64 {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    samples.iter().map(|s| s.unknown).sum::<usize>() as f64 / tokens.max(1) as f64
}

impl Reference {
    pub fn build(samples: &[Sample], accuracy: f64) -> Reference {
        let mut lengths: Vec<usize> = samples.iter().map(|s| s.chars).collect();
        lengths.sort_unstable();
        let mut length_edges: Vec<f64> = (1..LENGTH_BINS)
            .map(|q| lengths.get(q * lengths.len() / LENGTH_BINS).copied().unwrap_or(0) as f64)
            .collect();
        length_edges.dedup();
        let (scores, lengths) = histograms(samples, &length_edges);
        Reference {
            samples: samples.len(),
            score_hist: shares(&scores),
            positive_rate: positive_rate(samples),
            length_hist: shares(&lengths),
            length_edges,
            unknown_rate: unknown_rate(samples),
            accuracy,
        }
    }
}

fn positive_rate(samples: &[Sample]) -> f64 {
    samples.iter().filter(|s| s.score > 0.5).count() as f64 / samples.len().max(1) as f64
}

fn histograms(samples: &[Sample], length_edges: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let mut scores = vec![0; SCORE_BINS];
    let mut lengths = vec![0; length_edges.len() + 1];
    for s in samples {
        scores[score_bin(s.score)] += 1;
        lengths[length_bin(length_edges, s.chars)] += 1;
    }
    (scores, lengths)
}

/// Population stability index of `current` against `reference` (shares; empty bins smoothed).
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    const EPS: f64 = 1e-4;
    reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let (r, c) = (r.max(EPS), c.max(EPS));
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// Warn and alert levels of each statistic.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Thresholds {
    /// PSI: 0.1 and 0.25 are the usual "moderate" and "significant" shift levels.
    pub psi: (f64, f64),
    /// Absolute change of the positive-prediction rate.
    pub positive_shift: (f64, f64),
    /// Current unknown-token rate over the reference's.
    pub unknown_ratio: (f64, f64),
    /// Drop of rolling accuracy below the validation accuracy.
    pub accuracy_drop: (f64, f64),
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            psi: (0.1, 0.25),
            positive_shift: (0.1, 0.2),
            unknown_ratio: (1.5, 2.0),
            accuracy_drop: (0.05, 0.1),
        }
    }
}

/// How far a statistic (or a whole report) is from its reference; ordered from best to worst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Ok,
    Warn,
    Alert,
}

impl Status {
    fn of(value: f64, (warn, alert): (f64, f64)) -> Status {
        if value >= alert {
            Status::Alert
        } else if value >= warn {
            Status::Warn
        } else {
            Status::Ok
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Alert => "alert",
        }
    }

    /// 0 ok, 1 warn, 2 alert: the value of the status gauges.
    pub fn level(self) -> i64 {
        self as i64
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Status, String> {
        match s {
            "ok" => Ok(Status::Ok),
            "warn" => Ok(Status::Warn),
            "alert" => Ok(Status::Alert),
            other => Err(format!("unknown drift status `{other}`")),
        }
    }
}

/// What a statistic compares: a rate, or the shares of a histogram's bins.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Measure {
    Rate(f64),
    Shares(Vec<f64>),
}

impl Measure {
    /// The shares of a histogram (a rate is one share).
    pub fn shares(&self) -> &[f64] {
        match self {
            Measure::Rate(r) => std::slice::from_ref(r),
            Measure::Shares(s) => s,
        }
    }
}

/// One statistic of a window against the reference, with its warn and alert levels.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Statistic {
    pub value: f64,
    pub warn: f64,
    pub alert: f64,
    /// Always `ok` while the window is not judged.
    pub status: Status,
    pub reference: Measure,
    pub current: Measure,
    /// Inner bin edges of the length histogram (characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edges: Option<Vec<f64>>,
}

/// The statistics of a report, in the order they are reported.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Statistics {
    /// PSI of the P(positive) histogram.
    pub score_psi: Statistic,
    /// PSI of the text-length histogram.
    pub length_psi: Statistic,
    /// Absolute change of the positive-prediction rate.
    pub positive_rate_shift: Statistic,
    /// Unknown-token rate over the reference's.
    pub unknown_token_ratio: Statistic,
}

impl Statistics {
    /// Each statistic with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Statistic)> {
        [
            ("score_psi", &self.score_psi),
            ("length_psi", &self.length_psi),
            ("positive_rate_shift", &self.positive_rate_shift),
            ("unknown_token_ratio", &self.unknown_token_ratio),
        ]
        .into_iter()
    }
}

/// Rolling accuracy of labelled feedback against the validation accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Performance {
    /// Predictions in the window that have feedback.
    pub feedback: usize,
    pub validation_accuracy: f64,
    /// Present from `MIN_SAMPLES` predictions with feedback on.
    #[serde(flatten)]
    pub rolling: Option<RollingAccuracy>,
}

/// The accuracy of the feedback in the window, judged by its drop below the validation accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct RollingAccuracy {
    pub accuracy: f64,
    /// Validation accuracy minus `accuracy`.
    pub drop: f64,
    pub warn: f64,
    pub alert: f64,
    pub status: Status,
}

/// The drift report of a window of predictions against a reference.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct DriftReport {
    /// The worst status of the statistics and of the performance.
    pub status: Status,
    pub samples: usize,
    pub min_samples: usize,
    /// Whether the window has `min_samples` predictions; statuses are `ok` until it has.
    pub judged: bool,
    pub statistics: Statistics,
    pub performance: Performance,
}

/// The drift report of a served model's rolling window.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct WindowReport {
    #[serde(flatten)]
    pub report: DriftReport,
    /// The served version of the model.
    pub version: String,
    /// Predictions (and feedback) the window holds at most.
    pub window: usize,
}

/// The drift report of a window of predictions (and, when given, of labelled feedback:
/// whether each prediction was right) against `reference`.
pub fn evaluate(reference: &Reference, samples: &[Sample], feedback: &[bool], t: &Thresholds) -> DriftReport {
    let (scores, lengths) = histograms(samples, &reference.length_edges);
    let (score_cur, length_cur) = (shares(&scores), shares(&lengths));
    let judged = samples.len() >= MIN_SAMPLES;
    let stat = |value: f64, levels: (f64, f64), reference: Measure, current: Measure| Statistic {
        value,
        warn: levels.0,
        alert: levels.1,
        status: if judged { Status::of(value, levels) } else { Status::Ok },
        reference,
        current,
        edges: None,
    };
    let rate = positive_rate(samples);
    let unknown = unknown_rate(samples);
    let statistics = Statistics {
        score_psi: stat(
            psi(&reference.score_hist, &score_cur),
            t.psi,
            Measure::Shares(reference.score_hist.clone()),
            Measure::Shares(score_cur),
        ),
        length_psi: Statistic {
            edges: Some(reference.length_edges.clone()),
            ..stat(
                psi(&reference.length_hist, &length_cur),
                t.psi,
                Measure::Shares(reference.length_hist.clone()),
                Measure::Shares(length_cur),
            )
        },
        positive_rate_shift: stat(
            (rate - reference.positive_rate).abs(),
            t.positive_shift,
            Measure::Rate(reference.positive_rate),
            Measure::Rate(rate),
        ),
        unknown_token_ratio: stat(
            unknown / reference.unknown_rate.max(1e-4),
            t.unknown_ratio,
            Measure::Rate(reference.unknown_rate),
            Measure::Rate(unknown),
        ),
    };
    let rolling = (feedback.len() >= MIN_SAMPLES).then(|| {
        let accuracy = feedback.iter().filter(|&&ok| ok).count() as f64 / feedback.len() as f64;
        let drop = reference.accuracy - accuracy;
        RollingAccuracy {
            accuracy,
            drop,
            warn: t.accuracy_drop.0,
            alert: t.accuracy_drop.1,
            status: Status::of(drop, t.accuracy_drop),
        }
    });
    let status = statistics
        .iter()
        .map(|(_, s)| s.status)
        .chain(rolling.as_ref().map(|a| a.status))
        .max()
        .unwrap_or_default();
    DriftReport {
        status,
        samples: samples.len(),
        min_samples: MIN_SAMPLES,
        judged,
        statistics,
        performance: Performance {
            feedback: feedback.len(),
            validation_accuracy: reference.accuracy,
            rolling,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(score: f64, chars: usize) -> Sample {
        Sample {
            score,
            chars,
            unknown: 1,
            tokens: 100,
        }
    }

    #[test]
    fn same_distribution_is_ok_and_shifted_ones_alert() {
        let reference: Vec<Sample> = (0..1000)
            .map(|i| sample((i % 100) as f64 / 100.0, 200 + i % 800))
            .collect();
        let r = Reference::build(&reference, 0.9);
        assert_eq!(r.length_edges.len(), LENGTH_BINS - 1);
        let t = Thresholds::default();
        let same = evaluate(&r, &reference, &[], &t);
        assert_eq!(same.status, Status::Ok, "{same:?}");
        let short: Vec<Sample> = (0..200).map(|i| sample((i % 100) as f64 / 100.0, 40)).collect();
        let report = evaluate(&r, &short, &[], &t);
        assert_eq!(report.statistics.length_psi.status, Status::Alert, "{report:?}");
        assert_eq!(report.statistics.score_psi.status, Status::Ok, "{report:?}");
        let negative: Vec<Sample> = (0..200).map(|i| sample(0.1, 200 + i * 4)).collect();
        let report = evaluate(&r, &negative, &[], &t);
        assert_eq!(
            report.statistics.positive_rate_shift.status,
            Status::Alert,
            "{report:?}"
        );
        let wrong = vec![false; 50];
        let report = evaluate(&r, &reference, &wrong, &t);
        assert_eq!(report.performance.rolling.as_ref().unwrap().status, Status::Alert);
        assert_eq!(report.status, Status::Alert);
    }

    #[test]
    fn small_windows_are_not_judged() {
        let r = Reference::build(&[sample(0.9, 100), sample(0.1, 300)], 0.9);
        let report = evaluate(&r, &[sample(0.1, 5)], &[], &Thresholds::default());
        assert!(!report.judged);
        assert_eq!(report.status, Status::Ok);
    }

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn the_json_report_keeps_its_fields_and_their_order() {
        let reference: Vec<Sample> = (0..100).map(|i| sample(i as f64 / 100.0, 100 + i)).collect();
        let r = Reference::build(&reference, 0.9);
        let t = Thresholds::default();
        let v = serde_json::to_value(evaluate(&r, &reference, &[true; 10], &t)).unwrap();
        assert_eq!(
            keys(&v),
            [
                "status",
                "samples",
                "min_samples",
                "judged",
                "statistics",
                "performance"
            ]
        );
        assert_eq!(v["status"], "ok");
        assert_eq!(
            keys(&v["statistics"]),
            ["score_psi", "length_psi", "positive_rate_shift", "unknown_token_ratio"]
        );
        assert_eq!(
            keys(&v["statistics"]["length_psi"]),
            ["value", "warn", "alert", "status", "reference", "current", "edges"]
        );
        assert_eq!(
            v["statistics"]["score_psi"]["current"].as_array().unwrap().len(),
            SCORE_BINS
        );
        assert!(v["statistics"]["positive_rate_shift"]["reference"].is_f64());
        assert_eq!(keys(&v["performance"]), ["feedback", "validation_accuracy"]);

        let v = serde_json::to_value(evaluate(&r, &reference, &[false; 40], &t)).unwrap();
        assert_eq!(
            keys(&v["performance"]),
            [
                "feedback",
                "validation_accuracy",
                "accuracy",
                "drop",
                "warn",
                "alert",
                "status"
            ]
        );
        assert_eq!(v["performance"]["status"], "alert");
        assert_eq!(v["status"], "alert");
    }
}
