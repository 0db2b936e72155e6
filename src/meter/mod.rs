//! What a request consumed and what it cost.
//!
//! Counts come from the upstream's `usage` when it reports one (the provider bills by it) and
//! from local tokenization when it does not: some servers omit it, a stream can be cut short,
//! a client can leave. Each count carries its source, and "unknown" is never silently zero:
//! a priced model always gets a cost, from local counts if need be.

mod outcome;
pub mod price;
pub mod scan;
pub mod sse;
pub mod template;

pub use outcome::{Generated, Outcome, Settled, Status};

use crate::config::prices::Price;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The response's own `usage`: what the provider bills.
    Upstream,
    /// Counted by the serving engine's own tokenizer endpoint (see `upstream::engine`).
    Engine,
    /// Counted here with a tiktoken encoding (exact for OpenAI models, a named stand-in else).
    Local,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Upstream => "upstream",
            TokenSource::Engine => "engine",
            TokenSource::Local => "local",
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens served from the provider's cache (priced at the cached rate).
    pub cached: u64,
    /// Prompt tokens written to the provider's cache (Anthropic), priced at the write rate.
    pub cache_write: u64,
    /// Of `cache_write`, the tokens written for an hour (Anthropic's 1-hour TTL, priced higher
    /// than the 5-minute default).
    pub cache_write_1h: u64,
    /// Reasoning tokens, already included in `completion` (billed as output).
    pub reasoning: u64,
    pub source: TokenSource,
}

/// `usage` as OpenAI-compatible servers (and Anthropic) report it; every field optional.
#[derive(Debug, Default, Deserialize)]
pub struct WireUsage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens_details: Option<PromptDetails>,
    pub completion_tokens_details: Option<CompletionDetails>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    /// Anthropic's split of `cache_creation_input_tokens` by TTL.
    pub cache_creation: Option<CacheCreation>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CacheCreation {
    pub ephemeral_5m_input_tokens: Option<u64>,
    pub ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PromptDetails {
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: Option<u64>,
}

/// More tokens than one request can have. A larger count is a broken engine's, not a bill:
/// trusted, it would price a request at billions and overflow the sums that settle it.
pub const MAX_REPORTED_TOKENS: u64 = u32::MAX as u64;

impl WireUsage {
    /// Usable counts, or `None` when the object lacks the prompt count (a half-filled usage
    /// would understate the bill) or has a count past [`MAX_REPORTED_TOKENS`]: the caller
    /// counts instead.
    pub fn to_usage(&self) -> Option<Usage> {
        let counts = [
            self.prompt_tokens,
            self.completion_tokens,
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
            self.cache_creation
                .as_ref()
                .and_then(|c| c.ephemeral_1h_input_tokens),
            self.prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens),
            self.completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens),
        ];
        if counts
            .into_iter()
            .flatten()
            .any(|n| n > MAX_REPORTED_TOKENS)
        {
            return None;
        }
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        let (prompt, cached) = match (self.prompt_tokens, self.input_tokens) {
            (Some(p), _) => (
                p,
                self.prompt_tokens_details
                    .as_ref()
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
            ),
            // Anthropic reports uncached input apart from cache reads and writes.
            (None, Some(i)) => (i + cache_read + cache_write, cache_read),
            (None, None) => return None,
        };
        let completion = self.completion_tokens.or(self.output_tokens).unwrap_or(0);
        // Each part is bounded above, their sum too: no request has more.
        if prompt > MAX_REPORTED_TOKENS {
            return None;
        }
        let cached = cached.min(prompt);
        let cache_write = cache_write.min(prompt - cached);
        Some(Usage {
            prompt,
            completion,
            cached,
            cache_write,
            cache_write_1h: self
                .cache_creation
                .as_ref()
                .and_then(|c| c.ephemeral_1h_input_tokens)
                .unwrap_or(0)
                .min(cache_write),
            reasoning: self
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
            source: TokenSource::Upstream,
        })
    }
}

/// A `usage` value (the object itself) as counts; `None` when it is `null`, malformed, of the
/// wrong types or negative: the request already succeeded, only its count is lost, and the
/// caller counts instead.
pub fn usage_json(value: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Option<WireUsage>>(value)
        .ok()??
        .to_usage()
}

/// llama.cpp's `timings` as counts: the prompt is what it evaluated plus what it took from
/// its cache, the completion what it predicted. Exact, and on every answer of that server,
/// including streams whose client did not ask for usage.
pub fn timings_json(value: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Timings {
        prompt_n: u64,
        #[serde(default)]
        cache_n: u64,
        predicted_n: u64,
    }
    let t: Timings = serde_json::from_slice(value).ok()?;
    if [
        t.prompt_n,
        t.cache_n,
        t.predicted_n,
        t.prompt_n.saturating_add(t.cache_n),
    ]
    .into_iter()
    .any(|n| n > MAX_REPORTED_TOKENS)
    {
        return None;
    }
    Some(Usage {
        prompt: t.prompt_n + t.cache_n,
        completion: t.predicted_n,
        cached: t.cache_n,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Upstream,
    })
}

/// What a whole JSON answer says: its usage (see [`usage_json`]) and its generated text, read
/// by the same scanner as stream events. `None` when the answer is not valid JSON.
///
/// The text is decoded only when the answer's usage does not make it moot (no usage, or one
/// that claims nothing was generated): most answers are read once, without copying it.
pub fn read_answer(json: &[u8]) -> Option<(Option<Usage>, String)> {
    let usage_in = |found: &scan::Scan| {
        found
            .usage
            .clone()
            .and_then(|span| usage_json(&json[span]))
            .or_else(|| {
                found
                    .timings
                    .clone()
                    .and_then(|span| timings_json(&json[span]))
            })
    };
    let found = scan::scan_only(json).ok()?;
    let usage = usage_in(&found);
    if usage.is_some_and(|u| u.completion > 0) || found.text_parts == 0 {
        return Some((usage, String::new()));
    }
    let mut text = String::new();
    scan::scan(json, &mut text).ok()?;
    Some((usage, text))
}

/// The `usage` of a JSON response body or stream chunk (see [`usage_json`]).
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    read_answer(json)?.0
}

/// What a request cost, in nano-dollars: its tokens at their prices plus egress, rounded to
/// the nearest nano-dollar once (see [`price`]).
pub fn cost_nusd(
    price: Option<&Price>,
    usage: &Usage,
    egress_bytes: u64,
    egress_usd_per_gb: Option<f64>,
) -> i64 {
    price::cost_nusd(
        price,
        usage.into(),
        price::Egress {
            bytes: egress_bytes,
            usd_per_gb: egress_usd_per_gb,
        },
        price::Rounding::Nearest,
    )
}

/// `0.000123450` style: nano-dollars as a decimal USD string, exact.
pub fn format_usd(nusd: i64) -> String {
    let sign = if nusd < 0 { "-" } else { "" };
    let n = nusd.unsigned_abs();
    format!("{sign}{}.{:09}", n / 1_000_000_000, n % 1_000_000_000)
}

#[cfg(test)]
mod tests;
