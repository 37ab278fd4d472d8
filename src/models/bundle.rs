//! Model bundles: self-contained, versioned directories that `predict` and the server load.
//!
//! Every bundle has a `manifest.json`: format, kind (`tfidf` or `bert`), name, version (a hash of
//! the other files), labels, validation metrics, the hashes of the pipeline inputs that produced
//! it, and the kind's own fields.
//!
//! A TF-IDF bundle holds:
//! - `manifest.json`: format, kind, version (a hash of the other files), labels, model family and
//!   hyper-parameters, vectorizer settings, validation metrics, tuning result, and the hashes of
//!   the pipeline inputs that produced it;
//! - `vectorizer.json`, `unigrams.txt`, `ngrams.bin`, `idf.bin`: the vectorizer (see `Tfidf::save`);
//! - `terms.txt`: the vocabulary for people, one term per line in column order;
//! - `model.json` (bias and probability calibration), `weights.bin` (f32 LE, one per term).
//!
//! A BERT bundle holds `model.onnx`, `tokenizer.json` and `export.json` (the ONNX export's parity
//! check and reference probabilities); its manifest adds max_length, truncation and the fine-tuning
//! report.
//!
//! Bundles of both kinds also carry the MLflow `python_function` flavor (`MLmodel`, a Python
//! loader and its requirements; see `models::pyfunc`).

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bert::{BertError, BertModel, Runtime, Truncation};
use super::linear::{LinearModel, ModelSpec};
use super::sparse::{read_vec, write_slice};
use super::tfidf::{Tfidf, TfidfConfig, TfidfError};
use crate::cache::{hash_reader, sha256_hex};
use crate::drift::{Reference, Sample};

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
    #[error(transparent)]
    Bert(#[from] BertError),
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
    pub name: String,
    pub version: String,
    pub pipeline: String,
    pub labels: [String; 2],
    pub metrics: Value,
    /// Content hashes of the inputs of the export stage.
    pub inputs: BTreeMap<String, String>,
    /// File name → SHA-256 of every other file in the bundle.
    pub files: BTreeMap<String, String>,
    #[serde(flatten)]
    pub family: Family,
}

/// What each model family's manifest adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Family {
    Tfidf {
        model: LinearModel,
        features: usize,
        vectorizer: TfidfConfig,
        tuning: Value,
        /// The rows the exported vectorizer and weights were fitted on (bundles from before
        /// refitting have none: the training part).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fitted_on: Option<FittedOn>,
    },
    Bert {
        max_length: usize,
        /// Bundles from before the setting kept the head.
        #[serde(default)]
        truncation: Truncation,
        /// The fine-tuning run's settings and scores.
        training: Value,
        /// The ONNX export's report, without its reference probabilities.
        onnx: Value,
    },
}

/// Which parts of the split a model's weights were fitted on, and how many rows they hold. The
/// validation metrics always come from a fit on the training part alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FittedOn {
    pub parts: Vec<String>,
    pub rows: usize,
}

impl Manifest {
    pub fn kind(&self) -> &'static str {
        match self.family {
            Family::Tfidf { .. } => "tfidf",
            Family::Bert { .. } => "bert",
        }
    }

    /// The hyper-parameters that produced the model, for people and the registry.
    pub fn parameters(&self) -> Parameters {
        match &self.family {
            Family::Tfidf { model, vectorizer, .. } => Parameters::Tfidf(TfidfParameters {
                model: model.spec.clone(),
                vectorizer: vectorizer.clone(),
            }),
            Family::Bert {
                max_length,
                truncation,
                training,
                ..
            } => Parameters::Bert(BertParameters {
                max_length: *max_length,
                truncation: *truncation,
                fine_tuning: typed_entries(&training["params"]),
            }),
        }
    }

    /// The hyper-parameter search that chose the model, if there was one.
    pub fn tuning(&self) -> Option<Tuning> {
        match &self.family {
            Family::Tfidf { tuning, .. } => serde_json::from_value(tuning.clone()).ok(),
            Family::Bert { .. } => None,
        }
    }

    /// The validation figures.
    pub fn figures(&self) -> Figures {
        typed_entries(&self.metrics)
    }
}

/// The hyper-parameters that produced a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Parameters {
    Tfidf(TfidfParameters),
    Bert(BertParameters),
}

/// A TF-IDF model's classifier and the settings of its features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TfidfParameters {
    pub model: ModelSpec,
    pub vectorizer: TfidfConfig,
}

/// A fine-tuned BERT model's input length, truncation and fine-tuning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BertParameters {
    pub max_length: usize,
    pub truncation: Truncation,
    /// The fine-tuning script's settings, by name.
    pub fine_tuning: BTreeMap<String, Option<Setting>>,
}

/// One setting of a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Setting {
    Flag(bool),
    Number(serde_json::Number),
    Text(String),
}

/// The hyper-parameter search that chose a TF-IDF model: a `tune` stage's `best.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Tuning {
    /// The `vectorize` stage whose features won.
    pub vectorizer: String,
    pub model: ModelSpec,
    /// What the search compared (`accuracy`, `f1`, `roc_auc` or `log_loss`).
    pub metric: String,
    /// The metric's mean over the folds, and its standard deviation.
    pub mean: f64,
    pub std: f64,
    pub folds: usize,
}

/// Figures of a stage or a model by name; `null` where a figure is undefined (a ROC AUC of one
/// class).
pub type Figures = BTreeMap<String, Option<Figure>>;

/// One figure: a number, a text (a version), a matrix of counts (the confusion matrix
/// `[[TN, FP], [FN, TP]]`) or the model a search chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Figure {
    Number(serde_json::Number),
    Text(String),
    Counts(Vec<Vec<u64>>),
    Model(ModelSpec),
}

/// The entries of the JSON object `value` that have the shape `T`; an entry of another shape is
/// left out (and logged), never an error: these are for people to read.
pub fn typed_entries<T: serde::de::DeserializeOwned>(value: &Value) -> BTreeMap<String, Option<T>> {
    let Some(object) = value.as_object() else {
        return BTreeMap::new();
    };
    object
        .iter()
        .filter_map(|(k, v)| match serde_json::from_value(v.clone()) {
            Ok(typed) => Some((k.clone(), typed)),
            Err(e) => {
                tracing::warn!("`{k}`: {e}; left out");
                None
            }
        })
        .collect()
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

    /// P(positive) of `text`, with the counts drift monitoring needs.
    pub fn predict(&self, text: &str) -> Sample {
        let (row, [chars, unknown, tokens]) = self.vectorizer.transform_counting(text);
        let (cols, vals): (Vec<u32>, Vec<f32>) = row.into_iter().unzip();
        Sample {
            score: self.model.proba_row(&cols, &vals),
            chars,
            unknown,
            tokens,
        }
    }
}

impl TfidfModel {
    /// The `k` n-grams of `text` that pushed its score most towards each label: each present
    /// term's weight × TF-IDF value (its share of the decision function), strongest first.
    pub fn explain(&self, text: &str, k: usize) -> Explanation {
        let row = self.vectorizer.transform_one(text);
        let mut terms: Vec<(String, f64)> = row
            .iter()
            .map(|&(col, v)| (col, v as f64 * self.model.weights[col as usize] as f64))
            .filter(|(_, c)| *c != 0.0)
            .map(|(col, c)| (self.vectorizer.term(col as usize), c))
            .collect();
        terms.sort_by(|a, b| b.1.total_cmp(&a.1));
        let positive = terms.iter().filter(|t| t.1 > 0.0).take(k).cloned().collect();
        let negative = terms.iter().rev().filter(|t| t.1 < 0.0).take(k).cloned().collect();
        Explanation { positive, negative }
    }
}

/// Terms and their contributions to the decision function, towards each label.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Explanation {
    pub positive: Vec<(String, f64)>,
    pub negative: Vec<(String, f64)>,
}

/// A loaded model of either family.
pub enum Model {
    Tfidf(Box<TfidfModel>),
    Bert(std::sync::Arc<BertModel>),
}

impl Model {
    /// Scores of `texts`, in order (a BERT model runs them as one batch).
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<Sample>, BundleError> {
        Ok(match self {
            Model::Tfidf(m) => texts.iter().map(|t| m.predict(t)).collect(),
            Model::Bert(m) => m.predict_batch(texts)?,
        })
    }

    /// Scores of many `texts`, in order, on every core: TF-IDF texts each on rayon's threads,
    /// BERT texts in batches of [`BERT_BATCH`] (ONNX Runtime spreads each over the cores).
    pub fn predict_many(&self, texts: &[&str]) -> Result<Vec<Sample>, BundleError> {
        match self {
            Model::Tfidf(m) => Ok(texts.par_iter().map(|t| m.predict(t)).collect()),
            Model::Bert(m) => {
                let mut samples = Vec::with_capacity(texts.len());
                for batch in texts.chunks(BERT_BATCH) {
                    samples.extend(m.predict_batch(batch)?);
                }
                Ok(samples)
            }
        }
    }
}

/// Texts a BERT model scores at once in [`Model::predict_many`]: enough to keep the cores busy,
/// few enough that padding to the longest text in a batch wastes little.
pub const BERT_BATCH: usize = 32;

impl Prediction {
    pub fn from_score(score: f64) -> Prediction {
        Prediction {
            label: LABELS[(score > 0.5) as usize],
            score,
        }
    }
}

/// A loaded bundle: its manifest, its model, and its drift reference (bundles exported before
/// drift monitoring have none).
pub struct Bundle {
    pub manifest: Manifest,
    pub model: Model,
    pub drift: Option<Reference>,
}

impl Bundle {
    /// Loads the bundle at `dir`; ONNX models run as `runtime` says.
    pub fn load(dir: &Path, runtime: Runtime) -> Result<Bundle, BundleError> {
        let manifest = Manifest::read(dir)?;
        let model = match &manifest.family {
            Family::Tfidf { .. } => Model::Tfidf(Box::new(TfidfModel::load(dir)?)),
            Family::Bert {
                max_length, truncation, ..
            } => Model::Bert(std::sync::Arc::new(BertModel::load(
                dir,
                *max_length,
                *truncation,
                runtime,
            )?)),
        };
        let path = dir.join("drift.json");
        let drift = match std::fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?),
            Err(_) => None,
        };
        Ok(Bundle { manifest, model, drift })
    }
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, BundleError> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).map_err(|e| BundleError::Invalid {
            path: dir.display().to_string(),
            reason: format!("cannot read manifest.json ({e})"),
        })?;
        let invalid = |reason: String| BundleError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if value["format"] != FORMAT || !matches!(value["kind"].as_str(), Some("tfidf" | "bert")) {
            return Err(invalid(format!(
                "format {} kind {}; this version reads `{FORMAT}` kinds `tfidf` and `bert`",
                value["format"], value["kind"]
            )));
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }

    pub fn write(&self, dir: &Path) -> Result<(), BundleError> {
        let path = dir.join("manifest.json");
        let json = serde_json::to_vec_pretty(self).expect("manifests serialize");
        std::fs::write(&path, json).map_err(io(&path))
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
    let version = version_of(&files);
    Ok((files, version))
}

/// The version of a bundle whose files (other than the manifest) have these hashes.
pub fn version_of(files: &BTreeMap<String, String>) -> String {
    let listing: String = files.iter().map(|(n, h)| format!("{n} {h}\n")).collect();
    sha256_hex(listing.as_bytes())[..12].to_string()
}
