//! Drift monitoring: reference statistics a bundle carries from its validation split, the same
//! statistics over a window of live predictions, and the comparison of the two.
//!
//! Statistics: the histogram of predicted P(positive) (10 equal bins), the positive-prediction
//! rate, the distribution of text lengths (characters, in the reference's quintile bins), and the
//! rate of tokens the model does not know (out-of-vocabulary words for TF-IDF, `[UNK]` for BERT).
//! Distributions are compared by the population stability index (PSI), the positive rate by its
//! absolute shift and the unknown-token rate by its ratio; labelled feedback gives a rolling
//! accuracy against the validation accuracy.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const SCORE_BINS: usize = 10;
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

fn score_bin(score: f64) -> usize {
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

fn status(value: f64, (warn, alert): (f64, f64)) -> &'static str {
    if value >= alert {
        "alert"
    } else if value >= warn {
        "warn"
    } else {
        "ok"
    }
}

fn worst<'a>(statuses: impl IntoIterator<Item = &'a str>) -> &'a str {
    statuses
        .into_iter()
        .max_by_key(|s| match *s {
            "alert" => 2,
            "warn" => 1,
            _ => 0,
        })
        .unwrap_or("ok")
}

/// The drift report of a window of predictions (and, when given, of labelled feedback:
/// whether each prediction was right) against `reference`.
pub fn evaluate(reference: &Reference, samples: &[Sample], feedback: &[bool], t: &Thresholds) -> Value {
    let mut statistics = serde_json::Map::new();
    let (scores, lengths) = histograms(samples, &reference.length_edges);
    let (score_cur, length_cur) = (shares(&scores), shares(&lengths));
    let judged = samples.len() >= MIN_SAMPLES;
    let mut add = |name: &str, value: f64, levels: (f64, f64), extra: Value| {
        let mut v = json!({"value": value, "warn": levels.0, "alert": levels.1,
                           "status": if judged { status(value, levels) } else { "ok" }});
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        statistics.insert(name.into(), v);
    };
    add(
        "score_psi",
        psi(&reference.score_hist, &score_cur),
        t.psi,
        json!({"reference": reference.score_hist, "current": score_cur}),
    );
    add(
        "length_psi",
        psi(&reference.length_hist, &length_cur),
        t.psi,
        json!({"reference": reference.length_hist, "current": length_cur, "edges": reference.length_edges}),
    );
    let rate = positive_rate(samples);
    add(
        "positive_rate_shift",
        (rate - reference.positive_rate).abs(),
        t.positive_shift,
        json!({"reference": reference.positive_rate, "current": rate}),
    );
    let unknown = unknown_rate(samples);
    add(
        "unknown_token_ratio",
        unknown / reference.unknown_rate.max(1e-4),
        t.unknown_ratio,
        json!({"reference": reference.unknown_rate, "current": unknown}),
    );
    let mut performance = json!({"feedback": feedback.len(), "validation_accuracy": reference.accuracy});
    let mut statuses: Vec<&str> = statistics.values().filter_map(|v| v["status"].as_str()).collect();
    if feedback.len() >= MIN_SAMPLES {
        let accuracy = feedback.iter().filter(|&&ok| ok).count() as f64 / feedback.len() as f64;
        let drop = reference.accuracy - accuracy;
        let s = status(drop, t.accuracy_drop);
        performance = json!({"feedback": feedback.len(), "validation_accuracy": reference.accuracy,
                             "accuracy": accuracy, "drop": drop, "warn": t.accuracy_drop.0,
                             "alert": t.accuracy_drop.1, "status": s});
        statuses.push(s);
    }
    let overall = worst(statuses);
    json!({
        "status": overall,
        "samples": samples.len(),
        "min_samples": MIN_SAMPLES,
        "judged": judged,
        "statistics": statistics,
        "performance": performance,
    })
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
        assert_eq!(same["status"], "ok", "{same}");
        let short: Vec<Sample> = (0..200).map(|i| sample((i % 100) as f64 / 100.0, 40)).collect();
        let report = evaluate(&r, &short, &[], &t);
        assert_eq!(report["statistics"]["length_psi"]["status"], "alert", "{report}");
        assert_eq!(report["statistics"]["score_psi"]["status"], "ok", "{report}");
        let negative: Vec<Sample> = (0..200).map(|i| sample(0.1, 200 + i * 4)).collect();
        let report = evaluate(&r, &negative, &[], &t);
        assert_eq!(
            report["statistics"]["positive_rate_shift"]["status"], "alert",
            "{report}"
        );
        let wrong = vec![false; 50];
        let report = evaluate(&r, &reference, &wrong, &t);
        assert_eq!(report["performance"]["status"], "alert", "{report}");
        assert_eq!(report["status"], "alert");
    }

    #[test]
    fn small_windows_are_not_judged() {
        let r = Reference::build(&[sample(0.9, 100), sample(0.1, 300)], 0.9);
        let report = evaluate(&r, &[sample(0.1, 5)], &[], &Thresholds::default());
        assert_eq!(report["judged"], false);
        assert_eq!(report["status"], "ok");
    }
}
