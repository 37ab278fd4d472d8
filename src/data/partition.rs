//! Seeded, stratified partitions of rows into parts of given shares: the train/validation split
//! and cross-validation folds. With groups (the movie of each review) every group lands whole in
//! one part, so a part's score predicts reviews of movies that the other parts never saw.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::rng::Rng;

/// What a split or a cross-validation keeps together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// Every review on its own.
    #[default]
    None,
    /// All reviews of a movie on the same side, as new movies will be.
    Movie,
}

impl Grouping {
    /// The group of every row (`0..n` when ungrouped), or why grouping is impossible.
    pub fn groups(self, movies: &[Option<String>]) -> Result<Vec<usize>, String> {
        match self {
            Grouping::None => Ok((0..movies.len()).collect()),
            Grouping::Movie => group_ids(movies).map_err(|missing| {
                format!(
                    "grouping by movie is impossible: {missing} of {} reviews have no movie. IMDB \
                     archives name each review's movie in train/urls_pos.txt and \
                     train/urls_neg.txt; for CSV, JSONL and Parquet set `group_column` in the \
                     load stage; or set `group: none` here",
                    movies.len()
                )
            }),
        }
    }
}

/// Group ids (`0..`) of rows by their movie, in order of first appearance; `Err` with the number
/// of rows that have none.
pub fn group_ids(movies: &[Option<String>]) -> Result<Vec<usize>, usize> {
    let missing = movies.iter().filter(|m| m.is_none()).count();
    if missing > 0 {
        return Err(missing);
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    Ok(movies
        .iter()
        .map(|m| {
            let next = ids.len();
            *ids.entry(m.as_deref().expect("checked above")).or_insert(next)
        })
        .collect())
}

/// The part (`0..shares.len()`) of every row. Rows of one group share a part, and each part gets
/// close to its share of each class. Groups go in a seeded order, largest first (so the small
/// ones even out what the large ones leave), each to the part that most needs its classes
/// relative to that part's target. Without groups, pass `0..n`: every row is its own group.
pub fn stratified(labels: &[u8], groups: &[usize], shares: &[f64], seed: u64) -> Vec<usize> {
    let n_groups = groups.iter().max().map_or(0, |g| g + 1);
    let mut counts = vec![[0usize; 2]; n_groups];
    for (&g, &y) in groups.iter().zip(labels) {
        counts[g][(y == 1) as usize] += 1;
    }
    let totals = counts.iter().fold([0usize; 2], |t, c| [t[0] + c[0], t[1] + c[1]]);
    let total_share: f64 = shares.iter().sum();
    let target: Vec<[f64; 2]> = shares
        .iter()
        .map(|s| totals.map(|t| (s / total_share * t as f64).max(1e-9)))
        .collect();

    let mut order: Vec<usize> = (0..n_groups).collect();
    Rng::new(seed).shuffle(&mut order);
    order.sort_by_key(|&g| std::cmp::Reverse(counts[g][0] + counts[g][1]));

    let mut filled = vec![[0usize; 2]; shares.len()];
    let mut part_of_group = vec![0usize; n_groups];
    for g in order {
        let need = |k: usize| -> f64 {
            (0..2)
                .map(|c| counts[g][c] as f64 * (target[k][c] - filled[k][c] as f64) / target[k][c])
                .sum()
        };
        let best = (1..shares.len()).fold(0, |best, k| if need(k) > need(best) { k } else { best });
        part_of_group[g] = best;
        for c in 0..2 {
            filled[best][c] += counts[g][c];
        }
    }
    groups.iter().map(|&g| part_of_group[g]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 movies of 1 to 30 reviews with movie-specific label mixes.
    fn movies() -> (Vec<u8>, Vec<usize>) {
        let mut rng = Rng::new(1);
        let (mut labels, mut groups) = (Vec::new(), Vec::new());
        for g in 0..300 {
            let size = 1 + rng.below(30);
            let positive_rate = rng.unit();
            for _ in 0..size {
                labels.push((rng.unit() < positive_rate) as u8);
                groups.push(g);
            }
        }
        (labels, groups)
    }

    fn share_of(parts: &[usize], labels: &[u8], part: usize, class: u8) -> f64 {
        let in_class = labels.iter().filter(|&&y| y == class).count();
        let n = parts
            .iter()
            .zip(labels)
            .filter(|(&p, &y)| p == part && y == class)
            .count();
        n as f64 / in_class as f64
    }

    #[test]
    fn groups_stay_whole_and_classes_keep_their_shares() {
        let (labels, groups) = movies();
        for shares in [vec![0.8, 0.2], vec![1.0; 5]] {
            let parts = stratified(&labels, &groups, &shares, 42);
            let mut part_of: HashMap<usize, usize> = HashMap::new();
            for (&g, &p) in groups.iter().zip(&parts) {
                assert_eq!(*part_of.entry(g).or_insert(p), p, "movie {g} is in two parts");
            }
            let total: f64 = shares.iter().sum();
            for (k, s) in shares.iter().enumerate() {
                for class in [0, 1] {
                    let got = share_of(&parts, &labels, k, class);
                    assert!((got - s / total).abs() < 0.01, "part {k} class {class}: {got}");
                }
            }
        }
    }

    #[test]
    fn seeded_and_deterministic() {
        let (labels, groups) = movies();
        let a = stratified(&labels, &groups, &[0.8, 0.2], 7);
        assert_eq!(a, stratified(&labels, &groups, &[0.8, 0.2], 7));
        assert_ne!(a, stratified(&labels, &groups, &[0.8, 0.2], 8));
    }

    #[test]
    fn rows_without_a_movie_are_counted() {
        let movies = vec![
            Some("tt1".to_string()),
            None,
            Some("tt2".into()),
            Some("tt1".into()),
            None,
        ];
        assert_eq!(group_ids(&movies), Err(2));
        let all: Vec<Option<String>> = ["tt1", "tt2", "tt1"].iter().map(|m| Some(m.to_string())).collect();
        assert_eq!(group_ids(&all), Ok(vec![0, 1, 0]));
    }
}
