#!/usr/bin/env bash
# Opens the FinOps console (GET /dashboard) in the system's headless Chromium and checks that
# every panel rendered its data; tests/dashboard.rs runs it against a gateway it started.
#
#   scripts/dashboard-browser.sh URL KEY OUTDIR   check the page, screenshots into OUTDIR
#   scripts/dashboard-browser.sh --setup          only install the pinned driver (CI does this)
#
# The driver is npm's `playwright-core` at the pinned version below (the newest that runs on
# Debian 12's Node 18), installed once into
# ${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/playwright-core-VERSION with scripts disabled:
# playwright-core downloads no browser, and the check launches the Debian package's
# /usr/bin/chromium (TOLLGATE_CHROMIUM overrides), never a downloaded one.
#
# Exit status: 0 every panel rendered (or the driver is ready, --setup); 1 a check failed;
# 2 usage; 3 no node, npm or chromium, or the package cannot be installed (tests/dashboard.rs
# turns that into a skip unless CI is set).
set -euo pipefail

VERSION=1.60.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${TOLLGATE_CACHE:-$HOME/.cache/tollgate}/playwright-core-$VERSION"
chromium="${TOLLGATE_CHROMIUM:-/usr/bin/chromium}"

usage() {
  echo "usage: $0 URL KEY OUTDIR | --setup" >&2
  exit 2
}
cannot() {
  echo "dashboard-browser: $*" >&2
  exit 3
}

command -v node >/dev/null || cannot "node is not installed (Debian: apt-get install nodejs npm)"
[ -x "$chromium" ] || cannot "$chromium is not there (Debian: apt-get install chromium)"

setup() {
  [ -f "$dir/node_modules/playwright-core/package.json" ] && return 0
  command -v npm >/dev/null || cannot "npm is not installed (Debian: apt-get install npm)"
  mkdir -p "$dir"
  # --ignore-scripts and the skip variable: nothing but the package itself is fetched.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$dir" --no-audit --no-fund \
    --ignore-scripts --save-exact "playwright-core@$VERSION" >&2 ||
    { rm -rf "$dir"; cannot "npm could not install playwright-core@$VERSION"; }
}

case "${1:-}" in
  --setup) [ $# -eq 1 ] || usage; setup; exit 0 ;;
  -*|"") usage ;;
esac
[ $# -eq 3 ] || usage
setup
mkdir -p "$3"
NODE_PATH="$dir/node_modules" TOLLGATE_CHROMIUM="$chromium" \
  exec node "$here/dashboard-check.js" "$1" "$2" "$3"
