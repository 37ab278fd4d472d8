//! `uses: split`: a stratified, seeded train/validation split, written as `train.parquet` and
//! `valid.parquet` in the output directory; with `group: movie`, no movie on both sides.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::stage::{Context, Stage, StageError};
use crate::cache::Metrics;
use crate::data::partition::{self, Grouping};
use crate::data::Reviews;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Fraction of each class that goes to validation, in (0, 1).
    #[serde(default = "default_fraction")]
    pub validation: f64,
    /// Seed of the shuffle that decides which reviews (or movies) go to validation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `movie` keeps all reviews of a movie on one side, so validation scores predict reviews of
    /// movies the model has never seen.
    #[serde(default)]
    pub group: Grouping,
    /// Output directory.
    pub out: String,
}

fn default_fraction() -> f64 {
    0.2
}
fn default_seed() -> u64 {
    42
}

/// Row indices of the two parts, each class split in (about) the same proportion, and each group
/// whole on one side.
pub fn stratified(
    labels: &[u8],
    groups: &[usize],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(format!("validation fraction {fraction} must be between 0 and 1"));
    }
    for (class, name) in [(0u8, "negative"), (1, "positive")] {
        let n = labels.iter().filter(|&&y| y == class).count();
        if n < 2 {
            return Err(format!(
                "only {n} {name} review(s): each class needs at least 2 to split"
            ));
        }
    }
    let part = partition::stratified(labels, groups, &[1.0 - fraction, fraction], seed);
    let (train, valid): (Vec<usize>, Vec<usize>) = (0..labels.len()).partition(|&i| part[i] == 0);
    for (rows, side) in [(&train, "training"), (&valid, "validation")] {
        for (class, name) in [(0u8, "negative"), (1, "positive")] {
            if !rows.iter().any(|&i| labels[i] == class) {
                return Err(format!(
                    "the {side} part has no {name} review: too few groups to split by {fraction}"
                ));
            }
        }
    }
    Ok((train, valid))
}

impl Stage for Split {
    fn version(&self) -> u32 {
        2
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let input = ctx.input(&["load", "clean"])?;
        let reviews = Reviews::read_parquet(&input)?;
        let groups = self.group.groups(&reviews.movie).map_err(StageError::Invalid)?;
        let (train, valid) =
            stratified(&reviews.label, &groups, self.validation, self.seed).map_err(StageError::Invalid)?;
        let dir = ctx.path(&self.out);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        let mut m = Metrics::new();
        for (rows, part, file) in [(&train, "train", "train.parquet"), (&valid, "valid", "valid.parquet")] {
            let reviews = reviews.select(rows);
            reviews.write_parquet(&dir.join(file))?;
            m.insert(format!("{part}_rows"), rows.len().into());
            m.insert(format!("{part}_movies"), reviews.movies().into());
            m.insert(
                format!("{part}_positive_share"),
                serde_json::json!(reviews.positives() as f64 / rows.len() as f64),
            );
        }
        ctx.info(&format!(
            "{} training reviews of {} movies, {} validation reviews of {} movies{}",
            train.len(),
            m["train_movies"],
            valid.len(),
            m["valid_movies"],
            match self.group {
                Grouping::Movie => " (no movie on both sides)",
                Grouping::None => "",
            }
        ));
        Ok(m)
    }
}
