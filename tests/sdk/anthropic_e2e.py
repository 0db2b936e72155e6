#!/usr/bin/env python3
"""End-to-end checks of Tollgate's Anthropic side through the official SDKs.

The Anthropic SDK (unchanged but for base_url) against `/v1/messages`, served by an
OpenAI-style backend and by an Anthropic backend; the OpenAI SDK against an Anthropic backend.

Environment:
  TOLLGATE_ROOT_URL        gateway root, e.g. http://127.0.0.1:8080 (no /v1)
  TOLLGATE_KEY             a valid team key
  TOLLGATE_POOR_KEY        a key of a team whose budget is spent
  TOLLGATE_OPENAI_MODEL    an alias served by an OpenAI-style backend
  TOLLGATE_CLAUDE_MODEL    an alias served by an Anthropic backend

Each check prints `ok <name>` or `FAIL <name>: <why>`; the last line is `N passed, M failed`,
and the exit code is 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import anthropic
import openai


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        print(f"error: environment variable {name} is required", file=sys.stderr)
        sys.exit(2)
    return value


ROOT = env("TOLLGATE_ROOT_URL").rstrip("/")
KEY = env("TOLLGATE_KEY")
POOR_KEY = env("TOLLGATE_POOR_KEY")
OPENAI_MODEL = env("TOLLGATE_OPENAI_MODEL")
CLAUDE_MODEL = env("TOLLGATE_CLAUDE_MODEL")
MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class CheckFailed(Exception):
    pass


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def claude(api_key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=ROOT, api_key=api_key, max_retries=0, timeout=30.0)


def gpt() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ROOT}/v1", api_key=KEY, max_retries=0, timeout=30.0)


def check_create(model: str) -> None:
    msg = claude().messages.create(model=model, max_tokens=32, system="Be brief.", messages=MESSAGES)
    expect(msg.type == "message" and msg.role == "assistant", f"not a message: {msg!r}")
    expect(msg.content and msg.content[0].type == "text" and msg.content[0].text, f"no text: {msg!r}")
    expect(msg.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {msg.stop_reason!r}")
    expect(msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, f"usage {msg.usage!r}")


def check_raw_response_headers(model: str) -> None:
    raw = claude().messages.with_raw_response.create(model=model, max_tokens=32, messages=MESSAGES)
    msg = raw.parse()
    cost = raw.headers.get("x-tollgate-cost-usd")
    expect(cost is not None and float(cost) > 0, f"x-tollgate-cost-usd {cost!r}")
    prompt = int(raw.headers.get("x-tollgate-prompt-tokens", "-1"))
    completion = int(raw.headers.get("x-tollgate-completion-tokens", "-1"))
    u = msg.usage
    billed_prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    expect(prompt == billed_prompt, f"prompt header {prompt} != usage {u!r}")
    expect(completion == u.output_tokens, f"completion header {completion} != usage {u!r}")


def check_stream_text(model: str) -> None:
    with claude().messages.stream(model=model, max_tokens=32, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    expect(bool(text), "streamed no text")
    expect(final.content[0].text == text, f"final text {final.content[0].text!r} != streamed {text!r}")
    expect(final.usage.output_tokens > 0, f"final usage {final.usage!r}")


def check_stream_tool_use(model: str) -> None:
    with claude().messages.stream(
        model=model,
        max_tokens=64,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    expect(len(uses) == 1 and uses[0].name == "get_weather", f"content {final.content!r}")
    expect(isinstance(uses[0].input, dict) and "city" in uses[0].input, f"input {uses[0].input!r}")
    expect(final.stop_reason == "tool_use", f"stop_reason {final.stop_reason!r}")


def check_count_tokens(model: str, source: str) -> None:
    raw = claude().messages.with_raw_response.count_tokens(model=model, messages=MESSAGES)
    n = raw.parse().input_tokens
    expect(0 < n < 100, f"input_tokens {n}")
    said = raw.headers.get("x-tollgate-token-source")
    expect(said == source, f"x-tollgate-token-source {said!r}, expected {source!r}")
    if source == "upstream":
        # The backend's count is what it then bills for the same messages.
        used = claude().messages.create(model=model, max_tokens=8, messages=MESSAGES).usage
        expect(used.input_tokens == n, f"count_tokens {n}, usage.input_tokens {used.input_tokens}")


def check_bad_key() -> None:
    try:
        claude("tg-not-a-key").messages.create(model=OPENAI_MODEL, max_tokens=8, messages=MESSAGES)
    except anthropic.AuthenticationError as e:
        expect(e.status_code == 401, f"status {e.status_code}")
        return
    raise CheckFailed("a bad key was let through (or raised something else)")


def check_unknown_model() -> None:
    try:
        claude().messages.create(model="claude-no-such", max_tokens=8, messages=MESSAGES)
    except anthropic.NotFoundError as e:
        expect(e.status_code == 404, f"status {e.status_code}")
        return
    raise CheckFailed("an unknown model was served (or raised something else)")


def check_over_budget() -> None:
    try:
        claude(POOR_KEY).messages.create(model=OPENAI_MODEL, max_tokens=8, messages=MESSAGES)
    except anthropic.RateLimitError as e:
        expect(e.status_code == 429, f"status {e.status_code}")
        expect(e.response.headers.get("retry-after") is not None, "no retry-after")
        return
    raise CheckFailed("a spent budget was let through (or raised something else)")


def check_openai_sdk_on_claude() -> None:
    resp = gpt().chat.completions.create(model=CLAUDE_MODEL, messages=MESSAGES, max_tokens=32)
    expect(resp.choices[0].message.content, f"no content: {resp!r}")
    expect(resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0, f"usage {resp.usage!r}")
    stream = gpt().chat.completions.create(
        model=CLAUDE_MODEL, messages=MESSAGES, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(bool(text), "streamed no text")
    expect(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, f"last {chunks[-1]!r}")


def check_openai_sdk_tool_call_on_claude() -> None:
    tool = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                             "parameters": WEATHER["input_schema"]}}
    resp = gpt().chat.completions.create(
        model=CLAUDE_MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=64,
        tools=[tool], tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = resp.choices[0].message.tool_calls or []
    expect(len(calls) == 1 and calls[0].function.name == "get_weather", f"message {resp.choices[0].message!r}")
    expect("city" in json.loads(calls[0].function.arguments), f"arguments {calls[0].function.arguments!r}")
    expect(resp.choices[0].finish_reason == "tool_calls", f"finish_reason {resp.choices[0].finish_reason!r}")


CHECKS = [
    ("create_openai_backend", lambda: check_create(OPENAI_MODEL)),
    ("create_claude_backend", lambda: check_create(CLAUDE_MODEL)),
    ("raw_response_cost_headers", lambda: check_raw_response_headers(OPENAI_MODEL)),
    ("raw_response_cost_headers_claude", lambda: check_raw_response_headers(CLAUDE_MODEL)),
    ("stream_text_openai_backend", lambda: check_stream_text(OPENAI_MODEL)),
    ("stream_text_claude_backend", lambda: check_stream_text(CLAUDE_MODEL)),
    ("stream_tool_use_claude_backend", lambda: check_stream_tool_use(CLAUDE_MODEL)),
    ("count_tokens_by_the_anthropic_backend", lambda: check_count_tokens(CLAUDE_MODEL, "upstream")),
    ("count_tokens_locally", lambda: check_count_tokens(OPENAI_MODEL, "local")),
    ("bad_key_401", check_bad_key),
    ("unknown_model_404", check_unknown_model),
    ("over_budget_429", check_over_budget),
    ("openai_sdk_on_claude", check_openai_sdk_on_claude),
    ("openai_sdk_tool_call_on_claude", check_openai_sdk_tool_call_on_claude),
]


def main() -> int:
    passed = failed = 0
    for name, check in CHECKS:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
            failed += 1
            detail = str(e) if isinstance(e, CheckFailed) else traceback.format_exc()
            print(f"FAIL {name}: {detail}")
        else:
            passed += 1
            print(f"ok {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
