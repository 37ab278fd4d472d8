//! The database: model versions, training runs with their stage events and log lines, API keys,
//! stored predictions and drift evaluations. It is a SQLite file by default (WAL mode, schema
//! versions in `user_version`), or a PostgreSQL server that several replicas share (a pool of
//! connections, schema versions in `sentiflow_schema`). Both take the same migrations and the same
//! statements; every write is one transaction, so a process killed at any moment loses no
//! committed record.

pub mod sql;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blocking::off_runtime;
use crate::drift::{psi, Status, WindowReport, SCORE_BINS};
use crate::models::bundle::{typed_entries, Figures, Parameters, Tuning};
use crate::pipeline::report::State;
use crate::pipeline::ParamValue;
use sql::{params, Dialect, Location, Param, PgTx, Pool, Row, SqliteTx, Tx};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "PostgreSQL {url}: cannot connect; check that the server runs and the URL's host, port, user, password and database"
    )]
    Connect {
        url: String,
        #[source]
        source: r2d2::Error,
    },
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("PostgreSQL: no free connection in the pool ({0}); raise --db-pool or lower the load")]
    Pool(#[from] r2d2::Error),
    #[error("database: column {index} holds {found}, not {expected}")]
    Column {
        index: usize,
        expected: &'static str,
        found: String,
    },
    #[error("database: column {column} holds `{value}`, which this version does not know")]
    Unknown { column: usize, value: String },
    #[error("database: a statement that returns a row returned none")]
    NoRow,
    #[error("database: a value could not be stored: {0}")]
    Encode(#[from] serde_json::Error),
}

impl StoreError {
    /// Whether the database could not take a write for a reason outside the request (a full
    /// disk, a read-only file, another process holding the lock, a server that cannot be
    /// reached), rather than a bug.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Open { source, .. } | StoreError::Sql(source) => matches!(
                source.sqlite_error_code(),
                Some(DiskFull | ReadOnly | DatabaseBusy | DatabaseLocked | SystemIoFailure | CannotOpen)
            ),
            StoreError::Connect { .. } | StoreError::Pool(_) => true,
            // Connection exceptions (08), insufficient resources (53), operator intervention
            // (57: shutdown, cancelled) and a closed connection are the server's state.
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("53") || c.starts_with("57")
                    })
            }
            _ => false,
        }
    }

    fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Sql(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation),
            StoreError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

/// How long stored predictions are kept: the newest `rows` of them, none older than `days`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub rows: u64,
    pub days: u32,
}

/// Schema versions, applied in order, each in one transaction. `{…}` words are rendered for
/// each engine by [`Dialect::render`].
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE models (
    version     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    pipeline    TEXT NOT NULL,
    path        TEXT NOT NULL,
    params      TEXT NOT NULL,
    metrics     TEXT NOT NULL,
    tuning      TEXT NOT NULL,
    accuracy    {real},
    run_id      TEXT,
    status      TEXT NOT NULL DEFAULT 'candidate',
    created_at  TEXT NOT NULL DEFAULT {now},
    promoted_at TEXT
);
CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    params      TEXT NOT NULL,
    stages      TEXT NOT NULL,
    status      TEXT NOT NULL,
    error       TEXT,
    created_at  TEXT NOT NULL DEFAULT {now},
    finished_at TEXT
);
CREATE TABLE run_events (
    run_id      TEXT NOT NULL REFERENCES runs(id),
    stage       TEXT NOT NULL,
    state       TEXT NOT NULL,
    duration_ms {int},
    metrics     TEXT,
    error       TEXT,
    at          TEXT NOT NULL DEFAULT {now}
);
CREATE INDEX run_events_run ON run_events(run_id);
CREATE TABLE run_logs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    seq    {int} NOT NULL,
    stage  TEXT NOT NULL,
    line   TEXT NOT NULL,
    at     TEXT NOT NULL DEFAULT {now},
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE api_keys (
    id         {id},
    hash       TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL,
    label      TEXT,
    created_at TEXT NOT NULL DEFAULT {now}
);
"#,
    r#"
CREATE TABLE predictions (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    version     TEXT NOT NULL,
    score       {real} NOT NULL,
    label       TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    text        TEXT,
    chars       {int} NOT NULL,
    created_at  TEXT NOT NULL DEFAULT {now}
);
CREATE TABLE feedback (
    prediction_id TEXT PRIMARY KEY,
    label         TEXT NOT NULL,
    correct       {int} NOT NULL,
    created_at    TEXT NOT NULL DEFAULT {now}
);
CREATE TABLE drift_evaluations (
    id         {id},
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    status     TEXT NOT NULL,
    report     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT {now}
);
"#,
    r#"
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;
"#,
    r#"
CREATE INDEX predictions_created_at ON predictions (created_at);
CREATE INDEX drift_evaluations_created_at ON drift_evaluations (created_at);
"#,
    // Replicas: a run belongs to the replica that started it for as long as that replica renews
    // its lease; one run per pipeline at a time, whichever replica asks; events in the order
    // they were added; each drift evaluation names the replica whose window it measured.
    r#"
ALTER TABLE runs ADD COLUMN owner TEXT;
ALTER TABLE runs ADD COLUMN lease_until_ms {int};
CREATE UNIQUE INDEX runs_one_running ON runs (pipeline) WHERE status = 'running';
ALTER TABLE run_events ADD COLUMN seq {int};
UPDATE run_events SET seq = {rowid};
ALTER TABLE drift_evaluations ADD COLUMN replica TEXT;
"#,
    // Pruning orders the predictions by time, then id: the index gives that order without a sort.
    r#"
DROP INDEX predictions_created_at;
CREATE INDEX predictions_created_at_id ON predictions (created_at, id);
"#,
    // Retraining: what started each run, its MLflow run, and a cancel asked of a run that
    // another replica owns (picked up when that replica renews its leases).
    r#"
ALTER TABLE runs ADD COLUMN trigger TEXT NOT NULL DEFAULT 'api';
ALTER TABLE runs ADD COLUMN mlflow_run_id TEXT;
ALTER TABLE runs ADD COLUMN cancel_requested {int} NOT NULL DEFAULT 0;
CREATE INDEX runs_created_at ON runs (created_at);
"#,
    // Candidates: why a version was promoted, the canary share of a candidate, and the shadow
    // traffic counts of each candidate, one row per counter so that every replica adds to them.
    r#"
ALTER TABLE models ADD COLUMN reason TEXT;
ALTER TABLE models ADD COLUMN canary_percent {int} NOT NULL DEFAULT 0;
CREATE TABLE shadow_counts (
    version TEXT NOT NULL,
    counter TEXT NOT NULL,
    n       {int} NOT NULL,
    PRIMARY KEY (version, counter)
);
"#,
];

/// How many predictions one INSERT statement writes.
const ROWS_PER_INSERT: usize = 100;

/// `INSERT INTO predictions` of `rows` rows, their parameters one row after the other.
fn insert_predictions(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let p: Vec<String> = (1..=9).map(|c| format!("?{}", r * 9 + c)).collect();
            format!("({})", p.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO predictions (id, model, version, score, label, text_sha256, text, chars, created_at) VALUES {} ON CONFLICT DO NOTHING",
        values.join(", ")
    )
}

/// The current time as the database's timestamps spell it (UTC, RFC 3339, milliseconds).
fn now_text() -> String {
    time_text(chrono::Utc::now())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `days` before now, spelled as the timestamps are.
fn days_ago_text(days: u32) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days.into()))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}
/// Where a training run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// Stopped by a server that stopped, or left running by one that died.
    Interrupted,
    /// Stopped on request (`POST /training/{id}/cancel`).
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Interrupted,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// What started a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `POST /training`.
    Api,
    /// A drift alert of a served model (the retraining policy).
    Drift,
    /// The retraining policy's `every`.
    Schedule,
}

impl Trigger {
    pub const ALL: [Trigger; 3] = [Trigger::Api, Trigger::Drift, Trigger::Schedule];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Drift => "drift",
            Trigger::Schedule => "schedule",
        }
    }
}

/// Where a registered model version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    /// Registered, not served unless promoted.
    Candidate,
    /// The version served under its name; at most one per name.
    Production,
    /// Was in production until another version was promoted, or a candidate older than a
    /// version promoted since.
    Archived,
    /// A candidate turned down (`POST /models/{version}/reject`): never shadowed again.
    Rejected,
}

impl ModelStatus {
    pub const ALL: [ModelStatus; 4] = [
        ModelStatus::Candidate,
        ModelStatus::Production,
        ModelStatus::Archived,
        ModelStatus::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Candidate => "candidate",
            ModelStatus::Production => "production",
            ModelStatus::Archived => "archived",
            ModelStatus::Rejected => "rejected",
        }
    }
}

/// What [`Store::promote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Promoted,
    /// The version was in production already: nothing changed.
    AlreadyProduction,
    NotFound,
}

/// What [`Store::set_canary`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryChange {
    /// Set on the candidate under evaluation of `name` (or ended).
    Set {
        name: String,
    },
    NotFound,
    NotCandidate(ModelStatus),
    /// A candidate, but not the one under evaluation of `name`: that is `evaluated` (none while
    /// `name` has no production version to compare with).
    NotEvaluated {
        name: String,
        evaluated: Option<String>,
    },
}

/// Why a version was promoted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromotionReason {
    pub by: PromotedBy,
    /// The candidate's shadow figures when the gate promoted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowFigures>,
}

impl PromotionReason {
    pub fn by(by: PromotedBy) -> PromotionReason {
        PromotionReason { by, shadow: None }
    }
}

/// What promoted a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromotedBy {
    /// Its shadow figures met the promotion gate.
    Gate,
    /// No version of its name was served, or (without a gate) its validation accuracy beat production's.
    Accuracy,
    /// `POST /models/{version}/promote`.
    Manual,
}

/// What a candidate's shadow traffic shows so far, over every server of the database; null
/// where nothing measures it yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowFigures {
    /// The version it was compared with (the production one).
    pub production_version: Option<String>,
    /// Predictions the candidate also scored.
    pub shadowed: u64,
    /// Predictions not shadowed because the shadow queue was full.
    pub dropped: u64,
    /// Share of shadowed predictions where the candidate's label is production's.
    pub agreement: Option<f64>,
    pub disagreement: Option<f64>,
    /// Population stability index of the candidate's scores against production's.
    pub psi: Option<f64>,
    /// Shadowed predictions that received feedback.
    pub feedback: u64,
    /// The candidate's accuracy on those.
    pub accuracy: Option<f64>,
    /// Production's accuracy on the same predictions.
    pub production_accuracy: Option<f64>,
    pub accuracy_gain: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// Additive counts of a candidate's shadow traffic: what one server adds at a flush, or their
/// sum over every server. Stored as one row per counter (see [`ShadowCounts::named`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowCounts {
    pub shadowed: u64,
    pub dropped: u64,
    pub agreed: u64,
    pub feedback: u64,
    pub candidate_correct: u64,
    pub production_correct: u64,
    pub candidate_scores: [u64; SCORE_BINS],
    pub production_scores: [u64; SCORE_BINS],
    /// Candidate latencies by bucket ([`latency_bucket`]).
    pub latency: BTreeMap<u32, u64>,
}

/// The latency bucket of `micros`: quarter octaves, so a percentile read back is within 19%.
pub fn latency_bucket(micros: u64) -> u32 {
    ((micros.max(1) as f64).log2() * 4.0).floor() as u32
}

/// The upper bound of latency bucket `b`, in milliseconds.
fn latency_bound_ms(b: u32) -> f64 {
    2f64.powf(f64::from(b + 1) / 4.0) / 1000.0
}

impl ShadowCounts {
    /// The non-zero counters, by their stored names.
    fn named(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("shadowed".to_string(), self.shadowed),
            ("dropped".into(), self.dropped),
            ("agreed".into(), self.agreed),
            ("feedback".into(), self.feedback),
            ("candidate_correct".into(), self.candidate_correct),
            ("production_correct".into(), self.production_correct),
        ];
        for (i, n) in self.candidate_scores.iter().enumerate() {
            out.push((format!("candidate_score.{i}"), *n));
        }
        for (i, n) in self.production_scores.iter().enumerate() {
            out.push((format!("production_score.{i}"), *n));
        }
        for (b, n) in &self.latency {
            out.push((format!("latency.{b}"), *n));
        }
        out.retain(|(_, n)| *n > 0);
        out
    }

    /// Adds a stored counter; names this version does not know are ignored.
    fn add_named(&mut self, name: &str, n: u64) {
        let bin = |i: &str| i.parse::<usize>().ok().filter(|i| *i < SCORE_BINS);
        match name.split_once('.') {
            None => match name {
                "shadowed" => self.shadowed += n,
                "dropped" => self.dropped += n,
                "agreed" => self.agreed += n,
                "feedback" => self.feedback += n,
                "candidate_correct" => self.candidate_correct += n,
                "production_correct" => self.production_correct += n,
                _ => {}
            },
            Some(("candidate_score", i)) => {
                if let Some(i) = bin(i) {
                    self.candidate_scores[i] += n;
                }
            }
            Some(("production_score", i)) => {
                if let Some(i) = bin(i) {
                    self.production_scores[i] += n;
                }
            }
            Some(("latency", b)) => {
                if let Ok(b) = b.parse() {
                    *self.latency.entry(b).or_default() += n;
                }
            }
            Some(_) => {}
        }
    }

    /// The figures these counts give.
    pub fn figures(&self, production_version: Option<String>) -> ShadowFigures {
        let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
        let agreement = share(self.agreed, self.shadowed);
        let accuracy = share(self.candidate_correct, self.feedback);
        let production_accuracy = share(self.production_correct, self.feedback);
        let shares = |bins: &[u64]| -> Vec<f64> {
            let total: u64 = bins.iter().sum();
            bins.iter().map(|&n| n as f64 / total.max(1) as f64).collect()
        };
        let percentile = |q: f64| -> Option<f64> {
            let total: u64 = self.latency.values().sum();
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            self.latency.iter().find_map(|(b, n)| {
                seen += n;
                (seen >= rank).then(|| latency_bound_ms(*b))
            })
        };
        ShadowFigures {
            production_version,
            shadowed: self.shadowed,
            dropped: self.dropped,
            agreement,
            disagreement: agreement.map(|a| 1.0 - a),
            psi: (self.shadowed > 0).then(|| psi(&shares(&self.production_scores), &shares(&self.candidate_scores))),
            feedback: self.feedback,
            accuracy,
            production_accuracy,
            accuracy_gain: accuracy.zip(production_accuracy).map(|(c, p)| c - p),
            latency_p50_ms: percentile(0.5),
            latency_p99_ms: percentile(0.99),
        }
    }
}

/// A stage's state in a run's events: `running` once it starts, then how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    Running,
    Ended(State),
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Running => "running",
            EventState::Ended(state) => state.as_str(),
        }
    }
}

impl From<State> for EventState {
    fn from(state: State) -> Self {
        EventState::Ended(state)
    }
}

/// An API key as `sentiflow keys list` shows it: never the key, nor its hash.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct KeyRow {
    pub id: i64,
    pub label: Option<String>,
    pub role: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// A prediction as the drift monitor keeps it: the text only when the server is told to.
#[derive(Debug, Clone)]
pub struct PredictionRow {
    pub id: String,
    pub model: String,
    pub version: String,
    pub score: f64,
    pub label: String,
    pub text_sha256: String,
    pub text: Option<String>,
    pub chars: usize,
}

/// A stored drift evaluation.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DriftRecord {
    pub model: String,
    pub version: String,
    pub status: Status,
    /// The model's report as it was stored: a serialized `WindowReport`, kept as the JSON it was
    /// written as, so a report of an earlier version still reads.
    #[schemars(with = "WindowReport")]
    pub report: Value,
    /// When it was stored (UTC, RFC 3339).
    pub at: String,
    /// The server whose window it measured (absent for evaluations stored before replicas).
    pub replica: Option<String>,
}

/// A registered model version.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ModelRow {
    pub version: String,
    pub name: String,
    pub kind: String,
    pub pipeline: String,
    pub path: String,
    /// The hyper-parameters that produced it (absent for versions registered without them).
    pub params: Option<Parameters>,
    /// Its validation figures.
    pub metrics: Figures,
    /// The search that chose its hyper-parameters, if there was one.
    pub tuning: Option<Tuning>,
    pub accuracy: Option<f64>,
    pub run_id: Option<String>,
    pub status: ModelStatus,
    pub created_at: String,
    pub promoted_at: Option<String>,
    /// Why it was promoted (absent for versions promoted before reasons were recorded).
    pub reason: Option<PromotionReason>,
    /// The share of its name's predictions a candidate answers (`POST /models/{version}/canary`).
    pub canary_percent: u8,
}

/// A training run and what happened in it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: String,
    pub pipeline: String,
    /// The parameters the run was asked for.
    pub params: BTreeMap<String, ParamValue>,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub mlflow_run_id: Option<String>,
    pub events: Vec<RunEvent>,
}

/// A stage of a run that started or ended.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub stage: String,
    pub state: String,
    pub duration_ms: u64,
    pub metrics: Figures,
    pub error: Option<String>,
}

/// A training run as `GET /training` lists it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunSummary {
    pub id: String,
    pub pipeline: String,
    pub status: RunStatus,
    pub trigger: Trigger,
    /// When it started (UTC, RFC 3339).
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Seconds from start to end, or so far while it runs.
    pub duration_s: Option<f64>,
    pub error: Option<String>,
    /// The MLflow run it was tracked as, when tracking is on.
    pub mlflow_run_id: Option<String>,
}

/// Which runs `Store::runs` lists: every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    pub trigger: Option<Trigger>,
    pub limit: u32,
    pub offset: u64,
}

/// A timestamp as the database spells it, read back.
fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn time_text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The pool of a store that is not being dropped.
fn live(pool: &Option<Pool>) -> &Pool {
    pool.as_ref().expect("the pool is taken only when the store is dropped")
}

/// How long a request waits for a database connection before it is answered `503`: a replica
/// whose database is down answers promptly instead of holding its clients for the pool's timeout.
pub const REQUEST_WAIT: Duration = Duration::from_millis(1500);

/// How long work off the request path (trainings, drift evaluations, shadow counts) waits.
const BACKGROUND_WAIT: Duration = Duration::from_secs(10);

thread_local! {
    /// The wait of the work on this thread, when it serves a request.
    static WAIT: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

/// Runs `f`, a request's work, with its database waits bounded by [`REQUEST_WAIT`].
pub fn with_request_wait<T>(f: impl FnOnce() -> T) -> T {
    let before = WAIT.replace(Some(REQUEST_WAIT));
    let out = f();
    WAIT.set(before);
    out
}

/// A connection from the pool, waited for as long as the work on this thread may.
fn client(
    pool: &Option<Pool>,
) -> Result<r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>, StoreError> {
    let wait = WAIT.get().unwrap_or(BACKGROUND_WAIT);
    Ok(live(pool).get_timeout(wait)?)
}

/// What a request to start a run found.
#[derive(Debug, PartialEq, Eq)]
pub enum NewRun {
    Created,
    /// The pipeline is being trained by this run (on this or another replica).
    Busy(String),
    /// An automatic run of the pipeline started within the cooldown; none before this time.
    Cooling(String),
}

// One per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Sqlite {
        conn: Mutex<rusqlite::Connection>,
        /// A second connection for the reads on every request's path (API keys): in WAL mode
        /// it never waits for a write in progress on `conn`, such as a period's predictions.
        auth: Mutex<rusqlite::Connection>,
    },
    Postgres {
        /// Taken when the store is dropped, to close the connections off the async runtime.
        pool: Option<Pool>,
        /// Counts the changes announced on [`sql::CHANGES_CHANNEL`].
        changes: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
        /// A run's log lines are numbered in order; this replica writes its own runs' lines.
        logs: Mutex<()>,
    },
}

pub struct Store {
    engine: Engine,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Engine::Postgres { stop, pool, .. } = &mut self.engine {
            stop.store(true, Ordering::Relaxed);
            let pool = pool.take();
            off_runtime(|| drop(pool));
        }
    }
}

fn json(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
}

impl Store {
    /// Opens the database at `location` with at most `pool` connections (PostgreSQL), applying
    /// the migrations it has not had.
    pub fn open(location: &Location, pool: u32) -> Result<Store, StoreError> {
        match location {
            Location::Sqlite(path) => Store::open_sqlite(path),
            Location::Postgres(url) => off_runtime(|| Store::open_postgres(url, pool)),
        }
    }

    fn open_sqlite(path: &std::path::Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = sql::open_sqlite(path).map_err(err)?;
        let applied: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(&Dialect::Sqlite.render(migration)).map_err(err)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        let auth = rusqlite::Connection::open(path).map_err(err)?;
        auth.pragma_update(None, "query_only", "ON").map_err(err)?;
        auth.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        Ok(Store {
            engine: Engine::Sqlite {
                conn: Mutex::new(conn),
                auth: Mutex::new(auth),
            },
        })
    }

    fn open_postgres(url: &str, size: u32) -> Result<Store, StoreError> {
        let config: postgres::Config = url.parse().map_err(StoreError::Postgres)?;
        let manager = r2d2_postgres::PostgresConnectionManager::new(config, postgres::NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(size.max(1))
            .connection_timeout(BACKGROUND_WAIT)
            // Each failed attempt would be logged; the error returned says it once.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(manager)
            .map_err(|source| StoreError::Connect {
                url: sql::redact(url),
                source,
            })?;
        let mut client = pool.get()?;
        let mut tx = client.transaction()?;
        // One process migrates at a time; the others wait here, then find nothing to do.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7715514281); CREATE TABLE IF NOT EXISTS sentiflow_schema (version BIGINT NOT NULL)",
        )?;
        let applied = tx
            .query_opt("SELECT version FROM sentiflow_schema", &[])?
            .map_or(0, |r| r.get::<_, i64>(0) as usize);
        for migration in MIGRATIONS.iter().skip(applied) {
            tx.batch_execute(&Dialect::Postgres.render(migration))?;
        }
        tx.execute("DELETE FROM sentiflow_schema", &[])?;
        tx.execute(
            "INSERT INTO sentiflow_schema (version) VALUES ($1)",
            &[&(MIGRATIONS.len() as i64)],
        )?;
        tx.commit()?;
        drop(client);
        let changes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        sql::listen(url.to_string(), changes.clone(), stop.clone());
        Ok(Store {
            engine: Engine::Postgres {
                pool: Some(pool),
                changes,
                stop,
                logs: Mutex::new(()),
            },
        })
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    fn write<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.engine {
            Engine::Sqlite { conn, .. } => {
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let tx = conn.transaction()?;
                let out = f(&mut SqliteTx(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Engine::Postgres { pool, .. } => off_runtime(|| {
                let mut client = client(pool)?;
                let mut tx = client.transaction()?;
                let out = f(&mut PgTx(&mut tx))?;
                tx.commit()?;
                Ok(out)
            }),
        }
    }

    /// Like [`Store::write`], and announces the change to the other replicas when it commits.
    fn write_announced<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let postgres = matches!(self.engine, Engine::Postgres { .. });
        self.write(|tx| {
            let out = f(tx)?;
            if postgres {
                // Delivered on commit, and only then.
                tx.execute(&format!("NOTIFY {}", sql::CHANGES_CHANNEL), &[])?;
            }
            Ok(out)
        })
    }

    /// Reads on the request path (keys): SQLite's second connection, or the pool.
    fn read_auth<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.engine {
            Engine::Sqlite { auth, .. } => {
                let conn = auth.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut SqliteTx(&conn))
            }
            Engine::Postgres { .. } => self.write(f),
        }
    }

    // --- drift monitoring ---

    pub fn add_predictions(&self, rows: &[PredictionRow]) -> Result<(), StoreError> {
        // A transaction per chunk: the connection is free between them for the requests that
        // write (feedback, promotion).
        for chunk in rows.chunks(2_000) {
            let now = now_text();
            self.write(|tx| {
                // Many rows a statement: on PostgreSQL each statement is a round trip and a
                // statement's overhead, which row by row cost more than the rows themselves.
                for group in chunk.chunks(ROWS_PER_INSERT) {
                    let params: Vec<Param> = group
                        .iter()
                        .flat_map(|r| {
                            [
                                Param::from(&r.id),
                                Param::from(&r.model),
                                Param::from(&r.version),
                                Param::from(r.score),
                                Param::from(&r.label),
                                Param::from(&r.text_sha256),
                                Param::from(r.text.as_deref()),
                                Param::from(r.chars as i64),
                                Param::from(&now),
                            ]
                        })
                        .collect();
                    tx.execute(&insert_predictions(group.len()), &params)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Deletes the predictions (with their feedback) and drift evaluations that `keep` no longer
    /// covers; returns how many predictions stay. Freed pages are reused by later inserts, so
    /// the database stops growing once the retention is reached.
    pub fn prune(&self, keep: Retention) -> Result<u64, StoreError> {
        let cutoff = days_ago_text(keep.days);
        self.write(|tx| {
            let mut removed = tx.execute("DELETE FROM predictions WHERE created_at < ?1", params![&cutoff])?;
            let mut count = tx.query_one("SELECT count(*) FROM predictions", &[])?.int(0)? as u64;
            // Finding the oldest row to keep walks `rows` rows: only worth it past the bound.
            if count > keep.rows {
                // Newest first by time, then id: exactly `rows` stay even when a period's rows
                // share a timestamp.
                let over = tx.execute(
                    "DELETE FROM predictions WHERE (created_at, id) <= (SELECT created_at, id FROM predictions
                     ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET ?1)",
                    params![keep.rows as i64],
                )?;
                removed += over;
                count = count.saturating_sub(over);
            }
            if removed > 0 {
                tx.execute(
                    "DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.id = feedback.prediction_id)",
                    &[],
                )?;
            }
            tx.execute("DELETE FROM drift_evaluations WHERE created_at < ?1", params![&cutoff])?;
            Ok(count)
        })
    }

    /// The model, version and label of a stored prediction.
    pub fn prediction(&self, id: &str) -> Result<Option<(String, String, String)>, StoreError> {
        self.write(|tx| {
            tx.query_opt(
                "SELECT model, version, label FROM predictions WHERE id = ?1",
                params![id],
            )?
            .map(|r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))
            .transpose()
        })
    }

    /// Records the true label of a prediction; false when it already had one.
    pub fn add_feedback(&self, prediction_id: &str, label: &str, correct: bool) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO feedback (prediction_id, label, correct, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                params![prediction_id, label, correct, &now_text()],
            )?;
            Ok(n == 1)
        })
    }

    /// Stores an evaluation of `model`'s window on `replica`.
    pub fn add_drift(&self, model: &str, replica: &str, report: &WindowReport) -> Result<(), StoreError> {
        let text = serde_json::to_string(report)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO drift_evaluations (model, version, status, report, replica, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    model,
                    &report.version,
                    report.report.status.as_str(),
                    &text,
                    replica,
                    &now_text()
                ],
            )
        })?;
        Ok(())
    }

    /// The latest stored drift evaluations, newest first.
    pub fn drift_history(&self, limit: usize) -> Result<Vec<DriftRecord>, StoreError> {
        self.write(|tx| {
            tx.query(
                "SELECT model, version, status, report, created_at, replica FROM drift_evaluations
                 ORDER BY created_at DESC, id DESC LIMIT ?1",
                params![limit as i64],
            )?
            .iter()
            .map(|r| {
                Ok(DriftRecord {
                    model: r.text(0)?,
                    version: r.text(1)?,
                    status: r
                        .text(2)?
                        .parse()
                        .map_err(|value| StoreError::Unknown { column: 2, value })?,
                    report: json(r.opt_text(3)?),
                    at: r.text(4)?,
                    replica: r.opt_text(5)?,
                })
            })
            .collect()
        })
    }

    // --- API keys ---

    pub fn add_key(&self, hash: &str, role: &str, label: Option<&str>) -> Result<i64, StoreError> {
        self.write_announced(|tx| {
            tx.query_one(
                "INSERT INTO api_keys (hash, role, label, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![hash, role, label, &now_text()],
            )?
            .int(0)
        })
    }

    /// The role of the unrevoked key whose SHA-256 is `hash`, with the key's id.
    pub fn key_role(&self, hash: &str) -> Result<Option<(i64, String, Option<String>)>, StoreError> {
        self.read_auth(|tx| {
            tx.query_opt(
                "SELECT id, role, label FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
                params![hash],
            )?
            .map(|r| Ok((r.int(0)?, r.text(1)?, r.opt_text(2)?)))
            .transpose()
        })
    }

    /// Every key, oldest first, without its hash.
    pub fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.write(|tx| {
            tx.query(
                "SELECT id, label, role, created_at, last_used_at, revoked_at FROM api_keys ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(KeyRow {
                    id: r.int(0)?,
                    label: r.opt_text(1)?,
                    role: r.text(2)?,
                    created_at: r.text(3)?,
                    last_used_at: r.opt_text(4)?,
                    revoked_at: r.opt_text(5)?,
                })
            })
            .collect()
        })
    }

    pub fn revoke_key(&self, id: i64) -> Result<(), StoreError> {
        self.write_announced(|tx| {
            tx.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, &now_text()],
            )
            .map(drop)
        })
    }

    /// Records that key `id` was used now, unless the database is busy with another write
    /// (then `false`: it is bookkeeping, not worth a wait).
    pub fn try_touch_key(&self, id: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1";
        let now = now_text();
        match &self.engine {
            Engine::Sqlite { conn, .. } => {
                let conn = match conn.try_lock() {
                    Ok(c) => c,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
                };
                SqliteTx(&conn).execute(sql, params![id, &now])?;
            }
            Engine::Postgres { pool, .. } => {
                return off_runtime(|| {
                    let Some(mut client) = live(pool).try_get() else {
                        return Ok(false);
                    };
                    let mut tx = client.transaction()?;
                    PgTx(&mut tx).execute(sql, params![id, &now])?;
                    tx.commit()?;
                    Ok(true)
                })
            }
        }
        Ok(true)
    }

    /// A number that changes whenever a change to the keys or the registry may have been
    /// committed by another process (or by this store): SQLite's `data_version`, asked on the
    /// connection for keys, or the count of PostgreSQL's notifications. Cheap enough to ask on
    /// every request.
    pub fn outside_changes(&self) -> Result<i64, StoreError> {
        match &self.engine {
            Engine::Sqlite { auth, .. } => {
                let c = auth.lock().unwrap_or_else(|p| p.into_inner());
                // Asked on every request: the prepared statement is kept.
                let version = c.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
                Ok(version)
            }
            Engine::Postgres { changes, .. } => Ok(changes.load(Ordering::SeqCst) as i64),
        }
    }

    // --- models ---

    pub fn register_model(&self, m: &ModelRow) -> Result<bool, StoreError> {
        self.write_announced(|tx| {
            let n = tx.execute(
                "INSERT INTO models (version, name, kind, pipeline, path, params, metrics, tuning, accuracy, run_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING",
                params![
                    &m.version,
                    &m.name,
                    &m.kind,
                    &m.pipeline,
                    &m.path,
                    &serde_json::to_string(&m.params)?,
                    &serde_json::to_string(&m.metrics)?,
                    &serde_json::to_string(&m.tuning)?,
                    m.accuracy,
                    m.run_id.as_deref(),
                    &now_text()
                ],
            )?;
            if n == 1 {
                // The newest candidate is the one under evaluation: the canaries of the others end.
                tx.execute(
                    "UPDATE models SET canary_percent = 0 WHERE name = ?1 AND version <> ?2 AND status = ?3",
                    params![&m.name, &m.version, ModelStatus::Candidate.as_str()],
                )?;
            }
            Ok(n == 1)
        })
    }

    /// Marks `version` as the production model of its name for `reason`: the previous one and
    /// the candidates older than `version` are archived, and every canary of the name ends. A
    /// version already in production is left as it is.
    pub fn promote(&self, version: &str, reason: &PromotionReason) -> Result<Promotion, StoreError> {
        let reason = serde_json::to_string(reason)?;
        self.write_announced(|tx| {
            let Some(row) = tx.query_opt(
                "SELECT name, status, created_at FROM models WHERE version = ?1",
                params![version],
            )?
            else {
                return Ok(Promotion::NotFound);
            };
            let (name, created_at) = (row.text(0)?, row.text(2)?);
            if row.named(1, &ModelStatus::ALL, ModelStatus::as_str)? == ModelStatus::Production {
                return Ok(Promotion::AlreadyProduction);
            }
            tx.execute(
                "UPDATE models SET status = ?2 WHERE name = ?1 AND status = ?3",
                params![&name, ModelStatus::Archived.as_str(), ModelStatus::Production.as_str()],
            )?;
            tx.execute(
                "UPDATE models SET status = ?2 WHERE name = ?1 AND status = ?3 AND version <> ?4
                 AND (created_at < ?5 OR (created_at = ?5 AND version < ?4))",
                params![
                    &name,
                    ModelStatus::Archived.as_str(),
                    ModelStatus::Candidate.as_str(),
                    version,
                    &created_at
                ],
            )?;
            tx.execute("UPDATE models SET canary_percent = 0 WHERE name = ?1", params![&name])?;
            tx.execute(
                "UPDATE models SET status = ?2, promoted_at = ?3, reason = ?4 WHERE version = ?1",
                params![version, ModelStatus::Production.as_str(), &now_text(), &reason],
            )?;
            Ok(Promotion::Promoted)
        })
    }

    /// Rejects candidate `version` and ends its canary; returns its status before (`None`: no
    /// such version), so nothing changes unless it was a candidate.
    pub fn reject(&self, version: &str) -> Result<Option<ModelStatus>, StoreError> {
        self.write_announced(|tx| {
            let status = Self::status_of(tx, version)?;
            if status == Some(ModelStatus::Candidate) {
                tx.execute(
                    "UPDATE models SET status = ?2, canary_percent = 0 WHERE version = ?1",
                    params![version, ModelStatus::Rejected.as_str()],
                )?;
            }
            Ok(status)
        })
    }

    /// Sets the canary share of `version` when it is the candidate under evaluation of its name
    /// (the newest candidate of a name served in production), or ends it (0) whatever it is.
    pub fn set_canary(&self, version: &str, percent: u8) -> Result<CanaryChange, StoreError> {
        self.write_announced(|tx| {
            let Some(row) = tx.query_opt("SELECT name, status FROM models WHERE version = ?1", params![version])?
            else {
                return Ok(CanaryChange::NotFound);
            };
            let (name, status) = (row.text(0)?, row.named(1, &ModelStatus::ALL, ModelStatus::as_str)?);
            if percent > 0 {
                if status != ModelStatus::Candidate {
                    return Ok(CanaryChange::NotCandidate(status));
                }
                let sql = "SELECT version FROM models m WHERE name = ?1 AND status = ?2 AND EXISTS
                     (SELECT 1 FROM models p WHERE p.name = m.name AND p.status = ?3)
                     ORDER BY created_at DESC, version DESC LIMIT 1";
                let evaluated = tx
                    .query_opt(
                        sql,
                        params![&name, ModelStatus::Candidate.as_str(), ModelStatus::Production.as_str()],
                    )?
                    .map(|r| r.text(0))
                    .transpose()?;
                if evaluated.as_deref() != Some(version) {
                    return Ok(CanaryChange::NotEvaluated { name, evaluated });
                }
            }
            tx.execute(
                "UPDATE models SET canary_percent = ?2 WHERE version = ?1",
                params![version, i64::from(percent)],
            )?;
            Ok(CanaryChange::Set { name })
        })
    }

    fn status_of(tx: &mut dyn Tx, version: &str) -> Result<Option<ModelStatus>, StoreError> {
        tx.query_opt("SELECT status FROM models WHERE version = ?1", params![version])?
            .map(|r| r.named(0, &ModelStatus::ALL, ModelStatus::as_str))
            .transpose()
    }

    /// The candidate under evaluation of each name that has a production version: its newest
    /// candidate.
    pub fn candidates(&self) -> Result<Vec<ModelRow>, StoreError> {
        let rows: Vec<ModelRow> = self.write(|tx| {
            let sql = format!(
                "SELECT {} FROM models m WHERE status = ?1 AND EXISTS
                 (SELECT 1 FROM models p WHERE p.name = m.name AND p.status = ?2)
                 ORDER BY name, created_at DESC, version DESC",
                Self::MODEL_COLUMNS
            );
            tx.query(
                &sql,
                params![ModelStatus::Candidate.as_str(), ModelStatus::Production.as_str()],
            )?
            .iter()
            .map(Self::model_row)
            .collect()
        })?;
        let mut newest: Vec<ModelRow> = Vec::new();
        for row in rows {
            if newest.last().is_none_or(|n| n.name != row.name) {
                newest.push(row);
            }
        }
        Ok(newest)
    }

    /// Adds a server's shadow counts of candidate `version` to those of every server.
    pub fn add_shadow(&self, version: &str, counts: &ShadowCounts) -> Result<(), StoreError> {
        let named = counts.named();
        self.write(|tx| {
            for (counter, n) in &named {
                tx.execute(
                    "INSERT INTO shadow_counts (version, counter, n) VALUES (?1, ?2, ?3)
                     ON CONFLICT (version, counter) DO UPDATE SET n = shadow_counts.n + excluded.n",
                    params![version, counter, *n as i64],
                )?;
            }
            Ok(())
        })
    }

    /// The shadow counts of `version`, summed over every server.
    pub fn shadow(&self, version: &str) -> Result<ShadowCounts, StoreError> {
        self.write(|tx| {
            let mut counts = ShadowCounts::default();
            for r in tx.query(
                "SELECT counter, n FROM shadow_counts WHERE version = ?1",
                params![version],
            )? {
                counts.add_named(&r.text(0)?, r.int(1)?.max(0) as u64);
            }
            Ok(counts)
        })
    }

    const MODEL_COLUMNS: &'static str =
        "version, name, kind, pipeline, path, params, metrics, tuning, accuracy, run_id, status, created_at, promoted_at, reason, canary_percent";

    fn model_row(r: &Row) -> Result<ModelRow, StoreError> {
        Ok(ModelRow {
            version: r.text(0)?,
            name: r.text(1)?,
            kind: r.text(2)?,
            pipeline: r.text(3)?,
            path: r.text(4)?,
            // Written by this version or an earlier one: what no longer fits is left out.
            params: serde_json::from_value(json(r.opt_text(5)?)).ok(),
            metrics: typed_entries(&json(r.opt_text(6)?)),
            tuning: serde_json::from_value(json(r.opt_text(7)?)).ok(),
            accuracy: r.opt_real(8)?,
            run_id: r.opt_text(9)?,
            status: r.named(10, &ModelStatus::ALL, ModelStatus::as_str)?,
            created_at: r.text(11)?,
            promoted_at: r.opt_text(12)?,
            // A reason this version cannot read is left out, not an error: it is information.
            reason: r.opt_text(13)?.and_then(|t| serde_json::from_str(&t).ok()),
            canary_percent: u8::try_from(r.int(14)?).unwrap_or(0),
        })
    }

    pub fn models(&self) -> Result<Vec<ModelRow>, StoreError> {
        self.write(|tx| {
            let sql = format!(
                "SELECT {} FROM models ORDER BY created_at DESC, version",
                Self::MODEL_COLUMNS
            );
            tx.query(&sql, &[])?.iter().map(Self::model_row).collect()
        })
    }

    pub fn model(&self, version: &str) -> Result<Option<ModelRow>, StoreError> {
        self.write(|tx| {
            let sql = format!("SELECT {} FROM models WHERE version = ?1", Self::MODEL_COLUMNS);
            tx.query_opt(&sql, params![version])?
                .as_ref()
                .map(Self::model_row)
                .transpose()
        })
    }

    /// The production version of each model name.
    pub fn production(&self) -> Result<Vec<ModelRow>, StoreError> {
        self.write(|tx| {
            let sql = format!(
                "SELECT {} FROM models WHERE status = ?1 ORDER BY name",
                Self::MODEL_COLUMNS
            );
            tx.query(&sql, params![ModelStatus::Production.as_str()])?
                .iter()
                .map(Self::model_row)
                .collect()
        })
    }

    // --- training runs ---

    /// Records run `id` of `pipeline`, started by `trigger`, as running on `owner`, leased for
    /// `lease`, unless a run of the pipeline is running (on any replica) or, with a `cooldown`,
    /// an automatic run of it started less than that long ago: runs whose lease ran out are
    /// interrupted first. One transaction, so replicas that ask at once agree.
    #[allow(clippy::too_many_arguments)]
    pub fn create_run(
        &self,
        id: &str,
        pipeline: &str,
        trigger: Trigger,
        params: &Value,
        stages: &Value,
        owner: &str,
        lease: Duration,
        cooldown: Option<Duration>,
    ) -> Result<NewRun, StoreError> {
        let busy = |tx: &mut dyn Tx| -> Result<Option<String>, StoreError> {
            tx.query_opt(
                "SELECT id FROM runs WHERE pipeline = ?1 AND status = ?2",
                params![pipeline, RunStatus::Running.as_str()],
            )?
            .map(|r| r.text(0))
            .transpose()
        };
        self.expire_leases()?;
        let created = self.write(|tx| {
            if let Some(running) = busy(tx)? {
                return Ok(NewRun::Busy(running));
            }
            if let Some(cooldown) = cooldown {
                let last = tx
                    .query_one(
                        "SELECT MAX(created_at) FROM runs WHERE pipeline = ?1 AND trigger <> ?2",
                        params![pipeline, Trigger::Api.as_str()],
                    )?
                    .opt_text(0)?;
                let until = last
                    .as_deref()
                    .and_then(parse_time)
                    .and_then(|t| t.checked_add_signed(chrono::Duration::from_std(cooldown).ok()?));
                if let Some(until) = until.filter(|u| *u > chrono::Utc::now()) {
                    return Ok(NewRun::Cooling(time_text(until)));
                }
            }
            tx.execute(
                "INSERT INTO runs (id, pipeline, trigger, params, stages, status, owner, lease_until_ms, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    pipeline,
                    trigger.as_str(),
                    &params.to_string(),
                    &stages.to_string(),
                    RunStatus::Running.as_str(),
                    owner,
                    now_ms() + lease.as_millis() as i64,
                    &now_text()
                ],
            )?;
            Ok(NewRun::Created)
        });
        match created {
            // Another replica's insert won the race (the one-running-run index refused ours).
            Err(e) if e.is_unique_violation() => Ok(NewRun::Busy(self.write(busy)?.unwrap_or_default())),
            other => other,
        }
    }

    /// When the last run of `pipeline` started by `trigger` started.
    pub fn last_run_at(&self, pipeline: &str, trigger: Trigger) -> Result<Option<String>, StoreError> {
        self.write(|tx| {
            tx.query_one(
                "SELECT MAX(created_at) FROM runs WHERE pipeline = ?1 AND trigger = ?2",
                params![pipeline, trigger.as_str()],
            )?
            .opt_text(0)
        })
    }

    /// Records the MLflow run that tracked run `id`.
    pub fn set_mlflow_run(&self, id: &str, mlflow_run_id: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET mlflow_run_id = ?2 WHERE id = ?1",
                params![id, mlflow_run_id],
            )
            .map(drop)
        })
    }

    /// Asks the replica that owns running run `id` to cancel it; false when it is not running.
    pub fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE id = ?1 AND status = ?2",
                params![id, RunStatus::Running.as_str()],
            )
            .map(|n| n == 1)
        })
    }

    /// The running runs of `owner` whose cancel was asked through another replica.
    pub fn cancel_requests(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            tx.query(
                "SELECT id FROM runs WHERE owner = ?1 AND status = ?2 AND cancel_requested = 1",
                params![owner, RunStatus::Running.as_str()],
            )?
            .iter()
            .map(|r| r.text(0))
            .collect()
        })
    }

    /// The runs `filter` selects, newest first, and how many it selects without its paging.
    pub fn runs(&self, filter: &RunFilter) -> Result<(Vec<RunSummary>, u64), StoreError> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Param> = Vec::new();
        let mut add = |column: &str, value| {
            args.push(value);
            clauses.push(format!("{column} = ?{}", args.len()));
        };
        if let Some(p) = &filter.pipeline {
            add("pipeline", Param::Text(p));
        }
        if let Some(s) = filter.status {
            add("status", Param::Text(s.as_str()));
        }
        if let Some(t) = filter.trigger {
            add("trigger", Param::Text(t.as_str()));
        }
        let filter_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let n = args.len();
        self.write(|tx| {
            let total = tx
                .query_one(&format!("SELECT count(*) FROM runs {filter_sql}"), &args)?
                .int(0)? as u64;
            let mut paged = args.clone();
            paged.push(Param::Int(filter.limit.into()));
            paged.push(Param::Int(filter.offset as i64));
            let sql = format!(
                "SELECT id, pipeline, status, trigger, created_at, finished_at, error, mlflow_run_id FROM runs {filter_sql}
                 ORDER BY created_at DESC, id DESC LIMIT ?{} OFFSET ?{}",
                n + 1,
                n + 2
            );
            let now = chrono::Utc::now();
            let runs = tx
                .query(&sql, &paged)?
                .iter()
                .map(|r| {
                    let created_at = r.text(4)?;
                    let finished_at = r.opt_text(5)?;
                    let end = match &finished_at {
                        Some(f) => parse_time(f),
                        None => Some(now),
                    };
                    let duration_s = parse_time(&created_at)
                        .zip(end)
                        .map(|(start, end)| (end - start).num_milliseconds().max(0) as f64 / 1000.0);
                    Ok(RunSummary {
                        id: r.text(0)?,
                        pipeline: r.text(1)?,
                        status: r.named(2, &RunStatus::ALL, RunStatus::as_str)?,
                        trigger: r.named(3, &Trigger::ALL, Trigger::as_str)?,
                        created_at,
                        finished_at,
                        duration_s,
                        error: r.opt_text(6)?,
                        mlflow_run_id: r.opt_text(7)?,
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            Ok((runs, total))
        })
    }

    /// Extends the leases of the runs `owner` is running; returns how many it holds.
    pub fn renew_leases(&self, owner: &str, lease: Duration) -> Result<u64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET lease_until_ms = ?3 WHERE owner = ?1 AND status = ?2",
                params![owner, RunStatus::Running.as_str(), now_ms() + lease.as_millis() as i64],
            )
        })
    }

    /// Runs whose replica stopped renewing their lease are recorded as interrupted.
    pub fn expire_leases(&self) -> Result<u64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = ?1, error = 'the replica running it stopped (its lease ran out)', finished_at = ?3
                 WHERE status = ?2 AND (lease_until_ms IS NULL OR lease_until_ms < ?4)",
                params![
                    RunStatus::Interrupted.as_str(),
                    RunStatus::Running.as_str(),
                    &now_text(),
                    now_ms()
                ],
            )
        })
    }

    pub fn finish_run(&self, id: &str, status: RunStatus, error: Option<&str>) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, status.as_str(), error, &now_text()],
            )
            .map(drop)
        })
    }

    /// Runs left `running` by an earlier life of replica `owner` (the same name, so the same
    /// host and port): they are recorded as interrupted.
    pub fn interrupt_unfinished(&self, owner: &str) -> Result<u64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET status = ?1, error = 'the server stopped during the run', finished_at = ?3
                 WHERE status = ?2 AND (owner = ?4 OR owner IS NULL)",
                params![
                    RunStatus::Interrupted.as_str(),
                    RunStatus::Running.as_str(),
                    &now_text(),
                    owner
                ],
            )
        })
    }

    pub fn add_event(
        &self,
        run: &str,
        stage: &str,
        state: EventState,
        duration_ms: u64,
        metrics: &Value,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO run_events (run_id, seq, stage, state, duration_ms, metrics, error, at)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    run,
                    stage,
                    state.as_str(),
                    duration_ms as i64,
                    &metrics.to_string(),
                    error,
                    &now_text()
                ],
            )
            .map(drop)
        })
    }

    pub fn add_log(&self, run: &str, stage: &str, line: &str) -> Result<(), StoreError> {
        // On PostgreSQL two stages' lines could read the same last number; one at a time here.
        let _one = match &self.engine {
            Engine::Postgres { logs, .. } => Some(logs.lock().unwrap_or_else(|p| p.into_inner())),
            Engine::Sqlite { .. } => None,
        };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO run_logs (run_id, seq, stage, line, at)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM run_logs WHERE run_id = ?1), ?2, ?3, ?4)",
                params![run, stage, line, &now_text()],
            )
            .map(drop)
        })
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        self.write(|tx| {
            let Some(r) = tx.query_opt(
                "SELECT id, pipeline, params, stages, status, error, created_at, finished_at, trigger, mlflow_run_id
                 FROM runs WHERE id = ?1",
                params![id],
            )?
            else {
                return Ok(None);
            };
            let events = tx
                .query(
                    "SELECT stage, state, duration_ms, metrics, error, at FROM run_events WHERE run_id = ?1 ORDER BY seq",
                    params![id],
                )?
                .iter()
                .map(|e| {
                    Ok(RunEvent {
                        stage: e.text(0)?,
                        state: e.text(1)?,
                        duration_ms: e.opt_int(2)?.unwrap_or(0).max(0) as u64,
                        metrics: typed_entries(&json(e.opt_text(3)?)),
                        error: e.opt_text(4)?,
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            Ok(Some(RunRow {
                id: r.text(0)?,
                pipeline: r.text(1)?,
                params: serde_json::from_value(json(r.opt_text(2)?)).unwrap_or_default(),
                status: r.named(4, &RunStatus::ALL, RunStatus::as_str)?,
                trigger: r.named(8, &Trigger::ALL, Trigger::as_str)?,
                error: r.opt_text(5)?,
                created_at: r.text(6)?,
                finished_at: r.opt_text(7)?,
                mlflow_run_id: r.opt_text(9)?,
                events,
            }))
        })
    }

    pub fn logs(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        self.write(|tx| {
            tx.query(
                "SELECT seq, stage, line, at FROM run_logs WHERE run_id = ?1 ORDER BY seq",
                params![id],
            )?
            .iter()
            .map(|r| {
                Ok(serde_json::json!({"seq": r.int(0)?, "stage": r.text(1)?, "line": r.text(2)?, "at": r.text(3)?}))
            })
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(store: &Store, sql: &str) -> Vec<String> {
        store
            .write(|tx| tx.query(sql, &[])?.iter().map(|r| r.text(0)).collect())
            .unwrap()
    }

    fn sqlite(dir: &tempfile::TempDir) -> Store {
        Store::open(&Location::Sqlite(dir.path().join("db.sqlite")), 1).unwrap()
    }

    const LEASE: Duration = Duration::from_secs(60);

    fn model(version: &str) -> ModelRow {
        ModelRow {
            version: version.into(),
            name: "tfidf".into(),
            kind: "tfidf".into(),
            pipeline: "demo".into(),
            path: "/m".into(),
            params: None,
            metrics: Figures::new(),
            tuning: None,
            accuracy: None,
            run_id: None,
            status: ModelStatus::Candidate,
            created_at: String::new(),
            promoted_at: None,
            reason: None,
            canary_percent: 0,
        }
    }

    #[test]
    fn status_names_are_the_serialized_ones() {
        for s in RunStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in ModelStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for t in Trigger::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn states_are_stored_as_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir);

        store
            .create_run("r1", "demo", Trigger::Api, &Value::Null, &Value::Null, "a", LEASE, None)
            .unwrap();
        assert_eq!(store.run("r1").unwrap().unwrap().status, RunStatus::Running);
        store
            .add_event("r1", "load", EventState::Running, 0, &Value::Null, None)
            .unwrap();
        store
            .add_event("r1", "load", State::Ran.into(), 5, &Value::Null, None)
            .unwrap();
        store.finish_run("r1", RunStatus::Succeeded, None).unwrap();
        assert_eq!(text(&store, "SELECT status FROM runs"), ["succeeded"]);
        assert_eq!(
            text(&store, "SELECT state FROM run_events ORDER BY seq"),
            ["running", "ran"]
        );
        let run = store.run("r1").unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.events[1].state, "ran");

        assert_eq!(
            store
                .create_run("r2", "demo", Trigger::Api, &Value::Null, &Value::Null, "b", LEASE, None)
                .unwrap(),
            NewRun::Created
        );
        assert_eq!(
            store
                .create_run("r3", "demo", Trigger::Api, &Value::Null, &Value::Null, "a", LEASE, None)
                .unwrap(),
            NewRun::Busy("r2".into()),
            "one run per pipeline, whichever server asks"
        );
        assert_eq!(store.interrupt_unfinished("a").unwrap(), 0, "only a server's own runs");
        assert_eq!(store.interrupt_unfinished("b").unwrap(), 1);
        assert_eq!(store.run("r2").unwrap().unwrap().status, RunStatus::Interrupted);

        store.register_model(&model("v1")).unwrap();
        store.register_model(&model("v2")).unwrap();
        assert_eq!(store.model("v1").unwrap().unwrap().status, ModelStatus::Candidate);
        let manual = PromotionReason::by(PromotedBy::Manual);
        store.promote("v1", &manual).unwrap();
        store.promote("v2", &manual).unwrap();
        assert_eq!(store.model("v1").unwrap().unwrap().status, ModelStatus::Archived);
        let production = store.production().unwrap();
        assert_eq!(production.len(), 1);
        assert_eq!(production[0].status, ModelStatus::Production);
        assert_eq!(
            text(&store, "SELECT status FROM models ORDER BY version"),
            ["archived", "production"]
        );
    }

    #[test]
    fn an_unknown_stored_status_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir);
        store
            .create_run("r1", "demo", Trigger::Api, &Value::Null, &Value::Null, "a", LEASE, None)
            .unwrap();
        store
            .write(|tx| tx.execute("UPDATE runs SET status = 'paused'", &[]))
            .unwrap();
        assert!(store.run("r1").is_err());
    }
}

#[cfg(test)]
mod retrain_tests {
    use super::*;

    #[test]
    fn automatic_runs_wait_out_the_cooldown_and_runs_are_listed_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Location::Sqlite(dir.path().join("db.sqlite")), 1).unwrap();
        let lease = Duration::from_secs(60);
        let hour = Some(Duration::from_secs(3600));
        let create = |id: &str, trigger: Trigger, cooldown: Option<Duration>| {
            store
                .create_run(id, "demo", trigger, &Value::Null, &Value::Null, "a", lease, cooldown)
                .unwrap()
        };
        assert_eq!(create("r1", Trigger::Api, None), NewRun::Created);
        store.finish_run("r1", RunStatus::Succeeded, None).unwrap();
        assert_eq!(
            create("r2", Trigger::Drift, hour),
            NewRun::Created,
            "API runs do not count"
        );
        assert_eq!(create("r3", Trigger::Drift, hour), NewRun::Busy("r2".into()));
        store.finish_run("r2", RunStatus::Cancelled, Some("cancelled")).unwrap();
        assert!(matches!(create("r4", Trigger::Schedule, hour), NewRun::Cooling(_)));
        assert_eq!(create("r5", Trigger::Api, None), NewRun::Created, "API runs ignore it");
        store.set_mlflow_run("r5", "abc").unwrap();

        let all = RunFilter {
            limit: 10,
            ..RunFilter::default()
        };
        let (runs, total) = store.runs(&all).unwrap();
        assert_eq!(total, 3);
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r5", "r2", "r1"]);
        assert_eq!(runs[0].mlflow_run_id.as_deref(), Some("abc"));
        assert!(runs[0].duration_s.is_some());
        let drift = RunFilter {
            trigger: Some(Trigger::Drift),
            status: Some(RunStatus::Cancelled),
            ..all.clone()
        };
        let (runs, total) = store.runs(&drift).unwrap();
        assert_eq!((runs.len(), total), (1, 1));
        assert_eq!(store.run("r2").unwrap().unwrap().trigger, Trigger::Drift);
        let paged = RunFilter {
            limit: 1,
            offset: 1,
            ..all
        };
        let (runs, total) = store.runs(&paged).unwrap();
        assert_eq!((runs[0].id.as_str(), total), ("r2", 3));

        assert!(store.request_cancel("r5").unwrap());
        assert_eq!(store.cancel_requests("a").unwrap(), ["r5"]);
        assert!(!store.request_cancel("r1").unwrap(), "only a running run");
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn a_run_whose_lease_ran_out_is_interrupted_and_frees_its_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Location::Sqlite(dir.path().join("db.sqlite")), 1).unwrap();
        let short = Duration::from_millis(50);
        let create = |id: &str| {
            store
                .create_run(id, "demo", Trigger::Api, &Value::Null, &Value::Null, "a", short, None)
                .unwrap()
        };
        assert_eq!(create("r1"), NewRun::Created);
        assert_eq!(store.renew_leases("a", Duration::from_secs(60)).unwrap(), 1);
        assert_eq!(store.expire_leases().unwrap(), 0, "a renewed lease holds");
        store.renew_leases("a", short).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(
            create("r2"),
            NewRun::Created,
            "the expired run no longer holds the pipeline"
        );
        let r1 = store.run("r1").unwrap().unwrap();
        assert_eq!(r1.status, RunStatus::Interrupted);
        assert!(r1.error.unwrap().contains("lease"));
    }
}
