//! Binary classification metrics.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub roc_auc: f64,
    pub log_loss: f64,
    /// `[[true negatives, false positives], [false negatives, true positives]]`.
    pub confusion: [[u64; 2]; 2],
}

/// Scores of probabilities `p` (of the positive class) against labels `y` (1 positive).
pub fn score(p: &[f64], y: &[u8]) -> Scores {
    let mut m = [[0u64; 2]; 2];
    let mut log_loss = 0.0;
    for (&p, &y) in p.iter().zip(y) {
        m[y as usize][(p > 0.5) as usize] += 1;
        let q = p.clamp(1e-15, 1.0 - 1e-15);
        log_loss -= if y == 1 { q.ln() } else { (1.0 - q).ln() };
    }
    let [[tn, fp], [fn_, tp]] = m.map(|r| r.map(|v| v as f64));
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let precision = div(tp, tp + fp);
    let recall = div(tp, tp + fn_);
    Scores {
        accuracy: div(tp + tn, p.len() as f64),
        precision,
        recall,
        f1: div(2.0 * precision * recall, precision + recall),
        roc_auc: roc_auc(p, y),
        log_loss: div(log_loss, p.len() as f64),
        confusion: m,
    }
}

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting one half (Mann–Whitney U with average ranks).
pub fn roc_auc(p: &[f64], y: &[u8]) -> f64 {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && p[order[j + 1]] == p[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += order[i..=j].iter().filter(|&&k| y[k] == 1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let pos = y.iter().filter(|&&v| v == 1).count() as f64;
    let neg = y.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum_pos - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// The ROC curve as (false positive rate, true positive rate) points, for plots.
pub fn roc_curve(p: &[f64], y: &[u8]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let pos = y.iter().filter(|&&v| v == 1).count().max(1) as f64;
    let neg = (y.len() as f64 - pos).max(1.0);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    for (k, &i) in order.iter().enumerate() {
        if y[i] == 1 {
            tp += 1.0
        } else {
            fp += 1.0
        }
        if k + 1 == order.len() || p[order[k + 1]] != p[i] {
            points.push((fp / neg, tp / pos));
        }
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let p = [0.9, 0.8, 0.3, 0.6, 0.2];
        let y = [1, 1, 1, 0, 0];
        let s = score(&p, &y);
        assert_eq!(s.confusion, [[1, 1], [1, 2]]);
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        assert!((s.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.recall - 2.0 / 3.0).abs() < 1e-12);
        // Positive/negative pairs ranked right: (0.9,0.6) (0.9,0.2) (0.8,0.6) (0.8,0.2) (0.3,0.2) = 5 of 6.
        assert!((s.roc_auc - 5.0 / 6.0).abs() < 1e-12);
        let expected_ll = -(0.9f64.ln() + 0.8f64.ln() + 0.3f64.ln() + 0.4f64.ln() + 0.8f64.ln()) / 5.0;
        assert!((s.log_loss - expected_ll).abs() < 1e-12);
        assert!((roc_auc(&[0.5, 0.5], &[1, 0]) - 0.5).abs() < 1e-12);
    }
}
