//! Prometheus metrics, kept in memory and rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::listener::Timeout;

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
    open_connections: AtomicU64,
    /// Connections refused because `--max-connections` were open.
    refused_connections: AtomicU64,
    timeouts: Mutex<BTreeMap<Timeout, u64>>,
    /// Requests refused because their address sent too many unknown API keys.
    auth_throttled: AtomicU64,
    /// Database writes that failed without failing a request, by what was written.
    store_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Predictions in the database after the last pruning.
    stored_predictions: AtomicU64,
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

    /// A database write that failed and was skipped (logged by the caller).
    pub fn store_failure(&self, what: &'static str) {
        *lock(&self.store_failures).entry(what).or_default() += 1;
    }

    pub fn stored_predictions(&self, n: u64) {
        self.stored_predictions.store(n, Ordering::Relaxed);
    }

    pub fn batch(&self, model: &str, texts: usize) {
        let mut batches = lock(&self.batches);
        let entry = batches.entry(model.to_string()).or_default();
        entry.0 += 1;
        entry.1 += texts as u64;
    }

    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_refused(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_timed_out(&self, timeout: Timeout) {
        *lock(&self.timeouts).entry(timeout).or_default() += 1;
    }

    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Ordering::Relaxed);
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
        out.push_str("# HELP sentiflow_store_write_failures_total Database writes that failed and were skipped, by what was written.\n# TYPE sentiflow_store_write_failures_total counter\n");
        for (what, n) in lock(&self.store_failures).iter() {
            let _ = writeln!(out, "sentiflow_store_write_failures_total{{what=\"{what}\"}} {n}");
        }
        out.push_str("# HELP sentiflow_stored_predictions Predictions kept in the database (see the retention settings).\n# TYPE sentiflow_stored_predictions gauge\n");
        let _ = writeln!(
            out,
            "sentiflow_stored_predictions {}",
            self.stored_predictions.load(Ordering::Relaxed)
        );
        out.push_str("# HELP sentiflow_onnx_batches_total Batches run by each ONNX model's worker.\n# TYPE sentiflow_onnx_batches_total counter\n");
        out.push_str("# HELP sentiflow_onnx_batch_texts_total Texts in those batches.\n# TYPE sentiflow_onnx_batch_texts_total counter\n");
        for (model, (batches, texts)) in lock(&self.batches).iter() {
            let _ = writeln!(out, "sentiflow_onnx_batches_total{{model=\"{model}\"}} {batches}");
            let _ = writeln!(out, "sentiflow_onnx_batch_texts_total{{model=\"{model}\"}} {texts}");
        }
        out.push_str(
            "# HELP sentiflow_open_connections HTTP connections open.\n# TYPE sentiflow_open_connections gauge\n",
        );
        let _ = writeln!(
            out,
            "sentiflow_open_connections {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        out.push_str("# HELP sentiflow_refused_connections_total Connections refused because --max-connections were open.\n# TYPE sentiflow_refused_connections_total counter\n");
        let _ = writeln!(
            out,
            "sentiflow_refused_connections_total {}",
            self.refused_connections.load(Ordering::Relaxed)
        );
        out.push_str("# HELP sentiflow_connection_timeouts_total Connections closed by the header or the idle timeout.\n# TYPE sentiflow_connection_timeouts_total counter\n");
        for (timeout, n) in lock(&self.timeouts).iter() {
            let _ = writeln!(
                out,
                "sentiflow_connection_timeouts_total{{timeout=\"{}\"}} {n}",
                timeout.as_str()
            );
        }
        out.push_str("# HELP sentiflow_auth_throttled_total Requests refused (429) because their address sent too many unknown API keys.\n# TYPE sentiflow_auth_throttled_total counter\n");
        let _ = writeln!(
            out,
            "sentiflow_auth_throttled_total {}",
            self.auth_throttled.load(Ordering::Relaxed)
        );
        out
    }
}
