#!/usr/bin/env python3
"""Drives real inference engines through Tollgate with the official OpenAI Python SDK.

tests/engines.rs starts llama.cpp's server and llama-cpp-python's server (SmolLM2-135M),
puts a gateway in front of both and runs this script. It only plays the client: it does the
requests a user's app would do and prints what the client saw, as one JSON object on the last
line; the Rust test compares that with the ledger and with the engines' own counts.

Environment:
  TOLLGATE_BASE_URL   gateway base URL including /v1
  TOLLGATE_KEY        a team key
  TOLLGATE_MODELS     comma-separated model names, one per engine
  TOLLGATE_PARALLEL   concurrent streams per model for the capacity check (default 4)
"""

from __future__ import annotations

import json
import os
import sys
import threading

import openai

BASE_URL = os.environ["TOLLGATE_BASE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
MODELS = os.environ["TOLLGATE_MODELS"].split(",")
PARALLEL = int(os.environ.get("TOLLGATE_PARALLEL", "4"))

client = openai.OpenAI(base_url=BASE_URL, api_key=KEY, timeout=120.0, max_retries=0)

PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Name two colours, with \"quotes\" and an accent: é."},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Now backwards, please 😀"},
    ],
]


# Streamed only, never sent as JSON: the gateway has no usage of this shape to learn from,
# so its prompt count for llama-cpp-python is extrapolated from the shapes it has seen.
UNSEEN_SHAPE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def chat_json(model: str, messages: list, max_tokens: int = 24) -> dict:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.7
    )
    r = raw.parse()
    return {
        "kind": "json",
        "model": model,
        "messages": messages,
        "request_id": raw.headers["x-tollgate-request-id"],
        "text": r.choices[0].message.content or "",
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump() if r.usage else None,
        "headers": {
            k: raw.headers.get(k)
            for k in ("x-tollgate-prompt-tokens", "x-tollgate-completion-tokens", "x-tollgate-token-source")
        },
    }


def chat_stream(model: str, messages: list, include_usage: bool, max_tokens: int = 40, stop_after: int | None = None) -> dict:
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.7, stream=True, **kwargs
    )
    stream = raw.parse()
    text, usage, finish, chunks, usage_chunks = "", None, None, 0, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage_chunks += 1
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            if c.delta and c.delta.content:
                text += c.delta.content
            if c.finish_reason:
                finish = c.finish_reason
        if stop_after is not None and chunks >= stop_after:
            # The user closes the tab: the connection goes, mid-stream.
            stream.close()
            break
    return {
        "kind": "stream_usage" if include_usage else ("disconnect" if stop_after else "stream"),
        "model": model,
        "messages": messages,
        "request_id": raw.headers["x-tollgate-request-id"],
        "text": text,
        "finish_reason": finish,
        "usage": usage,
        "usage_chunks": usage_chunks,
        "chunks": chunks,
    }


def completion_stream(model: str) -> dict:
    raw = client.completions.with_raw_response.create(
        model=model, prompt="The capital of France is", max_tokens=16, temperature=0.7, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            text += c.text or ""
            finish = c.finish_reason or finish
    return {
        "kind": "completion_stream", "model": model, "prompt": "The capital of France is",
        "request_id": raw.headers["x-tollgate-request-id"], "text": text, "finish_reason": finish,
        "usage": usage,
    }


def main() -> None:
    results: list[dict] = []
    errors: list[str] = []
    for model in MODELS:
        for messages in PROMPTS:
            results.append(chat_json(model, messages))
            results.append(chat_stream(model, messages, include_usage=False))
            results.append(chat_stream(model, messages, include_usage=True))
        results.append(chat_stream(model, UNSEEN_SHAPE, include_usage=True))
        results.append(completion_stream(model))
        results.append(chat_stream(model, PROMPTS[0], include_usage=False, max_tokens=200, stop_after=4))

        # More streams at once than the engine takes: the gateway queues the rest.
        out: list[dict] = []

        def one(i: int) -> None:
            try:
                out.append(chat_stream(model, PROMPTS[i % len(PROMPTS)], include_usage=True, max_tokens=24))
            except Exception as e:  # noqa: BLE001 - reported, then the test fails on it
                errors.append(f"{model} parallel {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(PARALLEL)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            r["kind"] = "parallel"
        results.extend(out)
    print(json.dumps({"results": results, "errors": errors}))


if __name__ == "__main__":
    try:
        main()
    except openai.APIError as e:
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
