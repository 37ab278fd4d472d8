//! `uses: train`: fits the chosen model on the whole training part and scores it on the
//! validation part. The model is either the best of a `tune` stage it needs or given explicitly.
//! With `refit`, the model it saves is fitted again, vectorizer included, on both parts (as
//! scikit-learn's `refit`); the metrics and drift reference still come from the first fit, the
//! one that never saw the validation part.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::stage::{read_json, write_json, Context, Stage, StageError};
use super::vectorize::Features;
use crate::cache::Metrics;
use crate::data::Reviews;
use crate::drift::{Reference, Sample};
use crate::models::bundle::Tuning;
use crate::models::bundle::{FittedOn, TfidfModel};
use crate::models::linear::{LinearModel, ModelSpec};
use crate::models::metrics::{roc_curve, score};
use crate::models::tfidf::{Tfidf, TfidfConfig};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Train {
    /// The model to fit; without it, the best configuration of the `tune` stage this one needs.
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Seed of the solver's order of visits.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Save a model fitted on the training and validation parts together (needs the `split`
    /// stage); the reported validation metrics come from the fit on the training part alone.
    #[serde(default)]
    pub refit: bool,
    /// Output directory: the model's files, `metrics.json` and `predictions.json`.
    pub out: String,
    /// Also write the validation scores to this JSON file (flat, for DVC metrics and the like).
    #[serde(default)]
    pub metrics: Option<String>,
}

fn default_seed() -> u64 {
    42
}

impl Stage for Train {
    fn version(&self) -> u32 {
        4
    }

    fn outs(&self) -> Vec<String> {
        std::iter::once(self.out.clone()).chain(self.metrics.clone()).collect()
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let tuned: Option<Tuning> = match ctx.upstream_of(&["tune"]).as_slice() {
            [] => None,
            [one] => Some(read_json(&one.outs[0].join("best.json"))?),
            _ => {
                return Err(StageError::Invalid(format!(
                    "stage `{}` needs several `tune` stages; it takes one",
                    ctx.stage
                )))
            }
        };
        let (spec, features_stage) = match (&self.model, &tuned) {
            (Some(spec), _) => (spec.clone(), ctx.single_upstream(&["vectorize"])?),
            (None, Some(best)) => {
                let up = ctx
                    .upstream
                    .iter()
                    .find(|u| u.kind == "vectorize" && u.name == best.vectorizer)
                    .ok_or_else(|| {
                        StageError::Invalid(format!(
                            "the best trial used vectorize stage `{}`: add it to the `needs` of `{}`",
                            best.vectorizer, ctx.stage
                        ))
                    })?;
                (best.model.clone(), up)
            }
            (None, None) => {
                return Err(StageError::Invalid(format!(
                    "stage `{}` has no `model` and needs no `tune` stage: give one or the other",
                    ctx.stage
                )))
            }
        };
        spec.check().map_err(StageError::Invalid)?;
        let dir = &features_stage.outs[0];
        let features = Features::load(dir)?;
        if features.train_labels.iter().all(|&l| l == features.train_labels[0]) {
            return Err(StageError::Invalid("the training part has only one class".into()));
        }
        let fit = || {
            let rows: Vec<usize> = (0..features.train.rows()).collect();
            let model = LinearModel::fit(&spec, &features.train, &features.train_labels, &rows, self.seed);
            let p = model.predict_proba(&features.valid);
            (model, p)
        };
        // The solver is sequential: the refit, on its own thread, costs no extra wall time.
        let ((model, p), refitted) = if self.refit {
            let (first, refitted) = rayon::join(fit, || self.refit(ctx, &spec, dir));
            (first, Some(refitted?))
        } else {
            (fit(), None)
        };
        let scores = score(&p, &features.valid_labels);
        ctx.info(&format!(
            "validation accuracy {:.4}, F1 {:.4}, ROC-AUC {:.4}, log-loss {:.4}",
            scores.accuracy, scores.f1, scores.roc_auc, scores.log_loss
        ));
        let (trained, fitted_on) = match refitted {
            Some(refitted) => refitted,
            None => {
                let rows = features.train_labels.len();
                let vectorizer = Tfidf::load(dir)?;
                let parts = vec!["train".into()];
                (TfidfModel { vectorizer, model }, FittedOn { parts, rows })
            }
        };
        let out = ctx.path(&self.out);
        std::fs::create_dir_all(&out).map_err(|e| StageError::io(&out, e))?;
        trained.save(&out)?;
        let counts: Vec<[usize; 3]> = read_json(&dir.join("valid_text.json"))?;
        let samples: Vec<Sample> = p
            .iter()
            .zip(&counts)
            .map(|(&score, &[chars, unknown, tokens])| Sample {
                score,
                chars,
                unknown,
                tokens,
            })
            .collect();
        write_json(&out.join("drift.json"), &Reference::build(&samples, scores.accuracy))?;
        let report = json!({
            "validation": scores,
            "validation_rows": features.valid_labels.len(),
            "train_rows": features.train_labels.len(),
            "model": spec,
            "vectorizer_stage": features_stage.name,
            "tuning": tuned,
            "fitted_on": fitted_on,
        });
        write_json(&out.join("metrics.json"), &report)?;
        write_json(
            &out.join("predictions.json"),
            &json!({"labels": features.valid_labels, "scores": p, "roc_curve": roc_curve(&p, &features.valid_labels)}),
        )?;

        if let Some(path) = &self.metrics {
            let path = ctx.path(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
            }
            write_json(&path, &scores)?;
        }
        let mut m = Metrics::new();
        for (k, v) in [
            ("accuracy", scores.accuracy),
            ("precision", scores.precision),
            ("recall", scores.recall),
            ("f1", scores.f1),
            ("roc_auc", scores.roc_auc),
            ("log_loss", scores.log_loss),
        ] {
            m.insert(k.into(), json!(v));
        }
        m.insert("confusion".into(), json!(scores.confusion));
        Ok(m)
    }
}

impl Train {
    /// The vectorizer of `features_dir`'s settings and the model `spec`, both fitted on the
    /// training and validation parts of the split together.
    fn refit(
        &self,
        ctx: &Context,
        spec: &ModelSpec,
        features_dir: &std::path::Path,
    ) -> Result<(TfidfModel, FittedOn), StageError> {
        let split = ctx.single_upstream(&["split"]).map_err(|_| {
            StageError::Invalid(format!(
                "`refit: true` fits again on both parts of the split: add the `split` stage to the `needs` of `{}`",
                ctx.stage
            ))
        })?;
        let mut all = Reviews::read_parquet(&split.outs[0].join("train.parquet"))?;
        let valid = Reviews::read_parquet(&split.outs[0].join("valid.parquet"))?;
        all.text.extend(valid.text);
        all.label.extend(valid.label);
        ctx.check_cancel()?;
        let config: TfidfConfig = read_json(&features_dir.join("vectorizer.json"))?;
        let (vectorizer, x) = Tfidf::fit_transform(&config, &all.text)?;
        let rows: Vec<usize> = (0..x.rows()).collect();
        let model = LinearModel::fit(spec, &x, &all.label, &rows, self.seed);
        ctx.info(&format!(
            "refitted on the training and validation parts: {} reviews, {} terms",
            rows.len(),
            vectorizer.vocabulary_size()
        ));
        let parts = vec!["train".into(), "valid".into()];
        Ok((
            TfidfModel { vectorizer, model },
            FittedOn {
                parts,
                rows: rows.len(),
            },
        ))
    }
}
