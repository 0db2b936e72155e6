//! The simulator's response bodies. A stream is generated as hyper polls it, token by token,
//! with a timer between tokens, like a GPU server emitting each decoding step.

use super::{Kind, Knobs, SimConfig, Stats};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

const WORDS: [&str; 16] = [
    "The", "gateway", "counts", "every", "token", "and", "prices", "each", "answer", "so", "teams",
    "see", "what", "their", "models", "cost",
];

/// A generation slot; counts the simulator's concurrency while held.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Slot {
    pub fn new(permit: OwnedSemaphorePermit, stats: Arc<Stats>) -> Self {
        let now = stats.generating.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_generating.fetch_max(now, Ordering::Relaxed);
        Self {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.generating.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One generation: what it produces, JSON or streamed.
pub struct TokenStream {
    pub(super) kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: &'static str,
    pub include_usage: bool,
    pub usage_mode: u8,
    pub cached_tokens: u32,
}

impl TokenStream {
    fn token(i: u32) -> String {
        let w = WORDS[i as usize % WORDS.len()];
        if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        }
    }

    fn usage(&self) -> Value {
        match self.usage_mode {
            super::USAGE_OMITTED => Value::Null,
            super::USAGE_MALFORMED => json!({"prompt_tokens": "lots", "completion_tokens": -1}),
            _ => json!({
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0},
            }),
        }
    }

    pub fn full_response(&self) -> Value {
        let text: String = (0..self.completion_tokens).map(Self::token).collect();
        let mut v = match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": "fp_sim",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": self.finish_reason}],
                "usage": self.usage(),
            }),
            _ => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": "fp_sim",
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": self.finish_reason}],
                "usage": self.usage(),
            }),
        };
        if v["usage"].is_null() {
            v.as_object_mut().expect("an object").remove("usage");
        }
        v
    }

    fn chunk(&self, choice: Value) -> Bytes {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": "fp_sim",
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if self.include_usage {
            v["usage"] = if choice.is_null() {
                self.usage()
            } else {
                Value::Null
            };
        }
        sse(&v)
    }

    fn role_chunk(&self) -> Option<Bytes> {
        (self.kind == Kind::Chat).then(|| {
            self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
        })
    }

    fn token_chunk(&self, i: u32) -> Bytes {
        let t = Self::token(i);
        match self.kind {
            Kind::Chat => self.chunk(json!({"index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null})),
            _ => self.chunk(json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null})),
        }
    }

    fn finish_chunk(&self) -> Bytes {
        match self.kind {
            Kind::Chat => self.chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": self.finish_reason})),
            _ => self.chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": self.finish_reason})),
        }
    }
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, v).expect("a Value always serializes");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    FirstToken,
    Token(u32),
    Finish,
    Usage,
    Done,
    End,
}

pub struct Streaming {
    gen: TokenStream,
    step: Step,
    sleep: Option<Pin<Box<Sleep>>>,
    ttft: Duration,
    interval: Duration,
    break_after: u32,
    knobs: Arc<Knobs>,
    stall: (u32, Duration),
    slot: Option<Slot>,
    stats: Arc<Stats>,
    role_sent: bool,
}

pub enum SimBody {
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
}

impl SimBody {
    pub fn full(b: Bytes) -> Self {
        SimBody::Full(Some(b))
    }

    pub fn stream(gen: TokenStream, cfg: &SimConfig, knobs: &Arc<Knobs>, slot: Slot) -> Self {
        let stats = slot.stats.clone();
        SimBody::Stream(Box::new(Streaming {
            gen,
            step: Step::FirstToken,
            sleep: None,
            ttft: cfg.time_to_first_token,
            interval: cfg.token_interval,
            break_after: knobs.break_after_tokens.load(Ordering::Relaxed),
            knobs: knobs.clone(),
            stall: (
                knobs.stall_before_token.load(Ordering::Relaxed),
                Duration::from_millis(knobs.stall_ms.load(Ordering::Relaxed)),
            ),
            slot: Some(slot),
            stats,
            role_sent: false,
        }))
    }
}

impl Streaming {
    /// Waits `d` (if any) before the next frame; Pending until the timer fires.
    fn wait(&mut self, d: Duration, cx: &mut Context<'_>) -> Poll<()> {
        if d.is_zero() {
            return Poll::Ready(());
        }
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.sleep = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            match self.step {
                Step::FirstToken => {
                    if !self.role_sent {
                        self.role_sent = true;
                        if let Some(b) = self.gen.role_chunk() {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                    }
                    std::task::ready!(self.wait(self.ttft, cx));
                    self.step = if self.gen.completion_tokens == 0 {
                        Step::Finish
                    } else {
                        Step::Token(0)
                    };
                    if let Step::Token(0) = self.step {
                        return self.emit_token(0);
                    }
                }
                Step::Token(i) => {
                    if (self.break_after > 0 && i >= self.break_after)
                        || self.knobs.killed.load(Ordering::Relaxed)
                    {
                        self.step = Step::End;
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "simulated crash mid-stream",
                        ))));
                    }
                    let mut pause = self.interval;
                    if self.stall.0 > 0 && i + 1 == self.stall.0 {
                        pause += self.stall.1;
                    }
                    std::task::ready!(self.wait(pause, cx));
                    return self.emit_token(i);
                }
                Step::Finish => {
                    self.step = if self.gen.include_usage {
                        Step::Usage
                    } else {
                        Step::Done
                    };
                    self.slot = None;
                    return Poll::Ready(Some(Ok(Frame::data(self.gen.finish_chunk()))));
                }
                Step::Usage => {
                    self.step = Step::Done;
                    return Poll::Ready(Some(Ok(Frame::data(self.gen.chunk(Value::Null)))));
                }
                Step::Done => {
                    self.step = Step::End;
                    self.stats.streams_completed.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        b"data: [DONE]\n\n",
                    )))));
                }
                Step::End => return Poll::Ready(None),
            }
        }
    }

    fn emit_token(&mut self, i: u32) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
        self.step = if i + 1 >= self.gen.completion_tokens {
            Step::Finish
        } else {
            Step::Token(i + 1)
        };
        Poll::Ready(Some(Ok(Frame::data(self.gen.token_chunk(i)))))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if !matches!(self.step, Step::End) {
            self.stats.streams_cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SimBody::Full(b) => b.is_none(),
            SimBody::Stream(s) => s.step == Step::End,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Standard base64 (OpenAI's `encoding_format: "base64"` embeddings); small enough not to
/// warrant a dependency.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(input.as_bytes()), want);
        }
    }
}
