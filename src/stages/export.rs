//! `uses: export`: turns a trained model into a self-contained, versioned bundle directory
//! (format in `models::bundle`). The directory is assembled beside its destination and renamed
//! into place, so readers never see half a bundle.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::path::Path;

use super::stage::{read_json, Context, Stage, StageError};
use crate::cache::Metrics;
use crate::models::bundle::{file_hashes, Family, Manifest, TfidfModel, FORMAT, LABELS};
use crate::models::pyfunc;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The bundle's name, as the server lists it.
    #[serde(default = "default_name")]
    pub name: String,
    /// The bundle directory.
    pub out: String,
}

fn default_name() -> String {
    "tfidf".into()
}

const MODEL_FILES: [&str; 9] = [
    "vectorizer.json",
    "terms.txt",
    "unigrams.txt",
    "ngrams.bin",
    "idf.bin",
    "model.json",
    "weights.bin",
    "predictions.json",
    "drift.json",
];

impl Stage for Export {
    fn version(&self) -> u32 {
        // 5: bundles carry the MLflow python_function flavor.
        5
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let trained = ctx.input(&["train"])?;
        let manifest = publish(ctx, &self.name, &self.out, |staging| {
            for name in MODEL_FILES {
                std::fs::copy(trained.join(name), staging.join(name))
                    .map_err(|e| StageError::io(trained.join(name), e))?;
            }
            pyfunc::write(staging, "tfidf").map_err(|e| StageError::io(staging, e))?;
            let report: Value = read_json(&trained.join("metrics.json"))?;
            let model = TfidfModel::load(staging)?;
            Ok((
                report["validation"].clone(),
                Family::Tfidf {
                    features: model.vectorizer.vocabulary_size(),
                    vectorizer: model.vectorizer.config.clone(),
                    model: model.model,
                    tuning: report["tuning"].clone(),
                    fitted_on: serde_json::from_value(report["fitted_on"].clone()).ok(),
                },
            ))
        })?;
        ctx.info(&format!(
            "bundle `{}` version {} in {}",
            self.name, manifest.version, self.out
        ));
        let mut m = Metrics::new();
        m.insert("version".into(), manifest.version.into());
        if let Family::Tfidf { features, .. } = manifest.family {
            m.insert("features".into(), features.into());
        }
        Ok(m)
    }
}

/// Assembles a bundle in a directory beside `out` (`fill` writes the model files and returns the
/// validation metrics and the family's fields), adds the manifest, and renames it into place.
pub(super) fn publish(
    ctx: &Context,
    name: &str,
    out: &str,
    fill: impl FnOnce(&Path) -> Result<(Value, Family), StageError>,
) -> Result<Manifest, StageError> {
    let dest = ctx.path(out);
    let parent = dest.parent().expect("outputs are under the root");
    std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".bundle-")
        .tempdir_in(parent)
        .map_err(|e| StageError::io(parent, e))?;
    let (metrics, family) = fill(staging.path())?;
    let (files, version) = file_hashes(staging.path())?;
    let manifest = Manifest {
        format: FORMAT.into(),
        name: name.into(),
        version,
        pipeline: ctx.pipeline.into(),
        labels: LABELS.map(String::from),
        metrics,
        inputs: ctx.inputs.clone(),
        files,
        family,
    };
    manifest.write(staging.path())?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| StageError::io(&dest, e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &dest).map_err(|e| StageError::io(&dest, e))?;
    Ok(manifest)
}
