//! `uses: export`: turns a trained model into a self-contained, versioned bundle directory
//! (format in `models::bundle`). The directory is assembled beside its destination and renamed
//! into place, so readers never see half a bundle.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{read_json, write_json, Context, Metrics, Stage, StageError};
use crate::models::bundle::{file_hashes, Manifest, TfidfModel, FORMAT, LABELS};

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

const MODEL_FILES: [&str; 8] = [
    "vectorizer.json",
    "terms.txt",
    "unigrams.txt",
    "ngrams.bin",
    "idf.bin",
    "model.json",
    "weights.bin",
    "predictions.json",
];

impl Stage for Export {
    fn version(&self) -> u32 {
        2
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let trained = ctx.input(&["train"])?;
        let dest = ctx.path(&self.out);
        let parent = dest.parent().expect("outputs are under the root");
        std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".bundle-")
            .tempdir_in(parent)
            .map_err(|e| StageError::io(parent, e))?;
        for name in MODEL_FILES {
            std::fs::copy(trained.join(name), staging.path().join(name))
                .map_err(|e| StageError::io(trained.join(name), e))?;
        }
        let report: Value = read_json(&trained.join("metrics.json"))?;
        let model = TfidfModel::load(staging.path())?;
        let (files, version) = file_hashes(staging.path())?;
        let manifest = Manifest {
            format: FORMAT.into(),
            kind: "tfidf".into(),
            name: self.name.clone(),
            version: version.clone(),
            pipeline: ctx.pipeline.into(),
            labels: LABELS.map(String::from),
            features: model.vectorizer.vocabulary_size(),
            vectorizer: model.vectorizer.config.clone(),
            model: model.model,
            metrics: report["validation"].clone(),
            tuning: report["tuning"].clone(),
            inputs: ctx.inputs.clone(),
            files,
        };
        write_json(&staging.path().join("manifest.json"), &manifest)?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| StageError::io(&dest, e))?;
        }
        let staged = staging.keep();
        std::fs::rename(&staged, &dest).map_err(|e| StageError::io(&dest, e))?;
        ctx.info(&format!("bundle `{}` version {version} in {}", self.name, self.out));
        let mut m = Metrics::new();
        m.insert("version".into(), version.into());
        m.insert("features".into(), manifest.features.into());
        Ok(m)
    }
}
