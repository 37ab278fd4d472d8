//! The database: model versions, training runs with their stage events and log lines, API keys,
//! stored predictions and drift evaluations. It is a SQLite file by default (WAL mode, schema
//! versions in `user_version`), or a PostgreSQL server that several replicas share (a pool of
//! connections, schema versions in `sentiflow_schema`). Both take the same migrations and the same
//! statements; every write is one transaction, so a process killed at any moment loses no
//! committed record.
//!
//! `db` holds the [`Store`] itself: opening a database, its migrations, one transaction per
//! write and the connection waits; `error` what it fails with; `sql` the statements' common
//! layer over both databases. What it keeps is read and written in `models`, `runs`, `keys`,
//! `predictions`, `drift` and `shadow`.

pub mod sql;

mod db;
mod drift;
mod error;
mod keys;
mod models;
mod predictions;
mod runs;
mod shadow;

pub use db::{with_request_wait, Store, REQUEST_WAIT};
pub use drift::DriftRecord;
pub use error::StoreError;
pub use keys::KeyRow;
pub use models::{CanaryChange, ModelRow, ModelStatus, PromotedBy, Promotion, PromotionReason};
pub use predictions::{PredictionRow, Retention};
pub use runs::{EventState, NewRun, RunEvent, RunFilter, RunRow, RunStatus, RunSummary, Trigger};
pub use shadow::{latency_bucket, ShadowCounts, ShadowFigures};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::sql::Location;
    use super::*;
    use crate::models::bundle::Figures;
    use crate::pipeline::report::State;

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
            .add_event("r1", "load", EventState::Running, 0, &Value::Null, None, None)
            .unwrap();
        store
            .add_event("r1", "load", State::Ran.into(), 5, &Value::Null, None, None)
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
