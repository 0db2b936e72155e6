//! What token counting costs: the free estimate the hot path uses, and exact counting with
//! the model's encoding, for 1 KB, 10 KB and 100 KB prompts (throughput in MB/s).
//!
//! Run: `cargo bench --bench tokens`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use tollgate::api::endpoint::Endpoint;
use tollgate::tokens::{
    count_chat_prompt, estimate_prompt_tokens, ChatPrompt, Encoding, Tokenizers,
};

const ENGLISH: &str = include_str!("../tests/data/token_sample/english.txt");
const CODE: &str = include_str!("../tests/data/token_sample/code.txt");

fn prompt(bytes: usize) -> String {
    let mixed = format!("{ENGLISH}\n{CODE}\n");
    mixed.repeat(bytes / mixed.len() + 1)[..bytes].to_string()
}

fn bench(c: &mut Criterion) {
    let tok = Tokenizers::shared();
    let mut group = c.benchmark_group("tokens");
    for size in [1024, 10 * 1024, 100 * 1024] {
        let text = prompt(size);
        let body =
            serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
                .to_string();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("estimate", size), &body, |b, body| {
            b.iter(|| estimate_prompt_tokens(black_box(body.len())))
        });
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            group.bench_with_input(
                BenchmarkId::new(format!("exact_{}", enc.name()), size),
                &text,
                |b, text| b.iter(|| tok.count(enc, black_box(text))),
            );
        }
        group.bench_with_input(
            BenchmarkId::new("chat_prompt_o200k_base", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let p =
                        ChatPrompt::parse(Endpoint::ChatCompletions, black_box(body.as_bytes()))
                            .unwrap();
                    count_chat_prompt(&tok, Encoding::O200kBase, &p)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
