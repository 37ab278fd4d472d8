//! `uses: tune`: grid or random search over model hyper-parameters, and over vectorizers when
//! several `vectorize` stages feed it, scored by stratified k-fold cross-validation on the
//! training part (grouped by movie with `group: movie`, so that a trial's score predicts new
//! movies). Trials run in parallel; results do not depend on the thread count.

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::stage::{write_json, Context, Stage, StageError};
use super::vectorize::Features;
use crate::cache::Metrics;
use crate::data::partition::{self, Grouping};
use crate::models::bundle::Tuning;
use crate::models::linear::{LinearModel, ModelSpec};
use crate::models::metrics::{score, Scores};
use crate::models::rng::Rng;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tune {
    /// Number of cross-validation folds.
    #[serde(default = "default_folds")]
    pub folds: usize,
    /// Seed of the folds, of random search's draws and of the solvers.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `movie` keeps all reviews of a movie in one fold (stratified group k-fold).
    #[serde(default)]
    pub group: Grouping,
    /// What the best trial maximises (`log_loss` is minimised).
    #[serde(default)]
    pub metric: Metric,
    /// `grid` tries every combination of the listed values; `random` draws `trials` of them.
    #[serde(default)]
    pub search: Search,
    /// For random search: how many configurations to draw.
    #[serde(default)]
    pub trials: Option<usize>,
    /// Model families with the values to try: `{model: logreg, C: [0.1, 1, 10]}`. A list is a
    /// set of choices; random search also takes `{log_uniform: [lo, hi]}` and
    /// `{uniform: [lo, hi]}`.
    pub models: Vec<Map<String, Value>>,
    /// Output directory: `best.json`, `trials.json`, `trials.csv`.
    pub out: String,
}

fn default_folds() -> usize {
    5
}
fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    #[default]
    Accuracy,
    F1,
    RocAuc,
    LogLoss,
}

impl Metric {
    fn of(self, s: &Scores) -> f64 {
        match self {
            Metric::Accuracy => s.accuracy,
            Metric::F1 => s.f1,
            Metric::RocAuc => s.roc_auc,
            Metric::LogLoss => s.log_loss,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::RocAuc => "roc_auc",
            Metric::LogLoss => "log_loss",
        }
    }

    /// Whether `a` is strictly better than `b`.
    fn better(self, a: f64, b: f64) -> bool {
        if self == Metric::LogLoss {
            a < b
        } else {
            a > b
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Search {
    #[default]
    Grid,
    Random,
}

type Getter = fn(&Scores) -> f64;

const METRICS: [(&str, Getter); 4] = [
    ("accuracy", |s| s.accuracy),
    ("f1", |s| s.f1),
    ("roc_auc", |s| s.roc_auc),
    ("log_loss", |s| s.log_loss),
];

fn expand_grid(entry: &Map<String, Value>, at: &str) -> Result<Vec<Map<String, Value>>, String> {
    let mut configs = vec![Map::new()];
    for (key, value) in entry {
        let choices = match value {
            Value::Array(items) if items.is_empty() => return Err(format!("{at}.{key}: empty list")),
            Value::Array(items) => items.clone(),
            Value::Object(_) => return Err(format!("{at}.{key}: distributions need `search: random`")),
            scalar => vec![scalar.clone()],
        };
        configs = configs
            .into_iter()
            .flat_map(|c| {
                choices.iter().map(move |v| {
                    let mut c = c.clone();
                    c.insert(key.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    Ok(configs)
}

fn sample(entry: &Map<String, Value>, at: &str, rng: &mut Rng) -> Result<Map<String, Value>, String> {
    let mut config = Map::new();
    for (key, value) in entry {
        let v = match value {
            Value::Array(items) if items.is_empty() => return Err(format!("{at}.{key}: empty list")),
            Value::Array(items) => items[rng.below(items.len())].clone(),
            Value::Object(dist) => {
                let range = |name: &str| -> Option<(f64, f64)> {
                    let r = dist.get(name)?.as_array()?;
                    Some((r.first()?.as_f64()?, r.get(1)?.as_f64()?))
                };
                if let Some((lo, hi)) = range("log_uniform").filter(|(lo, hi)| *lo > 0.0 && hi >= lo) {
                    json!((lo.ln() + rng.unit() * (hi.ln() - lo.ln())).exp())
                } else if let Some((lo, hi)) = range("uniform").filter(|(lo, hi)| hi >= lo) {
                    json!(lo + rng.unit() * (hi - lo))
                } else {
                    return Err(format!(
                        "{at}.{key}: expected {{log_uniform: [lo, hi]}} or {{uniform: [lo, hi]}}"
                    ));
                }
            }
            scalar => scalar.clone(),
        };
        config.insert(key.clone(), v);
    }
    Ok(config)
}

/// Fold number of every row: stratified by label, each group whole in one fold.
pub fn stratified_folds(labels: &[u8], groups: &[usize], k: usize, seed: u64) -> Result<Vec<usize>, String> {
    if k < 2 {
        return Err(format!("folds must be at least 2, got {k}"));
    }
    for (class, name) in [(0u8, "negative"), (1, "positive")] {
        let n = labels.iter().filter(|&&y| y == class).count();
        if n < k {
            return Err(format!(
                "{k}-fold cross-validation needs at least {k} {name} training reviews, found {n}"
            ));
        }
    }
    let fold = partition::stratified(labels, groups, &vec![1.0; k], seed);
    for f in 0..k {
        for (class, name) in [(0u8, "negative"), (1, "positive")] {
            if !(0..labels.len()).any(|i| fold[i] == f && labels[i] == class) {
                return Err(format!(
                    "{k}-fold cross-validation grouped by movie left fold {f} without a {name} \
                     review: use fewer folds or more movies"
                ));
            }
        }
    }
    Ok(fold)
}

/// Most configurations a search may try: more would not finish, and would not fit in memory.
const MAX_TRIALS: usize = 100_000;

/// What every trial of a search shares: the features of each vectorizer, the labels, the folds,
/// and the trials (a vectorizer and a model configuration each).
struct Plan {
    features: Vec<(String, Features)>,
    fold: Vec<usize>,
    trials: Vec<(usize, ModelSpec)>,
}

/// One trial's fold scores as a worker sends them back: every number as its bits, so the
/// gathered table is the one a local run writes, byte for byte.
#[derive(Serialize, Deserialize)]
struct TrialScores {
    folds: Vec<ScoreBits>,
}

#[derive(Serialize, Deserialize)]
struct ScoreBits {
    /// accuracy, precision, recall, f1, roc_auc, log_loss.
    figures: [u64; 6],
    confusion: [[u64; 2]; 2],
}

impl ScoreBits {
    fn of(s: &Scores) -> ScoreBits {
        ScoreBits {
            figures: [s.accuracy, s.precision, s.recall, s.f1, s.roc_auc, s.log_loss].map(f64::to_bits),
            confusion: s.confusion,
        }
    }

    fn scores(&self) -> Scores {
        let [accuracy, precision, recall, f1, roc_auc, log_loss] = self.figures.map(f64::from_bits);
        Scores {
            accuracy,
            precision,
            recall,
            f1,
            roc_auc,
            log_loss,
            confusion: self.confusion,
        }
    }
}

impl Tune {
    fn plan(&self, ctx: &Context) -> Result<Plan, StageError> {
        let configs = self.configs().map_err(StageError::Invalid)?;
        let vectorizers = ctx.upstream_of(&["vectorize"]);
        if vectorizers.is_empty() {
            return Err(StageError::Invalid(format!(
                "stage `{}` must need at least one `vectorize` stage",
                ctx.stage
            )));
        }
        let features: Vec<(String, Features)> = vectorizers
            .iter()
            .map(|u| Ok((u.name.clone(), Features::load(&u.outs[0])?)))
            .collect::<Result<_, StageError>>()?;
        let labels = &features[0].1.train_labels;
        if features.iter().any(|(_, f)| &f.train_labels != labels) {
            return Err(StageError::Invalid(
                "the vectorize stages were fitted on different training rows".into(),
            ));
        }
        let groups = self
            .group
            .groups(&features[0].1.train_movies)
            .map_err(StageError::Invalid)?;
        let fold = stratified_folds(labels, &groups, self.folds, self.seed).map_err(StageError::Invalid)?;
        let trials = (0..features.len())
            .flat_map(|v| configs.iter().map(move |c| (v, c.clone())))
            .collect();
        Ok(Plan { features, fold, trials })
    }

    /// The scores of trial `t` on fold `f`: fitted on the other folds.
    fn fold(&self, ctx: &Context, plan: &Plan, t: usize, f: usize) -> Result<Scores, StageError> {
        ctx.check_cancel()?;
        let (v, spec) = &plan.trials[t];
        let x = &plan.features[*v].1.train;
        let labels = &plan.features[*v].1.train_labels;
        let fold = &plan.fold;
        let train_rows: Vec<usize> = (0..x.rows()).filter(|&i| fold[i] != f).collect();
        let test_rows: Vec<usize> = (0..x.rows()).filter(|&i| fold[i] == f).collect();
        let model = LinearModel::fit(spec, x, labels, &train_rows, self.seed + f as u64);
        let p: Vec<f64> = test_rows
            .iter()
            .map(|&i| {
                let (c, vals) = x.row(i);
                model.proba_row(c, vals)
            })
            .collect();
        let y: Vec<u8> = test_rows.iter().map(|&i| labels[i]).collect();
        Ok(score(&p, &y))
    }

    fn configs(&self) -> Result<Vec<ModelSpec>, String> {
        if self.models.is_empty() {
            return Err("`models` is empty: list at least one model family".into());
        }
        let planned = match self.search {
            Search::Grid => self
                .models
                .iter()
                .map(|entry| {
                    entry.values().fold(1usize, |n, v| match v {
                        Value::Array(items) => n.saturating_mul(items.len()),
                        _ => n,
                    })
                })
                .fold(0usize, usize::saturating_add),
            Search::Random => self.trials.unwrap_or(0),
        };
        if planned > MAX_TRIALS {
            return Err(format!(
                "{planned} configurations to try: at most {MAX_TRIALS} (use `search: random` with fewer `trials`)"
            ));
        }
        let mut raw = Vec::new();
        match self.search {
            Search::Grid => {
                for (i, entry) in self.models.iter().enumerate() {
                    raw.extend(expand_grid(entry, &format!("models[{i}]"))?.into_iter().map(|c| (i, c)));
                }
            }
            Search::Random => {
                let n = self.trials.ok_or("random search needs `trials`")?;
                let mut rng = Rng::new(self.seed);
                for _ in 0..n {
                    let i = rng.below(self.models.len());
                    raw.push((i, sample(&self.models[i], &format!("models[{i}]"), &mut rng)?));
                }
            }
        }
        raw.into_iter()
            .map(|(i, c)| {
                let spec: ModelSpec =
                    serde_json::from_value(Value::Object(c)).map_err(|e| format!("models[{i}]: {e}"))?;
                spec.check().map_err(|e| format!("models[{i}]: {e}"))?;
                Ok(spec)
            })
            .collect()
    }
}

impl Stage for Tune {
    fn version(&self) -> u32 {
        2
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn check(&self) -> Result<(), String> {
        self.configs().map(|_| ())
    }

    fn has_trials(&self) -> bool {
        true
    }

    fn run_trial(&self, ctx: &Context, i: usize) -> Result<Vec<u8>, StageError> {
        let plan = self.plan(ctx)?;
        if i >= plan.trials.len() {
            return Err(StageError::Invalid(format!(
                "trial {i} of a search of {} trials",
                plan.trials.len()
            )));
        }
        let folds: Vec<Scores> = (0..self.folds)
            .into_par_iter()
            .map(|f| self.fold(ctx, &plan, i, f))
            .collect::<Result<_, _>>()?;
        let bits = TrialScores {
            folds: folds.iter().map(ScoreBits::of).collect(),
        };
        Ok(serde_json::to_vec(&bits).expect("scores serialize"))
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let plan = self.plan(ctx)?;
        let Plan { features, trials, .. } = &plan;
        ctx.info(&format!("{} trials x {} folds", trials.len(), self.folds));
        let scores: Vec<Scores> = match ctx.trials {
            // Each trial a job elsewhere: the same numbers, bit for bit, come back.
            Some(remote) => {
                let mut scores = Vec::new();
                for (t, bytes) in remote.run(trials.len())?.iter().enumerate() {
                    let got: TrialScores = serde_json::from_slice(bytes)
                        .map_err(|e| StageError::Invalid(format!("the result of trial {t}: {e}")))?;
                    if got.folds.len() != self.folds {
                        return Err(StageError::Invalid(format!(
                            "the result of trial {t} has {} folds, not {}",
                            got.folds.len(),
                            self.folds
                        )));
                    }
                    scores.extend(got.folds.iter().map(ScoreBits::scores));
                }
                scores
            }
            None => {
                let tasks: Vec<(usize, usize)> = (0..trials.len())
                    .flat_map(|t| (0..self.folds).map(move |f| (t, f)))
                    .collect();
                tasks
                    .par_iter()
                    .map(|&(t, f)| self.fold(ctx, &plan, t, f))
                    .collect::<Result<_, _>>()?
            }
        };

        let mut table = Vec::new();
        let mut best: Option<(usize, f64, f64)> = None;
        for (t, (v, spec)) in trials.iter().enumerate() {
            let fold_scores = &scores[t * self.folds..(t + 1) * self.folds];
            let mut row = Map::new();
            row.insert("trial".into(), t.into());
            row.insert("vectorizer".into(), features[*v].0.clone().into());
            row.insert("params".into(), serde_json::to_value(spec).expect("specs serialize"));
            for (name, get) in METRICS {
                let (mean, std) = mean_std(fold_scores.iter().map(get));
                row.insert(format!("{name}_mean"), json!(mean));
                row.insert(format!("{name}_std"), json!(std));
            }
            row.insert(
                "folds".into(),
                serde_json::to_value(fold_scores.iter().map(|s| self.metric.of(s)).collect::<Vec<_>>())
                    .expect("numbers serialize"),
            );
            let (mean, std) = mean_std(fold_scores.iter().map(|s| self.metric.of(s)));
            if best.is_none_or(|(_, m, _)| self.metric.better(mean, m)) {
                best = Some((t, mean, std));
            }
            table.push(Value::Object(row));
        }
        let (t, mean, std) = best.expect("at least one trial");
        let (v, spec) = &trials[t];
        let best = Tuning {
            vectorizer: features[*v].0.clone(),
            model: spec.clone(),
            metric: self.metric.name().into(),
            mean,
            std,
            folds: self.folds,
        };
        let dir = ctx.path(&self.out);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        write_json(&dir.join("best.json"), &best)?;
        write_json(&dir.join("trials.json"), &table)?;
        write_csv(&dir.join("trials.csv"), &table)?;
        ctx.info(&format!(
            "best: {} on `{}`, cv {} {:.4} ± {:.4}",
            serde_json::to_string(&best.model).expect("specs serialize"),
            best.vectorizer,
            best.metric,
            mean,
            std
        ));
        let mut m = Metrics::new();
        m.insert("trials".into(), trials.len().into());
        m.insert(format!("best_cv_{}", self.metric.name()), json!(mean));
        m.insert(
            "best_model".into(),
            serde_json::to_value(&best.model).expect("specs serialize"),
        );
        m.insert("best_vectorizer".into(), best.vectorizer.into());
        Ok(m)
    }
}

fn mean_std(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
    (mean, var.sqrt())
}

fn write_csv(path: &std::path::Path, table: &[Value]) -> Result<(), StageError> {
    let mut w = csv::Writer::from_path(path).map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))?;
    let mut header = vec!["trial".to_string(), "vectorizer".to_string(), "params".to_string()];
    for (name, _) in METRICS {
        header.push(format!("{name}_mean"));
        header.push(format!("{name}_std"));
    }
    let err = |e: csv::Error| StageError::Invalid(format!("{}: {e}", path.display()));
    w.write_record(&header).map_err(err)?;
    for row in table {
        let cells: Vec<String> = header
            .iter()
            .map(|h| match &row[h] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        w.write_record(&cells).map_err(err)?;
    }
    w.flush().map_err(|e| StageError::io(path, e))
}
