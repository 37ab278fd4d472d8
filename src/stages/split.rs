//! `uses: split`: a stratified, seeded train/validation split, written as `train.parquet` and
//! `valid.parquet` in the output directory.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Context, Metrics, Stage, StageError};
use crate::data::Reviews;
use crate::models::rng::Rng;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Fraction of each class that goes to validation, in (0, 1).
    #[serde(default = "default_fraction")]
    pub validation: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Output directory.
    pub out: String,
}

fn default_fraction() -> f64 {
    0.2
}
fn default_seed() -> u64 {
    42
}

/// Row indices of the two parts, each class split in the same proportion.
pub fn stratified(labels: &[u8], fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>), String> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(format!("validation fraction {fraction} must be between 0 and 1"));
    }
    let mut rng = Rng::new(seed);
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for class in [0u8, 1] {
        let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        let name = if class == 1 { "positive" } else { "negative" };
        if rows.len() < 2 {
            return Err(format!(
                "only {} {name} review(s): each class needs at least 2 to split",
                rows.len()
            ));
        }
        rng.shuffle(&mut rows);
        let n_valid = ((rows.len() as f64 * fraction).round() as usize).clamp(1, rows.len() - 1);
        valid.extend_from_slice(&rows[..n_valid]);
        train.extend_from_slice(&rows[n_valid..]);
    }
    train.sort_unstable();
    valid.sort_unstable();
    Ok((train, valid))
}

impl Stage for Split {
    fn version(&self) -> u32 {
        1
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let input = ctx.input(&["load", "clean"])?;
        let reviews = Reviews::read_parquet(&input)?;
        let (train, valid) = stratified(&reviews.label, self.validation, self.seed).map_err(StageError::Invalid)?;
        let dir = ctx.path(&self.out);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        reviews.select(&train).write_parquet(&dir.join("train.parquet"))?;
        reviews.select(&valid).write_parquet(&dir.join("valid.parquet"))?;
        ctx.info(&format!(
            "{} training and {} validation reviews",
            train.len(),
            valid.len()
        ));
        let mut m = Metrics::new();
        m.insert("train_rows".into(), train.len().into());
        m.insert("valid_rows".into(), valid.len().into());
        Ok(m)
    }
}
