//! Test harness: simulated backends and a gateway on loopback, wired by a config written
//! exactly as a user would write it.
//!
//! ```ignore
//! let h = Harness::new()
//!     .backend(Backend::sim("llama", "meta-llama/Llama-3.1-8B-Instruct").alias("chat-small"))
//!     .team("search", SEARCH_KEY)
//!     .start()
//!     .await;
//! ```
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::net::SocketAddr;
use tollgate::app::{self, Running};
use tollgate::sim::{Dialect, Sim, SimConfig};

pub const SEARCH_KEY: &str = "tg-test-search";
pub const OTHER_KEY: &str = "tg-test-other";

pub struct Backend {
    name: String,
    model: String,
    model_extra: String,
    aliases: Vec<String>,
    region: Option<String>,
    extra: String,
    sim: Option<SimConfig>,
    url: Option<String>,
    api_key: Option<String>,
    hosting: &'static str,
}

impl Backend {
    /// A backend served by a fresh simulator that serves `model`.
    pub fn sim(name: &str, model: &str) -> Self {
        Self {
            name: name.into(),
            model: model.into(),
            model_extra: String::new(),
            aliases: vec![],
            region: None,
            extra: String::new(),
            sim: Some(SimConfig {
                models: vec![model.into()],
                ..Default::default()
            }),
            url: None,
            api_key: None,
            hosting: "self_hosted",
        }
    }

    /// A provider's API rather than an owned server.
    pub fn commercial(mut self) -> Self {
        self.hosting = "commercial";
        self
    }

    /// A backend at a fixed URL with no simulator (e.g. a closed port).
    pub fn at(name: &str, model: &str, url: &str) -> Self {
        Self {
            sim: None,
            url: Some(url.into()),
            ..Self::sim(name, model)
        }
    }

    pub fn alias(mut self, a: &str) -> Self {
        self.aliases.push(a.into());
        self
    }

    /// Per-1M-token prices on the model.
    pub fn price(mut self, input: f64, output: f64) -> Self {
        self.model_extra =
            format!(", input_usd_per_mtok = {input}, output_usd_per_mtok = {output}");
        self
    }

    /// Token-by-token timing: `tokens` per answer, one every `interval`.
    pub fn paced(self, interval: std::time::Duration, tokens: u32) -> Self {
        self.config(|c| {
            c.token_interval = interval;
            c.completion_tokens = tokens;
        })
    }

    /// Extra fields for the model's inline table, e.g. `max_output_tokens = 20`.
    pub fn model_toml(mut self, fields: &str) -> Self {
        self.model_extra.push_str(", ");
        self.model_extra.push_str(fields);
        self
    }

    pub fn region(mut self, r: &str) -> Self {
        self.region = Some(r.into());
        self
    }

    /// Extra TOML lines for the `[[backend]]` table.
    pub fn toml(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        self.extra.push('\n');
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut SimConfig)) -> Self {
        f(self
            .sim
            .as_mut()
            .expect("only simulated backends have a SimConfig"));
        self
    }

    /// The simulator answers like this engine, and the backend says which engine it is.
    pub fn dialect(self, d: Dialect) -> Self {
        self.config(|c| c.dialect = d)
            .toml(&format!("engine = \"{}\"", d.engine().as_str()))
    }

    /// The simulator requires this key, and the gateway gets it from `api_key_env`.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.into());
        if let Some(s) = self.sim.as_mut() {
            s.api_key = Some(key.into());
        }
        self
    }
}

#[derive(Default)]
pub struct Harness {
    backends: Vec<Backend>,
    teams: Vec<(String, Vec<String>, String)>,
    server: String,
    store: String,
    routing: String,
    clock: Option<std::sync::Arc<dyn tollgate::clock::Clock>>,
    ledger: Option<std::path::PathBuf>,
    /// `store.ledger` as given (a PostgreSQL URL), instead of a file.
    ledger_url: Option<String>,
    metrics: String,
    focus: String,
    alerts: String,
    admin_key: Option<String>,
}

/// A fresh directory under the system temp dir, unique to this process and call.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tollgate-test-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Gateway {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub sims: HashMap<String, Sim>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub config_text: String,
    /// Sent with every admin request when the gateway was started with one.
    pub admin_key: Option<String>,
}

impl Harness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn backend(mut self, b: Backend) -> Self {
        self.backends.push(b);
        self
    }

    pub fn team(self, name: &str, key: &str) -> Self {
        self.team_toml(name, key, "")
    }

    pub fn team_toml(mut self, name: &str, key: &str, extra: &str) -> Self {
        self.teams
            .push((name.into(), vec![key.into()], extra.into()));
        self
    }

    /// A team with several keys.
    pub fn team_keys(mut self, name: &str, keys: &[&str], extra: &str) -> Self {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        self.teams.push((name.into(), keys, extra.into()));
        self
    }

    /// Use this ledger file (to restart on the same one) instead of a fresh one.
    pub fn ledger(mut self, path: &std::path::Path) -> Self {
        self.ledger = Some(path.to_path_buf());
        self
    }

    /// Use this `store.ledger` URL (`postgres://…`) instead of a ledger file.
    pub fn ledger_url(mut self, url: &str) -> Self {
        self.ledger_url = Some(url.to_string());
        self
    }

    /// The clock budgets are judged by.
    pub fn clock(mut self, clock: std::sync::Arc<dyn tollgate::clock::Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Extra TOML lines for `[store]`.
    pub fn store(mut self, lines: &str) -> Self {
        self.store.push_str(lines);
        self.store.push('\n');
        self
    }

    /// Extra TOML lines for `[routing]`.
    pub fn routing(mut self, lines: &str) -> Self {
        self.routing.push_str(lines);
        self.routing.push('\n');
        self
    }

    /// Extra TOML lines for `[server]`.
    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    /// Extra TOML lines for `[metrics]`.
    pub fn metrics(mut self, lines: &str) -> Self {
        self.metrics.push_str(lines);
        self.metrics.push('\n');
        self
    }

    /// Extra TOML lines for `[focus]`.
    pub fn focus(mut self, lines: &str) -> Self {
        self.focus.push_str(lines);
        self.focus.push('\n');
        self
    }

    /// Extra TOML lines for `[alerts]`.
    pub fn alerts(mut self, lines: &str) -> Self {
        self.alerts.push_str(lines);
        self.alerts.push('\n');
        self
    }

    /// Guard the admin port with this key (through `admin_key_env`, as a user would).
    pub fn admin_key(mut self, key: &str) -> Self {
        self.admin_key = Some(key.into());
        self
    }

    pub async fn start(mut self) -> Gateway {
        let clock = self
            .clock
            .take()
            .unwrap_or_else(|| std::sync::Arc::new(tollgate::clock::SystemClock));
        let admin_key = self.admin_key.clone();
        let (text, sims, env) = self.render().await;
        let cfg = tollgate::config::parse(&text, "test.toml", &|v| env.get(v).cloned())
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        let bind = || tollgate::server::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let running = app::start_with_clock(cfg, None, bind(), bind(), clock)
            .await
            .expect("gateway starts");
        Gateway {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            sims,
            client: Client::builder(TokioExecutor::new()).build_http(),
            config_text: text,
            admin_key,
        }
    }

    /// The config text, the simulators it points at, and the environment it needs.
    pub async fn render(self) -> (String, HashMap<String, Sim>, HashMap<String, String>) {
        let ledger = match (&self.ledger_url, &self.ledger) {
            (Some(url), _) => url.clone(),
            (None, Some(path)) => format!("sqlite://{}", path.display()),
            (None, None) => format!(
                "sqlite://{}",
                temp_dir("ledger").join("tollgate.db").display()
            ),
        };
        let mut env = HashMap::new();
        let mut server = self.server;
        if let Some(key) = self.admin_key {
            server.push_str("admin_key_env = \"TEST_ADMIN_KEY\"\n");
            env.insert("TEST_ADMIN_KEY".to_string(), key);
        }
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}\n[store]\nledger = \"{}\"\n{}\n[routing]\n{}\n[metrics]\n{}\n[focus]\n{}\n[alerts]\n{}\n",
            server,
            ledger,
            self.store,
            self.routing,
            self.metrics,
            self.focus,
            self.alerts
        );
        let mut sims = HashMap::new();
        for b in self.backends {
            let url = match b.sim {
                Some(cfg) => {
                    let sim = Sim::spawn(cfg).await.unwrap();
                    let url = sim.url();
                    sims.insert(b.name.clone(), sim);
                    url
                }
                None => b.url.unwrap(),
            };
            text.push_str(&format!(
                "\n[[backend]]\nname = \"{}\"\nurl = \"{url}\"\nhosting = \"{}\"\n",
                b.name, b.hosting
            ));
            if let Some(r) = &b.region {
                text.push_str(&format!("region = \"{r}\"\n"));
            }
            if let Some(k) = &b.api_key {
                let var = format!("KEY_{}", b.name.to_uppercase().replace('-', "_"));
                text.push_str(&format!("api_key_env = \"{var}\"\n"));
                env.insert(var, k.clone());
            }
            text.push_str(&b.extra);
            let aliases: Vec<String> = b.aliases.iter().map(|a| format!("\"{a}\"")).collect();
            text.push_str(&format!(
                "models = [{{ name = \"{}\", aliases = [{}]{} }}]\n",
                b.model,
                aliases.join(", "),
                b.model_extra
            ));
        }
        for (name, keys, extra) in self.teams {
            let hashes: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "\"sha256:{}\"",
                        tollgate::keys::hex(&tollgate::keys::hash_key(k))
                    )
                })
                .collect();
            text.push_str(&format!(
                "\n[[team]]\nname = \"{name}\"\nkeys = [{}]\n{extra}\n",
                hashes.join(", ")
            ));
        }
        (text, sims, env)
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-style error body and returns its `error` object.
    pub fn error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let e = self.json()["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["type"].is_string(), "{e}");
        e
    }

    /// The `: tollgate {…}` comment that ends a stream.
    pub fn closing_comment(&self) -> serde_json::Value {
        let text = self.text();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(": tollgate "))
            .unwrap_or_else(|| panic!("no closing comment in:\n{text}"));
        serde_json::from_str(line).unwrap()
    }

    /// `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

impl Gateway {
    pub fn ledger_path(&self) -> std::path::PathBuf {
        match &self.running.as_ref().expect("running").ledger.store {
            tollgate::ledger::Store::Sqlite(path) => path.clone(),
            // The spool: the only file a PostgreSQL ledger keeps.
            tollgate::ledger::Store::Postgres { spool, .. } => spool.clone(),
        }
    }

    /// Runs a query on the ledger file, as a report would: after a flush, so that every
    /// request that completed is in it.
    pub fn ledger<T>(
        &self,
        sql: &str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        let ledger = &self.running.as_ref().expect("running").ledger;
        ledger.flush(tollgate::ledger::FLUSH_WAIT);
        let conn = rusqlite::Connection::open(self.ledger_path()).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], row)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Waits (briefly) until `sql` returns at least `n` rows: records of clients that left are
    /// written after the fact.
    pub async fn wait_ledger_rows(&self, sql: &str, n: usize) {
        for _ in 0..200 {
            if self.ledger(sql, |_| Ok(())).len() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} ledger rows for {sql}");
    }

    pub fn sim(&self, name: &str) -> &Sim {
        &self.sims[name]
    }

    /// The body of the last request that simulator `name` received, as JSON.
    pub fn last_sent(&self, name: &str) -> serde_json::Value {
        let body = self.sim(name).stats.last_body.lock().unwrap().clone();
        serde_json::from_slice(&body.expect("the simulator received a request")).unwrap()
    }

    /// The headers of the last inference request the simulated backend `name` received.
    pub fn headers_seen_by(&self, name: &str) -> HeaderMap {
        self.sim(name)
            .stats
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .expect("the backend received a request")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let resp = self.client.request(req).await.expect("gateway answers");
        collect(resp).await
    }

    pub async fn post(&self, path: &str, key: &str, body: impl Into<Bytes>) -> Reply {
        self.send(self.request(path, key, body)).await
    }

    /// Sends `n` copies of a request at once and returns the replies in order.
    pub async fn post_concurrently(
        &self,
        n: usize,
        path: &str,
        key: &str,
        body: impl Into<Bytes>,
    ) -> Vec<Reply> {
        let body = body.into();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (client, req) = (self.client.clone(), self.request(path, key, body.clone()));
                tollgate::tasks::Tasks::new().spawn(async move {
                    collect(client.request(req).await.expect("gateway answers")).await
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    pub fn request(&self, path: &str, key: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
        Request::post(self.url(path))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap()
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        let req = Request::get(self.url(path))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap();
        self.send(req).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let mut req = Request::get(format!("http://{}{path}", self.admin));
        if let Some(key) = &self.admin_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        self.send(req.body(Full::default()).unwrap()).await
    }

    /// Sends and returns the response with its body not yet read.
    pub async fn open(
        &self,
        path: &str,
        key: &str,
        body: impl Into<Bytes>,
    ) -> http::Response<Incoming> {
        self.client
            .request(self.request(path, key, body))
            .await
            .expect("gateway answers")
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub async fn collect(resp: http::Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does a gateway meter?"}],
    })
    .to_string()
}

/// One backend `llama` (alias `chat-small`) and team `search`: the common case.
pub async fn basic() -> Gateway {
    Harness::new()
        .backend(Backend::sim("llama", "meta-llama/Llama-3.1-8B-Instruct").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .start()
        .await
}

/// The real `tollgate serve` binary, as a user runs it.
pub struct BinaryGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    child: std::process::Child,
    log: Option<std::thread::JoinHandle<String>>,
}

impl BinaryGateway {
    pub async fn start(config: &std::path::Path) -> BinaryGateway {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("TOLLGATE_LOG", "tollgate=info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Keep draining the child's stderr, or its logging would hit a closed pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        // A plain thread: the test's runtime may be blocked reading the child meanwhile.
        #[allow(clippy::disallowed_methods)]
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                // "tollgate listening addr=127.0.0.1:PORT admin_addr=…"
                let field = |name: &str| {
                    line.split(name)
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .map(str::to_string)
                };
                if let (Some(addr), Some(admin)) = (field(" addr="), field(" admin_addr=")) {
                    let _ = tx.send((addr, admin));
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let (addr, admin) = tokio::task::spawn_blocking(move || {
            rx.recv_timeout(std::time::Duration::from_secs(30))
        })
        .await
        .unwrap()
        .expect("the gateway logs its address");
        BinaryGateway {
            addr: addr.parse().unwrap(),
            admin_addr: admin.parse().unwrap(),
            child,
            log: Some(log),
        }
    }

    /// The process id, to read its memory and descriptors from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-TERM`, `-KILL`) and goes on.
    pub fn signal(&self, signal: &str) {
        std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Sends a signal (`-TERM`, `-KILL`) and returns the exit status and everything logged.
    pub async fn stop(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        self.signal(signal);
        let mut child = std::mem::replace(
            &mut self.child,
            std::process::Command::new("true").spawn().unwrap(),
        );
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        let log = self.log.take().unwrap().join().unwrap();
        (status, log)
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A Python with the pinned official `openai` and `anthropic` SDKs (tests/sdk/requirements.txt),
/// installed into target/sdk-venv on first use; `Err` says why it cannot be had here.
pub fn sdk_python() -> Result<std::path::PathBuf, String> {
    use std::path::Path;
    use std::process::Command;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/sdk-venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tests/sdk/requirements.txt");
    // Both SDKs, at the pinned versions.
    let has_sdk = |py: &Path| {
        let pins = std::fs::read_to_string(&requirements).unwrap_or_default();
        ["openai", "anthropic"].iter().all(|sdk| {
            let want = pins
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{sdk}==")))
                .unwrap_or("")
                .trim()
                .to_string();
            Command::new(py)
                .args(["-c", &format!("import {sdk}; print({sdk}.__version__)")])
                .output()
                .is_ok_and(|o| {
                    o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == want
                })
        })
    };
    if has_sdk(&python) {
        return Ok(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        return Err("`python3 -m venv` failed (is Python 3 with venv installed?)".into());
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status();
    if !pip.is_ok_and(|s| s.success()) || !has_sdk(&python) {
        return Err(
            "installing tests/sdk/requirements.txt failed (no package index reachable?)".into(),
        );
    }
    Ok(python)
}

/// Runs `tests/sdk/<script>` with the SDKs' Python and `env`; asserts that it exits 0 with
/// every check passed, and returns what it printed.
pub async fn run_sdk_script(
    python: std::path::PathBuf,
    script: &str,
    env: Vec<(&'static str, String)>,
) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .envs(env)
            .output()
            .expect("running the SDK script")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.lines().any(|l| l.ends_with(" passed, 0 failed")),
        "{stdout}"
    );
    stdout
}

/// A Claude model on a simulated Anthropic backend (the simulator speaks Anthropic's API and
/// checks the backend key), priced like a commercial model.
pub fn claude_backend() -> Backend {
    Backend::sim("claude", "claude-sonnet-4-5")
        .alias("sonnet")
        .api_key("sk-ant-sim")
        .commercial()
        .price(3.0, 15.0)
        .toml("protocol = \"anthropic\"")
}

/// A chat completion as an OpenAI-compatible engine writes it.
pub const CHAT_ANSWER: &str = r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

/// An HTTP/1.1 response with a JSON body.
pub fn json_answer(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A backend on a raw socket that answers its `n`th POST (from 0) with what `answer(n)`
/// returns, written as is, or closes the connection after reading it (`None`); GETs (the
/// gateway's probes) get an empty model list. Returns its URL and the POSTs it has read.
pub async fn scripted_backend(
    answer: fn(u64) -> Option<String>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // A whole request: its headers, then content-length bytes of body.
                    let mut chunk = [0u8; 8192];
                    let whole = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            if buf.len() >= end + 4 + len {
                                break end + 4 + len;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let post = buf.starts_with(b"POST");
                    buf.drain(..whole);
                    let reply = if post {
                        answer(seen.fetch_add(1, Ordering::SeqCst))
                    } else {
                        Some(json_answer(200, r#"{"data":[]}"#))
                    };
                    match reply {
                        Some(r) => {
                            if s.write_all(r.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    }
                }
            });
        }
    });
    (url, seen)
}
