#!/usr/bin/env bash
# ./bench.sh live-update: blackout of a baton-vmm live update under load (test guest with 2 vCPUs,
# 256 MiB, io-cont on baton-blk + baton-net-tap, a UDP echo stream from a network namespace),
# 20 swaps: p50/p99/max as measured by the old VMM (pause -> ack), by the new VMM (its own
# phases), by the host watching the disk and by the echo stream; lost datagrams, guest I/O
# errors, and the median of every phase. In the same run, QEMU 10 `migrate` mode cpr-transfer
# (-accel kvm, same guest on its own virtio-blk) for a few swaps. One JSON line per figure.
# BATON_LU_SWAPS / BATON_LU_QEMU_SWAPS change the counts (default 20 / 10). Needs root for the
# namespace (without it the echo stream is left out). Called by ./bench.sh (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}/release
G=tests/guest/target/x86_64-unknown-none/release/baton-test-guest
if [[ ! -x $T/baton-vmm || ! -x $T/baton-blk || ! -x $T/baton-net-tap || ! -x $T/batonctl || ! -x $T/baton-lu-bench ]]; then
    cargo build --release --quiet -p baton-vmm -p baton-blk -p baton-net-tap -p baton-tools
fi
if [[ ! -f $G ]]; then
    (cd tests/guest && cargo build --release --quiet)
fi
[[ -r /dev/kvm ]] || { echo "bench/live-update.sh: /dev/kvm is not accessible" >&2; exit 1; }
export RUST_LOG=${RUST_LOG:-error}
exec "$T/baton-lu-bench" --swaps "${BATON_LU_SWAPS:-20}" --qemu-swaps "${BATON_LU_QEMU_SWAPS:-10}"
