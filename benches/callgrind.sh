#!/usr/bin/env bash
# Instructions per request on the gateway's request path, counted by callgrind: the same
# figure for the same binary and inputs whatever else the machine is doing, so two builds can
# be compared on a busy 2-core machine where the load test's ratios move by a fifth.
#
#   bash benches/callgrind.sh                 # 1 KB and 8 KB chat bodies, target/release
#   BIN=/path/to/release SIZES="8192 stream" bash benches/callgrind.sh
#
# A size of `stream` sends the load test's streaming chat body (64-token SSE answers).
# TOOL=dhat runs the gateway under DHAT instead and prints its allocation totals (blocks and
# bytes for the whole process, start-up included); benches/stages.sh takes the difference of
# two runs to get the figures per request.
#
# The simulator (unpaced, 64 tokens) runs natively; `tollgate serve` runs under callgrind;
# tollgate-loadgen sends REQUESTS requests (default 1000) at 100 req/s on 4 connections. The
# inclusive count of the gateway's request future (`Gateway::call`'s closure) divided by the
# requests is printed per body size, with the top functions of that path in OUT/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
SIZES=${SIZES:-"1024 8192"}
REQUESTS=${REQUESTS:-1000}
OUT=${OUT:-$ROOT/bench-out/callgrind}
PORT_BASE=${PORT_BASE:-18200}
SIM_PORT=$((PORT_BASE + 1)) GW_PORT=$((PORT_BASE + 2)) ADMIN_PORT=$((PORT_BASE + 3))
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/tollgate-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2; return 1
}

"$BIN/tollgate" simulate --port "$SIM_PORT" --token-ms 0 --tokens 64 2>"$WORK/sim.log" &
PIDS+=($!)
KEYGEN=$("$BIN/tollgate" key new --team bench)
KEY=$(awk '/^key:/ {print $2}' <<<"$KEYGEN")
HASH=$(awk '/^hash:/ {print $2}' <<<"$KEYGEN")
cat >"$WORK/tollgate.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"

[store]
ledger = "sqlite://$WORK/tollgate.db"

[[backend]]
name = "sim"
url = "http://127.0.0.1:$SIM_PORT"
hosting = "self_hosted"
models = [{ name = "bench-model" }]

[[team]]
name = "bench"
keys = ["$HASH"]
EOF

for size in $SIZES; do
    text=$(awk -v n="${size//[!0-9]/}" 'BEGIN { w = "the quick brown fox jumps over the lazy dog "
        while (length(s) < n) s = s w; printf "%s", substr(s, 1, n) }')
    stream=()
    if [ "$size" = stream ]; then
        printf '%s' '{"model":"bench-model","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me about gateways."}]}' >"$WORK/body.json"
        stream=(--stream)
    else
        printf '{"model":"bench-model","max_tokens":256,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"%s"}]}' \
            "$text" >"$WORK/body.json"
    fi
    rm -f "$WORK/tollgate.db"*
    if [ "${TOOL:-callgrind}" = dhat ]; then
        tool=(--tool=dhat --dhat-out-file="$OUT/dhat.$size.json")
    else
        tool=(--tool=callgrind --callgrind-out-file="$OUT/callgrind.$size.out")
    fi
    valgrind "${tool[@]}" \
        "$BIN/tollgate" serve --config "$WORK/tollgate.toml" 2>"$WORK/gateway.$size.log" &
    GW=$!
    PIDS+=("$GW")
    wait_port "$GW_PORT"
    wait_port "$SIM_PORT"
    "$BIN/tollgate-loadgen" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" \
        --body "$WORK/body.json" -H "authorization: Bearer $KEY" \
        --rate 100 --duration "$(awk -v r="$REQUESTS" 'BEGIN { print r / 100 }')" \
        --connections 4 "${stream[@]}" >"$WORK/loadgen.$size.json"
    kill -TERM "$GW"
    wait "$GW" 2>/dev/null || true
    ok=$(sed -n 's/.*"requests":\([0-9]*\).*/\1/p' "$WORK/loadgen.$size.json")
    if [ "${TOOL:-callgrind}" = dhat ]; then
        # "==pid== Total:     123 bytes in 4 blocks"
        read -r bytes blocks < <(sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 \2/p' \
            "$WORK/gateway.$size.log" | tr -d ,)
        printf '%6s B body: %s requests ok; allocations %s blocks, %s bytes (process total)\n' \
            "$size" "${ok:-?}" "${blocks:-?}" "${bytes:-?}"
        continue
    fi
    callgrind_annotate --inclusive=yes "$OUT/callgrind.$size.out" >"$OUT/inclusive.$size.txt" 2>/dev/null
    path=$(awk '/Gateway.*call.*closure/ { gsub(",", "", $1); print $1; exit }' "$OUT/inclusive.$size.txt")
    total=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$OUT/inclusive.$size.txt")
    printf '%6s B body: %s requests ok; request path %s instructions per request; process total %s\n' \
        "$size" "${ok:-?}" "$(awk -v p="${path:-0}" -v n="${ok:-1}" 'BEGIN { printf "%.1fk", p / n / 1000 }')" \
        "$(awk -v t="${total:-0}" 'BEGIN { printf "%.1fM", t / 1e6 }')"
done
