#!/usr/bin/env python3
"""Generate config/prices.toml, Tollgate's catalog of commercial model prices.

Source: LiteLLM's model_prices_and_context_window.json (MIT License, Copyright (c) 2023
Berri AI), saved as ../shared/data/model_prices.json (see ../shared/data/README.md).
Python 3.11+, standard library only.

Usage (from the repo root):
    python3 scripts/gen_prices.py [CATALOG] [--today YYYY-MM-DD] [--out PATH|-]
    python3 scripts/gen_prices.py --check [CATALOG]

CATALOG defaults to ../shared/data/model_prices.json relative to the repo root (not to the
working directory); --out defaults to config/prices.toml in the repo.

--check regenerates into memory and compares with the existing file byte for byte: exit 0
if identical, 1 if it differs or is missing (a unified diff goes to stderr). So that the
check does not go stale on its own every day, it uses the `generated` date recorded in the
existing file (not today) unless --today is given; it only warns about kept models whose
deprecation date has passed since then.

Selection rules
- Providers: only first-party APIs, by `litellm_provider`: openai, text-completion-openai
  (written as provider "openai"; `mode` says "completion"), anthropic, mistral, gemini
  (Google's Gemini API; vertex_ai-* entries are Google Cloud and are not kept).
- Modes: chat, completion, embedding. (OpenAI "responses"-only models such as o3-pro and
  gpt-5.x-pro/codex are therefore not in the file, nor image/audio/realtime/... models.)
- Dropped: fine-tune templates (ids starting "ft:"); entries without input_cost_per_token;
  entries without output_cost_per_token, except embedding models, which produce no output
  tokens (their output price is written only when the catalog gives one); entries whose
  deprecation_date is strictly before the generation date (a model retiring on the
  generation date itself is kept).
- Model id: the key with a leading first-party provider prefix removed ("mistral/",
  "gemini/", "anthropic/", "openai/", "text-completion-openai/"), i.e. the id the
  provider's own API expects.
- Collisions (two kept entries with the same id after stripping):
  1. Only first-party entries are ever candidates, so a first-party entry always wins over
     a reseller/cloud entry with the same id (e.g. "gemini/gemini-2.5-pro" [gemini] is kept,
     the bare "gemini-2.5-pro" [vertex_ai-language-models] never competes).
  2. Between entries of the same provider, the key spelled "<provider>/<id>" wins over the
     bare "<id>": the prefixed key is LiteLLM's explicit entry for that provider's API
     (for Google, LiteLLM routes a bare "gemini-*" id to Vertex AI).
  3. Still tied: the lexicographically smallest catalog key wins (deterministic).
  Entries of two *different* first-party providers colliding is an error: the id would
  name two different APIs and needs a human decision.

Fields (all prices in USD per 1M tokens = catalog per-token cost x 1e6, computed in decimal
arithmetic from the catalog's text and rounded to at most 6 significant digits, so 1.5e-07
becomes 0.15 and never 0.15000000000000002). A field the catalog does not give is omitted,
never written as 0; a 0 is written only when the catalog says 0.
  input_usd_per_mtok          input_cost_per_token
  output_usd_per_mtok         output_cost_per_token
  cached_input_usd_per_mtok   cache_read_input_token_cost
  cache_write_usd_per_mtok    cache_creation_input_token_cost (Anthropic 5-minute TTL)
  cache_write_1h_usd_per_mtok cache_creation_input_token_cost_above_1hr (Anthropic 1-hour TTL)
  context_window              max_input_tokens (the legacy, ambiguous max_tokens is ignored)
  max_output_tokens           max_output_tokens
  deprecation_date            deprecation_date (a date on or after the generation date)
  features                    "tools" (supports_function_calling), "vision" (supports_vision),
                              "json" (supports_response_schema), in that order; omitted if none
  long_context                from the `<price>_above_<N>k_tokens` fields, where <price> is
                              input_cost_per_token, output_cost_per_token,
                              cache_read_input_token_cost or cache_creation_input_token_cost
                              and nothing follows "_tokens" (the _batches/_priority/_flex/...
                              service-tier variants and the cache_creation ..._above_1hr /
                              _above_12hr TTL variants are not tiers: the 1-hour one is
                              cache_write_1h_usd_per_mtok above, the others are ignored).
                              threshold_tokens = N * 1000. If several thresholds exist, the
                              lowest one is used (it is the first tier a request crosses) and
                              the higher ones are dropped. Once a request's prompt (uncached +
                              cached + cache-write tokens) exceeds threshold_tokens, the tier's
                              prices apply to the whole request; a price the tier does not
                              list stays at the base price.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import hashlib
import json
import os
import re
import sys
import tomllib
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = REPO / ".." / "shared" / "data" / "model_prices.json"
DEFAULT_OUT = REPO / "config" / "prices.toml"

# sha256 of known catalog files -> the litellm release they come from. A catalog not listed
# here needs --catalog-version, so a new file is never labelled with an old version.
KNOWN_CATALOGS = {
    "8f8060d8ce7a40c91b995c74d6a27657543d49e3c1c53430dabd556f244392c6": "1.109.1",
}

# litellm_provider -> provider written to prices.toml
PROVIDERS = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "mistral": "mistral",
    "gemini": "gemini",
}
MODES = ("chat", "completion", "embedding")
PREFIXES = tuple(f"{p}/" for p in sorted(PROVIDERS, key=len, reverse=True))

# (catalog field, prices.toml field), in output order
PRICE_FIELDS = (
    ("input_cost_per_token", "input_usd_per_mtok"),
    ("output_cost_per_token", "output_usd_per_mtok"),
    ("cache_read_input_token_cost", "cached_input_usd_per_mtok"),
    ("cache_creation_input_token_cost", "cache_write_usd_per_mtok"),
    ("cache_creation_input_token_cost_above_1hr", "cache_write_1h_usd_per_mtok"),
)
TIER_RE = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost)_above_(\d+)k_tokens$"
)
FEATURES = (
    ("supports_function_calling", "tools"),
    ("supports_vision", "vision"),
    ("supports_response_schema", "json"),
)


class CatalogError(Exception):
    pass


def usd_per_mtok(key: str, field: str, value) -> str:
    """Per-token cost -> TOML float text in USD per 1M tokens, <= 6 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CatalogError(f"{key}: {field} is not a number: {value!r}")
    # repr() gives the shortest text that round-trips, i.e. what the JSON file says.
    d = Decimal(repr(value) if isinstance(value, float) else value)
    if not d.is_finite() or d < 0:
        raise CatalogError(f"{key}: {field} is not a finite non-negative number: {value!r}")
    d = d.scaleb(6)
    if d == 0:
        return "0.0"
    d = d.quantize(Decimal(1).scaleb(d.adjusted() - 5), rounding=ROUND_HALF_EVEN)
    s = format(d.normalize(), "f")
    return s if "." in s else s + ".0"


def token_count(key: str, field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CatalogError(f"{key}: {field} is not a number: {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise CatalogError(f"{key}: {field} is not a whole number: {value!r}")
    if value <= 0:
        raise CatalogError(f"{key}: {field} is not positive: {value!r}")
    return int(value)


def toml_str(s: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX ...) are all valid in a TOML basic string.
    return json.dumps(s, ensure_ascii=True)


def bare_id(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def select(catalog: dict, today: dt.date, stats: dict) -> dict[str, tuple[str, dict]]:
    """Return {model id: (catalog key, entry)} after filtering and collision resolution."""
    candidates: dict[str, list[tuple[str, dict]]] = {}
    for key, entry in catalog.items():
        if key == "sample_spec" or not isinstance(entry, dict):
            continue
        if entry.get("litellm_provider") not in PROVIDERS:
            continue
        mode = entry.get("mode")
        if mode not in MODES:
            stats["other mode"] = stats.get("other mode", 0) + 1
            continue
        mid = bare_id(key)
        if key.startswith("ft:") or mid.startswith("ft:"):
            stats["fine-tune template"] = stats.get("fine-tune template", 0) + 1
            continue
        if "input_cost_per_token" not in entry or (
            "output_cost_per_token" not in entry and mode != "embedding"
        ):
            stats["no input/output price"] = stats.get("no input/output price", 0) + 1
            continue
        dep = entry.get("deprecation_date")
        if dep is not None:
            try:
                dep_date = dt.date.fromisoformat(str(dep))
            except ValueError:
                raise CatalogError(f"{key}: deprecation_date is not YYYY-MM-DD: {dep!r}")
            if dep_date < today:
                stats["deprecated"] = stats.get("deprecated", 0) + 1
                continue
        candidates.setdefault(mid, []).append((key, entry))

    chosen: dict[str, tuple[str, dict]] = {}
    for mid, group in candidates.items():
        providers = {PROVIDERS[e["litellm_provider"]] for _, e in group}
        if len(providers) > 1:
            keys = ", ".join(f"{k} [{e['litellm_provider']}]" for k, e in group)
            raise CatalogError(f"model id {mid!r} is claimed by several providers: {keys}")

        def rank(item):
            key, entry = item
            own_prefix = key.startswith(entry["litellm_provider"] + "/")
            return (0 if own_prefix else 1, key)

        group.sort(key=rank)
        chosen[mid] = group[0]
        if len(group) > 1:
            stats["collision loser"] = stats.get("collision loser", 0) + len(group) - 1
            stats.setdefault("_collisions", []).append((mid, [k for k, _ in group]))
    return chosen


def long_context(key: str, entry: dict) -> str | None:
    tiers: dict[int, dict[str, object]] = {}
    for field, value in entry.items():
        m = TIER_RE.match(field)
        if m:
            tiers.setdefault(int(m.group(2)), {})[m.group(1)] = value
    if not tiers:
        return None
    n = min(tiers)
    tier = tiers[n]
    parts = [f"threshold_tokens = {n * 1000}"]
    for cat_field, out_field in PRICE_FIELDS:
        if cat_field in tier:
            price = usd_per_mtok(key, f"{cat_field}_above_{n}k_tokens", tier[cat_field])
            parts.append(f"{out_field} = {price}")
    return "{ " + ", ".join(parts) + " }"


def model_table(mid: str, key: str, entry: dict) -> list[str]:
    lines = [
        f"[models.{toml_str(mid)}]",
        f"provider = {toml_str(PROVIDERS[entry['litellm_provider']])}",
        f"mode = {toml_str(entry['mode'])}",
    ]
    for cat_field, out_field in PRICE_FIELDS:
        if cat_field in entry:
            lines.append(f"{out_field} = {usd_per_mtok(key, cat_field, entry[cat_field])}")
    if "max_input_tokens" in entry:
        lines.append(f"context_window = {token_count(key, 'max_input_tokens', entry['max_input_tokens'])}")
    if "max_output_tokens" in entry:
        lines.append(f"max_output_tokens = {token_count(key, 'max_output_tokens', entry['max_output_tokens'])}")
    lc = long_context(key, entry)
    if lc:
        lines.append(f"long_context = {lc}")
    if "deprecation_date" in entry:
        lines.append(f"deprecation_date = {toml_str(str(entry['deprecation_date']))}")
    feats = [name for flag, name in FEATURES if entry.get(flag) is True]
    if feats:
        lines.append("features = [" + ", ".join(toml_str(f) for f in feats) + "]")
    return lines


def render(catalog_bytes: bytes, version: str, today: dt.date, stats: dict) -> str:
    try:
        catalog = json.loads(catalog_bytes)
    except json.JSONDecodeError as e:
        raise CatalogError(f"catalog is not valid JSON: {e}")
    if not isinstance(catalog, dict):
        raise CatalogError("catalog is not a JSON object")
    sha = hashlib.sha256(catalog_bytes).hexdigest()
    chosen = select(catalog, today, stats)

    out = [
        "# Generated by scripts/gen_prices.py from LiteLLM's model_prices_and_context_window.json",
        f"# (litellm {version}, MIT License, Copyright (c) 2023 Berri AI). Do not edit by hand:",
        "# override a price per backend in config/tollgate.toml, or regenerate this file.",
        "# Regenerate (repo root): python3 scripts/gen_prices.py [../shared/data/model_prices.json] [--today YYYY-MM-DD]",
        "# Check (CI):             python3 scripts/gen_prices.py --check",
        "#",
        "# Prices: USD per 1M tokens. An absent field is unknown or not applicable (embedding models",
        "# may have no output price); 0 appears only where the catalog says 0.",
        "# cached_input = prompt tokens read from the provider's cache; cache_write = prompt tokens",
        "# written to it (Anthropic, 5-minute TTL). long_context: once the prompt (uncached + cached +",
        "# cache-write tokens) exceeds threshold_tokens, its prices apply to the whole request; a price",
        "# it does not list stays at the base price. Selection and collision rules: see the script.",
        "",
        "[source]",
        'catalog = "litellm model_prices_and_context_window.json"',
        f"version = {toml_str(version)}",
        f"sha256 = {toml_str(sha)}",
        f"generated = {toml_str(today.isoformat())}",
        'license = "MIT, Copyright (c) 2023 Berri AI"',
    ]
    for mid in sorted(chosen):
        key, entry = chosen[mid]
        out.append("")
        out.extend(model_table(mid, key, entry))
    text = "\n".join(out) + "\n"

    # Self-check: the output is valid TOML and holds exactly the selected models.
    parsed = tomllib.loads(text)
    if sorted(parsed.get("models", {})) != sorted(chosen):
        raise CatalogError("internal error: generated TOML does not round-trip")
    stats["kept"] = len(chosen)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate config/prices.toml from LiteLLM's price catalog.")
    ap.add_argument("catalog", nargs="?", help=f"catalog JSON (default: {DEFAULT_CATALOG.resolve()})")
    ap.add_argument("--today", help="generation date YYYY-MM-DD (default: today; with --check: the file's `generated`)")
    ap.add_argument("--out", help=f"output path, or - for stdout (default: {DEFAULT_OUT})")
    ap.add_argument("--catalog-version", help="litellm release of the catalog (needed if its sha256 is not known)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the output file differs from a fresh generation")
    args = ap.parse_args(argv)

    catalog_path = Path(args.catalog) if args.catalog else DEFAULT_CATALOG.resolve()
    out_path = DEFAULT_OUT if args.out is None else (None if args.out == "-" else Path(args.out))
    if args.check and out_path is None:
        ap.error("--check needs a file, not --out -")

    try:
        catalog_bytes = catalog_path.read_bytes()
    except OSError as e:
        print(f"gen_prices: cannot read catalog: {e}", file=sys.stderr)
        return 2
    sha = hashlib.sha256(catalog_bytes).hexdigest()

    existing_text = None
    existing_source: dict = {}
    if args.check:
        try:
            existing_text = out_path.read_text(encoding="utf-8")
            existing_source = tomllib.loads(existing_text).get("source", {})
        except FileNotFoundError:
            print(f"gen_prices: {out_path} does not exist; run scripts/gen_prices.py", file=sys.stderr)
            return 1
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            print(f"gen_prices: {out_path} is unreadable ({e}); regenerate it", file=sys.stderr)
            return 1

    try:
        if args.today:
            today = dt.date.fromisoformat(args.today)
        elif args.check and isinstance(existing_source.get("generated"), str):
            today = dt.date.fromisoformat(existing_source["generated"])
        else:
            today = dt.date.today()
    except ValueError as e:
        ap.error(f"bad date: {e}")

    version = args.catalog_version or KNOWN_CATALOGS.get(sha)
    if version is None and args.check and isinstance(existing_source.get("version"), str):
        version = existing_source["version"]
    if version is None:
        print(
            f"gen_prices: unknown catalog (sha256 {sha}); pass --catalog-version X.Y.Z "
            "and add it to KNOWN_CATALOGS",
            file=sys.stderr,
        )
        return 2

    stats: dict = {}
    try:
        text = render(catalog_bytes, version, today, stats)
    except CatalogError as e:
        print(f"gen_prices: {e}", file=sys.stderr)
        return 2

    if args.check:
        if text == existing_text:
            passed = [
                mid
                for mid, m in tomllib.loads(text).get("models", {}).items()
                if "deprecation_date" in m and dt.date.fromisoformat(m["deprecation_date"]) < dt.date.today()
            ]
            if passed:
                print(
                    f"gen_prices: note: {len(passed)} model(s) are now past their deprecation date "
                    f"({', '.join(sorted(passed))}); regenerate to drop them",
                    file=sys.stderr,
                )
            print(f"gen_prices: {out_path} is up to date ({stats['kept']} models)", file=sys.stderr)
            return 0
        diff = difflib.unified_diff(
            existing_text.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=f"{out_path} (on disk)",
            tofile=f"{out_path} (generated {today.isoformat()})",
        )
        sys.stderr.writelines(list(diff)[:200])
        print(
            f"\ngen_prices: {out_path} is stale or edited by hand; run: python3 scripts/gen_prices.py",
            file=sys.stderr,
        )
        return 1

    if out_path is None:
        sys.stdout.write(text)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, out_path)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if not k.startswith("_") and k != "kept")
    print(f"gen_prices: {stats['kept']} models written to {out_path or 'stdout'} (dropped: {dropped})", file=sys.stderr)
    for mid, keys in stats.get("_collisions", []):
        print(f"gen_prices: collision {mid!r}: kept {keys[0]}, dropped {', '.join(keys[1:])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
