#!/usr/bin/env bash
# Validates a FOCUS CSV with the FinOps Foundation's own validator (PyPI `focus-validator`),
# against the FOCUS 1.2 rules the package ships (`--block-download`: nothing is fetched at
# run time), for the CostAndUsage dataset.
#
#   scripts/focus-validator.sh FILE.csv    validate; prints the counts, exits 1 on any failed rule
#   scripts/focus-validator.sh --setup     only make the cached venv (CI does this before the tests)
#
# The venv lives in ${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/focus-validator-2.2.1 and is made
# once, with the exact versions of scripts/focus-validator.requirements.txt; it is remade when
# that file changes. The package needs Python >= 3.12: `TOLLGATE_FOCUS_PYTHON`, else
# python3.12, python3.13 or python3 on PATH, else ~/.pyenv/versions/3.1[23]*.
#
# Exit status: 0 every rule passed (or the venv is ready, with --setup); 1 a rule failed or
# the validator did not report; 2 usage; 3 the venv cannot be made (no Python >= 3.12, no
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

# The validator exits 0 whatever the rules say; its summary line is the verdict:
#   Total: 578 | Pass: 73 | Fail: 64 | Skipped: 441
summary="$(grep -E '^Total: [0-9]+ \| Pass: [0-9]+ \| Fail: [0-9]+ \| Skipped: [0-9]+$' "$out" || true)"
if [ "$status" -ne 0 ] || [ -z "$summary" ]; then
  cat "$out"
  echo "focus-validator: did not report (exit $status)" >&2
  exit 1
fi
pass="$(sed -E 's/.*Pass: ([0-9]+).*/\1/' <<<"$summary")"
fail="$(sed -E 's/.*Fail: ([0-9]+).*/\1/' <<<"$summary")"
skipped="$(sed -E 's/.*Skipped: ([0-9]+).*/\1/' <<<"$summary")"
if [ "$fail" -ne 0 ]; then
  # The failures, with the rule each one breaks and sample rows.
  sed -n '/^--- Failures ---$/,$p' "$out"
fi
echo "FOCUS 1.2 CostAndUsage, focus-validator $VERSION: $pass passed, $fail failed, $skipped skipped (not applicable)"
[ "$fail" -eq 0 ]
