#!/usr/bin/env bash
# The soak test of docs/PERFORMANCE.md ("Soak"): `tollgate serve` in front of `tollgate
# simulate`, thousands of slow SSE streams held at once, wave after wave; the gateway's RSS
# must level off and every stream must end whole and be in the ledger (tests/soak.rs).
#
#   bash benches/soak.sh        # about 3 minutes after the build; log in bench-out/soak.log
#
# Knobs (environment, passed to the test): TOLLGATE_SOAK_STREAMS (2000), TOLLGATE_SOAK_WAVES
# (8), TOLLGATE_SOAK_TOKENS (60), TOLLGATE_SOAK_TOKEN_MS (300).
set -euo pipefail

cd "$(dirname "$0")/.."
mkdir -p bench-out
STREAMS=${TOLLGATE_SOAK_STREAMS:-2000}

# Each stream holds a descriptor here, two in the gateway and one in the simulator, which
# inherit this limit. Raise the soft limit as far as the hard one allows.
want=$((2 * STREAMS + 4096))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    echo "soak: the hard limit on open files is $hard; $want are needed for $STREAMS streams" >&2
    exit 1
fi
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$want" ]; then
    ulimit -Sn "$want"
fi

echo "soak: $(nproc) cores, ulimit -n $(ulimit -Sn), commit $(git rev-parse --short HEAD)" | tee bench-out/soak.log
cargo test --release --test soak -- --ignored --nocapture 2>&1 | tee -a bench-out/soak.log
