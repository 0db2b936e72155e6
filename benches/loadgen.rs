//! `tollgate-loadgen`: the load generator of `benches/loadtest.sh`.
//!
//! HTTP/1.1 over loopback, one hyper client connection per worker, POSTing a JSON body file.
//! Five shapes of load, each ending with one JSON line on stdout:
//!
//! ```text
//! closed  --connections N --duration S      N workers, each sends its next request when the
//!                                           last one ended: the most a server does at N.
//! open    --rate R --duration S             requests scheduled every 1/R s over a pool of
//!         [--connections N]                 connections; a request that could not leave on
//!                                           time (its connection was still busy) is timed from
//!                                           its scheduled send, so a stall shows in the
//!                                           percentiles instead of being hidden by the
//!                                           generator waiting politely (coordinated omission).
//! --stream                                  (with closed or open) the body asks for SSE: read
//!                                           each response to its end, count `data:` events,
//!                                           and call a stream without `data: [DONE]` an error.
//! burst   --burst N                         N fresh TCP connections at once, one request each
//!                                           (`connection: close`); the slowest, and how many
//!                                           took over 1 s (a listen backlog too small for the
//!                                           burst shows as requests late by one SYN retry).
//! hold    --hold N --hold-secs S            N concurrent streams kept open S seconds (while
//!                                           something else measures memory); prints
//!                                           `holding N streams` on stderr once all are open.
//! ```
//!
//! Latency is from the send (or scheduled send) to the last byte of the response body.
//! Errors are non-2xx answers and transport failures; a worker whose connection broke
//! reconnects and goes on.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tollgate-loadgen",
    about = "HTTP/1.1 load generator for benches/loadtest.sh"
)]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/v1/chat/completions (plain http only).
    #[arg(long)]
    url: String,
    /// File whose bytes are POSTed as the request body.
    #[arg(long)]
    body: PathBuf,
    /// Extra request header `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Closed loop: concurrent connections. Open loop: size of the connection pool.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of load (closed and open loop).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Responses are SSE streams: count `data:` events, require `data: [DONE]`.
    #[arg(long)]
    stream: bool,
    /// Burst of this many new connections, one request each.
    #[arg(long)]
    burst: Option<usize>,
    /// Hold this many concurrent streams open.
    #[arg(long)]
    hold: Option<usize>,
    /// How long `--hold` keeps its streams open after the last one started.
    #[arg(long, default_value_t = 10.0)]
    hold_secs: f64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Free-form label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

/// What every request needs, shared by all workers.
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    body: Bytes,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    stream: bool,
}

/// One worker's results; merged at the end.
#[derive(Default)]
struct Tally {
    /// Microseconds, one per finished request (errors included: a slow 502 is still slow).
    latencies_us: Vec<u64>,
    non_2xx: u64,
    transport: u64,
    /// `data:` events received (streams).
    events: u64,
    /// Streams that ended without `data: [DONE]`.
    truncated: u64,
    /// Open loop: requests that left later than scheduled because their connection was busy.
    late: u64,
    /// The first error seen, to say what went wrong.
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.non_2xx += other.non_2xx;
        self.transport += other.transport;
        self.events += other.events;
        self.truncated += other.truncated;
        self.late += other.late;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn errors(&self) -> u64 {
        self.non_2xx + self.transport + self.truncated
    }
}

enum Outcome {
    Ok { events: u64, done: bool },
    Status(u16),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let target = Arc::new(target(&args)?);
    let line = rt.block_on(async {
        if let Some(n) = args.burst {
            burst(&args, target, n).await
        } else if let Some(n) = args.hold {
            hold(&args, target, n).await
        } else if let Some(rate) = args.rate {
            open_loop(&args, target, rate).await
        } else {
            closed_loop(&args, target).await
        }
    })?;
    // Our own CPU, so the caller can tell our share of the machine from anything else's.
    let line = match (own_cpu_ticks(), line.strip_suffix('}')) {
        (Some(t), Some(head)) => format!("{head},\"loadgen_cpu_ticks\":{t}}}"),
        _ => line,
    };
    println!("{line}");
    Ok(())
}

/// utime + stime of this process (all threads), in clock ticks, from `/proc/self/stat`.
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn target(args: &Args) -> anyhow::Result<Target> {
    let uri: http::Uri = args.url.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be http://host:port/path");
    }
    let authority = uri.authority().context("--url has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(authority.host(), port))?
        .next()
        .context("--url host does not resolve")?;
    let body =
        std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?;
    let mut headers = vec![(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    )];
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header `{h}` is not `name: value`"))?;
        headers.push((name.trim().parse()?, value.trim().parse()?));
    }
    Ok(Target {
        addr,
        host: authority.as_str().to_string(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        body: Bytes::from(body),
        headers,
        stream: args.stream,
    })
}

// === connections and requests ===

async fn connect(t: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(t: &Target, close: bool) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(t.path.as_str())
        .header(http::header::HOST, t.host.as_str())
        .body(Full::new(t.body.clone()))
        .expect("request parts were validated");
    let h = req.headers_mut();
    for (name, value) in &t.headers {
        h.insert(name.clone(), value.clone());
    }
    if close {
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    req
}

/// Sends one request and reads the whole response.
async fn exchange(
    t: &Target,
    sender: &mut SendRequest<Full<Bytes>>,
    close: bool,
) -> anyhow::Result<Outcome> {
    sender.ready().await?;
    let resp = sender.send_request(request(t, close)).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut sse = SseCounter::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if t.stream {
                sse.feed(&data);
            }
        }
    }
    if !status.is_success() {
        return Ok(Outcome::Status(status.as_u16()));
    }
    Ok(Outcome::Ok {
        events: sse.events,
        done: sse.saw_done(),
    })
}

/// One request on a kept-alive connection, connecting (again) when there is none. A server
/// that closed the connection cleanly (say, `connection: close` after its last request) is
/// no error; a connection that failed is dropped.
async fn exchange_keepalive(
    t: &Target,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
) -> anyhow::Result<Outcome> {
    if conn.as_ref().is_some_and(|c| c.is_closed()) {
        *conn = None;
    }
    let outcome = match conn.as_mut() {
        Some(c) => exchange(t, c, false).await,
        None => match connect(t).await {
            Ok(mut c) => {
                let o = exchange(t, &mut c, false).await;
                *conn = Some(c);
                o
            }
            Err(e) => Err(e),
        },
    };
    if outcome.is_err() {
        *conn = None;
    }
    outcome
}

fn record(tally: &mut Tally, t: &Target, outcome: &anyhow::Result<Outcome>, took: Duration) {
    tally.latencies_us.push(took.as_micros() as u64);
    match outcome {
        Ok(Outcome::Ok { events, done }) => {
            tally.events += events;
            if t.stream && !done {
                tally.truncated += 1;
                tally
                    .first_error
                    .get_or_insert_with(|| "stream ended without data: [DONE]".into());
            }
        }
        Ok(Outcome::Status(code)) => {
            tally.non_2xx += 1;
            tally
                .first_error
                .get_or_insert_with(|| format!("status {code}"));
        }
        Err(e) => {
            tally.transport += 1;
            tally.first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
}

/// Counts lines that start with `data:` across arbitrary chunk boundaries, and remembers the
/// tail to tell whether the stream ended with `data: [DONE]`.
struct SseCounter {
    /// `Some(k)`: at a line start with `k` bytes of `data:` matched so far.
    matched: Option<usize>,
    events: u64,
    tail: Vec<u8>,
}

impl Default for SseCounter {
    fn default() -> Self {
        Self {
            matched: Some(0),
            events: 0,
            tail: Vec::with_capacity(64),
        }
    }
}

impl SseCounter {
    const PREFIX: &'static [u8] = b"data:";

    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.matched = Some(0);
            } else if let Some(k) = self.matched {
                if b == Self::PREFIX[k] {
                    if k + 1 == Self::PREFIX.len() {
                        self.events += 1;
                        self.matched = None;
                    } else {
                        self.matched = Some(k + 1);
                    }
                } else {
                    self.matched = None;
                }
            }
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 32 {
            self.tail.drain(..self.tail.len() - 32);
        }
    }

    fn saw_done(&self) -> bool {
        self.tail.windows(6).any(|w| w == b"[DONE]")
    }
}

// === closed loop ===

async fn closed_loop(args: &Args, t: Arc<Target>) -> anyhow::Result<String> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let mut workers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let t = t.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            while Instant::now() < end {
                let sent = Instant::now();
                let outcome = exchange_keepalive(&t, &mut conn).await;
                let failed = outcome.is_err();
                record(&mut tally, &t, &outcome, sent.elapsed());
                if failed {
                    // A refused connect must not become a busy loop.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tally
        }));
    }
    let tally = join(workers).await?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(summary(args, "closed", &tally, elapsed, json!({})))
}

// === open loop ===

/// Worker `k` of `n` sends requests `k, k+n, k+2n, …`, request `i` scheduled at `i / rate`.
/// While a worker's connection is busy its next request waits, and is then timed from its
/// scheduled send: the wait is part of what a client would have seen. A request whose
/// connection was idle when it was due is timed from when it actually left, so the timer's
/// own granularity (about 1 ms) is not counted against the server.
async fn open_loop(args: &Args, t: Arc<Target>, rate: f64) -> anyhow::Result<String> {
    if rate <= 0.0 {
        bail!("--rate must be > 0");
    }
    let n = args.connections.max(1);
    let total = (rate * args.duration).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    // Connect everyone first so connection setup is not measured as request latency.
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(connect(&t).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let mut workers = Vec::with_capacity(n);
    for (k, conn) in conns.into_iter().enumerate() {
        let t = t.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut conn = Some(conn);
            let mut i = k as u64;
            while i < total {
                let scheduled = start + interval * (i as u32);
                let was_idle = Instant::now() <= scheduled;
                if was_idle {
                    tokio::time::sleep_until(scheduled).await;
                } else {
                    tally.late += 1;
                }
                let sent = Instant::now();
                let from = if was_idle { sent } else { scheduled };
                let outcome = exchange_keepalive(&t, &mut conn).await;
                record(&mut tally, &t, &outcome, from.elapsed());
                i += n as u64;
            }
            tally
        }));
    }
    let tally = join(workers).await?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(summary(
        args,
        "open",
        &tally,
        elapsed,
        json!({"target_rps": rate, "late_sends": tally.late}),
    ))
}

// === burst ===

/// All connections start together; each time is from the common start to the last byte, so
/// a connection that sat in a full accept queue (or waited on a SYN retry) shows it.
async fn burst(args: &Args, t: Arc<Target>, n: usize) -> anyhow::Result<String> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = t.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let outcome = async {
                let mut c = connect(&t).await?;
                exchange(&t, &mut c, true).await
            }
            .await;
            let mut tally = Tally::default();
            record(&mut tally, &t, &outcome, start.elapsed());
            tally
        }));
    }
    let start = Instant::now();
    barrier.wait().await;
    let tally = join(tasks).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let over_1s = tally
        .latencies_us
        .iter()
        .filter(|&&us| us > 1_000_000)
        .count();
    let slowest = tally.latencies_us.iter().max().copied().unwrap_or(0);
    Ok(summary(
        args,
        "burst",
        &tally,
        elapsed,
        json!({"connections": n, "slowest_ms": ms(slowest), "over_1s": over_1s}),
    ))
}

// === hold ===

/// Opens `n` streams, waits until every one has its response headers, says so on stderr,
/// keeps reading them for `--hold-secs`, then drops them all.
async fn hold(args: &Args, t: Arc<Target>, n: usize) -> anyhow::Result<String> {
    let start = Instant::now();
    let opened = Arc::new(tokio::sync::Semaphore::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = t.clone();
        let opened = opened.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let started = Instant::now();
            let result: anyhow::Result<()> = async {
                let mut c = connect(&t).await?;
                c.ready().await?;
                let resp = c.send_request(request(&t, false)).await?;
                opened.add_permits(1);
                if !resp.status().is_success() {
                    tally.non_2xx += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| format!("status {}", resp.status()));
                }
                let mut body = resp.into_body();
                let mut sse = SseCounter::default();
                loop {
                    tokio::select! {
                        frame = body.frame() => match frame {
                            Some(f) => if let Ok(d) = f?.into_data() { sse.feed(&d) },
                            None => break,
                        },
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                tally.events += sse.events;
                Ok(())
            }
            .await;
            if let Err(e) = result {
                tally.transport += 1;
                tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                // Whoever waits for all streams to open must not wait for a failed one.
                opened.add_permits(1);
            }
            tally
                .latencies_us
                .push(started.elapsed().as_micros() as u64);
            tally
        }));
    }
    let all = opened.acquire_many(n as u32).await?;
    all.forget();
    let open_after = start.elapsed();
    eprintln!("holding {n} streams");
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    let _ = stop_tx.send(true);
    let tally = join(tasks).await?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(summary(
        args,
        "hold",
        &tally,
        elapsed,
        json!({"connections": n, "all_open_after_ms": (open_after.as_secs_f64() * 1e4).round() / 10.0}),
    ))
}

// === results ===

async fn join(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> anyhow::Result<Tally> {
    let mut all = Tally::default();
    for task in tasks {
        all.merge(task.await?);
    }
    Ok(all)
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1e3 * 1000.0).round() / 1000.0
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(
    args: &Args,
    mode: &str,
    tally: &Tally,
    elapsed_s: f64,
    extra: serde_json::Value,
) -> String {
    let mut lat = tally.latencies_us.clone();
    lat.sort_unstable();
    let requests = lat.len() as u64;
    let mut v = json!({
        "label": args.label,
        "mode": mode,
        "connections": args.connections,
        "requests": requests,
        "errors": tally.errors(),
        "non_2xx": tally.non_2xx,
        "transport_errors": tally.transport,
        "rps": (requests as f64 / elapsed_s * 10.0).round() / 10.0,
        "elapsed_s": (elapsed_s * 1000.0).round() / 1000.0,
        "p50_ms": ms(percentile(&lat, 50.0)),
        "p90_ms": ms(percentile(&lat, 90.0)),
        "p99_ms": ms(percentile(&lat, 99.0)),
        "max_ms": ms(lat.last().copied().unwrap_or(0)),
    });
    if args.stream || args.hold.is_some() {
        v["events"] = json!(tally.events);
        v["truncated_streams"] = json!(tally.truncated);
        v["events_per_stream"] = json!(if requests > 0 {
            (tally.events as f64 / requests as f64 * 10.0).round() / 10.0
        } else {
            0.0
        });
    }
    if let Some(e) = &tally.first_error {
        v["first_error"] = json!(e);
    }
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v.to_string()
}
