//! Token counts made here, for when the upstream gives none and for admission near a limit.
//!
//! Two speeds on purpose. [`estimate_prompt_tokens`] is a free upper bound from the body's
//! size (a BPE token is at least one byte), good enough while a request is far from any limit.
//! Exact counts use the model's tokenizer ([`Tokenizers`]): tiktoken's o200k_base and
//! cl100k_base, loaded once at start; models whose tokenizer cannot ship (Llama, Mistral,
//! Qwen, Claude, Gemini) are counted with cl100k_base as a named stand-in, whose measured
//! error is in docs/TOKENS.md. Exact counting runs at tens of MB/s, so a large prompt is
//! counted on the blocking pool behind a semaphore, never on the async runtime.

mod bpe;
mod chat;

pub use chat::{count_chat_prompt, ChatPrompt};

use bpe::Vocab;
use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

/// Texts longer than this are counted on the blocking pool (about 30-55 µs of work at 17-35 MB/s).
pub const INLINE_COUNT_MAX_BYTES: usize = 1024;
/// Large counts in parallel at most: each occupies a core.
const BLOCKING_COUNTS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    /// The tokenizer that counts a model's tokens, exact or a stand-in with its measured ratio.
    pub fn for_model(model: &str) -> Counter {
        let m = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let starts = |p: &[&str]| p.iter().any(|p| m.starts_with(p));
        let has = |p: &[&str]| p.iter().any(|p| m.contains(p));
        let exact = |encoding| Counter {
            encoding,
            ratio: 1.0,
            stand_in_for: None,
        };
        if starts(&[
            "gpt-4o",
            "chatgpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "gpt-oss",
            "codex",
        ]) {
            exact(Encoding::O200kBase)
        } else if starts(&[
            "gpt-4",
            "gpt-3.5",
            "gpt-35",
            "text-embedding-3",
            "text-embedding-ada-002",
        ]) {
            exact(Encoding::Cl100kBase)
        } else if has(&[
            "mixtral",
            "mistral-7b",
            "mistral-tiny",
            "mistral-large-2407",
            "mistral-large-2411",
            "codestral-2405",
        ]) {
            // SentencePiece v1-v3: 1.068x cl100k on English, 1.288x on code (docs/TOKENS.md).
            Counter {
                encoding: Encoding::Cl100kBase,
                ratio: 1.18,
                stand_in_for: Some("mistral-sentencepiece"),
            }
        } else if has(&[
            "mistral",
            "ministral",
            "codestral",
            "pixtral",
            "magistral",
            "devstral",
        ]) {
            // Tekken: 1.007x on English, 1.063x on code.
            Counter {
                encoding: Encoding::Cl100kBase,
                ratio: 1.035,
                stand_in_for: Some("mistral-tekken"),
            }
        } else if has(&["llama"]) {
            // Llama 3's vocabulary starts with cl100k's: identical counts on the sample.
            Counter {
                encoding: Encoding::Cl100kBase,
                ratio: 1.0,
                stand_in_for: Some("llama3"),
            }
        } else {
            Counter {
                encoding: Encoding::Cl100kBase,
                ratio: 1.0,
                stand_in_for: Some("unknown"),
            }
        }
    }
}

/// How to count one model's tokens locally.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counter {
    pub encoding: Encoding,
    /// Measured tokens of the real tokenizer per stand-in token (1.0 when exact).
    pub ratio: f64,
    /// The tokenizer this one stands in for, when not the model's own.
    pub stand_in_for: Option<&'static str>,
}

impl Counter {
    /// A stand-in's count scaled by its ratio, rounded up so an estimate never undercounts.
    pub fn scale(&self, n: u64) -> u64 {
        if self.ratio == 1.0 {
            n
        } else {
            (n as f64 * self.ratio).ceil() as u64
        }
    }
}

/// Ordinary tokens of each encoding (ranks below these; the special tokens come after).
const CL100K_RANKS: u32 = 100_256;
const O200K_RANKS: u32 = 199_998;
/// cl100k_base's split pattern, as tiktoken defines it (tiktoken-rs does not export it).
const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The encoders, built once (a few hundred milliseconds) and shared.
pub struct Tokenizers {
    // Each encoding costs MiBs resident (2.1 for cl100k_base, 4.1 for o200k_base): loaded
    // when a configured model needs it.
    o200k: OnceLock<Vocab>,
    cl100k: OnceLock<Vocab>,
    blocking: Semaphore,
}

impl std::fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokenizers { o200k_base, cl100k_base }")
    }
}

impl Tokenizers {
    /// The process-wide encoders (each loaded on first use; see [`Tokenizers::load`]).
    pub fn shared() -> Arc<Tokenizers> {
        static SHARED: OnceLock<Arc<Tokenizers>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                Arc::new(Tokenizers {
                    o200k: OnceLock::new(),
                    cl100k: OnceLock::new(),
                    blocking: Semaphore::new(BLOCKING_COUNTS),
                })
            })
            .clone()
    }

    /// Loads an encoding now (a few hundred milliseconds), so that no request pays for it:
    /// the gateway loads, at start and on reload, those its configured models use.
    pub fn load(&self, enc: Encoding) {
        let _ = self.bpe(enc);
    }

    fn bpe(&self, enc: Encoding) -> &Vocab {
        match enc {
            Encoding::O200kBase => self.o200k.get_or_init(|| {
                Vocab::from_tiktoken(
                    tiktoken_rs::o200k_base,
                    O200K_RANKS,
                    tiktoken_rs::O200K_BASE_PAT_STR,
                )
                .expect("the o200k_base ranks ship with tiktoken-rs")
            }),
            Encoding::Cl100kBase => self.cl100k.get_or_init(|| {
                Vocab::from_tiktoken(tiktoken_rs::cl100k_base, CL100K_RANKS, CL100K_PATTERN)
                    .expect("the cl100k_base ranks ship with tiktoken-rs")
            }),
        }
    }

    /// Exact count of plain text (special-token text counts as ordinary text, as the API does
    /// for user content).
    pub fn count(&self, enc: Encoding, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        self.bpe(enc).count(text)
    }

    /// Runs `work` inline when small, else on the blocking pool behind the semaphore.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        bytes: usize,
        work: impl FnOnce(&Tokenizers) -> T + Send + 'static,
    ) -> T {
        if bytes <= INLINE_COUNT_MAX_BYTES {
            return work(self);
        }
        let _permit = self
            .blocking
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let this = self.clone();
        match tokio::task::spawn_blocking(move || work(&this)).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// A request body's prompt counted exactly with `counter`, on the blocking pool when large;
/// the free upper bound when the body is not one the counter can read.
pub async fn count_prompt(
    counter: Counter,
    endpoint: crate::api::endpoint::Endpoint,
    body: &bytes::Bytes,
) -> u64 {
    let estimate = estimate_prompt_tokens(body.len());
    let owned = body.clone();
    Tokenizers::shared()
        .off_runtime(body.len(), move |tok| {
            ChatPrompt::parse(endpoint, &owned)
                .map(|p| counter.scale(count_chat_prompt(tok, counter.encoding, &p)))
                .unwrap_or(estimate)
        })
        .await
}

/// A free upper bound on a prompt's tokens: every token is at least one byte, and the JSON
/// around the text only adds bytes.
pub fn estimate_prompt_tokens(body_bytes: usize) -> u64 {
    body_bytes as u64
}

#[cfg(test)]
mod tests;
