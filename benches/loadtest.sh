#!/usr/bin/env bash
# The load test of docs/PERFORMANCE.md: the simulator direct, nginx in front of it, and the
# gateway in front of it, measured in one run on loopback.
#
#   bash benches/loadtest.sh            # 4-8 minutes; results in bench-out/results.md
#
# Environment knobs:
#   DURATION    seconds per measurement (default 10); WARMUP (default 2)
#   QUIET_WAIT  seconds the script may wait, in all, for other processes to leave the CPUs
#               (default 180); runs during which others took > 0.1 core are repeated, then marked
#   SKIP_BUILD=1  use the binaries in target/release
#   BIN=DIR     use tollgate and tollgate-loadgen from DIR (say, a build of a given commit)
#   STRACE=0    skip the syscall counts
#   PIN=1       pin the load generator to the last CPU with taskset (off by default, see
#               docs/PERFORMANCE.md)
#   NICE        niceness of every process started here: -10 by default as root, so a build
#               running beside the test takes less from it, equally for all three targets
#   PORT_BASE   ports used: PORT_BASE+1, +2, +80, +82, +90, +91 (default 18000)
#   KEEP_WORK=1 keep the temp dir (configs, bodies, logs)
#   SECTIONS    which numbered sections below to run (default "1 2 3 4 5 6"), e.g. SECTIONS="2 3"
#               to compare two builds on throughput and latency alone; the others' rows stay empty
#   STORE=redis the gateway keeps its team's budgets in Redis (fleet mode): REDIS_URL, default
#               redis://127.0.0.1:6379/0, under a key prefix of this run's own, deleted at exit;
#               the team gets day and month budgets far above what the run spends, so every
#               request is admitted and settled through the Redis scripts
#   LEDGER=URL  the gateway's ledger (default: a SQLite file in the temp dir), e.g.
#               postgres://postgres@127.0.0.1/test for the fleet's PostgreSQL ledger
#
# What runs:
#   sim        tollgate simulate, unpaced (--token-ms 0), 64 tokens an answer
#   sim-paced  tollgate simulate --token-ms 50 --tokens 400: streams that stay open ~20 s
#   nginx      plain reverse proxy to both (benches/nginx.conf.template), own prefix dir
#   gateway    tollgate serve, one backend per simulator, one team key
#   loadgen    target/release/tollgate-loadgen (benches/loadgen.rs)
# Every process is started by this script as a background job and stopped by its pid on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/bench-out
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PORT_BASE=${PORT_BASE:-18000}
SIM_PORT=$((PORT_BASE + 1))
SLOW_PORT=$((PORT_BASE + 2))
NGINX_PORT=$((PORT_BASE + 80))
NGINX_SLOW_PORT=$((PORT_BASE + 82))
GW_PORT=$((PORT_BASE + 90))
GW_ADMIN_PORT=$((PORT_BASE + 91))
CLK_TCK=$(getconf CLK_TCK)
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/tollgate-loadtest.XXXXXX)
PIDS=()

SECTIONS=" ${SECTIONS:-1 2 3 4 5 6} "
want() { [[ $SECTIONS == *" $1 "* ]]; }

log() { printf '[loadtest %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    cp "$WORK/gateway.log" "$OUT/gateway.log" 2>/dev/null || true
    cp "$WORK/nginx/error.log" "$OUT/nginx-error.log" 2>/dev/null || true
    if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
    if [ -n "${REDIS_PREFIX:-}" ] && command -v redis-cli >/dev/null; then
        redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_PREFIX}*" |
            xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null || true
    fi
}
trap cleanup EXIT

# Another load test (or anything else) on our ports would make every figure wrong.
for p in "$SIM_PORT" "$SLOW_PORT" "$NGINX_PORT" "$NGINX_SLOW_PORT" "$GW_PORT" "$GW_ADMIN_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        log "port $p is taken (another load test running?); set PORT_BASE or wait"
        exit 1
    fi
done

# --- tools -------------------------------------------------------------------------------
need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ "${STRACE:-1}" = 1 ]; then command -v strace >/dev/null || need_apt+=(strace); fi
command -v taskset >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${BIN:-}" ]; then
    log "building release binaries"
    cargo build --release --bins --quiet
fi
BIN=${BIN:-$ROOT/target/release}
TG=$BIN/tollgate
LG=$BIN/tollgate-loadgen
if [ "$(id -u)" = 0 ]; then NICE=${NICE:--10}; else NICE=${NICE:-0}; fi
RUN=(nice -n "$NICE")
LG_PREFIX=("${RUN[@]}")
if [ "${PIN:-0}" = 1 ]; then LG_PREFIX+=(taskset -c "$(($(nproc) - 1))"); fi

# --- helpers -----------------------------------------------------------------------------
# jget JSON FIELD: a number (or bare value) from a loadgen JSON line.
jget() { sed -n "s/.*\"$2\":\"\{0,1\}\([^,}\"]*\).*/\1/p" <<<"$1"; }
# CPU ticks (utime+stime) of the given pids, threads included.
ticks() {
    local t=0 p f
    for p in "$@"; do
        read -r -a f <"/proc/$p/stat"
        t=$((t + f[13] + f[14]))
    done
    echo "$t"
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
calc() { awk "BEGIN { printf \"%s\", ($*) }"; }
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "nothing listens on port $1"; return 1
}
loadgen() { "${LG_PREFIX[@]}" "$LG" "$@"; }

# --- request bodies ----------------------------------------------------------------------
prompt() { # a chat body whose message content is $1 bytes of words
    local text
    text=$(awk -v n="$1" 'BEGIN { w = "the quick brown fox jumps over the lazy dog "
        while (length(s) < n) s = s w; printf "%s", substr(s, 1, n) }')
    printf '{"model":"bench-model","max_tokens":256,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"%s"}]}' "$text"
}
prompt 1024 >"$WORK/chat-1k.json"
prompt 8192 >"$WORK/chat-8k.json"
printf '%s' '{"model":"bench-model","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me about gateways."}]}' >"$WORK/stream.json"
printf '%s' '{"model":"bench-paced","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a long story."}]}' >"$WORK/stream-paced.json"

# --- upstreams ---------------------------------------------------------------------------
log "work dir $WORK"
"${RUN[@]}" "$TG" simulate --port "$SIM_PORT" --token-ms 0 --tokens 64 --max-concurrency 1024 2>"$WORK/sim.log" &
SIM_PID=$!; PIDS+=("$SIM_PID")
"${RUN[@]}" "$TG" simulate --port "$SLOW_PORT" --token-ms 50 --tokens 400 --max-concurrency 1024 2>"$WORK/sim-paced.log" &
SLOW_PID=$!; PIDS+=("$SLOW_PID")

# --- nginx -------------------------------------------------------------------------------
NG=$WORK/nginx
mkdir -p "$NG"
sed -e "s|@PREFIX@|$NG|g" -e "s|@SIM_PORT@|$SIM_PORT|g" -e "s|@SLOW_PORT@|$SLOW_PORT|g" \
    -e "s|@NGINX_PORT@|$NGINX_PORT|g" -e "s|@NGINX_SLOW_PORT@|$NGINX_SLOW_PORT|g" \
    benches/nginx.conf.template >"$NG/nginx.conf"
"${RUN[@]}" "$NGINX" -p "$NG" -c "$NG/nginx.conf" -e "$NG/error.log" &
NGINX_PID=$!; PIDS+=("$NGINX_PID")

# --- gateway -----------------------------------------------------------------------------
KEYGEN=$("$TG" key new --team bench)
KEY=$(awk '/^key:/ {print $2}' <<<"$KEYGEN")
HASH=$(awk '/^hash:/ {print $2}' <<<"$KEYGEN")
STORE_LINES="" TEAM_LINES=""
if [ "${STORE:-local}" = redis ]; then
    REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
    REDIS_PREFIX="tollgate-loadtest-$$:"
    STORE_LINES="budgets = \"$REDIS_URL\"
redis_prefix = \"$REDIS_PREFIX\""
    # Budgets the run cannot reach: every request is admitted, through Redis, on both windows.
    TEAM_LINES='budgets = [{ window = "day", tokens = 100_000_000_000 }, { window = "month", usd = 10_000_000.0 }]'
fi
cat >"$WORK/tollgate.toml" <<EOF
# Generated by benches/loadtest.sh.
[server]
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:$GW_ADMIN_PORT"
max_in_flight = 65536

[store]
ledger = "${LEDGER:-sqlite://$WORK/tollgate.db}"
$STORE_LINES

[[backend]]
name = "sim"
url = "http://127.0.0.1:$SIM_PORT"
hosting = "self_hosted"
models = [{ name = "bench-model", aliases = ["bench"] }]

[[backend]]
name = "sim-paced"
url = "http://127.0.0.1:$SLOW_PORT"
hosting = "self_hosted"
models = [{ name = "bench-paced" }]

[[team]]
name = "bench"
keys = ["$HASH"]
$TEAM_LINES
EOF
"$TG" check --config "$WORK/tollgate.toml" >"$WORK/check.txt"
"${RUN[@]}" "$TG" serve --config "$WORK/tollgate.toml" 2>"$WORK/gateway.log" &
GW_PID=$!; PIDS+=("$GW_PID")

for p in "$SIM_PORT" "$SLOW_PORT" "$NGINX_PORT" "$NGINX_SLOW_PORT" "$GW_PORT"; do wait_port "$p"; done
mapfile -t NGINX_WORKERS < <(pgrep -P "$NGINX_PID")
log "sim $SIM_PID, sim-paced $SLOW_PID, nginx $NGINX_PID (workers ${NGINX_WORKERS[*]}), gateway $GW_PID"
AUTH=(-H "authorization: Bearer $KEY")

declare -A URL=(
    [direct]=http://127.0.0.1:$SIM_PORT/v1/chat/completions
    [nginx]=http://127.0.0.1:$NGINX_PORT/v1/chat/completions
    [gateway]=http://127.0.0.1:$GW_PORT/v1/chat/completions
)
declare -A PACED_URL=(
    [nginx]=http://127.0.0.1:$NGINX_SLOW_PORT/v1/chat/completions
    [gateway]=http://127.0.0.1:$GW_PORT/v1/chat/completions
)
# The process whose CPU a run is charged: the proxy, or for direct the simulator itself.
proc_pids() {
    case $1 in
        direct) echo "$SIM_PID" ;;
        nginx) echo "${NGINX_WORKERS[*]}" ;;
        gateway) echo "$GW_PID" ;;
    esac
}
TARGETS=(direct nginx gateway)
declare -A R # results: R[target.metric]

# Busy ticks of the whole machine (user+nice+system+irq+softirq: loopback networking runs in
# softirq, and this kernel charges that time to the processes too), and of every process
# this script started.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# With STORE=redis a local redis-server works for the gateway: its CPU is ours, not foreign,
# and is reported per request beside the gateway's.
REDIS_PID=""
if [ "${STORE:-local}" = redis ]; then
    REDIS_PID=$(redis-cli -u "$REDIS_URL" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
    [ -r "/proc/${REDIS_PID:-x}/stat" ] || REDIS_PID=""
fi
ours_ticks() { ticks "$SIM_PID" "$SLOW_PID" "$NGINX_PID" "${NGINX_WORKERS[@]}" "$GW_PID" $REDIS_PID; }
# Waits until the machine is idle: a build running beside the test would take CPU from
# whichever run it overlaps. The waits share one budget (QUIET_WAIT seconds, default 180)
# so the whole script stays bounded; past it, runs are measured as they come and marked.
WAIT_LEFT=${QUIET_WAIT:-180}
wait_quiet() {
    local m0 m1 said=0
    while ((WAIT_LEFT > 0)); do
        m0=$(machine_ticks); sleep 1; m1=$(machine_ticks)
        if (((m1 - m0) * 100 < CLK_TCK * 10)); then return 0; fi
        WAIT_LEFT=$((WAIT_LEFT - 1))
        ((said)) || log "waiting for a quiet machine ($(((m1 - m0) * 100 / CLK_TCK))% of a core busy; ${WAIT_LEFT} s of waiting left)"
        said=1
    done
}
FOREIGN_MAX=0 RETRIES=0 INTERFERED=0

# measure TARGET NAME LOADGEN-ARGS…: one loadgen run with CPU accounting; stores R[target.NAME.*].
# A run during which other processes took more than a tenth of a core is repeated (twice at most).
measure() {
    local t=$1 name=$2; shift 2
    local pids c0 s0 c1 s1 m0 m1 o0 o1 line req foreign attempt r0=0 r1=0
    pids=$(proc_pids "$t")
    for attempt in 1 2 3; do
        wait_quiet
        # shellcheck disable=SC2086
        c0=$(ticks $pids); s0=$(ticks "$SIM_PID"); o0=$(ours_ticks); m0=$(machine_ticks)
        [ -z "$REDIS_PID" ] || r0=$(ticks "$REDIS_PID")
        line=$(loadgen --url "${URL[$t]}" "${AUTH[@]}" --label "$t/$name" "$@")
        # shellcheck disable=SC2086
        c1=$(ticks $pids); s1=$(ticks "$SIM_PID"); o1=$(ours_ticks); m1=$(machine_ticks)
        [ -z "$REDIS_PID" ] || r1=$(ticks "$REDIS_PID")
        # Other processes' CPU during the run, in cores.
        foreign=$(calc "(($m1 - $m0) - ($o1 - $o0) - $(jget "$line" loadgen_cpu_ticks)) / $CLK_TCK / $(jget "$line" elapsed_s)")
        line="${line%\}},\"foreign_cores\":$(calc "sprintf(\"%.3f\", $foreign)")}"
        echo "$line" >>"$OUT/raw.jsonl"
        log "$t/$name: $line"
        if [ "$(calc "$foreign < 0.1")" = 1 ]; then break; fi
        if ((attempt < 3)); then
            RETRIES=$((RETRIES + 1))
            log "$t/$name: other processes took $(calc "sprintf(\"%.2f\", $foreign)") cores; again"
        fi
    done
    FOREIGN_MAX=$(calc "$foreign > $FOREIGN_MAX ? $foreign : $FOREIGN_MAX")
    req=$(jget "$line" requests)
    # A figure taken while something else ran anyway is marked with a dagger.
    R[$t.$name.mark]=""
    [ "$(calc "$foreign < 0.1")" = 1 ] || { R[$t.$name.mark]="†"; INTERFERED=1; }
    R[$t.$name.rps]=$(jget "$line" rps)
    R[$t.$name.p50]=$(jget "$line" p50_ms)
    R[$t.$name.p99]=$(jget "$line" p99_ms)
    R[$t.$name.errors]=$(jget "$line" errors)
    R[$t.$name.cpu_us]=$(calc "($c1 - $c0) * 1e6 / $CLK_TCK / ($req > 0 ? $req : 1)")
    R[$t.$name.redis_cpu_us]=$(calc "($r1 - $r0) * 1e6 / $CLK_TCK / ($req > 0 ? $req : 1)")
    R[$t.$name.sim_cpu_us]=$(calc "($s1 - $s0) * 1e6 / $CLK_TCK / ($req > 0 ? $req : 1)")
}

: >"$OUT/raw.jsonl"

# --- 1. memory with 256 open streams, on a fresh gateway -----------------------------------
# The gateway may still be building things at start (tokenizer tables, say): idle means
# after its RSS has stopped moving (two samples 0.5 s apart within 1 %, 15 s at most).
rss_steady() {
    local a b
    a=$(rss_kib "$1")
    for _ in $(seq 30); do
        sleep 0.5
        b=$(rss_kib "$1")
        if ((b * 100 <= a * 101 && a * 100 <= b * 101)); then break; fi
        a=$b
    done
    echo "$b"
}
if want 1; then
R[gateway.rss_idle]=$(rss_steady "$GW_PID")
hold_rss() { # TARGET: R[TARGET.rss_hold] = RSS (KiB) of the proxy while 256 paced streams are open
    local t=$1 err=$WORK/hold-$1.err line rss=0 p
    : >"$err"
    "${LG_PREFIX[@]}" "$LG" --url "${PACED_URL[$t]}" "${AUTH[@]}" --body "$WORK/stream-paced.json" \
        --hold 256 --hold-secs 4 --label "$t/hold" >"$WORK/hold-$t.json" 2>"$err" &
    local lg=$!
    for _ in $(seq 300); do grep -q holding "$err" && break; sleep 0.1; done
    sleep 1
    # shellcheck disable=SC2046
    for p in $(proc_pids "$t"); do rss=$((rss + $(rss_kib "$p"))); done
    wait "$lg"
    line=$(cat "$WORK/hold-$t.json")
    echo "$line" >>"$OUT/raw.jsonl"
    log "$t/hold: rss ${rss} KiB; $line"
    R[$t.hold_errors]=$(jget "$line" errors)
    R[$t.rss_hold]=$rss
}
hold_rss gateway
hold_rss nginx
fi

# --- 2. throughput and CPU at 64 connections ----------------------------------------------
want 2 && for t in "${TARGETS[@]}"; do
    loadgen --url "${URL[$t]}" "${AUTH[@]}" --body "$WORK/chat-1k.json" --connections 64 \
        --duration "$WARMUP" --label "$t/warmup" >/dev/null
done
want 2 && for size in 1k 8k; do
    for t in "${TARGETS[@]}"; do
        measure "$t" "chat$size" --body "$WORK/chat-$size.json" --connections 64 --duration "$DURATION"
    done
done

# --- 3. latency at a fixed 100 req/s --------------------------------------------------------
want 3 && for t in "${TARGETS[@]}"; do
    measure "$t" rate100 --body "$WORK/chat-1k.json" --rate 100 --connections 16 --duration "$DURATION"
done

# --- 4. streaming: unpaced 64-token streams at 64 connections -------------------------------
want 4 && for t in "${TARGETS[@]}"; do
    measure "$t" stream --body "$WORK/stream.json" --stream --connections 64 --duration "$DURATION"
done

# --- 5. bursts of 256 new connections (three each) -------------------------------------------
want 5 && for t in "${TARGETS[@]}"; do
    slowest=0 over=0 errs=0
    for _ in 1 2 3; do
        wait_quiet
        line=$(loadgen --url "${URL[$t]}" "${AUTH[@]}" --body "$WORK/chat-1k.json" --burst 256 --label "$t/burst")
        echo "$line" >>"$OUT/raw.jsonl"
        log "$t/burst: $line"
        slowest=$(calc "$(jget "$line" slowest_ms) > $slowest ? $(jget "$line" slowest_ms) : $slowest")
        over=$((over + $(jget "$line" over_1s)))
        errs=$((errs + $(jget "$line" errors)))
        sleep 0.5
    done
    R[$t.burst_slowest]=$slowest R[$t.burst_over]=$over R[$t.burst_errors]=$errs
done
R[gateway.rss_end]=$(rss_kib "$GW_PID")

# --- 6. syscalls per request (strace -c), separate runs: strace slows everything down --------
# Two loads: the unpaced streams at 64 connections (per-frame work shows here), and 1 KB
# requests at 100 req/s (the hand-overs behind the added latency show here).
if [ "${STRACE:-1}" = 1 ] && want 6; then
    strace_run() { # TARGET KEY LOADGEN-ARGS…: prints "TARGET KEY SYSCALL CALLS-PER-REQUEST" rows
        local t=$1 key=$2 summary=$WORK/strace-$1-$2.txt args=() p line n
        shift 2
        for p in $(proc_pids "$t"); do args+=(-p "$p"); done
        strace -c -f -o "$summary" "${args[@]}" 2>/dev/null &
        local st=$!
        sleep 1
        line=$(loadgen --url "${URL[$t]}" "${AUTH[@]}" --label "$t/strace-$key" "$@")
        kill -INT "$st"; wait "$st" 2>/dev/null || true
        echo "$line" >>"$OUT/raw.jsonl"
        n=$(jget "$line" requests)
        cp "$summary" "$OUT/strace-$t-$key.txt"
        awk -v n="$n" -v t="$t" -v k="$key" '
            $NF ~ /^(write|writev|pwrite64|sendto|sendmsg|read|readv|pread64|recvfrom|recvmsg|epoll_wait|epoll_pwait|epoll_ctl|futex|sched_yield|fcntl|fsync|fdatasync|statx)$/ {
                printf "%s %s %s %.1f\n", t, k, $NF, $4 / n
            }' "$summary"
        log "$t/strace-$key: $n requests; summary in bench-out/strace-$t-$key.txt"
    }
    if strace -o /dev/null true 2>/dev/null; then
        STRACE_ROWS=$(
            for t in nginx gateway; do
                strace_run "$t" stream --body "$WORK/stream.json" --stream --connections 64 --duration 5
                strace_run "$t" rate100 --body "$WORK/chat-1k.json" --rate 100 --connections 16 --duration 5
            done
        )
    else
        log "strace cannot trace here (ptrace not permitted); skipping"
    fi
fi

# --- results -------------------------------------------------------------------------------
# Rows of sections left out (SECTIONS) print empty.
set +u
f1() { calc "sprintf(\"%.1f\", $1)" 2>/dev/null || echo "$1"; }
ratio() { calc "($2) > 0 ? sprintf(\"%.2f\", ($1) / ($2)) : \"-\""; }
added() { calc "sprintf(\"%+.3f\", $1 - $2)"; }
mib() { calc "sprintf(\"%.1f\", $1 / 1024)"; }
{
    echo "| measurement | direct (simulator) | nginx | gateway | gateway / nginx |"
    echo "|---|---:|---:|---:|---:|"
    for size in 1k 8k; do
        label="1 KB"; [ "$size" = 8k ] && label="8 KB"
        echo "| req/s, $label prompt, 64 conns | ${R[direct.chat$size.rps]}${R[direct.chat$size.mark]} | ${R[nginx.chat$size.rps]}${R[nginx.chat$size.mark]} | ${R[gateway.chat$size.rps]}${R[gateway.chat$size.mark]} | $(ratio "${R[gateway.chat$size.rps]}" "${R[nginx.chat$size.rps]}") |"
        echo "| p50 / p99 ms, $label, 64 conns | ${R[direct.chat$size.p50]} / ${R[direct.chat$size.p99]}${R[direct.chat$size.mark]} | ${R[nginx.chat$size.p50]} / ${R[nginx.chat$size.p99]}${R[nginx.chat$size.mark]} | ${R[gateway.chat$size.p50]} / ${R[gateway.chat$size.p99]}${R[gateway.chat$size.mark]} | |"
        echo "| CPU µs per request, $label (proxy; direct: simulator) | $(f1 "${R[direct.chat$size.cpu_us]}") | $(f1 "${R[nginx.chat$size.cpu_us]}") | $(f1 "${R[gateway.chat$size.cpu_us]}") | $(ratio "${R[gateway.chat$size.cpu_us]}" "${R[nginx.chat$size.cpu_us]}") |"
    done
    echo "| p50 / p99 ms at 100 req/s, 1 KB | ${R[direct.rate100.p50]} / ${R[direct.rate100.p99]}${R[direct.rate100.mark]} | ${R[nginx.rate100.p50]} / ${R[nginx.rate100.p99]}${R[nginx.rate100.mark]} | ${R[gateway.rate100.p50]} / ${R[gateway.rate100.p99]}${R[gateway.rate100.mark]} | |"
    echo "| added p50 / p99 ms at 100 req/s (minus direct) | - | $(added "${R[nginx.rate100.p50]}" "${R[direct.rate100.p50]}") / $(added "${R[nginx.rate100.p99]}" "${R[direct.rate100.p99]}") | $(added "${R[gateway.rate100.p50]}" "${R[direct.rate100.p50]}") / $(added "${R[gateway.rate100.p99]}" "${R[direct.rate100.p99]}") | |"
    echo "| streams/s, 64-token unpaced, 64 conns | ${R[direct.stream.rps]}${R[direct.stream.mark]} | ${R[nginx.stream.rps]}${R[nginx.stream.mark]} | ${R[gateway.stream.rps]}${R[gateway.stream.mark]} | $(ratio "${R[gateway.stream.rps]}" "${R[nginx.stream.rps]}") |"
    echo "| stream p50 / p99 ms (to last byte) | ${R[direct.stream.p50]} / ${R[direct.stream.p99]}${R[direct.stream.mark]} | ${R[nginx.stream.p50]} / ${R[nginx.stream.p99]}${R[nginx.stream.mark]} | ${R[gateway.stream.p50]} / ${R[gateway.stream.p99]}${R[gateway.stream.mark]} | |"
    echo "| CPU µs per stream (proxy; direct: simulator) | $(f1 "${R[direct.stream.cpu_us]}") | $(f1 "${R[nginx.stream.cpu_us]}") | $(f1 "${R[gateway.stream.cpu_us]}") | $(ratio "${R[gateway.stream.cpu_us]}" "${R[nginx.stream.cpu_us]}") |"
    echo "| simulator CPU µs per request in the same runs, 1 KB / stream | $(f1 "${R[direct.chat1k.sim_cpu_us]}") / $(f1 "${R[direct.stream.sim_cpu_us]}") | $(f1 "${R[nginx.chat1k.sim_cpu_us]}") / $(f1 "${R[nginx.stream.sim_cpu_us]}") | $(f1 "${R[gateway.chat1k.sim_cpu_us]}") / $(f1 "${R[gateway.stream.sim_cpu_us]}") | |"
    if [ -n "$REDIS_PID" ]; then
        echo "| redis-server CPU µs per request (budgets), 1 KB / 8 KB / stream | - | - | $(f1 "${R[gateway.chat1k.redis_cpu_us]}") / $(f1 "${R[gateway.chat8k.redis_cpu_us]}") / $(f1 "${R[gateway.stream.redis_cpu_us]}") | |"
    fi
    echo "| RSS MiB with 256 open streams (nginx: both workers) | - | $(mib "${R[nginx.rss_hold]}") | $(mib "${R[gateway.rss_hold]}") (idle at start $(mib "${R[gateway.rss_idle]}"), after all runs $(mib "${R[gateway.rss_end]}")) | |"
    echo "| burst of 256 new connections ×3: slowest ms / count > 1 s | ${R[direct.burst_slowest]} / ${R[direct.burst_over]} | ${R[nginx.burst_slowest]} / ${R[nginx.burst_over]} | ${R[gateway.burst_slowest]} / ${R[gateway.burst_over]} | |"
    errs=""
    for t in "${TARGETS[@]}"; do
        e=0
        for k in chat1k chat8k rate100 stream; do e=$((e + ${R[$t.$k.errors]:-0})); done
        e=$((e + ${R[$t.burst_errors]:-0} + ${R[$t.hold_errors]:-0}))
        errs+=" $t $e;"
    done
    echo
    echo "Errors (non-2xx, transport, truncated streams) over all runs:$errs"
    if [ -n "${STRACE_ROWS:-}" ]; then
        echo
        echo "Syscalls per request under \`strace -c -f\` (5 s each; proxy processes only):"
        echo
        echo "| syscall | nginx, per stream | gateway, per stream | nginx, per request at 100 req/s | gateway, per request at 100 req/s |"
        echo "|---|---:|---:|---:|---:|"
        for sc in $(awk '{print $3}' <<<"$STRACE_ROWS" | sort -u); do
            row="| $sc |"
            for tk in "nginx stream" "gateway stream" "nginx rate100" "gateway rate100"; do
                v=$(awk -v tk="$tk" -v s="$sc" '$1 " " $2 == tk && $3 == s {print $4}' <<<"$STRACE_ROWS")
                row+=" ${v:--} |"
            done
            echo "$row"
        done
    fi
    echo
    echo "Other processes' CPU during the measurements: at most $(calc "sprintf(\"%.2f\", $FOREIGN_MAX)") cores (runs above 0.1 were repeated: $RETRIES repeats)."
    if [ "$INTERFERED" = 1 ]; then echo "† other processes took over 0.1 cores during this run even after two repeats: do not trust it."; fi
    echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r); gateway budgets: ${STORE:-local}, ledger: $(sed -E 's|://[^@/]*@|://|; s|^(sqlite)://.*|\1 (temp dir)|' <<<"${LEDGER:-sqlite://x}"); nginx $("$NGINX" -v 2>&1 | cut -d/ -f2); ${DURATION} s per measurement; load generator pinned: ${PIN:-0}; niceness of all processes: $NICE."
} | tee "$OUT/results.md"
log "raw loadgen lines: bench-out/raw.jsonl"
