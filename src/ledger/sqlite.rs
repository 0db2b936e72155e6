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
    cache_write_1h_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started_at_us);
CREATE INDEX IF NOT EXISTS requests_team_started ON requests (team, started_at_us);
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
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (id, started_at_us, ended_at_us, team, key_id, tags, endpoint,
                requested_model, backend, served_model, prompt_tokens, completion_tokens, cached_tokens,
                cache_write_tokens, reasoning_tokens, token_source, cost_nusd, priced, egress_bytes, status,
                http_status, attempts, latency_ms, ttft_ms, stream, resent,
                cache_write_1h_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                ?21, ?22, ?23, ?24, ?25, ?26, ?27)",
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
            ])?;
        }
    }
    tx.commit()
}

/// Spend recorded for a team since `since_us` (by key when `per_key`): the budget counters'
/// starting point after a restart.
pub fn spend_since(
    conn: &Connection,
    team: &str,
    since_us: i64,
    per_key: bool,
) -> rusqlite::Result<Vec<(Option<String>, i64, i64)>> {
    let key = if per_key { "key_id" } else { "NULL" };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {key}, COALESCE(SUM(cost_nusd), 0),
                COALESCE(SUM(COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0)), 0)
         FROM requests WHERE team = ?1 AND started_at_us >= ?2 AND status != 'upstream_error' GROUP BY 1"
    ))?;
    let rows = stmt.query_map(rusqlite::params![team, since_us], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}
