//! The SQLite database: model versions, training runs with their stage events and log lines,
//! and API keys. WAL mode, schema migrations by `user_version`, every write in a transaction, so
//! a process killed at any moment loses no committed record.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::drift::{Status, WindowReport};
use crate::pipeline::report::State;

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
}

impl StoreError {
    /// Whether the database could not take a write for a reason outside the request (a full
    /// disk, a read-only file, another process holding the lock), rather than a bug.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        let (StoreError::Open { source, .. } | StoreError::Sql(source)) = self;
        matches!(
            source.sqlite_error_code(),
            Some(DiskFull | ReadOnly | DatabaseBusy | DatabaseLocked | SystemIoFailure | CannotOpen)
        )
    }
}

/// How long stored predictions are kept: the newest `rows` of them, none older than `days`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub rows: u64,
    pub days: u32,
}

/// Schema versions, applied in order; the database's `user_version` says how many ran.
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
    accuracy    REAL,
    run_id      TEXT,
    status      TEXT NOT NULL DEFAULT 'candidate',
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    promoted_at TEXT
);
CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    params      TEXT NOT NULL,
    stages      TEXT NOT NULL,
    status      TEXT NOT NULL,
    error       TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT
);
CREATE TABLE run_events (
    run_id      TEXT NOT NULL REFERENCES runs(id),
    stage       TEXT NOT NULL,
    state       TEXT NOT NULL,
    duration_ms INTEGER,
    metrics     TEXT,
    error       TEXT,
    at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX run_events_run ON run_events(run_id);
CREATE TABLE run_logs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    seq    INTEGER NOT NULL,
    stage  TEXT NOT NULL,
    line   TEXT NOT NULL,
    at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL,
    label      TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"#,
    r#"
CREATE TABLE predictions (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    version     TEXT NOT NULL,
    score       REAL NOT NULL,
    label       TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    text        TEXT,
    chars       INTEGER NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE feedback (
    prediction_id TEXT PRIMARY KEY,
    label         TEXT NOT NULL,
    correct       INTEGER NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE drift_evaluations (
    id         INTEGER PRIMARY KEY,
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    status     TEXT NOT NULL,
    report     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
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
];

/// Where a training run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// Stopped on request, or left running by a server that stopped.
    Interrupted,
}

impl RunStatus {
    pub const ALL: [RunStatus; 4] = [
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
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
    /// Was in production until another version was promoted.
    Archived,
}

impl ModelStatus {
    pub const ALL: [ModelStatus; 3] = [ModelStatus::Candidate, ModelStatus::Production, ModelStatus::Archived];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Candidate => "candidate",
            ModelStatus::Production => "production",
            ModelStatus::Archived => "archived",
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

/// Stored as the text of `as_str`, read back from it.
macro_rules! text_column {
    ($($t:ident),*) => {$(
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $t::ALL
                    .into_iter()
                    .find(|s| s.as_str() == text)
                    .ok_or_else(|| FromSqlError::Other(format!("unknown {} `{text}`", stringify!($t)).into()))
            }
        }
    )*};
}

text_column!(RunStatus, ModelStatus);

impl ToSql for EventState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
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
    /// The model's report as it was stored (a `WindowReport`).
    pub report: Value,
    /// When it was stored (UTC, RFC 3339).
    pub at: String,
}

/// A registered model version.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ModelRow {
    pub version: String,
    pub name: String,
    pub kind: String,
    pub pipeline: String,
    pub path: String,
    pub params: Value,
    pub metrics: Value,
    pub tuning: Value,
    pub accuracy: Option<f64>,
    pub run_id: Option<String>,
    pub status: ModelStatus,
    pub created_at: String,
    pub promoted_at: Option<String>,
}

/// A training run and what happened in it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunRow {
    pub id: String,
    pub pipeline: String,
    pub params: Value,
    pub stages: Value,
    pub status: RunStatus,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub events: Vec<Value>,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// A second connection for the reads on every request's path (API keys): in WAL mode it
    /// never waits for a write in progress on `conn`, such as a period's predictions.
    auth: Mutex<Connection>,
}

fn json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        let applied: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        let auth = Connection::open(path).map_err(err)?;
        auth.pragma_update(None, "query_only", "ON").map_err(err)?;
        auth.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        Ok(Store {
            conn: Mutex::new(conn),
            auth: Mutex::new(auth),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    // --- drift monitoring ---

    pub fn add_predictions(&self, rows: &[PredictionRow]) -> Result<(), StoreError> {
        // A transaction per chunk: the connection is free between them for the requests that
        // write (feedback, promotion).
        for chunk in rows.chunks(2_000) {
            self.add_prediction_chunk(chunk)?;
        }
        Ok(())
    }

    fn add_prediction_chunk(&self, rows: &[PredictionRow]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO predictions (id, model, version, score, label, text_sha256, text, chars)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in rows {
                insert.execute(params![
                    r.id,
                    r.model,
                    r.version,
                    r.score,
                    r.label,
                    r.text_sha256,
                    r.text,
                    r.chars
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes the predictions (with their feedback) and drift evaluations that `keep` no longer
    /// covers; returns how many predictions went. Freed pages are reused by later inserts, so
    /// the file stops growing once the retention is reached.
    pub fn prune(&self, keep: Retention) -> Result<usize, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        let cutoff = format!("-{} days", keep.days);
        // Rows are inserted in time order, so the oldest rows have the smallest rowids.
        let mut removed = tx.execute(
            "DELETE FROM predictions WHERE rowid <= (SELECT rowid FROM predictions ORDER BY rowid DESC LIMIT 1 OFFSET ?1)",
            [keep.rows],
        )?;
        removed += tx.execute(
            "DELETE FROM predictions WHERE created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
            [&cutoff],
        )?;
        if removed > 0 {
            tx.execute(
                "DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.id = feedback.prediction_id)",
                [],
            )?;
        }
        tx.execute(
            "DELETE FROM drift_evaluations WHERE created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
            [&cutoff],
        )?;
        tx.commit()?;
        Ok(removed)
    }

    /// The number of stored predictions.
    pub fn prediction_count(&self) -> Result<u64, StoreError> {
        self.with(|c| c.query_row("SELECT count(*) FROM predictions", [], |r| r.get(0)))
    }

    /// The model, version and label of a stored prediction.
    pub fn prediction(&self, id: &str) -> Result<Option<(String, String, String)>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT model, version, label FROM predictions WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
    }

    /// Records the true label of a prediction; false when it already had one.
    pub fn add_feedback(&self, prediction_id: &str, label: &str, correct: bool) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO feedback (prediction_id, label, correct) VALUES (?1, ?2, ?3)",
                params![prediction_id, label, correct],
            )?;
            Ok(n == 1)
        })
    }

    pub fn add_drift(&self, model: &str, report: &WindowReport) -> Result<(), StoreError> {
        let text = serde_json::to_string(report).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
        self.with(|c| {
            c.execute(
                "INSERT INTO drift_evaluations (model, version, status, report) VALUES (?1, ?2, ?3, ?4)",
                params![model, report.version, report.report.status.as_str(), text],
            )
        })?;
        Ok(())
    }

    /// The latest stored drift evaluations, newest first.
    pub fn drift_history(&self, limit: usize) -> Result<Vec<DriftRecord>, StoreError> {
        self.with(|c| {
            let mut q = c.prepare(
                "SELECT model, version, status, report, created_at FROM drift_evaluations ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = q.query_map([limit as i64], |r| {
                let status: String = r.get(2)?;
                Ok(DriftRecord {
                    model: r.get(0)?,
                    version: r.get(1)?,
                    status: status.parse().map_err(|e: String| {
                        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
                    })?,
                    report: json(r.get(3)?),
                    at: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    // --- API keys ---

    pub fn add_key(&self, hash: &str, role: &str, label: Option<&str>) -> Result<i64, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (hash, role, label) VALUES (?1, ?2, ?3)",
                params![hash, role, label],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// The role of the unrevoked key whose SHA-256 is `hash`, with the key's id.
    pub fn key_role(&self, hash: &str) -> Result<Option<(i64, String, Option<String>)>, StoreError> {
        let c = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        Ok(c.query_row(
            "SELECT id, role, label FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
    }

    /// Every key, oldest first, without its hash.
    pub fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.with(|c| {
            let mut q =
                c.prepare("SELECT id, label, role, created_at, last_used_at, revoked_at FROM api_keys ORDER BY id")?;
            let rows = q.query_map([], |r| {
                Ok(KeyRow {
                    id: r.get(0)?,
                    label: r.get(1)?,
                    role: r.get(2)?,
                    created_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                    revoked_at: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn revoke_key(&self, id: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE api_keys SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1 AND revoked_at IS NULL",
                [id],
            )
            .map(|_| ())
        })
    }

    /// Records that key `id` was used now, unless this store's connection is busy with another
    /// write (then `false`: it is bookkeeping, not worth a wait).
    pub fn try_touch_key(&self, id: i64) -> Result<bool, StoreError> {
        let conn = match self.conn.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        conn.execute(
            "UPDATE api_keys SET last_used_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
            [id],
        )?;
        Ok(true)
    }

    /// A number that changes whenever a change is committed to the database by another process
    /// or by this store's writing connection (SQLite's `data_version`, asked on the connection
    /// for keys): cheap enough to ask on every request.
    pub fn outside_changes(&self) -> Result<i64, StoreError> {
        let c = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        Ok(c.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    // --- models ---

    pub fn register_model(&self, m: &ModelRow) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO models (version, name, kind, pipeline, path, params, metrics, tuning, accuracy, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    m.version,
                    m.name,
                    m.kind,
                    m.pipeline,
                    m.path,
                    m.params.to_string(),
                    m.metrics.to_string(),
                    m.tuning.to_string(),
                    m.accuracy,
                    m.run_id
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Marks `version` as the production model of its name; the previous one is archived.
    pub fn promote(&self, version: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        let name: Option<String> = tx
            .query_row("SELECT name FROM models WHERE version = ?1", [version], |r| r.get(0))
            .optional()?;
        let Some(name) = name else { return Ok(false) };
        tx.execute(
            "UPDATE models SET status = ?2 WHERE name = ?1 AND status = ?3",
            params![name, ModelStatus::Archived, ModelStatus::Production],
        )?;
        tx.execute(
            "UPDATE models SET status = ?2, promoted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE version = ?1",
            params![version, ModelStatus::Production],
        )?;
        tx.commit()?;
        Ok(true)
    }

    const MODEL_COLUMNS: &'static str =
        "version, name, kind, pipeline, path, params, metrics, tuning, accuracy, run_id, status, created_at, promoted_at";

    fn model_row(r: &rusqlite::Row) -> rusqlite::Result<ModelRow> {
        Ok(ModelRow {
            version: r.get(0)?,
            name: r.get(1)?,
            kind: r.get(2)?,
            pipeline: r.get(3)?,
            path: r.get(4)?,
            params: json(r.get(5)?),
            metrics: json(r.get(6)?),
            tuning: json(r.get(7)?),
            accuracy: r.get(8)?,
            run_id: r.get(9)?,
            status: r.get(10)?,
            created_at: r.get(11)?,
            promoted_at: r.get(12)?,
        })
    }

    pub fn models(&self) -> Result<Vec<ModelRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM models ORDER BY created_at DESC, version",
                Self::MODEL_COLUMNS
            ))?;
            let rows = st.query_map([], Self::model_row)?.collect();
            rows
        })
    }

    pub fn model(&self, version: &str) -> Result<Option<ModelRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {} FROM models WHERE version = ?1", Self::MODEL_COLUMNS),
                [version],
                Self::model_row,
            )
            .optional()
        })
    }

    /// The production version of each model name.
    pub fn production(&self) -> Result<Vec<ModelRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM models WHERE status = ?1 ORDER BY name",
                Self::MODEL_COLUMNS
            ))?;
            let rows = st.query_map([ModelStatus::Production], Self::model_row)?.collect();
            rows
        })
    }

    // --- training runs ---

    pub fn create_run(&self, id: &str, pipeline: &str, params: &Value, stages: &Value) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (id, pipeline, params, stages, status) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, pipeline, params.to_string(), stages.to_string(), RunStatus::Running],
            )
            .map(|_| ())
        })
    }

    pub fn finish_run(&self, id: &str, status: RunStatus, error: Option<&str>) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = ?2, error = ?3, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
                params![id, status, error],
            )
            .map(|_| ())
        })
    }

    /// Runs left `running` by a process that died: they are recorded as interrupted.
    pub fn interrupt_unfinished(&self) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = ?1, error = 'the server stopped during the run',
                 finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE status = ?2",
                [RunStatus::Interrupted, RunStatus::Running],
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
        self.with(|c| {
            c.execute(
                "INSERT INTO run_events (run_id, stage, state, duration_ms, metrics, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![run, stage, state, duration_ms as i64, metrics.to_string(), error],
            )
            .map(|_| ())
        })
    }

    pub fn add_log(&self, run: &str, stage: &str, line: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO run_logs (run_id, seq, stage, line)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM run_logs WHERE run_id = ?1), ?2, ?3)",
                params![run, stage, line],
            )
            .map(|_| ())
        })
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT id, pipeline, params, stages, status, error, created_at, finished_at FROM runs WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(RunRow {
                            id: r.get(0)?,
                            pipeline: r.get(1)?,
                            params: json(r.get(2)?),
                            stages: json(r.get(3)?),
                            status: r.get(4)?,
                            error: r.get(5)?,
                            created_at: r.get(6)?,
                            finished_at: r.get(7)?,
                            events: Vec::new(),
                        })
                    },
                )
                .optional()?;
            let Some(mut row) = row else { return Ok(None) };
            let mut st = c.prepare(
                "SELECT stage, state, duration_ms, metrics, error, at FROM run_events WHERE run_id = ?1 ORDER BY rowid",
            )?;
            row.events = st
                .query_map([id], |r| {
                    Ok(serde_json::json!({
                        "stage": r.get::<_, String>(0)?,
                        "state": r.get::<_, String>(1)?,
                        "duration_ms": r.get::<_, Option<i64>>(2)?,
                        "metrics": json(r.get::<_, Option<String>>(3)?.unwrap_or_default()),
                        "error": r.get::<_, Option<String>>(4)?,
                        "at": r.get::<_, String>(5)?,
                    }))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some(row))
        })
    }

    pub fn logs(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT seq, stage, line, at FROM run_logs WHERE run_id = ?1 ORDER BY seq")?;
            let rows = st
                .query_map([id], |r| {
                    Ok(
                        serde_json::json!({"seq": r.get::<_, i64>(0)?, "stage": r.get::<_, String>(1)?,
                                          "line": r.get::<_, String>(2)?, "at": r.get::<_, String>(3)?}),
                    )
                })?
                .collect();
            rows
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(store: &Store, sql: &str) -> Vec<String> {
        store
            .with(|c| c.prepare(sql)?.query_map([], |r| r.get(0))?.collect())
            .unwrap()
    }

    fn model(version: &str) -> ModelRow {
        ModelRow {
            version: version.into(),
            name: "tfidf".into(),
            kind: "tfidf".into(),
            pipeline: "demo".into(),
            path: "/m".into(),
            params: Value::Null,
            metrics: Value::Null,
            tuning: Value::Null,
            accuracy: None,
            run_id: None,
            status: ModelStatus::Candidate,
            created_at: String::new(),
            promoted_at: None,
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
    }

    #[test]
    fn states_are_stored_as_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();

        store.create_run("r1", "demo", &Value::Null, &Value::Null).unwrap();
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
            text(&store, "SELECT state FROM run_events ORDER BY rowid"),
            ["running", "ran"]
        );
        let run = store.run("r1").unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.events[1]["state"], "ran");

        store.create_run("r2", "demo", &Value::Null, &Value::Null).unwrap();
        assert_eq!(store.interrupt_unfinished().unwrap(), 1);
        assert_eq!(store.run("r2").unwrap().unwrap().status, RunStatus::Interrupted);

        store.register_model(&model("v1")).unwrap();
        store.register_model(&model("v2")).unwrap();
        assert_eq!(store.model("v1").unwrap().unwrap().status, ModelStatus::Candidate);
        store.promote("v1").unwrap();
        store.promote("v2").unwrap();
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
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        store.create_run("r1", "demo", &Value::Null, &Value::Null).unwrap();
        store
            .with(|c| c.execute("UPDATE runs SET status = 'paused'", []))
            .unwrap();
        assert!(store.run("r1").is_err());
    }
}
