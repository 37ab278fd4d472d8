//! The server's settings: every flag is also an environment variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::policy::{default_cooldown, PolicyError, PromotionGate, RetrainOn, RetrainPolicy, Sections, Span};
use crate::models::bert::{Device, Runtime};
use crate::objects::{is_url, Objects, ObjectsError};
use crate::registry::Registry;
use crate::store::sql::Location;

/// Server settings; every flag is also an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SENTIFLOW_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// The database: a SQLite file, or a `postgres://user:password@host/db` URL that several
    /// replicas share [default: <project root>/sentiflow.db].
    #[arg(long, env = "SENTIFLOW_DB")]
    pub db: Option<String>,
    /// PostgreSQL: connections the server keeps at most.
    #[arg(long, env = "SENTIFLOW_DB_POOL", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool: u32,
    /// Where the registry keeps its copy of each registered bundle: a directory, or object
    /// storage, `s3://BUCKET/PREFIX` (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) or `file:///DIR` [default: `registry/`
    /// beside a SQLite database, `<project root>/registry` with PostgreSQL].
    #[arg(long, env = "SENTIFLOW_ARTIFACTS", value_name = "DIR|URL")]
    pub artifacts: Option<String>,
    /// With `--artifacts` in object storage: where this server keeps the versions it downloads
    /// from there, each once [default: <project root>/registry-cache].
    #[arg(long, env = "SENTIFLOW_ARTIFACTS_CACHE")]
    pub artifacts_cache: Option<PathBuf>,
    /// This server's name in the database: its training runs and drift evaluations carry it
    /// [default: <host name>:<port>].
    #[arg(long, env = "SENTIFLOW_REPLICA")]
    pub replica: Option<String>,
    /// Seconds a training run stays `running` without its server renewing it; a run whose
    /// server died is then recorded as interrupted by any other server of the database.
    #[arg(long, env = "SENTIFLOW_RUN_LEASE_S", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(3..))]
    pub run_lease_s: u64,
    /// Directory of the pipelines `POST /training` may run; its parent is the project root.
    #[arg(long, env = "SENTIFLOW_PIPELINES", default_value = "pipelines")]
    pub pipelines: PathBuf,
    /// Requests per second (and burst) for each `predict` key.
    #[arg(long, env = "SENTIFLOW_PREDICT_RPS", default_value_t = 1000)]
    pub predict_rps: u32,
    /// Requests per second (and burst) for each `admin` key.
    #[arg(long, env = "SENTIFLOW_ADMIN_RPS", default_value_t = 50)]
    pub admin_rps: u32,
    /// Let `POST /prediction` through without a key (for demos); rate-limited as one key.
    #[arg(long, env = "SENTIFLOW_OPEN_PREDICTION")]
    pub open_prediction: bool,
    /// Do not promote a newly trained model automatically when it beats production.
    #[arg(long, env = "SENTIFLOW_NO_AUTO_PROMOTE")]
    pub no_auto_promote: bool,
    /// Most texts in one `POST /prediction`.
    #[arg(long, env = "SENTIFLOW_MAX_BATCH", default_value_t = 64)]
    pub max_batch: usize,
    /// Longest text accepted, in characters.
    #[arg(long, env = "SENTIFLOW_MAX_TEXT_CHARS", default_value_t = 100_000)]
    pub max_text_chars: usize,
    /// ONNX models: how long to gather concurrent requests into one batch, in milliseconds
    /// (0: each request runs alone).
    #[arg(long, env = "SENTIFLOW_BATCH_WINDOW_MS", default_value_t = 5)]
    pub batch_window_ms: u64,
    /// ONNX models: texts per batch at most.
    #[arg(long, env = "SENTIFLOW_BATCH_MAX_TEXTS", default_value_t = 32)]
    pub batch_max_texts: usize,
    /// ONNX models: requests waiting at most; beyond it `POST /prediction` answers 503.
    #[arg(long, env = "SENTIFLOW_BATCH_QUEUE", default_value_t = 256)]
    pub batch_queue: usize,
    /// ONNX Runtime threads per model (0: ONNX Runtime's default, one per core).
    #[arg(long, env = "SENTIFLOW_ONNX_THREADS", default_value_t = 0)]
    pub onnx_threads: usize,
    /// ONNX models: where they run, `cpu` or `cuda[:N]` (an NVIDIA GPU).
    #[arg(long, env = "SENTIFLOW_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Drift monitoring: recent predictions (and feedback labels) each model's window holds.
    #[arg(long, env = "SENTIFLOW_DRIFT_WINDOW", default_value_t = 1000)]
    pub drift_window: usize,
    /// Drift monitoring: seconds between stored evaluations.
    #[arg(long, env = "SENTIFLOW_DRIFT_PERIOD_S", default_value_t = 60)]
    pub drift_period_s: u64,
    /// Connections open at most; one more is answered `503` and closed.
    #[arg(long, env = "SENTIFLOW_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client has to send a request's headers, from their first byte.
    #[arg(long, env = "SENTIFLOW_HEADER_TIMEOUT_S", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_s: u64,
    /// Seconds a connection may send and receive nothing (between requests, or stalled in one)
    /// before it is closed; keep it above the idle timeout of a load balancer in front.
    #[arg(long, env = "SENTIFLOW_IDLE_TIMEOUT_S", default_value_t = 75,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_s: u64,
    /// Requests with an unknown API key from one address before it is refused (`429`) for the
    /// rest of `--auth-fail-window-s` (0: never).
    #[arg(long, env = "SENTIFLOW_AUTH_FAIL_LIMIT", default_value_t = 10)]
    pub auth_fail_limit: u32,
    /// Seconds over which `--auth-fail-limit` counts, from an address's first unknown key.
    #[arg(long, env = "SENTIFLOW_AUTH_FAIL_WINDOW_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_fail_window_s: u64,
    /// Store the texts of predictions in the database (otherwise only their SHA-256).
    #[arg(long, env = "SENTIFLOW_STORE_TEXTS")]
    pub store_texts: bool,
    /// Directories outside the project root that trainings started through the API may read
    /// (`:`-separated); the project root is always allowed.
    #[arg(long, env = "SENTIFLOW_DATA_DIRS", value_delimiter = ':')]
    pub data_dirs: Vec<PathBuf>,
    /// Stored predictions kept at most (the newest); older ones, and their feedback, are
    /// deleted at each drift evaluation.
    #[arg(long, env = "SENTIFLOW_KEEP_PREDICTIONS", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_predictions: u64,
    /// Nice value of training runs started through the API (0 to 19): their threads, and the
    /// programs their stages start, yield the CPU to requests.
    #[arg(long, env = "SENTIFLOW_TRAINING_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub training_nice: i32,
    /// Promotion gate: shadowed predictions a candidate needs at least [default: 500]. Any
    /// `--promotion-*` setting turns the gate on: a newly registered version of a served name
    /// becomes its candidate, scored beside production, and is promoted when its figures meet
    /// the gate.
    #[arg(long, env = "SENTIFLOW_PROMOTION_MIN_SHADOW")]
    pub promotion_min_shadow: Option<u64>,
    /// Promotion gate: share of shadowed predictions whose label differs from production's, at
    /// most [default: 0.15].
    #[arg(long, env = "SENTIFLOW_PROMOTION_MAX_DISAGREEMENT", value_parser = share)]
    pub promotion_max_disagreement: Option<f64>,
    /// Promotion gate: shadowed predictions with feedback at least [default: 0].
    #[arg(long, env = "SENTIFLOW_PROMOTION_MIN_FEEDBACK")]
    pub promotion_min_feedback: Option<u64>,
    /// Promotion gate: candidate accuracy minus production accuracy on shadowed predictions with
    /// feedback, at least [default: 0].
    #[arg(long, env = "SENTIFLOW_PROMOTION_MIN_ACCURACY_GAIN", allow_hyphen_values = true)]
    pub promotion_min_accuracy_gain: Option<f64>,
    /// Percentage of a name's predictions its candidate also scores, in the background.
    #[arg(long, env = "SENTIFLOW_SHADOW_PERCENT", default_value_t = 100,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub shadow_percent: u8,
    /// Predictions waiting to be shadowed at most; past it they are dropped and counted
    /// (`sentiflow_shadow_dropped_total`), never delayed.
    #[arg(long, env = "SENTIFLOW_SHADOW_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub shadow_queue: u64,
    /// Days stored predictions, their feedback and drift evaluations are kept.
    #[arg(long, env = "SENTIFLOW_KEEP_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_days: u32,
    /// Retraining policy: the pipeline the server trains by itself (overrides `retrain.pipeline`
    /// of the `--config` file).
    #[arg(long, env = "SENTIFLOW_RETRAIN_PIPELINE", value_name = "NAME")]
    pub retrain_pipeline: Option<String>,
    /// Retraining policy: events that start a run, `drift_alert` (overrides `retrain.on`).
    #[arg(long, env = "SENTIFLOW_RETRAIN_ON", value_delimiter = ',', value_name = "EVENT")]
    pub retrain_on: Vec<RetrainOn>,
    /// Retraining policy: a run this long after the last scheduled one, e.g. `7d` (overrides
    /// `retrain.every`).
    #[arg(long, env = "SENTIFLOW_RETRAIN_EVERY", value_name = "DURATION")]
    pub retrain_every: Option<Span>,
    /// Retraining policy: automatic runs start at least this long apart, e.g. `6h` (overrides
    /// `retrain.cooldown`; default 6h).
    #[arg(long, env = "SENTIFLOW_RETRAIN_COOLDOWN", value_name = "DURATION")]
    pub retrain_cooldown: Option<Span>,
    /// The retraining policy, settled from the config file and the flags above.
    #[arg(skip)]
    pub retrain: Option<RetrainPolicy>,
    /// The promotion gate, settled from the config file's `promotion:` section and the
    /// `--promotion-*` flags.
    #[arg(skip)]
    pub promotion: Option<PromotionGate>,
}

impl Config {
    pub fn root(&self) -> PathBuf {
        project_root(&self.pipelines)
    }

    pub fn runtime(&self) -> Runtime {
        Runtime {
            threads: self.onnx_threads,
            device: self.device,
        }
    }

    pub fn db(&self) -> Location {
        db_location(self.db.as_deref(), &self.pipelines)
    }

    /// The registry of `--artifacts`, over object storage when it is a URL.
    pub fn registry(&self) -> Result<Registry, ObjectsError> {
        let (dir, objects) = match (&self.artifacts, self.db()) {
            (Some(url), _) if is_url(url) => (
                self.artifacts_cache
                    .clone()
                    .unwrap_or_else(|| self.root().join("registry-cache")),
                Some(Objects::open(url, "artifact store")?),
            ),
            (Some(dir), _) => (PathBuf::from(dir), None),
            (None, Location::Sqlite(path)) => (path.parent().unwrap_or(Path::new(".")).join("registry"), None),
            (None, Location::Postgres(_)) => (self.root().join("registry"), None),
        };
        Ok(Registry::new(dir, objects, self.runtime()))
    }

    /// The name this server's runs and drift evaluations carry: unique among live servers (one
    /// process per host and port), and the same after a restart, so a restarted server knows its
    /// own unfinished runs.
    pub fn replica(&self) -> String {
        self.replica
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), self.addr.port()))
    }

    /// The promotion gate of `file` (the config file's `promotion:` section) with the
    /// `--promotion-*` flags over it; any of them turns the gate on, the others taking the
    /// file's values or the defaults.
    pub fn promotion_over(&self, file: Option<PromotionGate>) -> Option<PromotionGate> {
        let flagged = self.promotion_min_shadow.is_some()
            || self.promotion_max_disagreement.is_some()
            || self.promotion_min_feedback.is_some()
            || self.promotion_min_accuracy_gain.is_some();
        if !flagged {
            return file;
        }
        let d = file.unwrap_or_default();
        Some(PromotionGate {
            min_shadow: self.promotion_min_shadow.unwrap_or(d.min_shadow),
            max_disagreement: self.promotion_max_disagreement.unwrap_or(d.max_disagreement),
            min_feedback: self.promotion_min_feedback.unwrap_or(d.min_feedback),
            min_accuracy_gain: self.promotion_min_accuracy_gain.unwrap_or(d.min_accuracy_gain),
        })
    }

    pub fn run_lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.run_lease_s)
    }
}

/// A share between 0 and 1.
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a share between 0 and 1 (e.g. 0.15)")),
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The project root: the parent of the pipelines directory.
fn project_root(pipelines: &Path) -> PathBuf {
    let abs = std::path::absolute(pipelines).unwrap_or_else(|_| pipelines.to_path_buf());
    abs.parent().map(Path::to_path_buf).unwrap_or(abs)
}

/// The database: `db` (a path or a `postgres://` URL), else `sentiflow.db` in the project root.
pub fn db_location(db: Option<&str>, pipelines: &Path) -> Location {
    db.map(Location::parse)
        .unwrap_or_else(|| Location::Sqlite(project_root(pipelines).join("sentiflow.db")))
}

/// Settles the policy and the gate of `config` from the file's `sections` and the flags.
pub fn settle(config: &mut Config, sections: Sections) -> Result<(), PolicyError> {
    let mut retrain = sections.retrain;
    if let Some(pipeline) = &config.retrain_pipeline {
        retrain
            .get_or_insert_with(|| RetrainPolicy {
                pipeline: pipeline.clone(),
                params: BTreeMap::new(),
                on: Vec::new(),
                every: None,
                cooldown: default_cooldown(),
            })
            .pipeline = pipeline.clone();
    }
    match &mut retrain {
        Some(r) => {
            if !config.retrain_on.is_empty() {
                r.on = config.retrain_on.clone();
            }
            if let Some(every) = config.retrain_every {
                r.every = Some(every);
            }
            if let Some(cooldown) = config.retrain_cooldown {
                r.cooldown = cooldown;
            }
        }
        None if !config.retrain_on.is_empty()
            || config.retrain_every.is_some()
            || config.retrain_cooldown.is_some() =>
        {
            return Err(PolicyError::NoPipeline)
        }
        None => {}
    }
    config.retrain = retrain;
    config.promotion = config.promotion_over(sections.promotion);
    Ok(())
}
