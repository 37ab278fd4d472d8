//! Stored predictions and their feedback, and the retention that prunes them.

use super::db::{days_ago_text, now_text, Store};
use super::error::StoreError;
use super::sql::{params, Param};

/// How long stored predictions are kept: the newest `rows` of them, none older than `days`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub rows: u64,
    pub days: u32,
}

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

impl Store {
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
}
