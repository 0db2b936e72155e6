//! The config file as users write it (`config/tollgate.toml`).
//!
//! These types mirror the TOML exactly so that a typo is an error that names the field
//! (`deny_unknown_fields`), and every default is a named const. [`validate`] turns them into
//! a [`Config`] whose fields need no "not yet checked" states.

pub mod prices;
mod types;
mod validate;

pub use types::*;
pub use validate::{load, parse, parse_key_hash, process_env, validate, EnvLookup};

use serde::Deserialize;
use std::collections::BTreeMap;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ALERTS_FORECAST_HOURS: f64 = 24.0;
pub const DEFAULT_ALERTS_CHECK_INTERVAL_S: f64 = 10.0;
pub const DEFAULT_ALERTS_TIMEOUT_S: f64 = 10.0;
pub const DEFAULT_ALERTS_MAX_ATTEMPTS: u32 = 6;
pub const DEFAULT_ALERTS_RETRY_INITIAL_S: f64 = 1.0;
pub const DEFAULT_ALERTS_QUEUE: usize = 256;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_ADMIN_KEY_ENV: &str = "TOLLGATE_ADMIN_KEY";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 600.0;
pub const DEFAULT_HEADER_READ_TIMEOUT_S: f64 = 30.0;
/// Time for a whole request body: 8 MiB (the default body limit) at 300 KB/s.
pub const DEFAULT_BODY_READ_TIMEOUT_S: f64 = 30.0;
/// Far above what an SDK sends (about 1 KiB, 20 headers), far below what hyper would buffer.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 64;
pub const DEFAULT_KEY_IN_FLIGHT_SHARE: f64 = 0.5;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
pub const DEFAULT_SHUTDOWN_GRACE_S: f64 = 30.0;
pub const DEFAULT_CONNECT_TIMEOUT_S: f64 = 5.0;
pub const DEFAULT_STREAM_IDLE_TIMEOUT_S: f64 = 120.0;
pub const DEFAULT_POOL_IDLE_TIMEOUT_S: f64 = 90.0;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
/// OpenAI's own limit is 128; a gateway in front of shared budgets needs a tighter one.
pub const DEFAULT_MAX_N: u64 = 16;
/// Beside the embedded ledger's default file.
pub const DEFAULT_SPOOL: &str = "sqlite://data/spool.db";
pub const DEFAULT_REDIS_PREFIX: &str = "tollgate:";
/// Redis on the same network answers in well under a millisecond; 100 ms is a stalled server
/// (or a starved client), and a request then waits at most this, once per phase, before it is
/// refused or served on its allowance.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 100;
/// A live replica renews its requests' leases every third of this, so it bounds only how
/// long a dead replica's reservations keep a team's room, not how long a request may run.
pub const DEFAULT_LEASE_S: f64 = 30.0;
pub const DEFAULT_FAIL_OPEN_SHARE: f64 = 0.05;
pub const DEFAULT_EXPECTED_OUTPUT_TOKENS: u64 = 256;
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 5;
pub const DEFAULT_CIRCUIT_OPEN_S: f64 = 10.0;
pub const DEFAULT_HEALTH_PATH: &str = "/v1/models";
pub const DEFAULT_HEALTH_INTERVAL_S: f64 = 5.0;
pub const DEFAULT_HEALTH_TIMEOUT_S: f64 = 2.0;
/// How long a backend that answered 429 without `Retry-After` is passed over.
pub const DEFAULT_BUSY_S: f64 = 1.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub backend: Vec<RawBackend>,
    #[serde(default)]
    pub team: Vec<RawTeam>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub focus: RawFocus,
    #[serde(default)]
    pub alerts: RawAlerts,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Client API address.
    pub listen: String,
    /// Address of /metrics, /healthz, /readyz and /admin/*.
    pub admin_listen: String,
    /// Environment variable holding the admin key. Unset, the admin port is open: the
    /// gateway then starts only if `admin_listen` is a loopback address or `admin_open` is set.
    pub admin_key_env: String,
    /// Serve the admin port without a key on a non-loopback address, on purpose (a private
    /// network the operator trusts). Without it such a config is refused.
    pub admin_open: bool,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: u64,
    /// Whole-request limit for non-streaming responses (streams use the backend's idle timeout).
    pub request_timeout_s: f64,
    /// A client must send a request's headers within this time; also closes idle keep-alive
    /// connections, since hyper arms it while waiting for the next request.
    pub header_read_timeout_s: f64,
    /// A client must send the whole request body within this time, or gets 408: a body
    /// trickled a byte at a time would hold an in-flight slot for as long as it liked.
    pub body_read_timeout_s: f64,
    /// Request headers, names and values together; past it, 431.
    pub max_header_bytes: usize,
    /// Request header lines; past it, 431.
    pub max_headers: usize,
    /// The part of `max_in_flight` one API key may hold at once; past it, 429. One tenant's
    /// slow or stuck requests then cannot take every slot from the others.
    pub key_in_flight_share: f64,
    /// Requests in flight at once; past it the gateway answers 503 instead of queueing.
    pub max_in_flight: usize,
    /// Listen backlog: large enough that a burst of new connections never waits on a SYN retry.
    pub listen_backlog: u32,
    /// How long shutdown waits for in-flight requests before closing them.
    pub shutdown_grace_s: f64,
    /// Largest non-streaming upstream response; it is read whole to meter it before replying.
    pub max_response_bytes: u64,
    /// Largest `n` (and `best_of`) a request may ask: each choice is a full generation, so
    /// one request with a large `n` costs as much as that many requests.
    pub max_n: u64,
    /// This process's name in the ledger's `replica` column; unset: hostname and pid, which
    /// tells replicas apart but changes on restart, so set it in a fleet.
    pub replica: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            admin_key_env: DEFAULT_ADMIN_KEY_ENV.into(),
            admin_open: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout_s: DEFAULT_REQUEST_TIMEOUT_S,
            header_read_timeout_s: DEFAULT_HEADER_READ_TIMEOUT_S,
            body_read_timeout_s: DEFAULT_BODY_READ_TIMEOUT_S,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            key_in_flight_share: DEFAULT_KEY_IN_FLIGHT_SHARE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            shutdown_grace_s: DEFAULT_SHUTDOWN_GRACE_S,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_n: DEFAULT_MAX_N,
            replica: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite://path` (embedded) or `postgres://user:pass@host:port/db` (fleet; what the URL
    /// leaves out comes from PGUSER, PGPASSWORD, PGHOST, PGPORT, PGDATABASE).
    pub ledger: String,
    /// Fleet mode only: `sqlite://path` of the local spool that keeps records while
    /// PostgreSQL cannot be reached.
    pub spool: String,
    /// `local` (one process), or `redis://[:password@]host:port/db` / `rediss://…` (TLS): budgets
    /// shared by every replica of a fleet. With `redis_cluster`, one or more of the cluster's
    /// nodes, comma-separated (`redis://10.0.0.5:6379,redis://10.0.0.6:6379`).
    pub budgets: String,
    /// `store.budgets` names nodes of a Redis (or Valkey) Cluster rather than one server.
    pub redis_cluster: bool,
    /// PEM file of the certificate authority a `rediss://` server's certificate must chain to
    /// (a private CA); empty: the public web roots.
    pub redis_ca_file: String,
    /// Prefix of every Redis key the gateway writes, so fleets (or tests) can share one Redis.
    pub redis_prefix: String,
    /// How long one Redis command may take before the budget store counts as down.
    pub redis_timeout_ms: u64,
    /// How long a reservation held in Redis lives unless renewed (live replicas renew their
    /// running requests' every third of it): a replica that dies gives its room back after this.
    pub lease_s: f64,
    /// With `fail_open` budgets and Redis down, each replica may admit up to this share of the
    /// room it last saw left in each budget.
    pub fail_open_share: f64,
    /// fsync each ledger group commit: survives power loss, not only a killed process.
    pub fsync: bool,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            ledger: "sqlite://data/tollgate.db".into(),
            spool: DEFAULT_SPOOL.into(),
            budgets: "local".into(),
            redis_cluster: false,
            redis_ca_file: String::new(),
            redis_prefix: DEFAULT_REDIS_PREFIX.into(),
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            lease_s: DEFAULT_LEASE_S,
            fail_open_share: DEFAULT_FAIL_OPEN_SHARE,
            fsync: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouting {
    pub self_hosted_cost: SelfHostedCost,
    /// Backends tried for one request, first included.
    pub max_attempts: u32,
    /// Failures after which a request goes to the next backend (see [`Routing::retry_on`]).
    pub retry_on: Option<Vec<RetryOn>>,
    /// Output tokens a request is expected to generate when ranking backends by cost; a
    /// request's own lower `max_tokens` wins.
    pub expected_output_tokens: u64,
    /// Consecutive failures (5xx, timeouts, broken connections) that open a backend's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit keeps a backend out before one probe request is let through.
    pub circuit_open_s: f64,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self {
            self_hosted_cost: SelfHostedCost::Marginal,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_on: None,
            expected_output_tokens: DEFAULT_EXPECTED_OUTPUT_TOKENS,
            circuit_failures: DEFAULT_CIRCUIT_FAILURES,
            circuit_open_s: DEFAULT_CIRCUIT_OPEN_S,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Server root; the request path (`/v1/chat/completions`) is appended.
    pub url: String,
    /// Environment variable with the backend's own key, sent as `Authorization: Bearer`.
    pub api_key_env: Option<String>,
    pub hosting: Hosting,
    #[serde(default)]
    pub region: Option<String>,
    /// Requests this backend serves at once (a GPU server's batch size).
    pub max_concurrency: Option<u32>,
    pub gpu: Option<RawGpu>,
    pub egress_usd_per_gb: Option<f64>,
    /// Default by hosting: `cancel` for self-hosted, `drain` for commercial.
    pub on_disconnect: Option<OnDisconnect>,
    pub connect_timeout_s: Option<f64>,
    /// Longest silence between two stream events before the stream is cut.
    pub stream_idle_timeout_s: Option<f64>,
    pub pool_idle_timeout_s: Option<f64>,
    /// Ask for `stream_options.include_usage` on streams (the server supports it).
    #[serde(default = "yes")]
    pub stream_usage: bool,
    /// The server software behind `url`: how the gateway counts tokens with the engine's own
    /// tokenizer when a response carries no usage, and which quirks it allows for.
    #[serde(default)]
    pub engine: Engine,
    /// Active health probe; on by default for self-hosted backends only.
    pub health_check: Option<RawHealthCheck>,
    pub models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `GET` path answered with a 2xx by a healthy server (`/v1/models`, `/health`).
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Seconds between probes; 0 turns probing off.
    #[serde(default = "default_health_interval")]
    pub interval_s: f64,
    #[serde(default = "default_health_timeout")]
    pub timeout_s: f64,
}

fn default_health_path() -> String {
    DEFAULT_HEALTH_PATH.into()
}
fn default_health_interval() -> f64 {
    DEFAULT_HEALTH_INTERVAL_S
}
fn default_health_timeout() -> f64 {
    DEFAULT_HEALTH_TIMEOUT_S
}

fn default_protocol() -> Protocol {
    Protocol::OpenAi
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpu {
    /// All-in cost of one GPU an hour; or leave it out and give the capex fields below.
    pub hourly_usd: Option<f64>,
    /// Capex: what one GPU cost to buy, spread evenly over `amortization_months`.
    pub purchase_usd: Option<f64>,
    pub amortization_months: Option<f64>,
    /// Power drawn by one GPU (with its share of the server) at the wall, in watts.
    pub power_watts: Option<f64>,
    pub usd_per_kwh: Option<f64>,
    /// Cooling as a share of the power bill: 0.3 is a datacenter with a PUE of 1.3.
    pub cooling_overhead: Option<f64>,
    #[serde(default = "one_u32")]
    pub count: u32,
    #[serde(default = "one_f64")]
    pub fraction: f64,
    pub tokens_per_second: Option<f64>,
}

fn yes() -> bool {
    true
}

fn one_u32() -> u32 {
    1
}
fn one_f64() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    /// `tools`, `vision`, `json`: what the model supports. Absent means not declared, and
    /// then requests are not filtered on features.
    pub features: Option<Vec<Feature>>,
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Prompt tokens written to the provider's cache (Anthropic's 5-minute write rate).
    pub cache_write_usd_per_mtok: Option<f64>,
    /// Anthropic's 1-hour cache write rate.
    pub cache_write_1h_usd_per_mtok: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTeam {
    pub name: String,
    /// `sha256:<hex>` hashes of the team's keys (`tollgate key new --team NAME`).
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Tag keys callers of this team may set per request.
    #[serde(default)]
    pub request_tags: Vec<String>,
    /// Data residency: only backends in these regions; empty means any.
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub window: Window,
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
    pub soft_ratio: Option<f64>,
    /// When a shared budget store cannot answer: refuse (default), or admit against a bounded
    /// local allowance (`store.fail_open_share`). Refused by validation while budgets are local
    /// (they cannot fail).
    #[serde(default)]
    pub fail_open: bool,
    /// Apply the budget to each of the team's keys separately instead of to the team.
    #[serde(default)]
    pub per_key: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Tag keys that become metric labels; everything else stays out to bound cardinality.
    pub tag_labels: Vec<String>,
    /// Distinct values kept per tag label; later values are counted under `other`.
    pub max_tag_values: Option<usize>,
    /// A self-hosted backend with no request for this long is flagged idle.
    pub idle_after_s: Option<f64>,
    /// The window `tollgate_backend_busy_ratio` is measured over.
    pub busy_window_s: Option<f64>,
}

pub const DEFAULT_MAX_TAG_VALUES: usize = 100;
pub const DEFAULT_IDLE_AFTER_S: f64 = 1800.0;
pub const DEFAULT_BUSY_WINDOW_S: f64 = 300.0;
/// Label names the gateway's own metrics use; a tag label may not shadow them.
pub const RESERVED_LABELS: &[&str] = &[
    "team",
    "model",
    "backend",
    "status",
    "direction",
    "window",
    "from",
    "reason",
    "measure",
    "kind",
    "le",
    "quantile",
    "job",
    "instance",
];

pub const DEFAULT_FOCUS_BILLING_ACCOUNT_ID: &str = "tollgate";
pub const DEFAULT_FOCUS_BILLING_ACCOUNT_NAME: &str = "Tollgate";
pub const DEFAULT_FOCUS_PROVIDER_NAME: &str = "Tollgate";

/// Who bills whom in the FOCUS export (`tollgate report --format focus`). The gateway is the
/// service provider its teams buy inference from: the backends behind it are its hosts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFocus {
    /// BillingAccountId: the account the gateway's charges are billed to (a cost center, a
    /// chargeback account).
    pub billing_account_id: String,
    /// BillingAccountName: that account's display name.
    pub billing_account_name: String,
    /// ServiceProviderName (and the deprecated ProviderName): who makes inference available
    /// through this gateway, e.g. your platform team or company.
    pub provider_name: String,
    /// InvoiceIssuerName: who charges the teams for it; default: `provider_name`.
    pub invoice_issuer_name: Option<String>,
    /// HostProviderName of self-hosted backends: who runs their GPUs (you, or the cloud you
    /// rent them from); default: `provider_name`.
    pub host_provider_name: Option<String>,
}

impl Default for RawFocus {
    fn default() -> Self {
        Self {
            billing_account_id: DEFAULT_FOCUS_BILLING_ACCOUNT_ID.into(),
            billing_account_name: DEFAULT_FOCUS_BILLING_ACCOUNT_NAME.into(),
            provider_name: DEFAULT_FOCUS_PROVIDER_NAME.into(),
            invoice_issuer_name: None,
            host_provider_name: None,
        }
    }
}

/// `[alerts]`: a webhook the gateway POSTs JSON to when a budget passes its soft limit, when a
/// budget's forecast runs out within `forecast_hours`, and when a self-hosted backend has been
/// idle for `metrics.idle_after_s`. One alert per condition and episode, retried with backoff.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlerts {
    /// `http(s)://…` to POST to; none (the default): no alerts.
    pub url: Option<String>,
    /// Alert when a budget runs out within this many hours at its current burn rate.
    pub forecast_hours: f64,
    /// How often the conditions are checked.
    pub check_interval_s: f64,
    /// One POST's time limit.
    pub timeout_s: f64,
    /// Tries per alert, the first included; waits double from `retry_initial_s` between them.
    pub max_attempts: u32,
    pub retry_initial_s: f64,
    /// Alerts waiting to be sent; more are dropped (and logged) while the receiver is down.
    pub queue: usize,
}

impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            url: None,
            forecast_hours: DEFAULT_ALERTS_FORECAST_HOURS,
            check_interval_s: DEFAULT_ALERTS_CHECK_INTERVAL_S,
            timeout_s: DEFAULT_ALERTS_TIMEOUT_S,
            max_attempts: DEFAULT_ALERTS_MAX_ATTEMPTS,
            retry_initial_s: DEFAULT_ALERTS_RETRY_INITIAL_S,
            queue: DEFAULT_ALERTS_QUEUE,
        }
    }
}
