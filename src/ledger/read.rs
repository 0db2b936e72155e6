//! Reading the ledger, whichever store keeps it: reports, the FOCUS export and the budget
//! seed write their SQL once and run it on SQLite or PostgreSQL through [`Reader`].
//!
//! The two dialects agree on what reports use (window functions, `COALESCE`, `CASE`,
//! `CAST(… AS BIGINT)`, positional `GROUP BY`); where they differ (dates, JSON tags) callers
//! ask [`Reader::dialect`]. Queries are written with SQLite's `?N` placeholders and rewritten
//! to `$N` for PostgreSQL. Rows are streamed to a callback, never collected here, so a month of
//! records costs the memory of one row.

use super::postgres::{self, Blocking, PgError};
use super::{sqlite, Record};
use crate::meter::TokenSource;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A read connection to the ledger; use it from a blocking context (it may block on I/O).
pub enum Reader {
    Sqlite(rusqlite::Connection),
    Postgres(Blocking),
}

/// A query parameter: the ledger's queries only filter on times, names and ids.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Int(i64),
    Text(&'a str),
}

/// A column's value, as both stores can give it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("ledger query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger query failed: {0}")]
    Postgres(#[from] PgError),
    #[error("ledger column {0} has an unexpected type")]
    Type(usize),
}

impl Reader {
    /// A read-only connection to a SQLite ledger file; it never blocks the writer (WAL).
    pub fn sqlite(path: &Path) -> Result<Reader, ReadError> {
        Ok(Reader::Sqlite(sqlite::open_read(path)?))
    }

    /// A connection to a PostgreSQL ledger; `url` as `store.ledger` gives it.
    pub fn postgres(url: &str) -> Result<Reader, ReadError> {
        Ok(Reader::Postgres(postgres::Blocking::connect(url)?))
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Reader::Sqlite(_) => Dialect::Sqlite,
            Reader::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `sql` and hands each row to `each`, in the order the query gives.
    pub fn each<E: From<ReadError>>(
        &self,
        sql: &str,
        params: &[Param<'_>],
        mut each: impl FnMut(&[Value]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Reader::Sqlite(conn) => {
                let mut run = || -> Result<Result<(), E>, rusqlite::Error> {
                    let mut stmt = conn.prepare_cached(sql)?;
                    let n = stmt.column_count();
                    let bound: Vec<&dyn rusqlite::ToSql> = params
                        .iter()
                        .map(|p| match p {
                            Param::Int(i) => i as &dyn rusqlite::ToSql,
                            Param::Text(s) => s as &dyn rusqlite::ToSql,
                        })
                        .collect();
                    let mut rows = stmt.query(bound.as_slice())?;
                    let mut values = Vec::with_capacity(n);
                    while let Some(row) = rows.next()? {
                        values.clear();
                        for i in 0..n {
                            values.push(sqlite_value(row.get_ref(i)?));
                        }
                        if let Err(e) = each(&values) {
                            return Ok(Err(e));
                        }
                    }
                    Ok(Ok(()))
                };
                run().map_err(|e| E::from(ReadError::Sqlite(e)))?
            }
            Reader::Postgres(pg) => pg.each(&dollar_placeholders(sql), params, each),
        }
    }

    /// The rows of a query whose result is small (grouped figures).
    pub fn rows(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Vec<Value>>, ReadError> {
        let mut out = Vec::new();
        self.each(sql, params, |row| -> Result<(), ReadError> {
            out.push(row.to_vec());
            Ok(())
        })?;
        Ok(out)
    }
}

impl From<rusqlite::Connection> for Reader {
    fn from(conn: rusqlite::Connection) -> Self {
        Reader::Sqlite(conn)
    }
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    Value::from(v)
}

impl From<rusqlite::types::ValueRef<'_>> for Value {
    fn from(v: rusqlite::types::ValueRef<'_>) -> Value {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) | ValueRef::Blob(t) => Value::Text(String::from_utf8_lossy(t).into()),
        }
    }
}

/// A record from a row of [`sqlite::COLUMNS`] (the same columns in PostgreSQL).
pub fn record(v: &[Value]) -> Result<Record, ReadError> {
    if v.len() < 28 {
        return Err(ReadError::Type(v.len()));
    }
    let text = |i: usize| v[i].text(i);
    let opt_u64 = |i: usize| -> Result<Option<u64>, ReadError> {
        Ok(v[i].opt_int(i)?.map(|n| u64::try_from(n).unwrap_or(0)))
    };
    let small =
        |i: usize| -> Result<u32, ReadError> { Ok(u32::try_from(v[i].int(i)?).unwrap_or(0)) };
    Ok(Record {
        id: text(0)?,
        started_at_us: v[1].int(1)?,
        ended_at_us: v[2].int(2)?,
        team: text(3)?.into(),
        key_id: text(4)?.into(),
        tags: text(5)?,
        endpoint: intern(&text(6)?),
        requested_model: text(7)?.into(),
        backend: v[8].opt_text().map(Into::into),
        served_model: v[9].opt_text().map(Into::into),
        prompt_tokens: opt_u64(10)?,
        completion_tokens: opt_u64(11)?,
        cached_tokens: opt_u64(12)?,
        cache_write_tokens: opt_u64(13)?,
        reasoning_tokens: opt_u64(14)?,
        token_source: v[15].as_str().and_then(TokenSource::parse),
        cost_nusd: v[16].int(16)?,
        priced: v[17].int(17)? != 0,
        egress_bytes: opt_u64(18)?.unwrap_or(0),
        status: intern(&text(19)?),
        http_status: u16::try_from(v[20].int(20)?).unwrap_or(0),
        attempts: small(21)?,
        resent: small(25)?,
        latency_ms: v[22].opt_real(22)?.unwrap_or(0.0),
        ttft_ms: v[23].opt_real(23)?,
        stream: v[24].int(24)? != 0,
        replica: text(26)?.into(),
        cache_write_1h_tokens: opt_u64(27)?,
    })
}

/// Spend recorded for a team since `since_us` (by key when `per_key`): the budget counters'
/// starting point after a restart. Rows: key (when per key), nano-dollars, tokens.
pub fn spend_since(
    conn: &Reader,
    team: &str,
    since_us: i64,
    per_key: bool,
) -> Result<Vec<(Option<String>, i64, i64)>, ReadError> {
    let key = if per_key {
        "key_id"
    } else {
        "CAST(NULL AS TEXT)"
    };
    let sql = format!(
        "SELECT {key}, CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT),
                CAST(COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)), 0) AS BIGINT)
         FROM requests WHERE team = ?1 AND started_at_us >= ?2 AND status != 'upstream_error' GROUP BY 1"
    );
    conn.rows(&sql, &[Param::Text(team), Param::Int(since_us)])?
        .iter()
        .map(|r| Ok((r[0].opt_text(), r[1].int(1)?, r[2].int(2)?)))
        .collect()
}

/// `Record` keeps endpoint and status as `&'static str` (a handful of values written by this
/// code); records read back share one leaked copy of each distinct value.
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = seen.iter().find(|k| **k == s) {
        return known;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.push(leaked);
    leaked
}

/// `?12` → `$12`; a `?` inside a string literal is left alone.
pub(crate) fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

// === impl Value ===

impl Value {
    pub fn int(&self, col: usize) -> Result<i64, ReadError> {
        match self {
            Value::Int(i) => Ok(*i),
            _ => Err(ReadError::Type(col)),
        }
    }

    /// NULL as `None`.
    pub fn opt_int(&self, col: usize) -> Result<Option<i64>, ReadError> {
        match self {
            Value::Null => Ok(None),
            v => v.int(col).map(Some),
        }
    }

    pub fn opt_real(&self, col: usize) -> Result<Option<f64>, ReadError> {
        match self {
            Value::Null => Ok(None),
            Value::Real(f) => Ok(Some(*f)),
            Value::Int(i) => Ok(Some(*i as f64)),
            Value::Text(_) => Err(ReadError::Type(col)),
        }
    }

    /// Text, or NULL as `None`; numbers as their decimal text.
    pub fn opt_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::Real(f) => Some(f.to_string()),
            Value::Text(s) => Some(s.clone()),
        }
    }

    pub fn text(&self, col: usize) -> Result<String, ReadError> {
        self.opt_text().ok_or(ReadError::Type(col))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dollar_placeholders;

    #[test]
    fn placeholders_become_dollars_outside_string_literals() {
        assert_eq!(
            dollar_placeholders("a = ?1 AND b = '?2' AND c >= ?10"),
            "a = $1 AND b = '?2' AND c >= $10"
        );
    }
}
