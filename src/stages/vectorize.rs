//! `uses: vectorize`: fits TF-IDF on the training part of a split and writes the vectorizer
//! with both parts' matrices and labels.

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::stage::{read_json, write_json, Context, Stage, StageError};
use crate::cache::Metrics;
use crate::data::Reviews;
use crate::models::sparse::Csr;
use crate::models::tfidf::{Tfidf, TfidfConfig};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Vectorize {
    #[serde(flatten)]
    pub tfidf: TfidfConfig,
    /// Output directory.
    pub out: String,
}

/// What a `vectorize` stage wrote: the fitted vectorizer and both parts as matrices.
pub struct Features {
    pub train: Csr,
    pub train_labels: Vec<u8>,
    /// The movie of each training row, for grouped cross-validation.
    pub train_movies: Vec<Option<String>>,
    pub valid: Csr,
    pub valid_labels: Vec<u8>,
}

impl Features {
    pub fn load(dir: &Path) -> Result<Features, StageError> {
        let read = |name: &str| Csr::load(&dir.join(name)).map_err(|e| StageError::io(dir.join(name), e));
        let labels = |name: &str| std::fs::read(dir.join(name)).map_err(|e| StageError::io(dir.join(name), e));
        Ok(Features {
            train: read("train.csr")?,
            train_labels: labels("train.labels")?,
            train_movies: read_json(&dir.join("train_movies.json"))?,
            valid: read("valid.csr")?,
            valid_labels: labels("valid.labels")?,
        })
    }
}

impl Stage for Vectorize {
    fn version(&self) -> u32 {
        4
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let split = ctx.input(&["split"])?;
        let train = Reviews::read_parquet(&split.join("train.parquet"))?;
        let valid = Reviews::read_parquet(&split.join("valid.parquet"))?;
        let clock = std::time::Instant::now();
        let (vectorizer, x_train) = Tfidf::fit_transform(&self.tfidf, &train.text)?;
        let fit_seconds = clock.elapsed().as_secs_f64();
        ctx.check_cancel()?;
        let x_valid = vectorizer.transform(&valid.text);
        let dir = ctx.path(&self.out);
        vectorizer.save(&dir)?;
        let io = |name: &str| {
            let p = dir.join(name);
            move |e| StageError::io(p, e)
        };
        x_train.save(&dir.join("train.csr")).map_err(io("train.csr"))?;
        x_valid.save(&dir.join("valid.csr")).map_err(io("valid.csr"))?;
        std::fs::write(dir.join("train.labels"), &train.label).map_err(io("train.labels"))?;
        std::fs::write(dir.join("valid.labels"), &valid.label).map_err(io("valid.labels"))?;
        write_json(&dir.join("train_movies.json"), &train.movie)?;
        // What drift monitoring compares live texts with: each validation text's normalised
        // length in characters, its tokens outside the vocabulary, and all its tokens.
        let counts: Vec<[usize; 3]> = valid.text.iter().map(|t| vectorizer.transform_counting(t).1).collect();
        write_json(&dir.join("valid_text.json"), &counts)?;
        ctx.info(&format!(
            "{} terms; {:.0} non-zeros per training review",
            vectorizer.vocabulary_size(),
            x_train.nnz() as f64 / x_train.rows().max(1) as f64
        ));
        let mut m = Metrics::new();
        m.insert("features".into(), vectorizer.vocabulary_size().into());
        m.insert("train_nnz".into(), x_train.nnz().into());
        // Fitting and transforming the training part, in memory: what TfidfVectorizer.fit_transform does.
        m.insert("fit_transform_seconds".into(), serde_json::json!(fit_seconds));
        Ok(m)
    }
}
