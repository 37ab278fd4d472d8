//! Training runs: starting one (one per pipeline, leased to a replica), its stage events and log
//! lines, leases, cancel requests, and the list of runs.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::db::{json, now_ms, now_text, parse_time, time_text, Engine, Store};
use super::error::StoreError;
use super::sql::{params, Param, Tx};
use crate::executors::Placement;
use crate::models::bundle::{typed_entries, Figures};
use crate::pipeline::report::State;
use crate::pipeline::ParamValue;

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
    pub placement: Option<Placement>,
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

/// What a request to start a run found.
#[derive(Debug, PartialEq, Eq)]
pub enum NewRun {
    Created,
    /// The pipeline is being trained by this run (on this or another replica).
    Busy(String),
    /// An automatic run of the pipeline started within the cooldown; none before this time.
    Cooling(String),
}

impl Store {
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

    // One argument per column of the event.
    #[allow(clippy::too_many_arguments)]
    pub fn add_event(
        &self,
        run: &str,
        stage: &str,
        state: EventState,
        duration_ms: u64,
        metrics: &Value,
        error: Option<&str>,
        placement: Option<&Placement>,
    ) -> Result<(), StoreError> {
        let placement = placement.map(|p| serde_json::to_string(p).expect("placements serialize"));
        self.write(|tx| {
            tx.execute(
                "INSERT INTO run_events (run_id, seq, stage, state, duration_ms, metrics, error, at, placement)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    run,
                    stage,
                    state.as_str(),
                    duration_ms as i64,
                    &metrics.to_string(),
                    error,
                    &now_text(),
                    placement.as_deref()
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
                    "SELECT stage, state, duration_ms, metrics, error, at, placement FROM run_events WHERE run_id = ?1 ORDER BY seq",
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
                        placement: e.opt_text(6)?.and_then(|p| serde_json::from_str(&p).ok()),
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
mod retrain_tests {
    use super::*;
    use crate::store::sql::Location;

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
    use crate::store::sql::Location;

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
