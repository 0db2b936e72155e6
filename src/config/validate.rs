//! Raw TOML -> [`Config`]. Every message names the field it is about, with its index
//! (`backend[1].models[0].context_window must be > 0`), and all problems are reported at once.

use super::*;
use crate::secret::Secret;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A validated config: nothing in it needs checking again.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub ledger_url: String,
    pub ledger_fsync: bool,
    pub budget_store: String,
    pub routing: Routing,
    pub backends: Vec<Arc<Backend>>,
    pub teams: Vec<Arc<Team>>,
    pub metrics: Metrics,
    pub focus: Focus,
    /// Things worth a log line that do not stop the gateway.
    pub warnings: Vec<String>,
    /// `api_key_env` variables that are not set: `serve` refuses to start, `check` warns.
    pub missing_keys: Vec<String>,
}

#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_key_env: String,
    pub admin_key: Option<Secret>,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_in_flight: usize,
    pub listen_backlog: u32,
    pub shutdown_grace: Duration,
    pub max_response_bytes: u64,
}

#[derive(Debug)]
pub struct Routing {
    pub self_hosted_cost: SelfHostedCost,
    pub max_attempts: u32,
    pub expected_output_tokens: u64,
    pub circuit_failures: u32,
    pub circuit_open: Duration,
}

/// What routing counts for a self-hosted backend with spare capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfHostedCost {
    /// Paid-for capacity is free until it is saturated: the baseline stays on owned GPUs.
    Marginal,
    /// Its rate card price, compared like any other.
    RateCard,
}

impl SelfHostedCost {
    pub fn as_str(self) -> &'static str {
        match self {
            SelfHostedCost::Marginal => "marginal",
            SelfHostedCost::RateCard => "rate_card",
        }
    }
}

/// What a model can do, as declared in config; what a request needs, as parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(u8);

impl Features {
    pub const NONE: Features = Features(0);
    pub const TOOLS: Features = Features(1);
    pub const VISION: Features = Features(2);
    pub const JSON: Features = Features(4);
    /// A model whose `features` are not declared: supports every feature for routing, and
    /// is told apart from one that declares all three.
    pub const UNDECLARED: Features = Features(0x80 | 7);
    const NAMES: [(Features, &'static str); 3] = [
        (Features::TOOLS, "tools"),
        (Features::VISION, "vision"),
        (Features::JSON, "json"),
    ];

    pub fn from_name(name: &str) -> Option<Features> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
    }

    pub fn with(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The features of `self` that `supported` lacks.
    pub fn missing_from(self, supported: Features) -> Features {
        Features(self.0 & !supported.0)
    }

    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(f, _)| self.0 & f.0 != 0)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.names().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(n)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosting {
    SelfHosted,
    Commercial,
}

impl Hosting {
    pub fn as_str(self) -> &'static str {
        match self {
            Hosting::SelfHosted => "self_hosted",
            Hosting::Commercial => "commercial",
        }
    }
}

/// What happens upstream when a client goes away mid-response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Stop the upstream request: frees a self-hosted GPU at once.
    Cancel,
    /// Read to the end: a commercial provider bills the whole answer anyway, and its final
    /// usage is the only exact count.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
pub struct GpuCost {
    pub hourly_usd: f64,
    pub count: u32,
    pub fraction: f64,
    pub tokens_per_second: Option<f64>,
}

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// `scheme://authority` plus an optional path prefix without a trailing slash.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub hosting: Hosting,
    pub region: Option<Arc<str>>,
    pub max_concurrency: Option<u32>,
    pub gpu: Option<GpuCost>,
    pub egress_usd_per_gb: Option<f64>,
    pub on_disconnect: OnDisconnect,
    pub connect_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub stream_usage: bool,
    pub engine: super::Engine,
    /// `None`: not probed (passive health only).
    pub health_check: Option<HealthCheck>,
    pub models: Vec<BackendModel>,
}

#[derive(Debug)]
pub struct BackendModel {
    pub name: Arc<str>,
    pub aliases: Vec<Arc<str>>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub features: Features,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    pub cached_input_usd_per_mtok: Option<f64>,
}

#[derive(Debug)]
pub struct Team {
    pub name: Arc<str>,
    pub key_hashes: Vec<[u8; 32]>,
    pub tags: BTreeMap<String, String>,
    pub request_tags: Vec<String>,
    pub regions: Vec<Arc<str>>,
    pub budgets: Vec<Budget>,
}

#[derive(Debug)]
pub struct Budget {
    pub window: Window,
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
    /// `usd` in nano-dollars: budgets compare integers.
    pub nusd: Option<i64>,
    pub soft_ratio: Option<f64>,
    pub fail_open: bool,
    pub per_key: bool,
}

/// One problem in a config file, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{} {}", self.path, self.message)
        }
    }
}

/// All the problems found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.source_name)?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

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
        errors: vec![ConfigError {
            path: String::new(),
            message: format!("cannot read file: {e}"),
        }],
    })?;
    parse(&text, &name, env)
}

/// Parses and validates config text; `source_name` only labels errors.
pub fn parse(text: &str, source_name: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors {
        source_name: source_name.to_string(),
        errors: vec![ConfigError {
            path: String::new(),
            message: e.to_string().trim_end().to_string(),
        }],
    })?;
    validate(raw, env).map_err(|errors| ConfigErrors {
        source_name: source_name.to_string(),
        errors,
    })
}

struct Checker {
    errors: Vec<ConfigError>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
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

    fn name(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.err(path, "must not be empty");
        } else if value.len() > 128 || value.chars().any(|c| c.is_control()) {
            self.err(path, "must be at most 128 printable characters");
        }
    }
}

pub fn validate(raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, Vec<ConfigError>> {
    let mut c = Checker { errors: Vec::new() };
    let mut warnings = Vec::new();
    let mut missing_keys = Vec::new();

    let s = &raw.server;
    let server = Server {
        listen: c.addr("server.listen", &s.listen),
        admin_listen: c.addr("server.admin_listen", &s.admin_listen),
        admin_key_env: s.admin_key_env.clone(),
        admin_key: env(&s.admin_key_env).map(Secret::new),
        max_body_bytes: s.max_body_bytes,
        request_timeout: c.seconds("server.request_timeout_s", s.request_timeout_s),
        header_read_timeout: c.seconds("server.header_read_timeout_s", s.header_read_timeout_s),
        max_in_flight: s.max_in_flight,
        listen_backlog: s.listen_backlog,
        shutdown_grace: c.seconds("server.shutdown_grace_s", s.shutdown_grace_s),
        max_response_bytes: s.max_response_bytes,
    };
    if s.max_body_bytes == 0 {
        c.err("server.max_body_bytes", "must be > 0");
    }
    if s.max_in_flight == 0 {
        c.err("server.max_in_flight", "must be > 0");
    }
    if s.listen_backlog == 0 {
        c.err("server.listen_backlog", "must be > 0");
    }
    if server.listen == server.admin_listen && server.listen.port() != 0 {
        c.err("server.admin_listen", "must differ from server.listen");
    }
    if server.admin_key.is_none() && !server.admin_listen.ip().is_loopback() {
        warnings.push(format!(
            "server.admin_listen is {} but {} is not set: /metrics and /admin are open to the network",
            server.admin_listen, s.admin_key_env
        ));
    }

    if !(raw.store.ledger.starts_with("sqlite://") || raw.store.ledger.starts_with("postgres://")) {
        c.err(
            "store.ledger",
            format!(
                "must start with sqlite:// or postgres://, got `{}`",
                raw.store.ledger
            ),
        );
    }
    if !(raw.store.budgets == "local" || raw.store.budgets.starts_with("redis://")) {
        c.err(
            "store.budgets",
            format!("must be `local` or redis://…, got `{}`", raw.store.budgets),
        );
    }
    let self_hosted_cost = match raw.routing.self_hosted_cost.as_str() {
        "marginal" => SelfHostedCost::Marginal,
        "rate_card" => SelfHostedCost::RateCard,
        other => {
            c.err(
                "routing.self_hosted_cost",
                format!("must be `marginal` or `rate_card`, got `{other}`"),
            );
            SelfHostedCost::Marginal
        }
    };
    if raw.routing.max_attempts == 0 {
        c.err("routing.max_attempts", "must be >= 1");
    }
    if raw.routing.circuit_failures == 0 {
        c.err("routing.circuit_failures", "must be >= 1");
    }
    let routing = Routing {
        self_hosted_cost,
        max_attempts: raw.routing.max_attempts,
        expected_output_tokens: raw.routing.expected_output_tokens,
        circuit_failures: raw.routing.circuit_failures,
        circuit_open: c.seconds("routing.circuit_open_s", raw.routing.circuit_open_s),
    };

    let mut backend_names = HashSet::new();
    let mut backends = Vec::with_capacity(raw.backend.len());
    if raw.backend.is_empty() {
        c.err("backend", "at least one [[backend]] is needed");
    }
    for (i, b) in raw.backend.into_iter().enumerate() {
        let p = format!("backend[{i}]");
        c.name(&format!("{p}.name"), &b.name);
        if !backend_names.insert(b.name.clone()) {
            c.err(
                format!("{p}.name"),
                format!("`{}` is used by another backend", b.name),
            );
        }
        let protocol = match b.protocol.as_str() {
            "openai" => Protocol::OpenAi,
            "anthropic" => {
                c.err(
                    format!("{p}.protocol"),
                    "`anthropic` backends are not supported yet; use `openai`",
                );
                Protocol::Anthropic
            }
            other => {
                c.err(
                    format!("{p}.protocol"),
                    format!("must be `openai` or `anthropic`, got `{other}`"),
                );
                Protocol::OpenAi
            }
        };
        let base_url = match base_url(&b.url) {
            Ok(u) => u,
            Err(why) => {
                c.err(format!("{p}.url"), why);
                String::new()
            }
        };
        let hosting = match b.hosting.as_str() {
            "self_hosted" => Hosting::SelfHosted,
            "commercial" => Hosting::Commercial,
            other => {
                c.err(
                    format!("{p}.hosting"),
                    format!("must be `self_hosted` or `commercial`, got `{other}`"),
                );
                Hosting::Commercial
            }
        };
        let on_disconnect = match b.on_disconnect.as_deref() {
            None if hosting == Hosting::SelfHosted => OnDisconnect::Cancel,
            None => OnDisconnect::Drain,
            Some("cancel") => OnDisconnect::Cancel,
            Some("drain") => OnDisconnect::Drain,
            Some(other) => {
                c.err(
                    format!("{p}.on_disconnect"),
                    format!("must be `cancel` or `drain`, got `{other}`"),
                );
                OnDisconnect::Cancel
            }
        };
        let api_key = match &b.api_key_env {
            Some(var) => {
                let key = env(var).map(Secret::new);
                if key.is_none() {
                    missing_keys.push(format!("{p}.api_key_env names ${var}, which is not set"));
                }
                key
            }
            None => None,
        };
        if b.max_concurrency == Some(0) {
            c.err(format!("{p}.max_concurrency"), "must be > 0");
        }
        let gpu = b.gpu.map(|g| {
            if !(g.hourly_usd.is_finite() && g.hourly_usd >= 0.0) {
                c.err(format!("{p}.gpu.hourly_usd"), "must be >= 0");
            }
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
                hourly_usd: g.hourly_usd,
                count: g.count,
                fraction: g.fraction,
                tokens_per_second: g.tokens_per_second,
            }
        });
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
        let health_check = match b.health_check {
            // Self-hosted servers are probed by default: they are the ones that go away
            // (a restarted vLLM, a preempted GPU node) and come back.
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
        };
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
                c.name(&format!("{mp}.name"), &m.name);
                if !model_names.insert(m.name.clone()) {
                    c.err(
                        format!("{mp}.name"),
                        format!("`{}` is listed twice in this backend", m.name),
                    );
                }
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
                    Some(list) => list.iter().enumerate().fold(Features::NONE, |acc, (k, f)| {
                        match Features::from_name(f) {
                            Some(one) => acc.with(one),
                            None => {
                                c.err(
                                    format!("{mp}.features[{k}]"),
                                    format!("must be one of tools, vision, json; got `{f}`"),
                                );
                                acc
                            }
                        }
                    }),
                };
                c.non_negative(&format!("{mp}.input_usd_per_mtok"), m.input_usd_per_mtok);
                c.non_negative(&format!("{mp}.output_usd_per_mtok"), m.output_usd_per_mtok);
                c.non_negative(
                    &format!("{mp}.cached_input_usd_per_mtok"),
                    m.cached_input_usd_per_mtok,
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
                }
            })
            .collect();
        backends.push(Arc::new(Backend {
            name: b.name.into(),
            protocol,
            base_url,
            api_key,
            hosting,
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
        }));
    }

    let regions: HashSet<&str> = backends
        .iter()
        .filter_map(|b| b.region.as_deref())
        .collect();
    let mut team_names = HashSet::new();
    let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
    let mut teams = Vec::with_capacity(raw.team.len());
    for (i, t) in raw.team.into_iter().enumerate() {
        let p = format!("team[{i}]");
        c.name(&format!("{p}.name"), &t.name);
        if !team_names.insert(t.name.clone()) {
            c.err(
                format!("{p}.name"),
                format!("`{}` is used by another team", t.name),
            );
        }
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
                warnings.push(format!("{p}.regions[{k}]: no backend is in region `{r}`"));
            }
        }
        let budgets = t
            .budgets
            .into_iter()
            .enumerate()
            .map(|(k, b)| {
                let bp = format!("{p}.budgets[{k}]");
                let window = match b.window.as_str() {
                    "minute" => Window::Minute,
                    "hour" => Window::Hour,
                    "day" => Window::Day,
                    "month" => Window::Month,
                    other => {
                        c.err(
                            format!("{bp}.window"),
                            format!("must be minute, hour, day or month; got `{other}`"),
                        );
                        Window::Day
                    }
                };
                if b.tokens.is_none() && b.usd.is_none() {
                    c.err(bp.clone(), "needs `tokens` or `usd`");
                }
                c.non_negative(&format!("{bp}.usd"), b.usd);
                if let Some(r) = b.soft_ratio {
                    if !(r > 0.0 && r <= 1.0) {
                        c.err(format!("{bp}.soft_ratio"), "must be in (0, 1]");
                    }
                }
                Budget {
                    window,
                    tokens: b.tokens,
                    usd: b.usd,
                    nusd: b.usd.map(|u| (u * 1e9).round() as i64),
                    soft_ratio: b.soft_ratio,
                    fail_open: b.fail_open,
                    per_key: b.per_key,
                }
            })
            .collect();
        teams.push(Arc::new(Team {
            name: t.name.into(),
            key_hashes,
            tags: t.tags,
            request_tags: t.request_tags,
            regions: t.regions.into_iter().map(Arc::from).collect(),
            budgets,
        }));
    }

    let metrics = metrics(raw.metrics, &mut c);
    let focus = focus(raw.focus, &mut c, &mut warnings);
    if c.errors.is_empty() {
        Ok(Config {
            server,
            ledger_url: raw.store.ledger,
            ledger_fsync: raw.store.fsync,
            budget_store: raw.store.budgets,
            routing,
            backends,
            teams,
            metrics,
            focus,
            warnings,
            missing_keys,
        })
    } else {
        Err(c.errors)
    }
}

/// What becomes a metric label and how GPU use is watched (`[metrics]`).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub tag_labels: Arc<[Arc<str>]>,
    pub max_tag_values: usize,
    pub idle_after: Duration,
    pub busy_window: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            tag_labels: Arc::new([]),
            max_tag_values: super::DEFAULT_MAX_TAG_VALUES,
            idle_after: Duration::from_secs_f64(super::DEFAULT_IDLE_AFTER_S),
            busy_window: Duration::from_secs_f64(super::DEFAULT_BUSY_WINDOW_S),
        }
    }
}

fn metrics(raw: super::RawMetrics, c: &mut Checker) -> Metrics {
    let mut labels: Vec<Arc<str>> = Vec::new();
    for (i, key) in raw.tag_labels.iter().enumerate() {
        let field = format!("metrics.tag_labels[{i}]");
        let valid = key
            .chars()
            .next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && key
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            && !key.starts_with("__");
        if !valid {
            c.err(
                field,
                format!("`{key}` is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"),
            );
        } else if super::RESERVED_LABELS.contains(&key.as_str()) {
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
    let idle_after = seconds(
        "idle_after_s",
        raw.idle_after_s,
        super::DEFAULT_IDLE_AFTER_S,
    );
    let busy_window = seconds(
        "busy_window_s",
        raw.busy_window_s,
        super::DEFAULT_BUSY_WINDOW_S,
    );
    let max_tag_values = raw.max_tag_values.unwrap_or(super::DEFAULT_MAX_TAG_VALUES);
    if max_tag_values == 0 {
        c.err("metrics.max_tag_values", "must be > 0");
    }
    Metrics {
        tag_labels: labels.into(),
        max_tag_values,
        idle_after,
        busy_window,
    }
}

/// Who bills whom in the FOCUS export (`[focus]`): the names FinOps tools group charges by.
#[derive(Debug, Clone)]
pub struct Focus {
    pub billing_account_id: String,
    pub billing_account_name: String,
    pub provider_name: String,
    pub invoice_issuer_name: String,
    pub host_provider_name: String,
}

fn focus(raw: super::RawFocus, c: &mut Checker, warnings: &mut Vec<String>) -> Focus {
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
        warnings.push(format!(
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

/// Accepts `http(s)://host[:port][/prefix]`; a query, fragment or credentials would be
/// silently mangled when the request path is appended, so they are refused.
fn base_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err("must not carry credentials; use api_key_env".into());
    }
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
