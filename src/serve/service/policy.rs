//! The retraining policy: the pipeline the server trains by itself, on a drift alert of a served
//! model or on a schedule, never more often than a cooldown; and the promotion gate's settings.
//! Both come from the `retrain:` and `promotion:` sections of the `--config` file; the
//! `--retrain-*` and `--promotion-*` flags (and their environment variables) override the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::pipeline::yaml::{self, Document};
use crate::pipeline::ParamValue;
pub use crate::span::Span;
use crate::store::ShadowFigures;

/// The keys of the config file that are sections the server reads itself; the file's other keys
/// are flat settings, one per `SENTIFLOW_<NAME>` variable.
pub const SECTIONS: [&str; 2] = ["retrain", "promotion"];

/// An event that starts a retraining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RetrainOn {
    /// A drift evaluation of a served model is `alert`.
    #[value(name = "drift_alert")]
    DriftAlert,
}

/// The `retrain:` section: which pipeline to train by itself, when, and how often at most.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainPolicy {
    /// A pipeline of the pipelines directory.
    pub pipeline: String,
    /// Parameter overrides, as `POST /training` takes them.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
    /// Events that start a run.
    #[serde(default)]
    pub on: Vec<RetrainOn>,
    /// A run this long after the last scheduled one (or after the server started).
    #[serde(default)]
    pub every: Option<Span>,
    /// Automatic runs of the pipeline start at least this long apart, whatever started them.
    #[serde(default = "default_cooldown")]
    pub cooldown: Span,
}

pub fn default_cooldown() -> Span {
    Span(Duration::from_secs(6 * 3600))
}

/// When set, a trained bundle becomes a candidate and is promoted only when its shadow figures meet these.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromotionGate {
    /// Shadowed predictions at least.
    #[serde(default = "default_min_shadow")]
    pub min_shadow: u64,
    /// Share of shadowed predictions whose label differs from production's, at most.
    #[serde(default = "default_max_disagreement")]
    pub max_disagreement: f64,
    /// Shadowed predictions with feedback at least.
    #[serde(default)]
    pub min_feedback: u64,
    /// Candidate accuracy minus production accuracy on those, at least.
    #[serde(default)]
    pub min_accuracy_gain: f64,
}

fn default_min_shadow() -> u64 {
    500
}

fn default_max_disagreement() -> f64 {
    0.15
}

impl Default for PromotionGate {
    fn default() -> Self {
        PromotionGate {
            min_shadow: default_min_shadow(),
            max_disagreement: default_max_disagreement(),
            min_feedback: 0,
            min_accuracy_gain: 0.0,
        }
    }
}

/// Whether a candidate's figures meet the gate, and which conditions they fail.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct GateVerdict {
    pub met: bool,
    pub failed: Vec<FailedCondition>,
}

/// A condition of the gate that the figures do not meet (yet).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct FailedCondition {
    /// The gate's setting: `min_shadow`, `max_disagreement`, `min_feedback` or `min_accuracy_gain`.
    pub condition: &'static str,
    pub wanted: f64,
    /// The figure now; null while it cannot be measured (no shadowed prediction, no feedback).
    pub actual: Option<f64>,
    pub message: String,
}

impl PromotionGate {
    pub fn check(&self, f: &ShadowFigures) -> GateVerdict {
        let mut failed = Vec::new();
        if f.shadowed < self.min_shadow {
            failed.push(FailedCondition {
                condition: "min_shadow",
                wanted: self.min_shadow as f64,
                actual: Some(f.shadowed as f64),
                message: format!(
                    "{} predictions shadowed of the {} wanted (--promotion-min-shadow); send more traffic",
                    f.shadowed, self.min_shadow
                ),
            });
        }
        // Unknown disagreement fails: a candidate is never promoted on no evidence.
        if f.disagreement.is_none_or(|d| d > self.max_disagreement) {
            failed.push(FailedCondition {
                condition: "max_disagreement",
                wanted: self.max_disagreement,
                actual: f.disagreement,
                message: match f.disagreement {
                    Some(d) => format!(
                        "the candidate's label differs from production's on {:.1}% of shadowed predictions; at most {:.1}% \
                         is allowed (--promotion-max-disagreement)",
                        d * 100.0,
                        self.max_disagreement * 100.0
                    ),
                    None => "no prediction shadowed yet".into(),
                },
            });
        }
        if f.feedback < self.min_feedback {
            failed.push(FailedCondition {
                condition: "min_feedback",
                wanted: self.min_feedback as f64,
                actual: Some(f.feedback as f64),
                message: format!(
                    "{} shadowed predictions have feedback of the {} wanted (--promotion-min-feedback); send \
                     `POST /feedback` for more",
                    f.feedback, self.min_feedback
                ),
            });
        }
        let gain_wanted = self.min_feedback > 0 || self.min_accuracy_gain != 0.0;
        if gain_wanted && f.accuracy_gain.is_none_or(|g| g < self.min_accuracy_gain) {
            failed.push(FailedCondition {
                condition: "min_accuracy_gain",
                wanted: self.min_accuracy_gain,
                actual: f.accuracy_gain,
                message: match f.accuracy_gain {
                    Some(g) => format!(
                        "the candidate is {:+.3} more accurate than production on shadowed predictions with feedback; \
                         {:+.3} is wanted (--promotion-min-accuracy-gain)",
                        g, self.min_accuracy_gain
                    ),
                    None => "no shadowed prediction has feedback yet".into(),
                },
            });
        }
        GateVerdict {
            met: failed.is_empty(),
            failed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading the config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {message}")]
    At {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "--retrain-on, --retrain-every and --retrain-cooldown need a pipeline: set `retrain.pipeline` in the config \
         file, or --retrain-pipeline"
    )]
    NoPipeline,
}

/// The sections of a config file.
#[derive(Debug, Default)]
pub struct Sections {
    pub retrain: Option<RetrainPolicy>,
    pub promotion: Option<PromotionGate>,
}

impl Sections {
    /// Reads the sections of the config file at `path`; a wrong or unknown key is reported at
    /// its `file:line:col`.
    pub fn load(path: &Path) -> Result<Sections, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: file.clone(),
            source,
        })?;
        let doc = yaml::parse(&text).map_err(|e| PolicyError::At {
            file: file.clone(),
            line: e.pos.line,
            col: e.pos.col,
            message: e.message,
        })?;
        Ok(Sections {
            retrain: section(&file, &doc, "retrain")?,
            promotion: section(&file, &doc, "promotion")?,
        })
    }
}

/// Section `name` of `doc` as `T`, errors at their position (as pipeline files report them).
fn section<T: DeserializeOwned>(file: &str, doc: &Document, name: &str) -> Result<Option<T>, PolicyError> {
    yaml::section(doc, name).map_err(|(pos, message)| PolicyError::At {
        file: file.to_string(),
        line: pos.line,
        col: pos.col,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_typed_and_an_unknown_key_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serve.yaml");
        std::fs::write(
            &file,
            "admin_rps: 5\nretrain:\n  pipeline: imdb\n  params: {seed: 7}\n  on: [drift_alert]\n  every: 7d\npromotion: {}\n",
        )
        .unwrap();
        let s = Sections::load(&file).unwrap();
        let r = s.retrain.unwrap();
        assert_eq!(r.on, [RetrainOn::DriftAlert]);
        assert_eq!(r.every, Some(Span(Duration::from_secs(7 * 86_400))));
        assert_eq!(r.cooldown, default_cooldown());
        let gate = s.promotion.unwrap();
        assert_eq!((gate.min_shadow, gate.max_disagreement), (500, 0.15));

        std::fs::write(&file, "retrain:\n  pipeline: imdb\n  cooldwn: 1h\n").unwrap();
        let e = Sections::load(&file).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:3:3: ", file.display())), "{e}");
        assert!(e.contains("unknown field `cooldwn`") && e.contains("`cooldown`"), "{e}");
        std::fs::write(
            &file,
            "retrain:\n  pipeline: imdb\n  every: 2s\n  cooldown: 100000000d\n",
        )
        .unwrap();
        let e = Sections::load(&file).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:4:", file.display())), "{e}");
        assert!(e.contains("at most 3650d"), "{e}");
        std::fs::write(&file, "promotion:\n  min_shadow: 5\n  max_disagrement: 0.1\n").unwrap();
        let e = Sections::load(&file).unwrap_err().to_string();
        assert!(e.contains(":3:3: ") && e.contains("max_disagrement"), "{e}");
    }

    fn figures(shadowed: u64, disagreement: f64) -> ShadowFigures {
        ShadowFigures {
            shadowed,
            agreement: Some(1.0 - disagreement),
            disagreement: Some(disagreement),
            ..ShadowFigures::default()
        }
    }

    #[test]
    fn the_gate_names_each_failed_condition() {
        let gate = PromotionGate {
            min_shadow: 200,
            max_disagreement: 0.15,
            ..PromotionGate::default()
        };
        assert!(gate.check(&figures(250, 0.02)).met);
        let v = gate.check(&figures(120, 0.02));
        assert_eq!(v.failed.len(), 1);
        assert_eq!(v.failed[0].condition, "min_shadow");
        assert_eq!(v.failed[0].actual, Some(120.0));
        let flipped = gate.check(&figures(900, 0.97));
        assert!(!flipped.met);
        assert_eq!(flipped.failed[0].condition, "max_disagreement");
        assert!(!gate.check(&ShadowFigures::default()).met, "no evidence, no promotion");
        let strict = PromotionGate {
            min_feedback: 10,
            min_accuracy_gain: 0.01,
            ..gate
        };
        let names: Vec<_> = strict
            .check(&figures(250, 0.02))
            .failed
            .iter()
            .map(|f| f.condition)
            .collect();
        assert_eq!(names, ["min_feedback", "min_accuracy_gain"]);
    }
}
