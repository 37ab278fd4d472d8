//! The two SQL engines under the store: SQLite (a file, the zero-set-up default) and PostgreSQL
//! (a server that several replicas share). Statements are written once, with `?1`-style
//! placeholders and SQL both engines speak; this module binds their parameters, reads their rows
//! into one cell type, and renders the few words of the schema that differ.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql as PgToSql, Type};
use r2d2_postgres::PostgresConnectionManager;
use rusqlite::types::{ToSqlOutput, Value as SqliteValue, ValueRef};

use super::error::StoreError;

/// Where the database is: a SQLite file, or a PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (libpq's URI form).
    Postgres(String),
}

impl Location {
    /// A `postgres://` URL names a server; anything else is a SQLite file's path.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }

    /// The location as it can be shown: a URL without its password.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }
}

/// `url` with the password of its user part replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

/// A statement's parameter.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}
impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}
impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}
impl From<f64> for Param<'_> {
    fn from(v: f64) -> Self {
        Param::Real(v)
    }
}
impl From<bool> for Param<'_> {
    fn from(v: bool) -> Self {
        Param::Int(v.into())
    }
}
impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Param::Null, Into::into)
    }
}

/// The parameters of a statement, each converted with `Param::from`.
macro_rules! params {
    ($($p:expr),* $(,)?) => { &[$($crate::store::sql::Param::from($p)),*] as &[$crate::store::sql::Param] };
}
pub(crate) use params;

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// A row read back; its getters name the column that did not hold what they expected.
#[derive(Debug)]
pub struct Row(Vec<Cell>);

impl Row {
    fn wrong(&self, i: usize, expected: &'static str) -> StoreError {
        StoreError::Column {
            index: i,
            expected,
            found: format!("{:?}", self.0.get(i)),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.0.get(i) {
            Some(Cell::Text(s)) => Ok(Some(s.clone())),
            Some(Cell::Null) => Ok(None),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.0.get(i) {
            Some(Cell::Int(v)) => Ok(Some(*v)),
            Some(Cell::Null) => Ok(None),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn opt_real(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.0.get(i) {
            Some(Cell::Real(v)) => Ok(Some(*v)),
            Some(Cell::Int(v)) => Ok(Some(*v as f64)),
            Some(Cell::Null) => Ok(None),
            _ => Err(self.wrong(i, "a number")),
        }
    }

    /// Text stored from `as_str` of one of `all`, read back as that value.
    pub fn named<T: Copy>(&self, i: usize, all: &[T], name: impl Fn(T) -> &'static str) -> Result<T, StoreError> {
        let text = self.text(i)?;
        all.iter()
            .copied()
            .find(|v| name(*v) == text)
            .ok_or(StoreError::Unknown { column: i, value: text })
    }
}

/// A transaction on either engine: every statement of the store runs in one.
pub trait Tx {
    fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64, StoreError>;
    fn query(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError>;

    fn query_opt(&mut self, sql: &str, params: &[Param]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn query_one(&mut self, sql: &str, params: &[Param]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or(StoreError::NoRow)
    }
}

// --- SQLite ---

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Param::Null => ToSqlOutput::Owned(SqliteValue::Null),
            Param::Int(v) => ToSqlOutput::Owned(SqliteValue::Integer(v)),
            Param::Real(v) => ToSqlOutput::Owned(SqliteValue::Real(v)),
            Param::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

fn sqlite_row(r: &rusqlite::Row, n: usize) -> rusqlite::Result<Row> {
    (0..n)
        .map(|i| {
            Ok(match r.get_ref(i)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Real(v),
                ValueRef::Text(t) | ValueRef::Blob(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
            })
        })
        .collect::<rusqlite::Result<_>>()
        .map(Row)
}

pub struct SqliteTx<'a>(pub &'a rusqlite::Connection);

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64, StoreError> {
        let mut st = self.0.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
        let mut st = self.0.prepare_cached(sql)?;
        let n = st.column_count();
        let rows = st.query_map(rusqlite::params_from_iter(params), |r| sqlite_row(r, n))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Opens (creating it and its directory if need be) the SQLite file at `path`, in WAL mode.
pub fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

// --- PostgreSQL ---

pub type Pool = r2d2::Pool<PostgresConnectionManager<postgres::NoTls>>;

/// The statement with SQLite's `?N` placeholders written as PostgreSQL's `$N`.
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn pg_params<'a>(params: &'a [Param<'a>]) -> Vec<Box<dyn PgToSql + Sync + 'a>> {
    params
        .iter()
        .map(|p| -> Box<dyn PgToSql + Sync> {
            match *p {
                Param::Null => Box::new(Null),
                Param::Int(v) => Box::new(v),
                Param::Real(v) => Box::new(v),
                Param::Text(v) => Box::new(v),
            }
        })
        .collect()
}

fn pg_row(r: &postgres::Row) -> Result<Row, postgres::Error> {
    (0..r.len())
        .map(|i| {
            let ty = r.columns()[i].type_();
            Ok(if *ty == Type::INT8 {
                r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Int)
            } else if *ty == Type::INT4 {
                r.try_get::<_, Option<i32>>(i)?
                    .map_or(Cell::Null, |v| Cell::Int(v.into()))
            } else if *ty == Type::FLOAT8 {
                r.try_get::<_, Option<f64>>(i)?.map_or(Cell::Null, Cell::Real)
            } else if *ty == Type::BOOL {
                r.try_get::<_, Option<bool>>(i)?
                    .map_or(Cell::Null, |v| Cell::Int(v.into()))
            } else {
                r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Text)
            })
        })
        .collect::<Result<_, _>>()
        .map(Row)
}

pub struct PgTx<'a, 'b>(pub &'a mut postgres::Transaction<'b>);

impl Tx for PgTx<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64, StoreError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn PgToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
        Ok(self.0.execute(dollars(sql).as_str(), &refs)?)
    }

    fn query(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>, StoreError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn PgToSql + Sync)> = boxed.iter().map(|b| b.as_ref()).collect();
        let rows = self.0.query(dollars(sql).as_str(), &refs)?;
        Ok(rows.iter().map(pg_row).collect::<Result<_, _>>()?)
    }
}

/// The channel on which every committed change of the registry or the keys is announced, so
/// that the other replicas see it at once.
pub const CHANGES_CHANNEL: &str = "sentiflow_changes";

/// Listens on [`CHANGES_CHANNEL`] on a connection of its own, counting the notifications; when
/// the connection drops it counts one (something may have been missed) and reconnects.
pub fn listen(url: String, changes: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let run = move || {
        while !stop.load(Ordering::Relaxed) {
            // While the server is down the count stays put, so what was read before (the keys
            // known) stays valid; the next connection counts once for what it may have missed.
            if let Err(e) = listen_once(&url, &changes, &stop) {
                tracing::warn!("listening for changes on {}: {e}; reconnecting", redact(&url));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("db-listen".into()).spawn(run) {
        tracing::warn!("cannot start the thread that listens for database changes: {e}");
    }
}

fn listen_once(url: &str, changes: &AtomicU64, stop: &AtomicBool) -> Result<(), postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))?;
    // Anything committed while no connection listened is caught by this count.
    changes.fetch_add(1, Ordering::SeqCst);
    while !stop.load(Ordering::Relaxed) {
        let got = client.notifications().timeout_iter(Duration::from_millis(500)).next()?;
        if got.is_some() {
            changes.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// A NULL of whatever type the statement expects there.
#[derive(Debug)]
struct Null;

impl PgToSql for Null {
    fn to_sql(&self, _: &Type, _: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull::Yes)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

// --- the schema ---

/// Which engine a statement of the schema is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sql` with the schema's placeholders for the words the engines spell differently:
    /// `{int}` a 64-bit integer, `{real}` a double, `{id}` an integer key the database numbers,
    /// `{now}` the current UTC time as RFC 3339 text with milliseconds, `{rowid}` SQLite's row
    /// number (NULL on PostgreSQL, which has none).
    pub fn render(self, sql: &str) -> String {
        let words: [(&str, &str); 5] = match self {
            Dialect::Sqlite => [
                ("{int}", "INTEGER"),
                ("{real}", "REAL"),
                ("{id}", "INTEGER PRIMARY KEY"),
                ("{now}", "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"),
                ("{rowid}", "rowid"),
            ],
            Dialect::Postgres => [
                ("{int}", "BIGINT"),
                ("{real}", "DOUBLE PRECISION"),
                ("{id}", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
                (
                    "{now}",
                    "(to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))",
                ),
                ("{rowid}", "NULL"),
            ],
        };
        words.iter().fold(sql.to_string(), |s, (from, to)| s.replace(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_and_questions_in_text_stay() {
        assert_eq!(
            dollars("SELECT ?1, '?', ?12 WHERE a = ?2"),
            "SELECT $1, '?', $12 WHERE a = $2"
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(Location::parse("data/s.db"), Location::Sqlite("data/s.db".into()));
    }
}
