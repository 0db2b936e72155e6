//! The fleet ledger: one PostgreSQL table that every replica writes to.
//!
//! - Schema: versioned migrations shipped in [`MIGRATIONS`], applied at start and by
//!   `tollgate migrate`, recorded in `tollgate_migrations`, serialized across replicas by an
//!   advisory lock so three replicas starting at once apply each step once.
//! - `requests` is partitioned by month on `started_at_us` (microseconds, as in SQLite, so
//!   reports share their SQL); partitions are made before a batch needs them.
//! - Inserts are one prepared statement per batch (`UNNEST` of one array per column) with
//!   `ON CONFLICT DO NOTHING` on `(id, started_at_us)`: a batch replayed from the spool, or
//!   resent after a timeout that hid a commit, adds nothing. The key holds `started_at_us`
//!   because PostgreSQL wants the partition key in every unique index; a record's start never
//!   changes, and ids are unique by construction, so it is the request id in effect.
//!
//! - TLS with rustls, as libpq's `sslmode` says (`prefer` by default: TLS when the server
//!   offers it); `verify-ca`, `verify-full` and `sslrootcert` are read here, the driver knowing
//!   only `disable`/`prefer`/`require`. See [`super::pg_tls`].

use super::pg_tls::{self, MakeRustls, UrlTls};
use super::Record;
use crate::clock::days_from_civil;
use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

/// How long a connection attempt may take before the writer spools instead.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A batch insert that takes longer is treated as lost: the batch goes to the spool (if the
/// insert did commit after all, the replay adds nothing).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Months made ahead of the current one at start, so the first requests of a month never
/// wait for DDL.
const MONTHS_AHEAD: i64 = 2;
/// Any constant will do: replicas only need to agree on it.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// Versioned schema steps, applied in order, each once.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "requests, partitioned by month",
    "CREATE TABLE requests (
            id                 TEXT NOT NULL,
            started_at_us      BIGINT NOT NULL,
            ended_at_us        BIGINT NOT NULL,
            team               TEXT NOT NULL,
            key_id             TEXT NOT NULL,
            -- JSON object text, kept byte for byte; reports read it with ::jsonb.
            tags               TEXT NOT NULL,
            endpoint           TEXT NOT NULL,
            requested_model    TEXT NOT NULL,
            backend            TEXT,
            served_model       TEXT,
            prompt_tokens      BIGINT,
            completion_tokens  BIGINT,
            cached_tokens      BIGINT,
            cache_write_tokens BIGINT,
            reasoning_tokens   BIGINT,
            token_source       TEXT,
            cost_nusd          BIGINT NOT NULL,
            priced             BOOLEAN NOT NULL,
            egress_bytes       BIGINT NOT NULL,
            status             TEXT NOT NULL,
            http_status        INTEGER NOT NULL,
            attempts           INTEGER NOT NULL,
            latency_ms         DOUBLE PRECISION NOT NULL,
            ttft_ms            DOUBLE PRECISION,
            stream             BOOLEAN NOT NULL,
            resent             INTEGER NOT NULL DEFAULT 0,
            replica            TEXT NOT NULL DEFAULT '',
            -- Of cache_write_tokens, those written for an hour (priced above 5-minute ones).
            cache_write_1h_tokens BIGINT,
            PRIMARY KEY (id, started_at_us)
        ) PARTITION BY RANGE (started_at_us);
        CREATE INDEX requests_started ON requests (started_at_us);
        CREATE INDEX requests_team_started ON requests (team, started_at_us);
        CREATE INDEX requests_backend_started ON requests (backend, started_at_us);",
)];

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("store.ledger: {0}")]
    Url(String),
    #[error("{}", db_message(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("no answer from PostgreSQL within {0:?}")]
    Timeout(Duration),
    #[error("cannot start the PostgreSQL client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("PostgreSQL column {0} has a type the ledger does not use")]
    Type(usize),
}

impl PgError {
    /// Errors no retry can cure: a bad URL, a refused login, a missing database.
    pub fn is_permanent(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            PgError::Url(_) => true,
            PgError::Db(e) => {
                e.code().is_some_and(|c| {
                    [
                        SqlState::INVALID_PASSWORD,
                        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        SqlState::INVALID_CATALOG_NAME,
                        SqlState::INSUFFICIENT_PRIVILEGE,
                    ]
                    .contains(c)
                }) || tls_refused(e)
            }
            PgError::Timeout(_) | PgError::Runtime(_) | PgError::Type(_) => false,
        }
    }
}

/// A TLS handshake that failed on what was said, not on the network: a certificate the
/// `sslmode` does not accept, a TLS alert, or `require` meeting a server without TLS. Only a
/// change of certificate or config cures it. (A connection reset mid-handshake is an I/O
/// error, not a rustls one, and stays retryable.)
fn tls_refused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<rustls::Error>() || s.to_string() == "server does not support TLS" {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// The server's own words when it refused (`FATAL: database "x" does not exist`); the
/// client's error prints only its kind (`db error`) without them.
fn db_message(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    }
}

/// True for `postgres://` and `postgresql://` URLs.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Where the ledger is and how to reach it: the driver's settings and the TLS it asks for.
#[derive(Debug, Clone)]
pub struct Target {
    pub cfg: tokio_postgres::Config,
    pub tls: MakeRustls,
}

/// The driver's connection to PostgreSQL, TLS or not (`sslmode=disable` and a `prefer` the
/// server declined run plain inside the same type).
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    pg_tls::RustlsStream<tokio_postgres::Socket>,
>;

/// The connection settings of `url`, with what it leaves out taken from the standard
/// variables (`PGUSER`, `PGPASSWORD`, `PGHOST`, `PGPORT`, `PGDATABASE`), as `psql` does.
/// The error never quotes the URL: it may hold a password.
pub fn parse(url: &str) -> Result<Target, PgError> {
    parse_with(url, &|k| std::env::var(k).ok())
}

pub fn parse_with(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Target, PgError> {
    if !is_postgres_url(url) {
        return Err(PgError::Url(
            "must start with postgres:// or postgresql://".into(),
        ));
    }
    let UrlTls {
        url,
        verify,
        root_cert,
    } = pg_tls::take_tls_params(url).map_err(PgError::Url)?;
    let mut cfg = tokio_postgres::Config::from_str(&url)
        .map_err(|e| PgError::Url(format!("not a valid PostgreSQL URL: {e}")))?;
    if cfg.get_hosts().is_empty() {
        cfg.host(env("PGHOST").unwrap_or_else(|| "localhost".into()));
    }
    if cfg.get_ports().is_empty() {
        if let Some(port) = env("PGPORT").and_then(|p| p.parse().ok()) {
            cfg.port(port);
        }
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER").or_else(|| env("USER"));
        cfg.user(user.unwrap_or_else(|| "postgres".into()));
    }
    if cfg.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            cfg.password(p);
        }
    }
    if cfg.get_dbname().is_none() {
        if let Some(db) = env("PGDATABASE") {
            cfg.dbname(db);
        }
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.application_name("tollgate");
    let tls =
        MakeRustls::new(verify, root_cert.as_deref()).map_err(|e| PgError::Url(e.to_string()))?;
    Ok(Target { cfg, tls })
}

/// Connects; the returned future drives the connection and must be polled (spawned on the
/// runtime that owns the client).
pub async fn connect(target: &Target) -> Result<(Client, Connection), PgError> {
    let tls = target.tls.clone();
    match tokio::time::timeout(CONNECT_TIMEOUT, target.cfg.connect(tls)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(PgError::Timeout(CONNECT_TIMEOUT)),
    }
}

/// Applies the migrations this database lacks; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tollgate_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let done: HashSet<i32> = tx
        .query("SELECT version FROM tollgate_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tollgate_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// `[start, end)` of the UTC month holding `us`, and its partition's name.
pub fn month_of(us: i64) -> (i64, i64, String) {
    let (y, m, _) = crate::clock::civil_from_days(us.div_euclid(86_400_000_000));
    let start = days_from_civil(y, m, 1) * 86_400_000_000;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let end = days_from_civil(ny, nm, 1) * 86_400_000_000;
    (start, end, format!("requests_y{y:04}m{m:02}"))
}

/// Makes the partitions of the months holding `times` that `known` does not list yet.
pub async fn ensure_partitions(
    client: &mut Client,
    known: &mut HashSet<i64>,
    times: impl Iterator<Item = i64>,
) -> Result<(), PgError> {
    let mut missing: Vec<(i64, i64, String)> = Vec::new();
    for t in times {
        let m = month_of(t);
        if !known.contains(&m.0) && !missing.iter().any(|x| x.0 == m.0) {
            missing.push(m);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // The lock keeps two replicas from racing on one CREATE (IF NOT EXISTS is not atomic).
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    for (start, end, name) in &missing {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF requests FOR VALUES FROM ({start}) TO ({end})"
        ))
        .await?;
    }
    tx.commit().await?;
    known.extend(missing.iter().map(|m| m.0));
    Ok(())
}

/// Partitions for this month and the next few.
pub async fn ensure_months_ahead(
    client: &mut Client,
    known: &mut HashSet<i64>,
    now_us: i64,
) -> Result<(), PgError> {
    let mut months = vec![now_us];
    let mut t = now_us;
    for _ in 0..MONTHS_AHEAD {
        t = month_of(t).1;
        months.push(t);
    }
    ensure_partitions(client, known, months.into_iter()).await
}

const INSERT: &str = "INSERT INTO requests (id, started_at_us, ended_at_us, team, key_id, tags,
        endpoint, requested_model, backend, served_model, prompt_tokens, completion_tokens,
        cached_tokens, cache_write_tokens, reasoning_tokens, token_source, cost_nusd, priced,
        egress_bytes, status, http_status, attempts, latency_ms, ttft_ms, stream, resent, replica,
        cache_write_1h_tokens)
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::int8[],
        $13::int8[], $14::int8[], $15::int8[], $16::text[], $17::int8[], $18::bool[],
        $19::int8[], $20::text[], $21::int4[], $22::int4[], $23::float8[], $24::float8[],
        $25::bool[], $26::int4[], $27::text[], $28::int8[])
    ON CONFLICT (id, started_at_us) DO NOTHING";

pub async fn prepare_insert(client: &Client) -> Result<Statement, PgError> {
    Ok(client.prepare(INSERT).await?)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn int4(v: impl TryInto<i32>) -> i32 {
    v.try_into().unwrap_or(i32::MAX)
}

/// Inserts `records` in one statement; returns how many were new (the rest were there).
pub async fn insert_batch(
    client: &Client,
    insert: &Statement,
    records: &[&Record],
) -> Result<u64, PgError> {
    macro_rules! col {
        ($f:expr) => {
            records.iter().map($f).collect::<Vec<_>>()
        };
    }
    let id = col!(|r| r.id.as_str());
    let started = col!(|r| r.started_at_us);
    let ended = col!(|r| r.ended_at_us);
    let team = col!(|r| &*r.team);
    let key = col!(|r| &*r.key_id);
    let tags = col!(|r| r.tags.as_str());
    let endpoint = col!(|r| r.endpoint);
    let requested = col!(|r| &*r.requested_model);
    let backend = col!(|r| r.backend.as_deref());
    let served = col!(|r| r.served_model.as_deref());
    let prompt = col!(|r| r.prompt_tokens.map(int));
    let completion = col!(|r| r.completion_tokens.map(int));
    let cached = col!(|r| r.cached_tokens.map(int));
    let cache_write = col!(|r| r.cache_write_tokens.map(int));
    let reasoning = col!(|r| r.reasoning_tokens.map(int));
    let source = col!(|r| r.token_source.map(|s| s.as_str()));
    let cost = col!(|r| r.cost_nusd);
    let priced = col!(|r| r.priced);
    let egress = col!(|r| int(r.egress_bytes));
    let status = col!(|r| r.status);
    let http = col!(|r| i32::from(r.http_status));
    let attempts = col!(|r| int4(r.attempts));
    let latency = col!(|r| r.latency_ms);
    let ttft = col!(|r| r.ttft_ms);
    let stream = col!(|r| r.stream);
    let resent = col!(|r| int4(r.resent));
    let replica = col!(|r| &*r.replica);
    let cache_write_1h = col!(|r| r.cache_write_1h_tokens.map(int));
    let params: [&(dyn ToSql + Sync); 28] = [
        &id,
        &started,
        &ended,
        &team,
        &key,
        &tags,
        &endpoint,
        &requested,
        &backend,
        &served,
        &prompt,
        &completion,
        &cached,
        &cache_write,
        &reasoning,
        &source,
        &cost,
        &priced,
        &egress,
        &status,
        &http,
        &attempts,
        &latency,
        &ttft,
        &stream,
        &resent,
        &replica,
        &cache_write_1h,
    ];
    Ok(client.execute(insert, &params).await?)
}

/// A blocking PostgreSQL client for readers (reports, the budget seed, `tollgate migrate`):
/// its own small runtime, so it works from CLI code and from the blocking pool alike.
pub struct Blocking {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Blocking {
    pub fn connect(url: &str) -> Result<Blocking, PgError> {
        let target = parse(url)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PgError::Runtime)?;
        let (client, conn) = rt.block_on(connect(&target))?;
        // The connection belongs to this client's runtime and ends with it; the gateway's
        // task tracker has nothing to wait for here.
        rt.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "ledger read connection closed");
            }
        });
        Ok(Blocking { rt, client })
    }

    pub fn migrate(&mut self) -> Result<Vec<i32>, PgError> {
        let Blocking { rt, client } = self;
        rt.block_on(async {
            let applied = migrate(client).await?;
            ensure_months_ahead(client, &mut HashSet::new(), crate::clock::unix_now_us()).await?;
            Ok(applied)
        })
    }

    /// Runs `sql` (with `$N` placeholders) and hands each row to `each` as it arrives.
    pub fn each<E: From<super::read::ReadError>>(
        &self,
        sql: &str,
        params: &[super::read::Param<'_>],
        mut each: impl FnMut(&[super::read::Value]) -> Result<(), E>,
    ) -> Result<(), E> {
        use super::read::{Param, ReadError};
        use futures_util::StreamExt;
        let bound: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| match p {
                Param::Int(i) => i as &(dyn ToSql + Sync),
                Param::Text(s) => s as &(dyn ToSql + Sync),
            })
            .collect();
        let pg = |e: PgError| E::from(ReadError::Postgres(e));
        self.rt.block_on(async {
            let rows = self
                .client
                .query_raw(sql, bound)
                .await
                .map_err(|e| pg(e.into()))?;
            let mut rows = std::pin::pin!(rows);
            let mut values = Vec::new();
            while let Some(row) = rows.next().await {
                let row = row.map_err(|e| pg(e.into()))?;
                values.clear();
                for (i, col) in row.columns().iter().enumerate() {
                    values.push(value(&row, i, col.type_()).map_err(pg)?);
                }
                each(&values)?;
            }
            Ok(())
        })
    }
}

fn value(row: &tokio_postgres::Row, i: usize, ty: &Type) -> Result<super::read::Value, PgError> {
    use super::read::Value;
    let v = match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)?
            .map(|v| Value::Real(v.into())),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        }
        _ => return Err(PgError::Type(i)),
    };
    Ok(v.unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_split_on_utc_calendar_boundaries() {
        // 2026-12-03T08:00Z
        let (start, end, name) = month_of(1_796_284_800_000_000);
        assert_eq!(name, "requests_y2026m12");
        assert_eq!(crate::clock::format_time(start), "2026-12-01T00:00:00Z");
        assert_eq!(crate::clock::format_time(end), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn urls_take_what_they_lack_from_the_pg_variables_and_errors_hide_the_password() {
        let env = |k: &str| match k {
            "PGPASSWORD" => Some("fromenv".to_string()),
            "PGDATABASE" => Some("ledger".to_string()),
            _ => None,
        };
        let cfg = parse_with("postgres://app@db.internal:6543", &env)
            .unwrap()
            .cfg;
        assert_eq!(cfg.get_user(), Some("app"));
        assert_eq!(cfg.get_password(), Some(&b"fromenv"[..]));
        assert_eq!(cfg.get_dbname(), Some("ledger"));
        assert_eq!(cfg.get_ports(), &[6543]);
        let cfg = parse_with("postgresql://app:inurl@db/x", &env).unwrap().cfg;
        assert_eq!(cfg.get_password(), Some(&b"inurl"[..]));
        let e = parse_with("postgres://app:s3cret@db:notaport/x", &env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("store.ledger:"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn libpq_tls_settings_the_driver_refuses_are_read_here_and_the_rest_refused_by_name() {
        use crate::ledger::pg_tls::{take_tls_params, Verify};
        let t =
            take_tls_params("postgres://a:pw@db/x?sslmode=verify-full&application_name=z").unwrap();
        assert_eq!(t.verify, Verify::Full);
        assert_eq!(
            t.url,
            "postgres://a:pw@db/x?application_name=z&sslmode=require"
        );
        let t = take_tls_params("postgres://db/x?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem")
            .unwrap();
        assert_eq!(t.verify, Verify::Chain);
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let t = take_tls_params("postgres://db/x?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!((t.verify, t.root_cert), (Verify::Chain, None));
        for (url, verify) in [
            ("postgres://db/x", Verify::Nothing),
            ("postgres://db/x?sslmode=require", Verify::Nothing),
            ("postgres://db/x?sslmode=disable", Verify::Nothing),
        ] {
            let t = take_tls_params(url).unwrap();
            assert_eq!((t.url.as_str(), t.verify), (url, verify));
        }
        let env = |_: &str| None;
        for (url, says) in [
            ("postgres://a:s3cret@db/x?sslmode=allow", "sslmode=allow"),
            ("postgres://a:s3cret@db/x?sslmode=bogus", "sslmode must be"),
            ("postgres://a:s3cret@db/x?sslcert=c.pem", "sslcert"),
            (
                "postgres://a:s3cret@db/x?sslmode=prefer&sslrootcert=ca.pem",
                "sslrootcert needs",
            ),
            (
                "postgres://a:s3cret@db/x?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
                "sslrootcert: cannot read /no/such/ca.pem",
            ),
        ] {
            let e = parse_with(url, &env).unwrap_err().to_string();
            assert!(e.starts_with("store.ledger:"), "{e}");
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
