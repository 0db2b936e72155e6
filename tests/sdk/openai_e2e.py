#!/usr/bin/env python3
"""End-to-end checks of Tollgate through the official OpenAI Python SDK.

Environment:
  TOLLGATE_BASE_URL     gateway base URL including /v1, e.g. http://127.0.0.1:8080/v1
  TOLLGATE_KEY          a valid team key
  TOLLGATE_MODEL        a chat model alias (default "chat-small")
  TOLLGATE_EMBED_MODEL  an embeddings model alias (default "embed")

Each check prints `ok <name>` or `FAIL <name>: <why>`; the last line is
`N passed, M failed`, and the exit code is 1 if any check failed.

Usage (against `tollgate demo --serve`):
  python3 -m venv /tmp/sdkvenv && /tmp/sdkvenv/bin/pip install -r tests/sdk/requirements.txt
  TOLLGATE_BASE_URL=http://127.0.0.1:8080/v1 TOLLGATE_KEY=tg-demo-research \
      /tmp/sdkvenv/bin/python tests/sdk/openai_e2e.py
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import openai

# The SDK's HTTP client: openai 3.x depends on httpx2, openai 1.x/2.x on httpx.
try:
    import httpx2 as httpx_mod  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older SDKs
    import httpx as httpx_mod  # type: ignore[no-redef]


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        print(f"error: environment variable {name} is required", file=sys.stderr)
        sys.exit(2)
    return value


BASE_URL = env("TOLLGATE_BASE_URL").rstrip("/")
KEY = env("TOLLGATE_KEY")
MODEL = env("TOLLGATE_MODEL", "chat-small")
EMBED_MODEL = env("TOLLGATE_EMBED_MODEL", "embed")
TIMEOUT = 30.0

MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]


class CheckFailed(Exception):
    pass


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def make_client(api_key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL, api_key=api_key, max_retries=0, timeout=TIMEOUT)


client = make_client()


# --- checks -----------------------------------------------------------------------------


def check_chat_nonstreaming() -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)
    expect(len(resp.choices) >= 1, f"no choices in response: {resp!r}")
    content = resp.choices[0].message.content
    expect(bool(content), f"empty message content: {resp.choices[0].message!r}")
    expect(resp.usage is not None, f"response has no usage: {resp!r}")
    expect(resp.usage.prompt_tokens > 0, f"usage.prompt_tokens not > 0: {resp.usage!r}")
    expect(resp.usage.completion_tokens > 0, f"usage.completion_tokens not > 0: {resp.usage!r}")

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=32)
    missing = [
        h
        for h in ("x-tollgate-request-id", "x-tollgate-backend", "x-tollgate-model")
        if not raw.headers.get(h)
    ]
    expect(not missing, f"missing response headers {missing}; got {dict(raw.headers)}")
    parsed = raw.parse()
    expect(bool(parsed.choices and parsed.choices[0].message.content), f"raw response parsed empty: {parsed!r}")
    # Metering: the cost and token headers match the usage the SDK parsed.
    cost = raw.headers.get("x-tollgate-cost-usd")
    expect(cost is not None and float(cost) > 0, f"x-tollgate-cost-usd missing or zero: {cost!r}")
    expect(
        raw.headers.get("x-tollgate-prompt-tokens") == str(parsed.usage.prompt_tokens)
        and raw.headers.get("x-tollgate-completion-tokens") == str(parsed.usage.completion_tokens),
        f"token headers {dict(raw.headers)} disagree with usage {parsed.usage!r}",
    )


def check_chat_streaming_usage() -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                parts.append(choice.delta.content)
    text = "".join(parts)
    expect(len(chunks) > 0, "stream yielded no chunks")
    expect(bool(text), f"streamed text is empty ({len(chunks)} chunks)")
    final = chunks[-1]
    expect(final.usage is not None, f"final chunk carries no usage: {final!r}")
    expect(final.usage.completion_tokens > 0, f"final usage.completion_tokens not > 0: {final.usage!r}")
    # The simulator emits one token per content chunk, so the counts must agree.
    expect(
        final.usage.completion_tokens == len(parts),
        f"usage.completion_tokens={final.usage.completion_tokens} but {len(parts)} non-empty content deltas",
    )
    early = [i for i, c in enumerate(chunks[:-1]) if c.usage is not None]
    expect(not early, f"usage appeared on non-final chunks at indexes {early}")


def check_legacy_completions() -> None:
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16)
    expect(len(resp.choices) >= 1, f"no choices in response: {resp!r}")
    expect(bool(resp.choices[0].text), f"empty completion text: {resp.choices[0]!r}")


def check_embeddings() -> None:
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    resp = client.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
    expect(len(resp.data) == 2, f"expected 2 embeddings, got {len(resp.data)}")
    for item in resp.data:
        emb = item.embedding
        expect(isinstance(emb, list) and len(emb) > 0, f"embedding {item.index} is not a non-empty list: {type(emb)}")
        expect(all(isinstance(x, float) for x in emb), f"embedding {item.index} has non-float values")
    expect(sorted(d.index for d in resp.data) == [0, 1], f"indexes are {[d.index for d in resp.data]}")


def check_models_list() -> None:
    ids = [m.id for m in client.models.list()]
    expect(MODEL in ids, f"{MODEL!r} not in models.list(): {ids}")


def check_bad_key() -> None:
    bad = make_client(api_key="tg-definitely-not-a-key")
    try:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    except openai.AuthenticationError as e:
        expect(e.status_code == 401, f"status {e.status_code}, expected 401")
        return
    except openai.APIStatusError as e:
        raise CheckFailed(f"expected AuthenticationError (401), got {type(e).__name__} ({e.status_code}): {e}")
    raise CheckFailed("request with a bad key succeeded")


def check_unknown_model() -> None:
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=8)
    except openai.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}, expected 404")
        return
    except openai.APIStatusError as e:
        raise CheckFailed(f"expected NotFoundError (404), got {type(e).__name__} ({e.status_code}): {e}")
    raise CheckFailed("request for an unknown model succeeded")


def check_malformed_json() -> None:
    with httpx_mod.Client(timeout=TIMEOUT) as http:
        r = http.post(
            f"{BASE_URL}/chat/completions",
            content=b"{not json",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
    expect(r.status_code == 400, f"status {r.status_code}, expected 400; body: {r.text[:500]}")
    try:
        body = r.json()
    except json.JSONDecodeError:
        raise CheckFailed(f"error body is not JSON: {r.text[:500]!r}")
    err = body.get("error") if isinstance(body, dict) else None
    expect(isinstance(err, dict), f"body has no error object: {body}")
    expect(err.get("type") == "invalid_request_error", f"error.type is {err.get('type')!r}: {body}")


CHECKS = [
    ("chat_nonstreaming", check_chat_nonstreaming),
    ("chat_streaming_usage", check_chat_streaming_usage),
    ("legacy_completions", check_legacy_completions),
    ("embeddings", check_embeddings),
    ("models_list", check_models_list),
    ("bad_key_401", check_bad_key),
    ("unknown_model_404", check_unknown_model),
    ("malformed_json_400", check_malformed_json),
]


def main() -> int:
    print(f"openai {openai.__version__} against {BASE_URL} (model {MODEL}, embeddings {EMBED_MODEL})")
    passed = failed = 0
    for name, fn in CHECKS:
        try:
            fn()
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        except openai.APIStatusError as e:
            failed += 1
            print(f"FAIL {name}: HTTP {e.status_code} {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - report anything else as a failure, with context
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        else:
            passed += 1
            print(f"ok {name}")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
