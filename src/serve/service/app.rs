//! The service a server runs: the models it serves, its keys and limits, its trainings, its
//! candidates and drift windows, over the store and the registry. It knows nothing of HTTP.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::auth::{Caller, Keys, Known, Limiter, Lockout, Role};
use super::batcher::{BatchConfig, Batcher};
use super::config::Config;
use super::drift::{DriftOverview, Journal, ModelDrift, Monitor, NoReference};
use super::error::{Failure, Kind};
use super::metrics::Metrics;
use super::serving::Serving;
use super::shadow::{Candidate, Shadow};
use super::training::{check_policy, Offload, Trainer};
use crate::drift::{evaluate, Status, Thresholds, WindowReport};
use crate::models::bundle::{Bundle, Model};
use crate::registry::Registry;
use crate::store::{ModelRow, ModelStatus, PromotedBy, PromotionReason, ShadowFigures, Store};

/// The parts of a server, each a component of its own: the routes and the background work reach
/// for the ones they need.
pub struct App {
    pub config: Config,
    pub cache_dir: std::path::PathBuf,
    /// Where trainings' outputs may reach outside the project root (`--output-dirs`).
    pub output_dirs: Vec<std::path::PathBuf>,
    /// Executors and the remote cache for trainings' stages.
    pub offload: Offload,
    pub store: Store,
    pub registry: Registry,
    models: RwLock<HashMap<String, Arc<Serving>>>,
    keys: Keys,
    limiter: Limiter,
    lockout: Lockout,
    pub metrics: Arc<Metrics>,
    pub journal: Journal,
    pub training: Trainer,
    /// Candidates under evaluation, their shadow traffic and canaries.
    pub shadow: Shadow,
    request_seq: AtomicU64,
    /// Tells this process's request ids from those of every other server, including one that
    /// started in the same second on another host.
    id_tag: String,
    pub started: u64,
    /// This server's name in the database ([`Config::replica`]).
    pub replica: String,
    /// Production versions that failed to load here, reported once each.
    unloadable: Mutex<HashSet<String>>,
    /// The MLflow server of `MLFLOW_TRACKING_URI`, read once at start-up.
    pub tracker: Option<crate::tracking::Tracker>,
}

impl App {
    pub fn new(
        config: Config,
        cache_dir: std::path::PathBuf,
        output_dirs: Vec<std::path::PathBuf>,
        offload: Offload,
    ) -> anyhow::Result<Arc<App>> {
        let store = Store::open(&config.db(), config.db_pool)?;
        let interrupted = store.interrupt_unfinished(&config.replica())?;
        if interrupted > 0 {
            tracing::warn!("{interrupted} training run(s) were cut short by a stop; recorded as interrupted");
        }
        let registry = config.registry()?;
        if let Some(policy) = &config.retrain {
            check_policy(&config, policy)?;
        }
        let app = Arc::new(App {
            cache_dir,
            output_dirs,
            offload,
            store,
            registry,
            models: RwLock::new(HashMap::new()),
            keys: Keys::default(),
            limiter: Limiter::new(),
            lockout: Lockout::new(config.auth_fail_limit, Duration::from_secs(config.auth_fail_window_s)),
            metrics: Arc::default(),
            journal: Journal::default(),
            training: Trainer::default(),
            shadow: Shadow::new(usize::try_from(config.shadow_queue).unwrap_or(usize::MAX)),
            request_seq: AtomicU64::new(0),
            id_tag: id_tag(&config.replica()),
            replica: config.replica(),
            unloadable: Mutex::default(),
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
        let monitor = Monitor::new(self.config.drift_window);
        Arc::new(Serving {
            row,
            bundle,
            batcher,
            monitor,
        })
    }

    /// Serves the production version of each name recorded in the database, when another server
    /// of the database (or a command) promoted one this server does not serve yet.
    pub fn follow_production(&self) {
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
    pub fn keep_leases(&self) {
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
    pub fn promote(&self, version: &str, reason: PromotionReason) -> Result<ModelRow, Failure> {
        let (row, bundle) = self.registry.promote(&self.store, version, &reason)?;
        self.swap(row.clone(), bundle);
        self.follow_candidates();
        self.shadow.alias(self.tracker.as_ref(), &row, "production");
        Ok(row)
    }

    /// Decides what a newly registered model becomes. With a promotion gate, a new version of a
    /// served name becomes its candidate under evaluation; otherwise it is promoted when no
    /// version of its name is served or when it beats the production one.
    pub fn maybe_promote(&self, row: &ModelRow) -> Result<bool, Failure> {
        let current = self.serving(&row.name);
        if let (Some(_), Some(c)) = (&self.config.promotion, &current) {
            if c.row.version != row.version && row.status == ModelStatus::Candidate {
                self.follow_candidates();
                self.shadow.alias(self.tracker.as_ref(), row, "candidate");
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
    pub fn served(&self, name: &str) -> Result<Arc<Serving>, Failure> {
        self.serving(name).ok_or_else(|| {
            Failure::not_found(
                "model_not_found",
                format!("no model `{name}` is served; served: {:?}", self.model_names()),
            )
        })
    }

    pub fn serving(&self, name: &str) -> Option<Arc<Serving>> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    pub fn model_names(&self) -> Vec<String> {
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

    /// Checks `key` for a request that needs the role `need` and takes a rate-limit token; with
    /// `open`, a request without a key predicts. An address that sent too many unknown keys is
    /// refused before its key is looked up.
    pub async fn authorize(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        key: Option<&str>,
        need: Role,
        open: bool,
    ) -> Result<Caller, Failure> {
        let known = match key {
            None if open => Known {
                id: 0,
                role: Role::Predict,
                label: None,
            },
            None => {
                return Err(Failure::new(
                    Kind::Unauthenticated,
                    "unauthorized",
                    "missing API key: send `Authorization: Bearer <key>` (create one with `sentiflow keys create`)",
                ))
            }
            Some(k) => {
                if let Some(secs) = client.and_then(|c| self.lockout.retry_after(c)) {
                    self.metrics.auth_throttled();
                    return Err(Failure::new(
                        Kind::TooMany,
                        "auth_throttled",
                        format!(
                            "too many requests with unknown API keys from your address; retry in {secs} s with a valid key (create one with `sentiflow keys create`)"
                        ),
                    )
                    .retry_after(secs));
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
                        .map_err(|e| Failure::internal(format!("looking up the key: {e}")))??
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
                        return Err(Failure::new(
                            Kind::Unauthenticated,
                            "unauthorized",
                            "unknown API key: check it, or create one with `sentiflow keys create`",
                        ));
                    }
                }
            }
        };
        if !known.role.allows(need) {
            return Err(Failure::new(
                Kind::Forbidden,
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
            let message = format!(
                "rate limit of {rate} requests per second exceeded; retry in {} s",
                quota.retry_after
            );
            return Err(Failure {
                rate_limit: Some(quota.limit),
                ..Failure::new(Kind::TooMany, "rate_limited", message).retry_after(quota.retry_after)
            });
        }
        Ok(Caller { key: known, quota })
    }

    /// A new request id: this process's tag and a sequence number, in hex. Prediction ids are
    /// made from it, and replicas share one database of predictions.
    pub fn request_id(&self) -> String {
        format!("{}-{:x}", self.id_tag, self.request_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Loads the candidate under evaluation of each name as the database has them (with a
    /// promotion gate, or while it answers a canary), and drops those promoted or rejected since.
    pub fn follow_candidates(&self) {
        let rows = match self.store.candidates() {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("reading the candidates: {e}"),
        };
        let mut next = HashMap::new();
        // Without a gate, a candidate is loaded only to answer its canary.
        let gate = self.config.promotion.is_some();
        for row in rows.into_iter().filter(|r| gate || r.canary_percent > 0) {
            let loaded = self
                .shadow
                .candidate(&row.name)
                .filter(|c| c.serving.row.version == row.version);
            let candidate = match loaded {
                Some(c) => c,
                None => match self.registry.load(&row) {
                    Ok(bundle) => {
                        tracing::info!(
                            "shadowing candidate {} version {} beside production",
                            row.name,
                            row.version
                        );
                        Arc::new(Candidate::new(self.serving_of(row.clone(), bundle)))
                    }
                    Err(e) => {
                        let mut failed = self.unloadable.lock().unwrap_or_else(|p| p.into_inner());
                        if failed.insert(row.version.clone()) {
                            tracing::error!("candidate {} of {} cannot be loaded here: {e}", row.version, row.name);
                        }
                        continue;
                    }
                },
            };
            candidate.set_canary(row.canary_percent);
            next.insert(row.name.clone(), candidate);
        }
        self.shadow.replace(next);
    }

    /// The drift report of every served model.
    pub fn drift_overview(&self) -> DriftOverview {
        let thresholds = Thresholds::default();
        let mut models = BTreeMap::new();
        for name in self.model_names() {
            let Some(serving) = self.serving(&name) else { continue };
            let version = serving.row.version.clone();
            let Some(reference) = &serving.bundle.drift else {
                let note = "the bundle has no drift reference (exported by an older version)".to_string();
                models.insert(
                    name,
                    ModelDrift::NoReference(NoReference {
                        version,
                        status: Status::Ok,
                        judged: false,
                        note,
                    }),
                );
                continue;
            };
            let (samples, feedback) = serving.monitor.snapshot();
            let report = evaluate(reference, &samples, &feedback, &thresholds);
            let window = serving.monitor.size;
            let report = WindowReport {
                report,
                version,
                window,
            };
            models.insert(name, ModelDrift::Window(Box::new(report)));
        }
        DriftOverview { models, history: None }
    }

    /// The shadow figures of `row`, every server's counts together.
    pub fn shadow_figures(&self, row: &ModelRow) -> Result<ShadowFigures, Failure> {
        let production = self
            .serving(&row.name)
            .map(|s| s.row.version.clone())
            .filter(|v| *v != row.version);
        Ok(self.store.shadow(&row.version)?.figures(production))
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
