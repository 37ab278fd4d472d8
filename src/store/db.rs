//! The store itself: a pool of connections to SQLite or PostgreSQL, the schema's migrations,
//! and how long a caller waits for a connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::error::StoreError;
use super::sql::{self, Dialect, Location, PgTx, Pool, SqliteTx, Tx};
use crate::blocking::off_runtime;

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
    // Where an executor ran a stage (JSON: engine, job, node, the engine's page).
    r#"
ALTER TABLE run_events ADD COLUMN placement TEXT;
"#,
];

/// The current time as the database's timestamps spell it (UTC, RFC 3339, milliseconds).
pub(super) fn now_text() -> String {
    time_text(chrono::Utc::now())
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `days` before now, spelled as the timestamps are.
pub(super) fn days_ago_text(days: u32) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days.into()))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// A timestamp as the database spells it, read back.
pub(super) fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

pub(super) fn time_text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The pool of a store that is not being dropped.
pub(super) fn live(pool: &Option<Pool>) -> &Pool {
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
    /// Puts the thread's wait back however `f` ends: tokio reuses its blocking threads.
    struct Restore(Option<Duration>);
    impl Drop for Restore {
        fn drop(&mut self) {
            WAIT.set(self.0);
        }
    }
    let _restore = Restore(WAIT.replace(Some(REQUEST_WAIT)));
    f()
}

/// A connection from the pool, waited for as long as the work on this thread may.
pub(super) fn client(
    pool: &Option<Pool>,
) -> Result<r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>, StoreError> {
    let wait = WAIT.get().unwrap_or(BACKGROUND_WAIT);
    Ok(live(pool).get_timeout(wait)?)
}

// One per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Engine {
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
    pub(super) engine: Engine,
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

pub(super) fn json(text: Option<String>) -> Value {
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
    pub(super) fn write<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>) -> Result<T, StoreError> {
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
    pub(super) fn write_announced<T>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
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
    pub(super) fn read_auth<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.engine {
            Engine::Sqlite { auth, .. } => {
                let conn = auth.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut SqliteTx(&conn))
            }
            Engine::Postgres { .. } => self.write(f),
        }
    }
}
