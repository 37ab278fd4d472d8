//! API keys: creating, looking up by hash, listing, revoking and marking as used, and the
//! change counter that tells a server to reload them.

use std::sync::atomic::Ordering;

use schemars::JsonSchema;
use serde::Serialize;

use super::db::{live, now_text, Engine, Store};
use super::error::StoreError;
use super::sql::{params, PgTx, SqliteTx, Tx};
use crate::blocking::off_runtime;

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

impl Store {
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
}
