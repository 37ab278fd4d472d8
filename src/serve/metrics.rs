//! Prometheus metrics, kept in memory and rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    predictions: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    training: Mutex<BTreeMap<String, u64>>,
    /// Model → (batches run, texts in them), for the ONNX batching workers.
    batches: Mutex<BTreeMap<String, (u64, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((route.to_string(), status)).or_default() += 1;
        let mut latency = lock(&self.latency);
        let h = latency.entry(route.to_string()).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    pub fn prediction(&self, model: &str, version: &str, label: &'static str) {
        *lock(&self.predictions)
            .entry((model.to_string(), version.to_string(), label))
            .or_default() += 1;
    }

    pub fn training(&self, outcome: &str) {
        *lock(&self.training).entry(outcome.to_string()).or_default() += 1;
    }

    pub fn batch(&self, model: &str, texts: usize) {
        let mut batches = lock(&self.batches);
        let entry = batches.entry(model.to_string()).or_default();
        entry.0 += 1;
        entry.1 += texts as u64;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP sentiflow_requests_total HTTP requests by route and status.\n# TYPE sentiflow_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "sentiflow_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP sentiflow_request_duration_seconds HTTP request latency by route.\n# TYPE sentiflow_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "sentiflow_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "sentiflow_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "sentiflow_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sentiflow_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP sentiflow_predictions_total Predictions by model, version and label.\n# TYPE sentiflow_predictions_total counter\n");
        for ((model, version, label), n) in lock(&self.predictions).iter() {
            let _ = writeln!(
                out,
                "sentiflow_predictions_total{{model=\"{model}\",version=\"{version}\",label=\"{label}\"}} {n}"
            );
        }
        out.push_str("# HELP sentiflow_training_runs_total Training runs by outcome.\n# TYPE sentiflow_training_runs_total counter\n");
        for (outcome, n) in lock(&self.training).iter() {
            let _ = writeln!(out, "sentiflow_training_runs_total{{outcome=\"{outcome}\"}} {n}");
        }
        out.push_str("# HELP sentiflow_onnx_batches_total Batches run by each ONNX model's worker.\n# TYPE sentiflow_onnx_batches_total counter\n");
        out.push_str("# HELP sentiflow_onnx_batch_texts_total Texts in those batches.\n# TYPE sentiflow_onnx_batch_texts_total counter\n");
        for (model, (batches, texts)) in lock(&self.batches).iter() {
            let _ = writeln!(out, "sentiflow_onnx_batches_total{{model=\"{model}\"}} {batches}");
            let _ = writeln!(out, "sentiflow_onnx_batch_texts_total{{model=\"{model}\"}} {texts}");
        }
        out
    }
}
