//! A month of traffic for the statement and what-if tests: three teams, an owned GPU backend
//! and two commercial ones, cache reads and writes, egress, and the records no backend billed.
//! Each record's cost is what the gateway would have written: the one price function at the
//! config's prices.

use crate::config::prices::{self, Catalog};
use crate::config::Config;
use crate::ledger::testing::rec;
use crate::ledger::Record;
use crate::meter::{self, TokenSource, Usage};

/// 2026-11-01T00:00:00Z
pub const NOV: i64 = 1_793_491_200_000_000;
pub const DAY: i64 = 86_400_000_000;
pub const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The config that wrote the ledger, with `gpu` as the owned backend's GPU settings.
pub fn config_text(gpu: &str) -> String {
    format!(
        r#"
[[backend]]
name = "llama"
url = "http://127.0.0.1:8001/"
hosting = "self_hosted"
gpu = {{ {gpu} }}
models = [{{ name = "{LLAMA}", aliases = ["chat-small"] }}]

[[backend]]
name = "openai"
url = "http://127.0.0.1:9/"
hosting = "commercial"
egress_usd_per_gb = 0.09
models = [
  {{ name = "gpt-4o-mini", aliases = ["chat-small"] }},
  {{ name = "gpt-4o", input_usd_per_mtok = 2.50, output_usd_per_mtok = 10.00 }},
]

[[backend]]
name = "anthropic"
url = "http://127.0.0.1:9/"
protocol = "anthropic"
hosting = "commercial"
models = [{{ name = "claude-haiku-4-5" }}]

[[team]]
name = "search"
keys = ["sha256:96cfb4baad3d112787dbe4c4d2d81b26260bd5a340fc29bba1b4b3fde0ad86fa"]
tags = {{ cost_center = "cc-42" }}
"#
    )
}

pub const GPU: &str = "hourly_usd = 2.40, count = 1, tokens_per_second = 2500";

pub fn config(text: &str) -> Config {
    crate::config::parse(text, "t.toml", &|_| None).unwrap()
}

/// `n`: prompt, completion, cached, cache write, of which 1 h, egress bytes.
type Traffic = (u64, u64, u64, u64, u64, u64);

fn billed(cfg: &Config, at: i64, team: &str, backend: &str, model: &str, t: Traffic) -> Record {
    let b = cfg.backends.iter().find(|b| *b.name == *backend).unwrap();
    let m = b.models.iter().find(|m| *m.name == *model).unwrap();
    let price = prices::resolve(b, m, &Catalog::builtin());
    let usage = Usage {
        prompt: t.0,
        completion: t.1,
        cached: t.2,
        cache_write: t.3,
        cache_write_1h: t.4,
        reasoning: 0,
        source: TokenSource::Upstream,
    };
    Record {
        id: format!("{team}-{backend}-{at}"),
        prompt_tokens: Some(t.0),
        completion_tokens: Some(t.1),
        cached_tokens: Some(t.2),
        cache_write_tokens: Some(t.3),
        cache_write_1h_tokens: Some(t.4),
        egress_bytes: t.5,
        cost_nusd: meter::cost_nusd(price.as_ref(), &usage, t.5, b.egress_usd_per_gb),
        ..rec(at, team, Some(backend), model, "{\"project\":\"p1\"}")
    }
}

/// November's traffic, one request in October and one in December, and records that billed
/// nothing (refused before any backend, refused by the backend).
pub fn ledger(cfg: &Config) -> Vec<Record> {
    let mut out = Vec::new();
    let teams = ["search", "ads", "legal"];
    for i in 0..60u64 {
        let at = NOV + (i as i64) * (DAY / 2) + 1_234;
        let team = teams[(i % 3) as usize];
        let n = 1_000 + i * 37;
        out.push(billed(
            cfg,
            at,
            team,
            "llama",
            LLAMA,
            (n, n / 3, 0, 0, 0, 0),
        ));
        out.push(billed(
            cfg,
            at + 1,
            team,
            "openai",
            "gpt-4o-mini",
            (n * 3, n, n, 0, 0, 2_000 + i),
        ));
        if i % 2 == 0 {
            out.push(billed(
                cfg,
                at + 2,
                team,
                "openai",
                "gpt-4o",
                (n, 2 * n + 1, 7, 0, 0, 1_111),
            ));
        }
        if i % 4 != 1 {
            out.push(billed(
                cfg,
                at + 3,
                team,
                "anthropic",
                "claude-haiku-4-5",
                (n * 2 + 3, n / 7, n / 2, 333 + i, 111, 0),
            ));
        }
    }
    out.push(billed(
        cfg,
        NOV - 5,
        "search",
        "openai",
        "gpt-4o",
        (9_999, 9_999, 0, 0, 0, 0),
    ));
    out.push(billed(
        cfg,
        NOV + 30 * DAY,
        "ads",
        "openai",
        "gpt-4o",
        (9_999, 9_999, 0, 0, 0, 0),
    ));
    out.push(Record {
        id: "refused".into(),
        status: "rejected",
        ..rec(NOV + 3 * DAY, "ads", None, "chat-small", "{}")
    });
    out.push(Record {
        id: "upstream-refused".into(),
        status: "upstream_error",
        ..rec(NOV + 4 * DAY, "legal", Some("openai"), "gpt-4o", "{}")
    });
    out
}
