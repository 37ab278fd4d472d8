//! Stage kinds: what a stage of each `uses:` value does. Every kind implements [`Stage`]; the
//! engine only knows that trait, so adding a kind means adding a variant to [`StageKind`].

mod bert;
mod clean;
mod command;
mod export;
mod load;
mod split;
mod stage;
mod train;
mod tune;
mod vectorize;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use bert::{BertExport, BertFinetune};
pub use clean::Clean;
pub use command::Command;
pub use export::Export;
pub use load::Load;
pub use split::Split;
pub use train::Train;
pub use tune::Tune;
pub use vectorize::Vectorize;

pub use crate::cache::Metrics;
pub use stage::{read_json, write_json, Context, Stage, StageError, Trials, Upstream};

/// The names accepted by `uses:`.
pub const KINDS: &[&str] = &[
    "command",
    "load",
    "clean",
    "split",
    "vectorize",
    "tune",
    "train",
    "export",
    "bert_finetune",
    "bert_export",
];

/// Every stage kind, selected by `uses:` with its parameters under `with:`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "uses", content = "with", rename_all = "snake_case")]
pub enum StageKind {
    /// A shell command with declared dependencies and outputs.
    Command(Command),
    /// Reads reviews (IMDB layout, CSV, JSONL, Parquet) into a Parquet table.
    Load(Load),
    /// Normalises review text and drops duplicates and out-of-bounds lengths.
    Clean(Clean),
    /// Stratified train/validation split.
    Split(Split),
    /// Fits TF-IDF on the training part and transforms both parts.
    Vectorize(Vectorize),
    /// Searches model hyper-parameters by stratified k-fold cross-validation.
    Tune(Tune),
    /// Fits the chosen model and scores it on the validation part.
    Train(Train),
    /// Writes a self-contained model bundle.
    Export(Export),
    /// Fine-tunes a BERT-family model with PyTorch (`torchrun`).
    BertFinetune(BertFinetune),
    /// Exports a fine-tuned model to an ONNX bundle and scores it in Rust.
    BertExport(BertExport),
}

impl StageKind {
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Command(_) => "command",
            StageKind::Load(_) => "load",
            StageKind::Clean(_) => "clean",
            StageKind::Split(_) => "split",
            StageKind::Vectorize(_) => "vectorize",
            StageKind::Tune(_) => "tune",
            StageKind::Train(_) => "train",
            StageKind::Export(_) => "export",
            StageKind::BertFinetune(_) => "bert_finetune",
            StageKind::BertExport(_) => "bert_export",
        }
    }

    pub fn stage(&self) -> &dyn Stage {
        match self {
            StageKind::Command(s) => s,
            StageKind::Load(s) => s,
            StageKind::Clean(s) => s,
            StageKind::Split(s) => s,
            StageKind::Vectorize(s) => s,
            StageKind::Tune(s) => s,
            StageKind::Train(s) => s,
            StageKind::Export(s) => s,
            StageKind::BertFinetune(s) => s,
            StageKind::BertExport(s) => s,
        }
    }

    /// The name and directory of the model bundle the stage writes, for the kinds that export one.
    pub fn bundle(&self) -> Option<(&str, &str)> {
        match self {
            StageKind::Export(e) => Some((&e.name, &e.out)),
            StageKind::BertExport(e) => Some((&e.name, &e.out)),
            _ => None,
        }
    }

    /// The kind's parameters as JSON, for cache keys and the lock file.
    pub fn params(&self) -> Value {
        match serde_json::to_value(self).expect("stage parameters serialize") {
            Value::Object(mut m) => m.remove("with").unwrap_or(Value::Null),
            other => other,
        }
    }
}
