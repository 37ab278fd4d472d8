//! `uses: clean`: normalises review text (HTML tags and entities, Unicode NFKC, whitespace,
//! optional lowercase), then drops exact duplicates and texts outside the length bounds.

use rayon::prelude::*;
use rustc_hash::FxHashSet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::stage::{Context, Stage, StageError};
use crate::cache::Metrics;
use crate::data::Reviews;
use crate::text::normalize;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Clean {
    /// Lowercase the text.
    #[serde(default)]
    pub lowercase: bool,
    /// Drop texts shorter than this many characters (after normalisation).
    #[serde(default = "one")]
    pub min_chars: usize,
    /// Drop texts longer than this many characters.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Drop rows whose normalised text repeats an earlier row's.
    #[serde(default = "yes")]
    pub dedupe: bool,
    /// The Parquet table written.
    pub out: String,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl Stage for Clean {
    fn version(&self) -> u32 {
        1
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let input = ctx.input(&["load", "clean"])?;
        let mut reviews = Reviews::read_parquet(&input)?;
        let rows_in = reviews.len();
        reviews.text = reviews.text.par_iter().map(|t| normalize(t, self.lowercase)).collect();

        let (mut too_short, mut too_long, mut duplicates) = (0usize, 0usize, 0usize);
        let mut seen = FxHashSet::default();
        let mut keep = Vec::with_capacity(rows_in);
        for (i, text) in reviews.text.iter().enumerate() {
            let chars = text.chars().count();
            if chars < self.min_chars {
                too_short += 1;
            } else if self.max_chars.is_some_and(|m| chars > m) {
                too_long += 1;
            } else if self.dedupe && !seen.insert(text.as_str()) {
                duplicates += 1;
            } else {
                keep.push(i);
            }
        }
        let cleaned = reviews.select(&keep);
        if cleaned.is_empty() {
            return Err(StageError::Invalid(format!(
                "cleaning removed all {rows_in} rows ({too_short} too short, {too_long} too long, {duplicates} duplicates)"
            )));
        }
        cleaned.write_parquet(&ctx.path(&self.out))?;
        ctx.info(&format!(
            "kept {} of {rows_in} rows; removed {too_short} too short, {too_long} too long, {duplicates} duplicates",
            cleaned.len()
        ));
        let mut m = Metrics::new();
        m.insert("rows_in".into(), rows_in.into());
        m.insert("rows".into(), cleaned.len().into());
        m.insert("removed_too_short".into(), too_short.into());
        m.insert("removed_too_long".into(), too_long.into());
        m.insert("removed_duplicates".into(), duplicates.into());
        Ok(m)
    }
}
