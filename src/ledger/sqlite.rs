//! The embedded ledger: one SQLite file in WAL mode.

use super::Record;
use rusqlite::{params, Connection, OpenFlags};
use std::path::Path;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    -- Unique by construction (random per process, then a counter); not a key, so that each
    -- insert updates one B-tree fewer.
    id                 TEXT NOT NULL,
    started_at_us      INTEGER NOT NULL,
    ended_at_us        INTEGER NOT NULL,
    team               TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    tags               TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    requested_model    TEXT NOT NULL,
    backend            TEXT,
    served_model       TEXT,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    cached_tokens      INTEGER,
    cache_write_tokens INTEGER,
    reasoning_tokens   INTEGER,
    token_source       TEXT,
    cost_nusd          INTEGER NOT NULL,
    priced             INTEGER NOT NULL,
    egress_bytes       INTEGER NOT NULL,
    status             TEXT NOT NULL,
    http_status        INTEGER NOT NULL,
    attempts           INTEGER NOT NULL,
    latency_ms         REAL NOT NULL,
    ttft_ms            REAL,
    stream             INTEGER NOT NULL,
    -- Attempts sent after one whose backend may have begun working on the request.
    resent             INTEGER NOT NULL DEFAULT 0,
    -- Of cache_write_tokens, those written for an hour (priced above the 5-minute ones).
    cache_write_1h_tokens INTEGER,
    -- The gateway process that served the request; '' in files older than the column.
    replica            TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started_at_us);
CREATE INDEX IF NOT EXISTS requests_team_started ON requests (team, started_at_us);
-- How far the journal (`<file>.pending`, see ledger/journal.rs) is loaded into `requests`:
-- written in the same transaction as the rows, so that each record is loaded once.
CREATE TABLE IF NOT EXISTS journal (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    file_id INTEGER NOT NULL,
    loaded  INTEGER NOT NULL
);
";

/// Opens the ledger for writing, creating the file, its directory and the table as needed.
pub fn open(path: &Path, fsync: bool) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // OFF: a commit is a write() into the WAL, safe from a killed process. FULL: plus an
    // fsync per commit, safe from power loss.
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "OFF" })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Columns added since a ledger file may have been made: added in place, with their defaults.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |column: &str| -> rusqlite::Result<bool> {
        conn.prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = ?1")?
            .exists([column])
    };
    if !has("resent")? {
        conn.execute_batch("ALTER TABLE requests ADD COLUMN resent INTEGER NOT NULL DEFAULT 0")?;
    }
    if !has("cache_write_1h_tokens")? {
        conn.execute_batch("ALTER TABLE requests ADD COLUMN cache_write_1h_tokens INTEGER")?;
    }
    if !has("replica")? {
        conn.execute_batch("ALTER TABLE requests ADD COLUMN replica TEXT NOT NULL DEFAULT ''")?;
    }
    Ok(())
}

/// A read-only connection for reports; it never blocks the writer (WAL).
pub fn open_read(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

pub fn insert_batch<'a>(
    conn: &mut Connection,
    records: impl Iterator<Item = &'a Record>,
) -> rusqlite::Result<()> {
    insert_batch_at(conn, records, None)
}

/// Inserts `records` and, in the same transaction, that the journal `(file id, position)` is
/// loaded up to there.
pub fn insert_batch_at<'a>(
    conn: &mut Connection,
    records: impl Iterator<Item = &'a Record>,
    journal: Option<(u64, u64)>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    if let Some((file_id, loaded)) = journal {
        tx.prepare_cached(
            "INSERT INTO journal (id, file_id, loaded) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET file_id = excluded.file_id, loaded = excluded.loaded",
        )?
        .execute(params![file_id as i64, loaded as i64])?;
    }
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (id, started_at_us, ended_at_us, team, key_id, tags, endpoint,
                requested_model, backend, served_model, prompt_tokens, completion_tokens, cached_tokens,
                cache_write_tokens, reasoning_tokens, token_source, cost_nusd, priced, egress_bytes, status,
                http_status, attempts, latency_ms, ttft_ms, stream, resent,
                cache_write_1h_tokens, replica)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)",
        )?;
        for r in records {
            stmt.execute(params![
                r.id,
                r.started_at_us,
                r.ended_at_us,
                &*r.team,
                &*r.key_id,
                r.tags,
                r.endpoint,
                &*r.requested_model,
                r.backend.as_deref(),
                r.served_model.as_deref(),
                r.prompt_tokens.map(|v| v as i64),
                r.completion_tokens.map(|v| v as i64),
                r.cached_tokens.map(|v| v as i64),
                r.cache_write_tokens.map(|v| v as i64),
                r.reasoning_tokens.map(|v| v as i64),
                r.token_source.map(|s| s.as_str()),
                r.cost_nusd,
                r.priced,
                r.egress_bytes as i64,
                r.status,
                r.http_status,
                r.attempts,
                r.latency_ms,
                r.ttft_ms,
                r.stream,
                r.resent,
                r.cache_write_1h_tokens.map(|v| v as i64),
                &*r.replica,
            ])?;
        }
    }
    tx.commit()
}

/// Every column of a record, in [`super::read::record`]'s order; reads of old files see
/// `replica` as ''.
pub const COLUMNS: &str = "id, started_at_us, ended_at_us, team, key_id, tags, endpoint,
    requested_model, backend, served_model, prompt_tokens, completion_tokens, cached_tokens,
    cache_write_tokens, reasoning_tokens, token_source, cost_nusd, priced, egress_bytes, status,
    http_status, attempts, latency_ms, ttft_ms, stream, resent, replica, cache_write_1h_tokens";

/// How far this file loaded the journal `file_id`; `None` when it never saw that journal.
pub fn journal_position(conn: &Connection, file_id: u64) -> rusqlite::Result<Option<u64>> {
    conn.query_row(
        "SELECT loaded FROM journal WHERE id = 1 AND file_id = ?1",
        [file_id as i64],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| Some(n as u64))
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    })
}

/// Records in the file (the spool's depth).
pub fn count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}

/// The oldest `limit` records in write order, each with its rowid.
pub fn read_oldest(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, Record)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT rowid, {COLUMNS} FROM requests ORDER BY rowid LIMIT ?1"
    ))?;
    let n = stmt.column_count();
    let mut rows = stmt.query([limit as i64])?;
    let mut out = Vec::new();
    let mut values = Vec::with_capacity(n);
    while let Some(row) = rows.next()? {
        values.clear();
        for i in 1..n {
            values.push(super::read::Value::from(row.get_ref(i)?));
        }
        let record = super::read::record(&values).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Null, Box::new(e))
        })?;
        out.push((row.get(0)?, record));
    }
    Ok(out)
}

/// Removes the records up to and including `rowid`: PostgreSQL confirmed them.
pub fn delete_through(conn: &Connection, rowid: i64) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM requests WHERE rowid <= ?1", [rowid])
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written before `resent` and `replica` existed opens, gains them with their
    /// defaults, and its records read back.
    #[test]
    fn an_old_file_gains_the_new_columns_and_stays_readable() {
        let dir = std::env::temp_dir().join(format!("tollgate-old-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db");
        // The schema of files made before `resent`: every column up to `stream`.
        let cut = SCHEMA.find("    -- Attempts sent after").unwrap();
        let old = format!("{}\n);", SCHEMA[..cut].trim_end().trim_end_matches(','));
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&old).unwrap();
            assert!(
                conn.prepare("SELECT replica FROM requests").is_err(),
                "the old schema has no replica column:\n{old}"
            );
            conn.execute_batch(
                "INSERT INTO requests VALUES ('r1', 1, 2, 't', 'k', '{}', '/v1/chat/completions',
                 'm', 'b', 'm', 1, 2, 0, 0, 0, 'upstream', 5, 1, 0, 'ok', 200, 1, 1.5, NULL, 0)",
            )
            .unwrap();
        }
        let conn = open(&path, false).unwrap();
        let rows = read_oldest(&conn, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(&*rows[0].1.replica, "");
        assert_eq!(rows[0].1.resent, 0);
        assert_eq!(rows[0].1.cache_write_1h_tokens, None);
        assert_eq!(rows[0].1.cost_nusd, 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
