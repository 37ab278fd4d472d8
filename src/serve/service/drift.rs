//! Drift monitoring in the server: each served model keeps a rolling window of its recent
//! predictions and of labelled feedback; `GET /drift` and `/metrics` compare it with the bundle's
//! reference, and every period an evaluation is stored (and sent to MLflow when tracking is on)
//! together with the predictions made since the last one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use schemars::JsonSchema;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::drift::{Sample, Status, WindowReport};
use crate::store::{DriftRecord, PredictionRow};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The rolling window of one served model.
pub struct Monitor {
    window: Mutex<(VecDeque<Sample>, VecDeque<bool>)>,
    pub size: usize,
}

impl Monitor {
    pub fn new(size: usize) -> Monitor {
        Monitor {
            window: Mutex::new((VecDeque::new(), VecDeque::new())),
            size: size.max(1),
        }
    }

    pub fn record(&self, samples: &[Sample]) {
        let mut w = lock(&self.window);
        for s in samples {
            if w.0.len() == self.size {
                w.0.pop_front();
            }
            w.0.push_back(*s);
        }
    }

    pub fn feedback(&self, correct: bool) {
        let mut w = lock(&self.window);
        if w.1.len() == self.size {
            w.1.pop_front();
        }
        w.1.push_back(correct);
    }

    pub fn snapshot(&self) -> (Vec<Sample>, Vec<bool>) {
        let w = lock(&self.window);
        (w.0.iter().copied().collect(), w.1.iter().copied().collect())
    }
}

/// A prediction a client may send feedback about.
#[derive(Clone)]
pub struct Made {
    pub model: String,
    pub version: String,
    pub label: &'static str,
}

/// Recent predictions by id (bounded), and those not yet written to the database (bounded too:
/// past the bound, a period's further predictions are counted, not stored).
#[derive(Default)]
pub struct Journal {
    recent: Mutex<(HashMap<String, Made>, VecDeque<String>)>,
    unsaved: Mutex<(Vec<PredictionRow>, u64)>,
}

/// How many predictions `POST /feedback` finds without the database, and how many one period
/// stores at most.
pub const RECENT: usize = 100_000;

impl Journal {
    pub fn add(&self, id: String, made: Made, sample: &Sample, text: &str, keep_text: bool) {
        let row = PredictionRow {
            id: id.clone(),
            model: made.model.clone(),
            version: made.version.clone(),
            score: sample.score,
            label: made.label.to_string(),
            text_sha256: hex::encode(Sha256::digest(text.as_bytes())),
            text: keep_text.then(|| text.to_string()),
            chars: sample.chars,
        };
        {
            let mut r = lock(&self.recent);
            if r.1.len() == RECENT {
                if let Some(old) = r.1.pop_front() {
                    r.0.remove(&old);
                }
            }
            r.1.push_back(id.clone());
            r.0.insert(id, made);
        }
        let mut unsaved = lock(&self.unsaved);
        if unsaved.0.len() < RECENT {
            unsaved.0.push(row);
        } else {
            unsaved.1 += 1;
        }
    }

    pub fn find(&self, id: &str) -> Option<Made> {
        lock(&self.recent).0.get(id).cloned()
    }

    /// The rows to store, and how many predictions were past the bound.
    pub fn take_unsaved(&self) -> (Vec<PredictionRow>, u64) {
        std::mem::take(&mut *lock(&self.unsaved))
    }
}

/// The drift of one served model: its window's report, or why it has none.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ModelDrift {
    Window(Box<WindowReport>),
    NoReference(NoReference),
}

/// A served model whose bundle has no drift reference: it is not judged.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct NoReference {
    pub version: String,
    /// Always `ok`.
    pub status: Status,
    /// Always false.
    pub judged: bool,
    pub note: String,
}

/// The body of `GET /drift`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DriftOverview {
    /// Served models by name.
    pub models: BTreeMap<String, ModelDrift>,
    /// The latest stored evaluations, newest first (with `?history=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<DriftRecord>>,
}

/// The drift report as Prometheus gauges, computed at scrape time: each statistic's value and
/// status (0 ok, 1 warn, 2 alert), by model.
#[derive(Debug)]
pub struct Gauges(pub DriftOverview);

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut values: Vec<(&str, &str, f64)> = Vec::new();
        let mut statuses: Vec<(&str, &str, Status)> = Vec::new();
        for (model, drift) in &self.0.models {
            let r = match drift {
                ModelDrift::Window(w) => &w.report,
                ModelDrift::NoReference(n) => {
                    statuses.push((model, "overall", n.status));
                    continue;
                }
            };
            statuses.push((model, "overall", r.status));
            values.push((model, "samples", r.samples as f64));
            for (stat, s) in r.statistics.iter() {
                values.push((model, stat, s.value));
                statuses.push((model, stat, s.status));
            }
            if let Some(a) = &r.performance.rolling {
                values.push((model, "accuracy", a.accuracy));
                statuses.push((model, "accuracy", a.status));
            }
        }
        // Each family's samples follow its own HELP and TYPE lines.
        if !values.is_empty() {
            let mut family = encoder.encode_descriptor(
                "sentiflow_drift_value",
                "Drift statistics of the rolling window against the bundle's reference.",
                None,
                MetricType::Gauge,
            )?;
            for (model, statistic, value) in values {
                ConstGauge::new(value).encode(family.encode_family(&[("model", model), ("statistic", statistic)])?)?;
            }
        }
        if !statuses.is_empty() {
            let mut family = encoder.encode_descriptor(
                "sentiflow_drift_status",
                "Drift status: 0 ok, 1 warn, 2 alert.",
                None,
                MetricType::Gauge,
            )?;
            for (model, statistic, status) in statuses {
                ConstGauge::new(status.level())
                    .encode(family.encode_family(&[("model", model), ("statistic", statistic)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drift_body_has_a_json_schema() {
        let schema = serde_json::to_value(schemars::schema_for!(DriftOverview)).unwrap();
        assert_eq!(schema["required"], serde_json::json!(["models"]), "{schema}");
        let defs = schema["$defs"].as_object().unwrap();
        for name in [
            "ModelDrift",
            "WindowReport",
            "NoReference",
            "Statistic",
            "Status",
            "DriftRecord",
        ] {
            assert!(defs.contains_key(name), "no {name} in {schema}");
        }
        let window = &defs["WindowReport"]["properties"];
        for field in ["status", "samples", "statistics", "performance", "version", "window"] {
            assert!(window[field].is_object(), "no {field} in {window}");
        }
        assert_eq!(defs["Status"]["enum"], serde_json::json!(["ok", "warn", "alert"]));
    }
}
