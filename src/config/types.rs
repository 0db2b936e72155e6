//! The validated config: what the gateway runs on. Nothing in it needs checking again;
//! `validate.rs` makes it from the raw TOML types of `mod.rs`.

use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A validated config: nothing in it needs checking again.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    /// `sqlite://path` or `postgres://…` (checked to parse). A secret: it may hold a password.
    pub ledger_url: Secret,
    /// The spool file of a PostgreSQL ledger.
    pub ledger_spool: std::path::PathBuf,
    pub ledger_fsync: bool,
    pub budget_store: BudgetStore,
    pub routing: Routing,
    pub backends: Vec<Arc<Backend>>,
    pub teams: Vec<Arc<Team>>,
    pub metrics: Metrics,
    pub focus: Focus,
    pub alerts: Alerts,
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
    pub admin_open: bool,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_in_flight: usize,
    /// Requests one API key may have in flight: its share of `max_in_flight`, at least 1.
    pub max_in_flight_per_key: usize,
    pub listen_backlog: u32,
    pub shutdown_grace: Duration,
    pub max_response_bytes: u64,
    pub max_n: u64,
    /// Stamped on every ledger record this process writes.
    pub replica: Arc<str>,
}

/// How the admin port's guarded paths (`/metrics`, `/admin/*`) are kept from strangers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAccess {
    /// The admin key.
    Key,
    /// No key, but only this machine can connect.
    Loopback,
    /// No key, reachable from the network, because `admin_open` says so.
    Open,
}

impl Server {
    /// How the admin port listening on `addr` is guarded. An admin port reachable from the
    /// network with no key is an error unless `admin_open` says it is meant: anyone who can
    /// connect could read every team's spend, or reload the config. `addr` is the address
    /// actually bound, which tests choose apart from the config.
    pub fn admin_access(&self, addr: SocketAddr) -> Result<AdminAccess, ConfigError> {
        if self.admin_key.is_some() {
            Ok(AdminAccess::Key)
        } else if addr.ip().is_loopback() {
            Ok(AdminAccess::Loopback)
        } else if self.admin_open {
            Ok(AdminAccess::Open)
        } else {
            let var = &self.admin_key_env;
            Err(ConfigError::new(
                "server.admin_key_env",
                format!(
                    "names ${var}, which is not set: the admin port {addr} would be open to \
                     anyone who can reach it; set ${var}, make server.admin_listen a loopback \
                     address, or set server.admin_open = true to serve it without a key"
                ),
            ))
        }
    }
}

#[derive(Debug)]
pub struct Routing {
    pub self_hosted_cost: SelfHostedCost,
    pub max_attempts: u32,
    /// The failures after which a request goes to the next backend; `None`: connect, 429
    /// and 5xx always, and timeout and failed from a self-hosted backend (whose wasted work
    /// is not billed per token).
    pub retry_on: Option<Vec<RetryOn>>,
    pub expected_output_tokens: u64,
    pub circuit_failures: u32,
    pub circuit_open: Duration,
}

/// A failed try after which a request may go to the next backend. After `timeout` and
/// `failed` the backend may still be generating (and billing) what was asked; the others
/// are answers that it did not or could not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RetryOn {
    /// The backend could not be reached: it never saw the request.
    #[serde(rename = "connect")]
    Connect,
    /// It refused the request as busy.
    #[serde(rename = "429")]
    Busy,
    /// It answered with a server error.
    #[serde(rename = "5xx")]
    ServerError,
    /// It sent no response headers in time (it may still be generating).
    #[serde(rename = "timeout")]
    Timeout,
    /// The connection broke after the request was sent.
    #[serde(rename = "failed")]
    Failed,
}

impl RetryOn {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::Connect => "connect",
            RetryOn::Busy => "429",
            RetryOn::ServerError => "5xx",
            RetryOn::Timeout => "timeout",
            RetryOn::Failed => "failed",
        }
    }

    /// Whether the backend may be working on the request despite the failure.
    pub fn after_send(self) -> bool {
        matches!(self, RetryOn::Timeout | RetryOn::Failed)
    }
}

/// What routing counts for a self-hosted backend with spare capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// One thing a model can do, as users write it in `features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    Tools,
    Vision,
    Json,
}

impl From<Feature> for Features {
    fn from(f: Feature) -> Features {
        match f {
            Feature::Tools => Features::TOOLS,
            Feature::Vision => Features::VISION,
            Feature::Json => Features::JSON,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[serde(rename = "openai")]
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    /// Stop the upstream request: frees a self-hosted GPU at once.
    Cancel,
    /// Read to the end: a commercial provider bills the whole answer anyway, and its final
    /// usage is the only exact count.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// One GPU an hour, all in: given, or the sum of `capex`'s parts.
    pub hourly_usd: f64,
    /// The parts of `hourly_usd` when the config gives purchase and power rather than a rate.
    pub capex: Option<GpuCapex>,
    pub count: u32,
    pub fraction: f64,
    pub tokens_per_second: Option<f64>,
}

/// One GPU's hourly cost from what owning it takes, in USD per GPU-hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuCapex {
    pub amortized_usd_per_hour: f64,
    pub power_usd_per_hour: f64,
    pub cooling_usd_per_hour: f64,
}

/// 8760 hours a year over 12: the month purchases are amortized in.
pub const HOURS_PER_MONTH: f64 = 730.0;

impl GpuCapex {
    pub fn usd_per_hour(&self) -> f64 {
        self.amortized_usd_per_hour + self.power_usd_per_hour + self.cooling_usd_per_hour
    }
}

impl GpuCost {
    /// GPUs paid for: `count` x `fraction`.
    pub fn gpus(&self) -> f64 {
        self.count as f64 * self.fraction
    }

    /// What the GPUs cost an hour, in nano-dollars: the one rate both the live counters and
    /// the reports accrue.
    pub fn nusd_per_hour(&self) -> i64 {
        (self.hourly_usd * self.gpus() * 1e9).round() as i64
    }

    /// What `us` microseconds of them cost, in nano-dollars, accrued as the live counter does.
    pub fn paid_nusd(&self, us: i64) -> i64 {
        (i128::from(self.nusd_per_hour()) * i128::from(us) / 3_600_000_000) as i64
    }
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
    pub engine: Engine,
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
    pub cache_write_usd_per_mtok: Option<f64>,
    pub cache_write_1h_usd_per_mtok: Option<f64>,
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
    pub per_key: bool,
    /// Admit against a local allowance when the shared store cannot answer.
    pub fail_open: bool,
}

/// Where budget counters live.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetStore {
    Local,
    Redis(RedisStore),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisStore {
    /// May carry a password: never printed. With `cluster`, comma-separated seed nodes.
    pub url: crate::secret::Secret,
    /// A Redis Cluster: the client learns the slots and sends each script to its node.
    pub cluster: bool,
    /// The CA that `rediss://` servers are checked against instead of the public roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub prefix: String,
    pub timeout: Duration,
    pub lease: Duration,
    pub fail_open_share: f64,
}

/// One problem in a config file, with the field it is about. Made by [`ConfigError::new`],
/// which redacts.
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

impl ConfigError {
    /// Every message is redacted here, once for all: messages quote what users wrote, and a
    /// store URL or a misplaced key may hold a password.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match crate::secret::redact_urls(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(redacted) => redacted,
        };
        Self {
            path: path.into(),
            message,
        }
    }
}

impl std::error::Error for ConfigError {}

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

/// Who bills whom in the FOCUS export (`[focus]`): the names FinOps tools group charges by.
#[derive(Debug, Clone)]
pub struct Focus {
    pub billing_account_id: String,
    pub billing_account_name: String,
    pub provider_name: String,
    pub invoice_issuer_name: String,
    pub host_provider_name: String,
}

/// The alerts webhook (`[alerts]`), validated.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// A secret: webhook URLs often carry their token in the path or query.
    pub url: Option<crate::secret::Secret>,
    pub forecast: Duration,
    pub check_interval: Duration,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub queue: usize,
}

/// Inference server software, as far as metering cares: each has its own tokenize endpoint
/// (docs/ENGINES.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum Engine {
    /// Any OpenAI-compatible server, or OpenAI itself: no tokenize endpoint assumed.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "vllm")]
    Vllm,
    /// llama.cpp's own `llama-server`.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// The OpenAI server of the llama-cpp-python bindings.
    #[serde(rename = "llama-cpp-python")]
    LlamaCppPython,
    /// Hugging Face text-generation-inference.
    #[serde(rename = "tgi")]
    Tgi,
    #[serde(rename = "sglang")]
    Sglang,
    #[serde(rename = "ollama")]
    Ollama,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::OpenAi => "openai",
            Engine::Vllm => "vllm",
            Engine::LlamaCpp => "llama.cpp",
            Engine::LlamaCppPython => "llama-cpp-python",
            Engine::Tgi => "tgi",
            Engine::Sglang => "sglang",
            Engine::Ollama => "ollama",
        }
    }
}
