#!/usr/bin/env bash
# ./bench.sh live-update-slow: the blackout of a live update while every disk request takes
# 20 ms (a FUSE file outside baton-blk, tests/slowfs.py), rings drained (drain=on) against not
# drained (GET_VRING_BASE_INFLIGHT), 100 swaps each, nothing lost (the guest's verified writes and
# the backing file are checked). BATON_LU_SLOW_SWAPS changes the count. Needs root (FUSE
# allow_other) and python3-fusepy (scripts/setup.sh). Called by ./bench.sh (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
if [[ ! -x $T/baton-vmm || ! -x $T/baton-blk || ! -x $T/baton-lu-slow-bench ]]; then
    cargo build --release --quiet -p baton-vmm -p baton-blk -p baton-tools
fi
export RUST_LOG=${RUST_LOG:-error}
exec "$T/baton-lu-slow-bench" --swaps "${BATON_LU_SLOW_SWAPS:-100}"
