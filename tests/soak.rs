//! Soak: the real `tollgate serve` in front of a real `tollgate simulate`, holding thousands of
//! slow SSE streams at once, wave after wave, for minutes. The gateway's memory must level off
//! (a leak shows as growth from wave to wave), and every stream must end whole and be in the
//! ledger.
//!
//! Ignored by default: it takes minutes. `benches/soak.sh` runs it in release mode; the
//! figures of the last run are in docs/PERFORMANCE.md ("Soak"). Knobs, with their defaults:
//!
//! ```text
//! TOLLGATE_SOAK_STREAMS=2000   streams open at once in each wave
//! TOLLGATE_SOAK_WAVES=8        waves
//! TOLLGATE_SOAK_TOKENS=60      tokens per answer
//! TOLLGATE_SOAK_TOKEN_MS=300   the simulator's delay between tokens (60 x 300 ms: 18 s a stream)
//! ```
//!
//! Each stream holds a descriptor in this process, two in the gateway and one in the
//! simulator: the soft `ulimit -n` must exceed twice the streams, with room to spare.

mod common;

use bytes::Bytes;
use common::{BinaryGateway, SEARCH_KEY};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "soak-model";

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}")))
        .unwrap_or(default)
}

/// `tollgate simulate` as a user runs it, on a port of its choosing.
struct Simulator {
    child: std::process::Child,
    url: String,
}

impl Simulator {
    fn start(tokens: u64, token_ms: u64, concurrency: u64) -> Simulator {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["simulate", "--port", "0", "--model", MODEL])
            .args(["--tokens", &tokens.to_string()])
            .args(["--token-ms", &token_ms.to_string()])
            .args(["--max-concurrency", &concurrency.to_string()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        // "simulated openai server on http://127.0.0.1:PORT"
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.split(" on ").nth(1).map(str::to_string))
            .expect("the simulator says where it listens");
        // Keep its stderr drained, or its writes would block once the pipe fills.
        std::thread::spawn(move || lines.for_each(drop));
        Simulator { child, url }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A value from `/proc/<pid>/status`, in kB for sizes.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss_mib(pid: u32) -> f64 {
    proc_status(pid, "VmRSS") as f64 / 1024.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn soft_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// One stream as the client saw it.
struct Streamed {
    request_id: String,
    status: u16,
    body: Bytes,
}

/// Sends `n` streaming requests at once on fresh connections and waits for all of them;
/// `sample` runs once every stream has its response headers (all of them open).
async fn wave(
    url: &str,
    n: usize,
    sample: impl FnOnce() -> (f64, usize),
) -> (Vec<Streamed>, (f64, usize), Duration) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let open = Arc::new(AtomicUsize::new(0));
    let body = serde_json::json!({
        "model": MODEL,
        "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story about a toll gate."}],
    })
    .to_string();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, open) = (client.clone(), open.clone());
            let req = Request::post(format!("{url}/v1/chat/completions"))
                .header("authorization", format!("Bearer {SEARCH_KEY}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            tokio::spawn(async move {
                let resp = client.request(req).await.expect("the gateway answers");
                open.fetch_add(1, Ordering::Relaxed);
                let request_id = resp.headers()["x-tollgate-request-id"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                Streamed {
                    request_id,
                    status,
                    body,
                }
            })
        })
        .collect();
    while open.load(Ordering::Relaxed) < n {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {n} streams opened in 2 minutes",
            open.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = sample();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, peak, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by benches/soak.sh"]
async fn thousands_of_slow_streams_hold_flat_memory() {
    let streams = knob("TOLLGATE_SOAK_STREAMS", 2000) as usize;
    let waves = knob("TOLLGATE_SOAK_WAVES", 8) as usize;
    let tokens = knob("TOLLGATE_SOAK_TOKENS", 60);
    let token_ms = knob("TOLLGATE_SOAK_TOKEN_MS", 300);
    assert!(waves >= 3, "growth is measured from wave 2 to the last");
    let nofile = soft_nofile();
    assert!(
        nofile > 2 * streams as u64 + 1000,
        "ulimit -n is {nofile}: too few descriptors for {streams} streams (benches/soak.sh raises it)"
    );

    let sim = Simulator::start(tokens, token_ms, 2 * streams as u64);
    let dir = common::temp_dir("soak");
    let ledger = dir.join("ledger.db");
    let hash = tollgate::keys::hex(&tollgate::keys::hash_key(SEARCH_KEY));
    let config = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_in_flight = {in_flight}

[store]
ledger = "sqlite://{ledger}"

[[backend]]
name = "sim"
url = "{url}"
hosting = "self_hosted"
models = [{{ name = "{MODEL}" }}]

[[team]]
name = "search"
keys = ["sha256:{hash}"]
"#,
        in_flight = 2 * streams,
        ledger = ledger.display(),
        url = sim.url,
    );
    let config_path = dir.join("soak.toml");
    std::fs::write(&config_path, config).unwrap();
    let gw = BinaryGateway::start(&config_path).await;
    let pid = gw.pid();
    let url = format!("http://{}", gw.addr);

    let start_rss = rss_mib(pid);
    eprintln!(
        "soak: {streams} streams x {waves} waves, {tokens} tokens every {token_ms} ms; \
         gateway pid {pid}, RSS at start {start_rss:.1} MiB"
    );
    let began = Instant::now();
    let mut after = Vec::new();
    let mut peaks = Vec::new();
    let mut ids = Vec::new();
    for w in 1..=waves {
        let (done, (peak, fds), took) = wave(&url, streams, || (rss_mib(pid), open_fds(pid))).await;
        for s in &done {
            assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
            let text = std::str::from_utf8(&s.body).unwrap();
            assert!(
                text.ends_with("data: [DONE]\n\n"),
                "a stream ended early: {text}"
            );
            let comment: serde_json::Value = text
                .lines()
                .find_map(|l| l.strip_prefix(": tollgate "))
                .map(|c| serde_json::from_str(c).unwrap())
                .expect("the closing comment");
            assert_eq!(comment["completion_tokens"], tokens, "{comment}");
        }
        ids.extend(done.into_iter().map(|s| s.request_id));
        // What is left once the wave's connections are closed and the gateway has settled.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_mib(pid);
        eprintln!(
            "soak: wave {w}: {streams} streams in {:.1} s; with all open: RSS {peak:.1} MiB, \
             {fds} descriptors; after: RSS {rss:.1} MiB",
            took.as_secs_f64()
        );
        peaks.push(peak);
        after.push(rss);
    }
    let end_rss = rss_mib(pid);
    eprintln!(
        "soak: {:.1} minutes; RSS at start {start_rss:.1} MiB, at end {end_rss:.1} MiB",
        began.elapsed().as_secs_f64() / 60.0
    );

    // Every stream is in the ledger, metered as the simulator generated it.
    let conn = rusqlite::Connection::open(&ledger).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT id FROM requests WHERE status = 'ok' AND stream = 1 AND completion_tokens = ?1",
        )
        .unwrap();
    let recorded: std::collections::HashSet<String> = stmt
        .query_map([tokens as i64], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let missing = ids.iter().filter(|id| !recorded.contains(*id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} streams have no ledger record",
        ids.len()
    );

    // Flat: from the second wave (buffers and pools grown, allocator warm) to the last.
    let growth = |v: &[f64]| v[v.len() - 1] / v[1] - 1.0;
    assert!(
        growth(&after) < 0.20,
        "RSS after each wave grew {:.0}% from wave 2: {after:?}",
        growth(&after) * 100.0
    );
    assert!(
        growth(&peaks) < 0.20,
        "RSS with all streams open grew {:.0}% from wave 2: {peaks:?}",
        growth(&peaks) * 100.0
    );
    let (status, _) = gw.stop("-TERM").await;
    assert!(status.success(), "the gateway exits cleanly: {status}");
}
