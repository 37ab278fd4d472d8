//! Model bundles: self-contained, versioned directories that `predict` and the server load.
//!
//! A TF-IDF bundle holds:
//! - `manifest.json`: format, kind, version (a hash of the other files), labels, model family and
//!   hyper-parameters, vectorizer settings, validation metrics, tuning result, and the hashes of
//!   the pipeline inputs that produced it;
//! - `vectorizer.json`, `unigrams.txt`, `ngrams.bin`, `idf.bin`: the vectorizer (see `Tfidf::save`);
//! - `terms.txt`: the vocabulary for people, one term per line in column order;
//! - `model.json` (bias and probability calibration), `weights.bin` (f32 LE, one per term).

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::linear::LinearModel;
use super::sparse::{read_vec, write_slice};
use super::tfidf::{Tfidf, TfidfConfig, TfidfError};
use crate::cache::{hash_reader, sha256_hex};

pub const FORMAT: &str = "sentiflow-bundle/1";
pub const LABELS: [&str; 2] = ["negative", "positive"];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a model bundle: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{0}")]
    Vectorizer(#[from] TfidfError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub kind: String,
    pub name: String,
    pub version: String,
    pub pipeline: String,
    pub labels: [String; 2],
    pub model: LinearModel,
    pub features: usize,
    pub vectorizer: TfidfConfig,
    pub metrics: Value,
    pub tuning: Value,
    /// Content hashes of the inputs of the export stage (the trained model's files).
    pub inputs: BTreeMap<String, String>,
    /// File name → SHA-256 of every other file in the bundle.
    pub files: BTreeMap<String, String>,
}

/// A trained TF-IDF model: the vectorizer and the linear classifier on its features.
pub struct TfidfModel {
    pub vectorizer: Tfidf,
    pub model: LinearModel,
}

/// One prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub label: &'static str,
    /// P(positive).
    pub score: f64,
}

impl TfidfModel {
    /// Writes the model's files (everything but the manifest) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), BundleError> {
        self.vectorizer.save(dir)?;
        let json = serde_json::to_vec_pretty(&self.model).expect("models serialize");
        std::fs::write(dir.join("model.json"), json).map_err(io(dir))?;
        let path = dir.join("weights.bin");
        let mut w = BufWriter::new(std::fs::File::create(&path).map_err(io(&path))?);
        write_slice(&mut w, &self.model.weights, |x| x.to_le_bytes()).map_err(io(&path))?;
        w.flush().map_err(io(&path))
    }

    /// Loads the model files from `dir` (a bundle or a `train` stage's output).
    pub fn load(dir: &Path) -> Result<TfidfModel, BundleError> {
        let vectorizer = Tfidf::load(dir)?;
        let path = dir.join("model.json");
        let mut model: LinearModel =
            serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?).map_err(|e| BundleError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let path = dir.join("weights.bin");
        let mut r = BufReader::new(std::fs::File::open(&path).map_err(io(&path))?);
        model.weights = read_vec(&mut r, vectorizer.vocabulary_size(), f32::from_le_bytes).map_err(io(&path))?;
        Ok(TfidfModel { vectorizer, model })
    }

    pub fn predict(&self, text: &str) -> Prediction {
        let row = self.vectorizer.transform_one(text);
        let (cols, vals): (Vec<u32>, Vec<f32>) = row.into_iter().unzip();
        let score = self.model.proba_row(&cols, &vals);
        Prediction {
            label: LABELS[(score > 0.5) as usize],
            score,
        }
    }
}

/// A loaded bundle: its manifest and its model.
pub struct Bundle {
    pub manifest: Manifest,
    pub model: TfidfModel,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).map_err(|e| BundleError::Invalid {
            path: dir.display().to_string(),
            reason: format!("cannot read manifest.json ({e})"),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if manifest.format != FORMAT || manifest.kind != "tfidf" {
            return Err(BundleError::Invalid {
                path: path.display().to_string(),
                reason: format!(
                    "format `{}` kind `{}`; this version reads `{FORMAT}` kind `tfidf`",
                    manifest.format, manifest.kind
                ),
            });
        }
        let model = TfidfModel::load(dir)?;
        Ok(Bundle { manifest, model })
    }
}

/// Hashes every file in `dir` (except the manifest) and derives the bundle version from them.
pub fn file_hashes(dir: &Path) -> Result<(BTreeMap<String, String>, String), BundleError> {
    let mut files = BTreeMap::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        files.insert(name, hash_reader(f, None).map_err(io(&path))?);
    }
    let listing: String = files.iter().map(|(n, h)| format!("{n} {h}\n")).collect();
    let version = sha256_hex(listing.as_bytes())[..12].to_string();
    Ok((files, version))
}
