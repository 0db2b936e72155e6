#!/usr/bin/env bash
# Validates a FOCUS CSV with the FinOps Foundation's own validator (PyPI `focus-validator`),
# against the FOCUS 1.2 rules the package ships (`--block-download`: nothing is fetched at
# run time), for the CostAndUsage dataset.
#
#   scripts/focus-validator.sh FILE.csv    validate; prints the counts, exits 1 on a failed rule
#   scripts/focus-validator.sh --setup     only make the cached venv (CI does this before the tests)
#
# The venv lives in ${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/focus-validator-2.2.1 and is made
# once, with the exact versions of scripts/focus-validator.requirements.txt; it is remade when
# that file changes. The package needs Python >= 3.12: `TOLLGATE_FOCUS_PYTHON`, else
# python3.12, python3.13 or python3 on PATH, else ~/.pyenv/versions/3.1[23]*.
#
# Exit status: 0 every rule passed, but for alternatives of an OR rule that passed (see below),
# or the venv is ready (--setup); 1 a rule failed or the validator did not report; 2 usage; 3 the venv cannot be made (no Python >= 3.12, no
# package index), which tests/focus.rs turns into a skip unless CI is set.
set -euo pipefail

VERSION=2.2.1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/focus-validator.requirements.txt"
venv="${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/focus-validator-$VERSION"

usage() {
  echo "usage: $0 FILE.csv | --setup" >&2
  exit 2
}
cannot() {
  echo "focus-validator: $*" >&2
  exit 3
}

[ $# -eq 1 ] || usage
case "$1" in
  --setup) csv= ;;
  -*) usage ;;
  *)
    [ -f "$1" ] || { echo "focus-validator: no such file: $1" >&2; exit 2; }
    csv="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    ;;
esac

# A Python that is really >= 3.12 and can make a venv. pyenv's shims for versions that are
# not selected exist on PATH but fail, so every candidate is run, not just found.
find_python() {
  local c
  for c in ${TOLLGATE_FOCUS_PYTHON:-} python3.12 python3.13 python3 \
    "$HOME"/.pyenv/versions/3.1[23]*/bin/python3.1[23]; do
    if "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$c" 2>/dev/null || echo "$c"
      return 0
    fi
  done
  return 1
}

# What the venv was made from: remade when the pins change.
stamp="$(sha256sum "$requirements" | cut -c1-16)"

setup() {
  if [ "$(cat "$venv/.tollgate-ready" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  local python
  python="$(find_python)" ||
    cannot "needs Python >= 3.12 (python3.12 or python3.13 on PATH, or under ~/.pyenv/versions); set TOLLGATE_FOCUS_PYTHON to one"
  echo "focus-validator: making $venv with $("$python" --version 2>&1) ($python)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv" || cannot "\`$python -m venv $venv\` failed"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements" ||
    cannot "pip could not install $requirements (no package index reachable?)"
  "$venv/bin/python" -c 'import focus_validator.main, numpy, pyarrow, polars, duckdb' ||
    cannot "the installed validator does not import"
  # Its own logging config writes a rotating debug log into the working directory; this
  # one keeps warnings and errors on stderr instead.
  cat >"$venv/logging.yaml" <<'EOF'
version: 1
disable_existing_loggers: false
handlers:
  stderr: { class: logging.StreamHandler, stream: ext://sys.stderr, level: WARNING }
root: { level: WARNING, handlers: [stderr] }
EOF
  echo "$stamp" >"$venv/.tollgate-ready"
}

# Two test processes may want the venv at once: one makes it, the other waits.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
setup
flock -u 9

[ -n "$csv" ] || { echo "focus-validator $VERSION ready in $venv"; exit 0; }

# The validator must run from the directory that holds the `focus_validator` package: it
# opens focus_validator/rules/currency_codes.csv relative to the working directory.
site="$("$venv/bin/python" -c 'import focus_validator, os; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))')"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
(cd "$site" && LOGGING_CONFIG="$venv/logging.yaml" "$venv/bin/focus-validator" \
  --data-file "$csv" --validate-version 1.2 --block-download --focus-dataset CostAndUsage \
  --show-violations) >"$out" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
  cat "$out"
  echo "focus-validator: exited with $status" >&2
  exit 1
fi

# The validator exits 0 whatever the rules say: its per-rule lines are the verdict. It counts
# every rule on its own, the alternatives of an OR rule included, and FOCUS 1.2's model has
# one OR whose alternatives carry no condition: InvoiceId-C-003-C, "InvoiceId is null when the
# charge is on no invoice (C-004-C), not null when it is on one (C-005-C)". Any dataset fails
# one alternative of it on every row while the OR itself passes. So a failed rule counts as
# a failure unless it is an alternative of an OR rule that passed; such rules are listed.
"$venv/bin/python" - "$out" "$site" <<'PY' || status=$?
import glob, json, re, sys

out, site = sys.argv[1], sys.argv[2]
text = open(out, encoding="utf-8", errors="replace").read()
summary = re.search(r"^Total: (\d+) \| Pass: (\d+) \| Fail: (\d+) \| Skipped: (\d+)$", text, re.M)
status = dict(re.findall(r"^\S+ ([A-Za-z0-9-]+): (PASS|FAIL|SKIPPED)\b", text, re.M))
if not summary or not status:
    print(text)
    print("focus-validator: no results in its output", file=sys.stderr)
    sys.exit(1)
total, passed, failed, skipped = map(int, summary.groups())

# The model it ran: the highest 1.2.x it ships, as it picks it.
models = glob.glob(f"{site}/focus_validator/rules/model-1.2*.json")
model = max(models, key=lambda p: [int(x) for x in re.findall(r"\d+", p.rsplit("model-", 1)[1])])
rules = json.load(open(model))["ModelRules"]
or_parents = {}
for rule_id, rule in rules.items():
    req = (rule.get("ValidationCriteria") or {}).get("Requirement") or {}
    if req.get("CheckFunction") == "OR":
        for item in req.get("Items", []):
            if item.get("ModelRuleId"):
                or_parents.setdefault(item["ModelRuleId"], []).append(rule_id)

alternatives, real = [], []
for rule_id, s in sorted(status.items()):
    if s != "FAIL":
        continue
    held = [p for p in or_parents.get(rule_id, []) if status.get(p) == "PASS"]
    (alternatives if held else real).append((rule_id, held))

if real:
    print(text[text.find("--- Failures ---"):] if "--- Failures ---" in text else text)
for rule_id, held in alternatives:
    print(f"{rule_id} failed as one alternative of {', '.join(held)} (OR), which passed")
print(
    f"focus-validator 2.2.1, FOCUS 1.2 CostAndUsage: {passed} rules passed, {failed} failed "
    f"({len(alternatives)} of them alternatives of an OR that passed), {skipped} skipped "
    f"(not applicable) of {total}"
)
print(f"{passed} passed, {len(real)} failed")
sys.exit(1 if real else 0)
PY
exit "$status"
