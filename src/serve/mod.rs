//! `sentiflow serve`: the HTTP API (warp on tokio) over the model registry, the bundles and the
//! pipeline engine.
//!
//! Every request goes through one handler that assigns a request id, authenticates, rate-limits,
//! dispatches and records metrics; every error leaves as `{"error": {code, message, request_id}}`.

mod auth;
mod batcher;
mod drift;
mod listener;
mod metrics;
mod openapi;
mod training;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::hyper::body::Bytes;
use warp::reply::Response;
use warp::Filter;

pub use auth::{create_key, KeyError, Role};

use crate::drift::Sample;
use crate::models::bert::{Device, Runtime};
use crate::models::bundle::{Bundle, Model, Prediction, LABELS};
use crate::store::{ModelRow, ModelStatus, Store, StoreError};
use batcher::{BatchConfig, BatchError, Batcher};
use metrics::Metrics;

/// Server settings; every flag is also an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SENTIFLOW_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// SQLite database [default: <project root>/sentiflow.db].
    #[arg(long, env = "SENTIFLOW_DB")]
    pub db: Option<PathBuf>,
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
    /// Days stored predictions, their feedback and drift evaluations are kept.
    #[arg(long, env = "SENTIFLOW_KEEP_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_days: u32,
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

    pub fn db_path(&self) -> PathBuf {
        db_path(self.db.as_deref(), &self.pipelines)
    }
}

/// The project root: the parent of the pipelines directory.
fn project_root(pipelines: &Path) -> PathBuf {
    let abs = std::path::absolute(pipelines).unwrap_or_else(|_| pipelines.to_path_buf());
    abs.parent().map(Path::to_path_buf).unwrap_or(abs)
}

/// The database: `db`, else `sentiflow.db` in the project root.
pub fn db_path(db: Option<&Path>, pipelines: &Path) -> PathBuf {
    db.map(Path::to_path_buf)
        .unwrap_or_else(|| project_root(pipelines).join("sentiflow.db"))
}

/// A model being served.
pub struct Serving {
    pub row: ModelRow,
    pub bundle: Bundle,
    /// The batching worker of an ONNX model.
    batcher: Option<Batcher>,
    monitor: drift::Monitor,
}

impl Serving {
    async fn predict(&self, texts: &[String]) -> Result<Vec<Sample>, ApiError> {
        let samples = match (&self.bundle.model, &self.batcher) {
            // The worker thread needs texts it owns.
            (Model::Bert(_), Some(batcher)) => batcher.predict(texts.to_vec()).await.map_err(|e| match e {
                BatchError::Busy => {
                    let mut e = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "busy",
                        format!("model `{}` has a full queue; retry shortly", self.row.name),
                    );
                    e.headers.push(("retry-after", "1".into()));
                    e
                }
                BatchError::Failed(reason) => {
                    tracing::error!("model {} {}: {reason}", self.row.name, self.row.version);
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "model_failed",
                        format!("model `{}` failed: {reason}", self.row.name),
                    )
                }
            })?,
            (model, _) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                model
                    .predict(&refs)
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_failed", e.to_string()))?
            }
        };
        self.monitor.record(&samples);
        Ok(samples)
    }
}

pub struct App {
    pub config: Config,
    pub cache_dir: PathBuf,
    pub store: Store,
    models: RwLock<HashMap<String, Arc<Serving>>>,
    keys: auth::Keys,
    limiter: auth::Limiter,
    lockout: auth::Lockout,
    pub metrics: Arc<Metrics>,
    journal: drift::Journal,
    pub training: training::Trainer,
    request_seq: AtomicU64,
    started: u64,
}

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        if e.is_unavailable() {
            let mut a = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the database cannot take writes now (full disk, read-only file or held lock); \
                 nothing was changed, retry later; the error is logged",
            );
            a.headers.push(("retry-after", "30".into()));
            return a;
        }
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the database failed; the error is logged",
        )
    }
}

type ApiResult = Result<Response, ApiError>;

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(body.to_string().into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

impl App {
    pub fn new(config: Config, cache_dir: PathBuf) -> anyhow::Result<Arc<App>> {
        let store = Store::open(&config.db_path())?;
        let interrupted = store.interrupt_unfinished()?;
        if interrupted > 0 {
            tracing::warn!("{interrupted} training run(s) were cut short by a stop; recorded as interrupted");
        }
        let app = Arc::new(App {
            cache_dir,
            store,
            models: RwLock::new(HashMap::new()),
            keys: auth::Keys::default(),
            limiter: auth::Limiter::new(),
            lockout: auth::Lockout::new(config.auth_fail_limit, Duration::from_secs(config.auth_fail_window_s)),
            metrics: Arc::default(),
            journal: drift::Journal::default(),
            training: training::Trainer::default(),
            request_seq: AtomicU64::new(0),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            config,
        });
        app.load_models()?;
        Ok(app)
    }

    /// Serves the production version of each model; with an empty registry, registers and
    /// promotes the bundles found in `<root>/models/*/`.
    fn load_models(&self) -> anyhow::Result<()> {
        for row in self.store.production()? {
            match Bundle::load(Path::new(&row.path), self.config.runtime()) {
                Ok(bundle) => {
                    match bundle.model {
                        Model::Bert(_) => {
                            tracing::info!("serving {} version {} on {}", row.name, row.version, self.config.device)
                        }
                        Model::Tfidf(_) => tracing::info!("serving {} version {}", row.name, row.version),
                    }
                    self.swap(row, bundle);
                }
                Err(e) => tracing::warn!("production model {} {}: {e}", row.name, row.version),
            }
        }
        // Bundles exported outside the server (`sentiflow run`) join the registry here, and are
        // promoted like a trained one: when no version of their name is served, or when better.
        let dir = self.config.root().join("models");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().join("manifest.json").is_file() {
                let outcome = self
                    .register(&entry.path(), None)
                    .map_err(|e| e.to_string())
                    .and_then(|row| self.maybe_promote(&row).map_err(|e| e.message));
                if let Err(e) = outcome {
                    tracing::warn!("{}: {e}", entry.path().display());
                }
            }
        }
        Ok(())
    }

    /// Where the registry keeps its own copy of each version: exports overwrite their directory,
    /// registered versions never change.
    fn registry_dir(&self) -> PathBuf {
        let db = self.config.db_path();
        db.parent().unwrap_or(Path::new(".")).join("registry")
    }

    /// Records the bundle at `dir` in the registry (once per version).
    pub fn register(&self, dir: &Path, run_id: Option<&str>) -> anyhow::Result<ModelRow> {
        let bundle = Bundle::load(dir, self.config.runtime())?;
        let m = &bundle.manifest;
        let copy = self.registry_dir().join(&m.name).join(&m.version);
        if !copy.join("manifest.json").is_file() {
            copy_dir_atomic(dir, &copy)?;
        }
        let row = ModelRow {
            version: m.version.clone(),
            name: m.name.clone(),
            kind: m.kind().into(),
            pipeline: m.pipeline.clone(),
            path: std::path::absolute(&copy)?.display().to_string(),
            params: m.parameters(),
            metrics: m.metrics.clone(),
            tuning: m.tuning(),
            accuracy: m.metrics["accuracy"].as_f64(),
            run_id: run_id.map(str::to_string),
            status: ModelStatus::Candidate,
            created_at: String::new(),
            promoted_at: None,
        };
        self.store.register_model(&row)?;
        Ok(self.store.model(&row.version)?.unwrap_or(row))
    }

    /// Makes `bundle` the served model of its name; requests in flight finish on the old one.
    fn swap(&self, row: ModelRow, bundle: Bundle) {
        let name = row.name.clone();
        let batcher = match &bundle.model {
            Model::Bert(model) => {
                let config = BatchConfig {
                    window: Duration::from_millis(self.config.batch_window_ms),
                    max_texts: self.config.batch_max_texts.max(1),
                    queue: self.config.batch_queue,
                };
                let metrics = self.metrics.clone();
                let label = name.clone();
                Some(Batcher::start(model.clone(), config, move |n| metrics.batch(&label, n)))
            }
            Model::Tfidf(_) => None,
        };
        let monitor = drift::Monitor::new(self.config.drift_window);
        let serving = Arc::new(Serving {
            row,
            bundle,
            batcher,
            monitor,
        });
        self.models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, serving);
    }

    /// Promotes `version`: loads its bundle first, so a broken bundle never replaces a working one.
    pub fn promote(&self, version: &str) -> Result<ModelRow, ApiError> {
        let row = self.store.model(version)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no model version `{version}`"),
            )
        })?;
        let bundle = Bundle::load(Path::new(&row.path), self.config.runtime()).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "bundle_unavailable",
                format!("model version `{version}` cannot be loaded: {e}"),
            )
        })?;
        self.store.promote(version)?;
        let row = self.store.model(version)?.unwrap_or(row);
        self.swap(row.clone(), bundle);
        Ok(row)
    }

    /// Promotes a newly registered model when it beats the production one of its name.
    pub fn maybe_promote(&self, row: &ModelRow) -> Result<bool, ApiError> {
        if self.config.no_auto_promote {
            return Ok(false);
        }
        let current = self.serving(&row.name);
        let better = match (&current, row.accuracy) {
            (None, _) => true,
            (Some(c), Some(new)) => c.row.version != row.version && new > c.row.accuracy.unwrap_or(f64::NEG_INFINITY),
            (Some(_), None) => false,
        };
        if better {
            self.promote(&row.version)?;
        }
        Ok(better)
    }

    /// The served model `name`, or a `404` naming the served ones.
    fn served(&self, name: &str) -> Result<Arc<Serving>, ApiError> {
        self.serving(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("no model `{name}` is served; served: {:?}", self.model_names()),
            )
        })
    }

    pub fn serving(&self, name: &str) -> Option<Arc<Serving>> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    fn model_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Checks the request's key for `need` and takes a rate-limit token; returns the quota. An
    /// address that sent too many unknown keys is refused before its key is looked up.
    fn authorize(
        &self,
        client: Option<IpAddr>,
        headers: &HeaderMap,
        need: Role,
        open: bool,
    ) -> Result<auth::Quota, ApiError> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let (id, role) = match key {
            None if open => (0, Role::Predict),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing API key: send `Authorization: Bearer <key>` (create one with `sentiflow keys create`)",
                ))
            }
            Some(k) => {
                if let Some(secs) = client.and_then(|c| self.lockout.retry_after(c)) {
                    self.metrics.auth_throttled();
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "auth_throttled",
                        format!(
                            "too many requests with unknown API keys from your address; retry in {secs} s with a valid key (create one with `sentiflow keys create`)"
                        ),
                    );
                    e.headers.push(("retry-after", secs.to_string()));
                    return Err(e);
                }
                match self.keys.lookup(&self.store, k, &self.metrics)? {
                    Some(found) => found,
                    None => {
                        if let Some(c) = client {
                            self.lockout.failed(c);
                        }
                        return Err(ApiError::new(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            "unknown API key: check it, or create one with `sentiflow keys create`",
                        ));
                    }
                }
            }
        };
        if !role.allows(need) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this needs a key with the `{}` role; yours has `{}`",
                    need.as_str(),
                    role.as_str()
                ),
            ));
        }
        let rate = if role == Role::Admin {
            self.config.admin_rps
        } else {
            self.config.predict_rps
        };
        let quota = self.limiter.take(id, rate);
        if !quota.allowed {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "rate limit of {rate} requests per second exceeded; retry in {} s",
                    quota.retry_after
                ),
            );
            e.headers.push(("retry-after", quota.retry_after.to_string()));
            e.headers.push(("x-ratelimit-limit", quota.limit.to_string()));
            e.headers.push(("x-ratelimit-remaining", "0".into()));
            return Err(e);
        }
        Ok(quota)
    }
}

/// Copies the files of `src` into a new directory `dest`, assembled beside it and renamed into place.
fn copy_dir_atomic(src: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = dest.parent().expect("registry paths have a parent");
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new().prefix(".copy-").tempdir_in(parent)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), staging.path().join(entry.file_name()))?;
        }
    }
    let staged = staging.keep();
    std::fs::rename(&staged, dest).or_else(|e| {
        // Another registration of the same version won the race: keep its copy.
        let _ = std::fs::remove_dir_all(&staged);
        if dest.join("manifest.json").is_file() {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// The methods a path answers, for `405` responses.
fn allowed_methods(parts: &[&str]) -> Option<&'static str> {
    match parts {
        [""]
        | ["health"]
        | ["ready"]
        | ["metrics"]
        | ["openapi.json"]
        | ["best_model_parameter"]
        | ["models"]
        | ["drift"]
        | ["pipelines"] => Some("GET, HEAD"),
        ["training", _] | ["training", _, "logs"] => Some("GET, HEAD"),
        ["prediction"] | ["feedback"] | ["training"] | ["models", _, "promote"] => Some("POST"),
        _ => None,
    }
}

/// Rejects fields a request body does not define.
fn only_fields(request: &Value, known: &[&str]) -> Result<(), ApiError> {
    match request
        .as_object()
        .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
    {
        Some(unknown) => Err(bad_field(
            unknown,
            format!("unknown field; expected one of {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The route label of a path, for metrics (ids replaced by placeholders).
fn route_of(method: &Method, path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let shape = match parts.as_slice() {
        ["training", _] => "/training/{id}".to_string(),
        ["training", _, "logs"] => "/training/{id}/logs".to_string(),
        ["models", _, "promote"] => "/models/{version}/promote".to_string(),
        known if allowed_methods(known).is_some() => path.to_string(),
        _ => "other".to_string(),
    };
    format!("{method} {shape}")
}

fn parse_json(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_body",
            "the body is empty: send a JSON object with `Content-Type: application/json`",
        ));
    }
    let ctype = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send `Content-Type: application/json` (got `{ctype}`)"),
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

fn bad_field(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("`{field}`: {}", message.into()),
    )
}

impl App {
    async fn dispatch(self: &Arc<Self>, request_id: &str, request: Incoming<'_>) -> ApiResult {
        let Incoming {
            client,
            method,
            path,
            query,
            headers,
            body,
        } = request;
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
        // HEAD is answered as GET; hyper leaves the body out.
        let route_method = if method == Method::HEAD { &Method::GET } else { method };
        match (route_method, parts.as_slice()) {
            (&Method::GET, [""]) => {
                let mut r = Response::new(UI.into());
                let h = r.headers_mut();
                h.insert("content-type", HeaderValue::from_static("text/html; charset=utf-8"));
                h.insert(
                    "content-security-policy",
                    HeaderValue::from_str(&UI_CSP).expect("the policy is ASCII"),
                );
                h.insert("x-frame-options", HeaderValue::from_static("DENY"));
                Ok(r)
            }
            (&Method::GET, ["health"]) => ok(json!({"status": "ok", "started_at": self.started})),
            (&Method::GET, ["ready"]) => {
                let names = self.model_names();
                let status = if names.is_empty() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                Ok(json_response(
                    status,
                    &json!({"ready": !names.is_empty(), "models": names}),
                ))
            }
            (&Method::GET, ["metrics"]) => {
                let mut text = self.metrics.render();
                text.push_str(&drift::gauges(&drift::report(self)));
                let mut r = Response::new(text.into());
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("text/plain; version=0.0.4"));
                Ok(r)
            }
            (&Method::GET, ["openapi.json"]) => ok(openapi::document(&self.config)),
            (&Method::GET, ["best_model_parameter"]) => {
                let quota = self.authorize(client, headers, Role::Predict, false)?;
                self.best_model_parameter(query).map(|r| quota.annotate(r))
            }
            (&Method::POST, ["prediction"]) => {
                let quota = self.authorize(client, headers, Role::Predict, self.config.open_prediction)?;
                self.predict(request_id, headers, body).await.map(|r| quota.annotate(r))
            }
            (&Method::GET, ["pipelines"]) => {
                let quota = self.authorize(client, headers, Role::Admin, false)?;
                training::list(self).map(|r| quota.annotate(r))
            }
            (&Method::GET, ["drift"]) => {
                let quota = self.authorize(client, headers, Role::Predict, false)?;
                let history = query.split('&').find_map(|kv| kv.strip_prefix("history="));
                if history.is_some_and(|h| h != "1") {
                    return Err(bad_field("history", "must be `1` (or absent)"));
                }
                let mut report = drift::report(self);
                if history.is_some() {
                    report["history"] = self.store.drift_history(100)?.into();
                }
                ok(report).map(|r| quota.annotate(r))
            }
            (&Method::POST, ["feedback"]) => {
                let quota = self.authorize(client, headers, Role::Predict, self.config.open_prediction)?;
                self.feedback(headers, body).map(|r| quota.annotate(r))
            }
            (&Method::GET, ["models"]) => {
                let quota = self.authorize(client, headers, Role::Predict, false)?;
                ok(json!({"models": self.store.models()?})).map(|r| quota.annotate(r))
            }
            (&Method::POST, ["models", version, "promote"]) => {
                let quota = self.authorize(client, headers, Role::Admin, false)?;
                let row = self.promote(version)?;
                ok(json!({"promoted": row})).map(|r| quota.annotate(r))
            }
            (&Method::POST, ["training"]) => {
                let quota = self.authorize(client, headers, Role::Admin, false)?;
                let request = parse_json(headers, body)?;
                only_fields(&request, &["pipeline", "params", "stages"])?;
                training::start(self, &request).map(|r| quota.annotate(r))
            }
            (&Method::GET, ["training", id]) => {
                let quota = self.authorize(client, headers, Role::Admin, false)?;
                training::status(self, id).map(|r| quota.annotate(r))
            }
            (&Method::GET, ["training", id, "logs"]) => {
                let quota = self.authorize(client, headers, Role::Admin, false)?;
                if self.store.run(id)?.is_none() {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no training run `{id}`"),
                    ));
                }
                ok(json!({"id": id, "lines": self.store.logs(id)?})).map(|r| quota.annotate(r))
            }
            (_, p) => match allowed_methods(p) {
                Some(allow) => {
                    let mut e = ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        format!("{method} is not allowed on {path}; use {allow}"),
                    );
                    e.headers.push(("allow", allow.to_string()));
                    Err(e)
                }
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route {path}; see /openapi.json"),
                )),
            },
        }
    }

    fn best_model_parameter(&self, query: &str) -> ApiResult {
        let name = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("model="))
            .unwrap_or("tfidf");
        let serving = self.served(name)?;
        let m = &serving.bundle.manifest;
        let tuning = m.tuning();
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "model": m.name,
                "version": m.version,
                "pipeline": m.pipeline,
                "run_id": serving.row.run_id,
                "kind": m.kind(),
                "parameters": m.parameters(),
                "cv": if tuning.is_null() { Value::Null } else {
                    json!({"metric": tuning["metric"], "mean": tuning["mean"], "std": tuning["std"], "folds": tuning["folds"], "vectorizer_stage": tuning["vectorizer"]})
                },
                "validation": m.metrics,
            }),
        ))
    }

    async fn predict(&self, request_id: &str, headers: &HeaderMap, body: &Bytes) -> ApiResult {
        let request = parse_json(headers, body)?;
        only_fields(&request, &["text", "texts", "model", "explain"])?;
        let explain = match request.get("explain") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad_field("explain", "must be a boolean")),
        };
        let texts: Vec<String> = match (request.get("text"), request.get("texts")) {
            (None, None) => return Err(bad_field("text", "missing: send `text` or `texts`")),
            (Some(Value::String(t)), None) => vec![t.clone()],
            (None, Some(Value::Array(items))) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad_field(&format!("texts[{i}]"), "must be a string"))
                })
                .collect::<Result<_, _>>()?,
            (None, Some(_)) => return Err(bad_field("texts", "must be an array of strings")),
            (Some(_), None) => return Err(bad_field("text", "must be a string")),
            _ => return Err(bad_field("text", "send either `text` or `texts`, not both")),
        };
        if texts.is_empty() || texts.len() > self.config.max_batch {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_batch",
                format!(
                    "`texts` must hold 1 to {} texts, got {}",
                    self.config.max_batch,
                    texts.len()
                ),
            ));
        }
        for (i, t) in texts.iter().enumerate() {
            let field = if request["text"].is_string() {
                "text".to_string()
            } else {
                format!("texts[{i}]")
            };
            if t.trim().is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "empty_text",
                    format!("`{field}` is empty"),
                ));
            }
            let chars = t.chars().count();
            if chars > self.config.max_text_chars {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "text_too_long",
                    format!(
                        "`{field}` has {chars} characters; the limit is {}",
                        self.config.max_text_chars
                    ),
                ));
            }
        }
        let name = match request.get("model") {
            None => "tfidf",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(bad_field("model", "must be a string")),
        };
        let serving = self.served(name)?;
        let version = &serving.row.version;
        let single = request["text"].is_string();
        let samples = serving.predict(&texts).await?;
        let predictions: Vec<Value> = samples
            .iter()
            .zip(&texts)
            .enumerate()
            .map(|(i, (s, text))| {
                let p = Prediction::from_score(s.score);
                let id = format!("{request_id}-{i}");
                self.metrics.prediction(name, version, p.label);
                let made = drift::Made {
                    model: name.to_string(),
                    version: version.clone(),
                    label: p.label,
                };
                self.journal.add(id.clone(), made, s, text, self.config.store_texts);
                let mut answer = json!({"id": id, "label": p.label, "score": p.score,
                       "probabilities": {LABELS[0]: 1.0 - p.score, LABELS[1]: p.score}});
                if let (true, Model::Tfidf(m)) = (explain, &serving.bundle.model) {
                    answer["explanation"] = json!(m.explain(text, 8));
                }
                answer
            })
            .collect();
        let body = if single {
            let mut single = predictions.into_iter().next().expect("one text");
            single["model"] = name.into();
            single["version"] = version.clone().into();
            single
        } else {
            json!({"model": name, "version": version, "predictions": predictions})
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    /// `POST /feedback`: the true label of an earlier prediction, for the rolling accuracy.
    fn feedback(&self, headers: &HeaderMap, body: &Bytes) -> ApiResult {
        let request = parse_json(headers, body)?;
        only_fields(&request, &["prediction_id", "label"])?;
        let id = request["prediction_id"]
            .as_str()
            .ok_or_else(|| bad_field("prediction_id", "missing or not a string"))?;
        let label = match request["label"].as_str() {
            Some(l) if LABELS.contains(&l) => l,
            _ => return Err(bad_field("label", format!("must be one of {LABELS:?}"))),
        };
        let made = match self.journal.find(id) {
            Some(m) => Some((m.model, m.version, m.label.to_string())),
            None => self.store.prediction(id)?,
        };
        let Some((model, version, predicted)) = made else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no prediction `{id}` (ids are in `POST /prediction` answers)"),
            ));
        };
        let correct = predicted == label;
        if !self.store.add_feedback(id, label, correct)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "duplicate_feedback",
                format!("prediction `{id}` already has feedback"),
            ));
        }
        if let Some(serving) = self.serving(&model).filter(|s| s.row.version == version) {
            serving.monitor.feedback(correct);
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"prediction_id": id, "model": model, "version": version, "predicted": predicted,
                    "label": label, "correct": correct}),
        ))
    }
}

async fn handle(
    app: Arc<App>,
    client: Option<listener::ClientAddr>,
    method: Method,
    path: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    let clock = Instant::now();
    let id = app.request_id();
    let path = path.as_str().to_string();
    let request = Incoming {
        client: client.map(|c| c.0.ip()),
        method: &method,
        path: &path,
        query: &query,
        headers: &headers,
        body: &body,
    };
    let mut response = match app.dispatch(&id, request).await {
        Ok(r) => r,
        Err(e) => error_response(e, &id),
    };
    stamp(&mut response, &id);
    app.metrics.request(
        &route_of(&method, &path),
        response.status().as_u16(),
        clock.elapsed().as_secs_f64(),
    );
    Ok(response)
}

/// A request as `dispatch` sees it.
struct Incoming<'a> {
    /// The address it came from.
    client: Option<IpAddr>,
    method: &'a Method,
    path: &'a str,
    query: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

fn error_response(e: ApiError, request_id: &str) -> Response {
    let mut r = json_response(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message, "request_id": request_id}}),
    );
    for (k, v) in e.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

/// Rejections warp produces before the handler runs (oversized bodies, unknown methods).
async fn recover(app: Arc<App>, rejection: warp::Rejection) -> Result<Response, warp::Rejection> {
    let id = app.request_id();
    let e = if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "chunked request bodies are not accepted: send the body with a Content-Length header",
        )
    } else {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
    };
    let status = e.status.as_u16();
    let mut r = error_response(e, &id);
    stamp(&mut r, &id);
    app.metrics.request("rejected", status, 0.0);
    Ok(r)
}

/// Adds the headers every response carries: its request id, and `nosniff` so that no browser
/// runs a JSON or text answer as a script or page.
fn stamp(r: &mut Response, request_id: &str) {
    let h = r.headers_mut();
    h.insert(
        "x-request-id",
        HeaderValue::from_str(request_id).expect("ids are ASCII"),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
}

impl App {
    /// A new request id: the start time and a sequence number, in hex.
    fn request_id(&self) -> String {
        format!(
            "{:x}-{:x}",
            self.started,
            self.request_seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The answer to a connection over `--max-connections`.
    fn overloaded(&self) -> Response {
        let id = self.request_id();
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "the server has its limit of {} connections open (--max-connections); retry shortly",
                self.config.max_connections
            ),
        );
        e.headers.push(("retry-after", "1".into()));
        let mut r = error_response(e, &id);
        stamp(&mut r, &id);
        r
    }
}

/// The page's Content-Security-Policy: its one inline script allowed by hash, so no injected
/// script runs; inline styles (the page sets `style` attributes); everything else from this
/// server only; never in a frame.
static UI_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    use sha2::Digest;
    let script = UI
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .expect("ui.html has an inline <script>");
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    format!(
        "default-src 'self'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

/// The web interface: one self-contained page (HTML, CSS and JavaScript, no build step) that
/// talks to this API.
const UI: &str = include_str!("ui.html");

/// Largest request body accepted.
const MAX_BODY: u64 = 8 * 1024 * 1024;

/// Every route of the API, each answer a JSON body (or the page) with a request id.
pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let request = with_app
        .and(warp::ext::optional::<listener::ClientAddr>())
        .and(warp::method())
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned());
    let no_body = warp::any().map(Bytes::new);
    let get = warp::get()
        .or(warp::head())
        .unify()
        .and(request.clone())
        .and(no_body)
        .and_then(handle);
    // A body needs a Content-Length (chunked ones are refused with 411); a request with neither
    // it nor Transfer-Encoding has no body by HTTP/1.1's framing, which `POST
    // /models/{version}/promote` needs none of.
    let sized = warp::body::content_length_limit(MAX_BODY).and(warp::body::bytes());
    let empty = warp::header::headers_cloned().and_then(|h: HeaderMap| async move {
        if h.contains_key("content-length") || h.contains_key("transfer-encoding") {
            Err(warp::reject::not_found())
        } else {
            Ok(Bytes::new())
        }
    });
    let post = warp::post()
        .and(request.clone())
        .and(sized.or(empty).unify())
        .and_then(handle);
    // Any other method reaches the handler too, which answers 405 with `Allow`.
    let other_method = warp::method()
        .and_then(|m: Method| async move {
            if [Method::GET, Method::HEAD, Method::POST].contains(&m) {
                Err(warp::reject::not_found())
            } else {
                Ok(())
            }
        })
        .untuple_one();
    let other = other_method.and(request).and(no_body).and_then(handle);
    let recover_app = app.clone();
    get.or(post)
        .unify()
        .or(other)
        .unify()
        .recover(move |r| recover(recover_app.clone(), r))
        .unify()
}

/// Runs the server until SIGINT or SIGTERM, then lets requests in flight finish and records a
/// running training as interrupted.
pub async fn serve(app: Arc<App>) -> anyhow::Result<()> {
    let routes = routes(app.clone());
    match listener::raise_file_limit() {
        Ok(files) if files < u64::from(app.config.max_connections) + RESERVED_FILES => tracing::warn!(
            "the open-file limit ({files}) is below --max-connections ({}) plus {RESERVED_FILES} for the server's own \
             files: connections may fail before the cap; raise the hard limit (`ulimit -Hn`, LimitNOFILE=) or lower \
             --max-connections",
            app.config.max_connections
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("raising the open-file limit: {e}; keeping the current one"),
    }
    let addr = app.config.addr;
    let socket = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("listening on {addr}: {e} (is another server on that port? choose another with --addr)")
    })?;
    let addr = socket.local_addr()?;
    let signal = shutdown_signal();
    tokio::spawn(drift::watch(
        app.clone(),
        Duration::from_secs(app.config.drift_period_s.max(1)),
    ));
    tracing::info!("listening on http://{addr}");
    eprintln!("sentiflow serving on http://{addr} (models: {:?})", app.model_names());
    listener::run(app.clone(), socket, warp::service(routes), signal).await;
    app.training.stop_all(&app);
    Ok(())
}

/// Files the server keeps open besides connections: the database, models, logs.
const RESERVED_FILES: u64 = 256;

/// Resolves on SIGTERM or SIGINT; the handlers are installed at once, so a signal that arrives
/// before the server first waits for one still shuts it down gracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down: finishing requests in flight");
    }
}
