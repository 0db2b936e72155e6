//! Raw TOML -> [`Config`], one function per section. Every message names the field it is
//! about, with its index (`backend[1].models[0].context_window must be > 0`), and all problems
//! are reported at once. Words users choose from (`hosting`, `window`, …) are serde enums in
//! the raw types, so a typo there is reported with its path by the parser itself.

use super::types::*;
use super::*;
use crate::secret::{redact_url, Secret};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where a backend's or the admin key comes from. Tests pass a map, the binary the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        source_name: name.clone(),
        errors: vec![ConfigError::new("", format!("cannot read file: {e}"))],
    })?;
    parse(&text, &name, env)
}

/// Parses and validates config text; `source_name` only labels errors.
pub fn parse(text: &str, source_name: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        source_name: source_name.to_string(),
        errors,
    };
    let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| fail(vec![parse_error(&e, text)]))?;
    validate(raw, env).map_err(fail)
}

/// A parse error with the field it is about: the parser's path, and its message in ours.
fn parse_error(e: &serde_path_to_error::Error<toml::de::Error>, text: &str) -> ConfigError {
    let path = e.path().to_string();
    let inner = e.inner();
    let message = inner.message().trim_end().to_string();
    // `unknown variant `x`, expected `a` or `b`` reads better as what the field must be.
    let message = match message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once("`, expected "))
    {
        Some((got, expected)) => format!("must be {expected}; got `{got}`"),
        None => message,
    };
    let path = if path == "." { String::new() } else { path };
    let message = match (path.is_empty(), inner.span()) {
        // Without a field to name (bad TOML syntax), the line and column say where. Not the
        // parser's own rendering: it quotes the line, which may hold a password.
        (true, Some(span)) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        _ => message,
    };
    ConfigError::new(path, message)
}

struct Checker {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    missing_keys: Vec<String>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Redacted like errors: a warning is printed by `check` and logged at start.
    fn warn(&mut self, message: String) {
        self.warnings
            .push(crate::secret::redact_urls(&message).into_owned());
    }

    /// Whether `value` can be the name of an environment variable. Refused without quoting
    /// it: a value that is not a name is most likely the key itself, pasted in its place.
    fn env_name(&mut self, path: &str, value: &str) -> bool {
        let valid = is_identifier(value);
        if !valid {
            self.err(
                path,
                "must be the name of an environment variable (letters, digits, _) that holds \
                 the key, not the key itself",
            );
        }
        valid
    }

    fn addr(&mut self, path: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.err(
                path,
                format!("must be an address like 127.0.0.1:8080, got `{value}`"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn seconds(&mut self, path: &str, value: f64) -> Duration {
        if value.is_finite() && value > 0.0 && value < 1e9 {
            Duration::from_secs_f64(value)
        } else {
            self.err(
                path,
                format!("must be a positive number of seconds, got {value}"),
            );
            Duration::from_secs(1)
        }
    }

    fn non_negative(&mut self, path: &str, value: Option<f64>) {
        if let Some(v) = value {
            if !(v.is_finite() && v >= 0.0) {
                self.err(path, format!("must be >= 0, got {v}"));
            }
        }
    }

    fn positive<T: Default + PartialEq>(&mut self, path: &str, value: T) {
        if value == T::default() {
            self.err(path, "must be > 0");
        }
    }

    fn name(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.err(path, "must not be empty");
        } else if value.len() > 128 || value.chars().any(|c| c.is_control()) {
            self.err(path, "must be at most 128 printable characters");
        }
    }
}

pub fn validate(raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, Vec<ConfigError>> {
    let mut c = Checker {
        errors: Vec::new(),
        warnings: Vec::new(),
        missing_keys: Vec::new(),
    };
    let server = server(&raw.server, env, &mut c);
    let budget_store = budget_store(&raw.store, &mut c);
    let (ledger_url, ledger_spool, ledger_fsync) = store(raw.store, &mut c);
    let routing = routing(&raw.routing, &mut c);
    let backends = backends(raw.backend, env, &mut c);
    let teams = teams(raw.team, &backends, &mut c);
    if matches!(budget_store, BudgetStore::Local) {
        for (i, t) in teams.iter().enumerate() {
            for (j, b) in t.budgets.iter().enumerate() {
                if b.fail_open {
                    // It would matter only when a shared budget store fails; the local store cannot.
                    c.err(
                        format!("team[{i}].budgets[{j}].fail_open"),
                        "has no effect with the local budget store, which cannot fail; remove it",
                    );
                }
            }
        }
    }
    if let BudgetStore::Redis(r) = &budget_store {
        for (i, t) in teams.iter().enumerate() {
            // `{}…}` is an empty hash tag: a Redis Cluster would scatter the team's keys, and
            // its scripts, which touch several, would be refused.
            if r.cluster && t.name.starts_with('}') {
                c.err(
                    format!("team[{i}].name"),
                    "must not start with `}` when budgets are in a Redis Cluster",
                );
            }
        }
    }
    let metrics = metrics(raw.metrics, &mut c);
    let focus = focus(raw.focus, &mut c);
    let alerts = alerts(raw.alerts, &mut c);
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Config {
        server,
        ledger_url,
        ledger_spool,
        ledger_fsync,
        budget_store,
        routing,
        backends,
        teams,
        metrics,
        focus,
        alerts,
        warnings: c.warnings,
        missing_keys: c.missing_keys,
    })
}

fn server(s: &RawServer, env: EnvLookup<'_>, c: &mut Checker) -> Server {
    let key_env = c.env_name("server.admin_key_env", &s.admin_key_env);
    let server = Server {
        listen: c.addr("server.listen", &s.listen),
        admin_listen: c.addr("server.admin_listen", &s.admin_listen),
        admin_key_env: s.admin_key_env.clone(),
        admin_key: key_env
            .then(|| env(&s.admin_key_env))
            .flatten()
            .map(Secret::new),
        admin_open: s.admin_open,
        max_body_bytes: s.max_body_bytes,
        request_timeout: c.seconds("server.request_timeout_s", s.request_timeout_s),
        header_read_timeout: c.seconds("server.header_read_timeout_s", s.header_read_timeout_s),
        body_read_timeout: c.seconds("server.body_read_timeout_s", s.body_read_timeout_s),
        max_header_bytes: s.max_header_bytes,
        max_headers: s.max_headers,
        max_in_flight: s.max_in_flight,
        max_in_flight_per_key: ((s.max_in_flight as f64 * s.key_in_flight_share).ceil() as usize)
            .max(1),
        listen_backlog: s.listen_backlog,
        shutdown_grace: c.seconds("server.shutdown_grace_s", s.shutdown_grace_s),
        max_response_bytes: s.max_response_bytes,
        max_n: s.max_n,
        replica: match &s.replica {
            Some(r) => Arc::from(r.as_str()),
            None => default_replica().into(),
        },
    };
    if let Some(r) = &s.replica {
        c.name("server.replica", r);
    }
    c.positive("server.max_n", s.max_n);
    c.positive("server.max_body_bytes", s.max_body_bytes);
    c.positive("server.max_in_flight", s.max_in_flight);
    c.positive("server.max_headers", s.max_headers);
    if s.max_header_bytes < 1024 {
        c.err("server.max_header_bytes", "must be at least 1024");
    }
    if !(s.key_in_flight_share > 0.0 && s.key_in_flight_share <= 1.0) {
        c.err(
            "server.key_in_flight_share",
            format!("must be in (0, 1], got {}", s.key_in_flight_share),
        );
    }
    c.positive("server.listen_backlog", s.listen_backlog);
    if server.listen == server.admin_listen && server.listen.port() != 0 {
        c.err("server.admin_listen", "must differ from server.listen");
    }
    match server.admin_access(server.admin_listen) {
        // A bad variable name is reported already, and quoting it here would print it.
        _ if !key_env => {}
        Ok(AdminAccess::Open) => c.warn(format!(
            "server.admin_open is true and ${} is not set: the admin port {} (/metrics, \
             /admin/*, reload) is open to anyone who can reach it",
            s.admin_key_env, server.admin_listen
        )),
        Ok(AdminAccess::Key | AdminAccess::Loopback) => {}
        Err(e) => c.errors.push(e),
    }
    server
}

/// The stores this build can keep. A store it cannot honour is an error, never ignored: a
/// user who names Redis believes budgets are shared across replicas. The value is quoted
/// back redacted: store URLs carry passwords.
fn store(s: RawStore, c: &mut Checker) -> (Secret, std::path::PathBuf, bool) {
    let is_pg = s.ledger.starts_with("postgres://") || s.ledger.starts_with("postgresql://");
    if is_pg {
        // Only the shape here (and the sslrootcert file): whether the server answers is the
        // gateway's start's question. libpq's TLS settings that the driver does not parse
        // come out first.
        match crate::ledger::pg_tls::take_tls_params(&s.ledger) {
            Ok(t) => {
                if let Err(e) = <tokio_postgres::Config as std::str::FromStr>::from_str(&t.url) {
                    c.err(
                        "store.ledger",
                        format!(
                            "not a valid PostgreSQL URL: {e} (got `{}`)",
                            redact_url(&s.ledger)
                        ),
                    );
                } else if let Err(e) =
                    crate::ledger::pg_tls::MakeRustls::new(t.verify, t.root_cert.as_deref())
                {
                    c.err("store.ledger", e.to_string());
                }
            }
            Err(e) => c.err(
                "store.ledger",
                format!("{e} (got `{}`)", redact_url(&s.ledger)),
            ),
        }
    } else if !s.ledger.starts_with("sqlite://") {
        c.err(
            "store.ledger",
            format!(
                "must be sqlite://path or postgres://user@host:port/db (got `{}`)",
                redact_url(&s.ledger)
            ),
        );
    }
    let spool = match s.spool.strip_prefix("sqlite://") {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => {
            c.err(
                "store.spool",
                format!("must be sqlite://path (got `{}`)", redact_url(&s.spool)),
            );
            std::path::PathBuf::new()
        }
    };
    (Secret::new(s.ledger), spool, s.fsync)
}

/// `store.budgets` and the settings of a Redis store. The URL is checked here, so a typo is
/// a config error naming the field, with its password hidden, not a failure at first use.
fn budget_store(s: &RawStore, c: &mut Checker) -> BudgetStore {
    if s.budgets == "local" {
        return BudgetStore::Local;
    }
    // A cluster is reached through any of its nodes: the client learns the rest.
    let urls: Vec<&str> = match s.redis_cluster {
        true => s.budgets.split(',').map(str::trim).collect(),
        false => vec![s.budgets.as_str()],
    };
    for url in urls {
        let shown = redact_url(url);
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            let want = match s.redis_cluster {
                true => "comma-separated redis://host:port or rediss://… nodes",
                false => "`local`, redis://host:port/db or rediss://…",
            };
            c.err("store.budgets", format!("must be {want} (got `{shown}`)"));
            return BudgetStore::Local;
        }
        match redis::Client::open(url) {
            Err(e) => {
                // The client's message may quote the URL; only the kind of fault is shown.
                let why = match e.kind() {
                    redis::ErrorKind::InvalidClientConfig => "is not a valid Redis URL",
                    _ => "cannot be used as a Redis URL",
                };
                c.err("store.budgets", format!("{why} (got `{shown}`)"));
            }
            Ok(client)
                if s.redis_cluster && client.get_connection_info().redis_settings().db() != 0 =>
            {
                c.err(
                    "store.budgets",
                    format!("a Redis Cluster has only database 0 (got `{shown}`)"),
                );
            }
            Ok(_) => {}
        }
    }
    let ca_file = (!s.redis_ca_file.is_empty()).then(|| std::path::PathBuf::from(&s.redis_ca_file));
    if let Some(path) = &ca_file {
        if !s
            .budgets
            .split(',')
            .all(|u| u.trim().starts_with("rediss://"))
        {
            c.err(
                "store.redis_ca_file",
                "is for TLS only: store.budgets must then be rediss://…",
            );
        }
        match std::fs::read_to_string(path) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
            Ok(_) => c.err(
                "store.redis_ca_file",
                format!("`{}` holds no PEM certificate", path.display()),
            ),
            Err(e) => c.err(
                "store.redis_ca_file",
                format!("cannot read `{}`: {e}", path.display()),
            ),
        }
    }
    if s.redis_timeout_ms == 0 || s.redis_timeout_ms > 5_000 {
        c.err("store.redis_timeout_ms", "must be in 1..=5000");
    }
    if !(s.fail_open_share >= 0.0 && s.fail_open_share <= 1.0) {
        c.err("store.fail_open_share", "must be in [0, 1]");
    }
    if s.redis_prefix.is_empty() || s.redis_prefix.contains(['{', '}']) {
        // Braces would change the cluster hash tag that keeps a team's keys on one node.
        c.err(
            "store.redis_prefix",
            "must be non-empty and without `{` or `}`",
        );
    }
    let lease_s = s.lease_s;
    // Renewed every third of it, on a loop that ticks at least every 250 ms for short leases.
    if !(lease_s.is_finite() && (1.0..=86_400.0).contains(&lease_s)) {
        c.err("store.lease_s", "must be in 1..=86400");
    }
    BudgetStore::Redis(RedisStore {
        url: Secret::new(s.budgets.as_str()),
        cluster: s.redis_cluster,
        ca_file,
        prefix: s.redis_prefix.clone(),
        timeout: Duration::from_millis(s.redis_timeout_ms),
        lease: Duration::from_secs_f64(lease_s.clamp(1.0, 86_400.0)),
        fail_open_share: s.fail_open_share,
    })
}

/// `hostname-pid`: unique among live processes, which is what tells replicas apart.
fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

fn routing(r: &RawRouting, c: &mut Checker) -> Routing {
    if r.max_attempts == 0 {
        c.err("routing.max_attempts", "must be >= 1");
    }
    if r.circuit_failures == 0 {
        c.err("routing.circuit_failures", "must be >= 1");
    }
    Routing {
        self_hosted_cost: r.self_hosted_cost,
        max_attempts: r.max_attempts,
        retry_on: r.retry_on.clone(),
        expected_output_tokens: r.expected_output_tokens,
        circuit_failures: r.circuit_failures,
        circuit_open: c.seconds("routing.circuit_open_s", r.circuit_open_s),
    }
}

fn backends(raw: Vec<RawBackend>, env: EnvLookup<'_>, c: &mut Checker) -> Vec<Arc<Backend>> {
    if raw.is_empty() {
        c.err("backend", "at least one [[backend]] is needed");
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let p = format!("backend[{i}]");
        if !names.insert(b.name.clone()) {
            c.err(
                format!("{p}.name"),
                format!("`{}` is used by another backend", b.name),
            );
        }
        out.push(Arc::new(backend(&p, b, env, c)));
    }
    out
}

fn backend(p: &str, b: RawBackend, env: EnvLookup<'_>, c: &mut Checker) -> Backend {
    c.name(&format!("{p}.name"), &b.name);
    let base_url = base_url(&b.url).unwrap_or_else(|why| {
        c.err(format!("{p}.url"), why);
        String::new()
    });
    let on_disconnect = b.on_disconnect.unwrap_or(match b.hosting {
        Hosting::SelfHosted => OnDisconnect::Cancel,
        Hosting::Commercial => OnDisconnect::Drain,
    });
    let api_key = b.api_key_env.as_ref().and_then(|var| {
        if !c.env_name(&format!("{p}.api_key_env"), var) {
            return None;
        }
        let key = env(var).map(Secret::new);
        if key.is_none() {
            c.missing_keys
                .push(format!("{p}.api_key_env names ${var}, which is not set"));
        }
        key
    });
    if b.max_concurrency == Some(0) {
        c.err(format!("{p}.max_concurrency"), "must be > 0");
    }
    let gpu = b.gpu.map(|g| gpu(p, g, c));
    c.non_negative(&format!("{p}.egress_usd_per_gb"), b.egress_usd_per_gb);
    let connect_timeout = c.seconds(
        &format!("{p}.connect_timeout_s"),
        b.connect_timeout_s.unwrap_or(DEFAULT_CONNECT_TIMEOUT_S),
    );
    let stream_idle_timeout = c.seconds(
        &format!("{p}.stream_idle_timeout_s"),
        b.stream_idle_timeout_s
            .unwrap_or(DEFAULT_STREAM_IDLE_TIMEOUT_S),
    );
    let pool_idle_timeout = c.seconds(
        &format!("{p}.pool_idle_timeout_s"),
        b.pool_idle_timeout_s.unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT_S),
    );
    let health_check = health_check(p, b.health_check, b.hosting, c);
    if b.models.is_empty() {
        c.err(format!("{p}.models"), "must list at least one model");
    }
    let mut model_names = HashSet::new();
    let models = b
        .models
        .into_iter()
        .enumerate()
        .map(|(j, m)| {
            let mp = format!("{p}.models[{j}]");
            if !model_names.insert(m.name.clone()) {
                c.err(
                    format!("{mp}.name"),
                    format!("`{}` is listed twice in this backend", m.name),
                );
            }
            model(&mp, m, c)
        })
        .collect();
    Backend {
        name: b.name.into(),
        protocol: b.protocol,
        base_url,
        api_key,
        hosting: b.hosting,
        region: b.region.map(Arc::from),
        max_concurrency: b.max_concurrency,
        gpu,
        egress_usd_per_gb: b.egress_usd_per_gb,
        on_disconnect,
        connect_timeout,
        stream_idle_timeout,
        pool_idle_timeout,
        stream_usage: b.stream_usage,
        engine: b.engine,
        health_check,
        models,
    }
}

fn gpu(p: &str, g: RawGpu, c: &mut Checker) -> GpuCost {
    let capex = gpu_capex(p, &g, c);
    let hourly_usd = match (g.hourly_usd, capex) {
        (Some(h), None) => {
            if !(h.is_finite() && h >= 0.0) {
                c.err(format!("{p}.gpu.hourly_usd"), "must be >= 0");
            }
            h
        }
        (None, Some(capex)) => capex.usd_per_hour(),
        // Two sources for one rate would disagree sooner or later; the reports need one.
        (Some(_), Some(_)) => {
            c.err(
                format!("{p}.gpu.hourly_usd"),
                "give hourly_usd or purchase_usd/amortization_months/power_watts/usd_per_kwh, not both",
            );
            0.0
        }
        (None, None) => {
            c.err(
                format!("{p}.gpu.hourly_usd"),
                "missing: give hourly_usd, or purchase_usd and amortization_months (with power_watts and usd_per_kwh for power)",
            );
            0.0
        }
    };
    if g.count == 0 {
        c.err(format!("{p}.gpu.count"), "must be > 0");
    }
    if !(g.fraction > 0.0 && g.fraction <= 1.0) {
        c.err(format!("{p}.gpu.fraction"), "must be in (0, 1]");
    }
    if let Some(t) = g.tokens_per_second {
        if !(t.is_finite() && t > 0.0) {
            c.err(format!("{p}.gpu.tokens_per_second"), "must be > 0");
        }
    }
    GpuCost {
        hourly_usd,
        capex,
        count: g.count,
        fraction: g.fraction,
        tokens_per_second: g.tokens_per_second,
    }
}

/// The capex fields, all or nothing by pair: a purchase needs its amortization period, power
/// needs its price; cooling is a share of power, so it needs power.
fn gpu_capex(p: &str, g: &RawGpu, c: &mut Checker) -> Option<GpuCapex> {
    let given = [
        g.purchase_usd,
        g.amortization_months,
        g.power_watts,
        g.usd_per_kwh,
        g.cooling_overhead,
    ]
    .iter()
    .any(Option::is_some);
    if !given {
        return None;
    }
    let mut field = |name: &str, v: Option<f64>, min_exclusive: bool| -> f64 {
        match v {
            Some(x) if x.is_finite() && (x > 0.0 || (!min_exclusive && x == 0.0)) => x,
            Some(_) => {
                c.err(
                    format!("{p}.gpu.{name}"),
                    if min_exclusive {
                        "must be > 0"
                    } else {
                        "must be >= 0"
                    },
                );
                0.0
            }
            None => 0.0,
        }
    };
    let purchase = field("purchase_usd", g.purchase_usd, false);
    let months = field("amortization_months", g.amortization_months, true);
    let watts = field("power_watts", g.power_watts, false);
    let per_kwh = field("usd_per_kwh", g.usd_per_kwh, false);
    let cooling = field("cooling_overhead", g.cooling_overhead, false);
    let pair = |c: &mut Checker, a: (&str, Option<f64>), b: (&str, Option<f64>)| {
        if a.1.is_some() && b.1.is_none() {
            c.err(
                format!("{p}.gpu.{}", b.0),
                format!("missing: {} needs it", a.0),
            );
        }
    };
    pair(
        c,
        ("purchase_usd", g.purchase_usd),
        ("amortization_months", g.amortization_months),
    );
    pair(
        c,
        ("amortization_months", g.amortization_months),
        ("purchase_usd", g.purchase_usd),
    );
    pair(
        c,
        ("power_watts", g.power_watts),
        ("usd_per_kwh", g.usd_per_kwh),
    );
    pair(
        c,
        ("usd_per_kwh", g.usd_per_kwh),
        ("power_watts", g.power_watts),
    );
    pair(
        c,
        ("cooling_overhead", g.cooling_overhead),
        ("power_watts", g.power_watts),
    );
    let power = watts / 1000.0 * per_kwh;
    Some(GpuCapex {
        amortized_usd_per_hour: if months > 0.0 {
            purchase / (months * HOURS_PER_MONTH)
        } else {
            0.0
        },
        power_usd_per_hour: power,
        cooling_usd_per_hour: power * cooling,
    })
}

fn health_check(
    p: &str,
    raw: Option<RawHealthCheck>,
    hosting: Hosting,
    c: &mut Checker,
) -> Option<HealthCheck> {
    match raw {
        // Self-hosted servers are probed by default: they are the ones that go away (a
        // restarted vLLM, a preempted GPU node) and come back.
        None if hosting == Hosting::SelfHosted => Some(HealthCheck {
            path: DEFAULT_HEALTH_PATH.into(),
            interval: Duration::from_secs_f64(DEFAULT_HEALTH_INTERVAL_S),
            timeout: Duration::from_secs_f64(DEFAULT_HEALTH_TIMEOUT_S),
        }),
        None => None,
        Some(h) if h.interval_s == 0.0 => None,
        Some(h) => {
            if !h.path.starts_with('/') || h.path.parse::<http::Uri>().is_err() {
                c.err(
                    format!("{p}.health_check.path"),
                    format!("must be a path starting with /, got `{}`", h.path),
                );
            }
            Some(HealthCheck {
                path: h.path,
                interval: c.seconds(&format!("{p}.health_check.interval_s"), h.interval_s),
                timeout: c.seconds(&format!("{p}.health_check.timeout_s"), h.timeout_s),
            })
        }
    }
}

fn model(mp: &str, m: RawModel, c: &mut Checker) -> BackendModel {
    c.name(&format!("{mp}.name"), &m.name);
    for (k, a) in m.aliases.iter().enumerate() {
        c.name(&format!("{mp}.aliases[{k}]"), a);
    }
    if m.context_window == Some(0) {
        c.err(format!("{mp}.context_window"), "must be > 0");
    }
    if m.max_output_tokens == Some(0) {
        c.err(format!("{mp}.max_output_tokens"), "must be > 0");
    }
    let features = match &m.features {
        None => Features::UNDECLARED,
        Some(list) => list
            .iter()
            .fold(Features::NONE, |acc, f| acc.with(Features::from(*f))),
    };
    c.non_negative(&format!("{mp}.input_usd_per_mtok"), m.input_usd_per_mtok);
    c.non_negative(&format!("{mp}.output_usd_per_mtok"), m.output_usd_per_mtok);
    c.non_negative(
        &format!("{mp}.cached_input_usd_per_mtok"),
        m.cached_input_usd_per_mtok,
    );
    c.non_negative(
        &format!("{mp}.cache_write_usd_per_mtok"),
        m.cache_write_usd_per_mtok,
    );
    c.non_negative(
        &format!("{mp}.cache_write_1h_usd_per_mtok"),
        m.cache_write_1h_usd_per_mtok,
    );
    BackendModel {
        name: m.name.into(),
        aliases: m.aliases.into_iter().map(Arc::from).collect(),
        context_window: m.context_window,
        max_output_tokens: m.max_output_tokens,
        features,
        input_usd_per_mtok: m.input_usd_per_mtok,
        output_usd_per_mtok: m.output_usd_per_mtok,
        cached_input_usd_per_mtok: m.cached_input_usd_per_mtok,
        cache_write_usd_per_mtok: m.cache_write_usd_per_mtok,
        cache_write_1h_usd_per_mtok: m.cache_write_1h_usd_per_mtok,
    }
}

fn teams(raw: Vec<RawTeam>, backends: &[Arc<Backend>], c: &mut Checker) -> Vec<Arc<Team>> {
    let regions: HashSet<&str> = backends
        .iter()
        .filter_map(|b| b.region.as_deref())
        .collect();
    let mut names = HashSet::new();
    let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let p = format!("team[{i}]");
        if !names.insert(t.name.clone()) {
            c.err(
                format!("{p}.name"),
                format!("`{}` is used by another team", t.name),
            );
        }
        out.push(Arc::new(team(&p, t, &regions, &mut key_owner, c)));
    }
    out
}

fn team(
    p: &str,
    t: RawTeam,
    regions: &HashSet<&str>,
    key_owner: &mut HashMap<[u8; 32], String>,
    c: &mut Checker,
) -> Team {
    c.name(&format!("{p}.name"), &t.name);
    let mut key_hashes = Vec::with_capacity(t.keys.len());
    for (k, key) in t.keys.iter().enumerate() {
        match parse_key_hash(key) {
            Some(h) => {
                if let Some(other) = key_owner.insert(h, t.name.clone()) {
                    c.err(
                        format!("{p}.keys[{k}]"),
                        format!("is also a key of team `{other}`"),
                    );
                }
                key_hashes.push(h);
            }
            None => c.err(
                format!("{p}.keys[{k}]"),
                "must be `sha256:` followed by 64 hex digits (see `tollgate key new`)",
            ),
        }
    }
    for (k, r) in t.regions.iter().enumerate() {
        if !regions.contains(r.as_str()) {
            c.warn(format!("{p}.regions[{k}]: no backend is in region `{r}`"));
        }
    }
    let budgets = t
        .budgets
        .into_iter()
        .enumerate()
        .map(|(k, b)| budget(&format!("{p}.budgets[{k}]"), b, c))
        .collect();
    Team {
        name: t.name.into(),
        key_hashes,
        tags: t.tags,
        request_tags: t.request_tags,
        regions: t.regions.into_iter().map(Arc::from).collect(),
        budgets,
    }
}

fn budget(bp: &str, b: RawBudget, c: &mut Checker) -> Budget {
    if b.tokens.is_none() && b.usd.is_none() {
        c.err(bp, "needs `tokens` or `usd`");
    }
    c.non_negative(&format!("{bp}.usd"), b.usd);
    if let Some(r) = b.soft_ratio {
        if !(r > 0.0 && r <= 1.0) {
            c.err(format!("{bp}.soft_ratio"), "must be in (0, 1]");
        }
    }
    Budget {
        window: b.window,
        tokens: b.tokens,
        usd: b.usd,
        nusd: b.usd.map(|u| (u * 1e9).round() as i64),
        soft_ratio: b.soft_ratio,
        per_key: b.per_key,
        fail_open: b.fail_open,
    }
}

fn metrics(raw: RawMetrics, c: &mut Checker) -> Metrics {
    let mut labels: Vec<Arc<str>> = Vec::new();
    for (i, key) in raw.tag_labels.iter().enumerate() {
        let field = format!("metrics.tag_labels[{i}]");
        let valid = is_identifier(key) && !key.starts_with("__");
        if !valid {
            c.err(
                field,
                format!("`{key}` is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"),
            );
        } else if RESERVED_LABELS.contains(&key.as_str()) {
            c.err(
                field,
                format!("`{key}` is a label the gateway already uses"),
            );
        } else if labels.iter().any(|l| **l == **key) {
            c.err(field, format!("`{key}` is listed twice"));
        } else {
            labels.push(key.as_str().into());
        }
    }
    if labels.len() > 8 {
        c.err(
            "metrics.tag_labels",
            "at most 8 tag labels: each one multiplies the series of every request metric",
        );
    }
    let mut seconds = |name: &str, v: Option<f64>, default: f64| {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            c.err(format!("metrics.{name}"), "must be > 0");
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(v)
    };
    let idle_after = seconds("idle_after_s", raw.idle_after_s, DEFAULT_IDLE_AFTER_S);
    let busy_window = seconds("busy_window_s", raw.busy_window_s, DEFAULT_BUSY_WINDOW_S);
    let max_tag_values = raw.max_tag_values.unwrap_or(DEFAULT_MAX_TAG_VALUES);
    c.positive("metrics.max_tag_values", max_tag_values);
    Metrics {
        tag_labels: labels.into(),
        max_tag_values,
        idle_after,
        busy_window,
    }
}

fn focus(raw: RawFocus, c: &mut Checker) -> Focus {
    let provider_name = raw.provider_name;
    let invoice_issuer_name = raw
        .invoice_issuer_name
        .unwrap_or_else(|| provider_name.clone());
    let host_provider_name = raw
        .host_provider_name
        .unwrap_or_else(|| provider_name.clone());
    c.name("focus.billing_account_id", &raw.billing_account_id);
    c.name("focus.billing_account_name", &raw.billing_account_name);
    c.name("focus.provider_name", &provider_name);
    c.name("focus.invoice_issuer_name", &invoice_issuer_name);
    c.name("focus.host_provider_name", &host_provider_name);
    if invoice_issuer_name != provider_name {
        c.warn(format!(
            "focus.invoice_issuer_name `{invoice_issuer_name}` differs from focus.provider_name \
             `{provider_name}`: FOCUS reads that as a third party collecting the payment and \
             expects a BilledCost of 0 (focus-validator rule BilledCost-C-005-C)"
        ));
    }
    Focus {
        billing_account_id: raw.billing_account_id,
        billing_account_name: raw.billing_account_name,
        provider_name,
        invoice_issuer_name,
        host_provider_name,
    }
}

fn alerts(raw: RawAlerts, c: &mut Checker) -> Alerts {
    let url = raw.url.and_then(|url| {
        // Quoted back redacted: the URL may be the receiver's secret.
        let shown = redact_url(&url).into_owned();
        let problem = match url.parse::<http::Uri>() {
            Err(_) => Some(format!("`{shown}` is not a URL")),
            Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => Some(
                "must not carry credentials (user:password@); put a token in the path or query"
                    .to_string(),
            ),
            Ok(u) if !matches!(u.scheme_str(), Some("http" | "https")) => {
                Some("must start with http:// or https://".into())
            }
            Ok(u) if u.host().is_none_or(str::is_empty) => Some("has no host".into()),
            Ok(_) => None,
        };
        match problem {
            Some(p) => {
                c.err("alerts.url", p);
                None
            }
            None => Some(Secret::new(url)),
        }
    });
    let hours = raw.forecast_hours;
    let forecast = if hours.is_finite() && hours > 0.0 && hours <= 24.0 * 366.0 {
        std::time::Duration::from_secs_f64(hours * 3600.0)
    } else {
        c.err(
            "alerts.forecast_hours",
            format!("must be a positive number of hours, at most a year, got {hours}"),
        );
        std::time::Duration::from_secs(3600)
    };
    if raw.max_attempts == 0 || raw.max_attempts > 100 {
        c.err("alerts.max_attempts", "must be between 1 and 100");
    }
    if raw.queue == 0 || raw.queue > 1_000_000 {
        c.err("alerts.queue", "must be between 1 and 1000000");
    }
    Alerts {
        url,
        forecast,
        check_interval: c.seconds("alerts.check_interval_s", raw.check_interval_s),
        timeout: c.seconds("alerts.timeout_s", raw.timeout_s),
        max_attempts: raw.max_attempts.clamp(1, 100),
        retry_initial: c.seconds("alerts.retry_initial_s", raw.retry_initial_s),
        queue: raw.queue.clamp(1, 1_000_000),
    }
}

/// Accepts `http(s)://host[:port][/prefix]`; a query, fragment or credentials would be
/// silently mangled when the request path is appended, so they are refused.
fn base_url(url: &str) -> Result<String, String> {
    // Quoted back redacted: credentials are refused below, but only once the URL parses.
    let shown = redact_url(url);
    if shown != url {
        return Err("must not carry credentials; use api_key_env".into());
    }
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if uri.query().is_some() {
        return Err(format!("`{url}` must not have a query"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        authority,
        prefix
    ))
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what both an environment variable and a Prometheus label may be
/// named.
fn is_identifier(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

pub fn parse_key_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
