//! `sentiflow serve`: the HTTP API (warp on tokio) over the model registry, the bundles and the
//! pipeline engine.
//!
//! `routes` holds the table of routes and builds the warp filters from it; `handlers` does each
//! route's work between the typed bodies of `api`; `error` is where errors become answers
//! (`{"error": {code, message, request_id}}`).

mod api;
mod auth;
mod batcher;
mod config;
mod drift;
mod error;
mod handlers;
mod listener;
mod metrics;
mod openapi;
pub mod policy;
mod routes;
mod shadow;
mod training;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

pub use auth::{create_key, KeyError, Role};
pub use config::{db_location, Config};
pub use routes::routes;

use crate::drift::Sample;
use crate::models::bundle::{Bundle, Model};
use crate::registry::Registry;
use crate::store::{ModelRow, ModelStatus, PromotedBy, PromotionReason, Store};
use auth::{Caller, Known};
use batcher::{BatchConfig, BatchError, Batcher};
use error::ApiError;
use metrics::Metrics;
use routes::Access;

/// A model being served.
pub struct Serving {
    pub row: ModelRow,
    pub bundle: Bundle,
    /// The batching worker of an ONNX model.
    batcher: Option<Batcher>,
    monitor: drift::Monitor,
}

impl Serving {
    /// Scores `texts` on the model's batching worker (ONNX models).
    async fn predict_batched(&self, texts: &[String]) -> Result<Vec<Sample>, ApiError> {
        let batcher = self.batcher.as_ref().expect("ONNX models have a batcher");
        // The worker thread needs texts it owns.
        let samples = batcher.predict(texts.to_vec()).await.map_err(|e| match e {
            BatchError::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!("model `{}` has a full queue; retry shortly", self.row.name),
            )
            .with_header("retry-after", "1"),
            BatchError::Failed(reason) => {
                tracing::error!("model {} {}: {reason}", self.row.name, self.row.version);
                ApiError::internal(format!("model `{}` failed: {reason}", self.row.name))
            }
        })?;
        self.monitor.record(&samples);
        Ok(samples)
    }

    /// Scores `texts` in the calling thread (TF-IDF models).
    fn predict_now(&self, texts: &[String]) -> Result<Vec<Sample>, ApiError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let samples = self.bundle.model.predict(&refs).map_err(|e| {
            tracing::error!("model {} {}: {e}", self.row.name, self.row.version);
            ApiError::internal(format!("model `{}` failed: {e}", self.row.name))
        })?;
        self.monitor.record(&samples);
        Ok(samples)
    }
}

pub struct App {
    pub config: Config,
    pub cache_dir: std::path::PathBuf,
    /// Where trainings' outputs may reach outside the project root (`--output-dirs`).
    pub output_dirs: Vec<std::path::PathBuf>,
    pub store: Store,
    pub registry: Registry,
    models: RwLock<HashMap<String, Arc<Serving>>>,
    keys: auth::Keys,
    limiter: auth::Limiter,
    lockout: auth::Lockout,
    pub metrics: Arc<Metrics>,
    journal: drift::Journal,
    pub training: training::Trainer,
    /// Candidates under evaluation, their shadow traffic and canaries.
    shadow: shadow::Shadow,
    request_seq: AtomicU64,
    /// Tells this process's request ids from those of every other server, including one that
    /// started in the same second on another host.
    id_tag: String,
    started: u64,
    /// This server's name in the database ([`Config::replica`]).
    pub replica: String,
    /// Production versions that failed to load here, reported once each.
    unloadable: Mutex<HashSet<String>>,
    /// `/openapi.json`, built once: it depends only on the routes, the types and the settings.
    openapi: String,
    /// The MLflow server of `MLFLOW_TRACKING_URI`, read once at start-up.
    pub tracker: Option<crate::tracking::Tracker>,
}

impl App {
    pub fn new(
        config: Config,
        cache_dir: std::path::PathBuf,
        output_dirs: Vec<std::path::PathBuf>,
    ) -> anyhow::Result<Arc<App>> {
        let store = Store::open(&config.db(), config.db_pool)?;
        let interrupted = store.interrupt_unfinished(&config.replica())?;
        if interrupted > 0 {
            tracing::warn!("{interrupted} training run(s) were cut short by a stop; recorded as interrupted");
        }
        let registry = config.registry()?;
        if let Some(policy) = &config.retrain {
            training::check_policy(&config, policy)?;
        }
        let app = Arc::new(App {
            cache_dir,
            output_dirs,
            store,
            registry,
            models: RwLock::new(HashMap::new()),
            keys: auth::Keys::default(),
            limiter: auth::Limiter::new(),
            lockout: auth::Lockout::new(config.auth_fail_limit, Duration::from_secs(config.auth_fail_window_s)),
            metrics: Arc::default(),
            journal: drift::Journal::default(),
            training: training::Trainer::default(),
            shadow: shadow::Shadow::new(usize::try_from(config.shadow_queue).unwrap_or(usize::MAX)),
            request_seq: AtomicU64::new(0),
            id_tag: id_tag(&config.replica()),
            replica: config.replica(),
            unloadable: Mutex::default(),
            openapi: openapi::document(&config).to_string(),
            tracker: crate::tracking::Tracker::from_env(),
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
            match self.registry.load(&row) {
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
                    .registry
                    .register(&self.store, &entry.path(), None)
                    .map_err(|e| e.to_string())
                    .and_then(|row| self.maybe_promote(&row).map_err(|e| e.message));
                if let Err(e) = outcome {
                    tracing::warn!("{}: {e}", entry.path().display());
                }
            }
        }
        self.follow_candidates();
        Ok(())
    }

    /// Makes `bundle` the served model of its name; requests in flight finish on the old one.
    fn swap(&self, row: ModelRow, bundle: Bundle) {
        let name = row.name.clone();
        let serving = self.serving_of(row, bundle);
        self.models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, serving);
    }

    /// A bundle ready to answer: with its batching worker when it is an ONNX model.
    fn serving_of(&self, row: ModelRow, bundle: Bundle) -> Arc<Serving> {
        let batcher = match &bundle.model {
            Model::Bert(model) => {
                let config = BatchConfig {
                    window: Duration::from_millis(self.config.batch_window_ms),
                    max_texts: self.config.batch_max_texts.max(1),
                    queue: self.config.batch_queue,
                };
                let metrics = self.metrics.clone();
                let label = row.name.clone();
                Some(Batcher::start(model.clone(), config, move |n| metrics.batch(&label, n)))
            }
            Model::Tfidf(_) => None,
        };
        let monitor = drift::Monitor::new(self.config.drift_window);
        Arc::new(Serving {
            row,
            bundle,
            batcher,
            monitor,
        })
    }

    /// Serves the production version of each name recorded in the database, when another server
    /// of the database (or a command) promoted one this server does not serve yet.
    fn follow_production(&self) {
        let rows = match self.store.production() {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("reading the production versions: {e}"),
        };
        for row in rows {
            if self.serving(&row.name).is_some_and(|s| s.row.version == row.version) {
                continue;
            }
            match self.registry.load(&row) {
                Ok(bundle) => {
                    tracing::info!("serving {} version {}, promoted in the database", row.name, row.version);
                    self.swap(row, bundle);
                }
                Err(e) => {
                    let mut failed = self.unloadable.lock().unwrap_or_else(|p| p.into_inner());
                    if failed.insert(row.version.clone()) {
                        tracing::error!(
                            "production version {} of {} cannot be served here: {e}",
                            row.version,
                            row.name
                        );
                    }
                }
            }
        }
    }

    /// Renews the leases of this server's runs, cancels those whose cancel was asked through
    /// another server, and interrupts the runs of servers that died.
    fn keep_leases(&self) {
        if let Err(e) = self.store.renew_leases(&self.replica, self.config.run_lease()) {
            tracing::warn!("renewing the leases of this server's training runs: {e}");
        }
        match self.store.cancel_requests(&self.replica) {
            Ok(ids) => {
                for id in ids {
                    if self.training.cancel(&id) {
                        tracing::info!("training run {id} cancelled through another server");
                    }
                }
            }
            Err(e) => tracing::warn!("reading the cancel requests of this server's training runs: {e}"),
        }
        match self.store.expire_leases() {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!("{n} training run(s) of a server that stopped renewing them recorded as interrupted")
            }
            Err(e) => tracing::warn!("interrupting the runs whose lease ran out: {e}"),
        }
    }

    /// Promotes `version` for `reason` and serves it; requests in flight finish on the old one.
    /// A candidate's shadow traffic and canary end.
    pub fn promote(&self, version: &str, reason: PromotionReason) -> Result<ModelRow, ApiError> {
        let (row, bundle) = self.registry.promote(&self.store, version, &reason)?;
        self.swap(row.clone(), bundle);
        self.follow_candidates();
        shadow::alias(self, &row, "production");
        Ok(row)
    }

    /// Decides what a newly registered model becomes. With a promotion gate, a new version of a
    /// served name becomes its candidate under evaluation; otherwise it is promoted when no
    /// version of its name is served or when it beats the production one.
    pub fn maybe_promote(&self, row: &ModelRow) -> Result<bool, ApiError> {
        let current = self.serving(&row.name);
        if let (Some(_), Some(c)) = (&self.config.promotion, &current) {
            if c.row.version != row.version && row.status == ModelStatus::Candidate {
                self.follow_candidates();
                shadow::alias(self, row, "candidate");
                tracing::info!(
                    "model {} version {} is the candidate under evaluation (shadow traffic, promotion gate)",
                    row.name,
                    row.version
                );
            }
            return Ok(false);
        }
        if self.config.no_auto_promote {
            return Ok(false);
        }
        let better = match (&current, row.accuracy) {
            (None, _) => true,
            (Some(c), Some(new)) => c.row.version != row.version && new > c.row.accuracy.unwrap_or(f64::NEG_INFINITY),
            (Some(_), None) => false,
        };
        if better {
            self.promote(&row.version, PromotionReason::by(PromotedBy::Accuracy))?;
        }
        Ok(better)
    }

    /// The served model `name`, or a `404` naming the served ones.
    fn served(&self, name: &str) -> Result<Arc<Serving>, ApiError> {
        self.serving(name).ok_or_else(|| {
            ApiError::not_found(
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

    /// Checks the request's key for the route's access and takes a rate-limit token. An address
    /// that sent too many unknown keys is refused before its key is looked up.
    async fn authorize(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<Option<Caller>, ApiError> {
        let need = match access {
            Access::Public => return Ok(None),
            Access::Key(role) => role,
            Access::Prediction => Role::Predict,
        };
        let open = access == Access::Prediction && self.config.open_prediction;
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let known = match key {
            None if open => Known {
                id: 0,
                role: Role::Predict,
                label: None,
            },
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
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "auth_throttled",
                        format!(
                            "too many requests with unknown API keys from your address; retry in {secs} s with a valid key (create one with `sentiflow keys create`)"
                        ),
                    )
                    .with_header("retry-after", secs.to_string()));
                }
                let hash = crate::cache::sha256_hex(k.as_bytes());
                let found = match self.keys.cached(&self.store, &hash)? {
                    Some(known) => Some(known),
                    None => {
                        let app = self.clone();
                        tokio::task::spawn_blocking(move || {
                            crate::store::with_request_wait(|| app.keys.lookup(&app.store, &hash))
                        })
                        .await
                        .map_err(|e| ApiError::internal(format!("looking up the key: {e}")))??
                    }
                };
                if let Some(k) = found.as_ref().filter(|k| self.keys.touch_due(k.id)) {
                    // Not awaited: the answer never waits for this bookkeeping.
                    let (app, id) = (self.clone(), k.id);
                    tokio::task::spawn_blocking(move || app.keys.touch(&app.store, id, &app.metrics));
                }
                match found {
                    Some(known) => known,
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
        if !known.role.allows(need) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this needs a key with the `{}` role; yours has `{}`",
                    need.as_str(),
                    known.role.as_str()
                ),
            ));
        }
        let rate = if known.role == Role::Admin {
            self.config.admin_rps
        } else {
            self.config.predict_rps
        };
        let quota = self.limiter.take(known.id, rate);
        if !quota.allowed {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "rate limit of {rate} requests per second exceeded; retry in {} s",
                    quota.retry_after
                ),
            )
            .with_header("retry-after", quota.retry_after.to_string())
            .with_header("x-ratelimit-limit", quota.limit.to_string())
            .with_header("x-ratelimit-remaining", "0"));
        }
        Ok(Some(Caller { key: known, quota }))
    }
}

impl App {
    /// A new request id: this process's tag and a sequence number, in hex. Prediction ids are
    /// made from it, and replicas share one database of predictions.
    fn request_id(&self) -> String {
        format!("{}-{:x}", self.id_tag, self.request_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// The answer to a connection over `--max-connections`.
    fn overloaded(&self) -> Response {
        let e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "the server has its limit of {} connections open (--max-connections); retry shortly",
                self.config.max_connections
            ),
        )
        .with_header("retry-after", "1");
        routes::stamped_error(e, &self.request_id())
    }
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
    tokio::spawn(follow(app.clone()));
    tokio::spawn(policy::schedule(app.clone()));
    tokio::spawn(shadow::work(app.clone()));
    // Shadow counts reach the database (and the gate is checked) with each drift evaluation,
    // and at least every 5 s.
    tokio::spawn(shadow::flush_every(
        app.clone(),
        Duration::from_secs(app.config.drift_period_s.clamp(1, 5)),
    ));
    tracing::info!("sentiflow serving on http://{addr} (models: {:?})", app.model_names());
    listener::run(app.clone(), socket, warp::service(routes), signal).await;
    app.training.stop_all(&app);
    shadow::save(&app);
    Ok(())
}

/// Keeps this server in step with the others on its database: a version promoted anywhere is
/// served here within a fraction of a second of its commit (PostgreSQL's notifications, SQLite's
/// `data_version`), with a full check every few seconds in case a notification was lost; the
/// leases of this server's runs are renewed at a third of their length.
async fn follow(app: Arc<App>) {
    const TICK: Duration = Duration::from_millis(200);
    const FULL_CHECK: Duration = Duration::from_secs(5);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut renewed, mut checked) = (Instant::now(), Instant::now());
    let mut seen = None;
    loop {
        tick.tick().await;
        let changes = app.store.outside_changes().ok();
        let changed = changes.is_none() || changes != seen;
        seen = changes;
        let renew = renewed.elapsed() >= app.config.run_lease() / 3;
        let check = changed || checked.elapsed() >= FULL_CHECK;
        if renew {
            renewed = Instant::now();
        }
        if check {
            checked = Instant::now();
        }
        if renew || check {
            let app = app.clone();
            let work = tokio::task::spawn_blocking(move || {
                if renew {
                    app.keep_leases();
                }
                if check {
                    app.follow_production();
                    app.follow_candidates();
                }
            });
            if let Err(e) = work.await {
                tracing::error!("following the database: {e}");
            }
        }
    }
}

/// Eight hex digits from the start time (to the nanosecond), the process id and the replica name.
fn id_tag(replica: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    crate::cache::sha256_hex(format!("{now}/{}/{replica}", std::process::id()).as_bytes())[..8].to_string()
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
