#!/usr/bin/env bash
# ./bench.sh live-update: the pause a live update causes under load, baton-vmm against QEMU 10
# cpr-transfer on the same test guest and the same workload (blk-cont: verified disk writes;
# QEMU's disk on its own virtio-blk with an iothread and aio=io_uring), the same number of swaps
# (100 each), measured the same way from the host (largest pause between completed writes), each
# beside its no-swap floor; then baton alone under io-cont with a UDP echo stream from a network
# namespace (echo gap, lost datagrams, every phase). One JSON line per figure.
# BATON_LU_SWAPS / BATON_LU_QEMU_SWAPS / BATON_LU_ECHO_SWAPS change the counts (default 100; p99
# is printed only over >= 100). Needs root for the namespace (without it the echo run is left
# out). Called by ./bench.sh (release build).
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
exec "$T/baton-lu-bench" --swaps "${BATON_LU_SWAPS:-100}" --qemu-swaps "${BATON_LU_QEMU_SWAPS:-100}" \
    --echo-swaps "${BATON_LU_ECHO_SWAPS:-100}"
