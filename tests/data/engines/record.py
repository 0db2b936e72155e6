#!/usr/bin/env python3
"""Records real engine answers, byte for byte, into tests/data/engines/<engine>/real_*.

Run against the servers scripts/real-engines.sh builds, serving SmolLM2-135M-Instruct:

    python3 tests/data/engines/record.py llamacpp http://127.0.0.1:18002
    python3 tests/data/engines/record.py llama-cpp-python http://127.0.0.1:18001

Each answer is saved as received (after HTTP chunked decoding), and recorded.json gets, per
file, what the engine itself says of it: its usage (when it sent one) and its own count of the
generated text (llama.cpp /tokenize, llama-cpp-python /extras/tokenize/count). Standard
library only. Generation uses temperature 0 and a seed, but the text may still differ between
builds; the tests read the expectations from recorded.json, never from this script.
"""
import http.client
import json
import os
import sys
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))

REQUESTS = {
    "chat_stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write one sentence about the sea."}], "stream": True, "max_tokens": 30}),
    "chat_stream_include_usage": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name two colours, with \"quotes\"."}], "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 30}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi to Zoë 😀"}], "max_tokens": 20}),
    "completion_stream": ("/v1/completions", {"prompt": "The capital of France is", "stream": True, "max_tokens": 12}),
}


def post(base, path, body):
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def text_tokens(engine, base, text):
    if engine == "llamacpp":
        _, d = post(base, "/tokenize", {"content": text, "add_special": False, "parse_special": False})
        return len(json.loads(d)["tokens"])
    _, d = post(base, "/extras/tokenize/count", {"input": text, "model": "smollm2"})
    _, empty = post(base, "/extras/tokenize/count", {"input": "", "model": "smollm2"})
    return json.loads(d)["count"] - json.loads(empty)["count"]


def generated(doc):
    """Content, reasoning and tool-call arguments, as Tollgate's scanner reads them."""
    out = []
    for c in doc.get("choices") or []:
        if isinstance(c.get("text"), str):
            out.append(c["text"])
        for k in ("delta", "message"):
            m = c.get(k) or {}
            for f in ("content", "reasoning_content", "reasoning"):
                if isinstance(m.get(f), str):
                    out.append(m[f])
            for t in m.get("tool_calls") or []:
                a = (t.get("function") or {}).get("arguments")
                if isinstance(a, str):
                    out.append(a)
    return "".join(out)


def main():
    engine, base = sys.argv[1], sys.argv[2]
    os.makedirs(os.path.join(HERE, engine), exist_ok=True)
    index_path = os.path.join(HERE, "recorded.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else {}
    for name, (path, body) in REQUESTS.items():
        body = dict(body, model="smollm2", temperature=0, seed=7)
        status, data = post(base, path, body)
        assert status == 200, (name, status, data[:200])
        ext = "sse" if body.get("stream") else "json"
        rel = f"{engine}/real_{name}.{ext}"
        with open(os.path.join(HERE, rel), "wb") as f:
            f.write(data)
        usage, text = None, ""
        if ext == "json":
            doc = json.loads(data)
            usage, text = doc.get("usage"), generated(doc)
        else:
            for event in data.decode().replace("\r\n", "\n").split("\n\n"):
                lines = [l[5:].lstrip(" ") if False else l[6:] if l.startswith("data: ") else l[5:] for l in event.split("\n") if l.startswith("data:")]
                payload = "\n".join(lines)
                if not payload or payload.strip() == "[DONE]":
                    continue
                doc = json.loads(payload)
                text += generated(doc)
                if doc.get("usage"):
                    usage = doc["usage"]
        index[rel] = {
            "request": {"path": path, "body": body},
            "usage": usage,
            "text": text,
            "engine_text_tokens": text_tokens(engine, base, text),
        }
        print(rel, len(data), "bytes;", "usage" if usage else "no usage")
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
