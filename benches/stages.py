#!/usr/bin/env python3
"""Instructions per request by stage, from two callgrind profiles of the gateway.

    python3 benches/stages.py SHORT.out N_SHORT LONG.out N_LONG

Both profiles come from benches/callgrind.sh with the same body and different request counts.
Start-up (the tokenizer tables, the config, the runtime) costs the same in both, so the
difference of the two, divided by the difference of the request counts, is what one request
costs the whole process: the request future, hyper on both sides, the runtime, the ledger
thread, the allocator.

Each exclusive cost is charged to a stage by the function that encloses it (inlined code is
charged to the function it was inlined into): a `tollgate::<module>` function to that
module's stage, otherwise by the crate or library the code comes from.
"""

import re
import subprocess
import sys
from collections import Counter

# Our modules, in the order a request meets them.
MODULE_STAGE = [
    ("server", "accept, ids, limits"),
    ("keys", "auth"),
    ("auth", "auth"),
    ("ctx", "context"),
    ("api", "parse (api)"),
    ("body", "respond (body)"),
    ("tags", "tags"),
    ("route", "route"),
    ("budget", "admit + settle (budget)"),
    ("send", "forward (send, upstream)"),
    ("upstream", "forward (send, upstream)"),
    ("answer", "observe + meter"),
    ("meter", "observe + meter"),
    ("tokens", "observe + meter"),
    ("record", "record + settle"),
    ("ledger", "ledger (writer thread)"),
    ("metrics", "metrics"),
    ("pipeline", "pipeline"),
    ("tasks", "tasks"),
    ("clock", "clock"),
]
CRATE_STAGE = {
    "hyper": "HTTP/1 (hyper, both sides)",
    "hyper_util": "HTTP/1 (hyper, both sides)",
    "httparse": "HTTP/1 (hyper, both sides)",
    "http": "HTTP/1 (hyper, both sides)",
    "http_body_util": "HTTP/1 (hyper, both sides)",
    "tokio": "runtime (tokio)",
    "tokio_util": "runtime (tokio)",
    "mio": "runtime (tokio)",
    "serde_json": "parse (api)",
    "rusqlite": "ledger (writer thread)",
    "libsqlite3_sys": "ledger (writer thread)",
    "metrics": "metrics",
    "metrics_exporter_prometheus": "metrics",
    "quanta": "metrics",
    "tiktoken_rs": "observe + meter",
    "sha2": "auth",
    "tower": "accept, ids, limits",
    "tracing": "logging",
    "tracing_subscriber": "logging",
}

# "  1,234 (12.3%)  file:function [object]" or "  1,234  file:function [object]"
LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?(.+?):(.+?)(?:\s+\[(.*)\])?\s*$")
SYMBOL_MODULE = re.compile(r"tollgate::([a-z_0-9]+)")
REGISTRY_CRATE = re.compile(r"index\.crates\.io-[0-9a-f]+/([a-z_0-9-]+?)-\d+\.\d+")
CRATE = re.compile(r"^[<&\s]*(?:dyn\s+)?([a-z_][a-z_0-9]*)::")


def stage_of(path, func, obj):
    m = SYMBOL_MODULE.search(func)
    if m:
        for module, stage in MODULE_STAGE:
            if m.group(1) == module:
                return stage
        return "other (tollgate)"
    if obj and "libc.so" in obj:
        if "malloc" in path or "free" in func:
            return "allocator (malloc, free)"
        if "memmove" in path or "memcpy" in path or "memset" in path or "memcmp" in path:
            return "copies (memcpy, memcmp)"
        return "libc (syscalls, clocks)"
    if "libsqlite3-sys" in path:
        return "ledger (writer thread)"
    m = REGISTRY_CRATE.search(path)
    if m and m.group(1).replace("-", "_") in CRATE_STAGE:
        return CRATE_STAGE[m.group(1).replace("-", "_")]
    m = CRATE.match(func)
    if m and m.group(1) in CRATE_STAGE:
        return CRATE_STAGE[m.group(1)]
    if m and m.group(1) in ("alloc", "core", "std"):
        return "std (not inlined)"
    return "other"


def profile(path):
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    costs = Counter()
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        costs[stage_of(m.group(2), m.group(3), m.group(4))] += int(m.group(1).replace(",", ""))
    return costs


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    short, n_short, long_, n_long = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    a, b = profile(short), profile(long_)
    n = n_long - n_short
    rows = sorted(((b[k] - a[k]) / n, k) for k in set(a) | set(b))
    total = sum(v for v, _ in rows)
    print(f"| stage | instructions per request | share |")
    print(f"|---|---:|---:|")
    for v, k in reversed(rows):
        if abs(v) >= 50:
            print(f"| {k} | {v / 1000:.1f}k | {100 * v / total:.0f} % |")
    print(f"| **whole process** | **{total / 1000:.1f}k** | |")


if __name__ == "__main__":
    main()
