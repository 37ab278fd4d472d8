//! Prometheus metrics, kept in a registry and rendered in the text exposition format (0.0.4).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PredictionLabels {
    model: String,
    version: String,
    label: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetrainLabels {
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    timeout: &'static str,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Which timeout closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timeout {
    /// A request's headers took too long.
    Header,
    /// Nothing was sent either way for too long.
    Idle,
}

impl Timeout {
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::Idle => "idle",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
    predictions: Family<PredictionLabels, Counter>,
    training: Family<OutcomeLabels, Counter>,
    /// The retraining policy's decisions, by trigger and outcome.
    retrain: Family<RetrainLabels, Counter>,
    /// Batches run by the ONNX batching workers, and texts in them, by model.
    batches: Family<ModelLabels, Counter>,
    batch_texts: Family<ModelLabels, Counter>,
    open_connections: Gauge,
    /// Connections refused because `--max-connections` were open.
    refused_connections: Counter,
    timeouts: Family<TimeoutLabels, Counter>,
    /// Requests refused because their address sent too many unknown API keys.
    auth_throttled: Counter,
    /// Database writes that failed without failing a request, by what was written.
    store_failures: Family<WhatLabels, Counter>,
    /// Predictions in the database after the last pruning.
    stored_predictions: Gauge,
    /// Texts a candidate did not score because the shadow queue was full.
    shadow_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency: LatencyFamily = Family::new_with_constructor(|| Histogram::new(BUCKETS));
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            latency,
            predictions: Family::default(),
            training: Family::default(),
            retrain: Family::default(),
            batches: Family::default(),
            batch_texts: Family::default(),
            open_connections: Gauge::default(),
            refused_connections: Counter::default(),
            timeouts: Family::default(),
            auth_throttled: Counter::default(),
            store_failures: Family::default(),
            stored_predictions: Gauge::default(),
            shadow_dropped: Counter::default(),
        };
        // Counters are registered without `_total`: the encoder appends it.
        let r = &mut m.registry;
        r.register(
            "sentiflow_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "sentiflow_request_duration_seconds",
            "HTTP request latency by route",
            m.latency.clone(),
        );
        r.register(
            "sentiflow_predictions",
            "Predictions by model, version and label",
            m.predictions.clone(),
        );
        r.register(
            "sentiflow_training_runs",
            "Training runs by outcome",
            m.training.clone(),
        );
        r.register(
            "sentiflow_retrain",
            "Retraining policy decisions by trigger (drift, schedule) and outcome (started, cooldown, busy, failed)",
            m.retrain.clone(),
        );
        r.register(
            "sentiflow_store_write_failures",
            "Database writes that failed and were skipped, by what was written",
            m.store_failures.clone(),
        );
        r.register(
            "sentiflow_stored_predictions",
            "Predictions kept in the database (see the retention settings)",
            m.stored_predictions.clone(),
        );
        r.register(
            "sentiflow_onnx_batches",
            "Batches run by each ONNX model's worker",
            m.batches.clone(),
        );
        r.register(
            "sentiflow_onnx_batch_texts",
            "Texts in those batches",
            m.batch_texts.clone(),
        );
        r.register(
            "sentiflow_open_connections",
            "HTTP connections open",
            m.open_connections.clone(),
        );
        r.register(
            "sentiflow_refused_connections",
            "Connections refused because --max-connections were open",
            m.refused_connections.clone(),
        );
        r.register(
            "sentiflow_connection_timeouts",
            "Connections closed by the header or the idle timeout",
            m.timeouts.clone(),
        );
        r.register(
            "sentiflow_auth_throttled",
            "Requests refused (429) because their address sent too many unknown API keys",
            m.auth_throttled.clone(),
        );
        r.register(
            "sentiflow_shadow_dropped",
            "Texts a candidate did not score because the shadow queue was full (--shadow-queue)",
            m.shadow_dropped.clone(),
        );
        r.register_collector(Box::new(Process));
        m
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        let route = route.to_string();
        self.latency
            .get_or_create(&RouteLabels { route: route.clone() })
            .observe(seconds);
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    pub fn prediction(&self, model: &str, version: &str, label: &'static str) {
        let labels = PredictionLabels {
            model: model.to_string(),
            version: version.to_string(),
            label,
        };
        self.predictions.get_or_create(&labels).inc();
    }

    pub fn training(&self, outcome: &str) {
        let labels = OutcomeLabels {
            outcome: outcome.to_string(),
        };
        self.training.get_or_create(&labels).inc();
    }

    pub fn retrain(&self, trigger: &'static str, outcome: &'static str) {
        self.retrain.get_or_create(&RetrainLabels { trigger, outcome }).inc();
    }

    /// A database write that failed and was skipped (logged by the caller).
    pub fn store_failure(&self, what: &'static str) {
        self.store_failures.get_or_create(&WhatLabels { what }).inc();
    }

    pub fn stored_predictions(&self, n: u64) {
        self.stored_predictions.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn batch(&self, model: &str, texts: usize) {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        self.batches.get_or_create(&labels).inc();
        self.batch_texts.get_or_create(&labels).inc_by(texts as u64);
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub fn connection_refused(&self) {
        self.refused_connections.inc();
    }

    pub fn connection_timed_out(&self, timeout: Timeout) {
        let labels = TimeoutLabels {
            timeout: timeout.as_str(),
        };
        self.timeouts.get_or_create(&labels).inc();
    }

    pub fn shadow_dropped(&self, texts: u64) {
        self.shadow_dropped.inc_by(texts);
    }

    pub fn auth_throttled(&self) {
        self.auth_throttled.inc();
    }

    /// Every metric, then those `scrape` computes now (in [`CONTENT_TYPE`]).
    pub fn render(&self, scrape: impl Collector) -> String {
        let mut out = String::new();
        let mut now = Registry::default();
        now.register_collector(Box::new(scrape));
        // Writing to a String cannot fail, and the text format has no end marker, so two
        // registries written one after the other are one valid exposition.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &now);
        out
    }
}

/// The standard `process_*` metrics of this process, read from `/proc/self` at each scrape
/// (nothing where there is no `/proc`).
#[derive(Debug)]
struct Process;

/// What `/proc/self/stat` says of this process.
#[derive(Debug, Default, PartialEq)]
struct Stat {
    /// User and system CPU time, in clock ticks.
    cpu_ticks: u64,
    /// Start time, in clock ticks after boot.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl Stat {
    fn parse(stat: &str) -> Option<Stat> {
        // The command name (field 2) is in parentheses and may hold spaces and parentheses.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
        // Field n of proc_pid_stat(5) is fields[n - 3].
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(Stat {
            cpu_ticks: field(14)? + field(15)?,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
            resident_pages: field(24)?,
        })
    }
}

/// The boot time (seconds since the epoch) in `/proc/stat`.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

fn gauge<N: EncodeGaugeValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| Stat::parse(&s))
        else {
            return Ok(());
        };
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        if ticks <= 0 || page <= 0 {
            return Ok(());
        }
        let ticks = ticks as f64;
        let cpu = ConstCounter::new(stat.cpu_ticks as f64 / ticks);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                fds.count() as u64,
            )?;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                limit.rlim_cur,
            )?;
        }
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.virtual_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.resident_pages * page as u64,
        )?;
        if let Some(boot) = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s)) {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.start_ticks as f64 / ticks,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_found_after_the_command_name() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 12345 987654 321 \
                    18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 3 0 0 0 0 0";
        let stat = Stat::parse(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                cpu_ticks: 300,
                start_ticks: 12345,
                virtual_bytes: 987654,
                resident_pages: 321,
            }
        );
        assert_eq!(Stat::parse("4242 (x) S 1"), None);
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn families_are_whole_and_named_as_before() {
        #[derive(Debug)]
        struct Nothing;
        impl Collector for Nothing {
            fn encode(&self, _: DescriptorEncoder) -> std::fmt::Result {
                Ok(())
            }
        }
        let m = Metrics::default();
        m.request("POST /prediction", 200, 0.003);
        m.request("POST /prediction", 200, 7.0);
        m.request("GET /health", 200, 0.0001);
        m.prediction("tf\"idf", "v1\n", "positive");
        m.store_failure("prune");
        m.batch("bert", 3);
        m.batch("bert", 5);
        m.connection_timed_out(Timeout::Idle);
        let text = m.render(Nothing);
        for line in [
            "# TYPE sentiflow_requests_total counter",
            "sentiflow_requests_total{route=\"POST /prediction\",status=\"200\"} 2",
            "sentiflow_request_duration_seconds_bucket{route=\"POST /prediction\",le=\"0.005\"} 1",
            "sentiflow_request_duration_seconds_bucket{route=\"POST /prediction\",le=\"5\"} 1",
            "sentiflow_request_duration_seconds_bucket{route=\"POST /prediction\",le=\"+Inf\"} 2",
            "sentiflow_request_duration_seconds_count{route=\"POST /prediction\"} 2",
            // Label values are escaped.
            "sentiflow_predictions_total{model=\"tf\\\"idf\",version=\"v1\\n\",label=\"positive\"} 1",
            "sentiflow_store_write_failures_total{what=\"prune\"} 1",
            "sentiflow_onnx_batches_total{model=\"bert\"} 2",
            "sentiflow_onnx_batch_texts_total{model=\"bert\"} 8",
            "sentiflow_connection_timeouts_total{timeout=\"idle\"} 1",
            "sentiflow_stored_predictions 0",
            "sentiflow_open_connections 0",
            "sentiflow_refused_connections_total 0",
            "sentiflow_auth_throttled_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        // Each family's samples directly follow its HELP and TYPE lines.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "{current} twice in\n{text}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| *f == current))
                    .unwrap_or(name);
                assert_eq!(family, current, "`{line}` outside its family in\n{text}");
            }
        }
        if cfg!(target_os = "linux") {
            assert!(seen.contains("process_resident_memory_bytes"), "{text}");
            assert!(seen.contains("process_cpu_seconds_total"), "{text}");
        }
    }
}
