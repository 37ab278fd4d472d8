//! Registered model versions: registering, promotion, rejection, the canary share of a candidate,
//! and the candidates under evaluation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::db::{json, now_text, Store};
use super::error::StoreError;
use super::shadow::ShadowFigures;
use super::sql::{params, Row, Tx};
use crate::models::bundle::{typed_entries, Figures, Parameters, Tuning};

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

impl Store {
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
}
