//! What the store fails with, and which failures mean "try again later".

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

    pub(super) fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Sql(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation),
            StoreError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}
