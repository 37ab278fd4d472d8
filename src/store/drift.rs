//! Drift evaluations: storing a model's window report and reading the latest ones back.

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

use super::db::{json, now_text, Store};
use super::error::StoreError;
use super::sql::params;
use crate::drift::{Status, WindowReport};

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

impl Store {
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
}
