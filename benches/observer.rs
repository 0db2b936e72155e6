//! The SSE observer's cost per stream: what the gateway adds to every event it relays (find
//! the event ends, scan the JSON for usage and generated text, hold back `[DONE]`).
//!
//! Two dialects of the same 64-token answer, as engines write them: compact JSON (vLLM,
//! llama.cpp's server, OpenAI) and Python's spaced `json.dumps` (llama-cpp-python), each fed
//! one event per frame (paced generation) and as one frame (a burst read at once).
//!
//! Run: `cargo bench --bench observer`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use tollgate::meter::sse::SseObserver;

const TOKENS: usize = 64;

fn events(spaced: bool) -> Vec<Bytes> {
    let (colon, comma) = if spaced { (": ", ", ") } else { (":", ",") };
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\"{colon}\"chatcmpl-8f0e\"{comma}\"object\"{colon}\"chat.completion.chunk\"{comma}\"created\"{colon}1764669600{comma}\"model\"{colon}\"smollm2\"{comma}\"choices\"{colon}[{{\"index\"{colon}0{comma}\"delta\"{colon}{delta}{comma}\"logprobs\"{colon}null{comma}\"finish_reason\"{colon}{finish}}}]}}\n\n"
        )
    };
    let mut out = vec![chunk(&format!("{{\"role\"{colon}\"assistant\"}}"), "null")];
    for i in 0..TOKENS {
        let word = [
            "The",
            " gateway",
            " counts",
            " every",
            " token",
            " and",
            " \\\"prices\\\"",
            " it",
        ][i % 8];
        out.push(chunk(&format!("{{\"content\"{colon}\"{word}\"}}"), "null"));
    }
    out.push(chunk("{}", "\"stop\""));
    out.push(format!(
        "data: {{\"id\"{colon}\"chatcmpl-8f0e\"{comma}\"choices\"{colon}[]{comma}\"usage\"{colon}{{\"prompt_tokens\"{colon}37{comma}\"completion_tokens\"{colon}{TOKENS}{comma}\"total_tokens\"{colon}{}}}}}\n\n",
        37 + TOKENS
    ));
    out.push("data: [DONE]\n\n".into());
    out.into_iter().map(Bytes::from).collect()
}

fn observe(frames: &[Bytes]) -> u64 {
    let mut o = SseObserver::new(false);
    let mut out = 0;
    for f in frames {
        if let Some(b) = o.feed(f.clone()) {
            out += b.len();
        }
    }
    black_box(o.usage);
    out as u64
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("observer");
    for (dialect, spaced) in [("compact", false), ("spaced", true)] {
        let per_event = events(spaced);
        let bytes: usize = per_event.iter().map(Bytes::len).sum();
        let whole = vec![Bytes::from(per_event.concat())];
        g.throughput(Throughput::Elements(per_event.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("event_per_frame", dialect),
            &per_event,
            |b, frames| b.iter(|| observe(frames)),
        );
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(
            BenchmarkId::new("one_frame", dialect),
            &whole,
            |b, frames| b.iter(|| observe(frames)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
